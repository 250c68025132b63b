"""MAGI-1 video DiT (``VideoDiTModel``, docs/magi1.md#dit-architecture) on magi_kernels ops.

Parameter names reproduce the official state-dict keys exactly (14 top-level + 26 per layer; the
fp8 variants replace the 7 big linears of layers 1..L-2 by fp8 modules, 42 keys per such layer).

Layout inside this module: hidden states are batch-first ``(N, S, H)`` (MAGI-1 is sequence-first;
only the memory order differs, the per-token math is identical). Token order is T-major
``(T h w)`` with w fastest, and chunk ``j`` of a forward owns tokens ``[j*n, (j+1)*n)``.

Precision (docs/magi1.md#precision): residual stream in ``params_dtype`` (bf16); embedders, rope, QK norms, post
norms, final norm and final linear in fp32 ("promotion set", :func:`is_fp32_param`); gate * out ->
post-LN -> +residual in fp32 (``gated_post_norm_residual``); q/k norm + rope in fp32
(``qk_norm_rope``); ``linear_proj`` in fp32 unless fp8; cross-attention q/k norms in bf16.

The single entry point for one denoising forward is :meth:`VideoDiT.forward`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from magi_kernels import gated_post_norm_residual, magi_rope_bands_init, magi_rope_table, qk_norm_rope
from magi_kernels.ranges import Magi1WindowMask
from magi_model.attention import attention_precision, range_attention
from magi_model.config import MagiConfig, load_config
from magi_model.device import resolve_device
from magi_model.fp8 import FP8, FP8_MAX, PER_CHANNEL, PER_TENSOR, make_fp8_linear

TP_GROUPS = 8  # linear_proj input interleave, hard-coded "to align with TP8 training" (docs/magi1.md#transformer-layer)
FREQ_DIM = 256  # timestep sinusoid size
TIMESTEP_SCALE = 1000.0
NULL_CAPTION_TOKENS = 50  # valid tokens of the null (unconditional) caption's mask

# Modules MAGI-1's _high_precision_promoter casts to fp32 after loading (docs/magi1.md#fp32-promotion).
_FP32_TOP = ("x_embedder", "y_embedder", "t_embedder", "final_linear", "rope")
_FP32_NORMS = ("self_attn_post_norm", "mlp_post_norm", "final_layernorm")


def is_fp32_param(name: str) -> bool:
    """True for state-dict keys in MAGI-1's fp32 promotion set."""
    module = name.rsplit(".", 1)[0]
    if module.split(".", 1)[0] in _FP32_TOP or name == "rope.bands":
        return True
    if ("q_layernorm" in module or "k_layernorm" in module) and "_xattn" not in module:
        return True
    return any(part in _FP32_NORMS for part in module.split("."))


def fp8_layer_ids(num_layers: int) -> range:
    """Layers whose big linears are fp8 in the quant checkpoints: all but the first and last (docs/magi1.md#fp8-checkpoints)."""
    return range(1, num_layers - 1)


# ---------------------------------------------------------------------------------------------------
# Building blocks. Every module's parameters are created in the dtype the official model ends up
# with after loading + promotion, so build-on-meta + assign-load gives the same tensors.


class LayerNorm1p(nn.Module):
    """MAGI-1's FusedLayerNorm: gamma = weight + 1 when ``one_p`` (zero-centred stored weights).

    ``weight + 1`` is formed in the parameter's dtype, as the original does (so a bf16 weight gives a
    bf16-rounded gamma)."""

    def __init__(self, dim: int, eps: float, one_p: bool, dtype: torch.dtype):
        super().__init__()
        self.dim, self.eps, self.one_p = dim, eps, one_p
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(dim, dtype=dtype))

    @property
    def weight_offset(self) -> float:
        return 1.0 if self.one_p else 0.0

    def gamma(self) -> torch.Tensor:
        return self.weight + 1 if self.one_p else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.dim,), self.gamma().to(x.dtype), self.bias.to(x.dtype), self.eps)


def _plain_ln(mod: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """Pre-norms are torch.nn.LayerNorm (raw gamma) in the residual dtype."""
    return F.layer_norm(x, mod.normalized_shape, mod.weight.to(x.dtype), mod.bias.to(x.dtype), mod.eps)


def _linear(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a (bf16 or fp8) linear in the input's dtype (fp8 modules take bf16 and return bf16)."""
    if isinstance(mod, nn.Linear):
        b = None if mod.bias is None else mod.bias.to(x.dtype)
        return F.linear(x, mod.weight.to(x.dtype), b)
    return mod(x)


def _linear_fp32(mod: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The original's ``autocast(dtype=float32)`` regions: fp32 inputs and weights, fp32 result."""
    b = None if mod.bias is None else mod.bias.float()
    return F.linear(x.float(), mod.weight.float(), b)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, dtype: torch.dtype):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, hidden, bias=True, dtype=dtype), nn.SiLU(),
                                 nn.Linear(hidden, hidden, bias=True, dtype=dtype))

    @staticmethod
    def sinusoid(t: torch.Tensor) -> torch.Tensor:
        half = FREQ_DIM // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None] * TIMESTEP_SCALE
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # cos first

    def forward(self, t: torch.Tensor, round_dtype: torch.dtype) -> torch.Tensor:
        # The original rounds the sinusoid to params_dtype, then runs the fp32 MLP under fp32 autocast.
        emb = self.sinusoid(t).to(round_dtype)
        h = F.silu(_linear_fp32(self.mlp[0], emb))
        return _linear_fp32(self.mlp[2], h)


class CaptionEmbedder(nn.Module):
    def __init__(self, caption_channels: int, max_len: int, h_xattn: int, h_cond: int, dtype: torch.dtype):
        super().__init__()
        self.null_caption_embedding = nn.Parameter(torch.empty(max_len, caption_channels, dtype=dtype))
        # The SiLU belongs to the cross-attention projection (y_proj_xattn.1).
        self.y_proj_xattn = nn.Sequential(nn.Linear(caption_channels, h_xattn, bias=True, dtype=dtype), nn.SiLU())
        self.y_proj_adaln = nn.Sequential(nn.Linear(caption_channels, h_cond, bias=True, dtype=dtype))

    def xattn(self, caption_tokens: torch.Tensor) -> torch.Tensor:
        return F.silu(_linear_fp32(self.y_proj_xattn[0], caption_tokens))

    def adaln(self, dropped: torch.Tensor) -> torch.Tensor:
        """adaLN caption input is a learned row, not the caption: [-2] with text, [-1] dropped (docs/magi1.md#embedding-stage)."""
        rows = torch.where(dropped[:, None], self.null_caption_embedding[-1][None], self.null_caption_embedding[-2][None])
        return _linear_fp32(self.y_proj_adaln[0], rows)


class LearnableRope(nn.Module):
    def __init__(self, n_bands: int):
        super().__init__()
        self.bands = nn.Parameter(torch.empty(n_bands, dtype=torch.float32))

    def forward(self, t_total: int, h: int, w: int, keep_last: int):
        return magi_rope_table(self.bands.float(), t_total, h, w, keep_last=keep_last)


class LinearQKV(nn.Module):
    def __init__(self, cfg, fp8: bool, dtype):
        super().__init__()
        m = cfg
        H, nh, ng, d = m.hidden_size, m.num_attention_heads, m.num_query_groups, m.kv_channels
        self.layer_norm = nn.LayerNorm(H, eps=m.layernorm_epsilon, dtype=dtype)
        for name, out in (("q", nh * d), ("qx", nh * d), ("k", ng * d), ("v", ng * d)):
            setattr(self, name, make_fp8_linear(PER_TENSOR, H, out) if fp8
                    else nn.Linear(H, out, bias=False, dtype=dtype))


class SelfAttention(nn.Module):
    def __init__(self, cfg, fp8: bool, dtype):
        super().__init__()
        m = cfg
        H, nh, ng, d = m.hidden_size, m.num_attention_heads, m.num_query_groups, m.kv_channels
        eps, one_p = m.layernorm_epsilon, m.apply_layernorm_1p
        self.nh, self.ng, self.d = nh, ng, d
        self.linear_qkv = LinearQKV(cfg, fp8, dtype)
        # Rows per KV group g: [K_g (d) | V_g (d)] (docs/magi1.md#checkpoint-layout-and-keys), not [K_all | V_all].
        self.linear_kv_xattn = nn.Linear(m.xattn_hidden, 2 * ng * d, bias=False, dtype=dtype)
        self.linear_proj = (make_fp8_linear(PER_CHANNEL, 2 * nh * d, H) if fp8
                            else nn.Linear(2 * nh * d, H, bias=False, dtype=dtype))
        # QK norms of self-attention are promoted to fp32, the cross-attention ones stay in params_dtype.
        self.q_layernorm = LayerNorm1p(d, eps, one_p, torch.float32)
        self.q_layernorm_xattn = LayerNorm1p(d, eps, one_p, dtype)
        self.k_layernorm = LayerNorm1p(d, eps, one_p, torch.float32)
        self.k_layernorm_xattn = LayerNorm1p(d, eps, one_p, dtype)


SWIGLU_BLOCK_BYTES = 64 << 20  # fp32 bytes per temporary of one silu_and_mul row block


def silu_and_mul(h: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``silu(h[..., :F]) * h[..., F:]`` in fp32, rounded once to ``out_dtype``: what flashinfer's
    ``silu_and_mul`` (MAGI-1's SwiGLU) computes in registers.

    Done in blocks of rows so the fp32 temporaries stay near :data:`SWIGLU_BLOCK_BYTES` each instead of
    three (tokens, F) fp32 tensors (3 x 4 bytes x F per token, more than the bf16 fc1 output). The
    operation is elementwise, so blocking changes no value."""
    f = h.shape[-1] // 2
    rows = h.reshape(-1, 2 * f)
    out = torch.empty((rows.shape[0], f), dtype=out_dtype, device=h.device)
    step = max(1, SWIGLU_BLOCK_BYTES // (4 * f))
    for r in range(0, rows.shape[0], step):
        block = rows[r:r + step]
        out[r:r + step] = F.silu(block[:, :f].float()) * block[:, f:].float()
    return out.view(*h.shape[:-1], f)


class MLP(nn.Module):
    def __init__(self, cfg, fp8: bool, dtype):
        super().__init__()
        H, Fh = cfg.hidden_size, cfg.ffn_hidden_size
        self.glu = cfg.gated_linear_unit
        self.layer_norm = nn.LayerNorm(H, eps=cfg.layernorm_epsilon, dtype=dtype)
        f1 = 2 * Fh if self.glu else Fh
        self.linear_fc1 = make_fp8_linear(PER_TENSOR, H, f1) if fp8 else nn.Linear(H, f1, bias=False, dtype=dtype)
        self.linear_fc2 = make_fp8_linear(PER_CHANNEL, Fh, H) if fp8 else nn.Linear(Fh, H, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _linear(self.linear_fc1, _plain_ln(self.layer_norm, x))
        h = silu_and_mul(h, x.dtype) if self.glu else F.gelu(h)  # GELU: exact erf; rebinding frees fc1's output
        return _linear(self.linear_fc2, h)


class AdaModulate(nn.Module):
    def __init__(self, h_cond: int, h_gate: int, dtype):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(h_cond, 2 * h_gate, bias=True, dtype=dtype))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        g = _linear(self.proj[0], F.silu(c))
        return torch.tanh(g.float()).to(c.dtype)  # softcap(x, cap=1) = tanh(x / 1), in fp32


@dataclasses.dataclass
class _ForwardContext:
    """Per-forward tensors every layer shares."""

    n_batch: int
    seq: int
    cos: torch.Tensor
    sin: torch.Tensor
    gate_index: torch.Tensor  # int32 [N*S]: row of the (N*R, H) gates per token
    cond: torch.Tensor  # (N*R, Hc) in residual dtype
    self_q: torch.Tensor
    self_k: torch.Tensor
    cross_q: torch.Tensor
    cross_k: torch.Tensor
    y_xattn: torch.Tensor  # (Ny, Hx) valid caption tokens, (batch, chunk) order
    kv_cache: "KVCache | None"
    read_tokens: int  # cached tokens read (slice_point * n)
    write_tokens: int  # leading current tokens written to the cache (0 = no write)
    # Self-attention of one layer, (layer_number, q, k, v, ctx) -> core (N*S, nh, d). None: this process
    # holds every token (local_self_attention); magi_model.parallel installs its context-parallel ones.
    self_attention: "Callable | None" = None


def local_self_attention(layer_number: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         ctx: _ForwardContext) -> torch.Tensor:
    """Block-causal GQA self-attention of all N*S tokens, reading/writing the KV cache (single process)."""
    N, S, _, d = q.shape
    ng = k.shape[2]
    kv = torch.cat([k, v], dim=-1)  # (N, S, ng, 2d), the cache's layout
    if ctx.kv_cache is not None:
        kv_all = ctx.kv_cache.read_write(layer_number, kv, ctx.read_tokens, ctx.write_tokens)
    else:
        kv_all = kv
    sk = kv_all.shape[1]
    k_all = kv_all[..., :d].reshape(N * sk, ng, d)
    v_all = kv_all[..., d:].reshape(N * sk, ng, d)
    return range_attention(q.reshape(N * S, q.shape[2], d), k_all, v_all, ctx.self_q, ctx.self_k)


class TransformerLayer(nn.Module):
    def __init__(self, cfg, layer_number: int, fp8: bool, dtype):
        super().__init__()
        m = cfg
        self.layer_number = layer_number
        self.ada_modulate_layer = AdaModulate(m.cond_hidden, m.gating_hidden, dtype)
        self.self_attention = SelfAttention(cfg, fp8, dtype)
        self.self_attn_post_norm = LayerNorm1p(m.hidden_size, m.layernorm_epsilon, m.apply_layernorm_1p, torch.float32)
        self.mlp = MLP(cfg, fp8, dtype)
        self.mlp_post_norm = LayerNorm1p(m.hidden_size, m.layernorm_epsilon, m.apply_layernorm_1p, torch.float32)
        self.fp8 = fp8
        self.eps = m.layernorm_epsilon

    def _post(self, norm: LayerNorm1p, out, gate, residual, ctx):
        return gated_post_norm_residual(out, gate, residual, norm.weight, norm.bias, gate_index=ctx.gate_index,
                                        preset="magi1", weight_offset=norm.weight_offset, eps=norm.eps,
                                        out_dtype=residual.dtype)

    def forward(self, x: torch.Tensor, ctx: _ForwardContext) -> torch.Tensor:
        # Each intermediate is dropped (del) as soon as its last use is done: at the MLP only the
        # residual stream and the gates are alive, as in MAGI-1, not every tensor of the attention block.
        N, S, H = x.shape
        sa = self.self_attention
        nh, ng, d = sa.nh, sa.ng, sa.d
        qkv = sa.linear_qkv
        a = _plain_ln(qkv.layer_norm, x)

        # --- self-attention: block-causal, GQA, KV cache of post-norm post-rope K and V.
        q = _linear(qkv.q, a).view(N, S, nh, d)
        k = _linear(qkv.k, a).view(N, S, ng, d)
        v = _linear(qkv.v, a).view(N, S, ng, d)
        qn, kn = sa.q_layernorm, sa.k_layernorm
        q, k = qk_norm_rope(q, k, ctx.cos, ctx.sin, q_weight=qn.weight, q_bias=qn.bias, k_weight=kn.weight,
                            k_bias=kn.bias, preset="magi1", weight_offset=qn.weight_offset, eps=qn.eps,
                            rotary_dim=2 * ctx.cos.shape[-1], out_dtype=x.dtype)
        core = (ctx.self_attention or local_self_attention)(self.layer_number, q, k, v, ctx)
        del q, k, v

        # --- cross-attention to each chunk's own text tokens (no rope; bf16 norms).
        qx = sa.q_layernorm_xattn(_linear(qkv.qx, a).view(N, S, nh, d))
        del a
        if ctx.y_xattn.shape[0]:
            kvx = _linear(sa.linear_kv_xattn, ctx.y_xattn).view(-1, ng, 2 * d)
            kx = sa.k_layernorm_xattn(kvx[..., :d])
            vx = kvx[..., d:].contiguous()
            del kvx
            cross = range_attention(qx.reshape(N * S, nh, d), kx, vx, ctx.cross_q, ctx.cross_k)
            del kx, vx
        else:
            cross = torch.zeros(N * S, nh, d, dtype=x.dtype, device=x.device)
        del qx

        # --- output projection on the TP8-interleaved [core_g, cross_g] input.
        o = torch.stack([core.view(N, S, TP_GROUPS, -1), cross.view(N, S, TP_GROUPS, -1)], dim=3)
        del core, cross
        o = o.reshape(N, S, 2 * nh * d)
        o = _linear(sa.linear_proj, o) if self.fp8 else _linear_fp32(sa.linear_proj, o)

        g = self.ada_modulate_layer(ctx.cond)  # (N*R, 2H)
        x = self._post(self.self_attn_post_norm, o, g[:, :H], x, ctx)  # the caller still holds the layer input
        del o
        m = self.mlp(x)
        return self._post(self.mlp_post_norm, m, g[:, H:], x, ctx)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: MagiConfig):
        super().__init__()
        m, dtype = cfg.model, cfg.model.params_dtype
        quant = set(fp8_layer_ids(m.num_layers)) if cfg.engine.fp8_quant else set()
        self.layers = nn.ModuleList([TransformerLayer(m, i, i in quant, dtype) for i in range(m.num_layers)])
        self.final_layernorm = LayerNorm1p(m.hidden_size, m.layernorm_epsilon, m.apply_layernorm_1p, torch.float32)


class FinalLinear(nn.Module):
    def __init__(self, hidden: int, out: int):
        super().__init__()
        self.linear = nn.Linear(hidden, out, bias=False, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Per-layer cache of post-norm, post-rope K and V, ``(batch, capacity_tokens, ng, 2d)`` (docs/magi1.md#kv-cache).

    Token ``i`` of the cache is absolute token ``i`` of the video (chunk c owns ``[c*n, (c+1)*n)``).
    A forward with ``slice_point`` reads ``[:slice_point*n]`` and, when it updates the cache, writes
    its leading chunks at ``slice_point*n``. Buffers are allocated on first write; ``device`` may be
    ``"cpu"`` to keep the cache off the accelerator (MAGI-1's ``kv_offload``)."""

    def __init__(self, num_layers: int, capacity_tokens: int, *, batch: int = 1, device=None,
                 dtype: torch.dtype = torch.bfloat16):
        self.num_layers, self.capacity, self.batch = num_layers, capacity_tokens, batch
        self.device, self.dtype = device, dtype
        self.buffers: list[torch.Tensor | None] = [None] * num_layers
        self.filled = 0  # tokens written so far (max end of any write)

    @classmethod
    def for_model(cls, model: "VideoDiT", capacity_tokens: int, *, batch: int = 1, device=None) -> "KVCache":
        return cls(len(model.videodit_blocks.layers), capacity_tokens, batch=batch,
                   device=device if device is not None else model.device, dtype=model.act_dtype)

    def _allocate(self, layer: int, kv: torch.Tensor) -> torch.Tensor:
        buf = torch.zeros(self.batch, self.capacity, kv.shape[2], kv.shape[3], dtype=self.dtype,
                          device=self.device if self.device is not None else kv.device)
        self.buffers[layer] = buf
        return buf

    def read_write(self, layer: int, kv: torch.Tensor, read_tokens: int, write_tokens: int) -> torch.Tensor:
        N = kv.shape[0]
        if N != self.batch:
            raise ValueError(f"KVCache: batch {N} of this forward does not match the cache's batch {self.batch}")
        buf = self.buffers[layer]
        if buf is None and (write_tokens or read_tokens):
            buf = self._allocate(layer, kv)
        read = buf[:, :read_tokens].to(device=kv.device, dtype=kv.dtype) if read_tokens else kv[:, :0]
        if write_tokens:
            buf[:, read_tokens:read_tokens + write_tokens] = kv[:, :write_tokens].to(buf.device, buf.dtype)
            self.filled = max(self.filled, read_tokens + write_tokens)
        return torch.cat([read, kv], dim=1) if read_tokens else kv

    def fill_rows(self, layer: int, kv: torch.Tensor, *, start: int = 0) -> None:
        """Seed cache rows with precomputed K|V: ``kv`` is ``(batch, n, ng, 2d)`` (post-norm, post-rope K
        and V concatenated on the last dim, as the layer writes them), stored at absolute tokens
        ``[start, start + n)`` of ``layer``. Use it to resume from a saved cache or to inject a prefix
        computed elsewhere; ``filled`` grows to cover the rows."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"KVCache.fill_rows: argument 'layer' must be in [0, {self.num_layers}), got {layer}")
        if kv.dim() != 4 or kv.shape[0] != self.batch:
            raise ValueError(f"KVCache.fill_rows: argument 'kv' must be (batch={self.batch}, n, ng, 2d), "
                             f"got {list(kv.shape)}")
        n = kv.shape[1]
        if start < 0 or start + n > self.capacity:
            raise ValueError(f"KVCache.fill_rows: rows [{start}, {start + n}) do not fit the capacity "
                             f"{self.capacity} (argument 'start' / 'kv')")
        buf = self.buffers[layer]
        if buf is None:
            buf = self._allocate(layer, kv)
        elif tuple(buf.shape[2:]) != tuple(kv.shape[2:]):
            raise ValueError(f"KVCache.fill_rows: argument 'kv' has (ng, 2d) = {list(kv.shape[2:])}, the cache "
                             f"holds {list(buf.shape[2:])}")
        buf[:, start:start + n] = kv.to(buf.device, buf.dtype)
        self.filled = max(self.filled, start + n)


# ---------------------------------------------------------------------------------------------------
# The model


class VideoDiT(nn.Module):
    """MAGI-1's VideoDiTModel (single device: no PP/CP split; the math is the same)."""

    def __init__(self, config: MagiConfig):
        super().__init__()
        self.config = config
        m = config.model
        dtype = m.params_dtype
        self.act_dtype = dtype
        self.x_embedder = nn.Conv3d(m.in_channels, m.hidden_size, kernel_size=(m.t_patch_size, m.patch_size, m.patch_size),
                                    stride=(m.t_patch_size, m.patch_size, m.patch_size), bias=False, dtype=torch.float32)
        self.t_embedder = TimestepEmbedder(m.cond_hidden, torch.float32)
        self.y_embedder = CaptionEmbedder(m.caption_channels, m.caption_max_length, m.xattn_hidden, m.cond_hidden,
                                          torch.float32)
        self.rope = LearnableRope(m.rope_bands)
        self.videodit_blocks = TransformerBlock(config)
        self.final_linear = FinalLinear(m.hidden_size, m.patch_size * m.patch_size * m.t_patch_size * m.out_channels)
        # "default" (flex_attn in the activations' dtype) or "fp8" (e4m3 forward, inference): not a MAGI-1 config
        # field (configs parse strictly); set it on the model, or with generate's --attention_precision.
        self.attention_precision = "default"

    @property
    def device(self) -> torch.device:
        return self.rope.bands.device

    def null_caption(self, num_chunks: int, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The unconditional text branch (docs/magi1.md#text-conditioning): the learned ``null_caption_embedding`` per
        chunk, fp32 ``(batch, num_chunks, Lc, Cc)``, with mask = the first 50 tokens."""
        emb = self.y_embedder.null_caption_embedding.detach().float()
        cap = emb[None, None].expand(batch, num_chunks, *emb.shape)
        mask = torch.zeros(batch, num_chunks, emb.shape[0], device=emb.device)
        mask[..., :NULL_CAPTION_TOKENS] = 1
        return cap, mask

    # ---------------------------------------------------------------- one denoising forward
    @torch.no_grad()
    def forward(self, x: torch.Tensor, t: torch.Tensor, caption: torch.Tensor, caption_mask: torch.Tensor,
                **kwargs) -> torch.Tensor:
        """One DiT forward (see :meth:`prepare` for the arguments): embed, every layer, unpatchify."""
        h, ctx, geom = self.prepare(x, t, caption, caption_mask, **kwargs)
        with attention_precision(self.attention_precision):
            for layer in self.videodit_blocks.layers:
                h = layer(h, ctx)
        return self.finish(h, geom)

    @torch.no_grad()
    def prepare(self, x: torch.Tensor, t: torch.Tensor, caption: torch.Tensor, caption_mask: torch.Tensor, *,
                caption_dropout: "bool | Sequence[bool] | torch.Tensor" = False, distill_dt: float | None = None,
                kv_cache: KVCache | None = None, slice_point: int = 0,
                key_windows: "Sequence[int] | None" = None, update_kv_cache: bool = False,
                write_chunks: int | None = None) -> "tuple[torch.Tensor, _ForwardContext, dict]":
        """Validation and the fp32 embedding stage of one DiT forward over a window of ``R`` chunks.

        Returns ``(h (N, S, H), ctx, geom)``: the layers' input, what every layer shares, and the shapes
        :meth:`finish` needs (``geom`` also carries the per-batch-element window slices for
        context-parallel layouts). :meth:`forward` = prepare, every layer, finish. over a window of ``R`` consecutive chunks; returns the velocity.

        Args:
            x: latent window ``(N, C, T, h8, w8)`` (scaled latents, ``C`` = 16 for both models; the
                24B channel duplication and ``x_rescale_factor`` happen inside). ``T`` = R * chunk frames.
            t: per-chunk time ``(N, R)`` (0 = noise, 1 = clean; clean/cached chunks use ``clean_t``).
            caption: text embeddings ``(N, R, L, caption_channels)``, one copy per chunk (chunk-wise
                prompts allowed); caption_mask ``(N, R, L)``: 1 = valid token. Each chunk's queries
                attend only to its own valid tokens.
            caption_dropout: per batch element (or one bool): True selects the unconditional adaLN row
                ``null_caption_embedding[-1]``, False the conditional row ``[-2]`` (the text itself
                enters only through cross-attention; pass the null caption for the null branch).
            distill_dt: step-size embedding input of distilled models (``num_steps/4*2``; required
                exactly when the config has ``distill``).
            kv_cache: cache read for chunks before ``slice_point`` and written when ``update_kv_cache``.
            slice_point: absolute index of this window's first chunk. Rope temporal positions and key
                windows are absolute; chunks ``< slice_point`` come from ``kv_cache``.
            key_windows: per chunk ``r_j`` = number of chunks it sees (itself plus ``r_j - 1``
                previous, absolute), MAGI-1's kv range; ``<= 0`` or None = all previous chunks.
            update_kv_cache: write this forward's K/V at ``slice_point``; ``write_chunks`` limits it
                to the leading chunks (the distill nearly-clean extra chunk is not cached).
        The velocity :meth:`forward` returns is ``(N, C, T, h8, w8)`` fp32, for every chunk of the window
        (callers drop the slot of a clean re-forwarded chunk).
        """
        cfg = self.config.model
        N, R, S, n, y_tok, seg_len, dropped, t_flat = self._check_inputs(
            x, t, caption, caption_mask, caption_dropout, distill_dt, kv_cache, slice_point, key_windows,
            update_kv_cache, write_chunks)
        dev, act = x.device, self.act_dtype
        p, pt = cfg.patch_size, cfg.t_patch_size

        # Embedding stage, fp32 (docs/magi1.md#embedding-stage).
        xs = x.float() * cfg.x_rescale_factor
        if cfg.half_channel_vae:
            xs = torch.cat([xs, xs], dim=1)
        xs = F.conv3d(xs, self.x_embedder.weight.float(), stride=(pt, p, p))  # (N, H, T', h, w)
        tp, hp, wp = xs.shape[2:]
        t_total = tp + (tp // R) * slice_point
        cos, sin = self.rope(t_total, hp, wp, keep_last=S)

        t_emb = self.t_embedder(t_flat, act)
        if self.config.engine.distill:
            t_emb = t_emb + self.t_embedder(torch.full_like(t_flat, float(distill_dt)), act)
        y_adaln = self.y_embedder.adaln(dropped)  # (N, Hc)
        cond = (t_emb.view(N, R, -1) + y_adaln[:, None]).to(act).reshape(N * R, -1)
        y_xattn = self.y_embedder.xattn(y_tok).to(act)

        h = xs.to(act).flatten(2).transpose(1, 2).contiguous()  # (N, S, H), T-major tokens

        # Which (batch, chunk) gate row each token uses.
        gate_index = (torch.arange(N, device=dev)[:, None] * R
                      + torch.arange(S, device=dev)[None] // n).reshape(-1).to(torch.int32)

        # Self-attention ranges over the packed [batch][cache | current] keys. Key indices are absolute
        # (chunk c owns [c*n, (c+1)*n)); without a cache the buffer starts at slice_point*n instead of 0.
        read = slice_point * n if kv_cache is not None else 0
        shift = slice_point * n - read
        sk = read + S
        one = _window_slices(n, [None if (r is None or r <= 0) else int(r) for r in
                                 (key_windows if key_windows is not None else [None] * R)], slice_point)
        sq, skr = [], []
        for b in range(N):
            for qs, qe, ks, ke in one:
                sq.append((b * S + qs, b * S + qe))
                skr.append((b * sk + ks - shift, b * sk + ke - shift))
        # Cross-attention: query chunk (b, j) against its own caption segment.
        ends = torch.cumsum(seg_len, 0).tolist()
        starts = [0] + ends[:-1]
        ctx = _ForwardContext(
            n_batch=N, seq=S, cos=cos, sin=sin, gate_index=gate_index, cond=cond,
            self_q=_ranges(sq, dev), self_k=_ranges(skr, dev), cross_q=_ranges(sq, dev),
            cross_k=_ranges(list(zip(starts, ends)), dev), y_xattn=y_xattn, kv_cache=kv_cache, read_tokens=read,
            write_tokens=(R if write_chunks is None else write_chunks) * n if update_kv_cache else 0)

        geom = {"N": N, "R": R, "S": S, "n": n, "tp": tp, "hp": hp, "wp": wp, "slice_point": slice_point,
                "read": read, "shift": shift, "window_slices": one}
        return h, ctx, geom

    @torch.no_grad()
    def finish(self, h: torch.Tensor, geom: dict) -> torch.Tensor:
        """Final norm, final linear and unpatchify (fp32) of the last layer's output ``h`` (N, S, H)."""
        cfg = self.config.model
        p, pt = cfg.patch_size, cfg.t_patch_size
        N, tp, hp, wp = geom["N"], geom["tp"], geom["hp"], geom["wp"]
        # Final stage, fp32.
        h = self.videodit_blocks.final_layernorm(h.float())
        out = _linear_fp32(self.final_linear.linear, h)  # (N, S, pt*p*p*C), C fastest
        C = cfg.out_channels
        out = out.view(N, tp, hp, wp, pt, p, p, C).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = out.reshape(N, C, tp * pt, hp * p, wp * p)
        if cfg.half_channel_vae:
            out = out[:, :cfg.latent_channels]
        return out / cfg.x_rescale_factor

    def _check_inputs(self, x, t, caption, caption_mask, caption_dropout, distill_dt, kv_cache, slice_point,
                      key_windows, update_kv_cache, write_chunks):
        cfg = self.config.model

        def bad(arg, rule):
            raise ValueError(f"VideoDiT.forward: argument '{arg}' {rule}")

        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            bad("x", f"must be a 5-D latent (N, C, T, h, w), got {getattr(x, 'shape', type(x))}")
        N, C, T, hl, wl = x.shape
        if C != cfg.latent_channels:
            bad("x", f"must have {cfg.latent_channels} channels, got {C}")
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != N:
            bad("t", f"must be (N={N}, R) per-chunk times, got {getattr(t, 'shape', t)}")
        R = t.shape[1]
        if R < 1 or T % R:
            bad("t", f"must have R >= 1 chunks dividing the latent frames T={T}, got R={R}")
        p, pt = cfg.patch_size, cfg.t_patch_size
        if (T // R) % pt or hl % p or wl % p:
            bad("x", f"must have chunk frames divisible by t_patch_size={pt} and h, w by patch_size={p}, "
                f"got shape {list(x.shape)} with R={R}")
        S = (T // pt) * (hl // p) * (wl // p)
        n = S // R
        if caption.dim() != 4 or tuple(caption.shape[:2]) != (N, R) or caption.shape[3] != cfg.caption_channels:
            bad("caption", f"must be (N={N}, R={R}, L, {cfg.caption_channels}), got {list(caption.shape)}")
        if tuple(caption_mask.shape) != tuple(caption.shape[:3]):
            bad("caption_mask", f"must be (N, R, L) = {list(caption.shape[:3])}, got {list(caption_mask.shape)}")
        mask = caption_mask.bool()
        y_tok = caption[mask].float()  # (Ny, Cc), (batch, chunk, token) order
        seg_len = mask.sum(-1).reshape(-1).cpu()
        if isinstance(caption_dropout, torch.Tensor):
            dropped = caption_dropout.to(torch.bool).reshape(-1)
        elif isinstance(caption_dropout, bool):
            dropped = torch.full((N,), caption_dropout, dtype=torch.bool)
        else:
            dropped = torch.tensor(list(caption_dropout), dtype=torch.bool)
        if dropped.numel() != N:
            bad("caption_dropout", f"must be one bool or one per batch element ({N}), got {dropped.numel()}")
        dropped = dropped.to(x.device)
        if self.config.engine.distill and distill_dt is None:
            bad("distill_dt", "is required for distilled models (step-size embedding, num_steps/4*2)")
        if not self.config.engine.distill and distill_dt is not None:
            bad("distill_dt", "must be None for non-distilled models (they have no step-size embedding)")
        if slice_point < 0:
            bad("slice_point", f"must be >= 0, got {slice_point}")
        if key_windows is not None and len(key_windows) != R:
            bad("key_windows", f"must have one entry per chunk (R={R}), got {len(key_windows)}")
        if kv_cache is None:
            if update_kv_cache:
                bad("update_kv_cache", "needs a kv_cache")
            # Without a cache nothing before slice_point exists: no window may reach below it.
            for j, r in enumerate(key_windows if key_windows is not None else [0] * R):
                lo = max(0, slice_point + j + 1 - r) if r > 0 else 0
                if lo < slice_point:
                    bad("key_windows", f"chunk {j} (absolute {slice_point + j}) sees chunks from {lo} "
                        f"but there is no kv_cache for chunks < slice_point={slice_point}")
        else:
            if kv_cache.batch != N:
                bad("kv_cache", f"has batch {kv_cache.batch}, this forward has N={N}")
            # Only the written chunks must fit: the distill self-only extra chunk is appended after the
            # window (possibly past the video's end) and is never cached.
            written = R if write_chunks is None else write_chunks
            if update_kv_cache and (slice_point + written) * n > kv_cache.capacity:
                bad("kv_cache", f"capacity {kv_cache.capacity} tokens < {(slice_point + written) * n} needed")
            if slice_point * n > kv_cache.filled:
                bad("slice_point", f"reads {slice_point * n} cached tokens but only {kv_cache.filled} were written")
        if write_chunks is not None and not 0 <= write_chunks <= R:
            bad("write_chunks", f"must be in [0, R={R}], got {write_chunks}")
        t_flat = t.reshape(-1).float()
        return N, R, S, n, y_tok, seg_len, dropped, t_flat


def _window_slices(n: int, windows: list, slice_point: int) -> list[tuple[int, int, int, int]]:
    """MAGI-1's block-causal key windows for one batch element (docs/magi1.md#attention-windows): chunk j (absolute
    a = slice_point + j) sees keys [max(0, a+1-r_j)*n, (a+1)*n); r_j None = all previous chunks."""
    return [tuple(s[:4]) for s in Magi1WindowMask(n, tuple(windows), slice_point).slices()]


def _ranges(pairs, device) -> torch.Tensor:
    """int32 [n, 2] ranges for flex_attn, kept on the host and built once per distinct window layout.

    flex_attn plans on the host, so host ranges cost no device-to-host copy; returning the same tensor for the
    same layout lets it reuse the checked ranges and the plan of the previous call (every layer, step and the
    backward). ``device`` is where the attention runs (the ranges stay on the CPU regardless). Read-only.
    """
    del device  # flex_attn accepts host ranges for device tensors
    return _host_ranges(tuple(tuple(int(x) for x in p) for p in pairs))


@functools.lru_cache(maxsize=64)
def _host_ranges(pairs: tuple) -> torch.Tensor:
    with torch.inference_mode(False):  # an inference tensor has no version counter for flex_attn's cache
        return torch.tensor(pairs, dtype=torch.int32).reshape(-1, 2)


# ---------------------------------------------------------------------------------------------------
# Construction


def build_dit(config: "str | os.PathLike | Mapping | MagiConfig", device="cpu", *, seed: int | None = 0) -> VideoDiT:
    """Build MAGI-1's DiT from a config (path to config.json, parsed dict, ``preset:NAME`` or MagiConfig).

    ``device="meta"`` allocates nothing (for loading with :func:`magi_model.loading.load_dit`).
    Otherwise the module is materialized on ``device`` with seeded random weights (``seed``; None
    leaves memory uninitialized) -- real weights come from a checkpoint.
    Parameter dtypes are those of the official model after loading: ``params_dtype`` (bf16) except
    the fp32 promotion set (:func:`is_fp32_param`) and the fp8 modules of quant configs.
    """
    cfg = load_config(config)
    device = resolve_device(device, argument="device", allow_meta=True)  # a clear error before any work
    with torch.device("meta"):
        model = VideoDiT(cfg)
    if device.type == "meta":
        return model
    model = model.to_empty(device=device)
    if seed is not None:
        init_random_weights(model, seed)
    return model.eval()


@torch.no_grad()
def init_random_weights(model: VideoDiT, seed: int = 0) -> VideoDiT:
    """Seeded random weights with sane activation scales (demo / tests; not a trained model).

    Norm weights get random (not identity) values so that a 1p/plain mix-up changes the output."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=gen) * std + mean

    def put(p, v):
        p.copy_(v.to(p.dtype) if p.dtype != FP8 else v.clamp(-FP8_MAX, FP8_MAX).to(FP8))

    one_p = model.config.model.apply_layernorm_1p
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if isinstance(mod, LayerNorm1p):
                put(p, normal(p.shape, 0.1, 0.0 if (pname == "bias" or one_p) else 1.0))
            elif isinstance(mod, nn.LayerNorm):
                put(p, normal(p.shape, 0.1, 1.0 if pname == "weight" else 0.0))
            elif full == "rope.bands":
                put(p, magi_rope_bands_init(p.numel()))
            elif full == "y_embedder.null_caption_embedding":
                put(p, normal(p.shape, 0.2))
            elif pname == "bias":
                put(p, normal(p.shape, 0.02))
            elif pname == "weight" and p.dtype != FP8:
                fan_in = p[0].numel()
                put(p, normal(p.shape, 1.0 / math.sqrt(fan_in)))
        if hasattr(mod, "weight_scale") and getattr(mod, "weight", None) is not None and mod.weight.dtype == FP8:
            _init_fp8(mod, normal)
    return model


def _init_fp8(mod, normal):
    """A consistent fp8 linear: W ~ N(0, 1/in), per-tensor weight scale, uniform activation scales."""
    _, out, inp = mod.weight.shape
    w = normal((out, inp), 1.0 / math.sqrt(inp))
    ws = w.abs().max() / FP8_MAX
    mod.weight.copy_((w / ws).clamp(-FP8_MAX, FP8_MAX).to(FP8).reshape(1, out, inp))
    mod.weight_scale.fill_(float(ws))
    s = 8.0 / FP8_MAX  # activations after LayerNorm stay well inside +-8
    mod.input_scale.fill_(s)
    if hasattr(mod, "smooth_scale"):
        mod.smooth_scale.fill_(s)


__all__ = ["VideoDiT", "KVCache", "build_dit", "init_random_weights", "is_fp32_param", "fp8_layer_ids",
           "LayerNorm1p"]
