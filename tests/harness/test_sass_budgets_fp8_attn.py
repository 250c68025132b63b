"""Static hot-loop budget of the quantized flex attention forward (flex_attn_fp8_func), read from SASS compiled on
this machine (no GPU).

The FULL-tile loop and the PARTIAL-tile loop of the shipped forward configs (sm_90 and sm_89, D=128, both PV
precisions) are compiled in a subprocess without TRITON_INTERPRET by the benchmark's ``fp8_loop`` and
``partial_loop`` (benchmarks/bench_fp8_attention.py, which finds the loops with magi_kernels.tools.sass). Each
loop must run QK on int8 tensor cores and PV on the declared class, and its issued instructions per 1000 MMA
FLOPs of one warp must stay within today's static value plus ~3% slack (a regression fails); the PARTIAL loop
(row-bounds mask, one 128-key step per bound entry on sm_90) must not spill. On sm_90 the structure of the FULL
pass is asserted too: warp-specialized, no global load and no CTA-wide barrier left in the consumer loop (the K,
V and key-scale boxes go to the producer warp), and three K/V buffers with 0 spills (FULL_MIN_BUFFERS). The budget
is on our own loop, not on the ratio to the bf16 kernel, so work on the bf16 kernel cannot fail this test;
``python benchmarks/bench_fp8_attention.py --sass`` prints the ratio, and docs/fp8_attention.md records it and
why the 0.6 target is not met.

The reduced loops at the end pin down why the sm_90 passes read Q's codes and row factors from a separate
kernel (docs/fp8_attention.md, what Triton 3.9's warp specialization accepts): the quantized step is
warp-specialized when its per-row factor comes from a descriptor box, and the pass fails when that factor is a
row reduction computed before the loop. If a Triton upgrade lifts the restriction, the second test fails and
the Q quantization can move back into the attention kernel.
"""

from __future__ import annotations

import json

import pytest
import triton
import triton.language as tl

from .compiled import run_json_script

# (arch, pv_precision) -> (int8 QK MMA, PV MMA, max issued instructions per kFLOP) of the FULL-tile loop. Static
# values with Triton 3.9 (docs/fp8_attention.md): sm_90 0.584 and 0.599 with three K/V buffers (two: 0.574 and
# 0.596; e4m3 P handed to the PV MMA without a lane exchange, key scales as wide loads; before: 0.625 and 0.609;
# the one-pass loop at 128x64 before that 0.860 and 0.820), sm_89 0.741 and 0.956 (the row-bounds mask freed the
# registers for 128-key tiles with e4m3 PV and 64-key ones with fp16 PV, where 32 spilled before; at 32 keys:
# 1.137 and 1.194).
BUDGETS = {
    (90, "e4m3"): ("IGMMA", "QGMMA", 0.60),
    (90, "fp16"): ("IGMMA", "HGMMA", 0.615),
    (89, "e4m3"): ("IMMA", "QMMA", 0.765),
    (89, "fp16"): ("IMMA", "HMMA", 0.985),
}
# The same for the PARTIAL-tile loop (one iteration per bound entry of the plan's row bounds): sm_90 PARTIAL pass
# 0.871 and 0.878 (with the slice-list mask in 64-key steps it was 3.574 and 3.643), sm_89 single pass 0.999 and
# 1.221 (was 2.548 and 2.766 at 32-key tiles).
PARTIAL_BUDGETS = {(90, "e4m3"): 0.90, (90, "fp16"): 0.905, (89, "e4m3"): 1.03, (89, "fp16"): 1.26}
# K/V buffers the sm_90 FULL pass must keep at D=128 (three stages): its epilogue stores go out in the accumulator's
# layout (_store_rows) with no shared-memory scratch, which is what leaves room for the third K and V tile
# (120 KB of shared memory with e4m3 V, 169 KB with fp16 V, of the 227 KB sm_90 allows).
FULL_MIN_BUFFERS = {90: 3}


@pytest.fixture(scope="module")
def loops(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sass") / "loops.json"
    script = ("import json, sys, torch\nsys.path.insert(0, 'benchmarks')\nimport bench_fp8_attention as b\n"
              "from magi_kernels.kernels.triton import flex_attn_fp8 as fp8\n"
              "from magi_kernels.tools.aot_check import check_config\n"
              "def full(arch, pv):\n"
              "    cfg = next(c for c in fp8.select_configs(torch.bfloat16, 128, False, arch, pv)\n"
              "               if c.constexprs.get('PASS') in (0, 1))\n"
              "    r = check_config(cfg, arch)\n"
              "    return dict(b.fp8_loop(arch, 128, pv), buffers=r.loop.pipeline_buffers, smem=r.smem,\n"
              "                full_spills=r.stl + r.ldl, cta_barriers=r.loop.cta_barriers)\n"
              "keys = json.loads(sys.argv[1])\n"
              "open(sys.argv[2], 'w').write(json.dumps([[full(arch, pv), b.partial_loop(arch, 128, pv)]\n"
              "                                         for arch, pv in keys]))\n")
    keys = list(BUDGETS)
    pairs = run_json_script(script, json.dumps(keys), out=out, timeout=900)
    return {key: dict(zip(("full", "partial"), pair)) for key, pair in zip(keys, pairs)}


@pytest.mark.parametrize("kind", ["full", "partial"])
def test_hot_loop_mma_classes_and_issued_instructions(loops, kind):
    over = []
    for key, (qk_mma, pv_mma, full_budget) in BUDGETS.items():
        loop = loops[key][kind]
        budget = full_budget if kind == "full" else PARTIAL_BUDGETS[key]
        assert qk_mma in loop["mma_kind"] and pv_mma in loop["mma_kind"], f"{key}: loop MMAs {loop['mma_kind']}"
        if loop["per_kflop"] > budget:
            over.append(f"sm_{key[0]} pv={key[1]} {kind} loop: {loop['per_kflop']:.3f} issued instructions per kFLOP "
                        f"> budget {budget}")
    assert not over, "\n".join(over)


def test_sm90_full_pass_is_warp_specialized_without_loads(loops):
    for (arch, pv), pair in loops.items():
        if arch == 90:
            full = pair["full"]
            assert full["warp_specialized"] and not full["loads"] and not full["cta_barriers"], (pv, full)


def test_full_pass_keeps_its_kv_buffers_without_spills(loops):
    for (arch, pv), pair in loops.items():
        full = pair["full"]
        assert full["buffers"] >= FULL_MIN_BUFFERS.get(arch, 1) and full["full_spills"] == 0, (arch, pv, full)


def test_partial_loop_does_not_spill(loops):
    assert all(pair["partial"]["spills"] == 0 for pair in loops.values()), loops


@triton.jit
def _reduced_quantized_loop(q8_ptr, k8_ptr, v8t_ptr, k_scale_ptr, rows_ptr, out_ptr, kidx_ptr, n_tiles, padded,
                            ROW_FACTOR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            HEAD_DIM: tl.constexpr):
    """One q tile's FULL loop of the quantized forward, reduced: int8 QK, key scales, e4m3 P and V. ROW_FACTOR
    0: the per-row factor from a [BLOCK_M, 4] descriptor box (the shipped form); 1: a row reduction over Q."""
    q8_src = tl.make_tensor_descriptor(q8_ptr, shape=[BLOCK_M, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])
    k8_src = tl.make_tensor_descriptor(k8_ptr, shape=[padded, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    v8t_src = tl.make_tensor_descriptor(v8t_ptr, shape=[HEAD_DIM, padded], strides=[padded, 1],
                                        block_shape=[HEAD_DIM, BLOCK_N])
    sk_src = tl.make_tensor_descriptor(k_scale_ptr, shape=[1, padded], strides=[padded, 1], block_shape=[1, BLOCK_N])
    q8 = q8_src.load([0, 0]).to(tl.int8, bitcast=True)
    if ROW_FACTOR == 0:
        rows_src = tl.make_tensor_descriptor(rows_ptr, shape=[BLOCK_M, 4], strides=[4, 1], block_shape=[BLOCK_M, 4])
        cols02, _ = tl.split(tl.reshape(rows_src.load([0, 0]), [BLOCK_M, 2, 2]))
        mul, _ = tl.split(cols02)
    else:
        mul = tl.max(tl.abs(q8.to(tl.float32)), 1) / 127.0
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for e in tl.range(0, n_tiles, warp_specialize=True):
        col0 = tl.load(kidx_ptr + e) * BLOCK_N
        k8 = k8_src.load([col0, 0]).to(tl.int8, bitcast=True)
        sk = tl.reshape(sk_src.load([0, col0]), [BLOCK_N])
        s = tl.dot(q8, tl.trans(k8)).to(tl.float32) * sk[None, :]
        m_new = tl.maximum(m_i, tl.max(s, 1) * mul)
        p = tl.exp2(s * mul[:, None] - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.float8e4nv), tl.trans(v8t_src.load([0, col0])))
        m_i = m_new
    offs = tl.arange(0, BLOCK_M)[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    tl.store(out_ptr + offs, acc / l_i[:, None])


_REDUCED_SCRIPT = """
import json, sys
from magi_kernels.kernels.triton.aot import AotConfig
from magi_kernels.tools.aot_check import check_config
rows = {}
for name, factor in (("row factor from a descriptor box", 0), ("row factor from a reduction", 1)):
    cfg = AotConfig(kernel="tests.harness.test_sass_budgets_fp8_attn:_reduced_quantized_loop",
                    name="reduced_quantized_loop", config=name,
                    pointer_dtypes={"q8_ptr": "u8", "k8_ptr": "u8", "v8t_ptr": "fp8e4nv", "k_scale_ptr": "fp32",
                                    "rows_ptr": "fp32", "out_ptr": "fp32", "kidx_ptr": "i32"},
                    constexprs={"ROW_FACTOR": factor, "BLOCK_M": 128, "BLOCK_N": 128, "HEAD_DIM": 128},
                    num_warps=4, num_stages=2, archs=(90,), mma="fp8", divisible_by_16=("*_ptr", "padded"))
    r = check_config(cfg, 90)
    rows[name] = dict(failures=r.failures, ws=r.loop is not None and r.loop.warp_specialized,
                      mma=sorted(r.mma_ops))
open(sys.argv[1], "w").write(json.dumps(rows))
"""


@pytest.fixture(scope="module")
def reduced(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("reduced") / "rows.json"
    return run_json_script(_REDUCED_SCRIPT, out=out)


def test_quantized_step_is_warp_specialized_with_the_row_factor_from_a_box(reduced):
    row = reduced["row factor from a descriptor box"]
    assert not row["failures"] and row["ws"] and row["mma"] == ["IGMMA", "QGMMA"], row


def test_row_reduction_feeding_the_loop_stops_warp_specialization(reduced):
    row = reduced["row factor from a reduction"]
    assert any("compile error" in f for f in row["failures"]) and not row["ws"], row
