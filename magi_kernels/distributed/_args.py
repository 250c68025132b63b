"""Validation shared by the distributed attention functions (each error names the argument and rule)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.distributed as dist

from magi_kernels.distributed._comm import gather_sizes, resolve_group
from magi_kernels.ops.flex_attn import check_qkv, check_scalars
from magi_kernels.ranges.validate import check_ranges_meta, check_ranges_values
from magi_kernels.utils.checks import fail


@dataclasses.dataclass
class ShardedCall:
    """One validated call: group, rank/world, every rank's local q and k lengths, host copies of the ranges."""

    group: object
    rank: int
    world: int
    q_sizes: list[int]
    k_sizes: list[int]
    qr: np.ndarray
    kr: np.ndarray
    types: np.ndarray

    @property
    def q_offset(self) -> int:
        return sum(self.q_sizes[:self.rank])

    def k_offset(self, r: int) -> int:
        return sum(self.k_sizes[:r])


def check_call(op: str, q, k, v, q_ranges, k_ranges, attn_type_map, softmax_scale, softcap, group,
               group_arg: str = "group", check_values: bool = True, shard_sizes=None) -> ShardedCall:
    """Local metadata checks, every rank's local lengths, then the global range checks.

    The lengths are ``shard_sizes = (q_sizes, k_sizes)`` when the caller knows them (its token layout
    or :attr:`DispatchMeta.shard_sizes`): no communication, so a per-layer call costs no collective.
    Otherwise one small all_gather of the local lengths and head counts (which also checks that the
    heads agree across ranks; with ``shard_sizes`` the caller vouches for that).
    ``check_values=False`` when the group holds only part of the sequence (the Ulysses level of USP):
    the ring level checks the ranges against the whole sequence."""
    check_qkv(q, k, v, op)
    check_scalars(softmax_scale, softcap, op)
    check_ranges_meta(op, q_ranges, k_ranges, attn_type_map, q.device)
    pg = resolve_group(op, group, group_arg)
    world, rank = dist.get_world_size(pg), dist.get_rank(pg)
    if shard_sizes is not None:
        q_sizes, k_sizes = _check_shard_sizes(op, shard_sizes, world, rank, q.shape[0], k.shape[0])
    else:
        lens = gather_sizes([q.shape[0], k.shape[0], q.shape[1], k.shape[1], q.shape[2]], pg)
        for r, (_, _, hq, hk, d) in enumerate(lens):
            if (hq, hk, d) != (q.shape[1], k.shape[1], q.shape[2]):
                fail(op, "q", f"must have the same heads and head_dim on every rank; rank {rank} has "
                     f"(Hq={q.shape[1]}, Hk={k.shape[1]}, D={q.shape[2]}), rank {r} has (Hq={hq}, Hk={hk}, D={d})")
        q_sizes, k_sizes = [x[0] for x in lens], [x[1] for x in lens]
    if not check_values:
        return ShardedCall(pg, rank, world, q_sizes, k_sizes, None, None, None)
    qr, kr, ty = check_ranges_values(op, q_ranges, k_ranges, attn_type_map, sum(q_sizes), sum(k_sizes))
    return ShardedCall(pg, rank, world, q_sizes, k_sizes, qr.astype(np.int64), kr.astype(np.int64),
                       ty.astype(np.int64))


def _check_shard_sizes(op: str, shard_sizes, world: int, rank: int, s_q: int, s_k: int):
    try:
        q_sizes, k_sizes = ([int(n) for n in sizes] for sizes in shard_sizes)
    except (TypeError, ValueError):
        fail(op, "shard_sizes", "must be a pair (q_sizes, k_sizes) of integer sequences, one length per rank of "
             f"the group, got {shard_sizes!r}")
    for name, sizes, local in (("q_sizes", q_sizes, s_q), ("k_sizes", k_sizes, s_k)):
        if len(sizes) != world or min(sizes) < 0:
            fail(op, "shard_sizes", f"{name} must hold {world} non-negative lengths (one per rank of the group), "
                 f"got {sizes}")
        if sizes[rank] != local:
            fail(op, "shard_sizes", f"{name}[{rank}] must equal this rank's {name[0]} length {local}, got "
                 f"{sizes[rank]}")
    return q_sizes, k_sizes


def ranges_tensors(s, device="cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    qr, kr, ty = s
    return (torch.as_tensor(qr, dtype=torch.int32).reshape(-1, 2).to(device),
            torch.as_tensor(kr, dtype=torch.int32).reshape(-1, 2).to(device),
            torch.as_tensor(ty, dtype=torch.int32).reshape(-1).to(device))
