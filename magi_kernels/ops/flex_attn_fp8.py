"""flex_attn_fp8: flex attention's forward with 8-bit tensor-core operands (inference only).

    out, lse = flex_attn_fp8_func(q, k, v, q_ranges, k_ranges, attn_type_map, pv_precision="e4m3")

Same arguments, mask semantics and outputs as ``flex_attn_func`` (magi_kernels/ops/flex_attn.py): out in q's
dtype, lse fp32 natural log in the same convention, so ``merge_attn_states`` combines fp8 and bf16 pieces.
Quantization (int8 Q per token and smoothed K per key; P per row and V per channel in e4m3, or in fp16 with
``pv_precision="fp16"``) is defined, rounding step by rounding step, in magi_kernels/reference/flex_attn_fp8.py;
docs/fp8_attention.md describes accuracy and cost of both settings.

Backends (registry op ``flex_attn_fp8``): ``triton`` (magi_kernels/kernels/triton/flex_attn_fp8.py; fp8
tensor cores, sm_89+) and ``torch`` (the reference emulation: slow, exact in the kernel's rounding, for CPU
runs and tests). No backward: inputs that require grad under grad mode are rejected.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from magi_kernels import registry
from magi_kernels.ops._spec import define_op, values
from magi_kernels.ops.flex_attn import (FlexAttnArgs, FlexAttnCall, build_args, check_qkv, check_scalars,
                                        resolve_mask)
from magi_kernels.ranges.validate import check_ranges_meta
from magi_kernels.reference.flex_attn_fp8 import PV_PRECISIONS, flex_attn_fp8_ref
from magi_kernels.utils.checks import fail

OP = "flex_attn_fp8"
# The torch path emulates the Triton kernel's tiles of the arch it would run on; on CPU, sm_90's.
TORCH_TILE = (128, 128)


@dataclasses.dataclass
class FlexAttnFp8Call:
    """The op's arguments, declared once (schema and fake derive from these)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_ranges: torch.Tensor
    k_ranges: torch.Tensor
    attn_type_map: Optional[torch.Tensor]
    softmax_scale: Optional[float]
    softcap: float
    pv_precision: str = "e4m3"
    backend: Optional[str] = None


def check(c: FlexAttnFp8Call) -> None:
    """Metadata rules (no device sync). Range values are checked in ``build_args``."""
    check_qkv(c.q, c.k, c.v, OP)
    check_scalars(c.softmax_scale, c.softcap, OP)
    if c.softmax_scale is not None and c.softmax_scale <= 0:
        # the kernels take row maxima of the unscaled dot products, which needs a positive scale
        fail(OP, "softmax_scale", f"must be > 0 for fp8 attention, got {c.softmax_scale!r}")
    if c.pv_precision not in PV_PRECISIONS:
        fail(OP, "pv_precision", f"must be one of {PV_PRECISIONS}, got {c.pv_precision!r}")
    check_ranges_meta(OP, c.q_ranges, c.k_ranges, c.attn_type_map, c.q.device)
    if torch.is_grad_enabled():
        for name, t in (("q", c.q), ("k", c.k), ("v", c.v)):
            if t.requires_grad:
                fail(OP, name, "requires grad, but fp8 attention is forward only (inference); use flex_attn_func "
                               "to train, or run under torch.no_grad()")


def make_args(c: FlexAttnFp8Call) -> FlexAttnArgs:
    """Checked kernel arguments (flex_attn's: the same ranges, scale and plan cache)."""
    check(c)
    return _args(c)


def _args(c: FlexAttnFp8Call) -> FlexAttnArgs:
    return build_args(FlexAttnCall(c.q, c.k, c.v, c.q_ranges, c.k_ranges, c.attn_type_map, c.softmax_scale,
                                   c.softcap, False))


registry.register_op(OP, preference=("triton", "torch"))


@registry.register_impl(OP, "torch")
def _torch_fwd(a: FlexAttnArgs, out: torch.Tensor, lse: torch.Tensor, pv_precision: str) -> None:
    o, l_ = flex_attn_fp8_ref(a.q, a.k, a.v, a.qr, a.kr, a.types, softmax_scale=a.softmax_scale, softcap=a.softcap,
                              block_m=TORCH_TILE[0], block_n=TORCH_TILE[1], pv_precision=pv_precision)
    out.copy_(o)
    lse.copy_(l_)


registry.register_module_impl(OP, "triton", "magi_kernels.kernels.triton.flex_attn_fp8", launch="launch_fwd")


def _outputs(c: FlexAttnFp8Call) -> tuple[torch.Tensor, torch.Tensor]:
    return c.q.new_empty(c.q.shape), c.q.new_empty(c.q.shape[:2], dtype=torch.float32)


def _run(c: FlexAttnFp8Call) -> tuple[torch.Tensor, torch.Tensor]:
    a = _args(c)
    out, lse = _outputs(c)
    registry.select(OP, a, c.backend).fn(a, out, lse, c.pv_precision)
    return out, lse


_flex_attn_fp8_op = define_op(OP, FlexAttnFp8Call, returns=tuple[torch.Tensor, torch.Tensor], impl=_run,
                              fake=_outputs)


def flex_attn_fp8_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_ranges,
                       k_ranges: Optional[torch.Tensor] = None, attn_type_map: Optional[torch.Tensor] = None, *,
                       softmax_scale: Optional[float] = None, softcap: float = 0.0, pv_precision: str = "e4m3",
                       backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit attention over the union of slices; arguments and outputs as ``flex_attn_func`` (no
    ``deterministic``: there is no backward). q/k/v: fp16/bf16 (fp32 accepted; it is quantized the same way).

    pv_precision: "e4m3" (default) rounds P and V to e4m3 (8-bit PV MMA); "fp16" keeps them 16-bit (fp16 PV
    MMA, QK still int8): more accurate, more issued instructions (docs/fp8_attention.md)."""
    q_ranges, k_ranges, attn_type_map = resolve_mask(OP, q, k, q_ranges, k_ranges, attn_type_map)
    c = FlexAttnFp8Call(q, k, v, q_ranges, k_ranges, attn_type_map, softmax_scale, softcap, pv_precision, backend)
    check(c)
    c.softmax_scale = None if softmax_scale is None else float(softmax_scale)
    c.softcap = float(softcap)
    return _flex_attn_fp8_op(*values(c))
