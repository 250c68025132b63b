"""MAGI-1's learnable 3D rotary table (LearnableRotaryEmbeddingCat with in_pixels=False).

Positions are integer grid coordinates; the spatial axes are centred and rescaled to a reference
grid of ``ref_area`` (256) cells, so a 720p latent (45 x 80) and a 360p one span comparable ranges.
Per token the table holds, for each axis a in (T, H, W) and band b: angle = pos_a * bands[b];
the 3*len(bands) angles are ordered [T bands | H bands | W bands].
"""

from __future__ import annotations

import math

import torch


def magi_rope_table(bands: torch.Tensor, t_total: int, h: int, w: int, keep_last: int | None = None,
                    ref_area: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(cos, sin)``, each fp32 ``[S, 3 * len(bands)]`` for the grid (t_total, h, w).

    ``keep_last``: keep only the last rows (MAGI-1 builds the table for the KV-cache prefix plus the
    window and keeps the window's ``T*h*w`` rows, so temporal positions stay absolute).
    Feed to ``qk_norm_rope(..., cos=cos, sin=sin)`` with rotary_dim = 6 * len(bands) (96 for MAGI-1),
    NeoX half-split.
    """
    if bands.dim() != 1:
        raise ValueError(f"magi_rope_table: argument 'bands' must be 1-D, got shape {list(bands.shape)}")
    for name, v in (("t_total", t_total), ("h", h), ("w", w)):
        if int(v) < 1:
            raise ValueError(f"magi_rope_table: argument '{name}' must be >= 1, got {v}")
    dev = bands.device
    f32 = torch.float32
    t_t = torch.arange(t_total, device=dev, dtype=f32)
    t_h = torch.arange(h, device=dev, dtype=f32) - (h - 1) / 2
    t_w = torch.arange(w, device=dev, dtype=f32) - (w - 1) / 2
    rescale = math.sqrt(h * w / ref_area)
    ref = (float(t_total), h / rescale, w / rescale)
    axes = []
    for pos, feat, r in zip((t_t, t_h, t_w), (t_total, h, w), ref):
        # Same order as the original: divide by (f-1), then multiply by (ref-1). An axis of length 1
        # has the single position 0 and is left as is (the original would divide 0 by 0).
        axes.append(pos / (feat - 1) * (r - 1) if feat > 1 else pos)
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (T, h, w, 3)
    ang = grid[..., None] * bands.to(f32)  # (T, h, w, 3, nb)
    ang = ang.reshape(t_total * h * w, 3 * bands.numel())
    if keep_last is not None:
        if not 0 < keep_last <= ang.shape[0]:
            raise ValueError(f"magi_rope_table: argument 'keep_last' must be in [1, {ang.shape[0]}], got {keep_last}")
        ang = ang[-keep_last:]
    return torch.cos(ang), torch.sin(ang)


def magi_rope_bands_init(n_bands: int = 16, theta: float = 10000.0) -> torch.Tensor:
    """MAGI-1's initial ``rope.bands``: 1 / theta^(arange(n)/n) (checkpoints overwrite it)."""
    return 1.0 / theta ** (torch.arange(n_bands, dtype=torch.float32) / n_bands)
