"""fp8_quantize, backend "cuda": the CUDA kernel source (csrc/kernels/fp8_quantize.cuh) run on CPU tensors by the
SIMT emulator, bit-exact (codes and scales) against the torch reference for every granularity.

Outputs are poisoned before each launch, so an element or scale the kernel never writes shows up as a mismatch.
"""

import pytest
import torch

from magi_kernels.ops.fp8_quantize import fp8_quantize, make_args, scale_shape
from magi_kernels.reference.fp8 import AMAX_FLOOR, E4M3_MAX, quantize_ref

from ._util import E4M3, need, same_bits

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

Q_POISON = 0x5A        # a finite e4m3 code (20.0), so a skipped element is a mismatch, not a NaN "match"
S_POISON = -123.0      # never a valid scale
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _need_cuda_backend():
    need("fp8_quantize", "cuda")


def _kern():
    from magi_kernels.kernels.cuda import fp8_quantize

    return fp8_quantize


def run_cuda(x, gran, scale=None, bf16_round=None):
    """The cuda backend's launch on poisoned outputs (the op itself would hand it torch.empty)."""
    a = make_args(x, gran, scale, bf16_round)
    m, k = a.x.shape
    q = torch.full((m, k), Q_POISON, dtype=torch.uint8).view(E4M3)
    s = torch.full(scale_shape(gran, m, k), S_POISON)
    _kern().launch(a, q, s)
    return q, s, a


def assert_matches_ref(x, gran, scale=None, bf16_round=None):
    q, s, a = run_cuda(x, gran, scale, bf16_round)
    qr, sr = quantize_ref(a.x, gran, a.scale, a.bf16_round)
    bad = ~same_bits(q, qr)
    assert not bad.any(), (f"{gran} {x.dtype} {list(x.shape)} bf16_round={a.bf16_round}: {int(bad.sum())} codes "
                           f"differ, first at {bad.nonzero()[0].tolist()}")
    sr = sr.reshape(s.shape)
    same_scale = (s.view(torch.int32) == sr.view(torch.int32)) | (s.isnan() & sr.isnan())
    assert same_scale.all(), f"{gran} {x.dtype} {list(x.shape)}: scales differ at {(~same_scale).nonzero()[:4].tolist()}"
    return q, s


def special_input(m, k, dtype, seed):
    """Random rows with an all-zero row, inf/-inf/NaN, huge values (overflow), -0 and tiny (subnormal) values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 3
    x[0] = 0.0
    if m > 3:
        x[1, 0] = float("inf")
        x[2, min(4, k - 1)] = float("nan")
        x[3, :] *= 1e4
    if m > 5:
        x[4, -1] = float("-inf")
        x[5, :] *= 1e-4  # lands in e4m3's subnormal range for static scales
    if m > 6 and k > 1:
        x[6, ::2] = -0.0
    return x.to(dtype)


STATIC_SCALES = {"tensor": lambda k: torch.tensor([0.0173]), "channel": lambda k: torch.rand(k) * 0.05 + 1e-3}
SHAPES = [(1, 1), (1, 300), (2, 77), (5, 128), (31, 129), (67, 300)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gran", ["tensor", "channel", "row", "block1x128"])
def test_bit_exact_rowwise_granularities(gran, dtype):
    for i, (m, k) in enumerate(SHAPES):
        x = special_input(m, k, dtype, seed=i)
        scale = STATIC_SCALES[gran](k) if gran in STATIC_SCALES else None
        for bf16_round in (False, True):
            assert_matches_ref(x, gran, scale, bf16_round)
    if gran == "tensor":  # dynamic per-tensor scale (torch amax, then the static kernel)
        assert_matches_ref(special_input(9, 77, dtype, 0), "tensor")
        assert_matches_ref(torch.randn(9, 77).to(dtype), "tensor")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bit_exact_block128x128(dtype):
    for i, (m, k) in enumerate([(1, 1), (67, 300), (130, 260), (259, 129)]):
        x = special_input(m, k, dtype, seed=i)
        if m > 128:
            x[128:, :128] = 0.0  # an all-zero tile (the NaN/inf sit in tile row 0)
        for bf16_round in (False, True):
            q, s = assert_matches_ref(x, "block128x128", None, bf16_round)
        if m > 128:
            assert s[1, 0].item() == (torch.tensor(AMAX_FLOOR) / E4M3_MAX).item()
            assert (q[128:, :128].view(torch.uint8) == 0).all()


def test_zero_rows_and_nonfinite_rows_get_the_reference_scales():
    x = torch.randn(4, 200)
    x[0] = 0.0
    x[1, 7] = float("nan")
    x[2, 150] = float("-inf")
    for gran in ("row", "block1x128"):
        q, s = assert_matches_ref(x, gran)
        assert s[0, 0].item() == (torch.tensor(AMAX_FLOOR) / E4M3_MAX).item()
        assert s[1, 0].isnan() and s[2, -1].isnan() and torch.isfinite(s[3]).all()
        assert (q[0].view(torch.uint8) == 0).all()


def test_encoder_matches_torch_on_every_rounding_case():
    """The kernels' integer e4m3 encoder vs torch's cast: all codes, all midpoints (ties), +-1 ulp around them,
    fp32 denormals, signed zeros, NaN, and random values across every binade in [2^-12, 448]."""
    C = pytest.importorskip("magi_kernels._C")
    codes = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
    vals = codes[~codes.isnan()].unique()
    mids = (vals[1:] + vals[:-1]) / 2
    around = torch.cat([mids, vals])
    ulp = around.view(torch.int32)
    near = torch.cat([around, (ulp + 1).view(torch.float32), (ulp - 1).view(torch.float32)])
    g = torch.Generator().manual_seed(0)
    rand = torch.exp2(torch.rand(100_000, generator=g) * 20.8 - 12) * torch.where(torch.rand(100_000, generator=g) < .5, -1, 1)
    extra = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-40, 2.0 ** -10, -(2.0 ** -10), 2.0 ** -10 * 1.0000001, 448.0,
                          -448.0, float("nan"), -float("nan")])
    y = torch.cat([near, -near, rand, extra]).clamp(-E4M3_MAX, E4M3_MAX)
    got = torch.tensor(C.simt.e4m3_encode(y.tolist()), dtype=torch.uint8)
    want = y.to(E4M3).view(torch.uint8)
    nan = y.isnan()
    assert torch.equal(got[~nan], want[~nan])
    assert ((got[nan] & 0x7F) == 0x7F).all()


def test_ties_and_double_rounding_through_the_kernel():
    """Exact e4m3 midpoints with scale 1 (ties to even), and MAGI-1's bf16-then-e4m3 order differing from a
    single rounding: 17.0001 -> bf16 17.0 -> e4m3 16 (tie to even) vs 18 directly."""
    codes = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
    vals = codes[~codes.isnan()].unique()
    mids = (vals[1:] + vals[:-1]) / 2
    x = torch.cat([mids, vals, torch.tensor([17.0001, -17.0001, 460.0, 1e30])]).reshape(1, -1)
    assert_matches_ref(x, "tensor", torch.tensor([1.0]), False)
    q1, _ = assert_matches_ref(x, "channel", torch.ones(x.shape[1]), True)
    q0, _ = assert_matches_ref(x, "channel", torch.ones(x.shape[1]), False)
    i = mids.numel() + vals.numel()
    assert q1[0, i].float().item() == 16.0 and q0[0, i].float().item() == 18.0


def test_strided_rows_leading_dims_and_the_public_op():
    base = torch.randn(2, 7, 200)
    x = base[:, :, :150]  # row stride 200
    for gran in ("row", "block1x128", "tensor"):
        q, s = fp8_quantize(x, gran, backend="cuda")
        qr, sr = fp8_quantize(x.contiguous(), gran, backend="torch")
        assert q.shape == x.shape and s.shape == sr.shape
        assert same_bits(q, qr).all()
        torch.testing.assert_close(s, sr, rtol=0, atol=0)
    s_in = torch.rand(1, 150) + 0.01
    q, s = fp8_quantize(x.bfloat16(), "channel", scale=s_in, backend="cuda")
    qr, _ = fp8_quantize(x.bfloat16(), "channel", scale=s_in, backend="torch")
    assert same_bits(q, qr).all() and torch.equal(s, s_in.reshape(150))


def test_empty_rows():
    for gran in ("row", "block1x128", "block128x128"):
        q, s = fp8_quantize(torch.zeros(0, 64), gran, backend="cuda")
        assert q.shape == (0, 64) and s.numel() == 0


def test_bad_outputs_and_params_are_named():
    x = torch.randn(4, 64)
    a = make_args(x, "row", None, None)
    with pytest.raises(ValueError, match="'q'"):
        _kern().launch(a, torch.empty(4, 64), torch.empty(4, 1))
    with pytest.raises(ValueError, match="'scale_out'"):
        _kern().launch(a, torch.empty(4, 64, dtype=E4M3), torch.empty(4, 1, dtype=torch.float64))
    C = pytest.importorskip("magi_kernels._C")
    p = _kern().make_params(a, torch.empty(4, 64, dtype=E4M3), torch.empty(4, 1), None)
    assert p.check() == ""
    p.mode = 9
    assert "Fp8QuantParams.mode" in p.check()
    with pytest.raises(ValueError, match="Fp8QuantParams.mode"):
        C.simt.fp8_quant(p)
    p.mode, p.in_dtype = 2, 5
    with pytest.raises(ValueError, match="in_dtype"):
        C.simt.fp8_quant(p)
    p.in_dtype, p.mode = 0, 0  # static mode without scale_in
    with pytest.raises(ValueError, match="scale_in"):
        C.simt.fp8_quant(p)
