"""Triton kernel for gated_post_norm_residual: ``out = residual + norm(x * gate[gate_index]) * gamma + beta``.

Math per token t (fp32 inside, see magi_kernels/reference/gated_post_norm_residual.py):

    y    = x[t] * gate[gate_index[t]]            (gate row t when there is no gate_index)
    mu   = mean(y)                               0 for RMSNorm
    rstd = 1 / sqrt(mean((y - mu)^2) + eps)
    out  = residual[t] + (y - mu) * rstd * gamma + beta,   gamma = weight + weight_offset

Design (bandwidth-bound: x, residual and the gate row are read once, out written once):

* Short rows (BLOCK_N <= ROW_TILE): a program owns a [BLOCK_T, BLOCK_N] register tile of whole
  rows, packed so every program moves ROW_TILE elements.
* Long rows: a program owns one row. The statistics need the whole row, which is held in registers
  once; the output stage then runs CHUNK elements at a time, re-reading x and the gate row from
  L1/L2 (not HBM), so its registers are bounded by CHUNK instead of the row length.
* The statistics are two-pass from registers (mean, then the variance of y - mean), so numerics
  match the reference without a second read of x.
* A gate_index outside [0, G) must never read out of bounds: the gate load for that row is masked off
  and the row is written as NaN, which any downstream check will notice.
* The four tensor dtypes (x, gate, residual, out; each fp32/fp16/bf16) are runtime codes: tensors are
  passed as uint8 views and reinterpreted in the kernel. A compile-time dtype would multiply the
  shipped (and AOT-checked) configs by 81; the branch on a uniform runtime code costs nothing.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from magi_kernels.kernels.triton._io import DTYPE_CODE, check_i32, dummy, erase, load_f32, row_warps, store_f32
from magi_kernels.kernels.triton.aot import AotConfig, KernelLaunch, register_aot

OP = "gated_post_norm_residual"

# BLOCK_N choices: powers of two from 32 up to MAX_HIDDEN (the statistics hold a whole row in registers).
MIN_BLOCK_N = 32
MAX_HIDDEN = 8192
# Short rows are packed BLOCK_T = ROW_TILE // BLOCK_N to a program (8 elements per thread at 4 warps).
ROW_TILE = 1024
ELEMS_PER_THREAD = 8


# --------------------------------------------------------------------------------------------------
# Device helpers (dtype-erased loads and stores: magi_kernels/kernels/triton/_io.py)


@triton.jit
def _gated_rows(x, gate, rows, g, g_ok, cols, mask, x_stride, gate_stride, x_kind, gate_kind):
    """y = x[rows] * gate[g] in fp32 (0 where masked; the gate load is also masked for a bad index g)."""
    xv = load_f32(x, rows.to(tl.int64) * x_stride + cols, mask, x_kind)
    gv = load_f32(gate, g.to(tl.int64) * gate_stride + cols, mask & g_ok, gate_kind)
    return xv * gv


@triton.jit
def _finish(y, mean, rstd, residual, out, w, b, rows, g_ok, cols, col_ok, mask, H, res_stride, res_kind, out_kind,
            has_w, has_b, gamma_offset):
    """out = residual + (y - mean) * rstd * gamma + beta; NaN for rows with a bad gate index."""
    # gamma = weight + offset; with no weight the host passes has_w = 0 and offset' = (offset or 1).
    # (tl.where rather than `col_ok & flag`: the interpreter mistypes a tensor-scalar `&`.)
    gamma = tl.load(w + cols, mask=tl.where(has_w != 0, col_ok, False), other=0.0) + gamma_offset
    beta = tl.load(b + cols, mask=tl.where(has_b != 0, col_ok, False), other=0.0)
    # The residual is loaded only now: it is not needed for the statistics, so it never has to stay
    # live in registers across the reductions.
    res = load_f32(residual, rows.to(tl.int64) * res_stride + cols, mask, res_kind)
    o = res + ((y - mean) * rstd * gamma + beta)
    o = tl.where(g_ok, o, float("nan"))
    store_f32(out, rows.to(tl.int64) * H + cols, o, mask, out_kind)


@triton.jit
def _gated_post_norm_residual_kernel(x_ptr, gate_ptr, residual_ptr, out_ptr, gate_index_ptr, weight_ptr, bias_ptr,
                                     num_tokens, hidden, gate_rows, stride_x_token, stride_gate_row,
                                     stride_residual_token, x_kind, gate_kind, res_kind, out_kind,
                                     has_index, has_w, has_b, is_rms, gamma_offset: tl.float32, eps: tl.float32,
                                     BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    # launch() guarantees num_tokens fits in int32; row offsets are formed in int64 in the helpers.
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]
    row_ok = rows < num_tokens

    # Which gate row each token uses; an index outside [0, gate_rows) turns its row into NaN and its gate
    # load is masked off, so a bad index never reads out of bounds.
    g = tl.where(has_index != 0,
                 tl.load(gate_index_ptr + rows, mask=tl.where(has_index != 0, row_ok, False), other=0), rows)
    g_ok = (g >= 0) & (g < gate_rows)

    # Statistics over the whole row, two-pass from registers: mean, then the biased variance of
    # y - mean. RMSNorm is the same with the mean fixed at 0.
    cols = tl.arange(0, BLOCK_N)[None, :]
    col_ok = cols < hidden
    mask = row_ok & col_ok
    y = _gated_rows(x_ptr, gate_ptr, rows, g, g_ok, cols, mask, stride_x_token, stride_gate_row, x_kind, gate_kind)
    mean = tl.where(is_rms != 0, 0.0, tl.sum(y, axis=1, keep_dims=True) / hidden)
    yc = tl.where(mask, y - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(yc * yc, axis=1, keep_dims=True) / hidden + eps)

    if CHUNK == BLOCK_N:
        # Short rows: the tile is still in registers.
        _finish(y, mean, rstd, residual_ptr, out_ptr, weight_ptr, bias_ptr, rows, g_ok, cols, col_ok, mask, hidden,
                stride_residual_token, res_kind, out_kind, has_w, has_b, gamma_offset)
    else:
        # Long rows: output CHUNK columns at a time, recomputing y from x and gate (L1/L2 hits).
        for c0 in range(0, BLOCK_N, CHUNK):
            cc = c0 + tl.arange(0, CHUNK)[None, :]
            cc_ok = cc < hidden
            cmask = row_ok & cc_ok
            yy = _gated_rows(x_ptr, gate_ptr, rows, g, g_ok, cc, cmask, stride_x_token, stride_gate_row, x_kind,
                             gate_kind)
            _finish(yy, mean, rstd, residual_ptr, out_ptr, weight_ptr, bias_ptr, rows, g_ok, cc, cc_ok, cmask, hidden,
                    stride_residual_token, res_kind, out_kind, has_w, has_b, gamma_offset)


# --------------------------------------------------------------------------------------------------
# Shipped configurations (each is compiled and inspected by `python -m magi_kernels.tools.aot_check`)

_KERNEL = f"{__name__}:_gated_post_norm_residual_kernel"
# Pointer element types ("u8" = dtype-erased tensor); the rest of the signature follows from the kernel's
# parameter names (magi_kernels/kernels/triton/aot.py).
_POINTER_DTYPES = {"x_ptr": "u8", "gate_ptr": "u8", "residual_ptr": "u8", "out_ptr": "u8", "gate_index_ptr": "i32",
                   "weight_ptr": "fp32", "bias_ptr": "fp32"}


def _make_config(block_n: int) -> AotConfig:
    block_t = max(1, ROW_TILE // block_n)
    warps = row_warps(block_t * block_n)
    chunk = min(block_n, warps * 32 * ELEMS_PER_THREAD) if block_n > ROW_TILE else block_n
    return AotConfig(kernel=_KERNEL, name=OP, config=f"BLOCK_T={block_t} BLOCK_N={block_n} CHUNK={chunk} w{warps}",
                     pointer_dtypes=_POINTER_DTYPES,
                     constexprs={"BLOCK_T": block_t, "BLOCK_N": block_n, "CHUNK": chunk},
                     num_warps=warps, num_stages=1)


def _all_configs() -> dict[int, AotConfig]:
    cfgs, bn = {}, MIN_BLOCK_N
    while bn <= MAX_HIDDEN:
        cfgs[bn] = _make_config(bn)
        bn *= 2
    return cfgs


_CONFIGS = _all_configs()
for _cfg in _CONFIGS.values():
    register_aot(_cfg)


def shipped_configs() -> list[AotConfig]:
    """Every config launch() can select (all registered with the AOT checker at import)."""
    return list(_CONFIGS.values())


def select_config(hidden: int) -> AotConfig:
    """The shipped config for a hidden size; raises ValueError (naming the limit) when none fits."""
    if not 1 <= hidden <= MAX_HIDDEN:
        raise ValueError(f"{OP}: hidden size must be in [1, {MAX_HIDDEN}] for the Triton kernel "
                         f"(its statistics keep a whole row in registers), got {hidden}")
    return _CONFIGS[max(MIN_BLOCK_N, triton.next_power_of_2(hidden))]


# --------------------------------------------------------------------------------------------------
# Host side


def supports(a) -> str | None:
    """None if the Triton kernel can run this ``GatedPostNormArgs`` call, else why not (device rules:
    ``magi_kernels.kernels.triton.device_reason``)."""
    for what, dt in (("x", a.x.dtype), ("gate", a.gate.dtype), ("residual", a.residual.dtype)):
        if dt not in DTYPE_CODE:
            return f"{what} dtype {dt} is not fp32/fp16/bf16"
    try:
        select_config(a.hidden)
    except ValueError as e:
        return str(e)
    return None


def make_launch(a, out: torch.Tensor) -> KernelLaunch:
    """Map validated GatedPostNormArgs (+ a contiguous [T, H] output) to a shipped config, grid, and args."""
    T, H = a.x.shape
    for name, t in (("x", a.x), ("gate", a.gate), ("residual", a.residual), ("out", out)):
        if t.dtype not in DTYPE_CODE:
            raise ValueError(f"{OP}: {name} must be fp32/fp16/bf16, got {t.dtype}")
    if not out.is_contiguous():
        raise ValueError(f"{OP}: out must be contiguous [T, H]")
    if a.gate_index is not None and a.gate_index.dtype != torch.int32:
        raise ValueError(f"{OP}: gate_index must be int32 (make_args converts it), got {a.gate_index.dtype}")
    cfg = select_config(H)
    tiles = triton.cdiv(T, cfg.constexprs["BLOCK_T"])
    check_i32(OP, tokens=T + cfg.constexprs["BLOCK_T"], gate_rows=a.gate.shape[0], x_row_stride=a.x.stride(0),
               gate_row_stride=a.gate.stride(0), residual_row_stride=a.residual.stride(0), programs=tiles)

    dev = a.x.device
    gamma_offset = a.weight_offset if (a.weight is not None or a.weight_offset != 0.0) else 1.0
    args = dict(
        x_ptr=erase(a.x), gate_ptr=erase(a.gate), residual_ptr=erase(a.residual), out_ptr=erase(out),
        gate_index_ptr=a.gate_index if a.gate_index is not None else dummy(dev, torch.int32),
        weight_ptr=a.weight if a.weight is not None else dummy(dev, torch.float32),
        bias_ptr=a.bias if a.bias is not None else dummy(dev, torch.float32),
        num_tokens=T, hidden=H, gate_rows=a.gate.shape[0], stride_x_token=a.x.stride(0),
        stride_gate_row=a.gate.stride(0), stride_residual_token=a.residual.stride(0),
        x_kind=DTYPE_CODE[a.x.dtype], gate_kind=DTYPE_CODE[a.gate.dtype], res_kind=DTYPE_CODE[a.residual.dtype],
        out_kind=DTYPE_CODE[out.dtype], has_index=int(a.gate_index is not None), has_w=int(a.weight is not None),
        has_b=int(a.bias is not None), is_rms=int(a.norm == "rmsnorm"), gamma_offset=float(gamma_offset),
        eps=float(a.eps),
    )
    return KernelLaunch(cfg, (tiles,), args)


def launch(a, out: torch.Tensor) -> None:
    """Write gated_post_norm_residual(a) into out [T, H] (contiguous)."""
    if a.x.shape[0] == 0:
        return
    make_launch(a, out).run()
