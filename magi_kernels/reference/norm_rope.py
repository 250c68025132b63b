"""Reference math for the fused norm ops (qk_norm_rope, gated_post_norm_residual)."""

from __future__ import annotations

import torch


def norm_ref(x: torch.Tensor, dims: int, norm: str, weight: torch.Tensor | None, bias: torch.Tensor | None,
             weight_offset: float, eps: float) -> torch.Tensor:
    """LayerNorm or RMSNorm of ``x`` over its last ``dims`` dims, in x's dtype (the caller upcasts).

    gamma = weight + weight_offset ("1p" LayerNorm stores zero-centred weights: offset 1).
    LayerNorm uses the biased variance of (x - mean), like torch.nn.functional.layer_norm.
    """
    red = tuple(range(-dims, 0))
    if norm == "layernorm":
        mean = x.mean(dim=red, keepdim=True)
        xc = x - mean
        var = (xc * xc).mean(dim=red, keepdim=True)
        y = xc * torch.rsqrt(var + eps)
    elif norm == "rmsnorm":
        y = x * torch.rsqrt((x * x).mean(dim=red, keepdim=True) + eps)
    else:
        raise ValueError(f"unknown norm {norm!r}")
    shape = x.shape[-dims:]
    if weight is not None:
        y = y * (weight.to(x.dtype).reshape(shape) + weight_offset)
    elif weight_offset != 0.0:
        # No weight but an offset: gamma is the constant offset (a "1p" norm whose weight is all zero).
        y = y * weight_offset
    if bias is not None:
        y = y + bias.to(x.dtype).reshape(shape)
    return y


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
                     q_weight=None, q_bias=None, k_weight=None, k_bias=None, *, norm: str = "layernorm",
                     norm_scope: str = "head", weight_offset: float = 0.0, eps: float = 1e-6,
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


def gated_post_norm_residual_ref(x: torch.Tensor, gate: torch.Tensor, residual: torch.Tensor,
                                 weight=None, bias=None, gate_index: torch.Tensor | None = None, *,
                                 norm: str = "layernorm", weight_offset: float = 1.0, eps: float = 1e-6,
                                 out_dtype: torch.dtype | None = None,
                                 compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``residual + norm(x * gate[gate_index])`` in compute_dtype, cast to out_dtype (default residual's).

    MAGI-1's sandwich post-norm: x (T, H), gate rows (G, H) picked per token by gate_index (T,),
    "1p" LayerNorm (weight_offset=1). With gate_index None, gate is per token (T, H).
    """
    if gate_index is None:
        g, bad = gate, None
    else:
        # An index outside [0, G) poisons its row with NaN (every backend does the same, and none of
        # them reads out of bounds); the op checks indices on the host unless told not to.
        idx = gate_index.long()
        bad = (idx < 0) | (idx >= gate.shape[0])
        g = gate[idx.clamp(0, gate.shape[0] - 1)]
    y = x.to(compute_dtype) * g.to(compute_dtype)
    y = norm_ref(y, 1, norm, weight, bias, weight_offset, eps)
    out = y + residual.to(compute_dtype)
    if bad is not None:
        out = out.masked_fill(bad[:, None], float("nan"))
    return out.to(out_dtype or residual.dtype)
