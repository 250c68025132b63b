"""Definition of gated_post_norm_residual: ``residual + norm(x * gate[gate_index])``, MAGI-1's sandwich post-norm."""

from __future__ import annotations

import torch

from magi_kernels.reference.norm import norm_ref


def gated_post_norm_residual_ref(x: torch.Tensor, gate: torch.Tensor, residual: torch.Tensor,
                                 weight=None, bias=None, gate_index: torch.Tensor | None = None, *,
                                 norm: str, weight_offset: float, eps: float = 1e-6,
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
