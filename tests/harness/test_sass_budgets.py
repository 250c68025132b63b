"""Static performance budgets of the hot loops, read from SASS compiled on this machine (no GPU).

One representative config per kernel family (flex_attn forward, the two backward kernels, fp8_gemm; and the
quantized forward's soft-capped sm_90 FULL pass, whose long consumer loop is where a finder that does not tell a
wait retry's branch back from a loop took the wrong range) is
compiled for sm_90 and sm_89 in a subprocess without TRITON_INTERPRET; its hot loop's issued instructions
per MMA FLOP must stay within today's measurement plus a small slack (a regression fails), and, when
Triton's tutorials are available (next to the checkout, or ``MAGI_ANCHORS_DIR``), so must its ratio against the matching tutorial
kernel compiled in the same run. The structure the kernels have reached is asserted (pipeline buffers, no plain LDG
in the loops that lost it, register ceilings, the sm_90 forward's warp-specialized consumer loop); the remaining
targets of docs/kernel_structure.md are printed by the tool, not enforced here. The parser itself is tested on
hand-written SASS first.
"""

from __future__ import annotations

import json
import os

import pytest

from magi_kernels.tools.sass import hot_loop, hot_loop_stats, mma_flops_per_warp, parse_sass

from .compiled import REPO, run_json_script

# Triton's tutorial kernels are not part of this project. By default they are looked for beside the
# repository folder, where this project's CI lays them out (docs/kernel_structure.md#budgets);
# MAGI_ANCHORS_DIR points elsewhere.
ANCHORS = os.environ.get("MAGI_ANCHORS_DIR") or str(REPO.parent / "shared" / "anchors" / "triton-tutorials")

# config key -> (instr/kFLOP budget, ratio budget or None without an anchor). Measured with Triton 3.9
# (docs/kernel_structure.md) plus ~5% slack.
BUDGETS = {
    "flex_attn_fwd[sm90 bf16 D=128 BM=128 BN=128 w4 s3 tma ws]": (0.48, 1.02),
    "flex_attn_fwd_partial[sm90 bf16 D=128 BM=128 BN=128 w8 s2 tma]": (0.72, None),
    "flex_attn_fwd[sm89 bf16 D=128 BM=128 BN=64 w8 s3]": (1.08, 1.02),
    "flex_attn_bwd_dq[sm90 bf16 D=128 BM=64 BN=32 w4 s2]": (0.72, None),
    "flex_attn_bwd_dq[sm89 bf16 D=128 BM=64 BN=32 w4 s2]": (1.31, None),
    # dK/dV: 128-key tiles where they compile spill-free (sm_90 without softcap: 0.618 at d128, 0.677 at d64; sm_89
    # d64: 1.038); the soft-capped sm_90 d128 loop keeps 64-key tiles (1.503), whose 128-key variant spills.
    "flex_attn_bwd_dkdv[sm90 bf16 D=128 BM=32 BN=128 w8 s3]": (0.65, None),
    "flex_attn_bwd_dkdv[sm90 bf16 D=128 BM=32 BN=64 w8 s3 softcap]": (1.58, None),
    "flex_attn_bwd_dkdv[sm90 bf16 D=64 BM=64 BN=128 w8 s3]": (0.71, None),
    "flex_attn_bwd_dkdv[sm89 bf16 D=128 BM=64 BN=64 w8 s2]": (0.88, None),
    "flex_attn_bwd_dkdv[sm89 bf16 D=64 BM=32 BN=128 w8 s3]": (1.09, None),
    "fp8_gemm[sm90 large 128x128x128 w4 s3 tma ws tensor div16 out=bf16]": (0.25, 2.12),
    "fp8_gemm[sm90 large 128x128x128 w4 s3 tma ws block div16 out=bf16]": (0.41, 3.45),
    "fp8_gemm[sm89 large 128x128x128 w8 s3 tensor div16 out=bf16]": (0.98, 1.17),
    "fp8_gemm[sm90 large 128x128x128 w4 s3 tma ws tensor fast div16 out=bf16]": (0.12, 1.02),
    "fp8_gemm[sm89 large 128x128x128 w8 s3 tensor fast div16 out=bf16]": (0.87, 1.04),
    "flex_attn_fp8_fwd[sm90 bf16 D=128 BM=128 BN=128 pv=e4m3 w4 s3 softcap tma ws]": (1.46, None),
}

# Tiles in flight a loop must keep (sm_90 FULL pass: three K/V buffers beside Q at BLOCK_N=128, 224 KB of the
# 227 KB, since its epilogue stores need no shared-memory scratch; the PARTIAL pass is pipelined since its mask
# comes from the plan's row bounds, without a loop; the sm_89 forward holds two K/V buffers in 98 of its 99 KB;
# the sm_90 dK/dV loop keeps three Q/dO buffers since it walks its FULL q tiles by runs, at either key tile.) Every
# budgeted loop must also compile with 0 spills (the 128-key dK/dV tiles were picked as the widest that do).
MIN_BUFFERS = {"flex_attn_fwd[sm90 bf16 D=128 BM=128 BN=128 w4 s3 tma ws]": 3,
               "flex_attn_fwd_partial[sm90 bf16 D=128 BM=128 BN=128 w8 s2 tma]": 2,
               "flex_attn_fwd[sm89 bf16 D=128 BM=128 BN=64 w8 s3]": 2,
               "flex_attn_bwd_dkdv[sm90 bf16 D=128 BM=32 BN=128 w8 s3]": 3,
               "flex_attn_bwd_dkdv[sm90 bf16 D=128 BM=32 BN=64 w8 s3 softcap]": 3,
               "flex_attn_bwd_dkdv[sm90 bf16 D=64 BM=64 BN=128 w8 s3]": 3,
               "flex_attn_bwd_dkdv[sm89 bf16 D=64 BM=32 BN=128 w8 s3]": 2}
# Register ceilings (sm_89 forward: 205 since the PARTIAL loop's mask lost its per-slice loop, it was 255; 203 at
# three stages).
MAX_REGS = {"flex_attn_fwd[sm89 bf16 D=128 BM=128 BN=64 w8 s3]": 232}
# The sm_90 forward's FULL loop structure: warp-specialized (ws), no load in the consumer loop (a producer warp
# issues the TMA copies), and no CTA-wide barrier (the partitions synchronize through mbarriers).
WARP_SPECIALIZED = ("flex_attn_fwd[sm90 bf16 D=128 BM=128 BN=128 w4 s3 tma ws]",
                    "flex_attn_fp8_fwd[sm90 bf16 D=128 BM=128 BN=128 pv=e4m3 w4 s3 softcap tma ws]")
# fp8_gemm's structure (docs/kernel_structure.md#fp8_gemm-promotion-warp-specialization-and-the-tutorial-ratio):
# on sm_90 a warp-specialized consumer loop without CTA-wide barriers (tensor scales: no load at all, a producer
# issues the TMA copies; block scales: TMA boxes), one 128-wide K step (4 QGMMA) per iteration; on sm_89 one
# 128-wide K step too (64 QMMA). The fast-accumulation loops (fast_accum=True, no promotion) have the same
# structure; Triton 3.9's warp-specialized consumer waits for each wgmma group (wait 0) as tutorial 09's does.
FP8_STRUCTURE = {
    "fp8_gemm[sm90 large 128x128x128 w4 s3 tma ws tensor div16 out=bf16]": {"ws": True, "CTA bars": 0, "loads": "-",
                                                                           "mma/iter": 4},
    "fp8_gemm[sm90 large 128x128x128 w4 s3 tma ws block div16 out=bf16]": {"ws": True, "CTA bars": 0, "loads": "TMA",
                                                                          "mma/iter": 4},
    "fp8_gemm[sm89 large 128x128x128 w8 s3 tensor div16 out=bf16]": {"mma/iter": 64},
    "fp8_gemm[sm90 large 128x128x128 w4 s3 tma ws tensor fast div16 out=bf16]": {
        "ws": True, "CTA bars": 0, "loads": "-", "mma/iter": 4, "wgmma wait": 0},
    "fp8_gemm[sm89 large 128x128x128 w8 s3 tensor fast div16 out=bf16]": {"mma/iter": 64, "loads": "cp.async"},
    # The quantized forward's consumer loop: int8 QK and e4m3 PV, four wgmma each (docs/kernel_structure.md#columns).
    "flex_attn_fp8_fwd[sm90 bf16 D=128 BM=128 BN=128 pv=e4m3 w4 s3 softcap tma ws]": {
        "mma/iter": 8, "mma": "IGMMA.64x128x32.S8.S8+QGMMA.64x128x32"},
}
# Loops that must not load through registers (a plain LDG in the loop is a load the pipeliner did not hide; the
# FULL runs removed the plan-index LDG from these, the k-major runs from the dK/dV loop, the runs of PARTIAL
# tiles from the sm_90 PARTIAL pass).
NO_PLAIN_LDG = tuple(k for k in BUDGETS if k.startswith(("flex_attn_fwd[", "flex_attn_fwd_partial[",
                                                         "flex_attn_bwd_dq[", "flex_attn_bwd_dkdv[", "fp8_gemm[")))

_SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64] ;
        /*0020*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
.L_x_1:
        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0040*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0050*/                   BAR.SYNC 0x1, 0x100 ;
        /*0060*/                   NOP ;
        /*0070*/              @P0 BRA `(.L_x_1) ;
        /*0080*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*0090*/              @P1 BRA `(.L_x_0) ;
        /*00a0*/                   EXIT ;
"""


def test_parser_picks_the_innermost_mma_loop_and_counts_it():
    instrs = parse_sass(_SASS)
    assert [i.op for i in instrs][:3] == ["MOV", "LDGSTS", "BAR"] and instrs[1].label == ".L_x_0"
    assert hot_loop(instrs) == (3, 7)  # .L_x_1 .. its BRA, not the outer loop that also holds an MMA
    st = hot_loop_stats(_SASS, "ttg.local_alloc : () -> !ttg.memdesc<3x64x128xbf16, #shared>\n")
    assert (st.mma_per_iter, st.issued) == (1, 4)  # NOP excluded
    assert st.mma_flops == 2 * 64 * 128 * 16 // 4  # one warp's quarter of a warpgroup MMA
    assert st.cta_barriers == 0  # a named barrier with a thread count is not CTA-wide
    assert st.wgmma_wait == 1 and st.pipeline_buffers == 3 and st.loads == () and not st.warp_specialized
    outer = parse_sass(_SASS)
    assert mma_flops_per_warp(outer[8]) == 2 * 16 * 8 * 16
    # The outer loop alone: a CTA barrier and cp.async.
    no_inner = _SASS.replace("@P0 BRA `(.L_x_1)", "NOP")
    st = hot_loop_stats(no_inner, "ttg.warp_specialize")
    assert st.cta_barriers == 1 and st.loads == ("cp.async",) and st.warp_specialized and st.mma_per_iter == 2
    assert hot_loop_stats("        /*0000*/   EXIT ;\n", "") is None


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sass") / "rows.json"
    script = ("import json, sys\nfrom magi_kernels.tools.aot_check import structure_report\n"
              "rows = structure_report(json.loads(sys.argv[1]), sys.argv[2] or None)\n"
              "open(sys.argv[3], 'w').write(json.dumps(rows))\n")
    anchors = ANCHORS if ANCHORS and os.path.isdir(ANCHORS) else ""
    rows = run_json_script(script, json.dumps(list(BUDGETS)), anchors, out=out)
    return {r["kernel"]: r for r in rows}


def test_hot_loop_instructions_per_mma_flop_within_budget(report):
    over = []
    for key, (budget, _) in BUDGETS.items():
        row = report[key]
        assert row["mma/iter"], f"{key}: no hot loop with tensor-core instructions found"
        if row["instr/kFLOP"] > budget:
            over.append(f"{key}: {row['instr/kFLOP']} issued instructions per kFLOP > budget {budget}")
        if row["buffers"] < MIN_BUFFERS.get(key, 1):
            over.append(f"{key}: {row['buffers']} pipeline buffers < {MIN_BUFFERS[key]}")
        if row["spills"] != 0:
            over.append(f"{key}: {row['spills']} spill instructions (STL + LDL), must be 0")
        if key in NO_PLAIN_LDG and "LDG" in row["loads"].split("+"):
            over.append(f"{key}: plain LDG in the hot loop (loads {row['loads']})")
        if row["regs"] > MAX_REGS.get(key, 255):
            over.append(f"{key}: {row['regs']} registers > {MAX_REGS[key]}")
        over += [f"{key}: {col} {row[col]} != {want}" for col, want in FP8_STRUCTURE.get(key, {}).items()
                 if row[col] != want]
        if key in WARP_SPECIALIZED and not (row["ws"] and row["loads"] == "-" and row["CTA bars"] == 0):
            over.append(f"{key}: not a warp-specialized consumer loop (ws {row['ws']}, loads {row['loads']}, "
                        f"CTA bars {row['CTA bars']})")
    assert not over, "\n".join(over)


def test_ratio_against_tutorial_kernels_within_budget(report):
    if not (ANCHORS and os.path.isdir(ANCHORS)):
        why = ("Triton's tutorials 03-matrix-multiplication.py, 06-fused-attention.py and 09-persistent-matmul.py "
               f"are not in {ANCHORS!r} (set MAGI_ANCHORS_DIR)")
        # CI lays the tutorials out next to the checkout, so there a missing directory is a failure, not a skip.
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    anchors = {r["kernel"]: r for r in report.values() if r["kernel"][:3] in ("03 ", "06 ", "09 ")}
    assert all("Error" not in k for k in anchors), f"an anchor failed to compile: {list(anchors)}"
    ws_attn = [r for k, r in anchors.items() if k.startswith("06 ") and r["arch"] == "sm_90"]
    assert ws_attn and ws_attn[0]["ws"] and ws_attn[0]["CTA bars"] == 0, "06's Hopper kernel is warp-specialized"
    over = []
    for key, (_, budget) in BUDGETS.items():
        if budget is None:
            continue
        ratio = report[key]["ratio"]
        assert ratio is not None, f"{key}: no ratio (anchor {report[key]['anchor']} has no hot loop?)"
        if ratio > budget:
            over.append(f"{key}: ratio {ratio} vs {report[key]['anchor']} > budget {budget}")
    assert not over, "\n".join(over)
