"""The static kernel report's arithmetic and parsers (bench/static_report.py); no compilation, milliseconds.

The compiles themselves run in `make static-check` (CI) and `make static`."""

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import static_report as sr  # noqa: E402


@pytest.mark.parametrize("regs, smem, threads, expected", [
    (124, 49152, 256, 0.25),     # 4096 registers a warp -> 16 warps by registers: 2 blocks of 8 warps
    (32, 16, 128, 1.0),          # limited by the 64 warp slots only
    (255, 0, 256, 0.125),        # 8192 registers a warp -> 8 warps: one block
    (64, 0, 1024, 0.5),          # 2048 registers a warp -> 32 warps by registers: one block of 32 warps
    (40, 100 * 1024, 128, 0.125),  # 101 KB + 1 KB reserved -> 2 blocks by shared memory: 8 of 64 warps
    (32, 0, 32, 0.5),            # 32 blocks a SM at most: 32 warps
    (32, 228 * 1024, 128, 0.0),  # over the 227 KB a block may have: cannot launch
    (256, 0, 128, 0.0),          # over 255 registers a thread
])
def test_occupancy(regs, smem, threads, expected):
    assert sr.occupancy(regs, smem, threads) == pytest.approx(expected)


_PTX = """
.visible .entry k(
)
{
	ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
$L__BB0_1:                              // =>This Loop Header: Depth=1
	cp.async.cg.shared.global [ %r79 + 0 ], [ %rd21 + 0 ], 0x10, %r80;
	cp.async.commit_group;
	@%p11 bra 	$L__BB0_4;
$L__BB0_3:                              // =>This Inner Loop Header: Depth=2
	cp.async.wait_group 	2;
	bar.sync 	0;
	wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%r1}, %rd36, %rd37, %p26, 1, 1, 0, 0;
	wgmma.wait_group.sync.aligned 1;
	cp.async.ca.shared.global [ %r81 + 0 ], [ %rd22 + 0 ], 4, %r82;
	cp.async.cg.shared.global [ %r83 + 0 ], [ %rd23 + 0 ], 0x10, %r84;
	cp.async.cg.shared.global [ %r85 + 0 ], [ %rd24 + 0 ], 16, %r86;
	@%p31 bra 	$L__BB0_3;
$L__BB0_4:
	wgmma.wait_group.sync.aligned 0;
	cp.async.wait_group 	0;
	@%p32 bra 	$L__BB0_1;
	@%p33 ld.global.b16 { %rs1 }, [ %rd49 + 0 ];
	st.global.v4.b32 [ %rd2 + 0 ], { %r1, %r2, %r3, %r4 };
	st.global.b16 [ %rd3 + 0 ], { %rs1 };
	st.global.v2.b16 [ %rd3 + 0 ], { %rs1, %rs2 };
	ret;
}
"""


def test_analyse_ptx_loop_waits_and_widths():
    a = sr.analyse_ptx(_PTX)
    assert a["wgmma"] is True
    assert a["waits_per_iter"] == 2          # cp.async.wait_group + wgmma.wait_group in the inner loop
    assert a["loop_depth"] == 2
    assert a["drain_waits"] == 2             # the two waits of the outer (per-tap) loop outside it
    assert a["load_bits"] == 128             # the inner loop's loads: two 16-byte cp.async, one 4-byte
    assert a["load_widths"] == {"128": 4, "16": 1, "32": 1}
    assert a["store_widths"] == {"128": 1, "16": 1, "32": 1}


def test_analyse_ptx_tie_goes_to_the_narrower_access():
    ptx = "ld.global.b32 { %r1 }, [ %rd1 ];\nld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 ];\n"
    assert sr.analyse_ptx(ptx)["load_bits"] == 32
    assert sr.analyse_ptx(ptx)["wgmma"] is None
    assert sr.analyse_ptx(ptx)["waits_per_iter"] is None
    assert sr.analyse_ptx("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {}, {}, {}, {};")["wgmma"] is False


def test_parse_ptxas_log():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_conv_kernel' for 'sm_90a'
ptxas info    : Function properties for _conv_kernel
    48 bytes stack frame, 24 bytes spill stores, 28 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 5120 bytes smem
ptxas info    : Compiling entry function 'other' for 'sm_90a'
ptxas info    : Function properties for other
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers
"""
    out = sr.parse_ptxas_log(log)
    assert out["_conv_kernel"] == {"regs": 128, "spills": 24, "spill_loads": 28, "stack": 48, "static_smem": 5120}
    assert out["other"] == {"regs": 40, "spills": 0, "spill_loads": 0, "stack": 0, "static_smem": 0}


def test_launch_threads_from_launch_bounds():
    src = """constexpr int kThreads = 256;
constexpr int kTX = 32;
constexpr int kTY = 16;
template <typename E>
__global__ void __launch_bounds__(kThreads) a_kernel(KParams p) {}
__global__ void __launch_bounds__(kTX* kTY) b_kernel(KParams p) {}
__global__ void __launch_bounds__(512, 1) c_kernel(KParams p) {}
"""
    assert sr._launch_threads(src) == {"a_kernel": 256, "b_kernel": 512, "c_kernel": 512}


def test_check_fails_on_compile_errors_and_spilling_or_draining_configs_in_use():
    ok = {"kernel": "k", "in_use": True, "spills": 0, "error": None, "drain_waits": None}
    rows = [ok,
            dict(ok, kernel="spills", spills=8),                  # in use and spilling: fails the check
            dict(ok, kernel="spare", in_use=False, spills=520),  # spills, but no launcher uses it
            dict(ok, kernel="drains", drain_waits=2),             # pipeline drained per outer iteration
            dict(ok, kernel="spare_drain", in_use=False, drain_waits=2),
            dict(ok, kernel="broken", error="ptxas fatal", spills=None)]
    errors, spills, drains = sr.check_failures(rows)
    assert [r["kernel"] for r in errors] == ["broken"]
    assert [r["kernel"] for r in spills] == ["spills"]
    assert [r["kernel"] for r in drains] == ["drains"]
    assert sr.check_failures([ok, dict(ok, in_use=False, spills=4), dict(ok, drain_waits=0)]) == ([], [], [])
