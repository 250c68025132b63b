"""gated_post_norm_residual: ``residual + norm(x * gate[gate_index])`` in fp32, cast back.

MAGI-1's sandwich post-norm (docs/magi1.md#transformer-layer): the attention / MLP output x is
multiplied by a per-(batch, chunk) gate row, normalized with a "1p" LayerNorm (gamma = w + 1) in fp32,
added to the residual in fp32, and rounded to the residual stream's dtype, in one pass over memory.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch

from magi_kernels import registry
from magi_kernels.ops._common import dispatch, reference_vjp
from magi_kernels.reference.norm_rope import gated_post_norm_residual_ref
from magi_kernels.utils.checks import FLOAT_DTYPES, check_choice, check_same_device, check_tensor, fail

OP = "gated_post_norm_residual"
NORMS = ("layernorm", "rmsnorm")


@dataclasses.dataclass
class GatedPostNormArgs:
    """Kernel-ready arguments. x, residual: [T, H] with stride(-1) == 1 (any row stride); gate: [G, H]
    with stride(-1) == 1; gate_index: int32 contiguous [T] (None: gate row t for token t);
    weight, bias: fp32 contiguous [H] or None. Backends write out [T, H] (contiguous)."""

    x: torch.Tensor
    gate: torch.Tensor
    residual: torch.Tensor
    gate_index: Optional[torch.Tensor]
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    norm: str
    weight_offset: float
    eps: float

    @property
    def tokens(self) -> int:
        return self.x.shape[0]

    @property
    def hidden(self) -> int:
        return self.x.shape[1]


def _rows(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.stride(-1) != 1:
        fail(OP, name, f"must have a contiguous last dim (stride 1), got strides {list(t.stride())}")
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        fail(OP, name, f"must have leading dims that flatten to rows without a copy; got shape {list(t.shape)} strides {list(t.stride())}")


def make_args(x, gate, residual, weight, bias, gate_index, norm, weight_offset, eps) -> GatedPostNormArgs:
    check_tensor(OP, "x", x, dtypes=FLOAT_DTYPES)
    check_tensor(OP, "gate", gate, dtypes=FLOAT_DTYPES)
    check_tensor(OP, "residual", residual, dtypes=FLOAT_DTYPES)
    check_choice(OP, "norm", norm, NORMS)
    check_same_device(OP, "x", x, gate=gate, residual=residual, weight=weight, bias=bias, gate_index=gate_index)
    if x.dim() < 1 or x.shape[-1] == 0:
        fail(OP, "x", f"must have a non-empty hidden dim, got shape {list(x.shape)}")
    if residual.shape != x.shape:
        fail(OP, "residual", f"must have x's shape {list(x.shape)}, got {list(residual.shape)}")
    if not eps > 0:
        fail(OP, "eps", f"must be > 0, got {eps}")
    h = x.shape[-1]
    x2, r2 = _rows("x", x), _rows("residual", residual)
    t = x2.shape[0]
    if gate.dim() != 2 or gate.shape[1] != h:
        fail(OP, "gate", f"must have shape [G, {h}] (one gate row per chunk or token), got {list(gate.shape)}")
    if gate.stride(-1) != 1:
        fail(OP, "gate", f"must have a contiguous last dim, got strides {list(gate.stride())}")
    if gate_index is None:
        if gate.shape[0] != t:
            fail(OP, "gate_index", f"is required when gate has {gate.shape[0]} rows but x has {t} tokens")
    else:
        check_tensor(OP, "gate_index", gate_index, dtypes=(torch.int32, torch.int64))
        if gate_index.numel() != t:
            fail(OP, "gate_index", f"must have one entry per token ({t}), got shape {list(gate_index.shape)}")
        gate_index = gate_index.reshape(-1).to(torch.int32).contiguous()
        # Range check (one host sync on GPUs; skipped under torch.compile). Kernels also guard their
        # loads, so a bad index can never read out of bounds.
        if t and not torch.compiler.is_compiling() and os.environ.get("MAGI_KERNELS_CHECK_INDICES", "1") != "0":
            lo, hi = int(gate_index.min()), int(gate_index.max())
            if lo < 0 or hi >= gate.shape[0]:
                fail(OP, "gate_index", f"must index gate rows in [0, {gate.shape[0]}), got values in [{lo}, {hi}]")

    def param(name, p):
        if p is None:
            return None
        check_tensor(OP, name, p, dtypes=FLOAT_DTYPES)
        if p.dim() != 1 or p.numel() != h:
            fail(OP, name, f"must have shape [{h}], got {list(p.shape)}")
        return p.to(torch.float32).contiguous()

    return GatedPostNormArgs(x=x2, gate=gate, residual=r2, gate_index=gate_index, weight=param("weight", weight),
                             bias=param("bias", bias), norm=norm, weight_offset=float(weight_offset), eps=float(eps))


registry.register_op(OP, preference=("cuda", "triton", "torch"))


@registry.register_impl(OP, "torch")
def _torch_impl(a: GatedPostNormArgs, out: torch.Tensor) -> None:
    out.copy_(gated_post_norm_residual_ref(a.x, a.gate, a.residual, a.weight, a.bias, a.gate_index, norm=a.norm,
                                           weight_offset=a.weight_offset, eps=a.eps, out_dtype=out.dtype))


registry.register_module_impl(OP, "triton", "magi_kernels.kernels.triton.gated_post_norm_residual")
registry.register_module_impl(OP, "cuda", "magi_kernels.kernels.cuda.gated_post_norm_residual")


@torch.library.custom_op("magi_kernels::gated_post_norm_residual", mutates_args=())
def _gpnr_op(x: torch.Tensor, gate: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
             bias: Optional[torch.Tensor], gate_index: Optional[torch.Tensor], norm: str, weight_offset: float,
             eps: float, out_dtype: Optional[torch.dtype], backend: Optional[str]) -> torch.Tensor:
    args = make_args(x, gate, residual, weight, bias, gate_index, norm, weight_offset, eps)
    out = torch.empty(x.shape, dtype=out_dtype or residual.dtype, device=x.device)
    info = registry.CallInfo(x.device, x.dtype, {"hidden": args.hidden, "gate_dtype": gate.dtype,
                                                 "residual_dtype": residual.dtype})
    dispatch(OP, info, backend, args, (out.view(args.x.shape),))
    return out


@_gpnr_op.register_fake
def _(x, gate, residual, weight, bias, gate_index, norm, weight_offset, eps, out_dtype, backend):
    return x.new_empty(x.shape, dtype=out_dtype or residual.dtype)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6])
    ctx.cfg = inputs[6:9]


def _backward(ctx, grad):
    x, gate, residual, weight, bias, gate_index = ctx.saved_tensors
    norm, off, eps = ctx.cfg

    def ref(x, gate, residual, weight, bias):
        return gated_post_norm_residual_ref(x, gate, residual, weight, bias, gate_index, norm=norm, weight_offset=off,
                                            eps=eps, out_dtype=torch.float32)

    grads = reference_vjp(ref, (x, gate, residual, weight, bias), (grad,))
    return (*grads, None, None, None, None, None, None)


_gpnr_op.register_autograd(_backward, setup_context=_setup_context)


def gated_post_norm_residual(x: torch.Tensor, gate: torch.Tensor, residual: torch.Tensor,
                             weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                             gate_index: torch.Tensor | None = None, norm: str = "layernorm",
                             weight_offset: float = 1.0, eps: float = 1e-6, out_dtype: torch.dtype | None = None,
                             backend: str | None = None) -> torch.Tensor:
    """``residual + norm(x * gate[gate_index]) * (weight + weight_offset) + bias``, fp32 inside.

    Args:
        x: [..., H] sublayer output (fp32 or bf16 in MAGI-1). residual: x's shape.
        gate: [G, H] gate rows; gate_index: int [T] picks a row per token (T = x.numel() // H);
            None means one row per token (G == T).
        weight, bias: [H] norm affine; weight_offset: 1.0 for MAGI-1's "1p" LayerNorm.
        norm: "layernorm" or "rmsnorm". out_dtype: default residual.dtype.
        backend: "cuda" | "triton" | "torch" | None (auto).
    """
    make_args(x, gate, residual, weight, bias, gate_index, norm, weight_offset, eps)
    return _gpnr_op(x, gate, residual, weight, bias, gate_index, norm, float(weight_offset), float(eps), out_dtype,
                    backend)
