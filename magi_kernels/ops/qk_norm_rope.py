"""qk_norm_rope: fused QK-norm + rotary embedding, q and k in one call.

    y = norm(x) * (w + weight_offset) + b          per head over D ("head") or over H*D ("hidden"), fp32
    y[..., :r] = rotate(y[..., :r], cos, sin)      NeoX half-split or interleaved pairs
    out = y.to(out_dtype)

MAGI-1: LayerNorm "1p" per head (weight_offset=1.0, no bias), rotary_dim=96 of 128, NeoX.
Wan / LTX: RMSNorm over the whole hidden size (norm_scope="hidden").
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from magi_kernels import registry
from magi_kernels.ops._common import dispatch, reference_vjp
from magi_kernels.reference.norm_rope import qk_norm_rope_ref
from magi_kernels.utils.checks import (FLOAT_DTYPES, check_choice, check_same_device, check_tensor, fail)

OP = "qk_norm_rope"
NORMS = ("layernorm", "rmsnorm")
SCOPES = ("head", "hidden")


@dataclasses.dataclass
class QkNormRopeArgs:
    """Validated, kernel-ready arguments. Every backend reads these and writes q_out / k_out.

    q, k: [T, H, D] views with stride(-1) == 1 and stride(-2) == D (any token stride, so q and k may
    be slices of a packed qkv buffer). cos, sin: fp32 contiguous [R, rotary_dim // 2]; token t uses row
    t % R. Weights and biases: fp32 contiguous, [D] for "head" scope, [H*D] for "hidden"; None = absent.
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

    @property
    def tokens(self) -> int:
        return self.q.shape[0]

    @property
    def head_dim(self) -> int:
        return self.q.shape[2]


def _flatten_tokens(name: str, x: torch.Tensor) -> torch.Tensor:
    """[..., H, D] -> [T, H, D] as a view; heads and head_dim must be packed."""
    h, d = x.shape[-2], x.shape[-1]
    if x.stride(-1) != 1 or (h > 1 and x.stride(-2) != d):
        fail(OP, name, f"must have packed heads (stride(-1) == 1, stride(-2) == head_dim); got strides {list(x.stride())}")
    try:
        return x.view(-1, h, d)
    except RuntimeError:
        fail(OP, name, f"must have leading dims that flatten to one token dim without a copy; got shape {list(x.shape)} strides {list(x.stride())}")


def _norm_param(name: str, t, size: int, device) -> Optional[torch.Tensor]:
    if t is None:
        return None
    check_tensor(OP, name, t, dtypes=FLOAT_DTYPES)
    if t.numel() != size or t.dim() != 1:
        fail(OP, name, f"must be 1-D with {size} elements, got shape {list(t.shape)}")
    if t.device != device:
        fail(OP, name, f"must be on q's device {device}, got {t.device}")
    return t.to(torch.float32).contiguous()


def make_args(q, k, cos, sin, q_weight, q_bias, k_weight, k_bias, norm, norm_scope, weight_offset, eps,
              rotary_dim, interleaved) -> tuple[QkNormRopeArgs, int]:
    """Validate user arguments; return (kernel args, rope period S)."""
    check_tensor(OP, "q", q, dtypes=FLOAT_DTYPES, ndim=(3, 4))
    check_tensor(OP, "k", k, dtypes=FLOAT_DTYPES, ndim=(3, 4))
    check_choice(OP, "norm", norm, NORMS)
    check_choice(OP, "norm_scope", norm_scope, SCOPES)
    if k.dim() != q.dim() or k.shape[:-2] != q.shape[:-2]:
        fail(OP, "k", f"must have q's leading (token) dims {list(q.shape[:-2])}, got shape {list(k.shape)}")
    if k.shape[-1] != q.shape[-1]:
        fail(OP, "k", f"must have q's head_dim {q.shape[-1]}, got {k.shape[-1]}")
    if k.dtype != q.dtype:
        fail(OP, "k", f"must have q's dtype {q.dtype}, got {k.dtype}")
    check_same_device(OP, "q", q, k=k, cos=cos, sin=sin)
    if not eps > 0:
        fail(OP, "eps", f"must be > 0, got {eps}")
    d = q.shape[-1]
    if d > 512:
        fail(OP, "q", f"must have head_dim <= 512, got {d}")
    if (cos is None) != (sin is None):
        fail(OP, "sin" if sin is None else "cos", "must be given together with the other of cos/sin")
    if cos is None:
        if rotary_dim not in (None, 0):
            fail(OP, "rotary_dim", f"is {rotary_dim} but cos/sin were not given")
        rotary_dim = 0
    else:
        check_tensor(OP, "cos", cos, dtypes=FLOAT_DTYPES)
        check_tensor(OP, "sin", sin, dtypes=FLOAT_DTYPES)
        if sin.shape != cos.shape:
            fail(OP, "sin", f"must have cos's shape {list(cos.shape)}, got {list(sin.shape)}")
        if rotary_dim is None:
            rotary_dim = 2 * cos.shape[-1]
        if rotary_dim <= 0 or rotary_dim % 2:
            fail(OP, "rotary_dim", f"must be a positive even number, got {rotary_dim}")
        if rotary_dim > d:
            fail(OP, "rotary_dim", f"must be <= head_dim {d}, got {rotary_dim}")
        if cos.shape[-1] != rotary_dim // 2:
            fail(OP, "cos", f"must have last dim rotary_dim/2 = {rotary_dim // 2}, got shape {list(cos.shape)}")
        lead = tuple(q.shape[:-2])
        # Accepted: per-position [S, r/2] shared by the batch, or per-token with q's leading dims.
        if tuple(cos.shape[:-1]) == lead:
            pass
        elif q.dim() == 4 and tuple(cos.shape[:-1]) == lead[1:]:
            pass
        else:
            want = f"[{', '.join(map(str, lead))}, {rotary_dim // 2}]"
            if q.dim() == 4:
                want += f" or [{lead[1]}, {rotary_dim // 2}]"
            fail(OP, "cos", f"must have shape {want}, got {list(cos.shape)}")
        cos = cos.reshape(-1, rotary_dim // 2).to(torch.float32).contiguous()
        sin = sin.reshape(-1, rotary_dim // 2).to(torch.float32).contiguous()
    q3, k3 = _flatten_tokens("q", q), _flatten_tokens("k", k)
    hq, hk = q3.shape[1], k3.shape[1]
    qn = d if norm_scope == "head" else hq * d
    kn = d if norm_scope == "head" else hk * d
    args = QkNormRopeArgs(
        q=q3, k=k3, cos=cos, sin=sin,
        q_weight=_norm_param("q_weight", q_weight, qn, q.device), q_bias=_norm_param("q_bias", q_bias, qn, q.device),
        k_weight=_norm_param("k_weight", k_weight, kn, q.device), k_bias=_norm_param("k_bias", k_bias, kn, q.device),
        norm=norm, norm_scope=norm_scope, weight_offset=float(weight_offset), eps=float(eps),
        rotary_dim=int(rotary_dim), interleaved=bool(interleaved),
    )
    return args, (cos.shape[0] if cos is not None else 1)


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

@torch.library.custom_op("magi_kernels::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(q: torch.Tensor, k: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
                     q_weight: Optional[torch.Tensor], q_bias: Optional[torch.Tensor],
                     k_weight: Optional[torch.Tensor], k_bias: Optional[torch.Tensor], norm: str, norm_scope: str,
                     weight_offset: float, eps: float, rotary_dim: int, interleaved: bool,
                     out_dtype: Optional[torch.dtype], backend: Optional[str]) -> tuple[torch.Tensor, torch.Tensor]:
    args, _ = make_args(q, k, cos, sin, q_weight, q_bias, k_weight, k_bias, norm, norm_scope, weight_offset, eps,
                        rotary_dim, interleaved)
    dt = out_dtype or q.dtype
    q_out = torch.empty(q.shape, dtype=dt, device=q.device)
    k_out = torch.empty(k.shape, dtype=dt, device=k.device)
    info = registry.CallInfo(q.device, q.dtype, {"head_dim": q.shape[-1], "norm_scope": norm_scope,
                                                 "hq": args.q.shape[1], "hk": args.k.shape[1]})
    dispatch(OP, info, backend, args, (q_out.view(args.q.shape), k_out.view(args.k.shape)))
    return q_out, k_out


@_qk_norm_rope_op.register_fake
def _(q, k, cos, sin, q_weight, q_bias, k_weight, k_bias, norm, norm_scope, weight_offset, eps, rotary_dim,
      interleaved, out_dtype, backend):
    dt = out_dtype or q.dtype
    return q.new_empty(q.shape, dtype=dt), k.new_empty(k.shape, dtype=dt)


_TENSOR_ARGS = ("q", "k", "cos", "sin", "q_weight", "q_bias", "k_weight", "k_bias")


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8])
    ctx.cfg = inputs[8:14]


def _backward(ctx, gq, gk):
    q, k, cos, sin, qw, qb, kw, kb = ctx.saved_tensors
    norm, scope, off, eps, rdim, inter = ctx.cfg

    def ref(q, k, cos, sin, qw, qb, kw, kb):
        return qk_norm_rope_ref(q, k, cos, sin, qw, qb, kw, kb, norm=norm, norm_scope=scope, weight_offset=off,
                                eps=eps, rotary_dim=rdim if cos is not None else 0, interleaved=inter,
                                out_dtype=torch.float32)

    grads = reference_vjp(ref, (q, k, cos, sin, qw, qb, kw, kb), (gq, gk))
    return (*grads, None, None, None, None, None, None, None, None)


_qk_norm_rope_op.register_autograd(_backward, setup_context=_setup_context)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                 *, q_weight: torch.Tensor | None = None, q_bias: torch.Tensor | None = None,
                 k_weight: torch.Tensor | None = None, k_bias: torch.Tensor | None = None,
                 norm: str = "layernorm", norm_scope: str = "head", weight_offset: float = 0.0, eps: float = 1e-6,
                 rotary_dim: int | None = None, interleaved: bool = False, out_dtype: torch.dtype | None = None,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused QK-norm + rotary embedding for q [.., S, Hq, D] and k [.., S, Hk, D] in one call.

    Args:
        q, k: [T, H, D] or [B, S, H, D], fp32/fp16/bf16, heads packed (q, k may be slices of a qkv buffer).
        cos, sin: [S, rotary_dim/2] (shared over the batch) or per token with q's leading dims; None = no rope.
        q_weight, q_bias, k_weight, k_bias: norm affine params, [D] (norm_scope="head") or [H*D] ("hidden").
        norm: "layernorm" or "rmsnorm". weight_offset: gamma = weight + weight_offset (1.0 for "1p" norms).
        rotary_dim: dims rotated (default 2 * cos.shape[-1]); even, <= D. interleaved: GPT-J pairs instead of NeoX.
        out_dtype: output dtype (default q.dtype). backend: "cuda" | "triton" | "torch" | None (auto).
    Returns:
        (q_out, k_out) with q's and k's shapes.
    """
    # Validate eagerly so a bad call fails with a clear message before tracing/dispatch.
    make_args(q, k, cos, sin, q_weight, q_bias, k_weight, k_bias, norm, norm_scope, weight_offset, eps, rotary_dim,
              interleaved)
    if rotary_dim is None:
        rotary_dim = 0 if cos is None else 2 * cos.shape[-1]
    return _qk_norm_rope_op(q, k, cos, sin, q_weight, q_bias, k_weight, k_bias, norm, norm_scope,
                            float(weight_offset), float(eps), int(rotary_dim), bool(interleaved), out_dtype, backend)
