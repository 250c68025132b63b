"""What Triton schedules for an fp8 K loop that promotes, read from SASS compiled for sm_90 (no GPU needed).

docs/kernel_structure.md#what-triton-39-schedules-for-a-promoted-loop explains fp8_gemm's structure with these
reduced loops: Triton keeps a wgmma group in flight (wait depth 1) only for an unpromoted accumulation chain
outside warp specialization; every promoted form waits for the fresh partial sum right after its commit; and
its Hopper warp specialization applies at 4 warps, not at 8. If a Triton upgrade changes any of this, this file
fails and the kernel's structure (and that section) should be revisited. The loops are compiled in a subprocess
without TRITON_INTERPRET, like the SASS budget test.
"""

from __future__ import annotations

import json

import pytest
import triton
import triton.language as tl

from ..harness.compiled import run_json_script

# name -> (LOOP, num_warps, WARP_SPECIALIZE)
VARIANTS = {
    "chain": (0, 8, False),           # acc = dot(a, b, acc): no promotion
    "promoted": (1, 8, False),        # part = dot(a, b, 0); acc += part * s (fp8_gemm's form)
    "deferred": (2, 8, False),        # acc += prev * s; prev = dot(a, b, 0): promote one step late
    "imprecise_acc": (3, 8, False),   # Triton's own promotion: dot(a, b, acc, max_num_imprecise_acc=128)
    "two_steps": (4, 8, False),       # two K steps per iteration: two partial sums, then both promotions
    "promoted_ws8": (1, 8, True),
    "promoted_ws4": (1, 4, True),
    "chain_ws4": (0, 4, True),
}


@triton.jit
def _reduced_loop_kernel(a_ptr, b_ptr, c_ptr, s_ptr, size_m, size_n, size_k, LOOP: tl.constexpr,
                         WARP_SPECIALIZE: tl.constexpr, BLOCK: tl.constexpr):
    """One BLOCK x BLOCK tile of (A @ B^T) * s over K (a multiple of 2 * BLOCK), A and B e4m3 by TMA."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[size_m, size_k], strides=[size_k, 1], block_shape=[BLOCK, BLOCK])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[size_n, size_k], strides=[size_k, 1], block_shape=[BLOCK, BLOCK])
    s = tl.load(s_ptr)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    prev = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    STEP: tl.constexpr = 2 * BLOCK if LOOP == 4 else BLOCK
    for k0 in tl.range(0, size_k, STEP, warp_specialize=WARP_SPECIALIZE):
        a = a_desc.load([pid_m * BLOCK, k0])
        b = b_desc.load([pid_n * BLOCK, k0]).T
        if LOOP == 0:
            acc = tl.dot(a, b, acc)
        elif LOOP == 1:
            acc = acc + tl.dot(a, b, tl.zeros((BLOCK, BLOCK), dtype=tl.float32)) * s
        elif LOOP == 2:
            part = tl.dot(a, b, tl.zeros((BLOCK, BLOCK), dtype=tl.float32))
            acc = acc + prev * s
            prev = part
        elif LOOP == 3:
            acc = tl.dot(a, b, acc, max_num_imprecise_acc=128)
        else:
            part = tl.dot(a, b, tl.zeros((BLOCK, BLOCK), dtype=tl.float32))
            a2 = a_desc.load([pid_m * BLOCK, k0 + BLOCK])
            b2 = b_desc.load([pid_n * BLOCK, k0 + BLOCK]).T
            part2 = tl.dot(a2, b2, tl.zeros((BLOCK, BLOCK), dtype=tl.float32))
            acc = acc + part * s
            acc = acc + part2 * s
    if LOOP == 2:
        acc = acc + prev * s
    elif LOOP == 0 or LOOP == 3:
        acc = acc * s
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
    tl.store(c_ptr + offs_m[:, None] * size_n + offs_n[None, :], acc.to(tl.bfloat16))


_SCRIPT = """
import json, sys
from magi_kernels.kernels.triton.aot import AotConfig
from magi_kernels.tools.aot_check import check_config
variants = json.loads(sys.argv[1])
rows = {}
for name, (loop, warps, ws) in variants.items():
    cfg = AotConfig(kernel="tests.fp8.test_fp8_gemm_structure:_reduced_loop_kernel", name="reduced_fp8_loop",
                    config=name, pointer_dtypes={"a_ptr": "fp8e4nv", "b_ptr": "fp8e4nv", "c_ptr": "bf16",
                                                 "s_ptr": "fp32"},
                    constexprs={"LOOP": loop, "WARP_SPECIALIZE": ws, "BLOCK": 128}, num_warps=warps, num_stages=3,
                    archs=(90,), mma="fp8", divisible_by_16=("*_ptr", "size_*"))
    r = check_config(cfg, 90)
    assert r.loop is not None, (name, r.failures)
    rows[name] = dict(ok=r.ok, failures=r.failures, wait=r.loop.wgmma_wait, ws=r.loop.warp_specialized,
                      mma=r.loop.mma_per_iter, issued=r.loop.issued)
open(sys.argv[2], "w").write(json.dumps(rows))
"""


@pytest.fixture(scope="module")
def loops(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("reduced") / "rows.json"
    rows = run_json_script(_SCRIPT, json.dumps(VARIANTS), out=out)
    assert all(r["ok"] for r in rows.values()), {k: r["failures"] for k, r in rows.items() if not r["ok"]}
    return rows


def test_only_the_unpromoted_chain_keeps_a_wgmma_group_in_flight(loops):
    assert loops["chain"]["wait"] == 1 and not loops["chain"]["ws"]
    for name in ("promoted", "deferred", "imprecise_acc", "two_steps"):
        assert loops[name]["wait"] == 0, (name, loops[name])
    assert loops["two_steps"]["mma"] == 8  # both groups in one loop body, each still waited for at once
    # Promoting one step late does not defer the wait; carrying the fresh partial sum only adds moves.
    assert loops["deferred"]["issued"] > loops["promoted"]["issued"]


def test_hopper_warp_specialization_needs_4_warps_and_still_waits_0(loops):
    assert not loops["promoted_ws8"]["ws"]
    for name in ("promoted_ws4", "chain_ws4"):
        assert loops[name]["ws"] and loops[name]["wait"] == 0, (name, loops[name])
    # The warp-specialized promoted loop is the leanest promoted form (fp8_gemm's sm_90 choice).
    assert loops["promoted_ws4"]["issued"] < loops["promoted"]["issued"]
