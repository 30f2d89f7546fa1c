"""The CUDA BN kernels' planner and the cost model behind ``auto`` (csrc/bn_add_relu/plan.h), run on CPU
through the cuda_sim backend's copy of the real planner (resfused/_cuda_sim.py ``planner``).

The model's constants are assumptions until a GPU run calibrates them; what is tested here is that the
model counts what the kernels move (the pass counts documented in csrc/bn_add_relu.cu), that it sees what
it claims to see (re-reads, idle SMs, occupancy, launches) and that ``auto`` runs the cheaper estimate.
"""

import dataclasses
import json
import os

import pytest
import torch

from resfused import _cuda_sim as sim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BF16, F32 = torch.bfloat16, torch.float32
MiB = 1 << 20


@pytest.fixture(scope="module", autouse=True)
def _built():
    sim.build()


def _sm90_device() -> sim.Device:
    """H100 with the register counts ptxas gives our kernels (the committed static report): the largest of
    each kernel kind, so occupancy is what the GPU's query would answer."""
    with open(os.path.join(ROOT, "bench", "results", "static", "sm90.json")) as f:
        rows = [r for r in json.load(f)["rows"] if r["backend"] == "cuda" and r.get("regs")]

    def most(*suffixes):
        regs = [r["regs"] for r in rows if r["kernel"].endswith(suffixes)]
        assert regs, suffixes
        return max(regs)

    persistent = most("_persistent_kernel")
    return dataclasses.replace(sim.H100, reduce_regs=most("_stats_kernel", "_bwd_reduce_kernel"),
                               elementwise_regs=most("_apply_kernel", "_dx_kernel"),
                               persistent_regs=persistent, launch_persistent_regs=persistent)


SM90 = _sm90_device()


def _plans(shape, dtype, layout, op):
    return {s: sim.planner(shape, dtype, layout, op, s) for s in ("two_pass", "persistent", "auto")}


def _passes(est, shape, dtype):
    n, c, h, w = shape
    return est["hbm_bytes"] / (n * c * h * w * torch.empty((), dtype=dtype).element_size())


# ------------------------------------------------------------------------------------------------------
# the model counts what the kernels move
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,mask", [(BF16, 1 / 16), (F32, 1 / 32)], ids=["bf16", "fp32"])
@pytest.mark.parametrize("layout", ["cl", "nchw"])
def test_bytes_are_the_documented_pass_counts(dtype, mask, layout):
    """csrc/bn_add_relu.cu: forward two-pass 4 + mask, persistent 3 + mask (slice on chip); backward
    two-pass 6 + mask, persistent 4 + mask; in passes over one (N, C, H, W) tensor."""
    shape = (8, 64, 14, 14)  # small enough for the whole slice on chip
    with sim.settings(device=SM90):
        fwd, bwd = _plans(shape, dtype, layout, "forward_train"), _plans(shape, dtype, layout, "backward")
    for plans in (fwd, bwd):
        assert plans["persistent"]["scheme"] == "persistent"
        assert plans["persistent"]["cache_iters"] == plans["persistent"]["iters"]
    assert _passes(fwd["two_pass"], shape, dtype) == pytest.approx(4 + mask, rel=1e-12)
    assert _passes(fwd["persistent"], shape, dtype) == pytest.approx(3 + mask, rel=1e-12)
    assert _passes(bwd["two_pass"], shape, dtype) == pytest.approx(6 + mask, rel=1e-12)
    assert _passes(bwd["persistent"], shape, dtype) == pytest.approx(4 + mask, rel=1e-12)
    assert (fwd["two_pass"]["launches"], fwd["two_pass"]["grid_syncs"]) == (3, 0)
    assert (fwd["persistent"]["launches"], fwd["persistent"]["grid_syncs"]) == (1, 1)


@pytest.mark.parametrize("op,reread_passes", [("forward_train", 1), ("backward", 2)])
def test_rereads_count_in_hbm_past_half_the_l2(monkeypatch, op, reread_passes):
    """With no on-chip cache the persistent kernels re-read x (backward: x and g): within half the L2 those
    are hits (no HBM bytes), past it every byte counts."""
    monkeypatch.setenv("RESFUSED_CUDA_PERSISTENT_CACHE_BYTES", "0")
    shape, base = (16, 64, 56, 56), {"forward_train": 3 + 1 / 16, "backward": 4 + 1 / 16}[op]
    with sim.settings(device=SM90):
        hit = sim.planner(shape, BF16, "cl", op, "persistent")
    with sim.settings(device=dataclasses.replace(SM90, l2_bytes=0)):
        miss = sim.planner(shape, BF16, "cl", op, "persistent")
    assert hit["cache_iters"] == miss["cache_iters"] == 0
    assert _passes(hit, shape, BF16) == pytest.approx(base, rel=1e-12)
    assert _passes(miss, shape, BF16) == pytest.approx(base + reread_passes, rel=1e-12)
    assert miss["us"] > hit["us"]


# ------------------------------------------------------------------------------------------------------
# the model sees what it claims to see
# ------------------------------------------------------------------------------------------------------

def _floor_us(est):
    """The HBM floor of an estimate plus its launches and grid syncs (CostModel's defaults)."""
    return est["hbm_bytes"] / 3.0e6 + 2.0 * est["launches"] + 1.0 * est["grid_syncs"]


def test_idle_sms_cost_time():
    """An NCHW persistent grid holds one channel per block: at C = 67 on 132 SMs (one 512-thread block per
    SM at the kernels' registers) 65 SMs idle, and the 67 others cannot keep enough bytes in flight to
    reach the memory's bandwidth; at C = 132 every SM works and the estimate is the HBM floor. The
    two-pass scheme splits each channel over many blocks and is at its floor either way."""
    idle_shape, full_shape = (64, 67, 32, 32), (32, 132, 32, 32)
    with sim.settings(device=SM90):
        idle, full = (sim.planner(s, BF16, "nchw", "forward_train", "persistent") for s in (idle_shape, full_shape))
        two = [sim.planner(s, BF16, "nchw", "forward_train", "two_pass") for s in (idle_shape, full_shape)]
    assert (idle["scheme"], idle["grid"]) == ("persistent", 67)
    assert (full["scheme"], full["grid"]) == ("persistent", 132)
    assert full["us"] == pytest.approx(_floor_us(full), rel=1e-9)
    assert idle["us"] > 1.05 * _floor_us(idle)
    for t in two:
        assert t["us"] == pytest.approx(_floor_us(t), rel=1e-9)


def test_occupancy_and_bytes_in_flight_cost_time():
    """Fewer resident threads (more registers per thread) hold fewer bytes in flight: past the point where
    they can cover the memory latency, the estimate grows."""
    shape = (256, 256, 28, 28)
    with sim.settings(device=dataclasses.replace(SM90, reduce_regs=32, elementwise_regs=32)):
        roomy = sim.planner(shape, BF16, "cl", "forward_train", "two_pass")
    with sim.settings(device=dataclasses.replace(SM90, reduce_regs=255, elementwise_regs=255)):
        tight = sim.planner(shape, BF16, "cl", "forward_train", "two_pass")
    assert roomy["hbm_bytes"] == tight["hbm_bytes"]
    # one 256-thread block per SM holds 16 KiB of x in flight: 2.7 TB/s at 0.8 us, under the 3.0 assumed
    assert tight["us"] > roomy["us"] + 3.0
    # at full occupancy the estimate is the bandwidth floor plus three launches
    assert roomy["us"] == pytest.approx(_floor_us(roomy), rel=1e-9)


def test_small_tensors_pay_launches():
    """At a few KB the time is launches: one cooperative launch beats three."""
    with sim.settings(device=SM90):
        plans = _plans((2, 16, 4, 4), BF16, "cl", "forward_train")
    assert plans["two_pass"]["us"] == pytest.approx(3 * 2.0, abs=0.25)
    assert plans["persistent"]["us"] == pytest.approx(2.0 + 1.0, abs=0.25)
    assert plans["auto"]["scheme"] == "persistent"


# ------------------------------------------------------------------------------------------------------
# auto runs the cheaper estimate
# ------------------------------------------------------------------------------------------------------

# ResNet-50's BN shapes at batch 256 (stem, the four stages' 1x1-in, 3x3 and 1x1-out widths), and
# ImageNet-sized oddities: an NCHW stage whose C leaves SMs idle, a wide C, a large fp32 plane
RESNET50 = [(256, 64, 112, 112), (256, 64, 56, 56), (256, 256, 56, 56), (256, 128, 28, 28), (256, 512, 28, 28),
            (256, 256, 14, 14), (256, 1024, 14, 14), (256, 512, 7, 7), (256, 2048, 7, 7)]
EXTRA = [(256, 96, 28, 28), (256, 67, 56, 56), (256, 67, 112, 112), (32, 64, 56, 56), (8, 3, 224, 224)]


def test_auto_runs_the_cheaper_estimate():
    seen = set()
    with sim.settings(device=SM90):
        for shape in RESNET50 + EXTRA:
            for dtype in (BF16, F32):
                for layout in ("cl", "nchw"):
                    for op in ("forward_train", "backward"):
                        p = _plans(shape, dtype, layout, op)
                        case = (shape, dtype, layout, op)
                        if p["persistent"]["scheme"] != "persistent":  # infeasible: two-pass either way
                            assert p["auto"]["scheme"] == "two_pass", case
                            continue
                        cheaper = min(("persistent", "two_pass"), key=lambda s: (p[s]["us"], s != "persistent"))
                        assert p["auto"]["scheme"] == cheaper, (case, p)
                        assert p["auto"]["us"] == p[cheaper]["us"], case
                        seen.add(cheaper)
    # both outcomes occur: auto is not a fixed scheme
    assert seen == {"persistent", "two_pass"}


def test_forced_schemes_ignore_the_model():
    """``persistent`` runs persistent where feasible even where the model prefers two-pass (an fp32 NCHW
    tensor of 67 large planes: the idle SMs' cost exceeds the pass saved); ``two_pass`` never runs
    persistent."""
    shape = (256, 67, 112, 112)
    with sim.settings(device=SM90):
        p = _plans(shape, F32, "nchw", "forward_train")
        assert p["persistent"]["scheme"] == "persistent" and p["persistent"]["grid"] == 67
        assert p["persistent"]["us"] > p["two_pass"]["us"]
        assert p["auto"]["scheme"] == "two_pass"
        for s in RESNET50:
            assert sim.planner(s, BF16, "cl", "backward", "two_pass")["scheme"] == "two_pass"


def test_plan_string_carries_the_estimate(monkeypatch):
    x = torch.empty(2, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    with sim.settings(device=SM90):
        for op in ("forward_train", "backward"):
            fields = dict(kv.split("=") for kv in sim.plan(x, op).split()[1:])
            assert float(fields["est_us"]) == pytest.approx(sim.planner((2, 16, 4, 4), F32, "cl", op)["us"], abs=0.05)
