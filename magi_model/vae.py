"""MAGI-1's transformer VAE (``ViTVAE``, docs/magi1.md#vae): ViT encoder / decoder over 4x8x8 patches, tiled
encode / decode and MAGI-1's pixel conversions.

Parameter names are those of MAGI-1's VAE checkpoint (``encoder.*`` / ``decoder.*``), so
``<vae_pretrained>/diffusion_pytorch_model.safetensors`` loads strictly with :func:`load_vae`.

Structure (D = embed_dim, h = num_heads):
- encoder: Conv3d patchify (k = s = (patch_length, patch_size, patch_size)) -> tokens, prepend
  cls_token, add pos_embed (trilinearly resized when the tile's grid differs from the reference grid)
  -> depth x Block -> LayerNorm -> Linear(D -> 2 z) -> drop cls -> (B, 2z, T', H', W'); the latent is
  the posterior mean (first z channels).
- decoder: Linear(z -> D) -> cls + pos_embed -> depth x Block -> LayerNorm -> drop cls -> unpatchify
  to D / (pT pH pW) channels -> Conv3d(k=3, pad=1) to RGB.
- Block: ``x + attn(x)`` (no pre-norm: the norm is inside attention, ``ln_in_attn``), then
  ``x + mlp(norm2(x))``; attention normalizes q, k AND v per head with ``(x - mean) / (std + 1e-5)``
  (biased std, no affine), full (non-causal) softmax attention, scale 1/sqrt(head_dim).

Precision: MAGI-1 runs the VAE in bf16; ``dtype`` selects it (tests use fp32 for exact checks).
Attention goes through ``magi_kernels``' flex_attn (one full range per batch element).
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from magi_model.attention import range_attention, ranges_tensor
from magi_model.device import resolve_device

# MAGI-1-VAE's ddconfig (``ckpt/vae/config.json`` in the sand-ai/MAGI-1 Hugging Face repo).
MAGI1_DDCONFIG = {
    "video_size": 256, "video_length": 16, "patch_size": 8, "patch_length": 4, "in_chans": 3, "z_chans": 16,
    "double_z": True, "embed_dim": 1024, "depth": 24, "num_heads": 16, "mlp_ratio": 4, "qkv_bias": True,
    "with_cls_token": True, "ln_in_attn": True, "conv_last_layer": True, "use_rope": False,
}
# Random-weight demo VAE (the tiny preset): same structure, 64 px reference tiles, D = 256 so the
# decoder unpatchifies to D / (4*8*8) = 1 channel.
TINY_DDCONFIG = dict(MAGI1_DDCONFIG, video_size=64, embed_dim=256, depth=2, num_heads=4)

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
NORM_EPS = 1e-5  # nn.LayerNorm default, used by norm / norm2
QKV_NORM_EPS = 1e-5  # added to the std (not the variance) in the q/k/v normalization
SPATIAL_OVERLAP = 0.25  # MAGI-1's TileProcessor: 25 % spatial overlap, none in time
# Tile sizes of MAGI-1's pipeline (``inference/pipeline/video_process.py``): 256 x 256 px spatial tiles
# and fps // 2 = 12 frames in time, whatever the ddconfig's reference video_size is.
TILE_PX = 256
TILE_FRAMES = 12


class VAEError(ValueError):
    """A VAE config / checkpoint / input that cannot be used; the message names the argument."""


def _check_ddconfig(dd: Mapping) -> dict:
    missing = [k for k in ("video_size", "video_length", "patch_size", "patch_length", "in_chans", "z_chans",
                           "embed_dim", "depth", "num_heads") if k not in dd]
    if missing:
        raise VAEError(f"vae ddconfig: missing fields {missing}")
    dd = dict(MAGI1_DDCONFIG, **dd)
    if dd["embed_dim"] % dd["num_heads"]:
        raise VAEError(f"vae ddconfig: embed_dim ({dd['embed_dim']}) must be divisible by num_heads "
                       f"({dd['num_heads']})")
    unpatch = dd["patch_length"] * dd["patch_size"] ** 2
    if dd["embed_dim"] % unpatch:
        raise VAEError(f"vae ddconfig: embed_dim ({dd['embed_dim']}) must be a multiple of patch_length * "
                       f"patch_size^2 = {unpatch} (the decoder unpatchifies the tokens)")
    if not dd.get("with_cls_token", True) or not dd.get("ln_in_attn", True) or not dd.get("conv_last_layer", True):
        raise VAEError("vae ddconfig: only MAGI-1's layout is implemented (with_cls_token, ln_in_attn, "
                       "conv_last_layer all true)")
    if dd.get("use_rope", False):
        raise VAEError("vae ddconfig: use_rope=true is not used by MAGI-1-VAE and not implemented")
    return dd


def _qkv_norm(x: torch.Tensor) -> torch.Tensor:
    # MAGI-1's ManualLayerNorm (inference/model/vae/vae_module.py): std (biased) + eps, not
    # sqrt(var + eps), and every step in x's own dtype (bf16 in MAGI-1): mean and std are reduced
    # and rounded to x's dtype, then x - mean, std + eps and the quotient each round again.
    mean = x.mean(-1, keepdim=True)
    std = x.std(-1, keepdim=True, unbiased=False)
    return (x - mean) / (std + QKV_NORM_EPS)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        h = self.num_heads
        qkv = _qkv_norm(self.qkv(x).view(B, N, 3, h, C // h))
        q, k, v = (qkv[:, :, i].reshape(B * N, h, C // h) for i in range(3))
        rng = ranges_tensor([(b * N, (b + 1) * N) for b in range(B)], x.device)
        o = range_attention(q, k, v, rng, rng)
        return self.proj(o.reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(self.norm2(x))


class _ViTBase(nn.Module):
    def __init__(self, dd: dict):
        super().__init__()
        D = dd["embed_dim"]
        self.grid = (dd["video_length"] // dd["patch_length"], dd["video_size"] // dd["patch_size"],
                     dd["video_size"] // dd["patch_size"])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.grid) + 1, D))
        self.blocks = nn.ModuleList([Block(D, dd["num_heads"], dd["mlp_ratio"], dd["qkv_bias"])
                                     for _ in range(dd["depth"])])
        self.norm = nn.LayerNorm(D, eps=NORM_EPS)

    def _pos(self, grid) -> torch.Tensor:
        pe = self.pos_embed
        if tuple(grid) == self.grid:
            return pe
        # Tiles whose token grid differs from the reference grid get a trilinearly resized table
        # (the cls position is kept as is).
        D = pe.shape[-1]
        body = pe[:, 1:].reshape(1, *self.grid, D).permute(0, 4, 1, 2, 3)
        body = F.interpolate(body.float(), size=tuple(grid), mode="trilinear", align_corners=False).to(pe.dtype)
        return torch.cat([pe[:, :1], body.flatten(2).transpose(1, 2)], dim=1)

    def _transformer(self, tokens: torch.Tensor, grid) -> torch.Tensor:
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        x = x + self._pos(grid).to(x.dtype)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 1:]


class ViTEncoder(_ViTBase):
    def __init__(self, dd: dict):
        super().__init__(dd)
        pl, ps = dd["patch_length"], dd["patch_size"]
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(dd["in_chans"], dd["embed_dim"], kernel_size=(pl, ps, ps),
                                          stride=(pl, ps, ps))
        self.last_layer = nn.Linear(dd["embed_dim"], dd["z_chans"] * (2 if dd["double_z"] else 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> moments (B, 2z, T/pl, H/ps, W/ps)."""
        x = self.patch_embed.proj(x)
        B, D, t, h, w = x.shape
        y = self.last_layer(self._transformer(x.flatten(2).transpose(1, 2), (t, h, w)))
        return y.transpose(1, 2).reshape(B, -1, t, h, w)


class ViTDecoder(_ViTBase):
    def __init__(self, dd: dict):
        super().__init__(dd)
        self.pl, self.ps = dd["patch_length"], dd["patch_size"]
        self.unpatch = dd["embed_dim"] // (self.pl * self.ps * self.ps)
        self.proj_in = nn.Linear(dd["z_chans"], dd["embed_dim"])
        self.last_layer = nn.Conv3d(self.unpatch, dd["in_chans"], kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, z, t, h, w) -> (B, 3, t*pl, h*ps, w*ps)."""
        B, _, t, h, w = z.shape
        x = self._transformer(self.proj_in(z.flatten(2).transpose(1, 2)), (t, h, w))
        pl, ps, c = self.pl, self.ps, self.unpatch
        x = x.reshape(B, t, h, w, pl, ps, ps, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return self.last_layer(x.reshape(B, c, t * pl, h * ps, w * ps))


def _check_tiles(who: str, tile_frames, tile_px, temporal_factor: int, spatial_factor: int) -> None:
    for name, v in (("tile_sample_min_length", tile_frames), ("tile_sample_min_size", tile_px)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise VAEError(f"{who}: argument '{name}' must be a positive integer, got {v!r}")
    if tile_frames % temporal_factor:
        raise VAEError(f"{who}: argument 'tile_sample_min_length' must be a multiple of the temporal factor "
                       f"({temporal_factor}) so each tile is whole latent frames, got {tile_frames}")
    if tile_px % (4 * spatial_factor):
        # 1/4 overlap of a tile, in latents: tile_px / spatial_factor must be divisible by 4 for the
        # pixel stride and the latent crop to agree.
        raise VAEError(f"{who}: argument 'tile_sample_min_size' must be a multiple of {4 * spatial_factor} "
                       f"(4 x the spatial factor, for the 1/4 tile overlap), got {tile_px}")


class ViTVAE(nn.Module):
    """MAGI-1-VAE. ``encode`` / ``decode`` are tiled as MAGI-1's TileProcessor; ``encode_tile`` /
    ``decode_tile`` run one tile (the untiled model).

    Tiles: ``tile_sample_min_length`` frames (MAGI-1: fps // 2 = 12) x ``tile_sample_min_size`` px
    squares (MAGI-1: 256), overlapping by 1/4 in space; decode tiles are the same sizes in latents.
    ``encode`` / ``decode`` also take per-call overrides."""

    def __init__(self, ddconfig: Mapping, *, tile_sample_min_length: int = TILE_FRAMES,
                 tile_sample_min_size: int = TILE_PX):
        super().__init__()
        self.ddconfig = _check_ddconfig(ddconfig)
        dd = self.ddconfig
        self.encoder = ViTEncoder(dd)
        self.decoder = ViTDecoder(dd)
        self.z_chans = dd["z_chans"]
        self.temporal_factor, self.spatial_factor = dd["patch_length"], dd["patch_size"]
        _check_tiles("ViTVAE", tile_sample_min_length, tile_sample_min_size, self.temporal_factor,
                     self.spatial_factor)
        self.tile_frames = tile_sample_min_length
        self.tile_px = tile_sample_min_size

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.pos_embed.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.pos_embed.device

    # ---------------------------------------------------------------- untiled
    @torch.no_grad()
    def encode_tile(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior mean (B, z, T/4, H/8, W/8) of one tile (no tiling)."""
        return self.encoder(x.to(self.dtype))[:, :self.z_chans]

    @torch.no_grad()
    def decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z.to(self.dtype))

    # ---------------------------------------------------------------- tiled
    def _check(self, name, x, factor_t, factor_s):
        if x.dim() != 5:
            raise VAEError(f"ViTVAE.{name}: argument must be 5-D (B, C, T, H, W), got {list(x.shape)}")
        if x.shape[3] % factor_s or x.shape[4] % factor_s:
            raise VAEError(f"ViTVAE.{name}: height and width must be multiples of {factor_s}, got {list(x.shape)}")

    def _tiles(self, who: str, tile_frames: Optional[int], tile_px: Optional[int]) -> tuple[int, int]:
        tf = self.tile_frames if tile_frames is None else tile_frames
        tp = self.tile_px if tile_px is None else tile_px
        _check_tiles(f"ViTVAE.{who}", tf, tp, self.temporal_factor, self.spatial_factor)
        return tf, tp

    @torch.no_grad()
    def encode(self, x: torch.Tensor, *, tile_sample_min_length: Optional[int] = None,
               tile_sample_min_size: Optional[int] = None, run_tiles=None) -> torch.Tensor:
        """Pixels (B, 3, T, H, W) in [-1, 1] -> latent mean (B, z, T', H/8, W/8), tiled as MAGI-1's
        ``TileProcessor.tiled_encode``: tiles of ``tile_frames`` x ``tile_px``^2 px, spatial stride 3/4
        of the tile, each latent tile blended in place against its already-blended neighbours."""
        self._check("encode", x, self.temporal_factor, self.spatial_factor)
        tf, tp = self._tiles("encode", tile_sample_min_length, tile_sample_min_size)
        lat = tp // self.spatial_factor
        keep, ramp = int(lat * (1 - SPATIAL_OVERLAP)), int(lat * SPATIAL_OVERLAP)
        stride_px = int(tp * (1 - SPATIAL_OVERLAP))
        return tiled(self.encode_tile, x, tile=(tf, tp, tp), stride=(tf, stride_px, stride_px),
                     blend=(0, ramp, ramp), crop=(tf // self.temporal_factor, keep, keep), blend_against="blended",
                     run_tiles=run_tiles)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, *, tile_sample_min_length: Optional[int] = None,
               tile_sample_min_size: Optional[int] = None, run_tiles=None) -> torch.Tensor:
        """Latents (B, z, t, h, w) -> pixels (B, 3, 4t, 8h, 8w), tiled as MAGI-1's
        ``TileProcessor.tiled_decode`` (3 x 32 x 32 latent tiles at MAGI-1's sizes): each decoded tile
        is blended against its neighbours' decoded, NOT yet blended, pixels."""
        self._check("decode", z, 1, 1)
        tf, tp = self._tiles("decode", tile_sample_min_length, tile_sample_min_size)
        lt, ls = tf // self.temporal_factor, tp // self.spatial_factor
        stride = int(ls * (1 - SPATIAL_OVERLAP))
        keep, ramp = int(tp * (1 - SPATIAL_OVERLAP)), int(tp * SPATIAL_OVERLAP)
        return tiled(self.decode_tile, z, tile=(lt, ls, ls), stride=(lt, stride, stride), blend=(0, ramp, ramp),
                     crop=(tf, keep, keep), blend_against="decoded", run_tiles=run_tiles)


def _blend(a: torch.Tensor, b: torch.Tensor, dim: int, extent: int, *, rounding: str) -> None:
    """In place: the first ``extent`` slices of ``b`` along ``dim`` ramp linearly from ``a``'s last ones,
    ``b[i] = a[-e + i] * (1 - i/e) + b[i] * (i/e)``.

    ``rounding="each_op"`` rounds every product and the sum to b's dtype (MAGI-1's eager blends in
    ``tiled_encode``); ``"once"`` computes in at least fp32 and rounds once (``tiled_decode`` runs its
    blends through ``torch.compile``, whose fused kernel keeps the intermediates in fp32)."""
    e = min(a.shape[dim], b.shape[dim], extent)
    wide = torch.promote_types(b.dtype, torch.float32)
    for i in range(e):
        bi, ai = b.select(dim, i), a.select(dim, a.shape[dim] - e + i)
        if rounding == "once":
            bi.copy_(ai.to(wide) * (1 - i / e) + bi.to(wide) * (i / e))
        else:
            bi.copy_(ai * (1 - i / e) + bi * (i / e))


def tiled(fn, x: torch.Tensor, *, tile, stride, blend, crop, blend_against: str, run_tiles=None) -> torch.Tensor:
    """MAGI-1's TileProcessor on one device: run ``fn`` on overlapping tiles of x (dims T, H, W), blend
    each output tile against its predecessor along t, then h, then w, crop each to ``crop`` and
    concatenate. Tiles start every ``stride`` (the last ones may be smaller).

    ``blend_against="blended"`` (``tiled_encode``): tiles are blended in place in scan order, so a
    tile's predecessors are already blended. ``"decoded"`` (``tiled_decode``): every tile is blended
    against its predecessors' raw ``fn`` outputs, kept aside for that purpose.

    ``run_tiles(fn, tiles) -> outputs`` evaluates ``fn`` on the list of tile inputs (default: one after
    the other); tiles are independent, so it may spread them over devices (magi_model.parallel.vae)."""
    if blend_against not in ("blended", "decoded"):
        raise ValueError(f"tiled: argument 'blend_against' must be 'blended' or 'decoded', got {blend_against!r}")
    T, H, W = x.shape[2:]
    starts = [list(range(0, max(n, 1), st)) for n, st in zip((T, H, W), stride)]
    raw, out = {}, {}
    in_place = blend_against == "blended"
    rounding = "each_op" if in_place else "once"
    grid = [(i, j, k) for i in range(len(starts[0])) for j in range(len(starts[1])) for k in range(len(starts[2]))]
    inputs = [x[:, :, starts[0][i]:starts[0][i] + tile[0], starts[1][j]:starts[1][j] + tile[1],
                starts[2][k]:starts[2][k] + tile[2]] for i, j, k in grid]
    outputs = run_tiles(fn, inputs) if run_tiles is not None else [fn(t) for t in inputs]
    for (i, j, k), y in zip(grid, outputs):  # blend in scan order (t, then h, then w)
        raw[i, j, k] = y
        src = out if in_place else raw
        if not in_place:
            y = y.clone()
        if i:
            _blend(src[i - 1, j, k], y, 2, blend[0], rounding=rounding)
        if j:
            _blend(src[i, j - 1, k], y, 3, blend[1], rounding=rounding)
        if k:
            _blend(src[i, j, k - 1], y, 4, blend[2], rounding=rounding)
        out[i, j, k] = y
    rows_t = []
    for i in range(len(starts[0])):
        rows_h = []
        for j in range(len(starts[1])):
            rows_h.append(torch.cat([out[i, j, k][:, :, :crop[0], :crop[1], :crop[2]]
                                     for k in range(len(starts[2]))], dim=4))
        rows_t.append(torch.cat(rows_h, dim=3))
    return torch.cat(rows_t, dim=2)


# --------------------------------------------------------------------------------------------------
# Pixel conversions (docs/magi1.md#vae)


# PyTorch's CUDA kernel divides by a scalar as a multiplication by its fp32 reciprocal; MAGI-1 runs
# ``uint8 / 127.5 - 1.0`` on the GPU, so this is the factor its inputs see (bit-exact on any device).
_INV_127_5 = float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(127.5, dtype=torch.float32))


def pixels_to_input(frames: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """uint8 frames (T, H, W, 3) -> VAE input (1, 3, T, H, W) = x / 127.5 - 1, as MAGI-1 computes it:
    in fp32, then rounded once to ``dtype``."""
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        raise VAEError(f"pixels_to_input: argument 'frames' must be uint8 (T, H, W, 3), got "
                       f"{frames.dtype} {list(frames.shape)}")
    x = frames.permute(3, 0, 1, 2)[None].to(torch.float32) * _INV_127_5 - 1.0
    return x.to(dtype)


def output_to_pixels(x: torch.Tensor) -> torch.Tensor:
    """VAE output (1, 3, T, H, W) -> uint8 (T, H, W, 3): ``(x*127.5 + 127.5).clamp(0, 255)`` in bf16,
    then a truncating cast (MAGI-1's arithmetic, rounding included)."""
    y = (x.to(torch.bfloat16) * 127.5 + 127.5).clamp(0, 255).to(torch.uint8)
    return y[0].permute(1, 2, 3, 0).contiguous()


@torch.no_grad()
def encode_image(vae: ViTVAE, image: torch.Tensor, scale_factor: float, run_tiles=None) -> torch.Tensor:
    """I2V prefix: uint8 (H, W, 3) -> the frame repeated 4x, encoded, first latent frame, x scale."""
    x = pixels_to_input(image[None].expand(vae.temporal_factor, -1, -1, -1), vae.dtype)
    return vae.encode(x, run_tiles=run_tiles)[:, :, :1].float() * scale_factor


@torch.no_grad()
def encode_video(vae: ViTVAE, frames: torch.Tensor, scale_factor: float, run_tiles=None) -> torch.Tensor:
    """V2V prefix: uint8 (T, H, W, 3) -> tiled encode -> x scale (12-frame tiles: 32 frames -> 8 latents)."""
    return vae.encode(pixels_to_input(frames, vae.dtype), run_tiles=run_tiles).float() * scale_factor


@torch.no_grad()
def decode_latents(vae: ViTVAE, latents: torch.Tensor, scale_factor: float, run_tiles=None) -> torch.Tensor:
    """Scaled latents (1, z, t, h, w) -> uint8 frames (4t, 8h, 8w, 3) (``run_tiles``: see :func:`tiled`)."""
    return output_to_pixels(vae.decode((latents / scale_factor).to(vae.dtype), run_tiles=run_tiles))


# --------------------------------------------------------------------------------------------------
# Construction / loading


@torch.no_grad()
def init_random_weights(vae: ViTVAE, seed: int = 0) -> ViTVAE:
    """Seeded random weights with sane activation scales (demo / tests; not a trained VAE)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in vae.named_parameters():
        if name.endswith(("norm.weight", "norm2.weight")):
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        elif name.endswith(("cls_token", "pos_embed")):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        else:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
    return vae


def build_vae(ddconfig: Optional[Mapping] = None, *, dtype=torch.bfloat16, device="cpu", seed: Optional[int] = 0,
              tile_sample_min_length: int = TILE_FRAMES, tile_sample_min_size: int = TILE_PX) -> ViTVAE:
    """A VAE from a ddconfig (default MAGI-1-VAE's); ``seed`` fills seeded random weights, None leaves
    them uninitialized (to be loaded). Tiles default to MAGI-1's (12 frames x 256 px)."""
    device = resolve_device(device, argument="device")
    vae = ViTVAE(ddconfig or MAGI1_DDCONFIG, tile_sample_min_length=tile_sample_min_length,
                 tile_sample_min_size=tile_sample_min_size)
    if seed is not None:
        init_random_weights(vae, seed)
    return vae.to(device=device, dtype=dtype).eval()


def tiny_vae(seed: int = 0, dtype=torch.float32, tile_sample_min_length: int = TILE_FRAMES,
             tile_sample_min_size: int = TINY_DDCONFIG["video_size"]) -> ViTVAE:
    """The tiny preset's VAE: MAGI-1-VAE's structure at demo size, seeded RANDOM weights. Its spatial
    tiles default to its 64 px reference size (not MAGI-1's 256 px), so the 128 px demo video still
    goes through 2 x 2 tiles and their blends."""
    return build_vae(TINY_DDCONFIG, dtype=dtype, seed=seed, tile_sample_min_length=tile_sample_min_length,
                     tile_sample_min_size=tile_sample_min_size)


def check_vae_folder(path: str) -> tuple[dict, str]:
    """Check MAGI-1-VAE's folder without reading weights: ``config.json`` (``_class_name: ViTVAE``, a
    usable ``ddconfig``) and the safetensors header (every key and shape the model needs). Returns the
    ddconfig and the weights file's path; raises VAEError naming the file otherwise."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise VAEError(f"vae_pretrained: {path!r} has no config.json (expected MAGI-1-VAE's folder)")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VAEError(f"vae_pretrained: {cfg_path} is not readable JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("_class_name") != "ViTVAE":
        got = cfg.get("_class_name") if isinstance(cfg, dict) else type(cfg).__name__
        raise VAEError(f"vae_pretrained: {cfg_path} has _class_name {got!r}, expected 'ViTVAE'")
    if not isinstance(cfg.get("ddconfig"), dict):
        raise VAEError(f"vae_pretrained: {cfg_path} has no 'ddconfig' dict")
    with torch.device("meta"):
        want = ViTVAE(cfg["ddconfig"]).state_dict()
    wpath = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(wpath):
        raise VAEError(f"vae_pretrained: {path!r} has no {WEIGHTS_FILE}")
    from safetensors import safe_open

    try:
        with safe_open(wpath, framework="pt", device="cpu") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # truncated file, garbage, oversized header: safetensors' message lacks the path
        raise VAEError(f"vae checkpoint {wpath}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    missing = sorted(set(want) - set(found))
    unexpected = sorted(set(found) - set(want))
    shapes = sorted(k for k in set(want) & set(found) if tuple(want[k].shape) != found[k])
    if missing or unexpected or shapes:
        raise VAEError(f"vae checkpoint {wpath}: missing {missing[:10]}{'...' if len(missing) > 10 else ''}, "
                       f"unexpected {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}, mis-shaped "
                       + ", ".join(f"{k} {list(found[k])} vs {list(want[k].shape)}" for k in shapes[:10]))
    return cfg["ddconfig"], wpath


def load_vae(path: str, *, dtype=torch.bfloat16, device="cpu", tile_sample_min_length: int = TILE_FRAMES,
             tile_sample_min_size: int = TILE_PX, check_finite: bool = False) -> ViTVAE:
    """MAGI-1-VAE from ``<path>/config.json`` (``_class_name: ViTVAE``, ``ddconfig``) and
    ``<path>/diffusion_pytorch_model.safetensors``, strictly (every key, every shape).
    ``check_finite``: fail naming the tensor and file if any weight holds NaN or inf."""
    device = resolve_device(device, argument="device")
    ddconfig, wpath = check_vae_folder(path)
    from safetensors.torch import load_file

    vae = ViTVAE(ddconfig, tile_sample_min_length=tile_sample_min_length, tile_sample_min_size=tile_sample_min_size)
    try:
        sd = load_file(wpath)
    except Exception as e:
        raise VAEError(f"vae checkpoint {wpath}: cannot read its tensors ({type(e).__name__}: {e})") from None
    if check_finite:
        from magi_model.loading import assert_finite

        assert_finite(sd.items(), source=wpath)
    vae.load_state_dict(sd, strict=True)
    return vae.to(device=device, dtype=dtype).eval()


__all__ = ["ViTVAE", "VAEError", "MAGI1_DDCONFIG", "TINY_DDCONFIG", "TILE_PX", "TILE_FRAMES", "build_vae", "tiny_vae",
           "load_vae", "check_vae_folder", "tiled",
           "pixels_to_input", "output_to_pixels", "encode_image", "encode_video", "decode_latents",
           "init_random_weights"]
