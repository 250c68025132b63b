"""Context parallelism for one MAGI-1 DiT forward: which tokens a rank holds, and its self-attention.

The embedding stage runs on every rank (a patchify conv and small MLPs); each rank then keeps its
tokens of ``h``, of the rope tables and of the per-token gate rows, runs every layer on them, and the
layer outputs are gathered before the final norm / linear / unpatchify (MAGI-1's
``inference/infra/parallelism/context_parallel.py`` shards ``x``, the condition map and rope the same
way). Cross-attention is local: each token attends to its own chunk's caption.

Token layouts (per batch element, S = R chunks x n tokens):

- ``cp_ulysses``: rank r holds ``[sum(sizes[:r]), sum(sizes[:r+1]))`` with MAGI-1's split (the first
  ``S % cp`` ranks one token more). Self-attention: all-to-all to (all tokens, 1/cp of the heads);
  the KV cache holds every token of this rank's kv heads; ``flex_attn`` on the global ranges;
  all-to-all back.
- ``cp_shuffle_overlap``: rank r holds piece r of EVERY chunk (chunk j, offsets
  ``[off_r, off_r + n_r)``), so every rank has the same share of every chunk and of the block-causal
  work. Self-attention: ring attention (K/V shards passed rank to rank, next transfer posted before
  the current step computes). The KV cache holds this rank's pieces of every cached chunk, all heads.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from magi_kernels.distributed import even_shard_sizes, heads_to_seq, permute_mask, ring_attention, seq_to_heads
from magi_kernels.distributed.ulysses import kv_heads_for_group
from magi_model.dit import local_self_attention


@dataclasses.dataclass
class TokenLayout:
    """Which of a forward's S tokens (per batch element) each cp rank holds, in local order."""

    index: list[torch.Tensor]  # per rank: int64 positions in [0, S)
    S: int

    @property
    def sizes(self) -> list[int]:
        return [len(i) for i in self.index]

    @classmethod
    def contiguous(cls, S: int, world: int) -> TokenLayout:
        sizes, out, pos = even_shard_sizes(S, world), [], 0
        for n in sizes:
            out.append(torch.arange(pos, pos + n))
            pos += n
        return cls(out, S)

    @classmethod
    def per_chunk(cls, S: int, n: int, world: int) -> TokenLayout:
        sizes = even_shard_sizes(n, world)
        offs = [sum(sizes[:r]) for r in range(world)]
        return cls([torch.cat([torch.arange(j * n + offs[r], j * n + offs[r] + sizes[r]) for j in range(S // n)])
                    for r in range(world)], S)


def localize(ctx, layout: TokenLayout, rank: int, geom: dict):
    """This rank's copy of the per-forward context: its tokens' rope rows, gate rows, cross-attention rows."""
    idx = layout.index[rank]
    N, S, R, n = geom["N"], geom["S"], geom["R"], geom["n"]
    dev = ctx.cos.device
    gate = ctx.gate_index.view(N, S)[:, idx.to(ctx.gate_index.device)].reshape(-1).contiguous()
    # cross-attention: the local rows of chunk j of batch b are contiguous in local order
    chunk_of = (idx // n).tolist()
    rows = []
    s_l = len(idx)
    cross_k = ctx.cross_k.cpu().tolist()
    for b in range(N):
        for j in range(R):
            pos = [p for p, c in enumerate(chunk_of) if c == j]
            lo, hi = (pos[0], pos[-1] + 1) if pos else (0, 0)
            assert hi - lo == len(pos), "token layout must keep each chunk's local rows contiguous"
            rows.append((b * s_l + lo, b * s_l + hi))
    keep = [i for i, (lo, hi) in enumerate(rows) if hi > lo]
    cross_q = torch.tensor([rows[i] for i in keep], dtype=torch.int32).reshape(-1, 2).to(dev)
    cross_kk = torch.tensor([cross_k[i] for i in keep], dtype=torch.int32).reshape(-1, 2).to(dev)
    return dataclasses.replace(ctx, seq=s_l, cos=ctx.cos[idx.to(dev)], sin=ctx.sin[idx.to(dev)], gate_index=gate,
                               cross_q=cross_q, cross_k=cross_kk)


def ulysses_attention_fn(layout: TokenLayout, rank: int, group):
    """The cp_ulysses self-attention hook (see the module docstring)."""
    sizes = layout.sizes

    def attend(layer_number, q, k, v, ctx):
        N, _, nh, d = q.shape
        rep = kv_heads_for_group("cp_ulysses", nh, k.shape[2], len(sizes))
        if rep > 1:  # more ranks than kv heads: each rank gets a copy of the kv head its q heads use
            k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        parts = seq_to_heads([q[b] for b in range(N)] + [k[b] for b in range(N)] + [v[b] for b in range(N)],
                             [sizes] * (3 * N), rank, group)
        qh, kh, vh = (torch.stack(parts[i * N:(i + 1) * N]) for i in range(3))
        core = local_self_attention(layer_number, qh, kh, vh, ctx)  # all tokens, this rank's heads
        core = core.view(N, layout.S, -1, d)
        out = heads_to_seq([core[b] for b in range(N)], [sizes] * N, rank, group)
        return torch.cat(out, dim=0)

    return attend


def ring_attention_fn(layout: TokenLayout, rank: int, world: int, group, geom: dict, ctx):
    """The cp_shuffle_overlap self-attention hook (see the module docstring)."""
    n, R, S = geom["n"], geom["R"], geom["S"]
    n_r = even_shard_sizes(n, world)
    offs = [sum(n_r[:r]) for r in range(world)]
    key_chunks = (geom["read"] + S) // n
    # Per batch element: the window's slices with keys in [cache | current] buffer coordinates, rewritten
    # for the rank-major order of pieces (rank r: its piece of every query chunk / key chunk, chunk order).
    sl = [(qs, qe, ks - geom["shift"], ke - geom["shift"]) for qs, qe, ks, ke in geom["window_slices"]]
    q_ranges = torch.tensor([[a, b] for a, b, _, _ in sl], dtype=torch.int32).reshape(-1, 2)
    k_ranges = torch.tensor([[c, d] for _, _, c, d in sl], dtype=torch.int32).reshape(-1, 2)
    q_segs = [(j * n + offs[r], n_r[r]) for r in range(world) for j in range(R)]
    k_segs = [(c * n + offs[r], n_r[r]) for r in range(world) for c in range(key_chunks)]
    qr, kr, ty = permute_mask(q_ranges, k_ranges, torch.zeros(len(sl), dtype=torch.int32), q_segments=q_segs,
                              k_segments=k_segs)
    # every rank's shard lengths are known here: no length exchange inside ring_attention, per layer
    shard_sizes = ([R * n_r[r] for r in range(world)], [key_chunks * n_r[r] for r in range(world)])
    cache = ctx.kv_cache
    read_l = ctx.read_tokens // n * n_r[rank]
    write_l = ctx.write_tokens // n * n_r[rank]

    def attend(layer_number, q, k, v, ctx):
        N, _, _, d = q.shape
        kv = torch.cat([k, v], dim=-1)
        if cache is not None:
            if cache.buffers[layer_number] is None and (read_l or write_l):
                # local pieces only: capacity counted in this rank's tokens per chunk
                cache.buffers[layer_number] = torch.zeros(
                    cache.batch, cache.capacity // n * n_r[rank], kv.shape[2], kv.shape[3], dtype=cache.dtype,
                    device=cache.device if cache.device is not None else kv.device)
            filled = cache.filled
            kv = cache.read_write(layer_number, kv, read_l, write_l)
            cache.filled = max(filled, ctx.read_tokens + ctx.write_tokens)  # bookkeeping in global tokens
        outs = []
        for b in range(N):
            o, _ = ring_attention(q[b], kv[b, :, :, :d], kv[b, :, :, d:], qr, kr, ty, group=group,
                                  shard_sizes=shard_sizes)
            outs.append(o)
        return torch.cat(outs, dim=0)

    return attend


def gather_tokens(h_local: torch.Tensor, layout: TokenLayout, group) -> torch.Tensor:
    """(N, S_local, H) on every rank -> (N, S, H) in token order on every rank."""
    sizes = layout.sizes
    longest = max(sizes)
    N, s_l, H = h_local.shape
    pad = h_local.new_zeros((N, longest - s_l, H))
    parts = [torch.empty((N, longest, H), dtype=h_local.dtype, device=h_local.device) for _ in sizes]
    dist.all_gather(parts, torch.cat([h_local, pad], dim=1).contiguous(), group=group)
    out = h_local.new_empty((N, layout.S, H))
    for p, idx, n in zip(parts, layout.index, sizes):
        out[:, idx.to(out.device)] = p[:, :n]
    return out
