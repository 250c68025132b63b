"""Test-only Triton kernels that prove the AOT checker can tell good kernels from bad ones.

Nothing here is registered with ``register_aot``: the tests hand ``FIXTURES`` to the checker's Python API
in a subprocess without TRITON_INTERPRET, so shipped-config runs never see these.
"""

from __future__ import annotations

import triton
import triton.language as tl

from magi_kernels.kernels.triton.aot import AotConfig


@triton.jit
def matmul_kernel(a_ptr, b_ptr, c_ptr, size_m, size_n, size_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """c[m, n] = a[m, k] @ b[k, n], row-major, fp32 accumulate; operand dtype comes from the signature."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, size_k, BLOCK_K):
        av = tl.load(a_ptr + rm[:, None] * size_k + (k0 + rk)[None, :],
                     mask=(rm[:, None] < size_m) & ((k0 + rk)[None, :] < size_k),
                     other=0.0)
        bv = tl.load(b_ptr + (k0 + rk)[:, None] * size_n + rn[None, :],
                     mask=((k0 + rk)[:, None] < size_k) & (rn[None, :] < size_n),
                     other=0.0)
        acc = tl.dot(av, bv, acc)
    tl.store(c_ptr + rm[:, None] * size_n + rn[None, :], acc, mask=(rm[:, None] < size_m) & (rn[None, :] < size_n))


@triton.jit
def spill_kernel(x_ptr, y_ptr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Keeps a ROWS x COLS fp32 tile live across a reduction: with one warp that is far more values
    per thread than the 255-register limit, so ptxas must spill."""
    offs = tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    v = tl.load(x_ptr + offs)
    total = tl.sum(tl.sum(v, axis=1), axis=0)
    tl.store(y_ptr + offs, v * total)


@triton.jit
def copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """No tl.dot at all: declaring it mma='f16' must fail the tensor-core check."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


_MM = f"{__name__}:matmul_kernel"


def _mm_sig(operand: str) -> dict[str, str]:
    return {"a_ptr": operand, "b_ptr": operand, "c_ptr": "fp32"}


# name -> (config, what the checker must conclude: "ok" or a substring of the failure reason)
FIXTURES: dict[str, tuple[AotConfig, str]] = {
    "f16_matmul": (AotConfig(kernel=_MM, name="fixture_f16_matmul", config="64x64x32 w4",
                             pointer_dtypes=_mm_sig("fp16"), constexprs={"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32},
                             num_warps=4, num_stages=2, archs=(80, 89, 90), mma="f16"), "ok"),
    "fp8_matmul": (AotConfig(kernel=_MM, name="fixture_fp8_matmul", config="64x64x64 w4",
                             pointer_dtypes=_mm_sig("fp8e4nv"),
                             constexprs={"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64},
                             num_warps=4, num_stages=2, archs=(89, 90), mma="fp8"), "ok"),
    # The same fp16 matmul declared as a plain (no tensor core) kernel: the checker must object.
    "f16_matmul_declared_none": (AotConfig(kernel=_MM, name="fixture_f16_matmul_as_none", config="64x64x32 w4",
                                           pointer_dtypes=_mm_sig("fp16"),
                                           constexprs={"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4,
                                           num_stages=2, archs=(90,), mma=None), "declared mma=None"),
    "spills": (AotConfig(kernel=f"{__name__}:spill_kernel", name="fixture_spills", config="64x128 w1",
                         pointer_dtypes={"x_ptr": "fp32", "y_ptr": "fp32"},
                         constexprs={"ROWS": 64, "COLS": 128}, num_warps=1, num_stages=1, archs=(90,)),
               "register spills"),
    "no_dot_declared_f16": (AotConfig(kernel=f"{__name__}:copy_kernel", name="fixture_copy_as_f16",
                                      config="1024 w4", pointer_dtypes={"x_ptr": "fp16", "y_ptr": "fp16"},
                                      constexprs={"BLOCK": 1024}, num_warps=4, num_stages=1, archs=(80, 89, 90),
                                      mma="f16"), "expected H"),
}
