"""Triton kernel for qk_norm_rope: per-token LayerNorm/RMSNorm of q and k, then rotary, in one launch.

Math (fp32 inside, see magi_kernels/reference/qk_norm_rope.py):

    mu   = mean(x)             over D ("head" scope) or H*D ("hidden" scope); 0 for RMSNorm
    rstd = 1 / sqrt(mean((x - mu)^2) + eps)
    y    = (x - mu) * rstd * gamma + beta          gamma = weight + weight_offset
    rotary on y[:r]:  lo' = lo*cos - hi*sin,  hi' = lo*sin + hi*cos
        NeoX pairs (i, i + r/2) and interleaved pairs (2i, 2i + 1) both use cos/sin column i.

Design (a bandwidth-bound kernel: every input element is read once from HBM, every output written once):

* "head" scope: a program owns a [BLOCK_H, BLOCK_D] register tile whose rows are consecutive
  (token, head) pairs of one tensor, so the tile is full whatever the head count; the norm reduces
  along each row.
* "hidden" scope: a program owns one token. Heads are packed, so the token's H*D elements are one
  contiguous row: the statistics are reduced over the whole row held in registers ([1, BLOCK_D]),
  then the row is normalized, rotated and stored in CHUNK-wide pieces, re-reading x from L1/L2.
  That bounds the registers of the rotary stage by CHUNK instead of the row length.
* The rotary partner of element d (d +- r/2, or d ^ 1) sits in another lane, so instead of a
  cross-lane exchange we load it a second time: the line was just fetched, so the second load hits
  L1, and the partner is normalized with the row's already-computed statistics.
* q programs come first in the grid, k programs after them: one launch for both tensors, one copy of
  the code (per-tensor arguments are selected by program id).
* Tensor dtypes are *runtime* codes, not part of the compiled signature: q/k/outputs are passed as
  uint8 views and reinterpreted inside the kernel. The dtype branch is uniform across the grid
  (free), and it keeps the set of compiled kernels -- which the AOT checker compiles and inspects
  for every arch -- to the block shapes alone instead of block shapes x 9 dtype pairs.
* Cheap switches (norm kind, affine presence, rotary width and layout) are runtime arguments for the
  same reason; only the tile shape and the reduction scope are compile-time constants.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from magi_kernels.kernels.triton._io import DTYPE_CODE, check_i32, dummy, erase, load_f32, row_warps, store_f32
from magi_kernels.kernels.triton.aot import AotConfig, KernelLaunch, register_aot

OP = "qk_norm_rope"

BLOCK_D_CHOICES = (32, 64, 128, 256, 512)
# "head" scope: every program gets HEAD_TILE elements (BLOCK_H = HEAD_TILE // BLOCK_D rows) at 4 warps:
# 8 elements per thread per live array, which keeps the rotary gathers within ~128 registers.
HEAD_TILE = 1024
HEAD_WARPS = 4
# "hidden" scope: one token's H*D row as a [1, BLOCK_D] tile, BLOCK_D a power of two in
# [HIDDEN_MIN_TILE, HIDDEN_MAX_TILE] (a floor keeps the config set small; masked lanes are cheap).
# Longer rows are declined by supports(). The rotary stage runs in chunks of 8 elements per thread.
HIDDEN_MIN_TILE = 1024
HIDDEN_MAX_TILE = 8192
ELEMS_PER_THREAD = 8


@triton.jit
def _row_stats(xv, mask, n, is_rms, eps):
    """Per-row mean and 1/std of a tile (reduced along axis 1, dims kept for broadcasting).

    Two-pass from registers (no second HBM read): the mean, then the biased variance of x - mean
    (numerically safer than E[x^2] - mean^2). RMSNorm is the same with the mean fixed at 0.
    """
    mean = tl.where(is_rms != 0, 0.0, tl.sum(xv, axis=1, keep_dims=True) / n)
    xc = tl.where(mask, xv - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1, keep_dims=True) / n + eps)
    return mean, rstd


@triton.jit
def _normalize_rotate_store(x, xv, head_base, out_off, t, h, d, mask, mean, rstd, out, w, b, has_w, has_b,
                            gamma_offset, w_head_stride, cos, sin, cos_rows, in_kind, out_kind, rotary_dim,
                            interleaved):
    """y = (x - mean) * rstd * gamma + beta, rotated on d < rotary_dim, stored at out[out_off].

    xv holds x at head_base + d (masked lanes 0); t, h, d, mask broadcast to xv's shape.
    """
    # gamma = weight + offset; without a weight the host passes offset' = (offset or 1) and has_w = 0,
    # so the masked-off load yields 0 and gamma = offset'. Weight index: d ("head" scope: one [D]
    # weight, w_head_stride 0) or h * D + d ("hidden" scope: one weight per element of the row).
    # (tl.where rather than `mask & flag`: the interpreter mistypes a tensor-scalar `&`.)
    w_idx = h * w_head_stride + d
    gamma = tl.load(w + w_idx, mask=tl.where(has_w != 0, mask, False), other=0.0) + gamma_offset
    beta = tl.load(b + w_idx, mask=tl.where(has_b != 0, mask, False), other=0.0)
    y = (xv - mean) * rstd * gamma + beta

    # Rotary on the first rotary_dim dims of each head. "lo" is the first element of a pair (it
    # subtracts hi*sin); both elements of a pair use cos/sin column `cs_col`.
    half = rotary_dim // 2
    inter = interleaved != 0
    lo = tl.where(inter, (d % 2) == 0, d < half)
    partner = tl.where(inter, d ^ 1, tl.where(lo, d + half, d - half))
    cs_col = tl.where(inter, d // 2, tl.where(lo, d, d - half))
    rot = mask & (d < rotary_dim)
    # The partner's raw value again (an L1 hit: the same lines as xv), normalized with the same stats.
    xp = load_f32(x, head_base + partner, rot, in_kind)
    p_idx = h * w_head_stride + partner
    gamma_p = tl.load(w + p_idx, mask=tl.where(has_w != 0, rot, False), other=0.0) + gamma_offset
    beta_p = tl.load(b + p_idx, mask=tl.where(has_b != 0, rot, False), other=0.0)
    yp = (xp - mean) * rstd * gamma_p + beta_p
    cs_idx = (t % cos_rows) * half + cs_col
    c = tl.load(cos + cs_idx, mask=rot, other=1.0)
    s = tl.load(sin + cs_idx, mask=rot, other=0.0)
    y = tl.where(rot, y * c + tl.where(lo, -yp, yp) * s, y)
    store_f32(out, out_off, y, mask, out_kind)


@triton.jit
def _qk_norm_rope_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr,
                         q_weight_ptr, q_bias_ptr, k_weight_ptr, k_bias_ptr,
                         q_has_weight, q_has_bias, k_has_weight, k_has_bias,
                         q_gamma_offset: tl.float32, k_gamma_offset: tl.float32,
                         num_tokens, q_heads, k_heads, head_dim, cos_rows, stride_q_token, stride_k_token, q_tiles,
                         in_kind, out_kind, is_rms, eps: tl.float32, rotary_dim, interleaved,
                         BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, HIDDEN: tl.constexpr,
                         CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    # Programs [0, q_tiles) normalize q, the rest k: one launch for both tensors. Selecting the
    # per-tensor arguments (rather than an if/else around two inlined copies of the body) keeps one
    # copy of the code: half the compile time and instruction-cache footprint.
    is_q = pid < q_tiles
    x = tl.where(is_q, q_ptr, k_ptr)
    out = tl.where(is_q, q_out_ptr, k_out_ptr)
    x_stride_t = tl.where(is_q, stride_q_token, stride_k_token)
    w = tl.where(is_q, q_weight_ptr, k_weight_ptr)
    b = tl.where(is_q, q_bias_ptr, k_bias_ptr)
    has_w = tl.where(is_q, q_has_weight, k_has_weight)
    has_b = tl.where(is_q, q_has_bias, k_has_bias)
    gamma_offset = tl.where(is_q, q_gamma_offset, k_gamma_offset)
    H = tl.where(is_q, q_heads, k_heads)
    D = head_dim
    tile = tl.where(is_q, pid, pid - q_tiles)

    if HIDDEN:
        # One token per program; its H*D elements are contiguous (packed heads): one row of n.
        t = tile
        n = H * D
        row_base = t.to(tl.int64) * x_stride_t
        e_all = tl.arange(0, BLOCK_D)[None, :]
        mean, rstd = _row_stats(load_f32(x, row_base + e_all, e_all < n, in_kind), e_all < n, n, is_rms, eps)
        # Normalize + rotate + store CHUNK elements at a time; x comes back from L1/L2, not HBM.
        for c0 in range(0, BLOCK_D, CHUNK):
            e = c0 + tl.arange(0, CHUNK)[None, :]
            h = e // D
            d = e % D
            mask = e < n
            xv = load_f32(x, row_base + e, mask, in_kind)
            _normalize_rotate_store(x, xv, row_base + h * D, t.to(tl.int64) * n + e, t, h, d, mask, mean, rstd,
                                    out, w, b, has_w, has_b, gamma_offset, D, cos_ptr, sin_ptr, cos_rows, in_kind,
                                    out_kind, rotary_dim, interleaved)
    else:
        # Rows are consecutive (token, head) pairs; launch() guarantees T * H fits in int32.
        row = tile * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        t = row // H
        h = row % H
        mask = (row < num_tokens * H) & (d < D)
        # Token offsets in int64: T * stride can exceed 2^31 elements for long videos.
        head_base = t.to(tl.int64) * x_stride_t + h * D
        xv = load_f32(x, head_base + d, mask, in_kind)
        mean, rstd = _row_stats(xv, mask, D, is_rms, eps)
        # Outputs are contiguous [T, H, D]: row * D + d.
        _normalize_rotate_store(x, xv, head_base, row.to(tl.int64) * D + d, t, h, d, mask, mean, rstd,
                                out, w, b, has_w, has_b, gamma_offset, 0, cos_ptr, sin_ptr, cos_rows, in_kind,
                                out_kind, rotary_dim, interleaved)


# --------------------------------------------------------------------------------------------------
# Shipped configurations (each is compiled and inspected by `python -m magi_kernels.tools.aot_check`)

_KERNEL = f"{__name__}:_qk_norm_rope_kernel"
# Pointer element types ("u8" = dtype-erased tensor); the rest of the signature follows from the kernel's
# parameter names (magi_kernels/kernels/triton/aot.py).
_POINTER_DTYPES = {"q_ptr": "u8", "k_ptr": "u8", "q_out_ptr": "u8", "k_out_ptr": "u8", "cos_ptr": "fp32",
                   "sin_ptr": "fp32", "q_weight_ptr": "fp32", "q_bias_ptr": "fp32", "k_weight_ptr": "fp32",
                   "k_bias_ptr": "fp32"}


def _make_config(hidden: bool, block_h: int, block_d: int) -> AotConfig:
    warps = row_warps(block_d) if hidden else HEAD_WARPS
    chunk = min(block_d, warps * 32 * ELEMS_PER_THREAD) if hidden else block_d
    scope = f"hidden CHUNK={chunk}" if hidden else "head"
    return AotConfig(kernel=_KERNEL, name=OP, config=f"{scope} BLOCK_H={block_h} BLOCK_D={block_d} w{warps}",
                     pointer_dtypes=_POINTER_DTYPES,
                     constexprs={"BLOCK_H": block_h, "BLOCK_D": block_d, "HIDDEN": hidden, "CHUNK": chunk},
                     num_warps=warps, num_stages=1)


def _all_configs() -> dict[tuple[bool, int, int], AotConfig]:
    cfgs = {}
    for bd in BLOCK_D_CHOICES:
        cfgs[(False, HEAD_TILE // bd, bd)] = _make_config(False, HEAD_TILE // bd, bd)
    tile = HIDDEN_MIN_TILE
    while tile <= HIDDEN_MAX_TILE:
        cfgs[(True, 1, tile)] = _make_config(True, 1, tile)
        tile *= 2
    return cfgs


_CONFIGS = _all_configs()
for _cfg in _CONFIGS.values():
    register_aot(_cfg)


def shipped_configs() -> list[AotConfig]:
    """Every config launch() can select (all registered with the AOT checker at import)."""
    return list(_CONFIGS.values())


def select_config(head_dim: int, hq: int, hk: int, norm_scope: str) -> AotConfig:
    """The shipped config for a call; raises ValueError (naming the limit) when none fits."""
    if not 1 <= head_dim <= BLOCK_D_CHOICES[-1]:
        raise ValueError(f"{OP}: head_dim must be in [1, {BLOCK_D_CHOICES[-1]}] for the Triton kernel, got {head_dim}")
    if norm_scope == "head":
        bd = max(BLOCK_D_CHOICES[0], triton.next_power_of_2(head_dim))
        return _CONFIGS[(False, HEAD_TILE // bd, bd)]
    if norm_scope != "hidden":
        raise ValueError(f"{OP}: norm_scope must be 'head' or 'hidden', got {norm_scope!r}")
    row = max(hq, hk) * head_dim
    if row > HIDDEN_MAX_TILE:
        raise ValueError(f"{OP}: norm_scope='hidden' keeps a whole token row in registers, so max(Hq, Hk) * "
                         f"head_dim must be <= {HIDDEN_MAX_TILE} for the Triton kernel, got {row}")
    return _CONFIGS[(True, 1, max(HIDDEN_MIN_TILE, triton.next_power_of_2(row)))]


# --------------------------------------------------------------------------------------------------
# Host side


def supports(a) -> str | None:
    """None if the Triton kernel can run this ``QkNormRopeArgs`` call, else why not (device rules:
    ``magi_kernels.kernels.triton.device_reason``)."""
    if a.q.dtype not in DTYPE_CODE:
        return f"q dtype {a.q.dtype} is not fp32/fp16/bf16"
    try:
        select_config(a.head_dim, a.q.shape[1], a.k.shape[1], a.norm_scope)
    except ValueError as e:
        return str(e)
    return None


def make_launch(a, q_out: torch.Tensor, k_out: torch.Tensor) -> KernelLaunch:
    """Map validated QkNormRopeArgs (+ contiguous outputs) to a shipped config, grid, and kernel args."""
    T, hq, d = a.q.shape
    hk = a.k.shape[1]
    if a.q.dtype not in DTYPE_CODE or q_out.dtype not in DTYPE_CODE:
        raise ValueError(f"{OP}: q and q_out must be fp32/fp16/bf16, got {a.q.dtype} and {q_out.dtype}")
    if k_out.dtype != q_out.dtype:
        raise ValueError(f"{OP}: k_out must have q_out's dtype {q_out.dtype}, got {k_out.dtype}")
    if not (q_out.is_contiguous() and k_out.is_contiguous()):
        raise ValueError(f"{OP}: q_out and k_out must be contiguous [T, H, D]")
    cfg = select_config(d, hq, hk, a.norm_scope)
    bh = cfg.constexprs["BLOCK_H"]
    hidden = a.norm_scope == "hidden"
    if hidden:
        q_tiles, k_tiles = T, T
    else:
        q_tiles, k_tiles = triton.cdiv(T * hq, bh), triton.cdiv(T * hk, bh)
    check_i32(OP, rows=T * max(hq, hk), q_token_stride=a.q.stride(0), k_token_stride=a.k.stride(0),
               programs=q_tiles + k_tiles)

    absent = dummy(a.q.device)
    rope = a.rotary_dim > 0
    cos = a.cos if rope else absent
    sin = a.sin if rope else absent

    def gamma_offset(w):
        # No weight: gamma is the offset alone, or 1 when the offset is 0 too (the reference's rule).
        return a.weight_offset if (w is not None or a.weight_offset != 0.0) else 1.0

    args = dict(
        q_ptr=erase(a.q), k_ptr=erase(a.k), q_out_ptr=erase(q_out), k_out_ptr=erase(k_out), cos_ptr=cos, sin_ptr=sin,
        q_weight_ptr=a.q_weight if a.q_weight is not None else absent,
        q_bias_ptr=a.q_bias if a.q_bias is not None else absent,
        k_weight_ptr=a.k_weight if a.k_weight is not None else absent,
        k_bias_ptr=a.k_bias if a.k_bias is not None else absent,
        q_has_weight=int(a.q_weight is not None), q_has_bias=int(a.q_bias is not None),
        k_has_weight=int(a.k_weight is not None), k_has_bias=int(a.k_bias is not None),
        q_gamma_offset=float(gamma_offset(a.q_weight)), k_gamma_offset=float(gamma_offset(a.k_weight)),
        num_tokens=T, q_heads=hq, k_heads=hk, head_dim=d, cos_rows=a.cos.shape[0] if rope else 1,
        stride_q_token=a.q.stride(0), stride_k_token=a.k.stride(0), q_tiles=q_tiles,
        in_kind=DTYPE_CODE[a.q.dtype], out_kind=DTYPE_CODE[q_out.dtype], is_rms=int(a.norm == "rmsnorm"),
        eps=float(a.eps), rotary_dim=int(a.rotary_dim), interleaved=int(a.interleaved),
    )
    return KernelLaunch(cfg, (q_tiles + k_tiles,), args)


def launch(a, q_out: torch.Tensor, k_out: torch.Tensor) -> None:
    """Write qk_norm_rope(a) into q_out [T, Hq, D] and k_out [T, Hk, D] (contiguous) with one launch."""
    if a.q.shape[0] == 0:
        return
    make_launch(a, q_out, k_out).run()
