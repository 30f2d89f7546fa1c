"""csrc/plan_cache.h, the bounded cache of cuDNN plans and "no fused engine" misses (conv_bn.cpp, conv_bias_act.cu):
least recently used evicted beyond the bound, the first insert of a key wins, an evicted plan a caller holds stays
alive, concurrent use keeps the bound, a plan builds with no lock held (other keys are served meanwhile), and a
configuration without a fused engine is tried once and remembered (out of memory is not). A C++ unit test (tests/plan_cache_test.cpp) built by the system
compiler with AddressSanitizer and UBSan, here and against a copy of the header whose bound is removed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
# The system C++ compiler, as for the cuda_sim runtime (make test needs one): missing, the build fails the test.
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or "g++"


def _build_and_run(tmp_path: Path, include: Path) -> subprocess.CompletedProcess:
    exe = tmp_path / "plan_cache_test"
    subprocess.run([CXX, "-std=c++17", "-O1", "-pthread", "-fsanitize=address,undefined", f"-I{include}",
                    str(ROOT / "tests" / "plan_cache_test.cpp"), "-o", str(exe)], check=True, timeout=300)
    return subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)


def test_bounded_cache(tmp_path):
    proc = _build_and_run(tmp_path, ROOT / "csrc")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


# Each mutation: (old, new) replacements in csrc/plan_cache.h, each old text found exactly once.
MUTATIONS = {
    # no bound
    "unbounded": [("order_.size() > capacity_", "false")],
    # every build under one process-wide lock, the defect the cache replaced
    "builds_serialised": [
        ("namespace resfused {\n", "namespace resfused {\ninline std::mutex& serial() { static std::mutex m; return m; }\n"),
        ("std::shared_ptr<const V> built = build();",
         "std::lock_guard<std::mutex> hold(serial()); std::shared_ptr<const V> built = build();")],
    # a transient failure kept
    "transient_cached": [("return keep(*built) ?", "return true ?")],
    # the miss not remembered: cuDNN searched again on every call
    "miss_forgotten": [("misses.insert(key, std::make_shared<const bool>(true));", "")],
    # out of memory remembered as a miss
    "oom_remembered": [("} catch (const Transient&) {\n", "} catch (const std::bad_alloc&) {\n")],
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_a_mutated_cache_fails_the_test(tmp_path, mutation):
    header = (ROOT / "csrc" / "plan_cache.h").read_text()
    for old, new in MUTATIONS[mutation]:
        assert header.count(old) == 1, (mutation, old)
        header = header.replace(old, new)
    (tmp_path / "plan_cache.h").write_text(header)
    proc = _build_and_run(tmp_path, tmp_path)
    assert proc.returncode == 1 and proc.stdout.startswith("FAILED"), proc.stdout + proc.stderr
