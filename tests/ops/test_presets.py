"""Each named preset reproduces its model's QK-norm + rotary math, written out here the way that model's
public code writes it (independently of magi_kernels.reference), in float64."""

import pytest
import torch

import magi_kernels as mk

T, H, D = 7, 3, 16


def _inputs():
    g = torch.Generator().manual_seed(11)
    q = torch.randn(T, H, D, generator=g, dtype=torch.float64) * 2 + 0.3
    k = torch.randn(T, H, D, generator=g, dtype=torch.float64)
    ang = torch.rand(T, D // 2, generator=g, dtype=torch.float64) * 6
    return q, k, ang


def _rms(x, w, dims):
    red = tuple(range(-dims, 0))
    return x * torch.rsqrt(x.pow(2).mean(red, keepdim=True) + 1e-6) * w


def _complex_pairs(x, ang):
    """Wan / HunyuanVideo: consecutive pairs (2i, 2i+1) as complex numbers times exp(i * angle)."""
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * torch.polar(torch.ones_like(ang), ang)[:, None]).flatten(-2)


def _wan(q, k, ang, wq, wk):
    # RMSNorm over the whole hidden size (before splitting heads), then complex rotary per head.
    nq = _rms(q.reshape(T, H * D), wq, 1).reshape(T, H, D)
    nk = _rms(k.reshape(T, H * D), wk, 1).reshape(T, H, D)
    return _complex_pairs(nq, ang), _complex_pairs(nk, ang)


def _hunyuan(q, k, ang, wq, wk):
    return _complex_pairs(_rms(q, wq, 1), ang), _complex_pairs(_rms(k, wk, 1), ang)


def _magi1(q, k, ang, wq, wk, bq, bk):
    def ln1p(x, w, b):  # LayerNorm with zero-centred weight: gamma = w + 1
        return torch.nn.functional.layer_norm(x, (D,), w + 1, b, 1e-6)

    def rotate_half(x):  # NeoX: pairs (i, i + D/2)
        c, s = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
        x1, x2 = x[..., :D // 2], x[..., D // 2:]
        return x * c + torch.cat([-x2, x1], -1) * s

    return rotate_half(ln1p(q, wq, bq)), rotate_half(ln1p(k, wk, bk))


@pytest.mark.parametrize("preset", ["wan", "hunyuan", "magi1"])
def test_preset_matches_the_models_math(preset):
    q, k, ang = _inputs()
    n = H * D if preset == "wan" else D
    wq, wk = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    kw = dict(q_weight=wq, k_weight=wk)
    if preset == "magi1":
        bq, bk = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
        kw |= dict(q_bias=bq, k_bias=bk)
        want = _magi1(q, k, ang, wq, wk, bq, bk)
    else:
        want = {"wan": _wan, "hunyuan": _hunyuan}[preset](q, k, ang, wq, wk)
    got = mk.qk_norm_rope(q.float(), k.float(), ang.cos().float(), ang.sin().float(), preset=preset,
                          **{n_: v.float() for n_, v in kw.items()}, out_dtype=torch.float32)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_.double(), w_, rtol=2e-5, atol=2e-5)


def test_magi1_post_norm_preset_and_explicit_override():
    x, gate, res = torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 8)
    gi = torch.tensor([0, 0, 0, 1, 1, 1])
    w, b = torch.randn(8), torch.randn(8)
    by_preset = mk.gated_post_norm_residual(x, gate, res, w, b, gate_index=gi, preset="magi1")
    explicit = mk.gated_post_norm_residual(x, gate, res, w, b, gate_index=gi, norm="layernorm", weight_offset=1.0)
    torch.testing.assert_close(by_preset, explicit, rtol=0, atol=0)
    want = torch.nn.functional.layer_norm(x * gate[gi], (8,), w + 1, b, 1e-6) + res
    torch.testing.assert_close(by_preset, want, rtol=1e-5, atol=1e-5)
    # An explicit argument overrides the preset's value.
    plain = mk.gated_post_norm_residual(x, gate, res, w, b, gate_index=gi, preset="magi1", weight_offset=0.0)
    torch.testing.assert_close(plain, torch.nn.functional.layer_norm(x * gate[gi], (8,), w, b, 1e-6) + res,
                               rtol=1e-5, atol=1e-5)
