"""Device memory per rank: weights, KV cache, activation peak, collective buffers, VAE, T5, headroom.

Weights and the KV cache are exact: the weights are the parameters of the real modules built on the
meta device (their stored dtypes: fp8 / bf16 / fp32), split into pipeline stages as MAGI-1 does; the
cache is the buffer ``magi_model.dit.KVCache`` allocates. The activation peak is a live-tensor model
of one forward (what is alive at each point of ``TransformerLayer.forward``), for two implementations:

- ``"magi_model"``: this package's DiT as written (``TransformerLayer.forward`` drops each
  intermediate after its last use; SwiGLU in fp32 row blocks of bounded size; the non-fp8 output
  projection in fp32 as MAGI-1's autocast region). Checked against a measurement on CPU
  (``tests/model/test_plan.py``).
- ``"magi1"``: MAGI-1's reference code path: fused ``silu_and_mul``, attention-block temporaries
  freed before the MLP. This is what MAGI-1's published hardware recommendations were made with.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from magi_model.config import MagiConfig
from magi_model.dit import SWIGLU_BLOCK_BYTES, build_dit, fp8_layer_ids
from magi_model.parallel.layout import stage_layers  # the split the multi-GPU DiT uses
from magi_model.plan.workload import Forward, T5_XXL, t5_params
from magi_model.vae import MAGI1_DDCONFIG, ViTVAE

IMPLEMENTATIONS = ("magi_model", "magi1")
CUDA_CONTEXT_BYTES = 600 << 20  # CUDA context + cuBLAS workspace outside torch's allocator (assumption)
NCCL_BUFFER_BYTES = 400 << 20  # NCCL channel buffers per rank when world > 1 (assumption)
FRAGMENTATION = 0.10  # caching-allocator slack on top of the activation peak (assumption)


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


_PARAMS: dict[str, tuple] = {}


def _param_table(cfg: MagiConfig) -> tuple:
    """(name, layer index or None, bytes) of every parameter of the DiT built on the meta device."""
    key = repr((cfg.model, cfg.engine.fp8_quant))
    if key not in _PARAMS:
        model = build_dit(cfg, device="meta")
        rows = []
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            layer = int(name.split(".")[2]) if name.startswith("videodit_blocks.layers.") else None
            rows.append((name, layer, p.numel() * p.element_size()))
        _PARAMS[key] = tuple(rows)
    return _PARAMS[key]


def weight_bytes(cfg: MagiConfig, pp: int = 1, stage: int | None = None) -> int:
    """Bytes of the DiT parameters one pipeline stage holds (the largest stage when ``stage`` is None).

    Every stage holds its layers and everything outside the layer stack (embedders, rope, final norm
    and linear), as ``magi_model.parallel.model.build_stage_dit`` materializes them."""
    if stage is None:
        return max(weight_bytes(cfg, pp, s) for s in range(pp))
    layers = stage_layers(cfg.model.num_layers, pp, stage)
    return sum(nbytes for _name, layer, nbytes in _param_table(cfg) if layer is None or layer in layers)


def kv_heads_per_rank(cfg: MagiConfig, cp: int) -> int:
    """KV groups each Ulysses rank holds: ng / cp, or 1 when KV heads are repeated up to cp > ng."""
    ng = cfg.model.num_query_groups
    return ng // cp if cp <= ng else 1


def kv_cache_bytes(cfg: MagiConfig, capacity_tokens: int, *, cp: int = 1, pp: int = 1) -> int:
    """``KVCache`` bytes for one stage's layers: (1, capacity, kv heads per rank, 2 d) in params_dtype."""
    m = cfg.model
    per_layer = capacity_tokens * kv_heads_per_rank(cfg, cp) * 2 * m.kv_channels * _dtype_bytes(m.params_dtype)
    return per_layer * len(stage_layers(m.num_layers, pp, 0))  # stage 0 is the largest


# ---------------------------------------------------------------------------------------------------
# Activations: live tensors of one forward on one rank


@dataclasses.dataclass
class Phase:
    name: str
    parts: dict  # tensor -> bytes

    @property
    def bytes(self) -> int:
        return int(sum(self.parts.values()))


def activation_phases(cfg: MagiConfig, fwd: Forward, *, cp: int = 1, implementation: str = "magi_model",
                      fp8_layer: bool | None = None, reference_ops: bool = False) -> list[Phase]:
    """Live bytes at the peak points of one forward on one Ulysses rank (inputs and weights excluded).

    ``reference_ops``: the ops run their torch reference (CPU), which adds fp32 temporaries."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"plan: argument 'implementation' must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    m = cfg.model
    a = _dtype_bytes(m.params_dtype)
    H, nh, d, Fh = m.hidden_size, m.num_attention_heads, m.kv_channels, m.ffn_hidden_size
    ngr = kv_heads_per_rank(cfg, cp)
    tot = fwd.tokens
    tl = math.ceil(tot / cp)  # tokens per rank in the token-parallel parts
    keys = fwd.batch * (fwd.cache_read_tokens + fwd.chunks * fwd.chunk_tokens)
    ny = sum(fwd.caption_tokens)
    if fp8_layer is None:
        fp8_layer = cfg.engine.fp8_quant and len(fp8_layer_ids(m.num_layers)) > 0
    glu = m.gated_linear_unit
    f1 = 2 * Fh if glu else Fh

    forward_wide = {  # held by the forward context for every layer
        "residual stream (layer input)": tl * H * a,
        "caption projection": ny * m.xattn_hidden * a,
        "rope cos+sin fp32": 2 * tl * 3 * m.rope_bands * 4,
        "gate index": tl * 4,
    }
    embedding = {  # VideoDiT.prepare: caption tokens, fp32 patch embedding and its bf16 copy
        "caption tokens fp32": ny * m.caption_channels * 4, "caption projection fp32": ny * m.xattn_hidden * 4,
        "patch embedding fp32": tl * H * 4, **forward_wide,
    }
    layer_base = {
        "pre-norm": tl * H * a,
        "q": tot * (nh // cp) * d * a,
        "k": tot * ngr * d * a,
        "v": tot * ngr * d * a,
    }
    kv = {"kv (cache layout)": tot * ngr * 2 * d * a}
    if fwd.cache_read_tokens:
        kv["kv with cache"] = keys * ngr * 2 * d * a
    attn_out = {"self-attention out": tot * (nh // cp) * d * a, "cross q": tl * nh * d * a,
                "cross-attention out": tl * nh * d * a}
    proj_in = 2 * nh * d
    if fp8_layer:
        proj = {"proj input fp8": tl * proj_in, "proj out": tl * H * a}
    else:
        proj = {"proj input fp32": tl * proj_in * 4, "proj weight fp32": proj_in * H * 4, "proj out fp32": tl * H * 4}
    proj_out = {k: v for k, v in proj.items() if "out" in k}
    post = {"attention residual out": tl * H * a}
    # The torch reference of gated_post_norm_residual (what runs on CPU) materializes the gathered gate
    # rows and four fp32 (tokens, H) intermediates; the GPU kernels keep them in registers.
    ref_temps = {"post-norm reference temporaries": tl * H * (a + 4 * 4)} if reference_ops else {}
    if implementation == "magi_model":
        # TransformerLayer.forward drops every intermediate after its last use: q / k / v after the
        # self-attention, the pre-norm after the cross q, both attention outputs once stacked, the
        # projection after the post-norm. The K/V concatenation lives only inside the self-attention call.
        fp8_copy = 1 if fp8_layer else 0  # fp8 linears quantize their input (1 byte per element)
        if glu:  # silu_and_mul: fp32 row blocks (block in, silu out, product) next to fc1 out and the result
            block_rows = min(tl, max(1, SWIGLU_BLOCK_BYTES // (4 * Fh)))
            act = tl * (f1 * a + Fh * a) + 3 * block_rows * Fh * 4
        else:  # GELU: fc1 out and its activation
            act = tl * 2 * f1 * a
        mlp_peak = max(tl * (H * (a + fp8_copy) + f1 * a),  # pre-norm (+ fp8 copy) and fc1 out
                       act,
                       tl * (Fh * (a + fp8_copy) + H * a))  # activation (+ fp8 copy) and fc2 out
        phases = [
            Phase("embedding", embedding),
            Phase("attention", {**forward_wide, **layer_base, **kv, "attention lse fp32": tot * (nh // cp) * 4,
                                "self-attention out": attn_out["self-attention out"]}),
            Phase("cross-attention", {**forward_wide, "pre-norm": layer_base["pre-norm"], **attn_out}),
            Phase("output projection", {**forward_wide, "proj input stacked": tl * proj_in * a, **proj}),
            Phase("attention post-norm", {**forward_wide, **proj_out, **post, **ref_temps}),
            Phase("mlp", {**forward_wide, **post, "mlp transient peak": mlp_peak}),
            Phase("mlp post-norm", {**forward_wide, **post, "mlp out": tl * H * a, "layer out": tl * H * a,
                                    **ref_temps}),
        ]
    else:
        mlp = {"pre-norm": tl * H * a, "fc1 out": tl * f1 * a, "activation out": tl * Fh * a, "fc2 out": tl * H * a}
        phases = [
            Phase("embedding", embedding),
            Phase("attention", {**forward_wide, **layer_base, **kv, **attn_out}),
            Phase("output projection", {**forward_wide, **kv, **attn_out, **proj}),
            Phase("mlp", {**forward_wide, **post, **mlp}),
        ]
    if cp > 1:  # Ulysses all-to-all: the sequence-sharded copy of q / kv / out is alive next to the head-sharded one
        a2a = tot * (nh // cp) * d * a
        # this package's layer drops the head-sharded copies inside the attention call
        around = ("attention",) if implementation == "magi_model" else ("attention", "output projection")
        for ph in phases:
            if ph.name in around:
                ph.parts["all-to-all buffer"] = a2a
    return phases


def activation_peak(cfg: MagiConfig, fwd: Forward, *, cp: int = 1, implementation: str = "magi_model",
                    reference_ops: bool = False) -> Phase:
    """The largest phase over the layer kinds of this model (fp8 and bf16 layers differ)."""
    kinds = [False]
    if cfg.engine.fp8_quant and len(fp8_layer_ids(cfg.model.num_layers)):
        kinds.append(True)
    phases = [p for k in kinds for p in activation_phases(cfg, fwd, cp=cp, implementation=implementation,
                                                          fp8_layer=k, reference_ops=reference_ops)]
    return max(phases, key=lambda p: p.bytes)


# ---------------------------------------------------------------------------------------------------
# VAE and T5


@functools.lru_cache(maxsize=4)
def vae_weight_bytes(dtype: torch.dtype = torch.bfloat16) -> int:
    with torch.device("meta"):
        vae = ViTVAE(MAGI1_DDCONFIG)
    return sum(p.numel() for p in vae.parameters()) * _dtype_bytes(dtype)


def vae_decode_transient_bytes(chunk_frames: int, h8: int, w8: int, dd: dict = MAGI1_DDCONFIG) -> int:
    """One tile's activations (bf16) plus the chunk's decoded tiles and the assembled chunk (bf16 pixels)."""
    lt, ls = 12 // dd["patch_length"], dd["video_size"] // dd["patch_size"]
    seq = lt * ls * ls + 1
    D = dd["embed_dim"]
    tile = seq * (3 * D + 3 * D + 2 * D + 2 * int(D * dd["mlp_ratio"])) * 2
    pixels = 3 * chunk_frames * dd["patch_length"] * h8 * 8 * w8 * 8 * 2
    return tile + 2 * pixels  # decoded (overlapping) tiles + the cropped, concatenated chunk


def t5_weight_bytes() -> int:
    return t5_params(T5_XXL) * 4  # fp32


__all__ = ["IMPLEMENTATIONS", "Phase", "weight_bytes", "stage_layers", "kv_heads_per_rank", "kv_cache_bytes",
           "activation_phases", "activation_peak", "vae_weight_bytes", "vae_decode_transient_bytes",
           "t5_weight_bytes", "CUDA_CONTEXT_BYTES", "NCCL_BUFFER_BYTES", "FRAGMENTATION"]
