"""Synchronised BatchNormAddReLU2d across two CPU processes (gloo) against single-process stock BN.

One module-scoped spawn of two ranks runs every distributed scenario and saves what each rank saw; the
tests compare those results, in this process, with stock PyTorch on the concatenated batch:
  * the op: outputs, input and residual gradients, weight/bias gradients (summed over ranks), running
    stats and num_batches_tracked over two steps, equal F.batch_norm(+ residual, relu) on the whole
    batch (also with a per-sample scale, drop-path); exactly one collective per forward and one per
    backward; none in eval; bad input raises before any collective and changes no state;
  * convert() of an nn.SyncBatchNorm model keeps its process group; revert() restores SyncBatchNorm;
  * a DDP-wrapped converted resnet18 trains two SGD steps like stock resnet18 on the whole batch.
A hang fails the fixture after TIMEOUT_S instead of blocking the suite.
"""

from __future__ import annotations

import datetime
import logging
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import resfused
from resfused.nn import BasicBlock, BatchNormAddReLU2d

from _oracle import assert_close
from conftest import usable_backends

torchvision = pytest.importorskip("torchvision")

WORLD_SIZE = 2
TIMEOUT_S = 120
CPU = torch.device("cpu")
BACKENDS = usable_backends(CPU)

# Each case: the global batch, how it is split over the two ranks, and the module's options.
CASES = {
    "nchw_relu_residual_uneven": dict(split=(3, 2), c=5, hw=(3, 3), dtype=torch.float64, layout="nchw",
                                      relu=True, residual=True, affine=True, momentum=0.1, group="world"),
    "cl_no_relu_momentum_none_subgroup": dict(split=(2, 2), c=3, hw=(4, 2), dtype=torch.float64, layout="cl",
                                              relu=False, residual=False, affine=False, momentum=None,
                                              group="new_group"),
    # A per-sample scale on the BN output (drop-path): y = relu(s[n] * bn(x) + residual), statistics of x.
    "drop_path_sample_scale": dict(split=(3, 2), c=5, hw=(3, 3), dtype=torch.float64, layout="cl", relu=True,
                                   residual=True, affine=True, momentum=0.1, group="world",
                                   sample_scale=[1.25, 0.0, 1.25, 0.5, 0.0]),
    "empty_rank": dict(split=(4, 0), c=4, hw=(2, 3), dtype=torch.float64, layout="nchw", relu=True,
                       residual=True, affine=True, momentum=0.1, group="world"),
    # No rank has data: no statistics, running stats untouched (as stock BN on an empty batch).
    "all_ranks_empty": dict(split=(0, 0), c=4, hw=(2, 3), dtype=torch.float64, layout="nchw", relu=True,
                            residual=True, affine=True, momentum=0.1, group="world"),
    # Inputs far from zero in float32: E[x^2] - E[x]^2 would lose the variance (4 against 1e6) here: its
    # relative error would be ~1e-1. The merged variance itself carries ~6e-6: each rank's fp32 mean near
    # 1e3 is rounded by ~3e-5 before the exchange (as in nn.SyncBatchNorm), hence stats_rtol.
    "float32_far_from_zero": dict(split=(2, 3), c=4, hw=(5, 5), dtype=torch.float32, layout="nchw", relu=True,
                                  residual=True, affine=True, momentum=0.1, group="world", offset=1e3,
                                  stats_rtol=2e-5),
}
STEPS = 2
COLLECTIVES = ("all_gather", "all_gather_single", "all_gather_into_tensor", "all_reduce", "broadcast",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "reduce",
               "scatter", "barrier")


# ---------------------------------------------------------------------------------------------------
# inputs shared by the ranks and the oracle
# ---------------------------------------------------------------------------------------------------

def _fmt(layout):
    return torch.channels_last if layout == "cl" else torch.contiguous_format


def _case_tensors(case):
    """Global batch, residual, upstream-gradient weights and module state, from a fixed seed."""
    g = torch.Generator().manual_seed(1234)
    n = sum(case["split"])
    c, (h, w) = case["c"], case["hw"]
    shape = (n, c, h, w)
    dt = torch.float64
    x = torch.randn(shape, generator=g, dtype=dt) * 2 + torch.randn(1, c, 1, 1, generator=g, dtype=dt)
    x = x + case.get("offset", 0.0)
    if "sample_scale" in case:
        extra = dict(sample_scale=torch.tensor(case["sample_scale"], dtype=dt))
    else:
        extra = {}
    t = dict(x=x, residual=torch.randn(shape, generator=g, dtype=dt), **extra,
             upstream=torch.randn(shape, generator=g, dtype=dt),
             weight=torch.rand(c, generator=g, dtype=dt) + 0.5, bias=torch.rand(c, generator=g, dtype=dt) - 0.5,
             running_mean=torch.rand(c, generator=g, dtype=dt) - 0.5,
             running_var=torch.rand(c, generator=g, dtype=dt) + 0.5)
    return {k: v.to(case["dtype"]) for k, v in t.items()}


def _local(t, case, rank):
    start = sum(case["split"][:rank])
    return t[start:start + case["split"][rank]]


def _resnet18(seed=0):
    torch.manual_seed(seed)
    m = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m.double()


def _ddp_batch():
    g = torch.Generator().manual_seed(7)
    return (torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64),
            torch.randint(0, 10, (4,), generator=g))


# ---------------------------------------------------------------------------------------------------
# worker side (runs in the spawned ranks)
# ---------------------------------------------------------------------------------------------------

class _CollectiveCounter:
    """Counts calls to torch.distributed collectives (patched module attributes)."""

    def __init__(self):
        self.calls = []
        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is not None:
                setattr(dist, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            self.calls.append(name)
            return fn(*args, **kwargs)
        return counted

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def _run_case(case, backend, rank, group, counter):
    t = _case_tensors(case)
    fmt = _fmt(case["layout"])
    x = _local(t["x"], case, rank).clone().contiguous(memory_format=fmt).requires_grad_()
    residual = None
    if case["residual"]:
        residual = _local(t["residual"], case, rank).clone().contiguous(memory_format=fmt).requires_grad_()
    upstream = _local(t["upstream"], case, rank)
    sample_scale = _local(t["sample_scale"], case, rank) if "sample_scale" in t else None
    bn = BatchNormAddReLU2d(case["c"], momentum=case["momentum"], affine=case["affine"], relu=case["relu"],
                            backend=backend, process_group=group, dtype=case["dtype"]).train()
    with torch.no_grad():
        if case["affine"]:
            bn.weight.copy_(t["weight"])
            bn.bias.copy_(t["bias"])
        bn.running_mean.copy_(t["running_mean"])
        bn.running_var.copy_(t["running_var"])
    out = dict(steps=[])
    for _ in range(STEPS):
        counter.take()
        y = bn(x, residual, sample_scale=sample_scale)
        fwd_calls = counter.take()
        (y * upstream).sum().backward()
        step = dict(y=y.detach().clone(), y_is_cl=y.is_contiguous(memory_format=torch.channels_last),
                    grad_x=x.grad.clone(), fwd_calls=fwd_calls, bwd_calls=counter.take())
        if residual is not None:
            step["grad_residual"] = residual.grad.clone()
            residual.grad = None
        if case["affine"]:
            step["grad_weight"], step["grad_bias"] = bn.weight.grad.clone(), bn.bias.grad.clone()
            bn.weight.grad = bn.bias.grad = None
        x.grad = None
        out["steps"].append(step)
    out["state"] = {k: v.clone() for k, v in bn.state_dict().items()}
    bn.eval()
    with torch.no_grad():
        out["eval_y"] = bn(x, residual)
    out["eval_calls"] = counter.take()
    return out


def _bad_input(rank, counter):
    """Bad input on a synchronised module: an error naming the argument, no state change, no collective."""
    bn = BatchNormAddReLU2d(4, process_group="world").train()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    errors = []
    counter.take()
    for args in ((torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 1)),      # residual of the wrong shape
                 (torch.randn(1, 4, 1, 1),),                               # one value per channel on a rank
                 (torch.randn(2, 4, 3),)):                                 # not 4-D
        try:
            bn(*args)
            errors.append(None)
        except (ValueError, TypeError) as e:
            errors.append(f"{type(e).__name__}: {e}")
    unchanged = all(torch.equal(v, before[k]) for k, v in bn.state_dict().items())
    return dict(errors=errors, unchanged=unchanged, calls=counter.take())


def _replace_leftover_syncbn(model):
    """nn.SyncBatchNorm refuses CPU tensors in training: the stem's and the downsample's SyncBatchNorm,
    which convert() leaves alone (they are not block-internal BN + ReLU pairs), become synchronised
    BatchNormAddReLU2d without ReLU, so the whole net is synchronised on gloo."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.SyncBatchNorm):
            setattr(model, name, BatchNormAddReLU2d.from_batchnorm(child, relu=False, backend="reference"))
        else:
            _replace_leftover_syncbn(child)


def _ddp_resnet18(rank):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = nn.SyncBatchNorm.convert_sync_batchnorm(_resnet18())
    resfused.convert(model, backend="reference")
    _replace_leftover_syncbn(model)
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    x, target = _ddp_batch()
    x, target = x[2 * rank:2 * rank + 2], target[2 * rank:2 * rank + 2]
    outs = []
    for _ in range(STEPS):
        opt.zero_grad()
        out = ddp(x)
        F.cross_entropy(out, target).backward()
        outs.append(out.detach().clone())
        opt.step()
    return dict(outs=outs, grads={n: p.grad.clone() for n, p in model.named_parameters()},
                state={k: v.clone() for k, v in model.state_dict().items()},
                block_type=type(model.layer1[0]).__name__)


def _convert_with_group(group):
    model = nn.SyncBatchNorm.convert_sync_batchnorm(_resnet18(), process_group=group)
    resfused.convert(model)
    fused_bns = [m for m in model.modules() if isinstance(m, BatchNormAddReLU2d)]
    converted = dict(n=len(fused_bns), all_in_group=all(m.process_group is group for m in fused_bns))
    resfused.revert(model)
    syncs = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    return dict(converted=converted, reverted_n=len(syncs),
                reverted_in_group=all(m.process_group is group for m in syncs),
                leftover_fused=sum(isinstance(m, BatchNormAddReLU2d) for m in model.modules()))


def _worker(rank, world_size, port, out_dir, backends):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        subgroup = dist.new_group(list(range(world_size)))
        counter = _CollectiveCounter()
        results = dict(cases={})
        for name, case in CASES.items():
            group = subgroup if case["group"] == "new_group" else "world"
            for backend in backends:
                results["cases"][name, backend] = _run_case(case, backend, rank, group, counter)
        results["bad_input"] = _bad_input(rank, counter)
        results["convert_with_group"] = _convert_with_group(subgroup)
        results["ddp"] = _ddp_resnet18(rank)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------
# test side
# ---------------------------------------------------------------------------------------------------

def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The two ranks' results (list indexed by rank)."""
    out_dir = tmp_path_factory.mktemp("dist")
    ctx = mp.start_processes(_worker, args=(WORLD_SIZE, _free_port(), str(out_dir), BACKENDS),
                             nprocs=WORLD_SIZE, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the {WORLD_SIZE} gloo ranks did not finish within {TIMEOUT_S}s (a collective hung?)")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]


def _oracle(case):
    """Stock F.batch_norm + residual + relu on the whole batch, in float64 and in the case's dtype."""
    results = {}
    for dtype in {torch.float64, case["dtype"]}:
        t = {k: v.to(dtype) for k, v in _case_tensors(case).items()}
        x = t["x"].clone().requires_grad_()
        residual = t["residual"].clone().requires_grad_() if case["residual"] else None
        weight = t["weight"].clone().requires_grad_() if case["affine"] else None
        bias = t["bias"].clone().requires_grad_() if case["affine"] else None
        rm, rv = t["running_mean"].clone(), t["running_var"].clone()
        steps = []
        for i in range(STEPS):
            factor = 1.0 / (i + 1) if case["momentum"] is None else case["momentum"]
            y = F.batch_norm(x, rm, rv, weight, bias, True, factor, 1e-5)
            if "sample_scale" in t:
                y = y * t["sample_scale"].view(-1, 1, 1, 1)
            if residual is not None:
                y = y + residual
            if case["relu"]:
                y = torch.relu(y)
            (y * t["upstream"]).sum().backward()
            step = dict(y=y.detach().clone(), grad_x=x.grad.clone())
            if residual is not None:
                step["grad_residual"] = residual.grad.clone()
            if weight is not None:
                step["grad_weight"], step["grad_bias"] = weight.grad.clone(), bias.grad.clone()
            for p in (x, residual, weight, bias):
                if p is not None:
                    p.grad = None
            steps.append(step)
        y_eval = F.batch_norm(t["x"], rm, rv, None if weight is None else weight.detach(),
                              None if bias is None else bias.detach(), False, 0.0, 1e-5)
        if residual is not None:
            y_eval = y_eval + t["residual"]
        results[dtype] = dict(steps=steps, running_mean=rm, running_var=rv,
                              eval_y=torch.relu(y_eval) if case["relu"] else y_eval)
    return results


def _check(name, ours, ref64, ref_dtype, dtype, rtol=None):
    if rtol is not None:
        err = ((ours.double() - ref64).abs() / ref64.abs()).max().item()
        assert err <= rtol, f"{name}: max relative error {err:.3e} > {rtol:.1e}"
    elif dtype == torch.float64:
        err = (ours.double() - ref64).abs().max().item() if ref64.numel() else 0.0
        scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
        assert err <= 1e-10 * scale, f"{name}: max error {err:.3e}"
    else:
        assert_close(name, ours, ref64, dtype, torch_out=ref_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_name", CASES)
def test_synchronised_op_matches_single_process_bn(ranks, case_name, backend):
    case = CASES[case_name]
    dtype = case["dtype"]
    oracle = _oracle(case)
    ref64, ref_dt = oracle[torch.float64], oracle[dtype]
    results = [r["cases"][case_name, backend] for r in ranks]
    for i in range(STEPS):
        steps = [r["steps"][i] for r in results]
        for key in ("y", "grad_x", "grad_residual"):
            if key not in ref64["steps"][i]:
                continue
            ours = torch.cat([s[key] for s in steps])
            _check(f"step {i} {key}", ours, ref64["steps"][i][key], ref_dt["steps"][i][key], dtype)
        for key in ("grad_weight", "grad_bias"):  # local sums; DDP (here: the sum) combines the ranks
            if key in ref64["steps"][i]:
                ours = sum(s[key] for s in steps)
                _check(f"step {i} {key}", ours, ref64["steps"][i][key], ref_dt["steps"][i][key], dtype)
        if case["layout"] == "cl" and steps[0]["y"].numel():
            assert steps[0]["y_is_cl"], "channels_last input gave a non-channels_last output"
    for r, res in enumerate(results):
        for key in ("running_mean", "running_var"):
            _check(f"rank {r} {key}", res["state"][key], ref64[key], ref_dt[key], dtype, case.get("stats_rtol"))
        assert res["state"]["num_batches_tracked"].item() == STEPS
    for key, v in results[0]["state"].items():
        assert torch.equal(v, results[1]["state"][key]), f"{key} differs between ranks"
    eval_y = torch.cat([r["eval_y"] for r in results])
    _check("eval output", eval_y, ref64["eval_y"], ref_dt["eval_y"], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_collective_per_forward_and_backward_none_in_eval(ranks, backend):
    for r, res in enumerate(ranks):
        for name in CASES:
            case = res["cases"][name, backend]
            for i, step in enumerate(case["steps"]):
                assert len(step["fwd_calls"]) == 1, f"rank {r} {name} step {i} forward: {step['fwd_calls']}"
                assert len(step["bwd_calls"]) == 1, f"rank {r} {name} step {i} backward: {step['bwd_calls']}"
                assert step["bwd_calls"] == ["all_reduce"], step["bwd_calls"]
            assert case["eval_calls"] == [], f"rank {r} {name}: eval forward ran collectives {case['eval_calls']}"


def test_bad_input_on_synchronised_module(ranks):
    for res in ranks:
        assert res["bad_input"]["errors"] == [
            "ValueError: residual must have input's shape (2, 4, 3, 3), got (2, 4, 3, 1)",
            "ValueError: Expected more than 1 value per channel when training, got input size "
            "torch.Size([1, 4, 1, 1])",
            "ValueError: expected 4D input (got 3D input)",
        ]
        assert res["bad_input"]["unchanged"], "a failing call changed the module's state"
        assert res["bad_input"]["calls"] == [], "a failing call ran a collective"


def test_convert_keeps_syncbatchnorm_group_and_revert_restores_it(ranks):
    for res in ranks:
        info = res["convert_with_group"]
        assert info["converted"] == dict(n=16, all_in_group=True)  # resnet18: 8 blocks x 2 BNs
        assert info["reverted_n"] == 20 and info["reverted_in_group"]  # + stem and 3 downsample BNs
        assert info["leftover_fused"] == 0


def test_ddp_converted_resnet18_trains_like_stock_on_the_whole_batch(ranks):
    """DDP(converted resnet18 with synchronised BN) on 2 ranks x 2 images (16x16) vs stock resnet18 on the 4.

    The stock side is single-process because nn.SyncBatchNorm refuses CPU tensors in training (so a
    DDP-wrapped stock SyncBatchNorm model cannot run on gloo); synchronised BN with DDP's gradient
    averaging computes exactly this, float64 keeps it to rounding."""
    stock = _resnet18()
    x, target = _ddp_batch()
    opt = torch.optim.SGD(stock.parameters(), lr=0.1, momentum=0.9)
    outs = []
    for _ in range(STEPS):
        opt.zero_grad()
        out = stock(x)
        F.cross_entropy(out, target).backward()
        outs.append(out.detach())
        opt.step()
    assert all(r["ddp"]["block_type"] == "BasicBlock" for r in ranks)
    for i in range(STEPS):
        ours = torch.cat([r["ddp"]["outs"][i] for r in ranks])
        torch.testing.assert_close(ours, outs[i], rtol=1e-9, atol=1e-9, msg=lambda m: f"step {i} output: {m}")
    grads = {n: p.grad for n, p in stock.named_parameters()}
    for r in ranks:
        for n, g in r["ddp"]["grads"].items():
            torch.testing.assert_close(g, grads[n], rtol=1e-8, atol=1e-10, msg=lambda m: f"grad {n}: {m}")
    sd = stock.state_dict()
    for r in ranks:
        assert list(r["ddp"]["state"]) == list(sd)
        for k, v in r["ddp"]["state"].items():
            if v.is_floating_point():
                torch.testing.assert_close(v, sd[k], rtol=1e-8, atol=1e-10, msg=lambda m: f"{k}: {m}")
            else:
                assert torch.equal(v, sd[k]), k


# ---------------------------------------------------------------------------------------------------
# single-process behaviour of the process_group option
# ---------------------------------------------------------------------------------------------------

def test_process_group_without_distributed_is_single_process():
    """As nn.SyncBatchNorm: without an initialised process group a synchronised module computes locally."""
    assert not dist.is_initialized()
    torch.manual_seed(0)
    x, z = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    plain = BatchNormAddReLU2d(3, backend="reference")
    synced = BatchNormAddReLU2d(3, backend="reference", process_group="world")
    torch.testing.assert_close(synced(x, z), plain(x, z), rtol=0, atol=0)
    for k, v in synced.state_dict().items():
        assert torch.equal(v, plain.state_dict()[k]), k
    assert "process_group='world'" in repr(synced)


@pytest.mark.parametrize("bad", [42, "WORLD", object()])
def test_process_group_bad_type(bad):
    with pytest.raises(TypeError, match="process_group must be None, 'world' or a torch.distributed.ProcessGroup"):
        BatchNormAddReLU2d(3, process_group=bad)


def test_convert_and_revert_syncbatchnorm_default_group(caplog):
    """SyncBatchNorm(process_group=None) means WORLD: converted BNs get "world"; revert gives SyncBatchNorm
    with process_group=None; without distributed both compute what stock BN computes."""
    stock = _resnet18()
    model = nn.SyncBatchNorm.convert_sync_batchnorm(_resnet18())
    with caplog.at_level(logging.INFO, logger="resfused"):
        resfused.convert(model, backend="reference")
    assert "leaving" not in caplog.text
    assert isinstance(model.layer1[0], BasicBlock)
    fused = [m for m in model.modules() if isinstance(m, BatchNormAddReLU2d)]
    assert len(fused) == 16 and all(m.process_group == "world" for m in fused)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(model(x), stock(x))
    resfused.revert(model)
    syncs = [m for m in model.modules() if type(m) is nn.SyncBatchNorm]
    assert len(syncs) == 20 and all(m.process_group is None for m in syncs)
    assert not any(isinstance(m, BatchNormAddReLU2d) for m in model.modules())
    assert type(model.layer1[0]) is torchvision.models.resnet.BasicBlock
    sd = stock.state_dict()
    assert list(model.state_dict()) == list(sd)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=1e-12, atol=1e-12, msg=lambda m: f"{k}: {m}")
