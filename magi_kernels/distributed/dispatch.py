"""Load-balanced dispatch of a sequence over context-parallel ranks, for ring attention.

    x_local, meta = dispatch(x, mask, group=cp_group, chunk_size=256)
    out, lse = ring_attention(q_local, k_local, v_local, meta.q_ranges, meta.k_ranges, meta.attn_type_map,
                              group=cp_group)
    y = undispatch(out, meta, group=cp_group)

Contiguous shards give causal-like masks very unequal work per rank (the last shard's queries see
the most keys). Dispatch cuts the query sequence into chunks of ``chunk_size`` tokens, measures each
chunk's attention work (its unmasked area), and assigns chunks to ranks greedily, largest first, to
the rank with the least work so far that still has room (a min-heap; every rank gets the same number
of chunks, the first ``n % cp`` one more), which is the idea of MagiAttention's dispatch solver
(``magi_attention/meta/solver/dispatch_solver.py``). Each rank's chunks are concatenated in
ascending order; ranks follow each other, so in the *dispatched* order every rank holds one
contiguous shard and the mask, rewritten into dispatched coordinates (``meta.q_ranges`` ...), is
exactly what :func:`ring_attention` takes.

Self-attention without a prefix (``total_k == total_q``): keys are permuted like queries, so one
dispatched tensor feeds q, k and v. Otherwise (e.g. keys = KV-cache prefix + current tokens) keys
stay in their natural order and are split evenly (``dispatch(k, meta, group=..., side="k")``).

Both directions are differentiable and treat the global tensor as one replicated value: dispatch's
backward gathers the gradient from all ranks, undispatch's backward keeps the local part.
"""

from __future__ import annotations

import dataclasses
import heapq

import numpy as np
import torch
import torch.distributed as dist

from magi_kernels.distributed._args import ranges_tensors
from magi_kernels.distributed._comm import even_shard_sizes, resolve_group
from magi_kernels.distributed._slices import clip_slices, permute_slices
from magi_kernels.plan.stats import union_area
from magi_kernels.ranges.validate import validate_ranges
from magi_kernels.utils.checks import fail

OP = "dispatch"


@dataclasses.dataclass(frozen=True)
class DispatchMeta:
    """Where every chunk went and the mask in dispatched coordinates (identical on every rank)."""

    world: int
    chunk_size: int
    total_q: int
    total_k: int
    owner: tuple[int, ...]  # rank of each query chunk
    q_perm: torch.Tensor  # int64 [total_q]: dispatched position i holds original token q_perm[i]
    k_perm: torch.Tensor  # int64 [total_k]
    q_sizes: tuple[int, ...]  # tokens per rank
    k_sizes: tuple[int, ...]
    areas: tuple[int, ...]  # unmasked attention cells per rank (its queries' rows)
    q_ranges: torch.Tensor  # the mask in dispatched coordinates (int32, CPU)
    k_ranges: torch.Tensor
    attn_type_map: torch.Tensor

    @property
    def keys_follow_queries(self) -> bool:
        return self.total_k == self.total_q

    @property
    def balance(self) -> float:
        """max / mean attention area over ranks (1.0 = perfect)."""
        mean = sum(self.areas) / len(self.areas)
        return float("inf") if mean == 0 else max(self.areas) / mean

    @property
    def shard_sizes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(q_sizes, k_sizes)``: the dispatched tensors' lengths per rank, the attention functions'
        ``shard_sizes`` (no length exchange per call)."""
        return self.q_sizes, self.k_sizes

    def sizes(self, side: str) -> tuple[int, ...]:
        return self.q_sizes if side == "q" else self.k_sizes

    def perm(self, side: str) -> torch.Tensor:
        return self.q_perm if side == "q" else self.k_perm


def _as_slices(ranges_or_mask, total_q: int | None, total_k: int | None):
    if hasattr(ranges_or_mask, "to_ranges"):
        mask = ranges_or_mask
        qr, kr, ty = mask.to_ranges("cpu")
        total_q, total_k = mask.total_q, mask.total_k
    else:
        try:
            qr, kr, ty = ranges_or_mask
        except (TypeError, ValueError):
            fail(OP, "ranges_or_mask", "must be a mask (e.g. BlockCausal, Magi1WindowMask) or a tuple "
                 "(q_ranges, k_ranges, attn_type_map)")
        if total_q is None:
            fail(OP, "total_q", "is required when ranges are given as tensors")
        total_k = total_q if total_k is None else total_k
    qr, kr, ty = validate_ranges(qr, kr, ty, total_q=total_q, total_k=total_k, op=OP)
    return (qr.astype(np.int64), kr.astype(np.int64), ty.astype(np.int64)), int(total_q), int(total_k)


def plan_dispatch(ranges_or_mask, world: int, chunk_size: int, *, total_q: int | None = None,
                  total_k: int | None = None) -> DispatchMeta:
    """The dispatch solution (pure host arithmetic; no communication)."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        fail(OP, "world", f"must be an int >= 1, got {world!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        fail(OP, "chunk_size", f"must be an int >= 1, got {chunk_size!r}")
    sl, tq, tk = _as_slices(ranges_or_mask, total_q, total_k)
    n_chunks = -(-tq // chunk_size)
    if n_chunks < world:
        fail(OP, "chunk_size", f"gives {n_chunks} chunks for {tq} tokens, fewer than the {world} ranks; use a "
             f"chunk_size <= {max(1, tq // world)}")
    bounds = [(c * chunk_size, min(tq, (c + 1) * chunk_size)) for c in range(n_chunks)]
    chunk_parts = [clip_slices(*sl, a, b, 0, tk) for a, b in bounds]
    chunk_area = [union_area(*p) if len(p[2]) else 0 for p in chunk_parts]

    # Greedy: largest chunk first onto the least-loaded rank that still has room.
    room = even_shard_sizes(n_chunks, world)
    heap = [(0, r) for r in range(world)]
    owner = [0] * n_chunks
    for c in sorted(range(n_chunks), key=lambda c: (-chunk_area[c], c)):
        load, r = heapq.heappop(heap)
        while room[r] == 0:
            load, r = heapq.heappop(heap)
        owner[c] = r
        room[r] -= 1
        heapq.heappush(heap, (load + chunk_area[c], r))
    order = sorted(range(n_chunks), key=lambda c: (owner[c], c))
    new_start, pos = [0] * n_chunks, 0
    for c in order:
        new_start[c] = pos
        pos += bounds[c][1] - bounds[c][0]
    q_perm = torch.cat([torch.arange(*bounds[c]) for c in order])
    q_sizes = tuple(sum(bounds[c][1] - bounds[c][0] for c in range(n_chunks) if owner[c] == r) for r in range(world))
    areas = tuple(sum(chunk_area[c] for c in range(n_chunks) if owner[c] == r) for r in range(world))

    follow = tk == tq
    q_segments = [(bounds[c][0], bounds[c][1] - bounds[c][0]) for c in order]
    remapped = permute_slices(sl, q_segments, q_segments if follow else [(0, tk)])
    qr, kr, ty = ranges_tensors(remapped)
    k_perm = q_perm if follow else torch.arange(tk)
    k_sizes = q_sizes if follow else tuple(even_shard_sizes(tk, world))
    return DispatchMeta(world, chunk_size, tq, tk, tuple(owner), q_perm, k_perm, q_sizes, k_sizes, areas, qr, kr, ty)


def _check_segments(arg: str, segments) -> tuple[tuple[int, int], ...]:
    """``(original_start, length)`` runs that together reorder tokens ``[0, total)``: each token exactly once."""
    try:
        segs = tuple((int(a), int(n)) for a, n in segments)
    except (TypeError, ValueError):
        fail("permute_mask", arg, "must be a sequence of (original_start, length) pairs of ints")
    if any(n < 0 or a < 0 for a, n in segs):
        fail("permute_mask", arg, "must have non-negative starts and lengths")
    covered, end = sorted((a, a + n) for a, n in segs if n), 0
    for a, b in covered:
        if a != end:
            rule = "overlaps another" if a < end else f"leaves tokens [{end}, {a}) out"
            fail("permute_mask", arg, f"must cover [0, total) exactly once: the run starting at {a} {rule}")
        end = b
    return segs


def permute_mask(q_ranges, k_ranges, attn_type_map, *, q_segments, k_segments):
    """The mask ``(q_ranges, k_ranges, attn_type_map)`` rewritten for reordered tokens.

    ``q_segments`` / ``k_segments``: ``(original_start, length)`` runs of query rows / keys in their new
    order; each side must be a permutation of its tokens (every token exactly once). Returns int32 CPU
    tensors ``(q_ranges, k_ranges, attn_type_map)`` describing exactly the same (row, key) cells in the new
    coordinates, ready for ``flex_attn_func`` or the distributed attention functions. Dispatch uses the
    same rewrite; a caller with its own token placement (e.g. rank-major pieces of every chunk) uses this.
    """
    q_segs, k_segs = _check_segments("q_segments", q_segments), _check_segments("k_segments", k_segments)
    total_q, total_k = sum(n for _, n in q_segs), sum(n for _, n in k_segs)
    sl = validate_ranges(q_ranges, k_ranges, attn_type_map, total_q=total_q, total_k=total_k, op="permute_mask")
    return ranges_tensors(permute_slices(tuple(np.asarray(x, np.int64) for x in sl), q_segs, k_segs))


def _local_index(meta: DispatchMeta, side: str, rank: int) -> torch.Tensor:
    sizes = meta.sizes(side)
    start = sum(sizes[:rank])
    return meta.perm(side)[start:start + sizes[rank]]


def _gather_global(x_local: torch.Tensor, meta: DispatchMeta, side: str, group, rank: int) -> torch.Tensor:
    sizes = meta.sizes(side)
    longest = max(sizes)
    pad = x_local.new_zeros((longest - x_local.shape[0],) + tuple(x_local.shape[1:]))
    parts = [torch.empty((longest,) + tuple(x_local.shape[1:]), dtype=x_local.dtype, device=x_local.device)
             for _ in sizes]
    dist.all_gather(parts, torch.cat([x_local, pad]).contiguous(), group=group)
    dispatched = torch.cat([p[:n] for p, n in zip(parts, sizes)])
    out = torch.empty_like(dispatched)
    out[meta.perm(side).to(out.device)] = dispatched
    return out


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, meta, side, group, rank):
        ctx.cfg = (meta, side, group, rank)
        return x.index_select(0, _local_index(meta, side, rank).to(x.device))

    @staticmethod
    def backward(ctx, g):
        meta, side, group, rank = ctx.cfg
        return _gather_global(g.contiguous(), meta, side, group, rank), None, None, None, None


class _Undispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local, meta, side, group, rank):
        ctx.cfg = (meta, side, group, rank)
        return _gather_global(x_local.contiguous(), meta, side, group, rank)

    @staticmethod
    def backward(ctx, g):
        meta, side, group, rank = ctx.cfg
        return g.index_select(0, _local_index(meta, side, rank).to(g.device)), None, None, None, None


def _check_side(side: str) -> None:
    if side not in ("q", "k"):
        fail(OP, "side", f"must be 'q' (queries / self-attention tokens) or 'k' (keys), got {side!r}")


def dispatch(x: torch.Tensor, ranges_or_mask, *, group=None, chunk_size: int | None = None,
             total_k: int | None = None, side: str = "q") -> tuple[torch.Tensor, DispatchMeta]:
    """This rank's load-balanced part of the global sequence ``x`` [total, ...] and the dispatch metadata.

    Args:
        x: the whole sequence (the same on every rank), tokens along dim 0.
        ranges_or_mask: a mask object (``BlockCausal``, ``Magi1WindowMask``, ...), a tuple
            ``(q_ranges, k_ranges, attn_type_map)`` (then ``total_q = x.shape[0]``; ``total_k`` defaults
            to it), or a :class:`DispatchMeta` from an earlier call (reuse it for k and v).
        chunk_size: dispatch granularity in tokens (required unless a DispatchMeta is passed).
        side: "q" for queries (and self-attention keys when total_k == total_q), "k" for keys otherwise.
    Returns:
        (x_local [tokens of this rank, ...], meta); ``meta.q_ranges`` ... feed :func:`ring_attention`.
    """
    _check_side(side)
    pg = resolve_group(OP, group)
    world, rank = dist.get_world_size(pg), dist.get_rank(pg)
    if isinstance(ranges_or_mask, DispatchMeta):
        meta = ranges_or_mask
        if meta.world != world:
            fail(OP, "ranges_or_mask", f"is a DispatchMeta for {meta.world} ranks, the group has {world}")
    else:
        if chunk_size is None:
            fail(OP, "chunk_size", "is required unless a DispatchMeta is passed")
        meta = plan_dispatch(ranges_or_mask, world, chunk_size, total_q=x.shape[0] if side == "q" else None,
                             total_k=total_k)
    total = meta.total_q if side == "q" else meta.total_k
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] != total:
        fail(OP, "x", f"must hold the whole sequence ({total} tokens on dim 0 for side={side!r}), "
             f"got shape {list(getattr(x, 'shape', []))}")
    return _Dispatch.apply(x, meta, side, pg, rank), meta


def undispatch(x_local: torch.Tensor, meta: DispatchMeta, *, group=None, side: str = "q") -> torch.Tensor:
    """Inverse of :func:`dispatch`: every rank gets the whole sequence back in the original order."""
    _check_side(side)
    pg = resolve_group("undispatch", group)
    world, rank = dist.get_world_size(pg), dist.get_rank(pg)
    if not isinstance(meta, DispatchMeta) or meta.world != world:
        fail("undispatch", "meta", f"must be the DispatchMeta of this group's dispatch ({world} ranks)")
    n = meta.sizes(side)[rank]
    if not isinstance(x_local, torch.Tensor) or x_local.dim() < 1 or x_local.shape[0] != n:
        fail("undispatch", "x_local", f"must have this rank's {n} dispatched tokens on dim 0, "
             f"got shape {list(getattr(x_local, 'shape', []))}")
    return _Undispatch.apply(x_local, meta, side, pg, rank)


__all__ = ["DispatchMeta", "dispatch", "permute_mask", "plan_dispatch", "undispatch"]
