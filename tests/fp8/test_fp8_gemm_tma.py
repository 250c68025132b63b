"""The Triton fp8 GEMM's TMA-descriptor path (what sm_90 runs for aligned shapes), executed in the
interpreter against float64: the device-side descriptors (operands and block-scale grids), the persistent
tile loop (``INTERPRET_PROGRAMS`` programs, each walking several tiles) and the warp-specialize flag (the
interpreter runs the loop body as written; the producer/consumer split exists only in compiled code). The
default interpreter config uses pointer tiles, so without this file the Hopper path would be device code
that no CPU test executes."""

import pytest
import torch

from magi_kernels.ops.fp8_gemm import make_args
from magi_kernels.reference.fp8 import cdiv, fp8_gemm_ref

from ..conftest import poison_like
from ._util import E4M3, e4m3_exact, need, pow2


SMALL_TMA = {"block_m": 32, "block_n": 32, "block_k": 64, "num_warps": 4, "num_stages": 1, "group_m": 4,
             "use_tma": True}


@pytest.mark.parametrize("m, n, k, act, with_bias, modes, ws", [
    (37, 48, 160, None, False, ("row", "col"), False),        # ragged M and K (the TMA unit zero-fills the tail)
    (20, 64, 96, "swiglu", True, ("tensor", "col"), True),    # paired-halves epilogue reads two B tiles
    (16, 32, 256, "gelu", True, ("block", "block"), True),    # 1x128 x 128x128 block scales
    (70, 200, 656, None, False, ("block", "block"), True),    # 6 K groups: B's scale box column group % 4
    (33, 96, 304, None, True, ("block", "tensor"), False),    # only A blocked (B's descriptor not built)
    (40, 72, 528, None, False, ("row", "block"), True),       # only B blocked, ragged N across 128-blocks
    (24, 2 * 150, 384, "swiglu", False, ("block", "block"), True),  # second half straddles 128-blocks
])
def test_tma_path_matches_float64(m, n, k, act, with_bias, modes, ws):
    need("fp8_gemm", "triton")
    from magi_kernels.kernels.triton import fp8_gemm as kern

    # Exponents 0..2 and power-of-two scales in [1/2, 2]: every fp32 partial sum is exact, so any
    # accumulation order gives the float64 result (the tolerance only covers the epilogue's transcendentals).
    a = e4m3_exact(m, k, lo=0, hi=2).to(E4M3)
    b = e4m3_exact(n, k, lo=0, hi=2).to(E4M3)
    a_mode, b_mode = modes
    p = lambda *shape: pow2(*shape, lo=-1, hi=1)
    sa = {"tensor": p(1), "row": p(m), "block": p(m, cdiv(k, 128))}[a_mode]
    sb = {"tensor": p(1), "col": p(n), "block": p(cdiv(n, 128), cdiv(k, 128))}[b_mode]
    bias = torch.randn(n) if with_bias else None
    args = make_args(a, b, sa, sb, bias, act, None, torch.float32)
    out = poison_like(torch.empty(m, args.n_out))
    kern.launch(args, out, config=kern.TileConfig(**SMALL_TMA, warp_specialize=ws))
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


def test_shipped_sm90_tile_runs_in_the_interpreter():
    """The shipped Hopper config itself (128x128x128, warp-specialized, persistent): the same kernel body the
    AOT check compiles, on a shape with more tiles than programs and a ragged K group."""
    need("fp8_gemm", "triton")
    from magi_kernels.kernels.triton import fp8_gemm as kern

    cfg = kern.pick_config((9, 0), 200, False, True)
    assert cfg.use_tma and cfg.warp_specialize and cfg.block_k == 128
    m, n, k = 200, 300, 400
    a, b = e4m3_exact(m, k, lo=0, hi=2).to(E4M3), e4m3_exact(n, k, lo=0, hi=2).to(E4M3)
    sa, sb = pow2(m, cdiv(k, 128), lo=-1, hi=1), pow2(cdiv(n, 128), cdiv(k, 128), lo=-1, hi=1)
    args = make_args(a, b, sa, sb, None, None, None, torch.float32)
    out = poison_like(torch.empty(m, n))
    kern.launch(args, out, config=cfg)
    ref = fp8_gemm_ref(a, b, sa, sb, "block", "block", out_dtype=torch.float64, compute_dtype=torch.float64)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)


def test_block_scale_grids_get_16_byte_rows():
    """TMA rows are 16-byte multiples: A's 1x128 scales go K-group-major and both grids are padded to 4 floats
    per row, values unchanged."""
    from magi_kernels.kernels.triton import fp8_gemm as kern

    m, n, k = 7, 300, 5 * 128 + 1
    a, b = torch.zeros(m, k).to(E4M3), torch.zeros(n, k).to(E4M3)
    sa, sb = torch.rand(m, cdiv(k, 128)), torch.rand(cdiv(n, 128), cdiv(k, 128))
    a_t, a_stride, b_p, b_stride = kern.block_scale_layouts(make_args(a, b, sa, sb, None, None, None))
    assert a_t.shape == (6, 8) and a_stride == 8 and b_p.shape == (3, 8) and b_stride == 8
    assert torch.equal(a_t[:, :m], sa.t()) and torch.equal(b_p[:, :6], sb)
    assert not a_t[:, m:].any() and not b_p[:, 6:].any()


@pytest.mark.parametrize("capability, glu, tma_ok, block_k, ws", [
    ((9, 0), False, True, 128, True), ((9, 0), True, True, 128, True), ((9, 0), False, False, 64, False),
    ((8, 9), False, False, 128, False), ((8, 9), True, False, 128, False),
])
def test_pick_config_selects_the_arch_configs(capability, glu, tma_ok, block_k, ws):
    from magi_kernels.kernels.triton import fp8_gemm as kern

    for m in (16, 4096):
        cfg = kern.pick_config(capability, m, glu, tma_ok)
        assert (cfg.block_k, cfg.warp_specialize, cfg.use_tma) == (block_k, ws, ws)
