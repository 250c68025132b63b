"""Triton quantized flex attention forward (int8 Q/K, e4m3 or fp16 P/V) over the planner's tile lists.

Semantics: magi_kernels/reference/flex_attn_fp8.py, which emulates every rounding step below in torch.
Design (docs/fp8_attention.md explains the accuracy side and the measurements behind each choice):

* Three kernels, K and V each read twice, Q once, no full-precision copy of any of them:
  - ``_kv_statistics_kernel`` (one pass over K and V): per chunk of tokens and kv head, the fp32 channel sums
    of K and the channel amax of |V|; the launcher finishes both over the chunks (CHUNK times fewer
    elements than K) into ``mean_k`` and V's per-channel scale ``sv = amax / 448``.
  - ``_kv_quantize_kernel`` (one program per (k tile, kv head)) writes K smoothed and quantized per key,
    ``k8_j = i8((k_j - mean_k) / sk_j)``, ``sk_j = amax_d|k_j - mean_k| / 127``, stored [Hk, Nt*BLOCK_N, D] as
    bytes with ``sk`` [Hk, Nt*BLOCK_N] (zero-padded: the hot loop never masks loads), and
    ``v8 = pv(v / sv)`` transposed [Hk, D, Nt*BLOCK_N] so both PV operands are K-major (fp8 wgmma needs it).
  Every K tile's codes need the mean over all keys and V's need the amax over all tokens, so the
  statistics pass must finish before any tile is quantized: that is the second read.
  - sm_89: the attention kernel (PASS 0) quantizes its Q tile in the prologue, one int8 scale per query row, and
    walks FULL then PARTIAL tiles with pointer loads.
  - sm_90: the 16-bit forward's two passes (magi_kernels/kernels/triton/flex_attn.py). ``_q_quantize_kernel``
    writes Q's int8 codes and per-row factors; PASS 1 walks the FULL tiles in a warp-specialized loop whose loads
    are all tensor-descriptor boxes (Q codes, row factors, K codes, V^T, key scales: a producer warp copies, two
    consumer warpgroups compute) and saves the fp32 softmax state of the q tiles that have PARTIAL entries;
    PASS 2 resumes those from the state over their PARTIAL tiles. Triton 3.9's Hopper warp specialization
    cannot split a reduction that feeds the loop (the row amax and q . mean_k of an in-kernel Q quantization:
    "Unexpected op" in WSDataPartition.cpp), hence the separate Q kernel (docs/fp8_attention.md).
* int8 rather than e4m3 for Q and K: per-row / per-key int8 has 7 bits of resolution against the row's
  largest element where e4m3 has 3 mantissa bits, and the score error is what peaked (outlier) softmaxes
  amplify. The int8 dot is exact in the int32 accumulator; ``(dot * sk_j) * (sq_i * mul)`` is its scale.
  Per score this costs one I2F (int32 to fp32; the price of int8) and one FMUL (the per-key scale; a per-block
  K scale would fold into the row's FFMA but measured worse on outlier channels): docs/fp8_attention.md.
* e4m3 P goes into the PV MMA from registers without a lane exchange. The scores come out of the QK MMA with
  each thread holding, per 32 keys, the column pairs {2c, 2c+1} of the four 8-key blocks (c = lane % 4); the
  8-bit A operand wants each thread to hold the runs {4c..4c+3} and {16+4c..16+4c+3}. Both sets are 8 keys
  per thread per 32, differing by a fixed permutation of the key's bits, so the step permutes P's columns
  logically (``_pv_key_order``: reshape, permute, reshape, which Triton's linear layouts turn into register
  renaming only) and the quantize kernel stores V^T with its keys in the same order (``_pv_key_slot``). What
  remains of the relayout is the byte packing of the converted P. (16-bit P already has the operand's layout.)
* The key scales multiply those score columns: thread c needs keys {8i + 2c, 8i + 2c + 1} of every 8-key block
  i. The quantize kernel stores each tile's scales grouped by c (``_key_scale_slot``), so a thread's scales
  are contiguous and load as wide vectors (sm_90 D=128: 8 shared-memory loads per tile instead of 16);
  ``_key_scales_in_key_order`` undoes the grouping logically.
* Smoothing subtracts the same vector from every key, so ``q . k_j`` changes by ``q . mean_k``, the same
  for all keys of a row: softmax is unchanged, so the loop runs on the smoothed scores. The kernel adds
  ``q . mean_k`` (fp32, from the unquantized q) back once per row into the lse (and, under softcap, into
  every score before tanh), so the returned lse keeps flex_attn's convention and ``merge_attn_states``
  combines these and bf16 pieces.
* P is rounded per row against its exact bound: after subtracting the running row max, P <= 1, so the
  per-row scale is the constant 1/448, folded into the exponent (``p = exp2(s2 - m + log2 448)``). The row
  sum l is taken in fp32 on the same 448-scaled P, so the factor cancels in ``out = acc / l`` and costs
  nothing in the loop; ``lse = m + log2(l / 448)``. ``PV_FP16`` rounds P and V to fp16 instead of e4m3
  (the opt-in ``pv_precision="fp16"``): same scales, a 16-bit PV MMA.
* Accumulation: both tile MMAs accumulate in 32 bits (int32 for QK, exact; fp32 for PV; each MMA's
  reduction is one tile, BLOCK_N or D <= 128 long), and the running acc / l / m are fp32 in registers.
* e4m3 rounding: on GPUs ``.to(tl.float8e4nv)`` (cvt.rn.satfinite, round-to-nearest-even). The Triton
  interpreter's own fp32 -> e4m3 cast rounds wrongly, so interpreter configs set ``EXACT_E4M3`` and build
  the byte with the integer recipe of ``fp8_quantize._e4m3_code`` (bit-identical RNE); every other line
  of the kernel body is the one the AOT check compiles.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl

from magi_kernels.kernels.triton import triton_interpreting
from magi_kernels.kernels.triton._io import (
    check_i32,
    dummy,
    ensure_descriptor_allocator,
)
from magi_kernels.kernels.triton.aot import (
    AotConfig,
    KernelLaunch,
    kernel_parameters,
    register_aot,
)
from magi_kernels.kernels.triton.flex_attn import (
    HEAD_DIMS,
    PLAN_ARGS,
    _plan_args,
    _row_bounds_mask,
    _scalars,
    _softmax_state_save,
    _softmax_state_start,
    _store_rows,
    _tanh,
    softmax_state_buffers,
)
from magi_kernels.kernels.triton.fp8_quantize import _e4m3_code
from magi_kernels.reference.flex_attn_fp8 import INT8_MAX, PV_PRECISIONS
from magi_kernels.reference.fp8 import AMAX_FLOOR, E4M3_MAX

OP = "flex_attn_fp8"
IN_DTYPES = (torch.float16, torch.bfloat16)
_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_PV_TRITON_DTYPE = {"e4m3": "fp8e4nv", "fp16": "fp16"}
_AMAX_FLOOR = tl.constexpr(AMAX_FLOOR)
_QMAX = tl.constexpr(E4M3_MAX)
_I8MAX = tl.constexpr(INT8_MAX)
_LOG2_QMAX = tl.constexpr(math.log2(E4M3_MAX))
STATS_CHUNK = 256  # tokens per statistics program: the partials have 1/STATS_CHUNK of K's elements


@triton.jit
def _to_pv(x, PV_FP16: tl.constexpr, EXACT_E4M3: tl.constexpr):
    """fp32 (|x| <= 448) -> the PV MMA's operand: fp16, or e4m3fn round-to-nearest-even (EXACT_E4M3: module doc)."""
    if PV_FP16:
        return x.to(tl.float16)
    elif EXACT_E4M3:
        return _e4m3_code(x).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    else:
        return x.to(tl.float8e4nv)


@triton.jit
def _pv_key_slot(j):
    """Column of the stored V^T that holds key j (e4m3 PV): within each aligned group of 32 keys, key bits
    (j4 j3 j2 j1 j0) go to column bits (j4 j2 j1 j3 j0), the order in which ``_pv_key_order`` hands P to the
    MMA (module docstring)."""
    return (j & -32) | (j & 17) | ((j & 6) << 1) | ((j >> 2) & 2)


@triton.jit
def _pv_key_order(p, COLS: tl.constexpr):
    """P [rows, COLS] with its columns in the stored V^T's key order: column (j4 j2 j1 j3 j0) of the result is key
    (j4 j3 j2 j1 j0) of p, per group of 32 keys (``_pv_key_slot``; module docstring)."""
    rows: tl.constexpr = p.shape[0]
    bits = tl.reshape(p, [rows, COLS // 32, 2, 2, 2, 2, 2])  # [rows, group, j4, j3, j2, j1, j0]
    return tl.reshape(tl.permute(bits, [0, 1, 2, 4, 5, 3, 6]), [rows, COLS])


@triton.jit
def _key_scale_slot(j, BLOCK_N: tl.constexpr):
    """Where key j's scale is stored: within its tile, key 8i + 2c + b at slot c * BLOCK_N / 4 + 2i + b (the
    scales one thread multiplies its score columns by, contiguous; module docstring)."""
    t = j % BLOCK_N
    return (j - t) + ((t // 2) % 4) * (BLOCK_N // 4) + (t // 8) * 2 + t % 2


@triton.jit
def _key_scales_in_key_order(stored, COLS: tl.constexpr):
    """A tile's key scales [COLS] as stored (``_key_scale_slot``), in key order."""
    tl.static_assert(COLS % 8 == 0, "key tiles are whole 8-key blocks")
    return tl.reshape(tl.permute(tl.reshape(stored, [4, COLS // 8, 2]), [1, 0, 2]), [COLS])


@triton.jit
def _quantize_rows_int8(x):
    """Per row of the 2-D block: (int8 codes of x / s, s [rows]), s = max(amax|row|, floor) / 127, ties away
    from zero (the conversion truncates, so +-0.5 first)."""
    s = tl.maximum(tl.max(tl.abs(x), 1), _AMAX_FLOOR) / _I8MAX
    y = tl.minimum(tl.maximum(tl.math.div_rn(x, s[:, None]), -_I8MAX), _I8MAX)
    return (y + tl.where(y >= 0, 0.5, -0.5)).to(tl.int8), s


# --------------------------------------------------------------------------------------------------
# K / V statistics (one program per (token chunk, kv head)) and quantization (one per (k tile, kv head))


@triton.jit(do_not_specialize=["total_k"])
def _kv_statistics_kernel(k_ptr, v_ptr, k_sum_ptr, v_amax_ptr, stride_kt, stride_kh, stride_vt, stride_vh, total_k,
                          k_heads, CHUNK: tl.constexpr, BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr):
    c = tl.program_id(0)
    kh = tl.program_id(1)
    offs_d = tl.arange(0, HEAD_DIM)
    k_sum = tl.zeros([HEAD_DIM], tl.float32)
    v_amax = tl.zeros([HEAD_DIM], tl.float32)
    for t0 in range(0, CHUNK, BLOCK_T):
        rows = c * CHUNK + t0 + tl.arange(0, BLOCK_T)
        ok = (rows < total_k)[:, None]
        rows64 = rows.to(tl.int64)
        k = tl.load(k_ptr + rows64[:, None] * stride_kt + kh * stride_kh + offs_d[None, :], mask=ok, other=0.0)
        v = tl.load(v_ptr + rows64[:, None] * stride_vt + kh * stride_vh + offs_d[None, :], mask=ok, other=0.0)
        k_sum += tl.sum(k.to(tl.float32), 0)
        v_amax = tl.maximum(v_amax, tl.max(tl.abs(v.to(tl.float32)), 0))
    out = (c * k_heads + kh) * HEAD_DIM + offs_d
    tl.store(k_sum_ptr + out, k_sum)
    tl.store(v_amax_ptr + out, v_amax)


@triton.jit(do_not_specialize=["total_k", "k_tiles"])
def _kv_quantize_kernel(k_ptr, v_ptr, k_mean_ptr, v_scale_ptr, k8_ptr, v8t_ptr, k_scale_ptr, stride_kt, stride_kh,
                        stride_vt, stride_vh, total_k, k_tiles, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                        PV_FP16: tl.constexpr, EXACT_E4M3: tl.constexpr, PV_KEY_ORDER: tl.constexpr):
    n = tl.program_id(0)
    kh = tl.program_id(1)
    cols = n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = (cols < total_k)[:, None]
    cols64 = cols.to(tl.int64)
    padded = k_tiles * BLOCK_N  # token extent of the padded quantized buffers
    k = tl.load(k_ptr + cols64[:, None] * stride_kt + kh * stride_kh + offs_d[None, :], mask=col_ok, other=0.0)
    mean = tl.load(k_mean_ptr + kh * HEAD_DIM + offs_d)
    kc = tl.where(col_ok, k.to(tl.float32) - mean[None, :], 0.0)  # padding keys: code 0
    k8, sk = _quantize_rows_int8(kc)
    tl.store(k8_ptr + (kh * padded + cols64)[:, None] * HEAD_DIM + offs_d[None, :], k8.to(tl.uint8, bitcast=True))
    tl.store(k_scale_ptr + kh * padded + _key_scale_slot(cols, BLOCK_N), sk)

    v = tl.load(v_ptr + cols64[:, None] * stride_vt + kh * stride_vh + offs_d[None, :], mask=col_ok, other=0.0)
    sv = tl.load(v_scale_ptr + kh * HEAD_DIM + offs_d)
    y = tl.minimum(tl.maximum(tl.math.div_rn(v.to(tl.float32), sv[None, :]), -_QMAX), _QMAX)
    # Transposed store: [Hk, D, padded], keys contiguous (the PV MMA's reduction axis); with PV_KEY_ORDER in the
    # order the attention step hands P to the PV MMA.
    if PV_KEY_ORDER:
        cols64 = _pv_key_slot(cols).to(tl.int64)
    tl.store(v8t_ptr + (kh * HEAD_DIM + offs_d.to(tl.int64))[None, :] * padded + cols64[:, None],
             _to_pv(y, PV_FP16, EXACT_E4M3))


@triton.jit(do_not_specialize=["total_q", "groups", "q_tiles"])
def _q_quantize_kernel(q_ptr, k_mean_ptr, q8_ptr, q_rows_ptr, stride_qt, stride_qh, total_q, q_tiles, groups,
                       qk_mul: tl.float32, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Q tile m of q head h for the sm_90 passes: int8 codes [Hq, padded_q, D] and per row (score_mul, qm, 0, 0)
    [Hq, padded_q, 4] fp32 (the attention prologue's quantities, module docstring of the forward kernel)."""
    m = tl.program_id(0)
    h = tl.program_id(1)
    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows64 = offs_m.to(tl.int64)
    q = tl.load(q_ptr + rows64[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=(offs_m < total_q)[:, None], other=0.0).to(tl.float32)
    q8, score_mul, qm = _quantize_q_tile(q, k_mean_ptr, h // groups, qk_mul, HEAD_DIM)
    out_rows = h * (q_tiles * BLOCK_M) + rows64
    tl.store(q8_ptr + out_rows[:, None] * HEAD_DIM + offs_d[None, :], q8.to(tl.uint8, bitcast=True))
    offs_c = tl.arange(0, 4)[None, :]
    packed = tl.where(offs_c == 0, score_mul[:, None], tl.where(offs_c == 1, qm[:, None], 0.0))
    tl.store(q_rows_ptr + out_rows[:, None] * 4 + offs_c, packed)


# --------------------------------------------------------------------------------------------------
# Attention forward (one program per (q tile, q head))


@triton.jit
def _head_row(ptr, kh, HEAD_DIM: tl.constexpr, TMA: tl.constexpr):
    """Row kh of a [k heads, D] fp32 table (V's scale). TMA: through a [1, D] descriptor box, since one plain
    tensor load anywhere in the kernel makes Triton 3.9's Hopper warp specialization fail."""
    if TMA:
        src = tl.make_tensor_descriptor(ptr + kh * HEAD_DIM, shape=[1, HEAD_DIM], strides=[HEAD_DIM, 1],
                                        block_shape=[1, HEAD_DIM])
        return tl.reshape(src.load([0, 0]), [HEAD_DIM])
    else:
        return tl.load(ptr + kh * HEAD_DIM + tl.arange(0, HEAD_DIM))


@triton.jit
def _quantize_q_tile(q, k_mean_ptr, kh, qk_mul, HEAD_DIM: tl.constexpr):
    """(int8 codes, score_mul, qm) of an fp32 Q tile: one int8 scale per row, and K smoothing's add-back term
    q . mean_k (fp32, unquantized q), both times qk_mul."""
    qm = tl.sum(q * tl.load(k_mean_ptr + kh * HEAD_DIM + tl.arange(0, HEAD_DIM))[None, :], 1) * qk_mul
    q8, sq = _quantize_rows_int8(q)
    return q8, sq * qk_mul, qm


@triton.jit
def _quantized_q(q8_ptr, q_rows_ptr, h, m, q_tiles, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                 TMA: tl.constexpr):
    """Q tile m of q head h as _q_quantize_kernel wrote it: (int8 codes, score_mul, qm). With TMA both come
    through descriptors, and the two row vectors are taken out of the [BLOCK_M, 4] box by reshapes and splits:
    Triton 3.9's Hopper warp specialization cannot split a reduction (or a plain load) that feeds its loop over
    the consumer warpgroups, which is why the sm_90 passes do not quantize Q themselves."""
    row0 = h * (q_tiles * BLOCK_M) + m * BLOCK_M
    if TMA:
        q8_src = tl.make_tensor_descriptor(q8_ptr, shape=[row0 + BLOCK_M, HEAD_DIM], strides=[HEAD_DIM, 1],
                                           block_shape=[BLOCK_M, HEAD_DIM])
        rows_src = tl.make_tensor_descriptor(q_rows_ptr, shape=[row0 + BLOCK_M, 4], strides=[4, 1],
                                             block_shape=[BLOCK_M, 4])
        q8 = q8_src.load([row0, 0])
        cols02, cols13 = tl.split(tl.reshape(rows_src.load([row0, 0]), [BLOCK_M, 2, 2]))
        score_mul, _ = tl.split(cols02)
        qm, _ = tl.split(cols13)
    else:
        rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        q8 = tl.load(q8_ptr + rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :])
        score_mul = tl.load(q_rows_ptr + rows * 4)
        qm = tl.load(q_rows_ptr + rows * 4 + 1)
    return q8.to(tl.int8, bitcast=True), score_mul, qm


@triton.jit
def _fp8_kv_sources(k8_ptr, v8t_ptr, k_scale_ptr, kh, padded, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                    TMA: tl.constexpr):
    """Where kv head kh's quantized K [padded, D], transposed V [D, padded] and key scales [padded] live: tensor
    descriptors with TMA (the buffers are padded to whole k tiles, so no box crosses a head), else pointers."""
    if TMA:
        k8_src = tl.make_tensor_descriptor(k8_ptr + kh * padded * HEAD_DIM, shape=[padded, HEAD_DIM],
                                           strides=[HEAD_DIM, 1], block_shape=[BLOCK_N, HEAD_DIM])
        v8t_src = tl.make_tensor_descriptor(v8t_ptr + kh * HEAD_DIM * padded, shape=[HEAD_DIM, padded],
                                            strides=[padded, 1], block_shape=[HEAD_DIM, BLOCK_N])
        sk_src = tl.make_tensor_descriptor(k_scale_ptr + kh * padded, shape=[1, padded], strides=[padded, 1],
                                           block_shape=[1, BLOCK_N])
    else:
        k8_src = k8_ptr + kh * padded * HEAD_DIM
        v8t_src = v8t_ptr + kh * HEAD_DIM * padded
        sk_src = k_scale_ptr + kh * padded
    return k8_src, v8t_src, sk_src


@triton.jit
def _fp8_load_tile(k8_src, v8t_src, sk_src, col0, padded, COLS: tl.constexpr, HEAD_DIM: tl.constexpr,
                   TMA: tl.constexpr):
    """Keys [col0, col0 + COLS): int8 K [COLS, D], V^T [D, COLS] (PV operand dtype) and the key scales [COLS]."""
    if TMA:
        k8 = k8_src.load([col0, 0])
        v8t = v8t_src.load([0, col0])
        sk = tl.reshape(sk_src.load([0, col0]), [COLS])
    else:
        cols = col0 + tl.arange(0, COLS)
        offs_d = tl.arange(0, HEAD_DIM)
        k8 = tl.load(k8_src + cols[:, None] * HEAD_DIM + offs_d[None, :])
        v8t = tl.load(v8t_src + offs_d[:, None] * padded + cols[None, :])
        sk = tl.load(sk_src + cols)
    return k8.to(tl.int8, bitcast=True), v8t, _key_scales_in_key_order(sk, COLS)


@triton.jit
def _fp8_fwd_step(acc, m_i, l_i, q8, qm, score_mul, k8, v8t, sk, col0, lo, hi, cap_out, COLS: tl.constexpr,
                  MASKED: tl.constexpr, SOFTCAP: tl.constexpr, PV_FP16: tl.constexpr, EXACT_E4M3: tl.constexpr,
                  PV_KEY_ORDER: tl.constexpr):
    """One online-softmax step over keys [col0, col0 + COLS) in the log2 domain, with 448-scaled P (module
    docstring). MASKED: row i sees the keys in [lo[i], hi[i]) (a PARTIAL tile's row bounds); else lo and hi
    are unused."""
    # score_mul [BLOCK_M] = sq_i * (scale * log2 e) without softcap, sq_i * (scale / c) with it; > 0. qm is
    # q . mean_k times the same factor. Without softcap qm is constant along the row, so the softmax runs on the
    # smoothed scores (m, P and l do not change under a per-row shift) and qm enters only the lse. There the
    # row max is taken on the key-scaled dot products and scaled once per row, so each score costs I2F, the
    # key scale's FMUL and one FFMA (s * mul - m) before exp2. The softcap needs the unsmoothed score in tanh.
    s = tl.dot(q8, tl.trans(k8)).to(tl.float32) * sk[None, :]
    mul = score_mul[:, None]
    if SOFTCAP:
        s = _tanh(s * mul + qm[:, None]) * cap_out
    if MASKED:
        # The absolute-column form: the tile-relative one spills here (_row_bounds_mask).
        s = tl.where(_row_bounds_mask(col0, lo, hi, COLS, False), s, float("-inf"))
    if SOFTCAP:
        m_new = tl.maximum(m_i, tl.max(s, 1))
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * score_mul)
    if MASKED:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that saw nothing yet: exp2 gives 0
    else:
        m_use = m_new
    # 448 * exp2(s2 - m): P's 448-scale, folded into the exponent
    if SOFTCAP:
        p = tl.exp2(s - (m_use - _LOG2_QMAX)[:, None])
    else:
        p = tl.exp2(s * mul - (m_use - _LOG2_QMAX)[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    p_op = _to_pv(p, PV_FP16, EXACT_E4M3)
    if PV_KEY_ORDER:  # V^T holds its keys in this order (_kv_quantize_kernel)
        p_op = _pv_key_order(p_op, COLS)
    acc = acc * alpha[:, None] + tl.dot(p_op, tl.trans(v8t))
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["total_q", "groups", "q_heads", "k_tiles", "q_tiles", "head_base", "state_heads"])
def _flex_attn_fp8_fwd_kernel(q_ptr, q8_ptr, q_rows_ptr, k8_ptr, v8t_ptr, k_scale_ptr, v_scale_ptr, k_mean_ptr,
                              out_ptr, lse_ptr, q_order_ptr, q_start_ptr, q_nfull_ptr, q_kidx_ptr, q_bstart_ptr,
                              bound_kidx_ptr, bound_rows_ptr, q_partial_ptr, q_slot_ptr, state_acc_ptr,
                              state_m_ptr, state_l_ptr, stride_qt, stride_qh, stride_ot, stride_oh, q_heads, total_q,
                              k_tiles, q_tiles, groups, head_base, state_heads, qk_mul: tl.float32, cap_out: tl.float32,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                              SOFTCAP: tl.constexpr, PV_FP16: tl.constexpr, EXACT_E4M3: tl.constexpr,
                              PV_KEY_ORDER: tl.constexpr,
                              PASS: tl.constexpr):
    """One (q tile, q head) per program. PASS, as in the 16-bit forward (magi_kernels/kernels/triton/flex_attn.py):

    0: FULL then PARTIAL tiles in one program, pointer loads (sm_89).
    1: FULL tiles only, in a warp-specialized loop fed by tensor descriptors (sm_90). A q tile with PARTIAL entries
       saves its raw softmax state (acc, m, l; fp32) in slot q_slot[m] of state_*; the others write out and lse.
    2: PARTIAL tiles of the q tiles in q_partial, by tensor descriptors, resuming from their slot's state (sm_90).
    PASS 0 and 1 take their q tile from the plan's heaviest-first launch order (q_order), PASS 2 from q_partial
    (most PARTIAL entries first). Every step, FULL or PARTIAL, covers a whole BLOCK_N-key tile.
    """
    TMA: tl.constexpr = PASS != 0
    if PASS == 2:
        slot = tl.program_id(0)
        m = tl.load(q_partial_ptr + slot)
    else:
        m = tl.load(q_order_ptr + tl.program_id(0))
    # A launch covers q heads [head_base, head_base + grid[1]); the state holds state_heads of them per row.
    h = head_base + tl.program_id(1)
    kh = h // groups
    padded = k_tiles * BLOCK_N
    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < total_q
    rows64 = offs_m.to(tl.int64)
    if PASS == 0:
        q = tl.load(q_ptr + rows64[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=row_ok[:, None],
                    other=0.0).to(tl.float32)
        q8, score_mul, qm = _quantize_q_tile(q, k_mean_ptr, kh, qk_mul, HEAD_DIM)
    else:
        # Both sm_90 passes read the Q codes and row factors _q_quantize_kernel wrote, so they agree bit for bit.
        q8, score_mul, qm = _quantized_q(q8_ptr, q_rows_ptr, h, m, q_tiles, BLOCK_M, HEAD_DIM, TMA)
    k8_src, v8t_src, sk_src = _fp8_kv_sources(k8_ptr, v8t_ptr, k_scale_ptr, kh, padded, BLOCK_N, HEAD_DIM, TMA)

    e0 = tl.load(q_start_ptr + m)
    e_mid = e0 + tl.load(q_nfull_ptr + m)  # FULL entries [e0, e_mid)

    acc, m_i, l_i = _softmax_state_start(state_acc_ptr, state_m_ptr, state_l_ptr, tl.program_id(0), state_heads,
                                         offs_d, BLOCK_M, HEAD_DIM, PASS == 2)
    if PASS == 1:
        # The flat loop the 16-bit FULL pass uses: its only loads are the plan's tile index and the three
        # descriptor boxes, which go to the producer warp.
        for e in tl.range(e0, e_mid, warp_specialize=True):
            col0 = tl.load(q_kidx_ptr + e) * BLOCK_N
            k8, v8t, sk = _fp8_load_tile(k8_src, v8t_src, sk_src, col0, padded, BLOCK_N, HEAD_DIM, TMA)
            acc, m_i, l_i = _fp8_fwd_step(acc, m_i, l_i, q8, qm, score_mul, k8, v8t, sk, col0, None, None,
                                          cap_out, BLOCK_N, False, SOFTCAP, PV_FP16, EXACT_E4M3, PV_KEY_ORDER)
    elif PASS == 0:
        for e in range(e0, e_mid):
            col0 = tl.load(q_kidx_ptr + e) * BLOCK_N
            k8, v8t, sk = _fp8_load_tile(k8_src, v8t_src, sk_src, col0, padded, BLOCK_N, HEAD_DIM, TMA)
            acc, m_i, l_i = _fp8_fwd_step(acc, m_i, l_i, q8, qm, score_mul, k8, v8t, sk, col0, None, None,
                                          cap_out, BLOCK_N, False, SOFTCAP, PV_FP16, EXACT_E4M3, PV_KEY_ORDER)
    if PASS != 1:
        # PARTIAL tiles by the plan's row bounds (bound entries: a tile whose rows see several disjoint key
        # intervals comes once per interval): two [BLOCK_M] vectors per entry and a loop-free mask.
        offs_r = tl.arange(0, BLOCK_M)
        for b in range(tl.load(q_bstart_ptr + m), tl.load(q_bstart_ptr + m + 1)):
            n = tl.load(bound_kidx_ptr + b)
            rows_b = bound_rows_ptr + b * (2 * BLOCK_M) + offs_r  # int32: the launcher checks the size
            lo = tl.load(rows_b)
            hi = tl.load(rows_b + BLOCK_M)
            k8, v8t, sk = _fp8_load_tile(k8_src, v8t_src, sk_src, n * BLOCK_N, padded, BLOCK_N, HEAD_DIM, TMA)
            acc, m_i, l_i = _fp8_fwd_step(acc, m_i, l_i, q8, qm, score_mul, k8, v8t, sk, n * BLOCK_N, lo, hi, cap_out,
                                          BLOCK_N, True, SOFTCAP, PV_FP16, EXACT_E4M3, PV_KEY_ORDER)

    final = row_ok
    if PASS == 1:
        to_state = _softmax_state_save(state_acc_ptr, state_m_ptr, state_l_ptr, q_slot_ptr, m, state_heads, acc, m_i,
                                       l_i, offs_d, BLOCK_M, HEAD_DIM)
        final = row_ok & ~to_state
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None] * _head_row(v_scale_ptr, kh, HEAD_DIM, TMA)[None, :]
    if not SOFTCAP:
        m_i = m_i + qm  # the smoothing shift, back into the lse
    lse = tl.where(seen, (m_i + tl.log2(l_safe) - _LOG2_QMAX) * 0.6931471805599453, float("-inf"))
    if PASS == 1:
        # Through the accumulator-layout view (_store_rows): a plain store would convert the tile through a
        # shared-memory scratch per consumer warpgroup, which the warp-specialized region cannot overlap with the
        # K/V buffers. Rows past the end, and every row of a q tile the PARTIAL pass finishes, are not written.
        n_out = tl.where(tl.load(q_slot_ptr + m) >= 0, 0, total_q - m * BLOCK_M)
        _store_rows(out_ptr + h * stride_oh + (m * BLOCK_M).to(tl.int64) * stride_ot, stride_ot, n_out,
                    out.to(out_ptr.dtype.element_ty), HEAD_DIM)
    else:  # (no warp specialization: the conversion scratch reuses the dead pipeline buffers)
        tl.store(out_ptr + rows64[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=final[:, None])
    tl.store(lse_ptr + rows64 * q_heads + h, lse, mask=final)


# --------------------------------------------------------------------------------------------------
# Shipped configurations (compiled and inspected by `python -m magi_kernels.tools.aot_check`)

KERNELS = {  # kind -> (AOT name, "module:attr")
    "fwd": ("flex_attn_fp8_fwd", f"{__name__}:_flex_attn_fp8_fwd_kernel"),
    "fwd_partial": ("flex_attn_fp8_fwd_partial", f"{__name__}:_flex_attn_fp8_fwd_kernel"),  # PASS 2 (sm_90)
    "quant": ("flex_attn_fp8_kv_quantize", f"{__name__}:_kv_quantize_kernel"),
    "stats": ("flex_attn_fp8_kv_statistics", f"{__name__}:_kv_statistics_kernel"),
    "quant_q": ("flex_attn_fp8_q_quantize", f"{__name__}:_q_quantize_kernel"),  # sm_90 only
}
ARCHS = (89, 90)  # int8 QK: IMMA (sm_89) / IGMMA (sm_90); e4m3 PV: QMMA / QGMMA; fp16 PV: HMMA / HGMMA

# (arch, head_dim, pv_precision) -> (BLOCK_M, BLOCK_N, num_warps, num_stages) of the attention kernel; the
# quantize kernel uses the same BLOCK_N (its buffers are padded to whole attention k tiles). The largest tiles
# that compile with 0 spills (aot_check). sm_90 (TMA_ARCHS) runs two passes like the 16-bit forward: these are the
# warp-specialized FULL pass's (4 warps given; the compiler adds a producer warp and splits the rows over two
# consumer warpgroups), PARTIAL_LAUNCH the PARTIAL pass's warps and stages at the same tiles (both read one plan).
# Three stages give the FULL pass three K/V buffers at both head dims: at D=128 they fit (120 KB with e4m3 V, 169 KB
# with fp16 V) because its epilogue stores need no shared-memory scratch (_store_rows; docs/fp8_attention.md).
TILES = {
    (90, 64, "e4m3"): (128, 128, 4, 3), (90, 128, "e4m3"): (128, 128, 4, 3),
    (89, 64, "e4m3"): (128, 128, 8, 2), (89, 128, "e4m3"): (128, 128, 8, 2),
    (90, 64, "fp16"): (128, 128, 4, 3), (90, 128, "fp16"): (128, 128, 4, 3),
    (89, 64, "fp16"): (128, 128, 8, 2), (89, 128, "fp16"): (128, 64, 8, 2),
}
TMA_ARCHS = (90,)
# (arch, head_dim) -> (num_warps, num_stages) of the PARTIAL pass (whole 128-key tiles per step, 0 spills)
PARTIAL_LAUNCH = {(90, 64): (8, 2), (90, 128): (8, 2)}
STATS_BLOCK_T = 32  # tokens per load step of the statistics kernel
_FP32_ARGS = ("lse_ptr", "k_scale_ptr", "v_scale_ptr", "k_mean_ptr", "k_sum_ptr", "v_amax_ptr", "state_acc_ptr",
              "state_m_ptr", "state_l_ptr")
_DIVISIBLE_BY_16 = ("*_ptr", "stride_*")
_KERNEL_FNS = {"fwd": _flex_attn_fp8_fwd_kernel, "fwd_partial": _flex_attn_fp8_fwd_kernel,
               "quant": _kv_quantize_kernel, "stats": _kv_statistics_kernel, "quant_q": _q_quantize_kernel}


def _pointer_dtypes(kind: str, dt: str, pv_precision: str) -> dict[str, str]:
    ptrs = [n for n, t in kernel_parameters(_KERNEL_FNS[kind]) if t == "ptr"]
    special = {"k8_ptr": "u8", "q8_ptr": "u8", "q_rows_ptr": "fp32", "v8t_ptr": _PV_TRITON_DTYPE[pv_precision]}
    return {n: "i32" if n in PLAN_ARGS else "fp32" if n in _FP32_ARGS else special.get(n, dt) for n in ptrs}


def make_config(kind: str, dtype: torch.dtype, head_dim: int, softcap: bool, block_m: int, block_n: int,
                num_warps: int = 4, num_stages: int = 2, archs: tuple[int, ...] = ARCHS, exact_e4m3: bool = False,
                pv_precision: str = "e4m3", tma: bool = False) -> AotConfig:
    """A config for one kernel (shipped ones from TILES; interpreter runs set exact_e4m3 and small tiles).
    For "stats", block_n is the token step (STATS_BLOCK_T) and block_m the chunk (STATS_CHUNK).

    ``tma`` selects the attention forward's two-pass shape: kind "fwd" is then its warp-specialized FULL pass
    (PASS 1) and kind "fwd_partial", which exists only in that shape, its PARTIAL pass (PASS 2).
    """
    if tma and kind not in ("fwd", "fwd_partial"):
        raise ValueError(f"{OP}: tma=True is an attention forward option, got kind {kind!r}")
    if kind == "fwd_partial" and not tma:
        raise ValueError(f"{OP}: kind 'fwd_partial' is the PARTIAL pass of the two-pass forward and needs tma=True")
    name, kernel = KERNELS[kind]
    dt = _TRITON_DTYPE[dtype]
    arch = "/".join(f"sm{a}" for a in archs)
    pv16 = pv_precision == "fp16"
    if kind == "stats":
        consts = {"CHUNK": block_m, "BLOCK_T": block_n, "HEAD_DIM": head_dim}
        label = f"{arch} {dt} D={head_dim} chunk={block_m} step={block_n} w{num_warps}"
    elif kind == "quant_q":
        consts = {"BLOCK_M": block_m, "HEAD_DIM": head_dim}
        label = f"{arch} {dt} D={head_dim} BM={block_m} w{num_warps}"
    else:
        # e4m3 V^T in the P operand's key order (module docstring) needs whole groups of 32 keys per tile.
        consts = {"BLOCK_N": block_n, "HEAD_DIM": head_dim, "PV_FP16": pv16, "EXACT_E4M3": exact_e4m3,
                  "PV_KEY_ORDER": not pv16 and block_n % 32 == 0}
        label = f"{arch} {dt} D={head_dim} BN={block_n} pv={pv_precision} w{num_warps}"
    if kind in ("fwd", "fwd_partial"):
        consts.update(BLOCK_M=block_m, SOFTCAP=softcap, PASS=2 if kind == "fwd_partial" else 1 if tma else 0)
        label = (f"{arch} {dt} D={head_dim} BM={block_m} BN={block_n} pv={pv_precision} w{num_warps} s{num_stages}"
                 + (" softcap" if softcap else "") + (" tma" if tma else "") + (" ws" if tma and kind == "fwd" else ""))
    # The aot check verifies the PV MMA's class; the int8 QK MMA (IMMA / IGMMA) is counted by the benchmark's
    # --sass report and tests/harness/test_sass_budgets_fp8_attn.py.
    mma = ("f16" if pv16 else "fp8") if kind in ("fwd", "fwd_partial") else None
    return AotConfig(kernel=kernel, name=name, config=label, pointer_dtypes=_pointer_dtypes(kind, dt, pv_precision),
                     constexprs=consts, num_warps=num_warps, num_stages=num_stages, archs=tuple(archs), mma=mma,
                     divisible_by_16=_DIVISIBLE_BY_16)


def _forward_configs(dtype: torch.dtype, head_dim: int, softcap: bool, arch: int, pv_precision: str,
                     exact_e4m3: bool) -> tuple[AotConfig, ...]:
    """(kv statistics, kv quantize, attention) on sm_89; (kv statistics, kv quantize, q quantize, FULL pass,
    PARTIAL pass) on sm_90."""
    bm, bn, w, s = TILES[(arch, head_dim, pv_precision)]
    archs = (arch,)
    cfgs = (make_config("stats", dtype, head_dim, False, STATS_CHUNK, STATS_BLOCK_T, 4, 1, archs),
            make_config("quant", dtype, head_dim, False, bm, bn, 4, 1, archs, exact_e4m3, pv_precision))
    if arch not in TMA_ARCHS:
        return cfgs + (make_config("fwd", dtype, head_dim, softcap, bm, bn, w, s, archs, exact_e4m3, pv_precision),)
    pw, ps = PARTIAL_LAUNCH[(arch, head_dim)]
    return cfgs + (make_config("quant_q", dtype, head_dim, False, bm, bn, 4, 1, archs),
                   make_config("fwd", dtype, head_dim, softcap, bm, bn, w, s, archs, exact_e4m3, pv_precision, True),
                   make_config("fwd_partial", dtype, head_dim, softcap, bm, bn, pw, ps, archs, exact_e4m3,
                               pv_precision, True))


def _shipped() -> dict:
    cfgs = {}
    for (arch, d, pv) in TILES:
        for dtype in IN_DTYPES:
            for cap in (False, True):
                cfgs[(arch, dtype, d, cap, pv)] = _forward_configs(dtype, d, cap, arch, pv, False)
    return cfgs


_CONFIGS = _shipped()
_UNIQUE = {c.key: c for cfgs in _CONFIGS.values() for c in cfgs}  # stats / quantize configs are shared
for _cfg in _UNIQUE.values():
    register_aot(_cfg)


def shipped_configs() -> list[AotConfig]:
    return list(_UNIQUE.values())


def arch_of(device: torch.device) -> int:
    """sm_90 -> 90; every other fp8-capable part (sm_89, consumer Blackwell, ...) -> 89's smaller tiles."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0):
        return 90
    return 89


def select_configs(dtype: torch.dtype, head_dim: int, softcap: bool, arch: int,
                   pv_precision: str = "e4m3") -> tuple[AotConfig, ...]:
    """The configs of a call in launch order (``_forward_configs``). Under the interpreter: the same tiles with
    EXACT_E4M3 (and fp32 inputs allowed), configs that are never compiled for a GPU, so not registered."""
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"{OP}: the Triton kernels support head_dim in {HEAD_DIMS}, got {head_dim}")
    if pv_precision not in PV_PRECISIONS:
        raise ValueError(f"{OP}: pv_precision must be one of {PV_PRECISIONS}, got {pv_precision!r}")
    if triton_interpreting():
        return _forward_configs(dtype, head_dim, softcap, arch, pv_precision, True)
    return _CONFIGS[(arch, dtype, head_dim, bool(softcap), pv_precision)]


# --------------------------------------------------------------------------------------------------
# Host side


def supports(a) -> str | None:
    """None if the kernels can run this ``FlexAttnArgs`` call (fp8 MMAs need sm_89+)."""
    d, dev = a.q.shape[2], a.q.device
    if d not in HEAD_DIMS:
        return f"head_dim {d} is not one of {HEAD_DIMS}"
    if dev.type == "cuda":
        if torch.cuda.get_device_capability(dev) < (8, 9):
            return "fp8 tensor cores need sm_89 or newer"
        if a.q.dtype not in IN_DTYPES:
            return f"q dtype {a.q.dtype} is not fp16/bf16"
    elif a.q.dtype not in IN_DTYPES + (torch.float32,):
        return f"q dtype {a.q.dtype} is not fp16/bf16/fp32"
    return None


def kv_statistics(a, cfg: AotConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean_k [Hk, D], v_scale [Hk, D]) fp32 from one pass over K and V (the reference's ``kv_statistics``)."""
    tk, hk, d = a.k.shape
    chunk = cfg.constexprs["CHUNK"]
    chunks = triton.cdiv(tk, chunk)
    k_sum = torch.empty(chunks, hk, d, dtype=torch.float32, device=a.k.device)
    v_amax = torch.empty_like(k_sum)
    k, v = a.k, a.v
    check_i32(OP, total_k=tk, k_stride=k.stride(0), v_stride=v.stride(0))
    KernelLaunch(cfg, (chunks, hk), {
        "k_ptr": k, "v_ptr": v, "k_sum_ptr": k_sum, "v_amax_ptr": v_amax, "stride_kt": k.stride(0),
        "stride_kh": k.stride(1), "stride_vt": v.stride(0), "stride_vh": v.stride(1), "total_k": tk,
        "k_heads": hk}).run()
    mean = k_sum.sum(0) / max(tk, 1)
    return mean, v_amax.amax(0).clamp_min(AMAX_FLOOR) / E4M3_MAX


def quantize_kv(a, cfg: AotConfig, mean_k: torch.Tensor, v_scale: torch.Tensor):
    """(k8 [Hk, Nt*BN, D] int8 codes as bytes, v8t [Hk, D, Nt*BN] (e4m3 or fp16), k_scale [Hk, Nt*BN]) for the
    attention kernel with cfg's BLOCK_N."""
    tk, hk, d = a.k.shape
    bn = cfg.constexprs["BLOCK_N"]
    padded = triton.cdiv(tk, bn) * bn
    dev = a.k.device
    pv_dtype = torch.float16 if cfg.constexprs["PV_FP16"] else torch.float8_e4m3fn
    k8 = torch.empty(hk, padded, d, dtype=torch.uint8, device=dev)
    v8t = torch.empty(hk, d, padded, dtype=pv_dtype, device=dev)
    k_scale = torch.empty(hk, padded, dtype=torch.float32, device=dev)
    k, v = a.k, a.v
    check_i32(OP, total_k=tk, padded_k=hk * padded * d, k_stride=k.stride(0), v_stride=v.stride(0))
    KernelLaunch(cfg, (padded // bn, hk), {
        "k_ptr": k, "v_ptr": v, "k_mean_ptr": mean_k, "v_scale_ptr": v_scale, "k8_ptr": k8, "v8t_ptr": v8t,
        "k_scale_ptr": k_scale, "stride_kt": k.stride(0), "stride_kh": k.stride(1), "stride_vt": v.stride(0),
        "stride_vh": v.stride(1), "total_k": tk, "k_tiles": padded // bn}).run()
    return k8, v8t, k_scale


def _aligned_input(t: torch.Tensor) -> torch.Tensor:
    ok = t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and t.stride(0) % 16 == 0 and t.stride(1) % 16 == 0
    return t if ok else t.contiguous().clone()


def _quantize_q(a, cfg: AotConfig, q: torch.Tensor, mean_k: torch.Tensor, qk_mul: float):
    """(q8 [Hq, Mt*BM, D] int8 codes as bytes, rows [Hq, Mt*BM, 4] fp32 (score_mul, qm, 0, 0)) for the sm_90 passes."""
    tq, hq, d = q.shape
    bm = cfg.constexprs["BLOCK_M"]
    q_tiles = triton.cdiv(tq, bm)
    q8 = torch.empty(hq, q_tiles * bm, d, dtype=torch.uint8, device=q.device)
    rows = torch.empty(hq, q_tiles * bm, 4, dtype=torch.float32, device=q.device)
    check_i32(OP, padded_q=hq * q_tiles * bm * d)
    KernelLaunch(cfg, (q_tiles, hq), {
        "q_ptr": q, "k_mean_ptr": mean_k, "q8_ptr": q8, "q_rows_ptr": rows, "stride_qt": q.stride(0),
        "stride_qh": q.stride(1), "total_q": tq, "q_tiles": q_tiles, "groups": a.groups, "qk_mul": qk_mul}).run()
    return q8, rows


def launch_fwd(a, out: torch.Tensor, lse: torch.Tensor, pv_precision: str = "e4m3",
               configs: tuple[AotConfig, ...] | None = None) -> None:
    """Write out [Tq, Hq, D] (q's dtype) and lse [Tq, Hq] (fp32, natural log) for FlexAttnArgs ``a``.

    ``configs``: (statistics, kv quantize, attention PASS 0) or (statistics, kv quantize, q quantize, attention
    PASS 1, attention PASS 2) with the same tiles; default :func:`select_configs` for the device.
    """
    tq, hq, d = a.q.shape
    if tq == 0:
        return
    cfgs = configs or select_configs(a.q.dtype, d, a.softcap > 0, arch_of(a.q.device), pv_precision)
    kinds = tuple(c.name for c in cfgs)
    one_pass, two_pass = tuple(KERNELS[k][0] for k in ("stats", "quant", "fwd")), tuple(
        KERNELS[k][0] for k in ("stats", "quant", "quant_q", "fwd", "fwd_partial"))
    if kinds not in (one_pass, two_pass) or cfgs[-1 if kinds == one_pass else -2].constexprs["PASS"] != (
            0 if kinds == one_pass else 1):
        raise ValueError(f"{OP}: configs must be (stats, quant, fwd PASS 0) or (stats, quant, quant_q, fwd PASS 1, "
                         f"fwd_partial PASS 2), got {[c.key for c in cfgs]}")
    cs, cq = cfgs[:2]
    passes = cfgs[2:] if kinds == one_pass else cfgs[3:]
    cf = passes[0]
    bm, bn = cf.constexprs["BLOCK_M"], cf.constexprs["BLOCK_N"]
    tile_of = [(c.constexprs["BLOCK_M"], c.constexprs["BLOCK_N"], c.constexprs["PV_FP16"]) for c in passes]
    if (any(t != tile_of[0] for t in tile_of) or (cq.constexprs["BLOCK_N"], cq.constexprs["PV_FP16"]) != tile_of[0][1:]
            or any(c.constexprs["BLOCK_M"] != bm for c in cfgs[2:3] if c.name == KERNELS["quant_q"][0])):
        raise ValueError(f"{OP}: the quantize configs and the attention passes must share BLOCK_M, BLOCK_N and "
                         f"PV_FP16 (the quantized buffers and the plan are laid out per attention tile), got "
                         f"{[c.key for c in cfgs]}")
    if a.total_k == 0:  # no key anywhere: every row sees nothing
        out.zero_()
        lse.fill_(float("-inf"))
        return
    a_k = dataclasses.replace(a, k=_aligned_input(a.k), v=_aligned_input(a.v))
    mean_k, v_scale = kv_statistics(a_k, cs)
    k8, v8t, k_scale = quantize_kv(a_k, cq, mean_k, v_scale)
    q = _aligned_input(a.q)
    o_buf = out if (out.is_contiguous() and out.data_ptr() % 16 == 0 and d % 16 == 0) else torch.empty_like(q)
    lse_buf = lse if (lse.is_contiguous() and lse.data_ptr() % 16 == 0) else torch.empty(tq, hq, device=q.device)
    plan_args = _plan_args(a, cf)
    check_i32(OP, total_q=tq, q_stride=q.stride(0), o_stride=o_buf.stride(0),
              bound_rows=plan_args["bound_rows_ptr"].numel())
    sc = _scalars(a)
    qk_mul = float(sc["cap_in"] if a.softcap > 0 else sc["qk_scale"])
    q_tiles = triton.cdiv(tq, bm)
    dev = q.device
    if len(passes) == 2:
        q8, q_rows = _quantize_q(a, cfgs[2], q, mean_k, qk_mul)
        n_partial = a.plan(bm, bn).q_partial.numel()
    else:
        q8, q_rows, n_partial = dummy(dev, torch.uint8), dummy(dev), 0
    state, heads = softmax_state_buffers(n_partial, bm, hq, d, dev)
    if len(passes) == 2 and dev.type == "cuda":
        ensure_descriptor_allocator()
    args = dict(q_ptr=q, q8_ptr=q8, q_rows_ptr=q_rows, k8_ptr=k8, v8t_ptr=v8t, k_scale_ptr=k_scale,
                v_scale_ptr=v_scale, k_mean_ptr=mean_k, out_ptr=o_buf, lse_ptr=lse_buf, **plan_args, **state,
                stride_qt=q.stride(0), stride_qh=q.stride(1), stride_ot=o_buf.stride(0), stride_oh=o_buf.stride(1),
                q_heads=hq, total_q=tq, k_tiles=k8.shape[1] // bn, q_tiles=q_tiles, groups=a.groups,
                state_heads=heads, qk_mul=qk_mul, cap_out=float(sc["cap_out"]))
    for head_base in range(0, hq, heads):
        n_heads = min(heads, hq - head_base)
        KernelLaunch(cf, (q_tiles, n_heads), dict(args, head_base=head_base)).run()
        if n_partial:
            KernelLaunch(passes[1], (n_partial, n_heads), dict(args, head_base=head_base)).run()
    if o_buf is not out:
        out.copy_(o_buf)
    if lse_buf is not lse:
        lse.copy_(lse_buf)
