"""fp32 promotion in the fp8 GEMM, shown under the interpreter with a test-only kernel.

The interpreter accumulates tl.dot in exact fp32, so the limited tensor-core accumulator is emulated here:
``_limited_accumulator_gemm_kernel`` truncates the running partial sum to a few mantissa bits after every
k=32 MMA and, with PROMOTE, hands each 128-wide K group to the shipped kernel's ``_promote`` helper (its
operands come from the shipped ``_load_k_step``). The shipped kernel itself carries no emulation switch.
"""

import pytest
import torch
import triton
import triton.language as tl

from magi_kernels.kernels.triton.fp8_gemm import _load_k_step, _promote
from magi_kernels.ops.fp8_gemm import make_args
from magi_kernels.reference.fp8 import emulate_limited_accumulation

from ..conftest import poison_like
from ._util import E4M3, need

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

MANTISSA_BITS = 13  # a deliberately short accumulator: the effect shows at K = 8192 in seconds


@triton.jit
def _truncate_mantissa(x, BITS: tl.constexpr):
    # Round toward zero to BITS mantissa bits.
    bits = x.to(tl.int32, bitcast=True)
    return (bits & (-(1 << (23 - BITS)))).to(tl.float32, bitcast=True)


@triton.jit
def _limited_accumulator_gemm_kernel(a_ptr, b_ptr, c_ptr, b_scale_ptr, size_k, stride_am, stride_bn, stride_cm,
                                     MANTISSA_BITS: tl.constexpr, PROMOTE: tl.constexpr, BLOCK_M: tl.constexpr,
                                     BLOCK_N: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of A @ B^T * b_scale (size_k a multiple of 128)."""
    MMA_K: tl.constexpr = 32
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, MMA_K)
    a_src = a_ptr + rows[:, None] * stride_am + offs_k[None, :]
    b_src = b_ptr + cols[None, :] * stride_bn + offs_k[:, None]
    b_scale = tl.load(b_scale_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, size_k, 128):
        if PROMOTE:
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in tl.static_range(128 // MMA_K):
            a = _load_k_step(a_src, k0 + s * MMA_K, 0, size_k, offs_k, 1, False, True)
            b = _load_k_step(b_src, k0 + s * MMA_K, 0, size_k, offs_k, 0, False, True)
            part = _truncate_mantissa(tl.dot(a, b, part), MANTISSA_BITS)
            a_src += MMA_K
            b_src += MMA_K
        if PROMOTE:
            acc = _promote(acc, part, b_scale, 1.0, 0)
    if not PROMOTE:
        acc = part * b_scale
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :], acc)


def _limited_gemm(a, b, promote):
    out = poison_like(torch.empty(a.shape[0], b.shape[0]))
    _limited_accumulator_gemm_kernel[(1,)](a, b, out, torch.ones(1), a.shape[1], a.stride(0), b.stride(0),
                                           out.stride(0), MANTISSA_BITS=MANTISSA_BITS, PROMOTE=promote,
                                           BLOCK_M=a.shape[0], BLOCK_N=b.shape[0])
    return out


def test_promotion_bounds_the_limited_accumulator_error():
    """One accumulation chain over K = 8192 loses ~1e-2 relative in a 13-bit accumulator; promoting every 128
    through ``_promote`` keeps it far smaller. The shipped kernel (exact fp32 dots here) is exact either way."""
    need("fp8_gemm", "triton")
    from magi_kernels.kernels.triton import fp8_gemm as kern

    m, n, k = 16, 16, 8192
    a = (torch.rand(m, k) * 1.5 + 0.5).to(E4M3)  # positive: the accumulator grows with K
    b = (torch.rand(n, k) * 1.5 + 0.5).to(E4M3)
    ref = a.double() @ b.double().t()
    rel = lambda y: ((y.double() - ref).abs() / ref.abs()).max().item()  # noqa: E731
    errs = {}
    for promote in (False, True):
        out = _limited_gemm(a, b, promote)
        errs[promote] = rel(out)
        # The emulation is the reference's accumulator model, computed the kernel's way.
        model = emulate_limited_accumulation(a.float(), b.float(), mantissa_bits=MANTISSA_BITS,
                                             promote_every=128 if promote else None)
        assert abs(rel(out) - rel(model)) <= 0.25 * rel(model), (promote, rel(out), rel(model))
    print(f"max rel err ({MANTISSA_BITS}-bit accumulator): one chain {errs[False]:.2e}, "
          f"promoted every 128 {errs[True]:.2e}")
    assert errs[False] > 1e-3
    assert errs[True] < errs[False] / 30

    one = torch.ones(1)
    for fast_accum in (False, True):
        args = make_args(a, b, one, one, None, None, None, torch.float32, fast_accum=fast_accum)
        exact = poison_like(torch.empty(m, n))
        kern.launch(args, exact, config=kern.TileConfig(16, 16, 128, 4, 1, 1))
        assert rel(exact) < 1e-6, fast_accum
