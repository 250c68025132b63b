"""Helpers for the fp8 tests: e4m3-exact random inputs and backend skipping."""

import warnings

import pytest
import torch

from magi_kernels import registry

E4M3 = torch.float8_e4m3fn


def e4m3_exact(*shape, lo=-6, hi=3):
    """Random e4m3-representable values: sign * (1 + m/8) * 2^e with e in [lo, hi] (some zeros too)."""
    mant = 1 + torch.randint(0, 8, shape) / 8
    exp = torch.randint(lo, hi + 1, shape).float()
    sign = torch.where(torch.rand(shape) < 0.5, -1.0, 1.0)
    x = sign * mant * torch.exp2(exp)
    x[torch.rand(shape) < 0.05] = 0.0
    assert torch.equal(x.to(E4M3).float(), x)
    return x


def pow2(*shape, lo=-4, hi=4):
    """Random powers of two (exact scale products)."""
    return torch.exp2(torch.randint(lo, hi + 1, shape).float())


def need(op: str, backend: str, device=torch.device("cpu")):
    # Only the backend's device rules: every fp8 test shape is one the kernels take.
    reason = registry.device_reason(backend, device)
    if reason is not None:
        pytest.skip(f"{backend} cannot run here: {reason}")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise: identical e4m3 codes, or both NaN."""
    return (a.view(torch.uint8) == b.view(torch.uint8)) | (a.float().isnan() & b.float().isnan())


def quiet_numpy():
    # The interpreter evaluates both sides of tl.where in numpy: NaN->int casts and overflow warn harmlessly.
    return warnings.catch_warnings()
