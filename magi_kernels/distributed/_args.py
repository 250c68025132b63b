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
               group_arg: str = "group", check_values: bool = True) -> ShardedCall:
    """Local metadata checks, then one small all_gather of the local lengths, then the global range checks.

    ``check_values=False`` when the group holds only part of the sequence (the Ulysses level of USP):
    the ring level checks the ranges against the whole sequence."""
    check_qkv(q, k, v, op)
    check_scalars(softmax_scale, softcap, op)
    check_ranges_meta(op, q_ranges, k_ranges, attn_type_map, q.device)
    pg = resolve_group(op, group, group_arg)
    world, rank = dist.get_world_size(pg), dist.get_rank(pg)
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


def ranges_tensors(s, device="cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    qr, kr, ty = s
    return (torch.as_tensor(qr, dtype=torch.int32).reshape(-1, 2).to(device),
            torch.as_tensor(kr, dtype=torch.int32).reshape(-1, 2).to(device),
            torch.as_tensor(ty, dtype=torch.int32).reshape(-1).to(device))
