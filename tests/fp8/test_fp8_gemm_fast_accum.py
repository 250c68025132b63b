"""fp8_gemm(..., fast_accum=True): the unpromoted K loop (one tensor-core chain, every scale in the epilogue).

The interpreter runs that loop on the pointer path and on the sm_90 TMA path against float64; the accumulator
model of ``reference/fp8.py`` shows what dropping the promotion costs at MAGI-1 fc2's K = 16384 (the
interpreter's dots are exact fp32, so it cannot show that itself).
"""

import pytest
import torch

import magi_kernels as mk
from magi_kernels.modules import Fp8Linear, PerChannelQuantizedFp8Linear, PerTensorQuantizedFp8Linear
from magi_kernels.ops.fp8_gemm import make_args
from magi_kernels.reference.fp8 import apply_epilogue_ref, emulate_limited_accumulation, fp8_gemm_ref
from magi_kernels.utils.checks import MagiArgumentError

from ..conftest import poison_like
from ._util import E4M3, e4m3_exact, need, pow2

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

SMALL_TMA = dict(block_m=32, block_n=32, block_k=64, num_warps=4, num_stages=1, group_m=4, use_tma=True)


def _scales(a_mode, b_mode, m, n):
    p = lambda *shape: pow2(*shape, lo=-1, hi=1)  # noqa: E731  powers of two: exact products
    return {"tensor": p(1), "row": p(m)}[a_mode], {"tensor": p(1), "col": p(n)}[b_mode]


@pytest.fixture
def promote_flags(monkeypatch):
    """The PROMOTE constexpr of every fp8_gemm launch in the test (proof of which loop ran)."""
    from magi_kernels.kernels.triton import fp8_gemm as kern

    seen = []
    real = kern.KernelLaunch

    def recording(cfg, grid, args):
        seen.append(cfg.constexprs["PROMOTE"])
        return real(cfg, grid, args)

    monkeypatch.setattr(kern, "KernelLaunch", recording)
    return seen


@pytest.mark.parametrize("path, m, n, k, modes, epilogue", [
    ("pointer", 17, 72, 300, ("row", "col"), None),            # ragged K tail, N past one tile
    ("pointer", 45, 40, 50, ("tensor", "tensor"), "gelu"),     # K shorter than one step
    ("pointer", 33, 2 * 40, 200, ("tensor", "col"), "swiglu+gate"),
    ("tma", 37, 48, 160, ("row", "col"), None),                # ragged M and K; TMA zero-fills the tail
    ("tma", 20, 2 * 48, 96, ("row", "tensor"), "swiglu"),      # paired halves: two B tiles per step
    ("tma", 70, 72, 336, ("tensor", "col"), "gelu+gate"),
])
def test_fast_accum_matches_float64(path, m, n, k, modes, epilogue, promote_flags):
    """Values of exponent 0..2 and power-of-two scales keep every fp32 partial sum exact, so the unpromoted
    chain must equal float64 (the tolerance covers only the epilogue's transcendentals); unwritten outputs stay
    NaN."""
    need("fp8_gemm", "triton")
    from magi_kernels.kernels.triton import fp8_gemm as kern

    a, b = e4m3_exact(m, k, lo=0, hi=2).to(E4M3), e4m3_exact(n, k, lo=0, hi=2).to(E4M3)
    sa, sb = _scales(*modes, m, n)
    bias = torch.randn(n) if epilogue else None
    n_out = n // 2 if epilogue and "swiglu" in epilogue else n
    gate = torch.randn(m, n_out) if epilogue and "gate" in epilogue else None
    args = make_args(a, b, sa, sb, bias, epilogue, gate, torch.float32, fast_accum=True)
    out = poison_like(torch.empty(m, n_out))
    config = kern.TileConfig(**SMALL_TMA, warp_specialize=True) if path == "tma" else None
    kern.launch(args, out, config=config)
    assert promote_flags == [False]
    y = fp8_gemm_ref(a, b, args.a_scale, args.b_scale, args.a_mode, args.b_mode, out_dtype=torch.float64,
                     compute_dtype=torch.float64)
    ref = apply_epilogue_ref(y, None if bias is None else bias.double(), args.act,
                             None if gate is None else gate.double())
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 if epilogue else 0)


@pytest.mark.parametrize("capability", [(9, 0), (8, 9)], ids=["sm90", "sm89"])
def test_shipped_tiles_run_fast_accum_in_the_interpreter(capability, promote_flags):
    """The shipped 128x128x128 configs themselves (sm_90: persistent, warp-specialized, TMA; sm_89: pointer
    tiles), the kernel bodies the AOT check compiles with PROMOTE=False, on a shape with ragged M, N and K."""
    need("fp8_gemm", "triton")
    from magi_kernels.kernels.triton import fp8_gemm as kern

    cfg = kern.pick_config(capability, 200, False, True)
    assert cfg.block_k == 128 and cfg.use_tma == (capability == (9, 0))
    m, n, k = 200, 300, 400
    a, b = e4m3_exact(m, k, lo=0, hi=2).to(E4M3), e4m3_exact(n, k, lo=0, hi=2).to(E4M3)
    sa, sb = _scales("row", "col", m, n)
    args = make_args(a, b, sa, sb, None, None, None, torch.float32, fast_accum=True)
    out = poison_like(torch.empty(m, n))
    kern.launch(args, out, config=cfg)
    assert promote_flags == [False]
    ref = fp8_gemm_ref(a, b, sa, sb, "row", "col", out_dtype=torch.float64, compute_dtype=torch.float64)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=0)


def test_public_op_routes_fast_accum_to_every_backend(promote_flags):
    """fp8_gemm(fast_accum=True) reaches the Triton kernel as PROMOTE=False; the scaled_mm (oneDNN here) and torch
    backends compute the same exact fp32 result, bf16 output."""
    m, n, k = 29, 64, 96
    a, b = (torch.randn(m, k) * 2).to(E4M3), torch.randn(n, k).to(E4M3)
    sa, sb = torch.rand(m) + 0.5, torch.rand(n) * 0.02 + 0.01
    ref = (a.double() * sa.double()[:, None]) @ (b.double() * sb.double()[:, None]).t()
    backends = [bk for bk in ("torch", "scaled_mm", "triton") if mk.registry.device_reason(bk, a.device) is None]
    for backend in backends:
        out = mk.fp8_gemm(a, b, sa, sb, backend=backend, fast_accum=True)
        torch.testing.assert_close(out.double(), ref, rtol=2**-8, atol=1e-3)  # one bf16 rounding
    if "triton" in backends:
        assert promote_flags == [False]


@pytest.mark.parametrize("a_scale, b_scale", [
    (torch.ones(8, 2), torch.ones(1)),       # A 1x128 blocks
    (torch.ones(8), torch.ones(1, 2)),       # B 128x128 blocks
])
def test_fast_accum_refuses_block_scales(a_scale, b_scale):
    a, b = torch.zeros(8, 200).to(E4M3), torch.zeros(16, 200).to(E4M3)
    with pytest.raises(MagiArgumentError, match="argument 'fast_accum' must be False with block scales"):
        mk.fp8_gemm(a, b, a_scale, b_scale, fast_accum=True)
    with pytest.raises(MagiArgumentError, match="argument 'fast_accum' must be a bool"):
        mk.fp8_gemm(a, b, torch.ones(1), torch.ones(1), fast_accum=1)


def test_fp8_linear_modules_carry_fast_accum(promote_flags):
    """MAGI-1's layers default to fast accumulation (what their checkpoints were run with); Fp8Linear defaults to
    promotion and refuses fast_accum with block scales."""
    assert PerTensorQuantizedFp8Linear(32, 16).fast_accum and PerChannelQuantizedFp8Linear(32, 16).fast_accum
    assert not Fp8Linear(32, 16).fast_accum
    with pytest.raises(MagiArgumentError, match="argument 'fast_accum' must be False with recipe 'block'"):
        Fp8Linear(32, 16, recipe="block", fast_accum=True)
    need("fp8_gemm", "triton")
    lin = torch.nn.Linear(96, 40)
    x = torch.randn(5, 96)
    fast = Fp8Linear.from_linear(lin, "channel", backend="triton", fast_accum=True)(x)
    PerChannelQuantizedFp8Linear(96, 40, backend="triton")(x.bfloat16())
    assert promote_flags == [False, False]
    exact = Fp8Linear.from_linear(lin, "channel", backend="torch")(x)
    torch.testing.assert_close(fast, exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("data", ["zero-mean", "positive"])
def test_fast_accumulation_cost_at_magi1_fc2_k(data):
    """The accumulator model (13 mantissa bits kept, Hopper's ~22-bit register, truncated after every k=32 MMA)
    at K = 16384: one chain vs a promotion every 128. The truncation's bias toward zero builds up over the 512
    steps of the chain, for zero-mean and same-sign operands alike. docs/fp8.md#fast-accumulation quotes these
    numbers."""
    m, n, k = 32, 32, 16384
    if data == "positive":
        a, b = (torch.rand(m, k) + 0.25).to(E4M3).float(), (torch.rand(n, k) + 0.25).to(E4M3).float()
    else:
        a, b = torch.randn(m, k).to(E4M3).float(), torch.randn(n, k).to(E4M3).float()
    ref = a.double() @ b.double().t()
    err = lambda y: ((y - ref).norm() / ref.norm()).item()  # noqa: E731
    chain = err(emulate_limited_accumulation(a, b, promote_every=None))
    promoted = err(emulate_limited_accumulation(a, b, promote_every=128))
    bf16_output = err(ref.to(torch.bfloat16).double())
    print(f"{data}: relative error (Frobenius): fast accumulation {chain:.2e}, promoted every 128 {promoted:.2e}, "
          f"bf16 output rounding {bf16_output:.2e}")
    assert promoted < 3e-4 < bf16_output
    assert chain > 5e-3 and chain > 30 * promoted and chain > 3 * bf16_output
