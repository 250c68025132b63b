"""fp8 flex attention (forward only): the Triton kernels under the interpreter against the torch emulation of
their exact quantization, and both against float64 attention with accuracy bounds.

The interpreter runs the kernel body the AOT check compiles, except the fp32 -> e4m3 rounding, which it does
with the integer recipe (EXACT_E4M3; the interpreter's own cast rounds wrongly). GPU numerics and speed are
not measured here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from magi_kernels import flex_attn_fp8_func, merge_attn_states, registry
from magi_kernels.kernels.triton import flex_attn_fp8 as kern
from magi_kernels.kernels.triton.aot import registered_configs
from magi_kernels.ops.flex_attn import make_args
from magi_kernels.reference.flex_attn import flex_attn_ref
from magi_kernels.reference.flex_attn_fp8 import flex_attn_fp8_ref

from ._helpers import slice_layouts

SMALL_TILES = [(16, 16), (16, 32), (32, 16)]


def _ranges(qr, kr, ty):
    return tuple(torch.from_numpy(np.ascontiguousarray(x, dtype=np.int32)) for x in (qr, kr, ty))


def _run_kernel(q, k, v, rng, softcap, tiles):
    """launch_fwd with small interpreter tiles; outputs poisoned with NaN first."""
    a = make_args(q, k, v, *rng, None, softcap, False)
    bm, bn = tiles
    d = q.shape[-1]
    cfgs = (kern.make_config("quant", q.dtype, d, False, bm, bn, 4, 1, exact_e4m3=True),
            kern.make_config("fwd", q.dtype, d, softcap > 0, bm, bn, 4, 1, exact_e4m3=True))
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"))
    kern.launch_fwd(a, out, lse, cfgs)
    return out, lse


def _rel_l2(got, want):
    return float((got.double() - want).norm() / want.norm().clamp_min(1e-30))


def _cos(got, want):
    return float(torch.nn.functional.cosine_similarity(got.double().flatten(), want.flatten(), 0))


@settings(max_examples=8, deadline=None)
@given(layout=slice_layouts(max_tokens=48, max_slices=4), hk=st.sampled_from([1, 2]), g=st.sampled_from([1, 2]),
       softcap=st.sampled_from([0.0, 0.0, 4.0]), tiles=st.sampled_from(SMALL_TILES),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), offset=st.sampled_from([0.0, 8.0]))
def test_kernel_matches_quantization_emulation(layout, hk, g, softcap, tiles, dtype, offset):
    """All four mask types, overlaps, uncovered rows, GQA, softcap, a K mean offset: kernel == emulation."""
    qr, kr, ty, tq, tk = layout
    d = 64
    q = torch.randn(tq, hk * g, d).to(dtype)
    k = (torch.randn(tk, hk, d) + offset).to(dtype)
    v = torch.randn(tk, hk, d).to(dtype)
    rng = _ranges(qr, kr, ty)
    out, lse = _run_kernel(q, k, v, rng, softcap, tiles)
    ro, rl = flex_attn_fp8_ref(q, k, v, *rng, softcap=softcap, block_m=tiles[0], block_n=tiles[1])
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rl)) and not lse.isnan().any()
    torch.testing.assert_close(lse, rl, atol=1e-4, rtol=1e-5)
    # fp32 arithmetic differs only in summation order and exp2 ulps; a rare e4m3 tie can flip one P code, and
    # a bf16 output may round the other way at a tie: one bf16 ulp (2^-8 relative).
    want = ro.to(dtype).float()
    rtol = 2e-3 if dtype == torch.float32 else 2.0**-7
    torch.testing.assert_close(out.float(), want, atol=2e-3, rtol=rtol)
    if dtype == torch.float32:  # (bf16: the elementwise one-ulp bound above is the meaningful one)
        assert _rel_l2(out.float(), want.double()) < 1e-3


@pytest.mark.parametrize("d,tiles", [(64, (32, 16)), (128, (16, 32))])
def test_accuracy_against_float64(d, tiles):
    """Random normal q/v and a K with a large per-channel mean and outlier channels (smoothing's case)."""
    tq, tk, hq, hk = 96, 80, 4, 2
    q = torch.randn(tq, hq, d)
    k = torch.randn(tk, hk, d) + 20.0 * torch.randn(1, hk, d)
    k[..., :3] *= 15.0  # outlier channels
    v = torch.randn(tk, hk, d)
    rng = _ranges([[0, 48], [40, 96]], [[0, 50], [10, 80]], [1, 0])
    out, lse = _run_kernel(q, k, v, rng, 0.0, tiles)
    o64, l64 = flex_attn_ref(q, k, v, *rng)
    # Measured about 0.9975 / 7% on this hard case (outliers make the scores sharp); plain normal K is far closer.
    assert _cos(out, o64) >= 0.995 and _rel_l2(out, o64) <= 0.10, (_cos(out, o64), _rel_l2(out, o64))
    fin = torch.isfinite(l64)
    assert torch.equal(torch.isfinite(lse), fin)
    # lse carries the unsmoothed scores (q . mean_k added back): same convention as flex_attn
    assert (lse.double() - l64)[fin].abs().max() < 0.05 * l64[fin].abs().max().clamp_min(1.0)


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


def test_rows_without_keys_and_no_keys_at_all():
    q, k, v = torch.randn(20, 2, 64), torch.randn(9, 1, 64), torch.randn(9, 1, 64)
    out, lse = _run_kernel(q, k, v, _ranges([[3, 7]], [[2, 9]], [0]), 0.0, (16, 16))
    assert torch.isneginf(lse[:3]).all() and torch.isneginf(lse[7:]).all() and torch.isfinite(lse[3:7]).all()
    assert (out[:3] == 0).all() and (out[7:] == 0).all()
    out, lse = _run_kernel(q, k[:0], v[:0], _ranges(np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0)), 0.0, (16, 16))
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_op_backends_agree_and_reject_bad_input():
    q = torch.randn(50, 2, 64, dtype=torch.bfloat16)
    k, v = torch.randn(70, 1, 64, dtype=torch.bfloat16), torch.randn(70, 1, 64, dtype=torch.bfloat16)
    rng = _ranges([[0, 50]], [[0, 70]], [3])
    ot, lt = flex_attn_fp8_func(q, k, v, *rng, backend="torch")
    oi, li = flex_attn_fp8_func(q, k, v, *rng, backend="triton")
    assert ot.dtype == oi.dtype == torch.bfloat16 and lt.dtype == li.dtype == torch.float32
    # Different tiles (torch path 128x128, interpreter 128x64 for sm_89): fp8-level agreement, not exact.
    assert _cos(oi.float(), ot.double()) > 0.999
    torch.testing.assert_close(li, lt, atol=0.02, rtol=0.0)
    with pytest.raises(ValueError, match="softcap"):
        flex_attn_fp8_func(q, k, v, *rng, softcap=-1.0)
    with pytest.raises(ValueError, match="softmax_scale"):
        flex_attn_fp8_func(q, k, v, *rng, softmax_scale=-0.1)
    with pytest.raises(ValueError, match="forward only"):
        flex_attn_fp8_func(q.float().requires_grad_(), k.float(), v.float(), *rng)
    with pytest.raises(registry.BackendUnavailable, match="head_dim"):
        flex_attn_fp8_func(q[..., :32], k[..., :32], v[..., :32], *rng, backend="triton")


def test_shipped_configs_are_registered_fp8_configs():
    """Every config the launcher picks on sm_89/sm_90 is registered for the AOT check (fp8 MMAs, 0 spills)."""
    keys = {c.key for c in registered_configs()}
    for arch in kern.ARCHS:
        for d in (64, 128):
            for cap in (False, True):
                for dtype in kern.IN_DTYPES:
                    cq, cf = kern._CONFIGS[("quant", arch, dtype, d, False)], kern._CONFIGS[("fwd", arch, dtype, d, cap)]
                    assert cf.mma == "fp8" and cf.archs == (arch,) and not cf.constexprs["EXACT_E4M3"]
                    assert cq.constexprs["BLOCK_N"] == cf.constexprs["BLOCK_N"]
                    assert {cq.key, cf.key} <= keys


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

    base = ["--preset", "tiny", "--prompt", "a cat", "--output_path", "out.mp4"]
    assert parse_args(base).attention_precision is None  # the model's default ("default") stays
    assert parse_args(base + ["--attention_precision", "fp8"]).attention_precision == "fp8"
    with pytest.raises(SystemExit):
        parse_args(base + ["--attention_precision", "int8"])
