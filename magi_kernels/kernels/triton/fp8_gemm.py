"""Triton fp8 (e4m3) GEMM: C = epilogue(dequant(A @ B^T) + bias), A [M, K] and B [N, K] both K-major.

Accumulation: tensor-core fp8 MMAs accumulate in a limited-precision register (Hopper keeps ~22 bits,
"fp22"; long K loses digits: MAGI-1's fc2 has K = 16,384). With ``PROMOTE`` (the default) every K step (BLOCK_K <= 128)
runs into a fresh tensor-core partial sum that ``_promote`` adds into a separate fp32 accumulator, so no
tensor-core accumulation chain is longer than 128. Block scales (1x128 x 128x128) need exactly that
structure anyway (the scale changes every 128 of K), so block scaling is always promoted; per-tensor and
per-row/column scales are constant over K: A's rides along with each promotion, B's is applied once in
the epilogue. (tests/fp8/test_fp8_gemm_promotion.py shows what promotion buys with a test-only kernel that
emulates the limited accumulator on top of the same ``_load_k_step`` / ``_promote`` helpers.)
Without ``PROMOTE`` (the op's ``fast_accum=True``, per-tensor and per-row/column scales only) the loop is one
``acc = tl.dot(a, b, acc)`` chain over all of K, Triton's tutorial loop, and both scales are applied in the
epilogue: cuBLASLt's fast accumulation, the numerics MAGI-1's fp8 checkpoints were run with.

Structure: on sm_90 (aligned operands) the grid is persistent (about one program per SM walking tiles
``num_programs`` apart) and the tile loop is warp-specialized by Triton's Hopper pass: a producer issues
the TMA loads, two consumer warpgroups of 64 rows each run the wgmma + promotion, so one promotes while the
other's wgmma runs. Elsewhere each program computes one tile from pointer loads (cp.async pipelined).
docs/kernel_structure.md has the measured hot loops.

Scale modes (constexpr): A_MODE 0 = tensor (1 value), 1 = row ([M]), 2 = 1x128 blocks (the kernel reads
them K-group-major, [ceil(K/128), M], see ``block_scale_layouts``); B_MODE 0 = tensor, 1 = column ([N]),
2 = 128x128 blocks ([ceil(N/128), ceil(K/128)]).
ACT 0 = none, 1 = exact-erf GELU, 2 = SwiGLU over paired halves: out[:, j] = silu(y[:, j]) * y[:, j + N/2].
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from magi_kernels.utils import device as _device
from magi_kernels.kernels.triton._io import ensure_descriptor_allocator, round_to_bf16_grid
from magi_kernels.kernels.triton.aot import AotConfig, KernelLaunch, register_aot

MIN_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada (sm_89) and Hopper (sm_90)


@triton.jit
def _load_k_step(src, k0, tile0, size_k, offs_k, K_AXIS: tl.constexpr, USE_TMA: tl.constexpr, EVEN_K: tl.constexpr):
    """One operand's tile at K offset k0, K along axis K_AXIS of the result (A: [BM, BK], B^T: [BK, BN]).

    ``src`` is a tensor descriptor over the K-major operand (USE_TMA; ``tile0`` is the tile's first row)
    or a pointer tile already advanced to k0. Only a ragged K tail is masked (zeros add nothing); TMA
    zero-fills out-of-range rows and the tail in hardware.
    """
    if USE_TMA:
        x = src.load([tile0, k0])
        if K_AXIS == 0:
            x = x.T
    elif EVEN_K:
        x = tl.load(src)
    elif K_AXIS == 1:
        x = tl.load(src, mask=offs_k[None, :] < size_k - k0, other=0.0)
    else:
        x = tl.load(src, mask=offs_k[:, None] < size_k - k0, other=0.0)
    return x


@triton.jit
def _block_scales(a_scale_src, b_scale_src, a_s, b_s, group, tile_m0, tile_n0, rows, cols, stride_a_scale_k,
                  stride_b_scale_n, A_MODE: tl.constexpr, B_MODE: tl.constexpr, USE_TMA: tl.constexpr,
                  ONE_B_BLOCK: tl.constexpr):
    """K group ``group``'s block scales: A's for the tile's rows ([BLOCK_M, 1]) when A_MODE == 2, B's for its
    columns when B_MODE == 2 (otherwise ``a_s`` / ``b_s`` come back unchanged).

    A's scales arrive K-group-major ([ceil(K/128), M], see ``block_scale_layouts``), so one group's scales
    for the tile's rows are contiguous: one TMA box [1, BLOCK_M] or one contiguous vector load. B's come from the
    [ceil(N/128), ceil(K/128)] grid. A tile of BLOCK_N <= 128 columns that starts on a multiple of BLOCK_N
    lies in one 128-block (ONE_B_BLOCK: one scalar); the second SwiGLU half may straddle two (a [1, BLOCK_N]
    row). By TMA, B's box is [2, 4] (a box row is at least 16 bytes and starts on a 16-byte boundary): blocks
    ``tile_n0 // 128`` and the next, the four groups around ``group``, of which column ``group % 4`` is used.
    """
    if USE_TMA:
        if A_MODE == 2:
            a_s = tl.trans(a_scale_src.load([group, tile_m0]))
        if B_MODE == 2:
            first_block = tile_n0 // 128
            box = b_scale_src.load([first_block, group // 4 * 4])
            r = tl.arange(0, 2)[:, None]
            this_group = tl.arange(0, 4)[None, :] == group % 4
            b_s = tl.sum(tl.sum(tl.where((r == 0) & this_group, box, 0.0), axis=1), axis=0)
            if not ONE_B_BLOCK:
                b_next = tl.sum(tl.sum(tl.where((r == 1) & this_group, box, 0.0), axis=1), axis=0)
                b_s = tl.where(cols // 128 == first_block, b_s, b_next)[None, :]
    else:
        if A_MODE == 2:
            a_s = tl.load(a_scale_src + group * stride_a_scale_k + rows)[:, None]
        if B_MODE == 2:
            if ONE_B_BLOCK:
                b_s = tl.load(b_scale_src + (tile_n0 // 128) * stride_b_scale_n + group)
            else:
                b_s = tl.load(b_scale_src + (cols // 128) * stride_b_scale_n + group)[None, :]
    return a_s, b_s


@triton.jit
def _promote(acc, part, a_k, b_k, B_MODE: tl.constexpr):
    """acc + part * (this K group's scale): the fp32 promotion of one <= 128-wide tensor-core partial sum.

    ``a_k`` is A's scale for the group: its 1x128 block scales ([BLOCK_M, 1]) or its constant per-tensor /
    per-row scale; ``b_k`` is B's 128x128 block scale (B_MODE 2). B's per-tensor / per-column scale waits for
    the epilogue: a per-column scale held through the K loop costs a register per column of the thread's
    fragment, A's row scale only one per row. The multiply also keeps Triton from folding
    "acc += dot(a, b, 0)" back into "dot(a, b, acc)", which would silently undo the promotion.
    """
    if B_MODE == 2:
        return acc + part * (a_k * b_k)  # one product per row (per element only where B's scale varies)
    return acc + part * a_k


@triton.jit
def _apply_const_scales(acc, a_scale_ptr, b_scale_ptr, rows, cols, A_MODE: tl.constexpr, B_MODE: tl.constexpr):
    # Per-tensor / per-row / per-column dequantization, applied once after the K loop (mode 2: nothing left).
    if A_MODE == 0:
        acc = acc * tl.load(a_scale_ptr)
    elif A_MODE == 1:
        acc = acc * tl.load(a_scale_ptr + rows)[:, None]
    if B_MODE == 0:
        acc = acc * tl.load(b_scale_ptr)
    elif B_MODE == 1:
        acc = acc * tl.load(b_scale_ptr + cols)[None, :]
    return acc


@triton.jit
def _epilogue(acc, acc2, offs_m, offs_n, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, gate_ptr, size_m, n_out,
              stride_cm, stride_gate_m, A_MODE: tl.constexpr, B_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
              ACT: tl.constexpr, HAS_GATE: tl.constexpr, PROMOTE: tl.constexpr, OUT_BF16: tl.constexpr):
    """All fp32: dequant -> + bias -> activation -> * gate -> round -> store, for output rows ``offs_m`` and
    columns ``offs_n`` (``acc2``: SwiGLU's second half, GEMM columns offs_n + n_out)."""
    rows = offs_m % size_m  # out-of-range rows/cols read valid data; their results are never stored
    cols = offs_n % n_out
    cols2 = cols + n_out
    A_LEFT: tl.constexpr = 2 if PROMOTE else A_MODE  # with PROMOTE, A's scale is already in acc
    acc = _apply_const_scales(acc, a_scale_ptr, b_scale_ptr, rows, cols, A_LEFT, B_MODE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    if ACT == 1:
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    elif ACT == 2:
        acc2 = _apply_const_scales(acc2, a_scale_ptr, b_scale_ptr, rows, cols2, A_LEFT, B_MODE)
        if HAS_BIAS:
            acc2 += tl.load(bias_ptr + cols2).to(tl.float32)[None, :]
        acc = acc / (1.0 + tl.exp(-acc)) * acc2  # silu(first half) * second half
    if HAS_GATE:
        # gate rows are contiguous (stride_gate_m = 0 broadcasts one row): 32-bit offsets, no 2-D pointer tile
        acc *= tl.load(gate_ptr + rows[:, None] * stride_gate_m + cols[None, :]).to(tl.float32)
    if OUT_BF16:
        acc = round_to_bf16_grid(acc)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    mask = (offs_m[:, None] < size_m) & (offs_n[None, :] < n_out)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tile_coords(tile, size_m, n_out, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped tile order: GROUP_M row tiles share B tiles in L2.
    num_pid_m = tl.cdiv(size_m, BLOCK_M)
    width = GROUP_M * tl.cdiv(n_out, BLOCK_N)
    first_m = (tile // width) * GROUP_M
    group_size = min(num_pid_m - first_m, GROUP_M)
    return first_m + ((tile % width) % group_size), (tile % width) // group_size


@triton.jit
def _fp8_gemm_tile(
    tile, a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, gate_ptr, a_desc, b_desc, a_scale_src, b_scale_src,
    size_m, n_out, size_k, stride_am, stride_bn, stride_cm, stride_a_scale_k, stride_b_scale_n, stride_gate_m,
    A_MODE: tl.constexpr, B_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_GATE: tl.constexpr,
    PROMOTE: tl.constexpr, EVEN_K: tl.constexpr, OUT_BF16: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] output tile: the K loop with promotion, then the fused epilogue and the store.
    ``a_desc`` / ``b_desc`` are the operands' TMA descriptors (USE_TMA) or their base pointers."""
    IS_GLU: tl.constexpr = ACT == 2
    BLOCK_SCALES: tl.constexpr = A_MODE == 2 or B_MODE == 2
    # The epilogue runs in two column halves on wide or warp-specialized tiles: in one piece the heaviest
    # variants (GELU + gate, fp16/fp32 output) spilled a register or two (sm_90 128x128 tiles).
    SPLIT_EPI: tl.constexpr = USE_TMA or BLOCK_N >= 128
    offs_k = tl.arange(0, BLOCK_K)
    pid_m, pid_n = _tile_coords(tile, size_m, n_out, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Out-of-range rows/cols wrap onto valid ones (their results are never stored), so loads need no
    # M/N masks; only a ragged K tail is masked.
    rows = offs_m % size_m
    cols = offs_n % n_out
    # SwiGLU pairs output column j with GEMM column j + n_out: the second half of B.
    cols2 = cols + n_out if IS_GLU else cols
    if USE_TMA:
        a_src = a_desc
        b_src = b_desc
        b2_src = b_desc
    else:
        a_src = a_ptr + rows[:, None] * stride_am + offs_k[None, :]
        b_src = b_ptr + cols[None, :] * stride_bn + offs_k[:, None]  # [BLOCK_K, BLOCK_N] view of B^T
        b2_src = b_ptr + cols2[None, :] * stride_bn + offs_k[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # A's per-tensor / per-row scale, constant over K: applied at every promotion (see _promote); without
    # promotion the epilogue applies it.
    a_s = 1.0
    if PROMOTE:
        if A_MODE == 0:
            a_s = tl.load(a_scale_ptr)
        elif A_MODE == 1:
            a_s = tl.load(a_scale_ptr + rows)[:, None]
    # Flat K loop, one tl.dot per BLOCK_K (<= 128) step. With PROMOTE each dot starts from a fresh
    # accumulator and is added into acc on CUDA cores, so no MMA chain spans more than BLOCK_K of K.
    # (A nested "128-group" loop around several dots spilled on sm_89; this flat form does not.)
    for k0 in range(0, size_k, BLOCK_K):
        if PROMOTE:
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            part2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            part = acc
            part2 = acc2
        a = _load_k_step(a_src, k0, pid_m * BLOCK_M, size_k, offs_k, 1, USE_TMA, EVEN_K)
        b = _load_k_step(b_src, k0, pid_n * BLOCK_N, size_k, offs_k, 0, USE_TMA, EVEN_K)
        part = tl.dot(a, b, part)
        if IS_GLU:
            b2 = _load_k_step(b2_src, k0, n_out + pid_n * BLOCK_N, size_k, offs_k, 0, USE_TMA, EVEN_K)
            part2 = tl.dot(a, b2, part2)
        if not USE_TMA:
            # Loop-carried pointer increments (not base + k0): with base + k0 the sm_89 pipeliner did not
            # multi-buffer and the kernel spilled.
            a_src += BLOCK_K
            b_src += BLOCK_K
            if IS_GLU:
                b2_src += BLOCK_K
        if PROMOTE:
            # This K group's block scales, or A's constant one.
            a_k, b_k, b2_k = a_s, 1.0, 1.0
            if BLOCK_SCALES:
                group = k0 // 128
                a_k, b_k = _block_scales(a_scale_src, b_scale_src, a_s, b_k, group, pid_m * BLOCK_M,
                                         pid_n * BLOCK_N, rows, cols, stride_a_scale_k, stride_b_scale_n,
                                         A_MODE, B_MODE, USE_TMA, True)
                if IS_GLU:  # same rows (A's scales), B's second half
                    _, b2_k = _block_scales(a_scale_src, b_scale_src, a_s, b2_k, group, pid_m * BLOCK_M,
                                            n_out + pid_n * BLOCK_N, rows, cols2, stride_a_scale_k,
                                            stride_b_scale_n, 0, B_MODE, USE_TMA, False)
            acc = _promote(acc, part, a_k, b_k, B_MODE)
            if IS_GLU:
                acc2 = _promote(acc2, part2, a_k, b2_k, B_MODE)
        else:
            # Fast accumulation (the op's fast_accum=True): one tensor-core chain over all of K, as cuBLASLt's
            # FAST_ACCUM; both operands' constant scales wait for the epilogue.
            tl.static_assert(not BLOCK_SCALES, "block scales need PROMOTE")
            acc = part
            acc2 = part2

    # ---- epilogue
    if SPLIT_EPI:
        HALF: tl.constexpr = BLOCK_N // 2
        acc_lo, acc_hi = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
        acc2_lo, acc2_hi = tl.split(tl.permute(tl.reshape(acc2, (BLOCK_M, 2, HALF)), (0, 2, 1)))
        offs_lo = pid_n * BLOCK_N + tl.arange(0, HALF)
        _epilogue(acc_lo, acc2_lo, offs_m, offs_lo, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, gate_ptr, size_m,
                  n_out, stride_cm, stride_gate_m, A_MODE, B_MODE, HAS_BIAS, ACT, HAS_GATE, PROMOTE, OUT_BF16)
        _epilogue(acc_hi, acc2_hi, offs_m, offs_lo + HALF, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, gate_ptr,
                  size_m, n_out, stride_cm, stride_gate_m, A_MODE, B_MODE, HAS_BIAS, ACT, HAS_GATE, PROMOTE,
                  OUT_BF16)
    else:
        _epilogue(acc, acc2, offs_m, offs_n, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, gate_ptr, size_m, n_out,
                  stride_cm, stride_gate_m, A_MODE, B_MODE, HAS_BIAS, ACT, HAS_GATE, PROMOTE, OUT_BF16)


@triton.jit
def _fp8_gemm_kernel(
    a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, gate_ptr,
    size_m, n_out, size_k,
    stride_am, stride_bn, stride_cm, stride_a_scale_k, stride_b_scale_n, stride_gate_m, num_programs,
    A_MODE: tl.constexpr, B_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    HAS_GATE: tl.constexpr, PROMOTE: tl.constexpr, EVEN_K: tl.constexpr,
    OUT_BF16: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    IS_GLU: tl.constexpr = ACT == 2
    if USE_TMA:
        # Hopper: TMA tile loads keep no per-element 64-bit pointers in registers (pointer tiles spill).
        n_b = n_out * 2 if IS_GLU else n_out
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[size_m, size_k], strides=[stride_am, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[n_b, size_k], strides=[stride_bn, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
        # Block scales by TMA as well (16-byte rows: the launcher pads both scale grids' rows to 4 floats).
        if A_MODE == 2:
            a_scale_src = tl.make_tensor_descriptor(a_scale_ptr, shape=[tl.cdiv(size_k, 128), size_m],
                                                    strides=[stride_a_scale_k, 1], block_shape=[1, BLOCK_M])
        else:
            a_scale_src = a_scale_ptr
        if B_MODE == 2:
            b_scale_src = tl.make_tensor_descriptor(b_scale_ptr, shape=[tl.cdiv(n_b, 128), tl.cdiv(size_k, 128)],
                                                    strides=[stride_b_scale_n, 1], block_shape=[2, 4])
        else:
            b_scale_src = b_scale_ptr
    else:
        a_scale_src = a_scale_ptr
        b_scale_src = b_scale_ptr
    if USE_TMA:
        # Persistent: program p computes tiles p, p + num_programs, ... (num_programs: about one per SM).
        num_tiles = tl.cdiv(size_m, BLOCK_M) * tl.cdiv(n_out, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_tiles, num_programs, warp_specialize=WARP_SPECIALIZE):
            _fp8_gemm_tile(tile, a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, gate_ptr, a_desc, b_desc,
                           a_scale_src, b_scale_src, size_m, n_out, size_k, stride_am, stride_bn, stride_cm,
                           stride_a_scale_k, stride_b_scale_n, stride_gate_m, A_MODE, B_MODE, HAS_BIAS, ACT,
                           HAS_GATE, PROMOTE, EVEN_K, OUT_BF16, USE_TMA, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    else:
        # One tile per program: a tile loop around the pointer path costs registers (it spilled on sm_89/sm_90).
        _fp8_gemm_tile(tl.program_id(0), a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, gate_ptr, a_ptr,
                       b_ptr, a_scale_src, b_scale_src, size_m, n_out, size_k, stride_am, stride_bn, stride_cm,
                       stride_a_scale_k, stride_b_scale_n, stride_gate_m, A_MODE, B_MODE, HAS_BIAS, ACT, HAS_GATE,
                       PROMOTE, EVEN_K, OUT_BF16, USE_TMA, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


# --------------------------------------------------------------------------------------------------
# Tile configs, per arch. Registers: with promotion a tile holds two fp32 accumulators (four for
# SwiGLU, which keeps the tile's N half as wide), i.e. 2 * BLOCK_M * BLOCK_N / threads fp32 regs each;
# every config compiles with 0 spills for every registered variant (AOT-checked). BLOCK_K = 128 (one
# promotion per K step) wherever it fits: the promotion's per-element adds are then spread over the most
# MMA work. The sm_90 TMA configs are num_warps=4 because Triton 3.9's Hopper warp specialization only
# applies there (at 8 warps the same loop compiles without a producer partition); the pass itself adds the
# second consumer warpgroup and the producer.

@dataclasses.dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    use_tma: bool = False  # TMA descriptors and a persistent grid (one program per SM)
    warp_specialize: bool = False  # Triton's Hopper warp specialization of the persistent tile loop

    def __post_init__(self) -> None:
        if self.warp_specialize and not self.use_tma:
            raise ValueError(f"TileConfig {self}: warp_specialize needs use_tma (the producer issues TMA loads)")

    @property
    def label(self) -> str:
        tma = " tma" if self.use_tma else ""
        ws = " ws" if self.warp_specialize else ""
        return f"{self.block_m}x{self.block_n}x{self.block_k} w{self.num_warps} s{self.num_stages}{tma}{ws}"


# (arch, "large" | "small" M, glu, tma) -> config. "small" = M <= 64: a 64-row tile wastes less.
# sm_90 uses TMA descriptors (needs K % 16 == 0 and 16-byte aligned A/B rows); pointer tiles otherwise.
CONFIGS: dict[tuple[int, str, bool, bool], TileConfig] = {
    (90, "large", False, True): TileConfig(128, 128, 128, 4, 3, use_tma=True, warp_specialize=True),
    (90, "large", True, True): TileConfig(128, 64, 128, 4, 3, use_tma=True, warp_specialize=True),
    (90, "small", False, True): TileConfig(64, 128, 128, 4, 3, use_tma=True, warp_specialize=True),
    (90, "small", True, True): TileConfig(64, 64, 128, 4, 3, use_tma=True, warp_specialize=True),
    (90, "large", False, False): TileConfig(128, 128, 64, 8, 4),
    (90, "large", True, False): TileConfig(128, 64, 64, 8, 4),
    (90, "small", False, False): TileConfig(64, 64, 64, 4, 4),
    (90, "small", True, False): TileConfig(64, 32, 64, 4, 4),
    (89, "large", False, False): TileConfig(128, 128, 128, 8, 3),
    (89, "large", True, False): TileConfig(128, 32, 128, 8, 3),
    (89, "small", False, False): TileConfig(64, 64, 128, 4, 3),
    (89, "small", True, False): TileConfig(64, 32, 128, 4, 3),
}


def pick_config(capability: tuple[int, int], m: int, glu: bool, tma_ok: bool) -> TileConfig:
    arch = 90 if capability >= (9, 0) else 89
    return CONFIGS[(arch, "small" if m <= 64 else "large", glu, tma_ok and arch == 90)]


# Interpreter runs use small tiles: numpy time grows with the tile, not with the number of tiles' work.
INTERPRET_CONFIG = TileConfig(32, 32, 64, 4, 1, 4)


_POINTER_DTYPES = {"a_ptr": "fp8e4nv", "b_ptr": "fp8e4nv", "a_scale_ptr": "fp32", "b_scale_ptr": "fp32",
                   "bias_ptr": "bf16", "gate_ptr": "bf16"}  # c_ptr: the output dtype
# At run time Triton specializes pointer args and ints divisible by 16 (tt.divisibility); without that hint the
# pointer path neither vectorizes nor pipelines and spills. The AOT check compiles with divisibility 16 on every
# pointer, K and the operand/output row strides ("div16" in the labels) to see the binary the GPU runs for aligned
# shapes; ragged K (K % 16 != 0) compiles a slower unhinted variant at run time.
_DIVISIBLE_BY_16 = ("*_ptr", "size_k", "stride_am", "stride_bn", "stride_cm")
_MODES_A = {"tensor": 0, "row": 1, "block": 2}
_MODES_B = {"tensor": 0, "col": 1, "block": 2}
_ACTS = {None: 0, "gelu": 1, "swiglu": 2}
_OUT_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@functools.lru_cache(maxsize=None)
def make_config(tile: TileConfig, a_mode: int, b_mode: int, has_bias: bool, act: int, has_gate: bool, *,
                promote: bool = True, even_k: bool = True, out: str = "bf16", archs: tuple[int, ...] = (89, 90),
                label: str = "") -> AotConfig:
    """The kernel config for one tile shape and specialization (shipped ones are registered below)."""
    return AotConfig(
        kernel=f"{__name__}:_fp8_gemm_kernel", name="fp8_gemm", config=label or f"{tile.label} a{a_mode} b{b_mode}",
        pointer_dtypes={**_POINTER_DTYPES, "c_ptr": out},
        constexprs=dict(A_MODE=a_mode, B_MODE=b_mode, HAS_BIAS=has_bias, ACT=act, HAS_GATE=has_gate, PROMOTE=promote,
                        EVEN_K=even_k, OUT_BF16=out == "bf16", USE_TMA=tile.use_tma,
                        WARP_SPECIALIZE=tile.warp_specialize, BLOCK_M=tile.block_m,
                        BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, GROUP_M=tile.group_m),
        num_warps=tile.num_warps, num_stages=tile.num_stages, archs=archs, mma="fp8",
        divisible_by_16=_DIVISIBLE_BY_16)


# Shipped specializations per tile config: scale modes x the heaviest epilogue of each kind.
_AOT_VARIANTS = (
    # (label, A_MODE, B_MODE, HAS_BIAS, ACT, HAS_GATE)
    ("tensor", 0, 0, False, 0, False),
    ("row", 1, 1, False, 0, False),
    ("block", 2, 2, False, 0, False),
    ("row bias+gelu+gate", 1, 1, True, 1, True),
    ("block bias+gelu+gate", 2, 2, True, 1, True),
)
_AOT_GLU_VARIANTS = (
    ("row swiglu+bias+gate", 1, 1, True, 2, True),
    ("block swiglu+bias+gate", 2, 2, True, 2, True),
)


def _fast_accum(variant: tuple) -> tuple:
    """The fast-accumulation form of a non-block variant (label "... fast"): PROMOTE=False."""
    label, am, bm, *rest = variant
    return (f"{label} fast", am, bm, *rest)


def _register_aot() -> None:
    def reg(arch, bucket, cfg, label, am, bm, bias, act, gate, *, even_k=True, out="bf16"):
        tags = "div16" + ("" if even_k else " raggedK") + f" out={out}"
        register_aot(make_config(cfg, am, bm, bias, act, gate, promote=not label.endswith(" fast"), even_k=even_k,
                                 out=out, archs=(arch,), label=f"sm{arch} {bucket} {cfg.label} {label} {tags}"))

    for (arch, bucket, glu, _), cfg in CONFIGS.items():
        variants = _AOT_GLU_VARIANTS if glu else _AOT_VARIANTS
        # fast_accum=True takes per-tensor and per-row/column scales only.
        variants += tuple(_fast_accum(v) for v in variants if v[1] != 2 and v[2] != 2)
        for v in variants:
            reg(arch, bucket, cfg, *v)
        # The row- and block-scaled variants with every epilogue on: the most live registers of each family.
        for heavy in [v for v in variants if "+" in v[0]]:
            for out in ("fp16", "fp32"):  # fp16 / fp32 outputs compile separately
                reg(arch, bucket, cfg, *heavy, out=out)
            if cfg.use_tma:
                # TMA needs aligned operands (launch checks), but K may be ragged against BLOCK_K=128.
                reg(arch, bucket, cfg, *heavy, even_k=False)
        # Not covered (known, docs/testing.md#known-gaps): pointer-tile launches whose K or row strides are not
        # multiples of 16 compile without those hints, and those variants spill (up to 88 STL on sm_90 in the AOT
        # check).


_register_aot()


# --------------------------------------------------------------------------------------------------
# Launcher

def supports(a) -> str | None:
    """None if the kernel can run this ``Fp8GemmArgs`` call (every layout and epilogue; fp8 needs sm_89+)."""
    if a.device.type == "cuda":
        cap = _device.capability(a.device)
        if cap is not None and cap < MIN_CAPABILITY:
            return f"fp8 tensor cores need sm_89 or newer, device is sm_{cap[0]}{cap[1]}"
    return None


def _aligned(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or t.data_ptr() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)  # a fresh allocation: 16-byte aligned


def _padded_rows(rows: torch.Tensor) -> torch.Tensor:
    """A copy of a 2-D fp32 grid whose row stride is a multiple of 4 floats (16 bytes: a TMA row)."""
    n, width = rows.shape
    out = rows.new_zeros(n, -(-width // 4) * 4)
    out[:, :width] = rows
    return out


def block_scale_layouts(args) -> tuple[torch.Tensor, int, torch.Tensor, int]:
    """(a_scale, its row stride, b_scale, its row stride) as the kernel reads them.

    1x128 scales of A go K-group-major, [ceil(K/128), M]: a tile's scales for one K group are then one
    contiguous run (one TMA box or vector load) instead of BLOCK_M strided words. Both block grids get
    16-byte row strides (TMA). Other layouts pass through (row stride 0: unused).
    """
    a_scale, a_stride, b_scale, b_stride = args.a_scale, 0, args.b_scale, 0
    if args.a_mode == "block":
        a_scale = _padded_rows(args.a_scale.t())
        a_stride = a_scale.stride(0)
    if args.b_mode == "block":
        b_scale = _padded_rows(args.b_scale)
        b_stride = b_scale.stride(0)
    return a_scale, a_stride, b_scale, b_stride


# The interpreter runs the persistent TMA path with this many programs, so each walks several tiles.
INTERPRET_PROGRAMS = 2


def launch(args, out: torch.Tensor, *, config: TileConfig | None = None) -> None:
    """Run the kernel on validated ``Fp8GemmArgs`` (see magi_kernels.ops.fp8_gemm); writes ``out`` [M, N_out].
    ``args.fast_accum`` selects the unpromoted K loop (PROMOTE=False)."""
    from magi_kernels.kernels.triton import triton_interpreting

    # Every pointer the kernel gets is 16-byte aligned (the AOT check compiles them so; a misaligned view,
    # rare, is copied), so Triton's run-time specialization matches a checked binary.
    args = dataclasses.replace(args, a=_aligned(args.a), b=_aligned(args.b), a_scale=_aligned(args.a_scale),
                               b_scale=_aligned(args.b_scale), bias=_aligned(args.bias), gate=_aligned(args.gate))
    if out.data_ptr() % 16:
        tmp = torch.empty_like(out, memory_format=torch.contiguous_format)
        launch(args, tmp, config=config)
        out.copy_(tmp)
        return
    a, b = args.a, args.b
    m, k = a.shape
    n_out = out.shape[1]
    glu = args.act == "swiglu"
    interpreting = triton_interpreting()
    if config is None:
        if interpreting:
            config = INTERPRET_CONFIG
        else:
            tma_ok = k % 16 == 0 and a.stride(0) % 16 == 0 and b.stride(0) % 16 == 0
            config = pick_config(torch.cuda.get_device_capability(a.device), m, glu, tma_ok)
    if config.use_tma and not interpreting:
        ensure_descriptor_allocator()
    promote = not args.fast_accum  # the op's check already refused fast_accum with block scales
    if promote and 128 % config.block_k:
        raise ValueError(f"fp8_gemm: BLOCK_K={config.block_k} must divide the 128-wide promotion interval")
    a_scale, stride_a_scale_k, b_scale, stride_b_scale_n = block_scale_layouts(args)
    # Unused pointers still need a tensor; the constexpr flags keep the kernel from touching them.
    bias = args.bias if args.bias is not None else args.a_scale
    gate = args.gate if args.gate is not None else args.a_scale
    cfg = make_config(config, _MODES_A[args.a_mode], _MODES_B[args.b_mode], args.bias is not None, _ACTS[args.act],
                      args.gate is not None, promote=promote, even_k=k % config.block_k == 0,
                      out=_OUT_DTYPES[out.dtype])
    num_tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n_out, config.block_n)
    num_programs = num_tiles
    if config.use_tma:  # persistent: at most one program per SM, each walks tiles num_programs apart
        sms = INTERPRET_PROGRAMS if interpreting else torch.cuda.get_device_properties(a.device).multi_processor_count
        num_programs = min(num_tiles, sms)
    KernelLaunch(cfg, (num_programs,), dict(
        a_ptr=a, b_ptr=b, c_ptr=out, a_scale_ptr=a_scale, b_scale_ptr=b_scale, bias_ptr=bias, gate_ptr=gate,
        size_m=m, n_out=n_out, size_k=k, stride_am=a.stride(0), stride_bn=b.stride(0), stride_cm=out.stride(0),
        stride_a_scale_k=stride_a_scale_k, stride_b_scale_n=stride_b_scale_n,
        stride_gate_m=gate.stride(0) if args.gate is not None else 0, num_programs=num_programs)).run()
