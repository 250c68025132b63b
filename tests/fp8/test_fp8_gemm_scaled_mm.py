"""fp8_gemm's "scaled_mm" backend (torch._scaled_mm: oneDNN on this CPU, cuBLASLt on GPUs) against float64."""

import pytest
import torch

import magi_kernels as mk
from magi_kernels import registry
from magi_kernels.reference.fp8 import apply_epilogue_ref

E4M3 = torch.float8_e4m3fn


def _operands(m, n, k):
    a = (torch.randn(m, k) * 2).to(E4M3)
    b = torch.randn(n, k).to(E4M3)
    return a, b


def _ref64(a, b, sa, sb, bias=None, act=None, gate=None):
    y = (a.double() * sa.double().reshape(-1, 1)) @ (b.double() * sb.double().reshape(-1, 1)).t()
    return apply_epilogue_ref(y, None if bias is None else bias.double(), act,
                              None if gate is None else gate.double())


@pytest.mark.parametrize("epilogue, with_bias", [(None, False), (None, True), ("gelu", True), ("swiglu", False),
                                                 ("gelu+gate", True)])
@pytest.mark.parametrize("m, n, k", [(1, 32, 48), (37, 96, 160), (64, 48, 128)])
def test_tensorwise_scales_with_every_epilogue(m, n, k, epilogue, with_bias):
    a, b = _operands(m, n, k)
    sa, sb = torch.rand(1) + 0.5, torch.rand(1) * 0.02 + 0.01
    bias = torch.randn(n) * 0.1 if with_bias else None
    n_out = n // 2 if epilogue and "swiglu" in epilogue else n
    gate = torch.randn(m, n_out) if epilogue and "gate" in epilogue else None
    out = mk.fp8_gemm(a, b, sa, sb, bias=bias, epilogue=epilogue, gate=gate, out_dtype=torch.float32,
                      backend="scaled_mm")
    act = epilogue.split("+")[0] if epilogue and epilogue != "gate" else None
    ref = _ref64(a, b, sa, sb, bias, act, gate)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)


def test_rowwise_scales_bf16_out_matches_reference():
    a, b = _operands(29, 64, 96)
    sa, sb = torch.rand(29) + 0.5, torch.rand(64) * 0.02 + 0.01
    out = mk.fp8_gemm(a, b, sa, sb, backend="scaled_mm")
    assert out.dtype == torch.bfloat16
    ref = _ref64(a, b, sa, sb)
    # One bf16 rounding of the fp32 result.
    torch.testing.assert_close(out.double(), ref, rtol=2**-8, atol=1e-3)
    # Mixed per-tensor a with per-column b is expanded to row-wise.
    out2 = mk.fp8_gemm(a, b, sa[:1], sb, backend="scaled_mm")
    torch.testing.assert_close(out2.double(), _ref64(a, b, sa[:1].expand(29), sb), rtol=2**-8, atol=1e-3)


@pytest.mark.parametrize("kwargs, reason", [
    (dict(a_scale=torch.ones(7, 2), b_scale=torch.ones(1, 2)), "not 128-blocks"),
    (dict(a_scale=torch.ones(7), b_scale=torch.ones(40), epilogue="gelu"), "rounds to bf16 before an epilogue"),
    (dict(a_scale=torch.ones(7), b_scale=torch.ones(40), out_dtype=torch.float32), "produces bfloat16 only"),
])
def test_unsupported_layouts_are_declined_with_the_reason(kwargs, reason):
    a, b = _operands(7, 40, 200)
    kw = dict(kwargs)
    with pytest.raises(RuntimeError, match=reason):
        mk.fp8_gemm(a, b, kw.pop("a_scale"), kw.pop("b_scale"), backend="scaled_mm", **kw)


def test_auto_selection_on_cpu_stays_torch():
    from magi_kernels.ops.fp8_gemm import make_args

    a, b = _operands(7, 40, 200)
    args = make_args(a, b, torch.ones(1), torch.ones(1), None, None, None, torch.bfloat16)
    assert registry.select("fp8_gemm", args).backend == "torch"
