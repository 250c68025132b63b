"""Quantized flex attention (forward only; int8 Q/K, e4m3 or fp16 P/V): the Triton kernels under the
interpreter against the torch emulation of their exact quantization, and both against float64 attention with
accuracy bounds.

The interpreter runs the kernel body the AOT check compiles, except the fp32 -> e4m3 rounding, which it does
with the integer recipe (EXACT_E4M3; the interpreter's own cast rounds wrongly). GPU numerics and speed are
not measured here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from magi_kernels import flex_attn_fp8_func, merge_attn_states, registry
from magi_kernels.kernels.triton import flex_attn as kern16
from magi_kernels.kernels.triton import flex_attn_fp8 as kern
from magi_kernels.kernels.triton.aot import registered_configs
from magi_kernels.ops.flex_attn import make_args
from magi_kernels.reference import flex_attn_fp8 as emulation
from magi_kernels.reference.flex_attn import flex_attn_ref
from magi_kernels.reference.flex_attn_fp8 import (
    PV_PRECISIONS,
    flex_attn_fp8_ref,
    int8_round,
    kv_statistics,
)

from ._helpers import dense_attn, dense_mask, slice_layouts

SMALL_TILES = [(16, 16), (16, 32), (32, 16)]


def _ranges(qr, kr, ty):
    return tuple(torch.from_numpy(np.ascontiguousarray(x, dtype=np.int32)) for x in (qr, kr, ty))


# statistics kernel: 24-token chunks in 8-token steps, so several chunks (and a ragged last one) get merged
STATS_CHUNK, STATS_STEP = 24, 8


def _run_kernel(q, k, v, rng, softcap, tiles, pv="e4m3", two_pass=False, out=None):
    """launch_fwd with small interpreter tiles; outputs poisoned with NaN first. two_pass: the sm_90 shape (Q
    quantized by its own kernel, FULL pass on tensor descriptors, PARTIAL pass resuming from the saved state).
    ``out``: the output tensor to write (default a new one shaped like q)."""
    a = make_args(q, k, v, *rng, None, softcap, False)
    bm, bn = tiles
    d = q.shape[-1]
    cfgs = (kern.make_config("stats", q.dtype, d, False, STATS_CHUNK, STATS_STEP),
            kern.make_config("quant", q.dtype, d, False, bm, bn, 4, 1, exact_e4m3=True, pv_precision=pv))
    if two_pass:
        cfgs += (kern.make_config("quant_q", q.dtype, d, False, bm, bn, 4, 1),
                 kern.make_config("fwd", q.dtype, d, softcap > 0, bm, bn, 4, 1, exact_e4m3=True, pv_precision=pv,
                                  tma=True),
                 kern.make_config("fwd_partial", q.dtype, d, softcap > 0, bm, bn, 4, 1, exact_e4m3=True,
                                  pv_precision=pv, tma=True))
    else:
        cfgs += (kern.make_config("fwd", q.dtype, d, softcap > 0, bm, bn, 4, 1, exact_e4m3=True, pv_precision=pv),)
    out = torch.empty_like(q) if out is None else out
    out.fill_(float("nan"))
    lse = torch.full(q.shape[:2], float("nan"))
    kern.launch_fwd(a, out, lse, pv, cfgs)
    return out, lse


def _rel_l2(got, want):
    return float((got.double() - want).norm() / want.norm().clamp_min(1e-30))


def _cos(got, want):
    return float(torch.nn.functional.cosine_similarity(got.double().flatten(), want.flatten(), 0))


@settings(max_examples=8, deadline=None)
@given(layout=slice_layouts(max_tokens=48, max_slices=4), hk=st.sampled_from([1, 2]), g=st.sampled_from([1, 2]),
       softcap=st.sampled_from([0.0, 0.0, 4.0]), tiles=st.sampled_from(SMALL_TILES),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), offset=st.sampled_from([0.0, 8.0]),
       pv=st.sampled_from(PV_PRECISIONS), two_pass=st.booleans())
def test_kernel_matches_quantization_emulation(layout, hk, g, softcap, tiles, dtype, offset, pv, two_pass):
    """All four mask types, overlaps, uncovered rows, GQA, softcap, a K mean offset, both PV precisions, both
    forward shapes (one pass; the sm_90 FULL and PARTIAL passes): kernel == emulation."""
    qr, kr, ty, tq, tk = layout
    d = 64
    q = torch.randn(tq, hk * g, d).to(dtype)
    k = (torch.randn(tk, hk, d) + offset).to(dtype)
    v = torch.randn(tk, hk, d).to(dtype)
    rng = _ranges(qr, kr, ty)
    out, lse = _run_kernel(q, k, v, rng, softcap, tiles, pv, two_pass)
    ro, rl = flex_attn_fp8_ref(q, k, v, *rng, softcap=softcap, block_m=tiles[0], block_n=tiles[1], pv_precision=pv)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rl)) and not lse.isnan().any()
    torch.testing.assert_close(lse, rl, atol=1e-4, rtol=1e-5)
    # fp32 arithmetic differs only in summation order (K's mean too), FFMA contraction and exp2 ulps; a value
    # next to a rounding boundary can flip one P (or int8 K) code, and a bf16 output may round the other way at
    # a tie: one bf16 ulp (2^-8 relative).
    want = ro.to(dtype).float()
    rtol = 2e-3 if dtype == torch.float32 else 2.0**-7
    torch.testing.assert_close(out.float(), want, atol=2e-3, rtol=rtol)
    if dtype == torch.float32:  # (bf16: the elementwise one-ulp bound above is the meaningful one)
        assert _rel_l2(out.float(), want.double()) < 1e-3


# (pv_precision, min cosine, max rel L2) against float64. Measured on this case over 3 seeds: e4m3 0.9995 /
# 3.0-3.2% (e4m3 P and V alone leave about 3% here: docs/fp8_attention.md, error budget), fp16 0.9998 / 1.6-2.0%.
ACCURACY_BOUNDS = {"e4m3": (0.999, 0.045), "fp16": (0.9995, 0.03)}


@pytest.mark.parametrize("pv", PV_PRECISIONS)
@pytest.mark.parametrize("d,tiles,two_pass", [(64, (32, 16), False), (128, (16, 32), False), (128, (32, 32), True)])
def test_accuracy_against_float64(d, tiles, two_pass, pv):
    """Random normal q/v and a K with a large per-channel mean and outlier channels in q and k."""
    tq, tk, hq, hk = 96, 80, 4, 2
    q = torch.randn(tq, hq, d)
    k = torch.randn(tk, hk, d) + 20.0 * torch.randn(1, hk, d)
    q[..., :3] *= 8.0  # outlier channels, shared by q and k: sharp, outlier-dominated scores
    k[..., :3] *= 8.0
    v = torch.randn(tk, hk, d)
    rng = _ranges([[0, 48], [40, 96]], [[0, 50], [10, 80]], [1, 0])
    out, lse = _run_kernel(q, k, v, rng, 0.0, tiles, pv, two_pass)
    o64, l64 = flex_attn_ref(q, k, v, *rng)
    min_cos, max_rel = ACCURACY_BOUNDS[pv]
    assert _cos(out, o64) >= min_cos and _rel_l2(out, o64) <= max_rel, (_cos(out, o64), _rel_l2(out, o64))
    fin = torch.isfinite(l64)
    assert torch.equal(torch.isfinite(lse), fin)
    # lse carries the unsmoothed scores (q . mean_k added back): same convention as flex_attn
    assert (lse.double() - l64)[fin].abs().max() < 0.05 * l64[fin].abs().max().clamp_min(1.0)


# 37 rows x 45 keys at 16x16 tiles: rows 0-29 see keys [0, 6) and [9, 13) (FULL slices) and, from row 4 on, a
# causal band over [15, 45): k tile 0 holds three disjoint intervals in one row (three bound entries), the band
# makes PARTIAL tiles with one interval per row, the last k tile is ragged (45 keys), rows 30-36 see nothing.
MULTI_INTERVAL = ([[0, 30], [0, 30], [4, 30]], [[0, 6], [9, 13], [15, 45]], [0, 0, 1], 37, 45)


def test_emulation_walks_the_plans_row_bounds():
    """The emulation's PARTIAL steps are the plan's bound entries (same k tiles, same per-row intervals, same
    order), so the kernel == emulation comparisons cover the interval split too."""
    qr, kr, ty, tq, tk = MULTI_INTERVAL
    bm = bn = 16
    plan = make_args(torch.zeros(tq, 1, 64), torch.zeros(tk, 1, 64), torch.zeros(tk, 1, 64), *_ranges(qr, kr, ty),
                     None, 0.0, False).plan(bm, bn)
    mask = torch.nn.functional.pad(dense_mask(qr, kr, ty, tq, tk), (0, 3 * bn - tk))
    most_copies = 0
    for m in range(plan.num_q_tiles):
        rows = slice(m * bm, min((m + 1) * bm, tq))
        partial = list(emulation._steps([e for e in plan.q_tile_entries(m) if not e.full], mask[rows], bn))
        b0, b1 = int(plan.q_bptr[m]), int(plan.q_bptr[m + 1])
        k_tiles = plan.b_kidx[b0:b1].tolist()
        assert [k for k, _ in partial] == k_tiles
        for (k_tile, vis), b in zip(partial, range(b0, b1)):
            lo, hi = plan.b_rows[b, 0, :vis.shape[0]], plan.b_rows[b, 1, :vis.shape[0]]
            cols = k_tile * bn + torch.arange(bn)
            assert torch.equal(vis, (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None]))
        most_copies = max([most_copies] + [k_tiles.count(n) for n in k_tiles])
    assert most_copies == 3  # the layout does exercise a tile walked once per interval


@pytest.mark.parametrize("two_pass", [False, True])
@pytest.mark.parametrize("pv", PV_PRECISIONS)
def test_partial_tiles_with_several_intervals_per_row(two_pass, pv):
    """Row-bounds PARTIAL steps on MULTI_INTERVAL (GQA, odd sizes, empty rows; NaN-poisoned outputs): kernel ==
    emulation to fp32 rounding, and both close to float64 attention."""
    qr, kr, ty, tq, tk = MULTI_INTERVAL
    q, k, v = torch.randn(tq, 2, 64), torch.randn(tk, 1, 64) + 3.0, torch.randn(tk, 1, 64)
    rng = _ranges(qr, kr, ty)
    out, lse = _run_kernel(q, k, v, rng, 0.0, (16, 16), pv, two_pass)
    ro, rl = flex_attn_fp8_ref(q, k, v, *rng, block_m=16, block_n=16, pv_precision=pv)
    torch.testing.assert_close(lse, rl, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out, ro, atol=2e-3, rtol=2e-3)
    assert torch.isneginf(lse[30:]).all() and (out[30:] == 0).all() and torch.isfinite(lse[:30]).all()
    o64, l64 = dense_attn(q, k, v, dense_mask(qr, kr, ty, tq, tk), 64 ** -0.5)
    assert _cos(out[:30], o64[:30]) >= 0.999 and _rel_l2(out[:30], o64[:30]) <= ACCURACY_BOUNDS[pv][1]
    assert (lse[:30].double() - l64[:30]).abs().max() < 0.05


@pytest.mark.parametrize("pv", PV_PRECISIONS)
def test_two_pass_writes_only_its_rows(pv):
    """The sm_90 FULL pass stores out in the accumulator's layout (_store_rows), in place into an output that is
    the front of a larger buffer: the ragged last q tile, which sees no key and so is the FULL pass's to finish
    (zeros), writes no row past the end, and the q tile the PARTIAL pass finishes comes out of the saved state."""
    tq, hq, tk, d, bm, bn = 40, 2, 56, 64, 16, 16  # 2.5 q tiles
    q = torch.randn(tq, hq, d).to(torch.bfloat16)
    k, v = torch.randn(tk, 1, d).to(torch.bfloat16), torch.randn(tk, 1, d).to(torch.bfloat16)
    # Rows [0, 32) see keys [0, 32) (FULL k tiles), q tile 0 also a causal slice (PARTIAL tiles), rows [32, 40)
    # nothing.
    rng = _ranges([[0, 32], [0, 16]], [[0, 32], [32, 56]], [0, 1])
    buf = torch.full((tq + bm, hq, d), 7.0, dtype=torch.bfloat16)
    out, lse = _run_kernel(q, k, v, rng, 0.0, (bm, bn), pv, two_pass=True, out=buf[:tq])
    assert (buf[tq:] == 7.0).all() and (out[32:] == 0).all() and torch.isneginf(lse[32:]).all()
    ro, rl = flex_attn_fp8_ref(q, k, v, *rng, block_m=bm, block_n=bn, pv_precision=pv)
    torch.testing.assert_close(lse, rl, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.float(), ro.to(torch.bfloat16).float(), atol=2e-3, rtol=2.0**-7)


def test_lse_convention_merges_with_flex_attn():
    """fp8 attention over half the keys merged with bf16-path attention over the rest = attention over all."""
    tq, tk, h, d = 40, 64, 2, 64
    q, k, v = torch.randn(tq, h, d), torch.randn(tk, h, d) + 5.0, torch.randn(tk, h, d)
    half = tk // 2
    qr = torch.tensor([[0, tq]], dtype=torch.int32)
    full = torch.tensor([[0, tk]], dtype=torch.int32)
    ka = torch.tensor([[0, half]], dtype=torch.int32)
    kb = torch.tensor([[half, tk]], dtype=torch.int32)
    oa, la = _run_kernel(q, k, v, (qr, ka, None), 0.0, (16, 16))
    ob, lb = flex_attn_ref(q, k, v, qr, kb)
    om, lm = merge_attn_states(oa, la, ob.float(), lb.float())
    o64, l64 = flex_attn_ref(q, k, v, qr, full)
    assert _cos(om, o64) >= 0.999 and _rel_l2(om, o64) <= 0.04
    assert (lm.double() - l64).abs().max() < 0.05


def test_int8_rounding_ties_away_from_zero_and_saturates():
    """The kernel's recipe, trunc(y +- 0.5) in fp32: ties go away from zero, and the largest fp32 below 0.5 rounds
    up because y + 0.5 itself rounds to 1.0 (the kernel's fp32 add does the same)."""
    y = torch.tensor([0.5, -0.5, 1.5, -2.5, 0.49999997, 0.4999, 126.5, -126.5, 130.0, -1e9, 0.0])
    assert int8_round(y).tolist() == [1.0, -1.0, 2.0, -3.0, 1.0, 0.0, 127.0, -127.0, 127.0, -127.0, 0.0]


def test_statistics_kernel_matches_reference():
    """One pass over K and V: K's channel mean (fp32 sums, another order) and V's channel scale (exact)."""
    tk, hk, d = 61, 2, 64  # 3 chunks of 24 tokens, the last ragged
    k = (torch.randn(tk, hk, d) * 3 + 5).to(torch.bfloat16)
    v = torch.randn(tk, hk, d).to(torch.bfloat16)
    v[17, 1, 5] = -40.0  # a negative channel maximum in a middle chunk
    a = make_args(torch.randn(4, hk, d).to(torch.bfloat16), k, v, *_ranges([[0, 4]], [[0, tk]], [0]), None, 0.0,
                  False)
    mean, scale = kern.kv_statistics(a, kern.make_config("stats", k.dtype, d, False, STATS_CHUNK, STATS_STEP))
    want_mean, want_scale = kv_statistics(k, v)
    torch.testing.assert_close(mean, want_mean, atol=1e-5, rtol=1e-6)
    assert torch.equal(scale, want_scale) and float(scale[1, 5]) == float(torch.tensor(40.0) / 448.0)


@pytest.mark.parametrize("pv", PV_PRECISIONS)
def test_quantized_kv_layout(pv):
    """K, its scales and V^T as the quantize kernel writes them (64-key tiles, a ragged last one): K codes in key
    order; each tile's key scales grouped by the score columns one thread holds (key 8i + 2c + b at slot
    16c + 2i + b); e4m3 V^T with every 32 keys in the order the step hands P to the MMA (key bits j4 j3 j2 j1 j0
    at column j4 j2 j1 j3 j0), fp16 V^T in key order; padding keys zero (scale: the floor)."""
    tk, hk, d, bn, padded = 70, 2, 64, 64, 128
    k, v = torch.randn(tk, hk, d) + 2.0, torch.randn(tk, hk, d)
    a = make_args(torch.randn(4, hk, d), k, v, *_ranges([[0, 4]], [[0, tk]], [0]), None, 0.0, False)
    mean, sv = kv_statistics(k, v)
    cfg = kern.make_config("quant", k.dtype, d, False, 16, bn, 4, 1, exact_e4m3=True, pv_precision=pv)
    k8, v8t, k_scale = kern.quantize_kv(a, cfg, mean, sv)

    def pad(x):
        return torch.nn.functional.pad(x, (0, 0, 0, 0, 0, padded - tk))  # [padded keys, hk, ...]

    want_k8, want_sk = emulation.row_quantize_int8(pad(k - mean))
    assert torch.equal(k8.view(torch.int8).float(), want_k8.transpose(0, 1))
    by_slot = want_sk[..., 0].view(padded // bn, bn // 8, 4, 2, hk).permute(0, 2, 1, 3, 4).reshape(padded, hk)
    torch.testing.assert_close(k_scale, by_slot.T, rtol=0, atol=0)
    want_v = pad(emulation.pv_round(v / sv, pv))
    if pv == "e4m3":
        want_v = want_v.view(padded // 32, 2, 2, 2, 2, 2, hk, d).permute(0, 1, 3, 4, 2, 5, 6, 7).reshape(padded, hk, d)
    assert torch.equal(v8t.float(), want_v.permute(1, 2, 0))


def test_int8_qk_keeps_outlier_scores_close():
    """Per-token int8 Q/K on outlier-dominated scores: the emulation with only Q and K rounded stays within
    3% of float64 (measured 1.4-2.1%), where e4m3 Q/K blocks were off by ~20% (docs/fp8_attention.md)."""
    tq, h, d = 64, 2, 128
    q, k, v = torch.randn(tq, h, d), torch.randn(tq, h, d), torch.randn(tq, h, d)
    q[..., :4] *= 10.0
    k[..., :4] *= 10.0
    rng = _ranges([[0, tq]], [[0, tq]], [1])
    o64, _ = flex_attn_ref(q, k, v, *rng)
    qk_only, _ = flex_attn_fp8_ref(q, k, v, *rng, block_m=32, block_n=32, exact=("p", "v"))
    exact, _ = flex_attn_fp8_ref(q, k, v, *rng, block_m=32, block_n=32, exact=("q", "k", "p", "v"))
    assert _rel_l2(exact, o64) < 1e-5  # nothing rounded: only fp32 arithmetic left
    assert _rel_l2(qk_only, o64) < 0.03, _rel_l2(qk_only, o64)


@pytest.mark.parametrize("two_pass", [False, True])
def test_rows_without_keys_and_no_keys_at_all(two_pass):
    q, k, v = torch.randn(20, 2, 64), torch.randn(9, 1, 64), torch.randn(9, 1, 64)
    out, lse = _run_kernel(q, k, v, _ranges([[3, 7]], [[2, 9]], [0]), 0.0, (16, 16), two_pass=two_pass)
    assert torch.isneginf(lse[:3]).all() and torch.isneginf(lse[7:]).all() and torch.isfinite(lse[3:7]).all()
    assert (out[:3] == 0).all() and (out[7:] == 0).all()
    out, lse = _run_kernel(q, k[:0], v[:0], _ranges(np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0)), 0.0, (16, 16),
                           two_pass=two_pass)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_op_backends_agree_and_reject_bad_input():
    q = torch.randn(50, 2, 64, dtype=torch.bfloat16)
    k, v = torch.randn(70, 1, 64, dtype=torch.bfloat16), torch.randn(70, 1, 64, dtype=torch.bfloat16)
    rng = _ranges([[0, 50]], [[0, 70]], [3])
    ot, lt = flex_attn_fp8_func(q, k, v, *rng, backend="torch")
    oi, li = flex_attn_fp8_func(q, k, v, *rng, backend="triton")
    assert ot.dtype == oi.dtype == torch.bfloat16 and lt.dtype == li.dtype == torch.float32
    # The interpreter runs sm_89's tiles, 128x128 like the torch path: the same quantization, so agreement to fp32
    # rounding and one bf16 ulp.
    torch.testing.assert_close(oi.float(), ot.float(), atol=2e-3, rtol=2.0**-7)
    torch.testing.assert_close(li, lt, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="softcap"):
        flex_attn_fp8_func(q, k, v, *rng, softcap=-1.0)
    with pytest.raises(ValueError, match="softmax_scale"):
        flex_attn_fp8_func(q, k, v, *rng, softmax_scale=-0.1)
    with pytest.raises(ValueError, match="pv_precision"):
        flex_attn_fp8_func(q, k, v, *rng, pv_precision="bf16")
    with pytest.raises(ValueError, match="exact"):
        flex_attn_fp8_ref(q, k, v, *rng, exact=("s",))
    with pytest.raises(ValueError, match="k_scale must be one of"):
        flex_attn_fp8_ref(q, k, v, *rng, k_scale="channel")
    with pytest.raises(ValueError, match="forward only"):
        flex_attn_fp8_func(q.float().requires_grad_(), k.float(), v.float(), *rng)
    with pytest.raises(registry.BackendUnavailable, match="head_dim"):
        flex_attn_fp8_func(q[..., :32], k[..., :32], v[..., :32], *rng, backend="triton")


def test_shipped_configs_are_registered(monkeypatch):
    """Every config the launcher picks on sm_89/sm_90 is registered for the AOT check (PV MMA class, 0 spills):
    one attention pass on sm_89, the Q quantization and the FULL (TMA, warp-specialized) and PARTIAL passes on
    sm_90, all at the quantize kernel's tile."""
    monkeypatch.setattr(kern, "triton_interpreting", lambda: False)  # select as on a GPU
    keys = {c.key for c in registered_configs()}
    for arch in kern.ARCHS:
        for d in (64, 128):
            for cap in (False, True):
                for dtype in kern.IN_DTYPES:
                    for pv in PV_PRECISIONS:
                        cfgs = kern.select_configs(dtype, d, cap, arch, pv)
                        cq = cfgs[1]
                        passes = [c for c in cfgs if "PASS" in c.constexprs]
                        assert [c.constexprs["PASS"] for c in passes] == ([1, 2] if arch == 90 else [0])
                        for cf in passes:
                            assert cf.mma == {"e4m3": "fp8", "fp16": "f16"}[pv] and cf.archs == (arch,)
                            assert not cf.constexprs["EXACT_E4M3"] and cf.constexprs["PV_FP16"] == (pv == "fp16")
                            assert cq.constexprs["BLOCK_N"] == cf.constexprs["BLOCK_N"]
                            assert cf.constexprs["BLOCK_M"] == passes[0].constexprs["BLOCK_M"]
                        assert {c.key for c in cfgs} <= keys


def test_two_pass_state_in_head_groups(monkeypatch):
    """A state budget smaller than all q heads: the sm_90 passes run over groups of heads (a launch pair per group,
    head_base offsets), GQA across the group boundary included; kernel == emulation."""
    tq, tk, hq, hk, d = 40, 48, 4, 2, 64
    q, k, v = torch.randn(tq, hq, d), torch.randn(tk, hk, d) + 2.0, torch.randn(tk, hk, d)
    rng = _ranges([[0, 40], [8, 40]], [[0, 20], [16, 48]], [1, 2])  # CAUSAL + INV_CAUSAL: PARTIAL tiles
    # less than one head's state: one q head per launch pair (the budget of both forwards' state buffers)
    monkeypatch.setattr(kern16, "STATE_BYTES_MAX", 1)
    launches = []
    real_launch = kern.KernelLaunch

    def recording_launch(cfg, grid, args):
        launches.append(grid)
        return real_launch(cfg, grid, args)

    monkeypatch.setattr(kern, "KernelLaunch", recording_launch)
    out, lse = _run_kernel(q, k, v, rng, 0.0, (16, 16), two_pass=True)
    assert sum(1 for grid in launches if grid[1] == 1) >= 2 * hq  # FULL + PARTIAL pass per head
    ro, rl = flex_attn_fp8_ref(q, k, v, *rng, block_m=16, block_n=16)
    torch.testing.assert_close(lse, rl, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out, ro.float(), atol=2e-3, rtol=2e-3)


def test_config_arguments_are_checked():
    with pytest.raises(ValueError, match="needs tma=True"):
        kern.make_config("fwd_partial", torch.float16, 64, False, 16, 16, 4, 1)
    with pytest.raises(ValueError, match="tma=True"):
        kern.make_config("quant", torch.float16, 64, False, 16, 16, 4, 1, tma=True)
    q, k, v = torch.randn(8, 1, 64), torch.randn(8, 1, 64), torch.randn(8, 1, 64)
    a = make_args(q, k, v, *_ranges([[0, 8]], [[0, 8]], [0]), None, 0.0, False)
    cfgs = (kern.make_config("stats", q.dtype, 64, False, STATS_CHUNK, STATS_STEP),
            kern.make_config("quant", q.dtype, 64, False, 16, 32, 4, 1, exact_e4m3=True),
            kern.make_config("fwd", q.dtype, 64, False, 16, 16, 4, 1, exact_e4m3=True))
    with pytest.raises(ValueError, match="BLOCK_N"):
        kern.launch_fwd(a, torch.empty_like(q), torch.empty(8, 1), "e4m3", cfgs)
    with pytest.raises(ValueError, match="configs must be"):
        kern.launch_fwd(a, torch.empty_like(q), torch.empty(8, 1), "e4m3", cfgs[:2])


def test_tiny_dit_attention_precision_fp8():
    """magi_model: attention_precision="fp8" routes the DiT's attention through the fp8 op; velocity stays close."""
    from magi_model import build_dit
    from magi_model.config import MagiConfig, preset_dict

    d = preset_dict("tiny_random")
    d["model_config"].update(num_layers=2, caption_max_length=64, caption_channels=96)
    model = build_dit(MagiConfig.from_dict(d), seed=1)
    x, t = torch.randn(1, 16, 12, 8, 8), torch.rand(1, 2)
    cap, mask = torch.randn(1, 2, 64, 96) * 0.5, torch.ones(1, 2, 64)
    with torch.no_grad():
        ref = model(x, t, cap, mask, key_windows=[0, 1]).double()
        model.attention_precision = "fp8"
        got = model(x, t, cap, mask, key_windows=[0, 1]).double()
        model.attention_precision = "fp16"
        with pytest.raises(ValueError, match="attention_precision"):
            model(x, t, cap, mask, key_windows=[0, 1])
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel < 0.05, rel


def test_generate_cli_attention_precision_flag():
    from magi_model.generate import parse_args

    base = ["--preset", "tiny_random", "--prompt", "a cat", "--output_path", "out.mp4"]
    assert parse_args(base).attention_precision is None  # the model's default ("default") stays
    assert parse_args(base + ["--attention_precision", "fp8"]).attention_precision == "fp8"
    with pytest.raises(SystemExit):
        parse_args(base + ["--attention_precision", "int8"])
