"""Which backends the op tests run, and tolerances per output dtype."""

import pytest
import torch

from magi_kernels import registry

ALL_BACKENDS = ("torch", "triton", "cuda")

# One ulp of relative error allowed beyond the float64 reference rounded to the output dtype:
# the Triton interpreter rounds fp32->bf16 stores by truncation-like rules (docs/testing.md#triton-interpreter).
ULP = {torch.float32: 2e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def backend_param(op: str, backend: str, args):
    """Skip (with the reason) when this machine truly cannot run the backend on CPU tensors.
    ``args``: the op's validated argument dataclass (its ``make_args(...)``)."""
    reason = registry.why_not(op, backend, args)
    if reason is not None:
        pytest.skip(f"{backend} cannot run here: {reason}")


def assert_matches_ref(out: torch.Tensor, ref64: torch.Tensor, atol: float = 1e-5) -> None:
    """out (any dtype) vs a float64 reference: <= 1 ulp of out's dtype + atol, and no NaN."""
    assert not torch.isnan(out).any(), "kernel left NaN (unwritten poison or bad math)"
    rounded = ref64.to(out.dtype).double()
    err = (out.double() - ref64).abs()
    bound = (rounded - ref64).abs() + ULP[out.dtype] * ref64.abs() + atol
    bad = err > bound
    assert not bad.any(), (
        f"{int(bad.sum())}/{out.numel()} elements off; max err {err.max().item():.3e}, "
        f"worst at {tuple(int(i) for i in torch.nonzero(bad)[0])}")
