"""fp8_quantize: Triton (interpreter) bit-exact vs the torch reference; reference vs hand-written MAGI-1 math."""

import warnings

import pytest
import torch

from magi_kernels.ops.fp8_quantize import fp8_quantize
from magi_kernels.reference.fp8 import AMAX_FLOOR, E4M3_MAX, dequantize_ref
from magi_kernels.utils.checks import MagiArgumentError

from ._util import E4M3, e4m3_exact, need, pow2, same_bits

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# (granularity, M, K, static scale factory or None)
CASES = [
    ("tensor", 37, 300, lambda k: torch.tensor([0.0173])),
    ("channel", 37, 300, lambda k: torch.rand(k) * 0.05 + 1e-3),
    ("channel", 5, 1, lambda k: torch.tensor([0.3])),
    ("row", 37, 300, None),
    ("row", 1, 700, None),
    ("block1x128", 19, 333, None),
    ("block128x128", 130, 260, None),
    ("tensor", 9, 77, None),
]


def _input(m, k, dtype):
    x = torch.randn(m, k) * 3
    x[0] = 0.0  # all-zero row
    if m > 2:
        x[1, 0] = float("inf")
        x[2, min(4, k - 1)] = float("nan")
        x[min(3, m - 1), :] *= 1e4  # overflow for static scales
    if k > 1:
        x[-1, -1] = -0.0
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}-{'static' if c[3] else 'dynamic'}")
def test_triton_bit_exact_vs_torch(case, dtype):
    need("fp8_quantize", "triton")
    gran, m, k, mk_scale = case
    x = _input(m, k, dtype)
    scale = mk_scale(k) if mk_scale else None
    for bf16_round in (None, not (gran == "channel")):
        qt, st = fp8_quantize(x, gran, scale=scale, bf16_round=bf16_round, backend="triton")
        qr, sr = fp8_quantize(x, gran, scale=scale, bf16_round=bf16_round, backend="torch")
        bad = ~same_bits(qt, qr)
        assert not bad.any(), f"{int(bad.sum())} codes differ, first at {bad.nonzero()[0].tolist()}"
        torch.testing.assert_close(st, sr, equal_nan=True, rtol=0, atol=0)


def test_non_contiguous_rows_and_leading_dims():
    need("fp8_quantize", "triton")
    base = torch.randn(2, 7, 200)
    x = base[:, :, :150]  # row stride 200, last dim contiguous
    qt, st = fp8_quantize(x, "block1x128", backend="triton")
    qr, sr = fp8_quantize(x.contiguous(), "block1x128", backend="torch")
    assert qt.shape == x.shape and st.shape == (14, 2)
    assert same_bits(qt, qr).all()
    torch.testing.assert_close(st, sr, rtol=0, atol=0)


def test_magi1_channel_order_exact():
    """MAGI-1: fp8(bf16(clamp(x.float() / input_scale, -448, 448))) — written out here independently."""
    k = 512
    x = (torch.randn(64, k) * 4).bfloat16()
    s = torch.rand(k) * 0.02 + 1e-3
    want = (x.float() / s).clamp(-448, 448).to(torch.bfloat16).to(E4M3)
    for backend in ("torch", "triton"):
        if backend == "triton":
            need("fp8_quantize", "triton")
        q, sout = fp8_quantize(x, "channel", scale=s.view(1, k), backend=backend)
        assert same_bits(q, want).all()
        assert torch.equal(sout, s)
    # The double rounding matters: single rounding gives different codes for some inputs.
    single = (x.float() / s).clamp(-448, 448).to(E4M3)
    assert (~same_bits(single, want)).any()


def test_exact_roundtrip_on_representable_inputs():
    """x = e4m3 value * power-of-two scale quantizes exactly: dequant(q) == x in float64."""
    m, k = 33, 257
    v = e4m3_exact(m, k)
    s = pow2(k)  # per-channel power-of-two divisors: x / s is exactly v
    x = v * s
    for backend in ("torch", "triton"):
        if backend == "triton":
            need("fp8_quantize", "triton")
        q, _ = fp8_quantize(x, "channel", scale=s, backend=backend)
        assert torch.equal(q.float(), v)
        assert torch.equal(q.double() * s.double(), x.double())
        q, _ = fp8_quantize(v, "tensor", scale=torch.tensor([1.0]), backend=backend)
        assert torch.equal(q.float(), v)


@pytest.mark.parametrize("gran", ["row", "block1x128", "tensor"])
def test_dynamic_error_bound_and_zero_rows(gran):
    """Relative error of dynamic quantization <= half an e4m3 ulp (2^-4) of the group's amax; zero rows exact."""
    need("fp8_quantize", "triton")
    x = torch.randn(40, 300).double()
    x[5] = 0.0
    for backend in ("torch", "triton"):
        q, s = fp8_quantize(x.float(), gran, backend=backend)
        assert torch.isfinite(s).all()
        dq = dequantize_ref(q, s, gran, torch.float64)
        assert torch.all(dq[5] == 0)
        err = (dq - x.float().double()).abs().max() / x.abs().max()
        assert err <= 2.0 ** -4
    if gran == "row":
        assert s[5].item() == pytest.approx(AMAX_FLOOR / E4M3_MAX)


def test_nan_inf_overflow_rules():
    x = torch.tensor([[1000.0, -1000.0, float("inf"), float("-inf"), float("nan"), 1.0]])
    for backend in ("torch", "triton"):
        if backend == "triton":
            need("fp8_quantize", "triton")
        q, _ = fp8_quantize(x, "tensor", scale=torch.tensor([1.0]), backend=backend)
        got = q.float()[0]
        assert got[:4].tolist() == [448.0, -448.0, 448.0, -448.0]  # saturate, e4m3fn has no inf
        assert got[4].isnan() and got[5] == 1.0
        # Dynamic: a row holding inf or NaN gets a NaN scale (so it dequantizes to NaN, never silently wrong).
        q, s = fp8_quantize(x, "row", backend=backend)
        assert s.isnan().all()
        q, s = fp8_quantize(torch.tensor([[1.0, float("inf")], [2.0, 4.0]]), "row", backend=backend)
        assert s[0].isnan() and s[1].item() == (torch.tensor(4.0) / 448).item()


@pytest.mark.parametrize("bad", [
    (lambda: fp8_quantize(torch.zeros(4, 8, dtype=torch.int32), "row"), "'x'", "dtype"),
    (lambda: fp8_quantize(torch.zeros(4, 8), "channel"), "'scale'", "required"),
    (lambda: fp8_quantize(torch.zeros(4, 8), "channel", scale=torch.ones(7)), "'scale'", "8 value"),
    (lambda: fp8_quantize(torch.zeros(4, 8), "row", scale=torch.ones(1)), "'scale'", "must be None"),
    (lambda: fp8_quantize(torch.zeros(8, 4).t(), "row"), "'x'", "contiguous last dim"),
    (lambda: fp8_quantize(torch.zeros(2, 4, 8), "block128x128"), "'x'", "2-D"),
    (lambda: fp8_quantize(torch.zeros(4, 8), "per_token"), "'granularity'", "one of"),
])
def test_bad_inputs_name_argument_and_rule(bad):
    fn, arg, rule = bad
    with pytest.raises(MagiArgumentError) as e:
        fn()
    assert arg in str(e.value) and rule in str(e.value)
