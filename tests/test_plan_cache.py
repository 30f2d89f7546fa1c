"""csrc/plan_cache.h, the bounded cache of cuDNN plans and "no fused engine" misses (conv_bn.cpp, conv_bias_act.cu):
least recently used evicted beyond the bound, the first insert of a key wins, an evicted plan a caller holds stays
alive, and concurrent use keeps the bound. A C++ unit test (tests/plan_cache_test.cpp) built by the system
compiler with AddressSanitizer and UBSan, here and against a copy of the header whose bound is removed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


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


def test_unbounded_cache_fails_the_test(tmp_path):
    header = (ROOT / "csrc" / "plan_cache.h").read_text()
    assert header.count("order_.size() > capacity_") == 1
    (tmp_path / "plan_cache.h").write_text(header.replace("order_.size() > capacity_", "false"))
    proc = _build_and_run(tmp_path, tmp_path)
    assert proc.returncode == 1 and proc.stdout.startswith("FAILED"), proc.stdout + proc.stderr
