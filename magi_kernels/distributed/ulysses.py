"""Ulysses (DeepSpeed-Ulysses) context-parallel attention: trade the sequence shard for a head shard.

    out, lse = ulysses_attention(q, k, v, q_ranges, k_ranges, attn_type_map, group=cp_group)

Each rank passes its contiguous shard of the packed THD sequence (rank r holds global tokens
``[sum(sizes[:r]), sum(sizes[:r+1]))``; shards may differ in length, e.g. MAGI-1's split where the
first ``S % cp`` ranks hold one extra token). One all-to-all turns ``[S_local, H, D]`` into
``[S_total, H / cp, D]``; ``flex_attn_func`` runs over the whole sequence with the GLOBAL ranges on
this rank's heads; one all-to-all returns ``out`` and ``lse`` to token shards. This is MAGI-1's
``cp_ulysses`` (``inference/infra/parallelism/context_parallel.py``) and the Ulysses half of
xDiT's USP.

GQA: when the group has more ranks than kv heads, kv heads are repeated ``cp / Hk`` times before the
exchange (as MAGI-1 does), so each rank gets the kv head its query heads use.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from magi_kernels.distributed._args import check_call
from magi_kernels.distributed._comm import heads_to_seq, seq_to_heads
from magi_kernels.ops.flex_attn import flex_attn_func
from magi_kernels.utils.checks import fail

OP = "ulysses_attention"


def kv_heads_for_group(op: str, hq: int, hk: int, world: int) -> int:
    """How many times kv heads are repeated so they split evenly over ``world`` ranks (1 = not at all)."""
    if hq % world:
        fail(op, "q", f"must have a number of heads divisible by the group size {world} (Ulysses splits heads), "
             f"got {hq}")
    if hk % world == 0:
        return 1
    if world % hk == 0:
        return world // hk
    fail(op, "k", f"must have a number of kv heads that divides or is divisible by the group size {world} "
         f"(kv heads are repeated when the group is larger), got {hk}")


def ulysses_exchange(op: str, q, k, v, call, inner: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """seq->heads all-to-all, ``inner(qh, kh, vh)`` over the group's whole sequence, heads->seq all-to-all."""
    rep = kv_heads_for_group(op, q.shape[1], k.shape[1], call.world)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    qh, kh, vh = seq_to_heads((q, k, v), (call.q_sizes, call.k_sizes, call.k_sizes), call.rank, call.group)
    out, lse = inner(qh, kh, vh)
    out, lse = heads_to_seq((out, lse.unsqueeze(-1)), (call.q_sizes, call.q_sizes), call.rank, call.group)
    return out, lse.squeeze(-1)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_ranges: torch.Tensor,
                      k_ranges: torch.Tensor, attn_type_map: torch.Tensor | None = None, *, group=None,
                      softmax_scale: float | None = None, softcap: float = 0.0,
                      backend: str | None = None, shard_sizes=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Context-parallel ``flex_attn_func`` by head/sequence all-to-all.

    Args:
        q: this rank's query tokens [S_local_q, Hq, D]; k, v: this rank's key tokens [S_local_k, Hk, D].
            Shards are contiguous and in rank order; lengths may differ between ranks.
        q_ranges, k_ranges, attn_type_map: the GLOBAL mask (indices into the whole packed sequence),
            identical on every rank, as for ``flex_attn_func``.
        group: ProcessGroup, 1-D DeviceMesh, or None (default group). Hq must be divisible by its size;
            Hk must divide or be divisible by it.
        shard_sizes: optional ``(q_sizes, k_sizes)``, every rank's local q / k length in group-rank
            order (from the caller's token layout, or ``DispatchMeta.shard_sizes``). Without it each
            call all-gathers the lengths (one small collective, e.g. per layer); with it the call
            communicates only its data, and the caller vouches that heads and head_dim agree on all ranks.
    Returns:
        (out [S_local_q, Hq, D], lse fp32 [S_local_q, Hq]) for this rank's query tokens; differentiable.
    """
    call = check_call(OP, q, k, v, q_ranges, k_ranges, attn_type_map, softmax_scale, softcap, group,
                      shard_sizes=shard_sizes)
    if call.world == 1:
        return flex_attn_func(q, k, v, q_ranges, k_ranges, attn_type_map, softmax_scale=softmax_scale,
                              softcap=softcap, backend=backend)

    def inner(qh, kh, vh):
        return flex_attn_func(qh, kh, vh, q_ranges, k_ranges, attn_type_map, softmax_scale=softmax_scale,
                              softcap=softcap, backend=backend)

    return ulysses_exchange(OP, q, k, v, call, inner)


__all__ = ["ulysses_attention"]
