"""fp8_quantize: float -> e4m3fn with a static or dynamic fp32 scale (semantics: magi_kernels.reference.fp8).

    q, scale = fp8_quantize(x, "channel", scale=input_scale)     # MAGI-1: divide by a per-channel vector,
                                                                  # clamp +-448, round to bf16, then e4m3
    q, scale = fp8_quantize(x, "row")                             # dynamic per-token amax
    q, scale = fp8_quantize(w, "block128x128")                    # dynamic weight blocks

x: [..., K] (float32 / float16 / bfloat16, last dim contiguous); q has x's shape; scale shapes (leading dims of
x flattened to M): "tensor" (1,), "channel" (K,), "row" (M, 1), "block1x128" (M, ceil(K/128)),
"block128x128" (ceil(M/128), ceil(K/128)) with x 2-D. Static scales ("tensor", "channel") are returned as
given (fp32); they must be positive (not checked: it would need a device sync).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from magi_kernels import registry
from magi_kernels.ops._common import dispatch
from magi_kernels.ops._spec import define_op, values
from magi_kernels.reference.fp8 import BLOCK, E4M3, GRANULARITIES, cdiv, quantize_ref
from magi_kernels.utils.checks import FLOAT_DTYPES, check_choice, check_tensor, fail, rows_view

OP = "fp8_quantize"
STATIC = ("tensor", "channel")


@dataclasses.dataclass
class Fp8QuantizeCall:
    """The op's arguments, declared once (the custom op's schema and fake derive from these).
    bf16_round None: True for "channel" (MAGI-1), else False."""

    x: torch.Tensor
    granularity: str
    scale: Optional[torch.Tensor]
    bf16_round: Optional[bool]
    backend: Optional[str] = None


@dataclasses.dataclass
class Fp8QuantizeArgs:
    """x: [M, K] view, stride(-1) == 1 (any row stride). scale: fp32 contiguous (1,) / (K,) or None (dynamic)."""

    x: torch.Tensor
    granularity: str
    scale: Optional[torch.Tensor]
    bf16_round: bool

    @property
    def device(self) -> torch.device:
        return self.x.device


def scale_shape(granularity: str, m: int, k: int) -> tuple[int, ...]:
    return {"tensor": (1,), "channel": (k,), "row": (m, 1), "block1x128": (m, cdiv(k, BLOCK)),
            "block128x128": (cdiv(m, BLOCK), cdiv(k, BLOCK))}[granularity]


def check(c: Fp8QuantizeCall) -> None:
    """Every rule on the arguments (metadata only; static scales' positivity is not checked: it would sync)."""
    x, granularity, scale = c.x, c.granularity, c.scale
    check_tensor(OP, "x", x, dtypes=FLOAT_DTYPES)
    check_choice(OP, "granularity", granularity, GRANULARITIES)
    if c.bf16_round is not None and not isinstance(c.bf16_round, bool):
        fail(OP, "bf16_round", f"must be a bool or None, got {c.bf16_round!r}")
    if x.dim() < 1 or x.shape[-1] == 0:
        fail(OP, "x", f"must have a non-empty last (channel) dim, got shape {list(x.shape)}")
    if granularity == "block128x128" and x.dim() != 2:
        fail(OP, "x", f"must be 2-D [rows, K] for 128x128 blocks (a weight), got shape {list(x.shape)}")
    if x.stride(-1) != 1:
        fail(OP, "x", f"must have a contiguous last dim (stride 1), got strides {list(x.stride())}")
    k = x.shape[-1]
    rows_view(OP, "x", x)
    if granularity in STATIC:
        if scale is None:
            if granularity == "channel":
                fail(OP, "scale", "is required for granularity 'channel' (a static per-input-channel divisor)")
        else:
            check_tensor(OP, "scale", scale, dtypes=FLOAT_DTYPES)
            want = 1 if granularity == "tensor" else k
            if scale.numel() != want or (granularity == "channel" and scale.shape[-1] != k):
                fail(OP, "scale", f"must hold {want} value(s) for granularity {granularity!r} "
                                  f"(shape (1,) or (K,) / (1, K)), got shape {list(scale.shape)}")
            if scale.device != x.device:
                fail(OP, "scale", f"must be on x's device {x.device}, got {scale.device}")
    elif scale is not None:
        fail(OP, "scale", f"must be None for granularity {granularity!r} (its scale is computed from x)")


def build_args(c: Fp8QuantizeCall) -> Fp8QuantizeArgs:
    scale = c.scale
    if scale is not None:
        scale = scale.reshape(-1).to(torch.float32).contiguous()
    bf16_round = c.granularity == "channel" if c.bf16_round is None else c.bf16_round
    return Fp8QuantizeArgs(x=rows_view(OP, "x", c.x), granularity=c.granularity, scale=scale, bf16_round=bool(bf16_round))


def make_args(*args, **kwargs) -> Fp8QuantizeArgs:
    """Checked kernel arguments from an ``Fp8QuantizeCall`` or its fields (tests, direct backend calls)."""
    c = args[0] if len(args) == 1 and isinstance(args[0], Fp8QuantizeCall) else Fp8QuantizeCall(*args, **kwargs)
    check(c)
    return build_args(c)


# --------------------------------------------------------------------------------------------------
# Backends: each writes q [M, K] (e4m3) and scale_out (fp32, scale_shape).

# Triton stays first on GPUs (the established path); "cuda" is the native fallback and the CPU-emulated twin.
registry.register_op(OP, preference=("triton", "cuda", "torch"))


@registry.register_impl(OP, "torch")
def _torch_impl(a: Fp8QuantizeArgs, q: torch.Tensor, scale_out: torch.Tensor) -> None:
    qr, s = quantize_ref(a.x, a.granularity, a.scale, a.bf16_round)
    q.copy_(qr)
    scale_out.copy_(s.reshape(scale_out.shape))


registry.register_module_impl(OP, "triton", "magi_kernels.kernels.triton.fp8_quantize")
registry.register_module_impl(OP, "cuda", "magi_kernels.kernels.cuda.fp8_quantize")


# --------------------------------------------------------------------------------------------------

def _outputs(c: Fp8QuantizeCall) -> tuple[torch.Tensor, torch.Tensor]:
    k = c.x.shape[-1]
    m = c.x.numel() // k
    return (c.x.new_empty(c.x.shape, dtype=E4M3),
            c.x.new_empty(scale_shape(c.granularity, m, k), dtype=torch.float32))


def _run(c: Fp8QuantizeCall) -> tuple[torch.Tensor, torch.Tensor]:
    args = build_args(c)
    q, scale_out = _outputs(c)
    dispatch(OP, args, c.backend, (q.view(args.x.shape), scale_out))
    return q, scale_out


_op = define_op(OP, Fp8QuantizeCall, returns=tuple[torch.Tensor, torch.Tensor], impl=_run, fake=_outputs)


def fp8_quantize(x: torch.Tensor, granularity: str = "row", *, scale: torch.Tensor | None = None,
                 bf16_round: bool | None = None, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x to float8_e4m3fn. Returns (q with x's shape, fp32 scale); dequantize as q * scale.

    Args:
        x: [..., K] fp32/fp16/bf16 with a contiguous last dim ([rows, K] for "block128x128").
        granularity: "tensor" | "channel" | "row" | "block1x128" | "block128x128" (see module docstring).
        scale: static scale: (1,) for "tensor", (K,) or (1, K) divisor for "channel"; None = dynamic.
        bf16_round: round to bf16 before e4m3 (MAGI-1's double rounding); default True only for "channel".
        backend: "cuda" | "triton" | "torch" | None (auto).
    """
    c = Fp8QuantizeCall(x, granularity, scale, bf16_round, backend)
    check(c)
    return _op(*values(c))
