"""bench/bench_cpu.py without timing a real model: rows, ratios, the logits check and the summary files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _harness, bench_cpu  # noqa: E402
from bench import bench_resnet as models  # noqa: E402


def _fake_steps(monkeypatch, logits_off: str = ""):
    ref = torch.ones(2, 10)
    refs = {"fp64": ref.double(), "autocast": ref, "cast": ref}
    monkeypatch.setattr(models, "reference_logits", lambda cfg, device: refs)

    def make(impl, cfg, device):
        out = ref * (2.0 if impl.name == logits_off else 1.0)
        return (lambda i: out), ""

    monkeypatch.setattr(models, "make_model_step", make)


def test_cpu_rows_and_summary(monkeypatch, tmp_path):
    _fake_steps(monkeypatch)
    doc = _harness.new_result(torch.device("cpu"), None)
    doc.update(machine=bench_cpu.cpu_name(), threads=1, omp_num_threads="2", mkldnn=True, timing="test")
    bench_cpu.run_cpu_rows(doc, batch=2, image_size=16, rounds=3, show_progress=False)
    _harness.add_derived(doc)
    got = {(r["mode"], r["impl"]) for r in doc["rows"]}
    assert got == {(i.mode, i.name) for i in bench_cpu.CPU_IMPLS}
    assert not doc["errors"]
    for r in doc["rows"]:
        assert r["shape"] == "2x3x16x16" and r["dtype"] == "fp32" and len(r["samples_ms"]) == 3
        assert r["speedup_vs_eager"] is not None
    assert {r["backend"] for r in doc["rows"] if r["impl"] == "resfused-fused"} == {"mkldnn"}
    json_path, md_path = bench_cpu.write_summary(doc, tmp_path)
    assert json.loads(json_path.read_text())["rows"] == doc["rows"]
    md = md_path.read_text()
    assert "jit-optimize-for-inference" in md and doc["git_sha"] in md and "x |" in md


def test_wrong_logits_are_an_error_not_a_row(monkeypatch):
    _fake_steps(monkeypatch, logits_off="resfused-fused")
    doc = _harness.new_result(torch.device("cpu"), None)
    bench_cpu.run_cpu_rows(doc, batch=2, image_size=16, rounds=1, show_progress=False, modes=("infer",))
    assert [e["impl"] for e in doc["errors"]] == ["resfused-fused"]
    assert "against the float64 stock model" in doc["errors"][0]["error"]
    assert "resfused-fused" not in {r["impl"] for r in doc["rows"]}
