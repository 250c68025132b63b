"""Range-based attention for the DiT: MagiAttention semantics on ``magi_kernels.ops.flex_attn``.

Every attention call in MAGI-1 (block-causal self-attention over chunks with a KV cache, and
per-chunk cross-attention to that chunk's own text tokens) is expressed as a list of
``(q_range, k_range)`` pairs over packed ``[tokens, heads, head_dim]`` tensors with a FULL (no causal
flag) mask inside each pair, GQA by head mapping (q head h reads kv head h // (nh_q / nh_kv)).
The math lives in ``flex_attn_func`` (one copy, registry-dispatched backends); this module only
builds the range tensors and adapts the call.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

from magi_kernels.ops.flex_attn import flex_attn_func
from magi_kernels.ops.flex_attn_fp8 import flex_attn_fp8_func

# engine_config.attention_precision: "default" runs flex_attn in the activations' dtype; "fp8" runs the e4m3
# forward (magi_kernels' flex_attn_fp8_func: inference only). Set per DiT forward by ``attention_precision``.
ATTENTION_PRECISIONS = ("default", "fp8")
_PRECISION = contextvars.ContextVar("magi_attention_precision", default="default")


@contextlib.contextmanager
def attention_precision(precision: str):
    """Run the ``range_attention`` calls inside the block at ``precision`` (one of ATTENTION_PRECISIONS)."""
    if precision not in ATTENTION_PRECISIONS:
        raise ValueError(f"attention_precision: must be one of {ATTENTION_PRECISIONS}, got {precision!r}")
    token = _PRECISION.set(precision)
    try:
        yield
    finally:
        _PRECISION.reset(token)


def ranges_tensor(pairs, device) -> torch.Tensor:
    """int32 ``[n, 2]`` half-open ranges (what flex_attn_func expects)."""
    t = torch.tensor(pairs, dtype=torch.int32, device="cpu").reshape(-1, 2)
    return t.to(device)


def range_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_ranges: torch.Tensor,
                    k_ranges: torch.Tensor, *, softmax_scale: float | None = None) -> torch.Tensor:
    """out[q_range] = softmax(q k^T * scale) v over the union of k_ranges paired with that q_range.

    q: [Tq, hq, d]; k, v: [Tk, hk, d]; q_ranges, k_ranges: int32 [n, 2]. Rows of q covered by no
    pair are zero. Returns [Tq, hq, d] in q's dtype (MAGI-1's flash-attn path returns bf16; the
    result is then projected in fp32).
    """
    # flex_attn needs only stride(-1) == 1, so K and V may be views of the packed [K | V] cache (no copy).
    attn = flex_attn_fp8_func if _PRECISION.get() == "fp8" else flex_attn_func
    out, _lse = attn(q, k, v, q_ranges, k_ranges, softmax_scale=softmax_scale)
    return out.to(q.dtype)


__all__ = ["ranges_tensor", "range_attention", "attention_precision", "ATTENTION_PRECISIONS"]
