"""fp8_linear: quantize a float activation to e4m3 and multiply by an e4m3 weight, differentiable in x.

    y = fp8_gemm(q, weight, s_dq, weight_scale, bias)     with (q, s) = fp8_quantize(x, x_granularity, x_scale)
                                                          and s_dq = x_dequant_scale if given, else s

This is the differentiable unit of an fp8 linear layer. Autograd cannot differentiate ``fp8_gemm`` with
respect to its e4m3 operand (torch casts a gradient to its input's dtype: the gradient itself would be
rounded to e4m3), so the gradient is taken with respect to the float input ``x`` instead, straight through
the activation rounding (the rounding's derivative is taken as 1):

    dx = (dy @ dequant(weight)) * (s_dq / s)    in fp32, cast to x's dtype; dbias = sum of dy over tokens

``dequant(weight)`` is exact in fp32 (an e4m3 value has 4 significant bits, times an fp32 scale), and the
product accumulates in fp32, so dx matches float64 math on the same dequantized weight to fp32 rounding.
``s_dq / s`` is 1 unless a static divisor and a separate dequantization scale are given (MAGI-1's
checkpoints do that). Weights are frozen: no gradient reaches ``weight`` or ``weight_scale``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from magi_kernels.ops.fp8_gemm import classify_b_scale, fp8_gemm
from magi_kernels.ops._spec import define_op, register_backward, values
from magi_kernels.ops.fp8_quantize import fp8_quantize
from magi_kernels.reference.fp8 import B_MODE_TO_GRANULARITY, E4M3, dequantize_ref
from magi_kernels.utils.checks import FLOAT_DTYPES, check_dtype_arg, check_tensor, fail

OP = "fp8_linear"


@dataclasses.dataclass
class Fp8LinearCall:
    """The op's arguments, declared once (the custom op's schema, fake and autograd derive from these)."""

    x: torch.Tensor
    weight: torch.Tensor
    weight_scale: torch.Tensor
    bias: Optional[torch.Tensor]
    x_granularity: str
    x_scale: Optional[torch.Tensor]
    x_dequant_scale: Optional[torch.Tensor]
    bf16_round: Optional[bool]
    out_dtype: Optional[torch.dtype] = None
    backend: Optional[str] = None
    fast_accum: bool = False


def check(c: Fp8LinearCall) -> None:
    """Rules that name this op's arguments; the quantize and GEMM ops check the rest when they run."""
    check_tensor(OP, "x", c.x, dtypes=FLOAT_DTYPES)
    check_tensor(OP, "weight", c.weight, dtypes=(E4M3,), ndim=2)
    if c.x.dim() < 1 or c.x.shape[-1] != c.weight.shape[1]:
        fail(OP, "x", f"must have in_features={c.weight.shape[1]} (the weight's [out, in] second dim) as its last "
                      f"dim, got shape {list(c.x.shape)}")
    check_dtype_arg(OP, "out_dtype", c.out_dtype)
    if c.x_dequant_scale is not None:
        check_tensor(OP, "x_dequant_scale", c.x_dequant_scale, dtypes=(torch.float32,))
        if c.x_scale is None:
            fail(OP, "x_dequant_scale", "needs a static x_scale (it replaces the quantization scale when dequantizing)")
        if c.x_dequant_scale.numel() != 1:
            fail(OP, "x_dequant_scale", f"must hold 1 value, got shape {list(c.x_dequant_scale.shape)}")


def _out_dtype(c: Fp8LinearCall) -> torch.dtype:
    return c.out_dtype or c.x.dtype


def _output(c: Fp8LinearCall) -> torch.Tensor:
    return c.x.new_empty(*c.x.shape[:-1], c.weight.shape[0], dtype=_out_dtype(c))


def _run(c: Fp8LinearCall) -> torch.Tensor:
    x = c.x if c.x.stride(-1) == 1 else c.x.contiguous()
    xq, xs = fp8_quantize(x, c.x_granularity, scale=c.x_scale, bf16_round=c.bf16_round, backend=c.backend)
    if c.x_dequant_scale is not None:
        xs = c.x_dequant_scale
    return fp8_gemm(xq, c.weight, xs, c.weight_scale, bias=c.bias, out_dtype=_out_dtype(c),
                    backend=c.backend, fast_accum=c.fast_accum)


_op = define_op(OP, Fp8LinearCall, returns=torch.Tensor, impl=_run, fake=_output)


def dequantized_weight(weight: torch.Tensor, weight_scale: torch.Tensor,
                       compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[out, in] weight in ``compute_dtype``: e4m3 values times their (tensor / channel / 128x128) scales."""
    n, k = weight.shape
    mode = classify_b_scale(weight_scale, n, k)
    scale = weight_scale.reshape(-1) if mode != "block" else weight_scale
    return dequantize_ref(weight, scale.float(), B_MODE_TO_GRANULARITY[mode], compute_dtype)


def _backward(c: Fp8LinearCall, _outs, grad) -> dict:
    if c.weight_scale.requires_grad or (c.x_scale is not None and c.x_scale.requires_grad):
        fail(OP, "weight_scale", "is frozen: fp8_linear differentiates only x and bias")
    g = grad.to(torch.float32)
    dx = g @ dequantized_weight(c.weight, c.weight_scale)
    if c.x_dequant_scale is not None:
        # Dequantized with s_dq but quantized with the per-channel divisor s: d(x/s*s_dq)/dx = s_dq/s.
        dx = dx * (c.x_dequant_scale.float().reshape(()) / c.x_scale.float().reshape(-1))
    dbias = None
    if c.bias is not None and c.bias.requires_grad:
        dbias = g.reshape(-1, g.shape[-1]).sum(0).to(c.bias.dtype)
    return {"x": dx.to(c.x.dtype), "bias": dbias}


register_backward(_op, Fp8LinearCall, _backward)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
               *, x_granularity: str = "row", x_scale: torch.Tensor | None = None,
               x_dequant_scale: torch.Tensor | None = None, bf16_round: bool | None = None,
               out_dtype: torch.dtype | None = None, backend: str | None = None,
               fast_accum: bool = False) -> torch.Tensor:
    """``x @ dequant(weight).T + bias`` with x quantized to e4m3 on the way; differentiable in x and bias.

    Args:
        x: [..., in] fp32/fp16/bf16. weight: [out, in] e4m3. weight_scale: fp8_gemm's ``b_scale`` layouts.
        bias: [out] or None. x_granularity: fp8_quantize's granularity for x ("row", "block1x128",
            "tensor", or "channel" with ``x_scale``). x_scale: static scale / divisor for x.
        x_dequant_scale: (1,) scale used instead of x's quantization scale when dequantizing (MAGI-1).
        bf16_round: see fp8_quantize. out_dtype: default x's dtype. backend: forwarded to both ops.
        fast_accum: fp8_gemm's unpromoted tensor-core accumulation (not with block scales). The backward is
            exact fp32 math either way.
    """
    c = Fp8LinearCall(x, weight, weight_scale, bias, x_granularity, x_scale, x_dequant_scale, bf16_round, out_dtype,
                      backend, fast_accum)
    check(c)
    return _op(*values(c))
