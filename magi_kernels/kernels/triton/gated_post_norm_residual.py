"""Triton kernel for gated_post_norm_residual: ``out = residual + norm(x * gate[gate_index]) * gamma + beta``.

Math per token t (fp32 inside, see magi_kernels/reference/norm_rope.py):

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

from magi_kernels.kernels.triton._io import Plan, check_i32, dummy, erase, load_f32, row_warps, store_f32
from magi_kernels.kernels.triton.aot import AotConfig, register_aot

OP = "gated_post_norm_residual"

FP32, FP16, BF16 = 0, 1, 2
_DTYPE_CODE = {torch.float32: FP32, torch.float16: FP16, torch.bfloat16: BF16}

# BLOCK_N choices: powers of two from 32 up to MAX_HIDDEN (the statistics hold a whole row in registers).
MIN_BLOCK_N = 32
MAX_HIDDEN = 8192
# Short rows are packed BLOCK_T = ROW_TILE // BLOCK_N to a program (8 elements per thread at 4 warps).
ROW_TILE = 1024
ELEMS_PER_THREAD = 8


# --------------------------------------------------------------------------------------------------
# dtype-erased loads and stores (twins of the helpers in qk_norm_rope.py; kernel modules stay
# self-contained)


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
def _gated_post_norm_residual_kernel(x, gate, residual, out, gate_index, w, b,
                                     T, H, G, x_stride, gate_stride, res_stride,
                                     x_kind, gate_kind, res_kind, out_kind,
                                     has_index, has_w, has_b, is_rms, gamma_offset, eps,
                                     BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    # launch() guarantees T fits in int32; row offsets are formed in int64 in the helpers.
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]
    row_ok = rows < T

    # Which gate row each token uses; an index outside [0, G) turns its row into NaN and its gate
    # load is masked off, so a bad index never reads out of bounds.
    g = tl.where(has_index != 0, tl.load(gate_index + rows, mask=tl.where(has_index != 0, row_ok, False), other=0),
                 rows)
    g_ok = (g >= 0) & (g < G)

    # Statistics over the whole row, two-pass from registers: mean, then the biased variance of
    # y - mean. RMSNorm is the same with the mean fixed at 0.
    cols = tl.arange(0, BLOCK_N)[None, :]
    col_ok = cols < H
    mask = row_ok & col_ok
    y = _gated_rows(x, gate, rows, g, g_ok, cols, mask, x_stride, gate_stride, x_kind, gate_kind)
    mean = tl.where(is_rms != 0, 0.0, tl.sum(y, axis=1, keep_dims=True) / H)
    yc = tl.where(mask, y - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(yc * yc, axis=1, keep_dims=True) / H + eps)

    if CHUNK == BLOCK_N:
        # Short rows: the tile is still in registers.
        _finish(y, mean, rstd, residual, out, w, b, rows, g_ok, cols, col_ok, mask, H, res_stride, res_kind,
                out_kind, has_w, has_b, gamma_offset)
    else:
        # Long rows: output CHUNK columns at a time, recomputing y from x and gate (L1/L2 hits).
        for c0 in range(0, BLOCK_N, CHUNK):
            cc = c0 + tl.arange(0, CHUNK)[None, :]
            cc_ok = cc < H
            cmask = row_ok & cc_ok
            yy = _gated_rows(x, gate, rows, g, g_ok, cc, cmask, x_stride, gate_stride, x_kind, gate_kind)
            _finish(yy, mean, rstd, residual, out, w, b, rows, g_ok, cc, cc_ok, cmask, H, res_stride, res_kind,
                    out_kind, has_w, has_b, gamma_offset)


# --------------------------------------------------------------------------------------------------
# Shipped configurations (each is compiled and inspected by `python -m magi_kernels.tools.aot_check`)

_KERNEL = f"{__name__}:_gated_post_norm_residual_kernel"
_SIGNATURE = {
    "x": "*u8", "gate": "*u8", "residual": "*u8", "out": "*u8", "gate_index": "*i32", "w": "*fp32", "b": "*fp32",
    "T": "i32", "H": "i32", "G": "i32", "x_stride": "i32", "gate_stride": "i32", "res_stride": "i32",
    "x_kind": "i32", "gate_kind": "i32", "res_kind": "i32", "out_kind": "i32",
    "has_index": "i32", "has_w": "i32", "has_b": "i32", "is_rms": "i32", "gamma_offset": "fp32", "eps": "fp32",
    "BLOCK_T": "constexpr", "BLOCK_N": "constexpr", "CHUNK": "constexpr",
}


def _make_config(block_n: int) -> AotConfig:
    block_t = max(1, ROW_TILE // block_n)
    warps = row_warps(block_t * block_n)
    chunk = min(block_n, warps * 32 * ELEMS_PER_THREAD) if block_n > ROW_TILE else block_n
    return AotConfig(kernel=_KERNEL, name=OP, config=f"BLOCK_T={block_t} BLOCK_N={block_n} CHUNK={chunk} w{warps}",
                     signature=dict(_SIGNATURE), constexprs={"BLOCK_T": block_t, "BLOCK_N": block_n, "CHUNK": chunk},
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


def supports(info) -> str | None:
    """None if the Triton kernel can run this call, else why not (device checks are done by the registry)."""
    ex = info.extra
    for what, dt in (("x", info.dtype), ("gate", ex.get("gate_dtype", info.dtype)),
                     ("residual", ex.get("residual_dtype", info.dtype))):
        if dt not in _DTYPE_CODE:
            return f"{what} dtype {dt} is not fp32/fp16/bf16"
    try:
        select_config(int(ex.get("hidden", 1)))
    except ValueError as e:
        return str(e)
    return None


def make_plan(a, out: torch.Tensor) -> Plan:
    """Map validated GatedPostNormArgs (+ a contiguous [T, H] output) to a shipped config, grid, and args."""
    T, H = a.x.shape
    for name, t in (("x", a.x), ("gate", a.gate), ("residual", a.residual), ("out", out)):
        if t.dtype not in _DTYPE_CODE:
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
    args = (
        erase(a.x), erase(a.gate), erase(a.residual), erase(out),
        a.gate_index if a.gate_index is not None else dummy(dev, torch.int32),
        a.weight if a.weight is not None else dummy(dev, torch.float32),
        a.bias if a.bias is not None else dummy(dev, torch.float32),
        T, H, a.gate.shape[0], a.x.stride(0), a.gate.stride(0), a.residual.stride(0),
        _DTYPE_CODE[a.x.dtype], _DTYPE_CODE[a.gate.dtype], _DTYPE_CODE[a.residual.dtype], _DTYPE_CODE[out.dtype],
        int(a.gate_index is not None), int(a.weight is not None), int(a.bias is not None), int(a.norm == "rmsnorm"),
        float(gamma_offset), float(a.eps),
    )
    return Plan(cfg, (tiles,), args)


def _run(plan: Plan) -> None:
    from magi_kernels.kernels.triton.aot import resolve_kernel

    kernel = resolve_kernel(plan.config)
    kernel[plan.grid](*plan.args, **plan.config.constexprs, num_warps=plan.config.num_warps,
                      num_stages=plan.config.num_stages)


def launch(a, out: torch.Tensor) -> None:
    """Write gated_post_norm_residual(a) into out [T, H] (contiguous)."""
    if a.x.shape[0] == 0:
        return
    _run(make_plan(a, out))
