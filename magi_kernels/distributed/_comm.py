"""torch.distributed plumbing shared by the distributed attention functions.

Only stock primitives are used (``all_gather``, ``all_to_all_single``, ``batch_isend_irecv``);
the autograd Functions here exist so that each collective's backward is one node whose order is
the same on every rank (several independent collective nodes could be run in a different order by
the autograd engine on different ranks and pair the wrong messages).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from magi_kernels.utils.checks import fail


def resolve_group(op: str, group, arg: str = "group"):
    """A ProcessGroup, a 1-D DeviceMesh (e.g. ``mesh["ulysses"]``), or None (the default group)."""
    if not dist.is_available() or not dist.is_initialized():
        fail(op, arg, "needs torch.distributed to be initialized (dist.init_process_group) before the call")
    if group is None:
        return dist.group.WORLD
    if isinstance(group, dist.ProcessGroup):
        return group
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover - torch without DeviceMesh
        DeviceMesh = ()
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            fail(op, arg, f"must be a 1-D DeviceMesh (select a dimension: mesh['name']), got {group.ndim}-D")
        return group.get_group()
    fail(op, arg, f"must be a ProcessGroup, a 1-D DeviceMesh or None, got {type(group).__name__}")


def even_shard_sizes(total: int, world: int) -> list[int]:
    """MAGI-1's token split: ``total // world`` each, the first ``total % world`` ranks one more."""
    base, extra = divmod(int(total), int(world))
    return [base + (1 if r < extra else 0) for r in range(world)]


def shard(x: torch.Tensor, rank: int, world: int, dim: int = 0) -> torch.Tensor:
    """This rank's contiguous piece of ``x`` along ``dim`` under :func:`even_shard_sizes`."""
    sizes = even_shard_sizes(x.shape[dim], world)
    return x.narrow(dim, sum(sizes[:rank]), sizes[rank])


def scalar_device(group=None) -> torch.device:
    """Where small bookkeeping tensors must live for ``group``'s backend (NCCL moves only CUDA tensors)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_sizes(values: Sequence[int], group) -> list[list[int]]:
    """All ranks' small integer vectors (e.g. local sequence lengths), in group-rank order."""
    world = dist.get_world_size(group)
    mine = torch.tensor(list(values), dtype=torch.int64, device=scalar_device(group))
    out = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(out, mine, group=group)
    return [o.tolist() for o in out]


def global_rank(group, group_rank: int) -> int:
    return dist.get_global_rank(group, group_rank) if group is not dist.group.WORLD else group_rank


# ---------------------------------------------------------------------------------------------------
# Sequence <-> head exchange (Ulysses): [S_local, H, D] <-> [S_total, H / world, D].

def _seq_to_heads(x: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    world = len(sizes)
    s_local, h, d = x.shape
    hw = h // world
    send = x.reshape(s_local, world, hw, d).transpose(0, 1).reshape(world * s_local, hw, d)  # head group major
    recv = x.new_empty((sum(sizes), hw, d))
    dist.all_to_all_single(recv, send.contiguous(), list(sizes), [s_local] * world, group=group)
    return recv


def _heads_to_seq(y: torch.Tensor, sizes: Sequence[int], rank: int, group) -> torch.Tensor:
    world = len(sizes)
    _, hw, d = y.shape
    s_local = sizes[rank]
    recv = y.new_empty((world * s_local, hw, d))
    dist.all_to_all_single(recv, y.contiguous(), [s_local] * world, list(sizes), group=group)
    return recv.view(world, s_local, hw, d).transpose(0, 1).reshape(s_local, world * hw, d)


class _Exchange(torch.autograd.Function):
    """Seq->heads (``to_heads``) or heads->seq for several tensors, one autograd node, fixed order.

    ``sizes[i]`` are the per-rank sequence lengths of tensor ``i``."""

    @staticmethod
    def forward(ctx, to_heads: bool, sizes, rank: int, group, *xs):
        ctx.cfg = (to_heads, sizes, rank, group)
        ctx.out_meta = []
        outs = []
        for x, sz in zip(xs, sizes):
            o = _seq_to_heads(x, sz, group) if to_heads else _heads_to_seq(x, sz, rank, group)
            ctx.out_meta.append((o.shape, o.dtype, o.device))
            outs.append(o)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        to_heads, sizes, rank, group = ctx.cfg
        res = []
        for g, sz, (shape, dtype, device) in zip(grads, sizes, ctx.out_meta):
            g = torch.zeros(shape, dtype=dtype, device=device) if g is None else g.contiguous()
            res.append(_heads_to_seq(g, sz, rank, group) if to_heads else _seq_to_heads(g, sz, group))
        return (None, None, None, None, *res)


def seq_to_heads(xs: Sequence[torch.Tensor], sizes: Sequence[Sequence[int]], rank: int,
                 group) -> tuple[torch.Tensor, ...]:
    """[S_local, H, D] shards -> [S_total, H/world, D] (this rank's head group, all tokens); differentiable.

    ``sizes[i]``: every rank's local length of ``xs[i]``."""
    return _Exchange.apply(True, [list(s) for s in sizes], rank, group, *xs)


def heads_to_seq(ys: Sequence[torch.Tensor], sizes: Sequence[Sequence[int]], rank: int,
                 group) -> tuple[torch.Tensor, ...]:
    """Inverse of :func:`seq_to_heads`; differentiable."""
    return _Exchange.apply(False, [list(s) for s in sizes], rank, group, *ys)


# ---------------------------------------------------------------------------------------------------
# Ring step: send to the next rank, receive from the previous one, asynchronously.

class RingShift:
    """Started on construction; :meth:`wait` returns the received tensor (``None`` when nothing was posted)."""

    def __init__(self, send: torch.Tensor | None, recv_shape, group, tag: int = 0):
        self.recv = None
        self.works = []
        if send is None:
            return
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        self.recv = send.new_empty(recv_shape)
        self.send = send.contiguous()  # kept alive until wait()
        nxt, prv = global_rank(group, (rank + 1) % world), global_rank(group, (rank - 1) % world)
        ops = [dist.P2POp(dist.isend, self.send, nxt, group, tag),
               dist.P2POp(dist.irecv, self.recv, prv, group, tag)]
        self.works = dist.batch_isend_irecv(ops)

    def wait(self) -> torch.Tensor | None:
        for w in self.works:
            w.wait()
        self.works = []
        return self.recv
