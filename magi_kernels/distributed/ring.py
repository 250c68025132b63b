"""Ring context-parallel attention: K/V shards travel around the group, queries stay put.

    out, lse = ring_attention(q, k, v, q_ranges, k_ranges, attn_type_map, group=cp_group)

Step ``s`` (0 .. cp-1): rank r holds the K/V shard of rank ``(r - s) % cp``, computes a partial
``(out, lse)`` with ``flex_attn_func`` on the part of the GLOBAL mask inside (its query rows x that
shard's keys), and merges it into its running result (``merge_attn_states`` in fp32). Steps whose
part of the mask is empty are skipped (block-causal masks leave many). The next shard's
send/receive (``batch_isend_irecv``) is posted before the step's compute, so on GPUs with async
P2P the transfer hides behind the attention.

Backward runs the ring again: with the final ``out`` and ``lse`` each shard's contribution to
dQ/dK/dV is independent (dS = P * (dP - rowsum(dO * O) + dlse), P from the global lse), so each
step calls the flex attention backward op on its part of the mask; dK/dV accumulators (fp32)
travel with the shard and arrive home after one extra hop.

Unlike Ulysses it needs no head divisibility and moves only K/V (ring P2P suits PCIe cards);
shards are contiguous in rank order and may have different lengths on each rank.
"""

from __future__ import annotations

import torch

from magi_kernels.distributed._args import check_call, ranges_tensors
from magi_kernels.distributed._comm import RingShift
from magi_kernels.distributed._slices import clip_slices, shift_slices
from magi_kernels.ops.flex_attn import flex_attn_func, merge_attn_states
from magi_kernels.reference.flex_attn import default_scale

OP = "ring_attention"
_KV_TAG, _GRAD_TAG = 11, 12


def ring_step_ranges(call) -> list:
    """Per step, this rank's part of the mask in local coordinates (q rows, src shard keys), or None if empty."""
    q0, q1 = call.q_offset, call.q_offset + call.q_sizes[call.rank]
    steps = []
    for s in range(call.world):
        src = (call.rank - s) % call.world
        k0 = call.k_offset(src)
        part = clip_slices(call.qr, call.kr, call.types, q0, q1, k0, k0 + call.k_sizes[src])
        steps.append(ranges_tensors(shift_slices(part, -q0, -k0)) if len(part[2]) else None)
    return steps


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, call, steps, scale, softcap, backend):
        d, world, rank = q.shape[2], call.world, call.rank
        kv = torch.cat([k, v], dim=-1).contiguous()  # one message per hop: [S_k, Hk, 2D]
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
        for s in range(world):
            nxt_src = (rank - s - 1) % world
            shift = RingShift(kv if s < world - 1 else None, (call.k_sizes[nxt_src],) + kv.shape[1:], call.group,
                              _KV_TAG)
            if steps[s] is not None:
                o_s, l_s = flex_attn_func(q, kv[..., :d], kv[..., d:], *steps[s], softmax_scale=scale,
                                          softcap=softcap, backend=backend)
                out, lse = merge_attn_states(out, lse, o_s.float(), l_s)
            if s < world - 1:
                kv = shift.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cfg = (call, steps, scale, softcap, backend)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        call, steps, scale, softcap, backend = ctx.cfg
        d, world, rank = q.shape[2], call.world, call.rank
        dout = dout.contiguous()
        dlse = None if dlse is None else dlse.contiguous().float()
        kv = torch.cat([k, v], dim=-1).contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        pending = None  # the dK/dV accumulator of this step's shard, arriving from the previous rank
        for s in range(world):
            nxt_src = (rank - s - 1) % world
            shift = RingShift(kv if s < world - 1 else None, (call.k_sizes[nxt_src],) + kv.shape[1:], call.group,
                              _KV_TAG)
            contrib = None
            if steps[s] is not None:
                dq_s, dk_s, dv_s = torch.ops.magi_kernels.flex_attn_bwd(
                    dout, q, kv[..., :d], kv[..., d:], out, lse, dlse, *steps[s], scale, softcap, False, backend)
                dq += dq_s.float()
                contrib = torch.cat([dk_s, dv_s], dim=-1).float()
            acc = (torch.zeros(kv.shape, dtype=torch.float32, device=kv.device) if pending is None
                   else pending.wait())
            if contrib is not None:
                acc = acc + contrib
            # pass the accumulator on with its shard; after the last step it travels home (one hop).
            pending = RingShift(acc, (call.k_sizes[nxt_src],) + kv.shape[1:], call.group, _GRAD_TAG)
            if s < world - 1:
                kv = shift.wait()
        dkv = pending.wait()
        return dq.to(q.dtype), dkv[..., :d].to(k.dtype), dkv[..., d:].to(v.dtype), None, None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_ranges: torch.Tensor, k_ranges: torch.Tensor,
                   attn_type_map: torch.Tensor | None = None, *, group=None, softmax_scale: float | None = None,
                   softcap: float = 0.0, backend: str | None = None,
                   shard_sizes=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Context-parallel ``flex_attn_func`` by passing K/V shards around a ring.

    Args: as :func:`magi_kernels.distributed.ulysses_attention` (local contiguous shards, GLOBAL ranges,
        optional ``shard_sizes``), without any head-count condition.
    Returns:
        (out [S_local_q, Hq, D], lse fp32 [S_local_q, Hq]) for this rank's query tokens; differentiable.
    """
    call = check_call(OP, q, k, v, q_ranges, k_ranges, attn_type_map, softmax_scale, softcap, group,
                      shard_sizes=shard_sizes)
    if call.world == 1:
        return flex_attn_func(q, k, v, q_ranges, k_ranges, attn_type_map, softmax_scale=softmax_scale,
                              softcap=softcap, backend=backend)
    scale = default_scale(q.shape[2]) if softmax_scale is None else float(softmax_scale)
    return _RingAttention.apply(q, k, v, call, ring_step_ranges(call), scale, float(softcap), backend)


__all__ = ["ring_attention", "ring_step_ranges"]
