"""Tiny-config DiT forward vs the float64 per-chunk reference in _reference.py (the wiring proof)."""

import pytest
import torch

from magi_model import KVCache, build_dit
from magi_model.config import MagiConfig, preset_dict
from magi_model.dit import is_fp32_param

from ._reference import reference_forward


def tiny(dtype="torch.float32", *, glu=False, distill=False, fp8=False, layers=3):
    d = preset_dict("tiny_distill_quant" if fp8 else ("tiny_distill" if distill else "tiny_random"))
    m = d["model_config"]
    m.update(params_dtype=dtype, num_layers=layers, caption_max_length=64, caption_channels=96, ffn_hidden_size=256)
    if glu:  # 24B structure: SwiGLU, duplicated latent channels, x_rescale_factor
        m.update(gated_linear_unit=True, half_channel_vae=True, in_channels=32, out_channels=32, x_rescale_factor=0.1)
    return MagiConfig.from_dict(d)


def inputs(N, R, L=64, Cc=96, lat=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 16, 6 * R, lat, lat, generator=g)
    t = torch.rand(N, R, generator=g)
    cap = torch.randn(N, R, L, Cc, generator=g) * 0.5
    mask = torch.zeros(N, R, L)
    for b in range(N):
        for j in range(R):
            mask[b, j, :5 + 7 * j + 3 * b] = 1  # different valid lengths per (batch, chunk)
    return x, t, cap, mask


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_fp32_forward_matches_reference():
    model = build_dit(tiny(), seed=1)
    x, t, cap, mask = inputs(1, 3)
    windows = [0, 2, 1]  # chunk 0 all, chunk 1 sees 0-1, chunk 2 only itself
    v = model(x, t, cap, mask, caption_dropout=False, key_windows=windows)
    ref, _ = reference_forward(model, x, t, cap, mask, dropped=[False], key_windows=windows)
    assert v.dtype == torch.float32 and v.shape == x.shape
    assert rel_err(v, ref) < 1e-5
    # The adaLN row flag matters: dropped captions use null_caption_embedding[-1].
    v_drop = model(x, t, cap, mask, caption_dropout=True, key_windows=windows)
    ref_drop, _ = reference_forward(model, x, t, cap, mask, dropped=[True], key_windows=windows)
    assert rel_err(v_drop, ref_drop) < 1e-5 and rel_err(v_drop, v) > 1e-3


def test_kv_cache_and_slice_point_match_reference():
    """Clean re-forward of chunks 0-1 fills the cache; chunks 2-3 then read it at slice_point 2."""
    model = build_dit(tiny(), seed=2)
    x, t, cap, mask = inputs(1, 4, seed=3)
    n = 6 * 4 * 4
    cache = KVCache.for_model(model, 4 * n)
    t_clean = torch.full((1, 2), 0.9999)
    v0 = model(x[:, :, :12], t_clean, cap[:, :2], mask[:, :2], kv_cache=cache, update_kv_cache=True,
               key_windows=[1, 1])
    ref0, kv0 = reference_forward(model, x[:, :, :12], t_clean, cap[:, :2], mask[:, :2], dropped=[False],
                                  key_windows=[1, 1])
    assert rel_err(v0, ref0) < 1e-5 and cache.filled == 2 * n
    v1 = model(x[:, :, 12:], t[:, 2:], cap[:, 2:], mask[:, 2:], kv_cache=cache, slice_point=2, key_windows=[3, 2])
    ref1, _ = reference_forward(model, x[:, :, 12:], t[:, 2:], cap[:, 2:], mask[:, 2:], dropped=[False],
                                slice_point=2, key_windows=[3, 2], cache=kv0)
    assert rel_err(v1, ref1) < 1e-5
    # Reading the cache matters (a window of 1 would ignore it).
    v_self = model(x[:, :, 12:], t[:, 2:], cap[:, 2:], mask[:, 2:], kv_cache=cache, slice_point=2, key_windows=[1, 1])
    assert rel_err(v_self, v1) > 1e-3


def test_24b_structure_distill_batch_matches_reference():
    """SwiGLU, channel duplication, x_rescale_factor, step-size embedding, per-element caption flag."""
    model = build_dit(tiny(glu=True, distill=True), seed=4)
    x, t, cap, mask = inputs(2, 2, seed=5)
    v = model(x, t, cap, mask, caption_dropout=[True, False], distill_dt=8.0, key_windows=[1, 1])
    ref, _ = reference_forward(model, x, t, cap, mask, dropped=[True, False], distill_dt=8.0, key_windows=[1, 1])
    assert v.shape == (2, 16, 12, 8, 8)
    assert rel_err(v, ref) < 1e-5


def test_bf16_forward_close_to_reference():
    """The shipped precision (bf16 stream, fp32 islands) stays close to the float64 math."""
    model = build_dit(tiny("torch.bfloat16"), seed=6)
    for k, p in model.state_dict().items():
        assert p.dtype == (torch.float32 if is_fp32_param(k) else torch.bfloat16), k
    x, t, cap, mask = inputs(1, 2, seed=7)
    v = model(x, t, cap, mask, caption_dropout=False, key_windows=[0, 2])
    ref, _ = reference_forward(model, x, t, cap, mask, dropped=[False], key_windows=[0, 2], round_sinusoid=True)
    assert v.dtype == torch.float32
    assert rel_err(v, ref) < 0.03


def test_fp8_variant_runs_and_linear_math():
    model = build_dit(tiny("torch.bfloat16", fp8=True, distill=True, layers=4), seed=8)
    lin = model.videodit_blocks.layers[1].self_attention.linear_qkv.q
    assert lin.weight.dtype == torch.float8_e4m3fn and tuple(lin.weight.shape) == (1, 256, 256)
    assert type(model.videodit_blocks.layers[0].self_attention.linear_qkv.q) is torch.nn.Linear
    xin = torch.randn(5, 256).to(torch.bfloat16)
    # MAGI-1's fp8 linear (docs/fp8.md#magi-1-static-quantization): divide by input_scale, round fp32 -> bf16 -> fp8, fp32 GEMM, scale by input_scale[0] * weight_scale.
    xq = (xin.float() / lin.input_scale).clamp(-448, 448).to(torch.bfloat16).to(torch.float8_e4m3fn).float()
    want = (xq @ lin.weight[0].float().T) * lin.input_scale[0] * lin.weight_scale[0]
    torch.testing.assert_close(lin(xin).float(), want.to(torch.bfloat16).float())
    x, t, cap, mask = inputs(1, 2, seed=9)
    v = model(x, t, cap, mask, caption_dropout=False, distill_dt=32.0, key_windows=[1, 2])
    assert v.shape == x.shape and torch.isfinite(v).all()


def test_forward_argument_errors():
    model = build_dit(tiny(distill=True), seed=0)
    x, t, cap, mask = inputs(1, 2)
    with pytest.raises(ValueError, match="argument 'distill_dt' is required for distilled models"):
        model(x, t, cap, mask)
    with pytest.raises(ValueError, match="argument 'key_windows' chunk 0 .* no kv_cache"):
        model(x, t, cap, mask, distill_dt=8.0, slice_point=1, key_windows=[2, 2])
    with pytest.raises(ValueError, match="argument 'x' must have 16 channels"):
        model(x[:, :8], t, cap, mask, distill_dt=8.0)
    with pytest.raises(ValueError, match="argument 'caption_mask' must be"):
        model(x, t, cap, mask[..., :3], distill_dt=8.0)


def test_slice_point_without_cache_shifts_rope_only():
    """The uncond / self-only passes: no cache; slice_point moves the absolute rope positions."""
    model = build_dit(tiny(), seed=10)
    x, t, cap, mask = inputs(1, 2, seed=11)
    v = model(x, t, cap, mask, slice_point=3, key_windows=[1, 2])
    ref, _ = reference_forward(model, x, t, cap, mask, dropped=[False], slice_point=3, key_windows=[1, 2])
    assert rel_err(v, ref) < 1e-5
    # Rope is relative: a uniform temporal shift leaves the output unchanged (docs/magi1.md#3d-rotary-embedding), up to rounding.
    assert rel_err(model(x, t, cap, mask, slice_point=0, key_windows=[1, 2]), v) < 1e-5


def test_attention_and_fp8_go_through_magi_kernels(monkeypatch):
    from magi_kernels.modules import fp8_linear as fp8
    from magi_kernels.ops import flex_attn as flex
    from magi_model import attention

    calls = []

    def spy(*a, **k):
        calls.append(1)
        return flex.flex_attn_func(*a, **k)

    monkeypatch.setattr(attention, "flex_attn_func", spy)
    model = build_dit(tiny(), seed=0)
    x, t, cap, mask = inputs(1, 1)
    model(x, t, cap, mask)
    assert len(calls) == 2 * 3  # self + cross attention in each of the 3 layers
    q = build_dit(tiny(fp8=True, distill=True, layers=4), device="meta").videodit_blocks.layers[1]
    assert isinstance(q.self_attention.linear_qkv.q, fp8.PerTensorQuantizedFp8Linear)
    assert isinstance(q.mlp.linear_fc2, fp8.PerChannelQuantizedFp8Linear)
