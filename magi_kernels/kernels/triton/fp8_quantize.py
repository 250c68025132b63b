"""Triton fp8 (e4m3fn) quantization: static per-tensor / per-channel divisors and dynamic per-row,
1x128 and 128x128 block scales. Semantics: magi_kernels.reference.fp8 (module docstring).

The e4m3 byte is built with integer arithmetic (round-to-nearest-even on the fp32 bits) and stored through
a uint8 view, rather than with ``.to(tl.float8e4nv)``: the Triton interpreter's fp32->fp8 cast rounds
half-up without carrying into the exponent (e.g. 126.5 -> 64) and mangles NaN, so a cast would make the
CPU-tested path differ from the GPU one. The bit recipe gives torch's rounding on both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from magi_kernels.kernels.triton._io import round_to_bf16_grid
from magi_kernels.kernels.triton.aot import AotConfig, KernelLaunch, register_aot
from magi_kernels.reference.fp8 import AMAX_FLOOR, E4M3_MAX

# Globals a @triton.jit function reads must be tl.constexpr.
_AMAX_FLOOR = tl.constexpr(AMAX_FLOOR)
_QMAX = tl.constexpr(E4M3_MAX)

MODES = {"tensor": 0, "channel": 1, "row": 2, "block1x128": 3, "block128x128": 4}


@triton.jit
def _e4m3_code(y):
    # y: fp32 with |y| <= 448 or NaN. Returns the e4m3fn byte (int32), round-to-nearest-even.
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    mag_bits = bits & 0x7FFFFFFF
    mag = mag_bits.to(tl.float32, bitcast=True)
    # Normal range (>= 2^-6): keep 3 mantissa bits, RNE; a mantissa carry bumps the exponent correctly.
    rn = (mag_bits + 0x7FFFF + ((mag_bits >> 20) & 1)) & 0x7FF00000
    normal = (((rn >> 23) - 120) << 3) | ((rn >> 20) & 7)
    # Subnormal range: multiples of 2^-9. Adding 2^14 (whose fp32 ulp is 2^-9) rounds to that grid, RNE;
    # the result times 512 is the code 0..8 (8 = 2^-6, the smallest normal, code 0x08 as well).
    sub = (((mag + 16384.0) - 16384.0) * 512.0).to(tl.int32)
    code = tl.where(mag < 0.015625, sub, normal)
    code = tl.where(y != y, 0x7F, code)
    return code | sign


@triton.jit
def _quantize_tile(x, s, BF16_ROUND: tl.constexpr):
    y = tl.math.div_rn(x, s)  # IEEE division: '/' lowers to an approximate divide on NVIDIA
    y = tl.where(y != y, y, tl.minimum(tl.maximum(y, -448.0), 448.0))  # min/max would drop NaN
    if BF16_ROUND:
        y = round_to_bf16_grid(y)
    return _e4m3_code(y).to(tl.uint8)


@triton.jit
def _dyn_scale(x, AXIS: tl.constexpr, AMAX_MIN: tl.constexpr, QMAX: tl.constexpr):
    # amax over AXIS (None = whole tile); NaN scale when the group holds NaN/inf (x * 0 is then NaN).
    ax = tl.abs(x)
    bad = (x * 0.0) != 0.0
    if AXIS is None:
        amax = tl.max(tl.max(ax, axis=1), axis=0)
        nb = tl.max(tl.max(bad.to(tl.int32), axis=1), axis=0)
    else:
        amax = tl.max(ax, axis=AXIS)
        nb = tl.max(bad.to(tl.int32), axis=AXIS)
    s = tl.maximum(amax, AMAX_MIN) / QMAX
    return tl.where(nb > 0, float("nan"), s)


@triton.jit
def _fp8_quantize_kernel(x_ptr, q_ptr, scale_ptr, scale_out_ptr, n_rows, n_cols, stride_xm, stride_qm,
                      stride_scale_out_row, MODE: tl.constexpr, BF16_ROUND: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < n_rows
    if MODE == 2:
        # Per row: pass 1 finds each row's amax over all of n_cols, pass 2 quantizes.
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        nb = tl.zeros((BLOCK_M,), dtype=tl.int32)
        for k0 in range(0, n_cols, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            msk = m_ok[:, None] & (offs_k[None, :] < n_cols)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=msk, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
            nb = tl.maximum(nb, tl.max(((x * 0.0) != 0.0).to(tl.int32), axis=1))
        s = tl.where(nb > 0, float("nan"), tl.maximum(amax, _AMAX_FLOOR) / _QMAX)
        tl.store(scale_out_ptr + offs_m * stride_scale_out_row, s, mask=m_ok)
        for k0 in range(0, n_cols, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            msk = m_ok[:, None] & (offs_k[None, :] < n_cols)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=msk, other=0.0).to(tl.float32)
            q = _quantize_tile(x, s[:, None], BF16_ROUND)
            tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :], q, mask=msk)
    else:
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        msk = m_ok[:, None] & (offs_k[None, :] < n_cols)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=msk, other=0.0).to(tl.float32)
        if MODE == 0:
            q = _quantize_tile(x, tl.load(scale_ptr), BF16_ROUND)
        elif MODE == 1:
            q = _quantize_tile(x, tl.load(scale_ptr + offs_k, mask=offs_k < n_cols, other=1.0)[None, :], BF16_ROUND)
        elif MODE == 3:
            s = _dyn_scale(x, 1, _AMAX_FLOOR, _QMAX)  # one scale per row of this 1 x 128 block
            tl.store(scale_out_ptr + offs_m * stride_scale_out_row + pid_k, s, mask=m_ok)
            q = _quantize_tile(x, s[:, None], BF16_ROUND)
        else:
            s = _dyn_scale(x, None, _AMAX_FLOOR, _QMAX)  # one scale for the 128 x 128 tile
            tl.store(scale_out_ptr + pid_m * stride_scale_out_row + pid_k, s)
            q = _quantize_tile(x, s, BF16_ROUND)
        tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :], q, mask=msk)


def _tiles(mode: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps) per mode: block modes are pinned to the 128-wide scale groups."""
    return {0: (32, 128, 4), 1: (32, 128, 4), 2: (16, 256, 4), 3: (32, 128, 4), 4: (128, 128, 8)}[mode]


def _shipped() -> dict[tuple[int, bool], AotConfig]:
    """(mode, bf16_round) -> config. Compiled for bf16 input; fp16/fp32 inputs use the same tiles."""
    pointers = {"x_ptr": "bf16", "q_ptr": "u8", "scale_ptr": "fp32", "scale_out_ptr": "fp32"}
    cfgs = {}
    for name, mode in MODES.items():
        bm, bk, nw = _tiles(mode)
        for bf16_round in (False, True):
            cfgs[(mode, bf16_round)] = register_aot(AotConfig(
                kernel=f"{__name__}:_fp8_quantize_kernel", name="fp8_quantize",
                config=f"{name} {'bf16-round ' if bf16_round else ''}{bm}x{bk} w{nw} bf16-in",
                pointer_dtypes=pointers, constexprs=dict(MODE=mode, BF16_ROUND=bf16_round, BLOCK_M=bm, BLOCK_K=bk),
                num_warps=nw, num_stages=1, archs=(89, 90), mma=None))
    return cfgs


_CONFIGS = _shipped()


def supports(a) -> str | None:
    return None  # integer/fp32 arithmetic only; runs on any CUDA GPU Triton supports


def launch(args, q: torch.Tensor, scale_out: torch.Tensor) -> None:
    """Quantize ``args.x`` [M, K] into q (e4m3 [M, K]) and write the fp32 scale into ``scale_out``."""
    x = args.x
    m, k = x.shape
    gran = args.granularity
    static = args.scale is not None
    s_in = args.scale
    if gran == "tensor" and not static:
        # Per-tensor amax needs a grid-wide reduction; one torch reduction, then the static kernel.
        from magi_kernels.reference.fp8 import dynamic_scale_ref

        s_in = dynamic_scale_ref(x, "tensor")
    mode = MODES[gran]
    cfg = _CONFIGS[(mode, bool(args.bf16_round))]
    bm, bk = cfg.constexprs["BLOCK_M"], cfg.constexprs["BLOCK_K"]
    if mode == 2:
        grid = (triton.cdiv(m, bm), 1)
    else:
        grid = (triton.cdiv(m, bm), triton.cdiv(k, bk))
    so = scale_out if mode in (2, 3, 4) else q  # unused pointer when the scale is an input
    KernelLaunch(cfg, grid, dict(
        x_ptr=x, q_ptr=q.view(torch.uint8), scale_ptr=s_in if s_in is not None else scale_out, scale_out_ptr=so,
        n_rows=m, n_cols=k, stride_xm=x.stride(0), stride_qm=q.stride(0),
        stride_scale_out_row=scale_out.stride(0) if mode in (2, 3, 4) else 0)).run()
    if mode in (0, 1):
        scale_out.copy_(s_in.reshape(scale_out.shape))
