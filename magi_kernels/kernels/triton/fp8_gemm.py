"""Triton fp8 (e4m3) GEMM: C = epilogue(dequant(A @ B^T) + bias), A [M, K] and B [N, K] both K-major.

Accumulation: tensor-core fp8 MMAs accumulate in a limited-precision register (Hopper keeps ~22 bits,
"fp22"; long K loses digits: MAGI-1's fc2 has K = 16,384). With ``PROMOTE`` the kernel runs every 128-wide
K group into a fresh ``inner`` accumulator and adds it into a separate fp32 ``acc`` afterwards, so no
tensor-core accumulation chain is longer than 128. Block scales (1x128 x 128x128) need exactly that
structure anyway (the scale changes every 128 of K), so block scaling is always promoted; per-tensor and
per-row/column scales are constant over K and are applied once in the epilogue.

``TRUNC_BITS`` (tests only, default 0 = off) truncates the running MMA accumulator to that many mantissa
bits after every ``tl.dot`` to emulate the hardware accumulator under the interpreter (which accumulates
in exact fp32), so a test can show what promotion buys.

Scale modes (constexpr): A_MODE 0 = tensor (1 value), 1 = row ([M]), 2 = 1x128 blocks ([M, ceil(K/128)]);
B_MODE 0 = tensor, 1 = column ([N]), 2 = 128x128 blocks ([ceil(N/128), ceil(K/128)]).
ACT 0 = none, 1 = exact-erf GELU, 2 = SwiGLU over paired halves: out[:, j] = silu(y[:, j]) * y[:, j + N/2].
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from magi_kernels import registry
from magi_kernels.kernels.triton.aot import AotConfig, register_aot

SCALE_GROUP = 128  # K width of one scale block and of one promotion interval
MIN_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada (sm_89) and Hopper (sm_90)


@triton.jit
def _truncate_mantissa(x, BITS: tl.constexpr):
    # Round-toward-zero to BITS mantissa bits: a model of the tensor-core accumulator (tests only).
    bits = x.to(tl.int32, bitcast=True)
    bits = bits & (-(1 << (23 - BITS)))
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _load_k_tile(ptrs, k0, K, offs_k, K_AXIS: tl.constexpr, EVEN_K: tl.constexpr):
    # Load a pointer tile already advanced to K offset k0; only a ragged K tail is masked (zeros add nothing).
    if EVEN_K:
        x = tl.load(ptrs)
    elif K_AXIS == 1:
        x = tl.load(ptrs, mask=offs_k[None, :] < K - k0, other=0.0)
    else:
        x = tl.load(ptrs, mask=offs_k[:, None] < K - k0, other=0.0)
    return x


@triton.jit
def _round_to_bf16_grid(x):
    # fp32 -> nearest-even bf16 value, kept in fp32. The later .to(bf16) is then exact on every backend;
    # the Triton interpreter's own fp32->bf16 cast truncates (docs/testing.md#triton-interpreter). NaN stays NaN.
    bits = x.to(tl.int32, bitcast=True)
    r = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return tl.where(x != x, x, r.to(tl.float32, bitcast=True))


@triton.jit
def _apply_const_scales(acc, as_ptr, bs_ptr, rows, cols, A_MODE: tl.constexpr, B_MODE: tl.constexpr):
    # Per-tensor / per-row / per-column dequantization, applied once after the K loop (mode 2: nothing left).
    if A_MODE == 0:
        acc = acc * tl.load(as_ptr)
    elif A_MODE == 1:
        acc = acc * tl.load(as_ptr + rows)[:, None]
    if B_MODE == 0:
        acc = acc * tl.load(bs_ptr)
    elif B_MODE == 1:
        acc = acc * tl.load(bs_ptr + cols)[None, :]
    return acc


@triton.jit
def _fp8_gemm_kernel(
    a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, bias_ptr, gate_ptr,
    M, N_OUT, K,
    stride_am, stride_bn, stride_cm, stride_asm, stride_bsn, stride_gm,
    A_MODE: tl.constexpr, B_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    HAS_GATE: tl.constexpr, PROMOTE: tl.constexpr, TRUNC_BITS: tl.constexpr, EVEN_K: tl.constexpr,
    OUT_BF16: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row tiles share B tiles in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N_OUT, BLOCK_N)
    width = GROUP_M * num_pid_n
    group_id = pid // width
    first_m = group_id * GROUP_M
    group_size = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % width) % group_size)
    pid_n = (pid % width) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Out-of-range rows/cols wrap onto valid ones (their results are never stored), so loads need no
    # M/N masks; only a ragged K tail is masked.
    rows = offs_m % M
    cols = offs_n % N_OUT
    offs_k = tl.arange(0, BLOCK_K)
    IS_GLU: tl.constexpr = ACT == 2
    if USE_TMA:
        # Hopper: TMA tile loads keep no per-element 64-bit pointers in registers (pointer tiles spill) and
        # zero-fill out-of-range rows and the ragged K tail in hardware.
        n_b = N_OUT * 2 if IS_GLU else N_OUT
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[n_b, K], strides=[stride_bn, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + cols[None, :] * stride_bn + offs_k[:, None]  # [BLOCK_K, BLOCK_N] view of B^T
    if IS_GLU:
        cols2 = cols + N_OUT  # the paired second-half column of the GEMM output
        b2_ptrs = b_ptr + cols2[None, :] * stride_bn + offs_k[:, None]
    else:
        cols2 = cols
        b2_ptrs = b_ptrs

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if TRUNC_BITS > 0:
        # Emulation (tests): consume BLOCK_K as a chain of k=32 MMAs, like the hardware does.
        offs_k32 = tl.arange(0, 32)
        a32_ptrs = a_ptr + rows[:, None] * stride_am + offs_k32[None, :]
        b32_ptrs = b_ptr + cols[None, :] * stride_bn + offs_k32[:, None]
        b232_ptrs = b_ptr + cols2[None, :] * stride_bn + offs_k32[:, None]
    # B's per-tensor / per-column scale is applied at every promotion (acc += part * sb, an FFMA). Besides
    # being free, the multiply keeps Triton from folding "acc += dot(a, b, 0)" back into "dot(a, b, acc)",
    # which would silently undo the promotion. A's per-tensor / per-row scale waits for the epilogue.
    if B_MODE == 0:
        sb_k = tl.load(bs_ptr)
        sb2_k = sb_k
    elif B_MODE == 1:
        sb_k = tl.load(bs_ptr + cols)[None, :]
        sb2_k = tl.load(bs_ptr + cols2)[None, :]
    else:
        sb_k = 1.0
        sb2_k = 1.0
    # Flat K loop, one tl.dot per BLOCK_K (<= 128) step. With PROMOTE each dot starts from a fresh
    # accumulator and is added into acc on CUDA cores, so no MMA chain spans more than BLOCK_K of K.
    # (A nested "128-group" loop around several dots spilled on sm_89; this flat form does not.)
    for k0 in range(0, K, BLOCK_K):
        if PROMOTE:
            c1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            c2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            c1 = acc
            c2 = acc2
        if TRUNC_BITS == 0:
            if USE_TMA:
                a = a_desc.load([pid_m * BLOCK_M, k0])
                b = b_desc.load([pid_n * BLOCK_N, k0]).T
            else:
                a = _load_k_tile(a_ptrs, k0, K, offs_k, 1, EVEN_K)
                b = _load_k_tile(b_ptrs, k0, K, offs_k, 0, EVEN_K)
            c1 = tl.dot(a, b, c1)
            if IS_GLU:
                if USE_TMA:
                    b2 = b_desc.load([N_OUT + pid_n * BLOCK_N, k0]).T
                else:
                    b2 = _load_k_tile(b2_ptrs, k0, K, offs_k, 0, EVEN_K)
                c2 = tl.dot(a, b2, c2)
        else:
            for s in tl.static_range(BLOCK_K // 32):
                a = _load_k_tile(a32_ptrs + k0 + s * 32, k0 + s * 32, K, offs_k32, 1, False)
                b = _load_k_tile(b32_ptrs + k0 + s * 32, k0 + s * 32, K, offs_k32, 0, False)
                c1 = _truncate_mantissa(tl.dot(a, b, c1), TRUNC_BITS)
                if IS_GLU:
                    b2 = _load_k_tile(b232_ptrs + k0 + s * 32, k0 + s * 32, K, offs_k32, 0, False)
                    c2 = _truncate_mantissa(tl.dot(a, b2, c2), TRUNC_BITS)
        # Loop-carried pointer increments (not base + k0): with base + k0 the sm_89 pipeliner did not
        # multi-buffer and the kernel spilled.
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
        if IS_GLU:
            b2_ptrs += BLOCK_K
        if PROMOTE:
            # Promotion into the fp32 accumulator, scaled by this K group's block scales if any.
            g = k0 // 128
            if B_MODE == 2:
                sb = tl.load(bs_ptr + (cols // 128) * stride_bsn + g)[None, :]
            else:
                sb = sb_k
            if A_MODE == 2:
                acc += (c1 * tl.load(as_ptr + rows * stride_asm + g)[:, None]) * sb
            else:
                acc += c1 * sb
            if IS_GLU:
                if B_MODE == 2:
                    sb2 = tl.load(bs_ptr + (cols2 // 128) * stride_bsn + g)[None, :]
                else:
                    sb2 = sb2_k
                if A_MODE == 2:
                    acc2 += (c2 * tl.load(as_ptr + rows * stride_asm + g)[:, None]) * sb2
                else:
                    acc2 += c2 * sb2
        else:
            # One accumulation chain over all of K (what cuBLAS "fast accum" does); tests/benchmarks only.
            tl.static_assert(A_MODE != 2 and B_MODE != 2, "block scales need PROMOTE")
            acc = c1
            acc2 = c2

    # ---- epilogue, all fp32: dequant -> + bias -> activation -> * gate -> round -> store
    B_LEFT: tl.constexpr = 2 if PROMOTE else B_MODE  # with PROMOTE, B's scale is already in acc
    acc = _apply_const_scales(acc, as_ptr, bs_ptr, rows, cols, A_MODE, B_LEFT)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    if ACT == 1:
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    elif ACT == 2:
        acc2 = _apply_const_scales(acc2, as_ptr, bs_ptr, rows, cols2, A_MODE, B_LEFT)
        if HAS_BIAS:
            acc2 += tl.load(bias_ptr + cols2).to(tl.float32)[None, :]
        acc = acc / (1.0 + tl.exp(-acc)) * acc2  # silu(first half) * second half
    if HAS_GATE:
        # gate rows are contiguous (stride_gm = 0 broadcasts one row): 32-bit offsets, no 2-D pointer tile
        acc *= tl.load(gate_ptr + rows[:, None] * stride_gm + cols[None, :]).to(tl.float32)
    if OUT_BF16:
        acc = _round_to_bf16_grid(acc)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N_OUT)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# Tile configs, per arch. Registers: with promotion a tile holds two fp32 accumulators (four for
# SwiGLU, which keeps the tile's N half as wide), i.e. 2 * BLOCK_M * BLOCK_N / threads fp32 regs each;
# the configs below are the largest pointer-based tiles that compile with 0 spills (AOT-checked).

@dataclasses.dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    use_tma: bool = False

    @property
    def label(self) -> str:
        tma = " tma" if self.use_tma else ""
        return f"{self.block_m}x{self.block_n}x{self.block_k} w{self.num_warps} s{self.num_stages}{tma}"


# (arch, "large" | "small" M, glu, tma) -> config. "small" = M <= 64: a 64-row tile wastes less.
# sm_90 uses TMA descriptors (needs K % 16 == 0 and 16-byte aligned A/B rows); pointer tiles otherwise.
CONFIGS: dict[tuple[int, str, bool, bool], TileConfig] = {
    (90, "large", False, True): TileConfig(128, 128, 128, 8, 4, use_tma=True),
    (90, "large", True, True): TileConfig(128, 64, 128, 8, 4, use_tma=True),
    (90, "small", False, True): TileConfig(64, 128, 128, 4, 4, use_tma=True),
    (90, "small", True, True): TileConfig(64, 64, 128, 4, 4, use_tma=True),
    (90, "large", False, False): TileConfig(128, 128, 64, 8, 4),
    (90, "large", True, False): TileConfig(128, 64, 64, 8, 4),
    (90, "small", False, False): TileConfig(64, 64, 64, 4, 4),
    (90, "small", True, False): TileConfig(64, 32, 64, 4, 4),
    (89, "large", False, False): TileConfig(128, 128, 64, 8, 4),
    (89, "large", True, False): TileConfig(128, 32, 64, 4, 4),
    (89, "small", False, False): TileConfig(64, 64, 64, 4, 4),
    (89, "small", True, False): TileConfig(64, 32, 64, 4, 4),
}


def pick_config(capability: tuple[int, int], m: int, glu: bool, tma_ok: bool) -> TileConfig:
    arch = 90 if capability >= (9, 0) else 89
    return CONFIGS[(arch, "small" if m <= 64 else "large", glu, tma_ok and arch == 90)]


# Interpreter runs use small tiles: numpy time grows with the tile, not with the number of tiles' work.
INTERPRET_CONFIG = TileConfig(32, 32, 64, 4, 1, 4)


def _signature(out_ty: str) -> dict[str, str]:
    sig = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "c_ptr": out_ty, "as_ptr": "*fp32", "bs_ptr": "*fp32",
           "bias_ptr": "*bf16", "gate_ptr": "*bf16", "M": "i32", "N_OUT": "i32", "K": "i32"}
    for s in ("stride_am", "stride_bn", "stride_cm", "stride_asm", "stride_bsn", "stride_gm"):
        sig[s] = "i32"
    for c in ("A_MODE", "B_MODE", "HAS_BIAS", "ACT", "HAS_GATE", "PROMOTE", "TRUNC_BITS", "EVEN_K", "OUT_BF16", "USE_TMA",
              "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"):
        sig[c] = "constexpr"
    return sig


# AOT note: at run time Triton specializes pointer args and ints divisible by 16 (tt.divisibility); without
# that hint the pointer path neither vectorizes nor pipelines and spills. The AOT check must compile with
# divisibility 16 on every pointer, K, stride_am, stride_bn and stride_cm ("div16" in the labels) to see the
# binary the GPU runs for aligned shapes; ragged K (K % 16 != 0) compiles a slower unhinted variant at run time.
_DIV16_ARGS = ("a_ptr", "b_ptr", "c_ptr", "as_ptr", "bs_ptr", "bias_ptr", "gate_ptr", "K", "stride_am", "stride_bn",
               "stride_cm")
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


def _register_aot() -> None:
    def reg(arch, bucket, cfg, label, am, bm, bias, act, gate, *, even_k=True, out_ty="*bf16"):
        tags = "div16" + ("" if even_k else " raggedK") + f" out={out_ty[1:]}"
        register_aot(AotConfig(
            kernel=f"{__name__}:_fp8_gemm_kernel", name="fp8_gemm",
            config=f"sm{arch} {bucket} {cfg.label} {label} {tags}",
            signature=_signature(out_ty),
            constexprs=dict(A_MODE=am, B_MODE=bm, HAS_BIAS=bias, ACT=act, HAS_GATE=gate, PROMOTE=True,
                            TRUNC_BITS=0, EVEN_K=even_k, OUT_BF16=out_ty == "*bf16", USE_TMA=cfg.use_tma,
                            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, archs=(arch,), mma="fp8",
            divisible_by_16=_DIV16_ARGS))

    for (arch, bucket, glu, _), cfg in CONFIGS.items():
        variants = _AOT_GLU_VARIANTS if glu else _AOT_VARIANTS
        for v in variants:
            reg(arch, bucket, cfg, *v)
        # The row- and block-scaled variants with every epilogue on: the most live registers of each family.
        for heavy in [v for v in variants if "+" in v[0]]:
            for out_ty in ("*fp16", "*fp32"):  # fp16 / fp32 outputs compile separately
                reg(arch, bucket, cfg, *heavy, out_ty=out_ty)
            if cfg.use_tma:
                # TMA needs aligned operands (launch checks), but K may be ragged against BLOCK_K=128.
                reg(arch, bucket, cfg, *heavy, even_k=False)
        # Not covered (known, docs/testing.md#known-gaps): pointer-tile launches whose K or row strides are not multiples
        # of 16 compile without those hints, and those variants spill (up to 88 STL on sm_90 in the AOT check).


_register_aot()


# --------------------------------------------------------------------------------------------------
# Launcher

def supports(info: registry.CallInfo) -> str | None:
    if info.device.type == "cuda":
        cap = info.capability
        if cap is not None and cap < MIN_CAPABILITY:
            return f"fp8 tensor cores need sm_89 or newer, device is sm_{cap[0]}{cap[1]}"
    return None


def _ensure_tma_allocator() -> None:
    # Device-side tensor descriptors need a small global scratch buffer per program, from this allocator.
    global _ALLOCATOR_SET
    if not _ALLOCATOR_SET:
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _ALLOCATOR_SET = True


_ALLOCATOR_SET = False


def _aligned(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or t.data_ptr() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)  # a fresh allocation: 16-byte aligned


def launch(args, out: torch.Tensor, *, promote: bool = True, trunc_bits: int = 0,
           config: TileConfig | None = None) -> None:
    """Run the kernel on validated ``Fp8GemmArgs`` (see magi_kernels.ops.fp8_gemm); writes ``out`` [M, N_out]."""
    from magi_kernels.kernels.triton import triton_interpreting

    # Every pointer the kernel gets is 16-byte aligned (the AOT check compiles them so; a misaligned view,
    # rare, is copied), so Triton's run-time specialization matches a checked binary.
    args = dataclasses.replace(args, a=_aligned(args.a), b=_aligned(args.b), a_scale=_aligned(args.a_scale),
                               b_scale=_aligned(args.b_scale), bias=_aligned(args.bias), gate=_aligned(args.gate))
    if out.data_ptr() % 16:
        tmp = torch.empty_like(out, memory_format=torch.contiguous_format)
        launch(args, tmp, promote=promote, trunc_bits=trunc_bits, config=config)
        out.copy_(tmp)
        return
    a, b = args.a, args.b
    m, k = a.shape
    n_out = out.shape[1]
    glu = args.act == "swiglu"
    if config is None:
        if triton_interpreting():
            config = INTERPRET_CONFIG
        else:
            tma_ok = k % 16 == 0 and a.stride(0) % 16 == 0 and b.stride(0) % 16 == 0
            config = pick_config(torch.cuda.get_device_capability(a.device), m, glu, tma_ok)
            if config.use_tma:
                _ensure_tma_allocator()
    if promote and 128 % config.block_k:
        raise ValueError(f"fp8_gemm: BLOCK_K={config.block_k} must divide the 128-wide promotion interval")
    if not promote and (args.a_mode == "block" or args.b_mode == "block"):
        raise ValueError("fp8_gemm: block scales are applied per 128-wide K group, so they need promote=True")
    # Unused pointers still need a tensor; the constexpr flags keep the kernel from touching them.
    bias = args.bias if args.bias is not None else args.a_scale
    gate = args.gate if args.gate is not None else args.a_scale
    g_sm = gate.stride(0) if args.gate is not None else 0
    modes_a = {"tensor": 0, "row": 1, "block": 2}
    modes_b = {"tensor": 0, "col": 1, "block": 2}
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n_out, config.block_n),)
    _fp8_gemm_kernel[grid](
        a, b, out, args.a_scale, args.b_scale, bias, gate,
        m, n_out, k,
        a.stride(0), b.stride(0), out.stride(0),
        args.a_scale.stride(0) if args.a_mode == "block" else 0,
        args.b_scale.stride(0) if args.b_mode == "block" else 0,
        g_sm,
        A_MODE=modes_a[args.a_mode], B_MODE=modes_b[args.b_mode], HAS_BIAS=args.bias is not None,
        ACT={None: 0, "gelu": 1, "swiglu": 2}[args.act], HAS_GATE=args.gate is not None,
        PROMOTE=promote, TRUNC_BITS=trunc_bits, EVEN_K=k % config.block_k == 0,
        OUT_BF16=out.dtype == torch.bfloat16, USE_TMA=config.use_tma,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
