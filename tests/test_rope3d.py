"""MAGI-1's 3D learnable rope table (docs/magi1.md#3d-rotary-embedding)."""

import math

import pytest
import torch

import magi_kernels as mk


def positions(cos, sin, bands):
    """Recover per-axis positions from the angle of band 0 (bands small enough that no angle wraps)."""
    ang = torch.atan2(sin, cos)
    nb = bands.numel()
    return ang[:, 0] / bands[0], ang[:, nb] / bands[0], ang[:, 2 * nb] / bands[0]


def test_720p_spatial_grid_is_centred_and_rescaled():
    bands = mk.magi_rope_bands_init(16) * 0.05  # |angle| < pi, so atan2 recovers positions
    t, h, w = 2, 45, 80  # 720x1280 latent after patchify
    cos, sin = mk.magi_rope_table(bands, t, h, w)
    assert cos.shape == (t * h * w, 48) and cos.dtype == torch.float32
    pt, ph, pw = positions(cos, sin, bands)
    assert ph.max().item() == pytest.approx(5.5, abs=1e-4) and ph.min().item() == pytest.approx(-5.5, abs=1e-4)
    half_w = (80 / 3.75 - 1) / 2  # ±10.17, docs/magi1.md#3d-rotary-embedding
    assert pw.max().item() == pytest.approx(half_w, abs=1e-3) and pw.min().item() == pytest.approx(-half_w, abs=1e-3)
    # Rows are ordered (T, H, W) with W fastest; T positions are the frame index.
    assert pt[h * w].item() == pytest.approx(1.0, abs=1e-5) and pt[h * w - 1].item() == pytest.approx(0.0, abs=1e-6)


def test_layout_is_axis_major_then_band():
    bands = torch.rand(4) * 0.04 + 0.01  # small: angles stay inside (-pi, pi]
    cos, sin = mk.magi_rope_table(bands, 3, 2, 5)
    # Token (t=2, h=1, w=4), last one: angles = pos * bands per axis.
    rescale = math.sqrt(2 * 5 / 256)
    ph = 0.5 / (2 - 1) * (2 / rescale - 1)
    pw = 2.0 / (5 - 1) * (5 / rescale - 1)
    expect = torch.cat([2.0 * bands, ph * bands, pw * bands])
    torch.testing.assert_close(torch.atan2(sin[-1], cos[-1]), expect, rtol=1e-5, atol=1e-5)


def test_keep_last_keeps_absolute_temporal_positions():
    bands = mk.magi_rope_bands_init(16)
    full = mk.magi_rope_table(bands, 5, 3, 4)
    tail = mk.magi_rope_table(bands, 5, 3, 4, keep_last=2 * 12)
    torch.testing.assert_close(tail[0], full[0][-24:])
    with pytest.raises(ValueError, match="'keep_last'"):
        mk.magi_rope_table(bands, 5, 3, 4, keep_last=0)


def test_single_row_axes_do_not_divide_by_zero():
    cos, sin = mk.magi_rope_table(mk.magi_rope_bands_init(16), 1, 1, 1)
    assert torch.isfinite(cos).all() and torch.isfinite(sin).all()
    torch.testing.assert_close(cos, torch.ones_like(cos))
