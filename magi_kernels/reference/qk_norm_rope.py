"""Definition of qk_norm_rope: norm q and k (per head or over all heads), then rotate the first rotary_dim dims."""

from __future__ import annotations

import torch

from magi_kernels.reference.norm import norm_ref


def apply_rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int,
                     interleaved: bool) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` dims of x's last axis; cos/sin broadcast to x[..., :rotary_dim//2].

    NeoX (half-split): pairs (i, i + r/2). Interleaved (GPT-J): pairs (2i, 2i+1). Dims past
    ``rotary_dim`` pass through unchanged.
    """
    if rotary_dim == 0:
        return x
    xr, xpass = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rot = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    else:
        half = rotary_dim // 2
        x1, x2 = xr[..., :half], xr[..., half:]
        rot = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([rot, xpass], dim=-1)


def qk_norm_rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                     q_weight=None, q_bias=None, k_weight=None, k_bias=None, *, norm: str,
                     norm_scope: str, weight_offset: float, eps: float = 1e-6,
                     rotary_dim: int = 0, interleaved: bool = False, out_dtype: torch.dtype | None = None,
                     compute_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Norm q and k (per head over D, or over all heads H*D), then rotate the first rotary_dim dims.

    q: [T, Hq, D] or [B, S, Hq, D]; k: same leading dims, Hk heads. cos/sin: [S, r/2] shared over the
    batch, or with q's leading dims ([T, r/2] / [B, S, r/2]).
    """

    def one(x, w, b):
        xf = x.to(compute_dtype)
        y = norm_ref(xf, 1 if norm_scope == "head" else 2, norm, w, b, weight_offset, eps)
        if rotary_dim:
            c = cos.to(compute_dtype)
            s = sin.to(compute_dtype)
            # cos is [..., S, r/2]; broadcast over the head axis (and the batch axis when absent).
            c, s = c.unsqueeze(-2), s.unsqueeze(-2)
            y = apply_rotary_ref(y, c, s, rotary_dim, interleaved)
        return y.to(out_dtype or x.dtype)

    return one(q, q_weight, q_bias), one(k, k_weight, k_bias)
