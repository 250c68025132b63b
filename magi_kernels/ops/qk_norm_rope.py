"""qk_norm_rope: fused QK-norm + rotary embedding, q and k in one call.

    y = norm(x) * (w + weight_offset) + b          per head over D ("head") or over H*D ("hidden"), fp32
    y[..., :r] = rotate(y[..., :r], cos, sin)      NeoX half-split or interleaved pairs
    out = y.to(out_dtype)

The model-specific choices (norm kind, scope, weight offset, pair layout) have no defaults: pass them or
a preset (``magi_kernels.ops.presets``: "magi1", "wan", "hunyuan").
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from magi_kernels import registry
from magi_kernels.ops import presets
from magi_kernels.ops._common import dispatch, reference_vjp
from magi_kernels.ops._spec import define_op, register_backward, values
from magi_kernels.reference.qk_norm_rope import qk_norm_rope_ref
from magi_kernels.utils.checks import (FLOAT_DTYPES, check_choice, check_dtype_arg, check_number, check_same_device,
                                       check_tensor, fail)

OP = "qk_norm_rope"
NORMS = ("layernorm", "rmsnorm")
SCOPES = ("head", "hidden")
MAX_HEAD_DIM = 512


@dataclasses.dataclass
class QkNormRopeCall:
    """The op's arguments, declared once (the custom op's schema, fake and autograd derive from these).

    rotary_dim: resolved (0 = no rope). out_dtype None = q's dtype. backend None = auto.
    """

    q: torch.Tensor
    k: torch.Tensor
    cos: Optional[torch.Tensor]
    sin: Optional[torch.Tensor]
    q_weight: Optional[torch.Tensor]
    q_bias: Optional[torch.Tensor]
    k_weight: Optional[torch.Tensor]
    k_bias: Optional[torch.Tensor]
    norm: str
    norm_scope: str
    weight_offset: float
    eps: float
    rotary_dim: int
    interleaved: bool
    out_dtype: Optional[torch.dtype] = None
    backend: Optional[str] = None


@dataclasses.dataclass
class QkNormRopeArgs(QkNormRopeCall):
    """The same arguments, checked and kernel-ready. Every backend reads these and writes q_out / k_out.

    q, k: [T, H, D] views with stride(-1) == 1 and stride(-2) == D (any token stride, so q and k may
    be slices of a packed qkv buffer). cos, sin: fp32 contiguous [R, rotary_dim // 2]; token t uses row
    t % R. Weights and biases: fp32 contiguous, [D] for "head" scope, [H*D] for "hidden"; None = absent.
    """

    @property
    def tokens(self) -> int:
        return self.q.shape[0]

    @property
    def head_dim(self) -> int:
        return self.q.shape[2]

    @property
    def device(self) -> torch.device:
        return self.q.device


def _flatten_tokens(name: str, x: torch.Tensor) -> torch.Tensor:
    """[..., H, D] -> [T, H, D] as a view; heads and head_dim must be packed."""
    h, d = x.shape[-2], x.shape[-1]
    if x.stride(-1) != 1 or (h > 1 and x.stride(-2) != d):
        fail(OP, name, f"must have packed heads (stride(-1) == 1, stride(-2) == head_dim); got strides {list(x.stride())}")
    try:
        return x.view(-1, h, d)
    except RuntimeError:
        fail(OP, name, f"must have leading dims that flatten to one token dim without a copy; got shape {list(x.shape)} strides {list(x.stride())}")


def check(c: QkNormRopeCall) -> None:
    """Every rule on the arguments; metadata only (no device sync), so it also runs while tracing."""
    check_tensor(OP, "q", c.q, dtypes=FLOAT_DTYPES, ndim=(3, 4))
    check_tensor(OP, "k", c.k, dtypes=FLOAT_DTYPES, ndim=(3, 4))
    check_choice(OP, "norm", c.norm, NORMS)
    check_choice(OP, "norm_scope", c.norm_scope, SCOPES)
    check_number(OP, "weight_offset", c.weight_offset)
    check_number(OP, "eps", c.eps, minimum=0, exclusive_min=True)
    if not isinstance(c.interleaved, bool):
        fail(OP, "interleaved", f"must be a bool, got {c.interleaved!r}")
    check_dtype_arg(OP, "out_dtype", c.out_dtype)
    q, k = c.q, c.k
    if k.dim() != q.dim() or k.shape[:-2] != q.shape[:-2]:
        fail(OP, "k", f"must have q's leading (token) dims {list(q.shape[:-2])}, got shape {list(k.shape)}")
    if k.shape[-1] != q.shape[-1]:
        fail(OP, "k", f"must have q's head_dim {q.shape[-1]}, got {k.shape[-1]}")
    if k.dtype != q.dtype:
        fail(OP, "k", f"must have q's dtype {q.dtype}, got {k.dtype}")
    check_same_device(OP, "q", q, k=k, cos=c.cos, sin=c.sin, q_weight=c.q_weight, q_bias=c.q_bias,
                      k_weight=c.k_weight, k_bias=c.k_bias)
    d = q.shape[-1]
    if d == 0 or d > MAX_HEAD_DIM:
        fail(OP, "q", f"must have 1 <= head_dim <= {MAX_HEAD_DIM}, got {d}")
    if (c.cos is None) != (c.sin is None):
        fail(OP, "sin" if c.sin is None else "cos", "must be given together with the other of cos/sin")
    check_number(OP, "rotary_dim", c.rotary_dim, integer=True, minimum=0)
    if c.cos is None:
        if c.rotary_dim != 0:
            fail(OP, "rotary_dim", f"is {c.rotary_dim} but cos/sin were not given")
    else:
        check_tensor(OP, "cos", c.cos, dtypes=FLOAT_DTYPES)
        check_tensor(OP, "sin", c.sin, dtypes=FLOAT_DTYPES)
        if c.sin.shape != c.cos.shape:
            fail(OP, "sin", f"must have cos's shape {list(c.cos.shape)}, got {list(c.sin.shape)}")
        r = c.rotary_dim
        if r <= 0 or r % 2:
            fail(OP, "rotary_dim", f"must be a positive even number, got {r}")
        if r > d:
            fail(OP, "rotary_dim", f"must be <= head_dim {d}, got {r}")
        if c.cos.shape[-1] != r // 2:
            fail(OP, "cos", f"must have last dim rotary_dim/2 = {r // 2}, got shape {list(c.cos.shape)}")
        lead = tuple(q.shape[:-2])
        # Accepted: per-position [S, r/2] shared by the batch, or per-token with q's leading dims.
        rows = tuple(c.cos.shape[:-1])
        if rows != lead and not (q.dim() == 4 and rows == lead[1:]):
            want = f"[{', '.join(map(str, lead))}, {r // 2}]"
            if q.dim() == 4:
                want += f" or [{lead[1]}, {r // 2}]"
            fail(OP, "cos", f"must have shape {want}, got {list(c.cos.shape)}")
    hq, hk = _flatten_tokens("q", q).shape[1], _flatten_tokens("k", k).shape[1]
    for name, t, heads in (("q_weight", c.q_weight, hq), ("q_bias", c.q_bias, hq), ("k_weight", c.k_weight, hk),
                           ("k_bias", c.k_bias, hk)):
        if t is None:
            continue
        size = d if c.norm_scope == "head" else heads * d
        check_tensor(OP, name, t, dtypes=FLOAT_DTYPES)
        if t.numel() != size or t.dim() != 1:
            fail(OP, name, f"must be 1-D with {size} elements, got shape {list(t.shape)}")


def build_args(c: QkNormRopeCall) -> QkNormRopeArgs:
    """Kernel-ready views and fp32 copies of a checked call (no checks here: ``check`` ran already)."""
    cos = sin = None
    if c.cos is not None:
        cos = c.cos.reshape(-1, c.rotary_dim // 2).to(torch.float32).contiguous()
        sin = c.sin.reshape(-1, c.rotary_dim // 2).to(torch.float32).contiguous()

    def f32(t):
        return None if t is None else t.to(torch.float32).contiguous()

    return QkNormRopeArgs(
        q=_flatten_tokens("q", c.q), k=_flatten_tokens("k", c.k), cos=cos, sin=sin, q_weight=f32(c.q_weight),
        q_bias=f32(c.q_bias), k_weight=f32(c.k_weight), k_bias=f32(c.k_bias), norm=c.norm, norm_scope=c.norm_scope,
        weight_offset=float(c.weight_offset), eps=float(c.eps), rotary_dim=int(c.rotary_dim),
        interleaved=bool(c.interleaved), out_dtype=c.out_dtype, backend=c.backend)


def make_args(*args, **kwargs) -> QkNormRopeArgs:
    """Checked kernel arguments from a ``QkNormRopeCall`` or its fields (for tests and direct backend calls)."""
    c = args[0] if len(args) == 1 and isinstance(args[0], QkNormRopeCall) else QkNormRopeCall(*args, **kwargs)
    check(c)
    return build_args(c)


# --------------------------------------------------------------------------------------------------
# Backends. Each writes into preallocated q_out [T, Hq, D], k_out [T, Hk, D] (contiguous).

registry.register_op(OP, preference=("cuda", "triton", "torch"))


@registry.register_impl(OP, "torch")
def _torch_impl(a: QkNormRopeArgs, q_out: torch.Tensor, k_out: torch.Tensor) -> None:
    cos = sin = None
    if a.rotary_dim:
        rows = torch.arange(a.tokens, device=a.q.device) % a.cos.shape[0]
        cos, sin = a.cos[rows], a.sin[rows]
    qo, ko = qk_norm_rope_ref(a.q, a.k, cos, sin, a.q_weight, a.q_bias, a.k_weight, a.k_bias, norm=a.norm,
                              norm_scope=a.norm_scope, weight_offset=a.weight_offset, eps=a.eps,
                              rotary_dim=a.rotary_dim, interleaved=a.interleaved, out_dtype=q_out.dtype)
    q_out.copy_(qo)
    k_out.copy_(ko)


registry.register_module_impl(OP, "triton", "magi_kernels.kernels.triton.qk_norm_rope")
registry.register_module_impl(OP, "cuda", "magi_kernels.kernels.cuda.qk_norm_rope")


# --------------------------------------------------------------------------------------------------
# Custom op (torch.compile sees one opaque node) + autograd through the reference.

def _outputs(c: QkNormRopeCall) -> tuple[torch.Tensor, torch.Tensor]:
    dt = c.out_dtype or c.q.dtype
    return c.q.new_empty(c.q.shape, dtype=dt), c.k.new_empty(c.k.shape, dtype=dt)


def _run(c: QkNormRopeCall) -> tuple[torch.Tensor, torch.Tensor]:
    args = build_args(c)
    q_out, k_out = _outputs(c)
    dispatch(OP, args, c.backend, (q_out.view(args.q.shape), k_out.view(args.k.shape)))
    return q_out, k_out


_op = define_op(OP, QkNormRopeCall, returns=tuple[torch.Tensor, torch.Tensor], impl=_run, fake=_outputs)


def _backward(c: QkNormRopeCall, _outs, gq, gk) -> dict:
    def ref(q, k, cos, sin, q_weight, q_bias, k_weight, k_bias):
        return qk_norm_rope_ref(q, k, cos, sin, q_weight, q_bias, k_weight, k_bias, norm=c.norm,
                                norm_scope=c.norm_scope, weight_offset=c.weight_offset, eps=c.eps,
                                rotary_dim=c.rotary_dim, interleaved=c.interleaved, out_dtype=torch.float32)

    names = ("q", "k", "cos", "sin", "q_weight", "q_bias", "k_weight", "k_bias")
    grads = reference_vjp(ref, [getattr(c, n) for n in names], (gq, gk))
    return dict(zip(names, grads))


register_backward(_op, QkNormRopeCall, _backward)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                 *, preset: str | None = None, q_weight: torch.Tensor | None = None,
                 q_bias: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
                 k_bias: torch.Tensor | None = None, norm: str | None = None, norm_scope: str | None = None,
                 weight_offset: float | None = None, interleaved: bool | None = None, eps: float = 1e-6,
                 rotary_dim: int | None = None, out_dtype: torch.dtype | None = None,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused QK-norm + rotary embedding for q [.., S, Hq, D] and k [.., S, Hk, D] in one call.

    Args:
        q, k: [T, H, D] or [B, S, H, D], fp32/fp16/bf16, heads packed (q, k may be slices of a qkv buffer).
        cos, sin: [S, rotary_dim/2] (shared over the batch) or per token with q's leading dims; None = no rope.
        preset: "magi1" | "wan" | "hunyuan" (see ``magi_kernels.ops.presets``): fills norm, norm_scope,
            weight_offset and interleaved; explicit arguments override it. Without a preset, norm,
            norm_scope, weight_offset (and interleaved when cos is given) are required.
        q_weight, q_bias, k_weight, k_bias: norm affine params, [D] (norm_scope="head") or [H*D] ("hidden").
        norm: "layernorm" or "rmsnorm". norm_scope: "head" or "hidden". weight_offset: gamma = weight +
            weight_offset (1.0 for "1p" norms). interleaved: GPT-J (2i, 2i+1) pairs instead of NeoX halves.
        rotary_dim: dims rotated (default 2 * cos.shape[-1]); even, <= D.
        out_dtype: float output dtype (default q.dtype). backend: "cuda" | "triton" | "torch" | None (auto).
    Returns:
        (q_out, k_out) with q's and k's shapes.
    """
    style = presets.resolve(OP, preset, presets.QK_NORM_PRESETS,
                            dict(norm=norm, norm_scope=norm_scope, weight_offset=weight_offset,
                                 interleaved=interleaved),
                            ("norm", "norm_scope", "weight_offset") + (("interleaved",) if cos is not None else ()))
    if rotary_dim is None:
        rotary_dim = 2 * cos.shape[-1] if isinstance(cos, torch.Tensor) and cos.dim() else 0
    c = QkNormRopeCall(q, k, cos, sin, q_weight, q_bias, k_weight, k_bias, style["norm"], style["norm_scope"],
                       style["weight_offset"], eps, rotary_dim, style["interleaved"] or False, out_dtype, backend)
    check(c)
    c.weight_offset, c.eps = float(c.weight_offset), float(c.eps)
    return _op(*values(c))
