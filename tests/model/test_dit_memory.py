"""The DiT's activation memory: SwiGLU in bounded fp32 row blocks, intermediates dropped early.

The whole-forward numbers are checked against the planner's live-tensor model in test_plan.py; here
the blocked SwiGLU is checked against a float64 reference and against the one-shot fp32 formula it
replaces (bitwise: blocking an elementwise op must change no value)."""

import pytest
import torch
import torch.nn.functional as F

from magi_model import dit


@pytest.mark.parametrize("rows,f,block_rows", [(1, 8, 1), (37, 24, 5), (64, 40, 64), (13, 16, 100)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_silu_and_mul_blocks_equal_the_one_shot_fp32_formula(monkeypatch, rows, f, block_rows, dtype):
    monkeypatch.setattr(dit, "SWIGLU_BLOCK_BYTES", block_rows * 4 * f)
    g = torch.Generator().manual_seed(rows * 1000 + f)
    h = (torch.randn(2, rows, 2 * f, generator=g) * 4).to(dtype)
    out = dit.silu_and_mul(h, dtype)
    assert out.shape == (2, rows, f) and out.dtype == dtype and out.is_contiguous()
    a, b = h.chunk(2, dim=-1)
    assert torch.equal(out, (F.silu(a.float()) * b.float()).to(dtype))
    ref = F.silu(a.double()) * b.double()  # independent float64 reference
    tol = {torch.bfloat16: 2 ** -8, torch.float32: 1e-6}[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol * 1e-3, rtol=tol)


def test_silu_and_mul_backward_matches_float64(monkeypatch):
    monkeypatch.setattr(dit, "SWIGLU_BLOCK_BYTES", 3 * 4 * 6)  # 3 rows per block, 10 rows
    h = torch.randn(10, 12, dtype=torch.float64)
    hf = h.float().requires_grad_()
    dit.silu_and_mul(hf, torch.float32).pow(2).sum().backward()
    hd = h.clone().requires_grad_()
    a, b = hd.chunk(2, dim=-1)
    (F.silu(a) * b).pow(2).sum().backward()
    torch.testing.assert_close(hf.grad.double(), hd.grad, atol=1e-5, rtol=1e-5)
