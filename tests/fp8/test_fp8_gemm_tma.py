"""The Triton fp8 GEMM's TMA-descriptor path (what sm_90 runs for aligned shapes), executed in the
interpreter with a small TMA tile config, against float64. The default interpreter config uses pointer
tiles, so without this file the Hopper path would be device code that no CPU test executes."""

import pytest
import torch

from magi_kernels.ops.fp8_gemm import make_args
from magi_kernels.reference.fp8 import cdiv, fp8_gemm_ref

from ..conftest import poison_like
from ._util import E4M3, e4m3_exact, need, pow2


@pytest.mark.parametrize("m, n, k, act, with_bias, modes", [
    (37, 48, 160, None, False, ("row", "col")),        # ragged M and K (the TMA unit zero-fills the tail)
    (20, 64, 96, "swiglu", True, ("tensor", "col")),   # paired-halves epilogue reads two B tiles
    (16, 32, 256, "gelu", True, ("block", "block")),   # 1x128 x 128x128 block scales
])
def test_tma_path_matches_float64(m, n, k, act, with_bias, modes):
    need("fp8_gemm", "triton")
    from magi_kernels.kernels.triton import fp8_gemm as kern

    a = e4m3_exact(m, k).to(E4M3)
    b = e4m3_exact(n, k).to(E4M3)
    a_mode, b_mode = modes
    sa = {"tensor": pow2(1), "row": pow2(m), "block": pow2(m, cdiv(k, 128))}[a_mode]
    sb = {"tensor": pow2(1), "col": pow2(n), "block": pow2(cdiv(n, 128), cdiv(k, 128))}[b_mode]
    bias = torch.randn(n) if with_bias else None
    args = make_args(a, b, sa, sb, bias, act, None, torch.float32)
    out = poison_like(torch.empty(m, args.n_out))
    kern.launch(args, out, config=kern.TileConfig(32, 32, 64, 4, 1, 4, use_tma=True))
    ref = fp8_gemm_ref(a, b, sa, sb, args.a_mode, args.b_mode, bias=bias, act=act, out_dtype=torch.float64,
                       compute_dtype=torch.float64)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)


def test_misaligned_operand_views_are_realigned_and_exact():
    """A K-slice of a wider e4m3 buffer starts off a 16-byte boundary; the launcher copies it so the kernel
    only ever sees the 16-byte-aligned pointers the AOT check compiled for."""
    need("fp8_gemm", "triton")
    from magi_kernels.ops.fp8_gemm import fp8_gemm

    m, n, k = 19, 40, 96
    buf = e4m3_exact(m, k + 5).to(E4M3)
    a = buf[:, 3:3 + k]
    assert a.data_ptr() % 16 != 0 and a.stride(-1) == 1
    b = e4m3_exact(n, k).to(E4M3)
    sa, sb = pow2(m), pow2(n)
    out = fp8_gemm(a, b, sa, sb, out_dtype=torch.float32, backend="triton")
    ref = fp8_gemm_ref(a, b, sa, sb, "row", "col", out_dtype=torch.float64, compute_dtype=torch.float64)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)  # fp32 accumulation order
