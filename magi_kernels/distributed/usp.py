"""Hybrid Ulysses x ring attention ("USP", the unified sequence parallelism of yunchang/xDiT).

    mesh = init_device_mesh(device, (ring, ulysses), mesh_dim_names=("ring", "ulysses"))
    out, lse = usp_attention(q, k, v, q_ranges, k_ranges, types,
                             ulysses_group=mesh["ulysses"], ring_group=mesh["ring"])

The sequence is sharded over all ``ring * ulysses`` ranks in rank order, with the ulysses dimension
innermost (rank = ring_index * ulysses + ulysses_index, what the mesh above gives). Inside each
ulysses group an all-to-all gathers the group's contiguous block of tokens and scatters heads
(fast links, e.g. NVLink within a node); the blocks then travel around the ring group (slower links
between nodes or PCIe cards), and a final all-to-all returns the tokens. Heads must divide by the
ulysses size only.
"""

from __future__ import annotations

import torch

from magi_kernels.distributed._args import check_call
from magi_kernels.distributed.ring import ring_attention
from magi_kernels.distributed.ulysses import ulysses_exchange

OP = "usp_attention"


def usp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_ranges: torch.Tensor, k_ranges: torch.Tensor,
                  attn_type_map: torch.Tensor | None = None, *, ulysses_group, ring_group,
                  softmax_scale: float | None = None, softcap: float = 0.0,
                  backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ulysses all-to-all inside ``ulysses_group``, ring attention across ``ring_group``.

    Args: as :func:`magi_kernels.distributed.ulysses_attention`; ``ulysses_group`` / ``ring_group`` are
        ProcessGroups or 1-D DeviceMeshes (the two dimensions of a 2-D mesh).
    Returns:
        (out [S_local_q, Hq, D], lse fp32 [S_local_q, Hq]) for this rank's query tokens; differentiable.
    """
    call = check_call(OP, q, k, v, q_ranges, k_ranges, attn_type_map, softmax_scale, softcap, ulysses_group,
                      "ulysses_group", check_values=False)

    def inner(qh, kh, vh):
        return ring_attention(qh, kh, vh, q_ranges, k_ranges, attn_type_map, group=ring_group,
                              softmax_scale=softmax_scale, softcap=softcap, backend=backend)

    if call.world == 1:
        return inner(q, k, v)
    return ulysses_exchange(OP, q, k, v, call, inner)


__all__ = ["usp_attention"]
