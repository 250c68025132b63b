"""LayerNorm / RMSNorm with an optional weight offset: the norm both fused norm ops are defined with."""

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
