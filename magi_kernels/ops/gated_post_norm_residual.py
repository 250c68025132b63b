"""gated_post_norm_residual: ``residual + norm(x * gate[gate_index])`` in fp32, cast back.

MAGI-1's sandwich post-norm: the attention / MLP output x is multiplied by a per-(batch, chunk) gate row,
normalized (MAGI-1: a "1p" LayerNorm, gamma = w + 1) in fp32, added to the residual in fp32, and rounded
to the residual stream's dtype, in one pass over memory. The norm kind and weight offset have no
defaults: pass them or ``preset="magi1"``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch

from magi_kernels import registry
from magi_kernels.ops import presets
from magi_kernels.ops._common import dispatch, reference_vjp
from magi_kernels.ops._spec import define_op, register_backward, values
from magi_kernels.reference.gated_post_norm_residual import gated_post_norm_residual_ref
from magi_kernels.utils.checks import (FLOAT_DTYPES, check_choice, check_dtype_arg, check_number, check_same_device,
                                       check_tensor, fail, rows_view)

OP = "gated_post_norm_residual"
NORMS = ("layernorm", "rmsnorm")
# Set to "0" to skip the gate_index range check (one device sync per call); kernels still never read
# out of bounds (a bad index gives a NaN row).
CHECK_INDICES_ENV = "MAGI_KERNELS_CHECK_INDICES"


@dataclasses.dataclass
class GatedPostNormCall:
    """The op's arguments, declared once (the custom op's schema, fake and autograd derive from these)."""

    x: torch.Tensor
    gate: torch.Tensor
    residual: torch.Tensor
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    gate_index: Optional[torch.Tensor]
    norm: str
    weight_offset: float
    eps: float
    out_dtype: Optional[torch.dtype] = None
    backend: Optional[str] = None


@dataclasses.dataclass
class GatedPostNormArgs(GatedPostNormCall):
    """The same arguments, checked and kernel-ready. x, residual: [T, H] with stride(-1) == 1 (any row
    stride); gate: [G, H] with stride(-1) == 1; gate_index: int32 contiguous [T] (None: gate row t for
    token t); weight, bias: fp32 contiguous [H] or None. Backends write out [T, H] (contiguous)."""

    @property
    def tokens(self) -> int:
        return self.x.shape[0]

    @property
    def hidden(self) -> int:
        return self.x.shape[1]

    @property
    def device(self) -> torch.device:
        return self.x.device


def _rows(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.stride(-1) != 1:
        fail(OP, name, f"must have a contiguous last dim (stride 1), got strides {list(t.stride())}")
    return rows_view(OP, name, t)


def check(c: GatedPostNormCall) -> None:
    """Every metadata rule (no device sync; runs while tracing). Index values: ``check_gate_index_values``."""
    x, gate = c.x, c.gate
    check_tensor(OP, "x", x, dtypes=FLOAT_DTYPES)
    check_tensor(OP, "gate", gate, dtypes=FLOAT_DTYPES)
    check_tensor(OP, "residual", c.residual, dtypes=FLOAT_DTYPES)
    check_choice(OP, "norm", c.norm, NORMS)
    check_number(OP, "weight_offset", c.weight_offset)
    check_number(OP, "eps", c.eps, minimum=0, exclusive_min=True)
    check_dtype_arg(OP, "out_dtype", c.out_dtype)
    check_same_device(OP, "x", x, gate=gate, residual=c.residual, weight=c.weight, bias=c.bias,
                      gate_index=c.gate_index)
    if x.dim() < 1 or x.shape[-1] == 0:
        fail(OP, "x", f"must have a non-empty hidden dim, got shape {list(x.shape)}")
    if c.residual.shape != x.shape:
        fail(OP, "residual", f"must have x's shape {list(x.shape)}, got {list(c.residual.shape)}")
    h = x.shape[-1]
    t = _rows("x", x).shape[0]
    _rows("residual", c.residual)
    if gate.dim() != 2 or gate.shape[1] != h:
        fail(OP, "gate", f"must have shape [G, {h}] (one gate row per chunk or token), got {list(gate.shape)}")
    if gate.stride(-1) != 1:
        fail(OP, "gate", f"must have a contiguous last dim, got strides {list(gate.stride())}")
    if c.gate_index is None:
        if gate.shape[0] != t:
            fail(OP, "gate_index", f"is required when gate has {gate.shape[0]} rows but x has {t} tokens")
    else:
        check_tensor(OP, "gate_index", c.gate_index, dtypes=(torch.int32, torch.int64))
        if c.gate_index.numel() != t:
            fail(OP, "gate_index", f"must have one entry per token ({t}), got shape {list(c.gate_index.shape)}")
    for name, p in (("weight", c.weight), ("bias", c.bias)):
        if p is not None:
            check_tensor(OP, name, p, dtypes=FLOAT_DTYPES)
            if p.dim() != 1 or p.numel() != h:
                fail(OP, name, f"must have shape [{h}], got {list(p.shape)}")


def check_gate_index_values(gate_index: torch.Tensor | None, gate_rows: int) -> None:
    """The one value check: indices in [0, G). One host sync, so it runs once per call, inside the op."""
    if gate_index is None or gate_index.numel() == 0 or os.environ.get(CHECK_INDICES_ENV, "1") == "0":
        return
    lo, hi = torch.stack(torch.aminmax(gate_index)).tolist()  # one device-to-host copy
    if lo < 0 or hi >= gate_rows:
        fail(OP, "gate_index", f"must index gate rows in [0, {gate_rows}), got values in [{lo}, {hi}]")


def build_args(c: GatedPostNormCall) -> GatedPostNormArgs:
    """Kernel-ready views and fp32 copies of a checked call."""
    gi = None if c.gate_index is None else c.gate_index.reshape(-1).to(torch.int32).contiguous()

    def f32(p):
        return None if p is None else p.to(torch.float32).contiguous()

    return GatedPostNormArgs(x=_rows("x", c.x), gate=c.gate, residual=_rows("residual", c.residual), gate_index=gi,
                             weight=f32(c.weight), bias=f32(c.bias), norm=c.norm,
                             weight_offset=float(c.weight_offset), eps=float(c.eps), out_dtype=c.out_dtype,
                             backend=c.backend)


def make_args(*args, **kwargs) -> GatedPostNormArgs:
    """Checked kernel arguments from a ``GatedPostNormCall`` or its fields (tests, direct backend calls)."""
    c = args[0] if len(args) == 1 and isinstance(args[0], GatedPostNormCall) else GatedPostNormCall(*args, **kwargs)
    check(c)
    check_gate_index_values(c.gate_index, c.gate.shape[0])
    return build_args(c)


registry.register_op(OP, preference=("cuda", "triton", "torch"))


@registry.register_impl(OP, "torch")
def _torch_impl(a: GatedPostNormArgs, out: torch.Tensor) -> None:
    out.copy_(gated_post_norm_residual_ref(a.x, a.gate, a.residual, a.weight, a.bias, a.gate_index, norm=a.norm,
                                           weight_offset=a.weight_offset, eps=a.eps, out_dtype=out.dtype))


registry.register_module_impl(OP, "triton", "magi_kernels.kernels.triton.gated_post_norm_residual")
registry.register_module_impl(OP, "cuda", "magi_kernels.kernels.cuda.gated_post_norm_residual")


def _output(c: GatedPostNormCall) -> torch.Tensor:
    return c.x.new_empty(c.x.shape, dtype=c.out_dtype or c.residual.dtype)


def _run(c: GatedPostNormCall) -> torch.Tensor:
    check_gate_index_values(c.gate_index, c.gate.shape[0])
    args = build_args(c)
    out = _output(c)
    dispatch(OP, args, c.backend, (out.view(args.x.shape),))
    return out


_op = define_op(OP, GatedPostNormCall, returns=torch.Tensor, impl=_run, fake=_output)


def _backward(c: GatedPostNormCall, _outs, grad) -> dict:
    def ref(x, gate, residual, weight, bias):
        # The reference works on token rows (T, H); a batched (N, S, H) call is its rows, reshaped back.
        rows = x.shape[-1]
        out = gated_post_norm_residual_ref(x.reshape(-1, rows), gate, residual.reshape(-1, rows), weight, bias,
                                           c.gate_index, norm=c.norm, weight_offset=c.weight_offset, eps=c.eps,
                                           out_dtype=torch.float32)
        return out.reshape(x.shape)

    names = ("x", "gate", "residual", "weight", "bias")
    return dict(zip(names, reference_vjp(ref, [getattr(c, n) for n in names], (grad,))))


register_backward(_op, GatedPostNormCall, _backward)


def gated_post_norm_residual(x: torch.Tensor, gate: torch.Tensor, residual: torch.Tensor,
                             weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                             gate_index: torch.Tensor | None = None, preset: str | None = None,
                             norm: str | None = None, weight_offset: float | None = None, eps: float = 1e-6,
                             out_dtype: torch.dtype | None = None, backend: str | None = None) -> torch.Tensor:
    """``residual + norm(x * gate[gate_index]) * (weight + weight_offset) + bias``, fp32 inside.

    Args:
        x: [..., H] sublayer output (fp32 or bf16 in MAGI-1). residual: x's shape.
        gate: [G, H] gate rows; gate_index: int [T] picks a row per token (T = x.numel() // H);
            None means one row per token (G == T).
        weight, bias: [H] norm affine.
        preset: "magi1" (LayerNorm, weight_offset 1.0); explicit norm / weight_offset override it.
            Without a preset both are required.
        norm: "layernorm" or "rmsnorm". weight_offset: gamma = weight + weight_offset.
        out_dtype: float output dtype, default residual.dtype. backend: "cuda" | "triton" | "torch" | None (auto).
    """
    style = presets.resolve(OP, preset, presets.POST_NORM_PRESETS, dict(norm=norm, weight_offset=weight_offset),
                            ("norm", "weight_offset"))
    c = GatedPostNormCall(x, gate, residual, weight, bias, gate_index, style["norm"], style["weight_offset"], eps,
                          out_dtype, backend)
    check(c)
    c.weight_offset, c.eps = float(c.weight_offset), float(c.eps)
    return _op(*values(c))
