"""Backend selection: explicit argument > set_backend() > RESFUSED_BACKEND > auto."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

import resfused
from resfused import _backend

from conftest import DEVICE, HAS_CUDA


def test_default_is_auto(monkeypatch):
    monkeypatch.delenv("RESFUSED_BACKEND", raising=False)
    assert resfused.get_backend() == "auto"


def test_precedence(monkeypatch):
    monkeypatch.setenv("RESFUSED_BACKEND", "reference")
    assert resfused.get_backend() == "reference"
    resfused.set_backend("auto")
    assert resfused.get_backend() == "auto"  # set_backend beats the environment
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    assert _backend.resolve("reference", x) == "reference"  # an explicit argument beats both
    resfused.set_backend(None)
    assert resfused.get_backend() == "reference"


def test_auto_on_cpu_tensors_is_native_or_reference():
    """auto on CPU: aten's own kernels ("native") for float32/float64, the reference for other dtypes
    (tests/test_cpu_fast_path.py tests the native path against the oracle)."""
    x = torch.randn(2, 3, 4, 4)
    assert _backend.resolve("auto", x) == "native"
    assert _backend.resolve("auto", x.double()) == "native"
    assert _backend.resolve("auto", x.bfloat16()) == "reference"
    assert _backend.resolve("reference", x) == "reference"


@pytest.mark.cuda
def test_auto_on_cuda_prefers_compiled_backends():
    x = torch.randn(2, 3, 4, 4, device="cuda")
    expected = "cuda" if "cuda" in resfused.available_backends() else "triton"
    assert _backend.resolve("auto", x) == expected
    # float64 is not supported by the cuda backend: auto falls back instead of failing
    assert _backend.resolve("auto", x.double()) in ("triton", "reference")
    if "cuda" in resfused.available_backends():
        with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable: .*float64"):
            _backend.resolve("cuda", x.double())


def test_available_backends_lists_reference_and_triton_when_usable():
    names = resfused.available_backends()
    assert "reference" in names
    if importlib.util.find_spec("triton") is not None and (HAS_CUDA or _backend.triton_interpreted()):
        # The Triton kernels must import wherever triton does: CI runs them in the interpreter.
        assert "triton" in names, _backend.unavailable_reason("triton")


def test_backends_say_what_runs_where_and_why_not():
    infos = resfused.backends()
    assert [b.name for b in infos] == ["cuda", "triton", "reference", "cuda_sim"]  # every name but "auto"
    assert {b.name for b in infos} == set(_backend.BACKENDS) - {"auto"}
    assert [b.name for b in infos if b.available] == resfused.available_backends()
    for b in infos:
        assert b.available == (b.reason is None) and b.reason == _backend.unavailable_reason(b.name), b
    cpu = {b.name: b for b in resfused.backends("cpu", torch.float32)}
    assert cpu["reference"].available
    assert not cpu["cuda"].available and "cuda" in cpu["cuda"].reason.lower()  # never CPU tensors
    sim = {b.name: b for b in resfused.backends(torch.device("cpu"), torch.float64)}["cuda_sim"]
    assert not sim.available and ("float64" in sim.reason or "not built" in sim.reason), sim


def test_python_m_resfused_reports_backends():
    out = subprocess.run([sys.executable, "-m", "resfused"], capture_output=True, text=True, check=True).stdout
    assert f"torch {torch.__version__}" in out
    for name in ("cuda", "triton", "reference"):
        assert f"  {name}" in out
    if not HAS_CUDA:
        assert "cuda      unavailable: " in out


def test_module_backend_attribute_routes_calls(monkeypatch):
    """A module's backend is used for its calls: route to a spy and check it was hit."""
    from resfused.reference import bn_add_relu as ref

    calls = []
    real = ref.forward_train
    monkeypatch.setattr(ref, "forward_train", lambda *a: calls.append(1) or real(*a))
    bn = resfused.nn.BatchNormAddReLU2d(3, backend="reference").to(DEVICE)
    bn(torch.randn(2, 3, 2, 2, device=DEVICE))
    assert calls == [1]


def test_sample_scale_calls_never_resolve_to_cuda(monkeypatch):
    """The cuda backend has no sample_scale: auto picks triton for such calls on CUDA tensors, an explicit
    "cuda" raises saying why. (Resolution only reads the tensor's device and dtype, so this runs anywhere.)"""
    import types

    monkeypatch.setattr(_backend, "_cuda_ext_error", lambda: None)
    monkeypatch.setattr(_backend, "_triton_import_error", lambda: None)
    x = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float32)
    assert _backend.resolve("auto", x) == "cuda"
    assert _backend.resolve("auto", x, sample_scale=True) == "triton"
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable: .*does not implement sample_scale"):
        _backend.resolve("cuda", x, sample_scale=True)
