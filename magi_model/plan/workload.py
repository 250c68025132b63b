"""What one video costs, independent of the GPUs: the DiT forwards the sampler really makes, their
FLOPs by precision, and the VAE-decode / T5 work.

The forwards are not re-derived from formulas: :func:`record_forwards` runs
:class:`magi_model.pipeline.ChunkSampler` (window schedule, clean-chunk re-forward, CFG passes,
distill nearly-clean copy) against a stand-in model that records each call's arguments and
returns zeros. Per-forward FLOPs then follow the DiT's modules (``magi_model/dit.py``): every
matmul, in the precision it runs in, and attention over the exact visible area of each forward's
mask (:class:`magi_kernels.ranges.Magi1WindowMask`).
"""

from __future__ import annotations

import dataclasses
import types
from collections import Counter

import torch

from magi_kernels.ranges import Magi1WindowMask
from magi_model import schedule
from magi_model.config import MagiConfig, tokens_per_chunk
from magi_model.dit import NULL_CAPTION_TOKENS, fp8_layer_ids
from magi_model.pipeline import Captions, ChunkSampler
from magi_model.vae import MAGI1_DDCONFIG, SPATIAL_OVERLAP

PRECISIONS = ("fp8", "bf16", "fp32")
FREQ_DIM = 256  # timestep sinusoid width (dit.TimestepEmbedder)


@dataclasses.dataclass(frozen=True)
class Forward:
    """One DiT call as the sampler makes it."""

    batch: int  # N (the base models' unconditional pass batches the window's chunks)
    chunks: int  # R chunks per batch element
    chunk_tokens: int  # n
    slice_point: int
    key_windows: tuple  # r_j per chunk (None = all previous chunks)
    cache_read_tokens: int  # K/V tokens read from the cache per batch element
    cache_write_tokens: int
    caption_tokens: tuple  # valid caption tokens per (batch, chunk), batch-major

    @property
    def tokens(self) -> int:
        return self.batch * self.chunks * self.chunk_tokens

    def mask(self) -> Magi1WindowMask:
        return Magi1WindowMask(self.chunk_tokens, self.key_windows, self.slice_point)


class _RecordingDiT:
    """Stands in for VideoDiT: records each call of the sampler and returns a zero velocity."""

    def __init__(self, cfg: MagiConfig):
        self.videodit_blocks = types.SimpleNamespace(layers=[None] * cfg.model.num_layers)
        self.act_dtype = cfg.model.params_dtype
        self.device = torch.device("cpu")
        self.n = tokens_per_chunk(cfg)
        self.calls: list[Forward] = []

    def __call__(self, x, t, caption, caption_mask, **kw):
        self.calls.append(forward_of_call(self.n, t, caption_mask, **kw))
        return torch.zeros(x.shape, dtype=torch.float32)


def forward_of_call(chunk_tokens: int, t, caption_mask, *, kv_cache=None, slice_point=0, key_windows=None,
                    update_kv_cache=False, write_chunks=None, **_other) -> Forward:
    """The :class:`Forward` a ``VideoDiT.forward(x, t, caption, caption_mask, **kw)`` call makes."""
    N, R = t.shape
    wins = tuple(None if (w is None or w <= 0) else int(w) for w in (key_windows or [None] * R))
    read = slice_point * chunk_tokens if kv_cache is not None else 0
    write = ((R if write_chunks is None else write_chunks) * chunk_tokens) if update_kv_cache else 0
    caps = tuple(int(v) for v in caption_mask.bool().sum(-1).reshape(-1).tolist())
    return Forward(N, R, chunk_tokens, int(slice_point), wins, read, write, caps)


def record_forwards(cfg: MagiConfig, *, mode: str = "t2v", text_tokens: int = 64) -> list[Forward]:
    """Every DiT forward of one video, in order, from the real sampler. ``text_tokens``: valid tokens
    of the prompt's caption (T5 tokens + MAGI-1's special tokens); the null caption has 50."""
    r = cfg.runtime
    if not 1 <= text_tokens <= cfg.model.caption_max_length:
        raise ValueError(f"plan: argument 'text_tokens' must be in [1, {cfg.model.caption_max_length}], "
                         f"got {text_tokens}")
    prefix = None
    if mode == "i2v":
        prefix = torch.zeros(1, cfg.model.latent_channels, 1, 2, 2)
    elif mode != "t2v":
        raise ValueError(f"plan: argument 'mode' must be 't2v' or 'i2v', got {mode!r}")
    chunks = schedule.chunk_layout(r.num_frames, mode=mode, prefix_latent_frames=0 if prefix is None else 1,
                                   chunk_width=r.chunk_width,
                                 temporal_downsample_factor=r.temporal_downsample_factor).infer_chunk_num
    L = cfg.model.caption_max_length

    def mask(valid: int) -> torch.Tensor:
        m = torch.zeros(chunks, L)
        m[:, :valid] = 1
        return m

    # Caption tensors only need the right chunk count and mask; the width is never read by the stand-in.
    caps = Captions(torch.zeros(chunks, L, 1), mask(text_tokens), torch.zeros(chunks, L, 1),
                    mask(NULL_CAPTION_TOKENS))
    model = _RecordingDiT(cfg)  # counts tokens at the real video size
    # The schedule does not depend on the frame size: the sampler runs on a 16x16 video so that its
    # latent arithmetic costs nothing.
    small = MagiConfig(cfg.model, dataclasses.replace(r, video_size_h=16, video_size_w=16), cfg.engine)
    sampler = ChunkSampler(model, small, caps, mode=mode, prefix_latent=prefix)
    x = torch.zeros(1, cfg.model.latent_channels, sampler.chunk_layout.latent_frames, 2, 2)
    sampler.run(x, progress=False)
    return model.calls


# ---------------------------------------------------------------------------------------------------
# FLOPs of one forward


@dataclasses.dataclass
class Flops:
    """FLOPs by kind ("linear" = every matmul/conv outside attention, "attention") and precision."""

    linear: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(PRECISIONS, 0))
    attention: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(PRECISIONS, 0))

    def add(self, other: "Flops", times: int = 1) -> None:
        for p in PRECISIONS:
            self.linear[p] += times * other.linear[p]
            self.attention[p] += times * other.attention[p]

    @property
    def total_linear(self) -> int:
        return sum(self.linear.values())

    @property
    def total_attention(self) -> int:
        return sum(self.attention.values())

    @property
    def total(self) -> int:
        return self.total_linear + self.total_attention


def _mm(rows: int, k: int, n: int) -> int:
    return 2 * rows * k * n


def layer_linear_flops(cfg: MagiConfig, fwd: Forward, layer: int) -> dict:
    """Matmul FLOPs of transformer layer ``layer`` by precision (dit.TransformerLayer)."""
    m = cfg.model
    H, nh, ng, d, Fh = m.hidden_size, m.num_attention_heads, m.num_query_groups, m.kv_channels, m.ffn_hidden_size
    S, rows, ny = fwd.tokens, fwd.batch * fwd.chunks, sum(fwd.caption_tokens)
    out = dict.fromkeys(PRECISIONS, 0)
    big = (_mm(S, H, nh * d) * 2 + _mm(S, H, ng * d) * 2 + _mm(S, H, Fh * (2 if m.gated_linear_unit else 1))
           + _mm(S, Fh, H))
    proj = _mm(S, 2 * nh * d, H)
    if cfg.engine.fp8_quant and layer in fp8_layer_ids(m.num_layers):
        out["fp8"] += big + proj
    else:
        out["bf16"] += big
        out["fp32"] += proj  # linear_proj runs in fp32 (MAGI-1's fp32 autocast region) unless fp8
    out["bf16"] += _mm(rows, m.cond_hidden, 2 * m.gating_hidden) + _mm(ny, m.xattn_hidden, 2 * ng * d)
    return out


def forward_flops(cfg: MagiConfig, fwd: Forward, layers: "range | None" = None) -> Flops:
    """FLOPs of one DiT forward (all layers, or ``layers``; the embedding and final stages are counted
    with the first / last layer)."""
    m = cfg.model
    L = m.num_layers
    layers = range(L) if layers is None else layers
    S, rows, ny = fwd.tokens, fwd.batch * fwd.chunks, sum(fwd.caption_tokens)
    f = Flops()
    for i in layers:
        for p, v in layer_linear_flops(cfg, fwd, i).items():
            f.linear[p] += v
    if 0 in layers:  # embedding stage, fp32: patch conv, timestep MLP (twice when distilled), caption projections
        f.linear["fp32"] += (_mm(S, m.in_channels * m.t_patch_size * m.patch_size ** 2, m.hidden_size)
                             + (2 if cfg.engine.distill else 1) * (_mm(rows, FREQ_DIM, m.cond_hidden)
                                                                   + _mm(rows, m.cond_hidden, m.cond_hidden))
                             + _mm(fwd.batch, m.caption_channels, m.cond_hidden)
                             + _mm(ny, m.caption_channels, m.xattn_hidden))
    if L - 1 in layers:
        f.linear["fp32"] += _mm(S, m.hidden_size, m.patch_size ** 2 * m.t_patch_size * m.out_channels)
    per_layer = 4 * m.num_attention_heads * m.kv_channels * attention_cells(fwd)
    f.attention["bf16"] += per_layer * len(layers)
    return f


def attention_cells(fwd: Forward) -> int:
    """Visible (q, k) cells of self- plus cross-attention in one layer, all batch elements."""
    return self_attention_cells(fwd) + cross_attention_cells(fwd)


def self_attention_cells(fwd: Forward) -> int:
    return fwd.mask().area() * fwd.batch


def cross_attention_cells(fwd: Forward) -> int:
    return fwd.chunk_tokens * sum(fwd.caption_tokens)


ATTENTION_TILE = (128, 128)  # the block-sparse kernels' tile (assumption for the time model)


def self_attention_tile_efficiency(fwd: Forward, tile: tuple = ATTENTION_TILE) -> float:
    """Cells of the tiles the block-sparse planner visits / visible cells (>= 1): work spent on the masked
    part of boundary tiles (``magi_kernels.plan``'s plan for this forward's mask)."""
    from magi_kernels.plan import get_plan, tile_efficiency

    mask = fwd.mask()
    q, k, t = mask.to_ranges()
    plan = get_plan(q.numpy(), k.numpy(), t.numpy(), mask.total_q, mask.total_k, *tile)
    return tile_efficiency(plan, mask.area())


# ---------------------------------------------------------------------------------------------------
# VAE decode and T5


def _tile_starts(n: int, stride: int) -> list[int]:
    return list(range(0, max(n, 1), stride))


def vae_decode_tiles(latent_frames: int, h8: int, w8: int, dd: dict = MAGI1_DDCONFIG,
                     tile_frames: int = 12) -> list[tuple[int, int, int]]:
    """Latent tile shapes (t, h, w) that ``ViTVAE.decode`` runs for a (latent_frames, h8, w8) latent."""
    lt, ls = tile_frames // dd["patch_length"], dd["video_size"] // dd["patch_size"]
    st = int(ls * (1 - SPATIAL_OVERLAP))
    out = []
    for t0 in _tile_starts(latent_frames, lt):
        for h0 in _tile_starts(h8, st):
            for w0 in _tile_starts(w8, st):
                out.append((min(lt, latent_frames - t0), min(ls, h8 - h0), min(ls, w8 - w0)))
    return out


def vae_decode_tile_flops(t: int, h: int, w: int, dd: dict = MAGI1_DDCONFIG) -> int:
    """Matmul + attention FLOPs of ``ViTDecoder`` on one (t, h, w) latent tile."""
    D, depth = dd["embed_dim"], dd["depth"]
    hidden = int(D * dd["mlp_ratio"])
    tok = t * h * w
    seq = tok + 1  # cls token
    unpatch = D // (dd["patch_length"] * dd["patch_size"] ** 2)
    pixels = tok * dd["patch_length"] * dd["patch_size"] ** 2
    blocks = depth * (_mm(seq, D, 3 * D) + _mm(seq, D, D) + _mm(seq, D, hidden) + _mm(seq, hidden, D)
                      + 4 * seq * seq * D)
    return _mm(tok, dd["z_chans"], D) + blocks + _mm(pixels, unpatch * 27, dd["in_chans"])


def vae_decode_flops(latent_frames: int, h8: int, w8: int, dd: dict = MAGI1_DDCONFIG) -> int:
    return sum(vae_decode_tile_flops(*tile, dd=dd) for tile in vae_decode_tiles(latent_frames, h8, w8, dd))


# T5-v1.1-XXL encoder (the public Hugging Face config: d_model 4096, 24 layers, 64 heads x 64, gated FFN 10240,
# vocabulary 32128), run once per prompt in fp32 over caption_max_length tokens.
T5_XXL = {"d_model": 4096, "layers": 24, "heads": 64, "d_kv": 64, "d_ff": 10240, "vocab": 32128}


def t5_params(c: dict = T5_XXL) -> int:
    inner = c["heads"] * c["d_kv"]
    per_layer = 4 * c["d_model"] * inner + 3 * c["d_model"] * c["d_ff"] + 2 * c["d_model"]
    return c["vocab"] * c["d_model"] + c["layers"] * per_layer + c["d_model"] + 32 * c["heads"]


def t5_flops(tokens: int, c: dict = T5_XXL) -> int:
    inner = c["heads"] * c["d_kv"]
    per_layer = (_mm(tokens, c["d_model"], 4 * inner) + _mm(tokens, c["d_model"], 3 * c["d_ff"])
                 + 4 * tokens * tokens * inner)
    return c["layers"] * per_layer


# ---------------------------------------------------------------------------------------------------
# A whole video


@dataclasses.dataclass
class Workload:
    config: MagiConfig
    mode: str
    text_tokens: int
    forwards: list
    flops: Flops  # all DiT forwards
    vae_flops: int
    t5_flops: int
    chunks: int  # latent chunks of the video (the KV cache holds all of them)
    latent_frames: int

    @property
    def distinct_forwards(self) -> Counter:
        return Counter(self.forwards)

    @property
    def max_tokens(self) -> int:
        return max(f.tokens for f in self.forwards)


def build_workload(cfg: MagiConfig, *, mode: str = "t2v", text_tokens: int = 64) -> Workload:
    fwds = record_forwards(cfg, mode=mode, text_tokens=text_tokens)
    total = Flops()
    for fwd, count in Counter(fwds).items():
        total.add(forward_flops(cfg, fwd), count)
    r = cfg.runtime
    layout = schedule.chunk_layout(r.num_frames, mode=mode, prefix_latent_frames=1 if mode == "i2v" else 0,
                                   chunk_width=r.chunk_width, temporal_downsample_factor=r.temporal_downsample_factor)
    h8, w8 = r.video_size_h // 8, r.video_size_w // 8
    # Each finished chunk is decoded on its own (streamed decoding, one chunk of latent frames at a time).
    per_chunk = vae_decode_flops(r.chunk_width, h8, w8)
    return Workload(cfg, mode, text_tokens, fwds, total, per_chunk * layout.infer_chunk_num,
                    t5_flops(cfg.model.caption_max_length), layout.infer_chunk_num, layout.latent_frames)


__all__ = ["Forward", "forward_of_call", "record_forwards", "Flops", "forward_flops", "layer_linear_flops", "attention_cells",
           "self_attention_cells", "cross_attention_cells",
           "self_attention_tile_efficiency", "ATTENTION_TILE", "vae_decode_tiles", "vae_decode_tile_flops", "vae_decode_flops", "t5_params", "t5_flops", "T5_XXL",
           "Workload", "build_workload", "PRECISIONS"]
