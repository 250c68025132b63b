"""The (out, lse) attention contract of xDiT, yunchang and ring / Ulysses sequence parallelism.

Those libraries compute attention one K/V shard at a time with a FlashAttention-style forward

    out, lse = attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                            return_softmax)

(q [B, Sq, H, D], k/v [B, Sk, Hk, D]; out like q; lse fp32 [B, H, Sq], natural log) and combine the
partial results of disjoint key shards with a logsumexp merge. :func:`attn_forward` has that signature
(positional order included, as in yunchang's ``yunchang/kernels/attention.py`` ``flash_attn_forward``)
and runs ``magi_kernels.attention``; it is differentiable in both outputs, so a ring step's backward can
go through autograd. :func:`merge_out_lse` is ``merge_attn_states`` in this layout.

Options FlashAttention has and these kernels do not (dropout, ALiBi, returning the probabilities)
raise instead of being ignored.
"""

from __future__ import annotations

from typing import Optional

import torch

from magi_kernels.ops.attention import attention
from magi_kernels.ops.flex_attn import merge_attn_states
from magi_kernels.ranges.masks import SlidingWindow, VarlenCausal, _MaskBase
from magi_kernels.utils.checks import check_tensor, fail

OP = "xdit.attn_forward"


def _fa_mask(sq: int, sk: int, causal: bool, window_size) -> Optional[_MaskBase]:
    """FlashAttention's causal / window_size for one sample as a typed mask (None = full)."""
    try:
        left, right = (int(x) for x in window_size)
    except (TypeError, ValueError):
        fail(OP, "window_size", f"must be a pair (left, right) of ints, -1 = unbounded; got {window_size!r}")
    if causal:
        right = 0
    if (left, right) == (-1, -1):
        return None
    if (left, right) == (-1, 0) and causal:
        return VarlenCausal((0, sq), (0, sk))  # bottom-right aligned when sq != sk, as FlashAttention 2
    if sq != sk:
        fail(OP, "window_size", f"with a bounded window needs as many queries as keys per shard, got {sq} and {sk}")
    return SlidingWindow((0, sq), left=left, right=right)


def attn_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                 softmax_scale: Optional[float] = None, causal: bool = False, window_size=(-1, -1),
                 softcap: Optional[float] = None, alibi_slopes: Optional[torch.Tensor] = None,
                 return_softmax: bool = False, *, mask: Optional[_MaskBase] = None,
                 backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-style forward returning ``(out [B, Sq, H, D], lse fp32 [B, H, Sq])``.

    ``mask`` (keyword only, not part of the FlashAttention signature) takes any magi_kernels mask for one
    sample or the whole batch instead of ``causal`` / ``window_size``.
    """
    if dropout_p:
        fail(OP, "dropout_p", f"must be 0 (attention dropout is not implemented), got {dropout_p}")
    if alibi_slopes is not None:
        fail(OP, "alibi_slopes", "must be None (ALiBi is not implemented)")
    if return_softmax:
        fail(OP, "return_softmax", "must be False (the kernels never materialise the probabilities)")
    check_tensor(OP, "q", q, ndim=4)
    check_tensor(OP, "k", k, ndim=4)
    fa_mask = _fa_mask(q.shape[1], k.shape[1], bool(causal), window_size)
    if mask is not None and fa_mask is not None:
        fail(OP, "mask", "must not be combined with causal=True or a bounded window_size")
    return attention(q, k, v, mask=mask if mask is not None else fa_mask, layout="bshd", scale=softmax_scale,
                     softcap=float(softcap or 0.0), return_lse=True, backend=backend)


def merge_out_lse(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                  lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial results over disjoint key sets, in this layout (out [B, S, H, D], lse [B, H, S]).

    Thin layout adapter over ``merge_attn_states``; differentiable; empty shards (lse -inf) drop out.
    """
    op = "xdit.merge_out_lse"
    check_tensor(op, "out_a", out_a, ndim=4)
    check_tensor(op, "lse_a", lse_a, ndim=3)
    b, s, h, d = out_a.shape
    if tuple(lse_a.shape) != (b, h, s):
        fail(op, "lse_a", f"must have shape [{b}, {h}, {s}] ([B, H, S] for out [B, S, H, D]), got {list(lse_a.shape)}")
    if tuple(lse_b.shape) != tuple(lse_a.shape):
        fail(op, "lse_b", f"must have lse_a's shape {list(lse_a.shape)}, got {list(lse_b.shape)}")
    if tuple(out_b.shape) != tuple(out_a.shape):
        fail(op, "out_b", f"must have out_a's shape {list(out_a.shape)}, got {list(out_b.shape)}")

    def tokens(lse):  # [B, H, S] -> [B*S, H]
        return lse.transpose(1, 2).reshape(b * s, h)

    out, lse = merge_attn_states(out_a.reshape(b * s, h, d), tokens(lse_a), out_b.reshape(b * s, h, d), tokens(lse_b))
    return out.view(b, s, h, d), lse.view(b, s, h).transpose(1, 2).contiguous()
