"""fp8_gemm: out = epilogue(dequant(a) @ dequant(b)^T + bias), e4m3 operands, fp32 accumulation.

Layout: a [..., K] (activations, rows K-contiguous), b [N, K] (the nn.Linear weight layout, K-contiguous),
i.e. an "NT" GEMM; out [..., N] (or [..., N/2] for SwiGLU). Any K >= 1 is handled (a ragged last 128-group
is zero-padded by the kernel; block scales then cover the partial group).

Scales are fp32 and their layout is read from their shapes (M = rows of a after flattening):
  a_scale: 1 value -> per-tensor; (M,) or (M, 1) -> per-row; (M, ceil(K/128)) with ceil(K/128) > 1 -> 1x128 blocks
  b_scale: 1 value -> per-tensor; (N,) or (N, 1) or (1, N) -> per-column;
           (ceil(N/128), ceil(K/128)) -> 128x128 blocks (checked first, so pass (N,) when ambiguous)
Any a layout combines with any b layout; (M, 1) with K <= 128 is both "row" and "block" and means the same.

Epilogue (fp32, in this order): bias [N] -> activation ("gelu" exact erf | "swiglu": silu(y[:, :N/2]) *
y[:, N/2:]) -> * gate ([M, N_out] or [N_out], any float dtype), then cast to out_dtype. Pass
epilogue="gelu", "swiglu", "gate", "gelu+gate" or "swiglu+gate"; "gate" needs gate=.

Numerics: by default the Triton kernel promotes the tensor-core accumulator into fp32 every <= 128 of K (see
kernels/triton/fp8_gemm.py). ``fast_accum=True`` keeps one tensor-core accumulation chain over all of K and
applies every scale in the epilogue (cuBLASLt's "fast accumulation", what MAGI-1's released fp8 checkpoints
were run with); it takes per-tensor and per-row/column scales only, since block scales change every 128 of K.
The torch backend computes in exact fp32 either way: the two modes differ only in the tensor core's
accumulator register, which a CPU does not have (docs/fp8.md#fast-accumulation). NaN in a or in a scale propagates to the affected outputs; e4m3 has no inf, so
overflow can only come from scales / bias / epilogue in fp32 and then saturates to inf in out_dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from magi_kernels import registry
from magi_kernels.ops._common import dispatch, reference_vjp
from magi_kernels.ops._spec import define_op, register_backward, values
from magi_kernels.reference.fp8 import BLOCK, E4M3, cdiv, fp8_gemm_ref
from magi_kernels.utils.checks import FLOAT_DTYPES, check_dtype_arg, check_tensor, fail, rows_view

OP = "fp8_gemm"
EPILOGUES = (None, "gelu", "swiglu", "gate", "gelu+gate", "swiglu+gate")
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclasses.dataclass
class Fp8GemmCall:
    """The op's arguments, declared once (the custom op's schema, fake and autograd derive from these)."""

    a: torch.Tensor
    b: torch.Tensor
    a_scale: torch.Tensor
    b_scale: torch.Tensor
    bias: Optional[torch.Tensor]
    epilogue: Optional[str]
    gate: Optional[torch.Tensor]
    out_dtype: torch.dtype = torch.bfloat16
    backend: Optional[str] = None
    fast_accum: bool = False

    @property
    def act(self) -> Optional[str]:
        return next((p for p in (self.epilogue or "").split("+") if p and p != "gate"), None)

    @property
    def n_out(self) -> int:
        return self.b.shape[0] // 2 if self.act == "swiglu" else self.b.shape[0]


@dataclasses.dataclass
class Fp8GemmArgs:
    """Kernel-ready: a [M, K] e4m3 (stride(-1) == 1), b [N, K] e4m3 (stride(-1) == 1); scales fp32 contiguous
    in their canonical shapes ((1,), (M,), (M, KB) / (1,), (N,), (NB, KB)); bias fp32-or-half [N] contiguous;
    gate [M, N_out] with stride(-1) == 1 (row stride 0 = one row broadcast)."""

    a: torch.Tensor
    b: torch.Tensor
    a_scale: torch.Tensor
    b_scale: torch.Tensor
    a_mode: str
    b_mode: str
    bias: Optional[torch.Tensor]
    act: Optional[str]
    gate: Optional[torch.Tensor]
    out_dtype: torch.dtype = torch.bfloat16
    fast_accum: bool = False  # one unpromoted tensor-core chain over K, every scale in the epilogue

    @property
    def n_out(self) -> int:
        return self.b.shape[0] // 2 if self.act == "swiglu" else self.b.shape[0]

    @property
    def device(self) -> torch.device:
        return self.a.device


def _scale_tensor(name: str, s) -> torch.Tensor:
    check_tensor(OP, name, s, dtypes=(torch.float32,))
    return s


def classify_a_scale(s: torch.Tensor, m: int, k: int) -> str:
    kb = cdiv(k, BLOCK)
    if s.numel() == 1 and not (s.dim() == 2 and s.shape[0] == m and m > 1):
        return "tensor"
    if s.dim() == 2 and tuple(s.shape) == (m, kb) and kb > 1:
        return "block"
    if (s.dim() == 1 and s.shape[0] == m) or (s.dim() == 2 and tuple(s.shape) == (m, 1)):
        return "row"
    fail(OP, "a_scale", f"must be per-tensor (1 value), per-row ({m},) / ({m}, 1), or 1x128 blocks ({m}, {kb}) "
                        f"for a with M={m}, K={k}; got shape {list(s.shape)}")


def classify_b_scale(s: torch.Tensor, n: int, k: int) -> str:
    nb, kb = cdiv(n, BLOCK), cdiv(k, BLOCK)
    if s.numel() == 1:
        return "tensor"
    if s.dim() == 2 and tuple(s.shape) == (nb, kb):
        return "block"
    if (s.dim() == 1 and s.shape[0] == n) or (s.dim() == 2 and tuple(s.shape) in ((n, 1), (1, n))):
        return "col"
    fail(OP, "b_scale", f"must be per-tensor (1 value), per-column ({n},), or 128x128 blocks ({nb}, {kb}) for b "
                        f"with N={n}, K={k}; got shape {list(s.shape)}")


def check(c: Fp8GemmCall) -> None:
    """Every rule on the arguments; metadata only (no device sync), so it runs once, in the public function."""
    a, b, epilogue, gate = c.a, c.b, c.epilogue, c.gate
    check_tensor(OP, "a", a, dtypes=(E4M3,))
    check_tensor(OP, "b", b, dtypes=(E4M3,), ndim=2)
    if a.dim() < 1:
        fail(OP, "a", "must have at least 1 dim [..., K]")
    check_dtype_arg(OP, "out_dtype", c.out_dtype, OUT_DTYPES, allow_none=False)
    if epilogue not in EPILOGUES:
        fail(OP, "epilogue", f"must be one of {list(EPILOGUES)}, got {epilogue!r}")
    k = a.shape[-1]
    n = b.shape[0]
    if k == 0 or n == 0:
        fail(OP, "b", f"must have N >= 1 and K >= 1, got a {list(a.shape)}, b {list(b.shape)}")
    if b.shape[1] != k:
        fail(OP, "b", f"must be [N, K] (nn.Linear weight layout) with a's K={k}, got shape {list(b.shape)}")
    for name, t in (("a", a), ("b", b)):
        if t.stride(-1) != 1:
            fail(OP, name, f"must be K-contiguous (stride(-1) == 1; b is [N, K] like an nn.Linear weight), "
                           f"got strides {list(t.stride())}")
    m = rows_view(OP, "a", a).shape[0]
    for name, t in (("b", b), ("a_scale", c.a_scale), ("b_scale", c.b_scale), ("bias", c.bias), ("gate", gate)):
        if isinstance(t, torch.Tensor) and t.device != a.device:
            fail(OP, name, f"must be on a's device {a.device}, got {t.device}")
    _scale_tensor("a_scale", c.a_scale)
    _scale_tensor("b_scale", c.b_scale)
    a_mode, b_mode = classify_a_scale(c.a_scale, m, k), classify_b_scale(c.b_scale, n, k)
    if not isinstance(c.fast_accum, bool):
        fail(OP, "fast_accum", f"must be a bool, got {type(c.fast_accum).__name__}")
    if c.fast_accum and "block" in (a_mode, b_mode):
        fail(OP, "fast_accum", "must be False with block scales (1x128 / 128x128): a block scale changes every 128 "
                               "of K, so each 128-wide partial sum is scaled and promoted on its own; fast "
                               "accumulation takes per-tensor and per-row/column scales only")
    if c.act == "swiglu" and n % 2:
        fail(OP, "b", f"must have an even N for epilogue 'swiglu' (paired halves), got N={n}")
    n_out = c.n_out
    if c.bias is not None:
        check_tensor(OP, "bias", c.bias, dtypes=FLOAT_DTYPES)
        if c.bias.numel() != n or c.bias.dim() != 1:
            fail(OP, "bias", f"must be 1-D with N={n} elements (before any SwiGLU halving), got {list(c.bias.shape)}")
    if _uses_gate(epilogue):
        if gate is None:
            fail(OP, "gate", f"is required for epilogue {epilogue!r}")
        check_tensor(OP, "gate", gate, dtypes=FLOAT_DTYPES)
        lead = tuple(a.shape[:-1])
        if not (tuple(gate.shape) in ((n_out,), lead + (n_out,), (m, n_out))):
            fail(OP, "gate", f"must have shape [{n_out}] or the output's shape {list(lead) + [n_out]}, "
                             f"got {list(gate.shape)}")
    elif gate is not None:
        fail(OP, "gate", f"was given but epilogue {epilogue!r} does not multiply by a gate (use '...+gate')")


def _uses_gate(epilogue: str | None) -> bool:
    return epilogue is not None and "gate" in epilogue.split("+")


def build_args(c: Fp8GemmCall) -> Fp8GemmArgs:
    """Kernel-ready views of a checked call: scales in their canonical shapes, the gate as [M, N_out] rows."""
    a2 = rows_view(OP, "a", c.a)
    (m, k), n, n_out = a2.shape, c.b.shape[0], c.n_out
    a_mode, b_mode = classify_a_scale(c.a_scale, m, k), classify_b_scale(c.b_scale, n, k)
    a_scale = {"tensor": (1,), "row": (m,), "block": c.a_scale.shape}[a_mode]
    b_scale = {"tensor": (1,), "col": (n,), "block": c.b_scale.shape}[b_mode]
    gate = c.gate if _uses_gate(c.epilogue) else None
    if gate is not None:
        if gate.dim() == 1:
            gate = gate.contiguous().view(1, n_out).expand(m, n_out)  # row stride 0: one row for every token
        else:
            gate = gate.reshape(m, n_out)
            if gate.stride(-1) != 1:
                gate = gate.contiguous()
    return Fp8GemmArgs(a=a2, b=c.b, a_scale=c.a_scale.reshape(a_scale).contiguous(),
                       b_scale=c.b_scale.reshape(b_scale).contiguous(), a_mode=a_mode, b_mode=b_mode,
                       bias=None if c.bias is None else c.bias.contiguous(), act=c.act, gate=gate,
                       out_dtype=c.out_dtype, fast_accum=c.fast_accum)


def make_args(*args, **kwargs) -> Fp8GemmArgs:
    """Checked kernel arguments from an ``Fp8GemmCall`` or its fields (tests, direct backend calls)."""
    c = args[0] if len(args) == 1 and isinstance(args[0], Fp8GemmCall) else Fp8GemmCall(*args, **kwargs)
    check(c)
    return build_args(c)


# --------------------------------------------------------------------------------------------------
# Backends: each writes out [M, N_out] and honours ``fast_accum``: the Triton kernel drops its promotion,
# "scaled_mm" passes it as torch._scaled_mm's use_fast_accum (kernels/vendor/scaled_mm.py lists the layouts it
# takes), the torch reference is exact fp32 in both modes.

# Triton first: it fuses every epilogue and block scales; torch._scaled_mm covers tensor- and row-wise scales.
registry.register_op(OP, preference=("triton", "scaled_mm", "torch"))


@registry.register_impl(OP, "torch")
def _torch_impl(a: Fp8GemmArgs, out: torch.Tensor) -> None:
    out.copy_(fp8_gemm_ref(a.a, a.b, a.a_scale, a.b_scale, a.a_mode, a.b_mode, bias=a.bias, act=a.act,
                           gate=a.gate, out_dtype=out.dtype))


registry.register_module_impl(OP, "triton", "magi_kernels.kernels.triton.fp8_gemm")
registry.register_module_impl(OP, "scaled_mm", "magi_kernels.kernels.vendor.scaled_mm")


# --------------------------------------------------------------------------------------------------

def _output(c: Fp8GemmCall) -> torch.Tensor:
    return c.a.new_empty(*c.a.shape[:-1], c.n_out, dtype=c.out_dtype)


def _run(c: Fp8GemmCall) -> torch.Tensor:
    args = build_args(c)
    out = _output(c)
    dispatch(OP, args, c.backend, (out.view(args.a.shape[0], args.n_out),))
    return out


_op = define_op(OP, Fp8GemmCall, returns=torch.Tensor, impl=_run, fake=_output)


def _backward(c: Fp8GemmCall, _outs, grad) -> dict:
    """Gradients for the float inputs (bias, gate, scales) through the fp32 reference.

    The e4m3 operands get none: autograd casts a gradient to its input's dtype, so a gradient for ``a`` or
    ``b`` would be rounded to e4m3 (3 mantissa bits, NaN past 448). Differentiate with respect to the float
    activation instead: ``magi_kernels.fp8_linear`` (and ``Fp8Linear``) carry the gradient from the output to
    the unquantized input through the dequantized weight.
    """
    for name in ("a", "b"):
        if getattr(c, name).requires_grad:
            fail(OP, name, "is an e4m3 operand and gets no gradient (it would be rounded to e4m3); differentiate "
                           "the float input with magi_kernels.fp8_linear / Fp8Linear instead")
    args = build_args(c)

    def ref(a_scale, b_scale, bias, gate):
        return fp8_gemm_ref(args.a, args.b, a_scale.reshape(args.a_scale.shape), b_scale.reshape(args.b_scale.shape),
                            args.a_mode, args.b_mode, bias=bias, act=args.act,
                            gate=None if gate is None else gate.reshape(-1, args.n_out).expand(args.a.shape[0], -1),
                            out_dtype=torch.float32).reshape(*c.a.shape[:-1], args.n_out)

    names = ("a_scale", "b_scale", "bias", "gate")
    return dict(zip(names, reference_vjp(ref, [getattr(c, n) for n in names], (grad,))))


register_backward(_op, Fp8GemmCall, _backward)


def fp8_gemm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor, *,
             bias: torch.Tensor | None = None, epilogue: str | None = None, gate: torch.Tensor | None = None,
             out_dtype: torch.dtype = torch.bfloat16, backend: str | None = None,
             fast_accum: bool = False) -> torch.Tensor:
    """Scaled fp8 GEMM ``epilogue(dq(a) @ dq(b).T + bias)``; see the module docstring for layouts and rules.

    Args:
        a: [..., K] float8_e4m3fn, K-contiguous. b: [N, K] float8_e4m3fn (nn.Linear weight layout).
        a_scale, b_scale: fp32 scales (per-tensor, per-row/column, or 1x128 / 128x128 blocks).
        bias: [N] (applied before the activation). epilogue: None | "gelu" | "swiglu" | "gate" |
        "gelu+gate" | "swiglu+gate". gate: [..., N_out] or [N_out]. out_dtype: bf16 | fp16 | fp32.
        backend: "triton" | "scaled_mm" | "torch" | None (auto).
        fast_accum: accumulate all of K in the tensor core's own accumulator (no fp32 promotion every 128 of
            K; the scales are applied once, in the epilogue), as cuBLASLt's fast accumulation and
            ``torch._scaled_mm(..., use_fast_accum=True)`` do. Faster; loses low bits on long K. Not with
            block scales.
    Autograd: gradients flow to bias, gate and the scales; the e4m3 operands get none (see ``fp8_linear``).
    """
    c = Fp8GemmCall(a, b, a_scale, b_scale, bias, epilogue, gate, out_dtype, backend, fast_accum)
    check(c)
    return _op(*values(c))
