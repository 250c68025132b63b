"""Distributed attention on torch.distributed (NCCL on GPUs, gloo on CPUs), reusable by any DiT.

Every function takes this rank's contiguous shard of the packed THD sequence and the GLOBAL mask
(``q_ranges`` / ``k_ranges`` / ``attn_type_map`` exactly as for ``flex_attn_func``), works under
autograd, and returns ``(out, lse)`` for the rank's tokens.

- :func:`ulysses_attention`: all-to-all heads <-> sequence (MAGI-1's ``cp_ulysses``).
- :func:`ring_attention`: K/V shards around a ring, empty steps skipped, transfer overlapped.
- :func:`usp_attention`: Ulysses inside one mesh dimension, ring across the other.
- :func:`dispatch` / :func:`undispatch`: load-balanced chunk placement for ring attention.
- :func:`permute_mask`: a mask rewritten for any reordering of its tokens (one's own shard placement).
- :func:`seq_to_heads` / :func:`heads_to_seq`: the differentiable all-to-all under Ulysses, for callers that
  keep heads sharded across several attention calls (e.g. a KV cache that holds only this rank's heads).
- :func:`scalar_device`: where small bookkeeping tensors live for a group's backend.

See docs/distributed.md.
"""

from magi_kernels.distributed._comm import even_shard_sizes, heads_to_seq, scalar_device, seq_to_heads, shard
from magi_kernels.distributed.dispatch import (
           DispatchMeta,
           dispatch,
           permute_mask,
           plan_dispatch,
           undispatch,
)
from magi_kernels.distributed.ring import ring_attention
from magi_kernels.distributed.ulysses import ulysses_attention
from magi_kernels.distributed.usp import usp_attention

__all__ = [
           "DispatchMeta",
           "dispatch",
           "even_shard_sizes",
           "heads_to_seq",
           "permute_mask",
           "plan_dispatch",
           "ring_attention",
           "scalar_device",
           "seq_to_heads",
           "shard",
           "ulysses_attention",
           "undispatch",
           "usp_attention",
]
