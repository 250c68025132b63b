"""flex_attn: varlen attention over MagiAttention-style slices (union mask), forward and backward.

    out, lse = flex_attn_func(q, k, v, q_ranges, k_ranges, attn_type_map)

q [total_q, Hq, D], k/v [total_k, Hk, D] (packed THD, last dim contiguous, Hq % Hk == 0, q head h
uses kv head h // (Hq/Hk)); q_ranges/k_ranges int32 [n, 2] half-open global token indices;
attn_type_map int32 [n] (0 FULL, 1 CAUSAL bottom-right, 2 INV_CAUSAL top-left, 3 BI_CAUSAL;
None = all FULL). The mask is the union of the slices (a cell two slices cover counts once; one
softmax per row over every key it sees). Rows no slice covers: out 0, lse -inf. out has q's dtype,
lse is fp32 natural-log [total_q, Hq]. softcap > 0 applies FA3's tanh(s*scale/softcap)*softcap.

Definition: magi_kernels/reference/flex_attn.py. Backends (registry ops ``flex_attn`` and ``flex_attn_bwd``):
``torch`` (magi_kernels/kernels/torch/flex_attn.py: walks the block-sparse plan tile by tile; any device) and
``triton`` (magi_kernels/kernels/triton/flex_attn.py). Both read :class:`FlexAttnArgs`, whose
``plan(block_m, block_n)`` returns the cached plan for any tile shape.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import threading
import typing
import weakref
from typing import Optional

import numpy as np
import torch

from magi_kernels import registry
from magi_kernels.ops._spec import define_op, register_backward, values
from magi_kernels.plan.planner import AttnPlan, get_plan
from magi_kernels.ranges.masks import _MaskBase
from magi_kernels.ranges.validate import check_ranges_meta, check_ranges_values
from magi_kernels.kernels.torch import flex_attn as torch_path
from magi_kernels.reference.flex_attn import default_scale
from magi_kernels.utils.checks import check_last_dim_contiguous, check_tensor, fail

OP = "flex_attn"
OP_BWD = "flex_attn_bwd"
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # float64: torch backend only
TORCH_TILE = (128, 128)  # the torch path's plan tile: big enough to keep Python overhead per tile small


@dataclasses.dataclass
class FlexAttnCall:
    """The forward op's arguments, declared once (schema, fake and autograd derive from these)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_ranges: torch.Tensor
    k_ranges: torch.Tensor
    attn_type_map: Optional[torch.Tensor]
    softmax_scale: Optional[float]
    softcap: float
    deterministic: bool
    backend: Optional[str] = None


def _backward_call_class() -> type:
    """The backward op's arguments: the forward call's fields with the upstream gradient ``dout`` first and
    the saved ``out``, ``lse`` and the gradient ``dlse`` after v (the schema order external callers use)."""
    fwd = [(f.name, typing.get_type_hints(FlexAttnCall)[f.name], f) for f in dataclasses.fields(FlexAttnCall)]
    saved = [("out", torch.Tensor), ("lse", torch.Tensor), ("dlse", Optional[torch.Tensor])]
    cls = dataclasses.make_dataclass("FlexAttnBwdCall", [("dout", torch.Tensor), *fwd[:3], *saved, *fwd[3:]])
    cls.__module__ = __name__
    return cls


FlexAttnBwdCall = _backward_call_class()


@dataclasses.dataclass
class FlexAttnArgs:
    """Validated, kernel-ready arguments shared by every backend.

    q [Tq, Hq, D], k/v [Tk, Hk, D] with stride(-1) == 1 (other strides arbitrary). Host copies of the
    validated ranges live in qr/kr/types (numpy int32); ``plan(bm, bn)`` is LRU-cached by content.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    qr: np.ndarray
    kr: np.ndarray
    types: np.ndarray
    softmax_scale: float
    softcap: float
    deterministic: bool

    @property
    def total_q(self) -> int:
        return self.q.shape[0]

    @property
    def total_k(self) -> int:
        return self.k.shape[0]

    @property
    def groups(self) -> int:
        return self.q.shape[1] // self.k.shape[1]

    @property
    def device(self) -> torch.device:
        return self.q.device

    def plan(self, block_m: int, block_n: int) -> AttnPlan:
        return get_plan(self.qr, self.kr, self.types, self.total_q, self.total_k, block_m, block_n)


def check_qkv(q, k, v, op: str = OP) -> None:
    """Metadata checks on q/k/v (no value reads, safe while tracing)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t, dtypes=DTYPES, ndim=3)
        check_last_dim_contiguous(op, name, t)
    if k.dtype != q.dtype:
        fail(op, "k", f"must have q's dtype {q.dtype}, got {k.dtype}")
    if v.dtype != q.dtype:
        fail(op, "v", f"must have q's dtype {q.dtype}, got {v.dtype}")
    if k.device != q.device:
        fail(op, "k", f"must be on q's device {q.device}, got {k.device}")
    if v.device != q.device:
        fail(op, "v", f"must be on q's device {q.device}, got {v.device}")
    if k.shape[2] != q.shape[2]:
        fail(op, "k", f"must have q's head_dim {q.shape[2]}, got shape {list(k.shape)}")
    if v.shape != k.shape:
        fail(op, "v", f"must have k's shape {list(k.shape)} [total_k, nh_kv, head_dim], got {list(v.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        fail(op, "k", f"must have a number of heads dividing q's ({q.shape[1]}) for GQA, got {k.shape[1]}")
    if q.shape[2] == 0:
        fail(op, "q", f"must have head_dim >= 1, got shape {list(q.shape)}")


def check_scalars(softmax_scale, softcap, op: str = OP) -> None:
    # bool is an int subclass: softmax_scale=True would silently mean 1.0.
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not (
            isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale))):
        fail(op, "softmax_scale", f"must be a finite float or None, got {softmax_scale!r}")
    if isinstance(softcap, bool) or not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap >= 0):
        fail(op, "softcap", f"must be a finite float >= 0 (0 disables it), got {softcap!r}")


def check(c: FlexAttnCall) -> None:
    """Metadata rules (no device sync; also run while tracing). Range values: ``build_args``."""
    check_qkv(c.q, c.k, c.v)
    check_scalars(c.softmax_scale, c.softcap)
    check_ranges_meta(OP, c.q_ranges, c.k_ranges, c.attn_type_map, c.q.device)


class _CheckedRanges:
    """Host copies of range tensors that passed ``check_ranges_values``, keyed by the tensors' identity.

    A model calls flex_attn with the same few range tensors on every layer and step, and the backward with the
    forward's. Keying by identity (the entry holds weak references, so an id is never matched against a new
    tensor that reuses it) plus the tensors' in-place version counters lets every call after the first skip the
    host read: with ranges on the device, that read is a device-to-host copy and a stream sync per call.
    """

    MAX_ENTRIES = 256

    def __init__(self) -> None:
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(tensors, total_q: int, total_k: int) -> tuple:
        return tuple(id(t) for t in tensors) + (total_q, total_k)

    def get(self, q_ranges, k_ranges, attn_type_map, total_q: int, total_k: int):
        tensors = (q_ranges, k_ranges, attn_type_map)
        key = self._key(tensors, total_q, total_k)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                refs, versions, arrays = hit
                if all((r is None and t is None) or (r is not None and r() is t and t._version == v)
                       for r, t, v in zip(refs, tensors, versions)):
                    self._entries.move_to_end(key)
                    return arrays
        arrays = check_ranges_values(OP, q_ranges, k_ranges, attn_type_map, total_q, total_k)
        if any(t is not None and t.is_inference() for t in tensors):
            return arrays  # inference tensors have no version counter: an in-place edit could not be seen
        refs = tuple(None if t is None else weakref.ref(t) for t in tensors)
        with self._lock:
            self._entries[key] = (refs, tuple(None if t is None else t._version for t in tensors), arrays)
            if len(self._entries) > self.MAX_ENTRIES:
                self._entries.popitem(last=False)
        return arrays

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


checked_ranges = _CheckedRanges()


def build_args(c: FlexAttnCall) -> FlexAttnArgs:
    """Value checks of the ranges (one host copy per distinct range tensors) and the kernel-ready arguments."""
    qr, kr, ty = checked_ranges.get(c.q_ranges, c.k_ranges, c.attn_type_map, c.q.shape[0], c.k.shape[0])
    scale = default_scale(c.q.shape[2]) if c.softmax_scale is None else float(c.softmax_scale)
    return FlexAttnArgs(c.q, c.k, c.v, qr, kr, ty, scale, float(c.softcap), bool(c.deterministic))


def make_args(*args, **kwargs) -> FlexAttnArgs:
    """Checked kernel arguments from a ``FlexAttnCall`` or its fields (tests, direct backend calls)."""
    c = args[0] if len(args) == 1 and isinstance(args[0], FlexAttnCall) else FlexAttnCall(*args, **kwargs)
    check(c)
    return build_args(c)


# --------------------------------------------------------------------------------------------------
# Backends. Forward writes out [Tq, Hq, D] (q dtype) and lse [Tq, Hq] fp32; backward writes dq, dk, dv.

registry.register_op(OP, preference=("triton", "torch"))
registry.register_op(OP_BWD, preference=("triton", "torch"))


@registry.register_impl(OP, "torch")
def _torch_fwd(a: FlexAttnArgs, out: torch.Tensor, lse: torch.Tensor) -> None:
    plan = a.plan(*TORCH_TILE)
    torch_path.flex_attn_fwd(a.q, a.k, a.v, plan, a.softmax_scale, a.softcap, out=out, lse=lse)


@registry.register_impl(OP_BWD, "torch")
def _torch_bwd(a: FlexAttnArgs, dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
               dlse: Optional[torch.Tensor], dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
    # Deterministic regardless of a.deterministic: one q-major pass in a fixed order, no atomics.
    plan = a.plan(*TORCH_TILE)
    torch_path.flex_attn_bwd(dout, a.q, a.k, a.v, out, lse, plan, a.softmax_scale, a.softcap, dlse=dlse, dq=dq,
                             dk=dk, dv=dv)


# Triton backend: magi_kernels/kernels/triton/flex_attn.py (supports / launch_fwd, supports_bwd / launch_bwd).
registry.register_module_impl(OP, "triton", "magi_kernels.kernels.triton.flex_attn", launch="launch_fwd")
registry.register_module_impl(OP_BWD, "triton", "magi_kernels.kernels.triton.flex_attn", launch="launch_bwd",
                              supports="supports_bwd")


# --------------------------------------------------------------------------------------------------
# Custom ops (torch.compile sees opaque nodes; planning happens inside, at run time).

def _fwd_outputs(c: FlexAttnCall) -> tuple[torch.Tensor, torch.Tensor]:
    return c.q.new_empty(c.q.shape), c.q.new_empty(c.q.shape[:2], dtype=torch.float32)


def _run_fwd(c: FlexAttnCall) -> tuple[torch.Tensor, torch.Tensor]:
    a = build_args(c)
    out, lse = _fwd_outputs(c)
    registry.select(OP, a, c.backend).fn(a, out, lse)
    return out, lse


def _bwd_outputs(c: FlexAttnBwdCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(c.q), torch.empty_like(c.k), torch.empty_like(c.v)


def _forward_call(c: FlexAttnBwdCall) -> FlexAttnCall:
    return FlexAttnCall(**{f.name: getattr(c, f.name) for f in dataclasses.fields(FlexAttnCall)})


def _run_bwd(c: FlexAttnBwdCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a = build_args(_forward_call(c))  # the forward's checked ranges and plan (both cached): no host read
    dq, dk, dv = _bwd_outputs(c)
    registry.select(OP_BWD, a, c.backend).fn(a, c.dout, c.out, c.lse, c.dlse, dq, dk, dv)
    return dq, dk, dv


_flex_attn_op = define_op(OP, FlexAttnCall, returns=tuple[torch.Tensor, torch.Tensor], impl=_run_fwd,
                          fake=_fwd_outputs)
_flex_attn_bwd_op = define_op(OP_BWD, FlexAttnBwdCall, returns=tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                              impl=_run_bwd, fake=_bwd_outputs)


def _backward(c: FlexAttnCall, outs, dout, dlse) -> dict:
    out, lse = outs
    if dout is None:
        dout = torch.zeros_like(out)
    bwd = FlexAttnBwdCall(dout=dout.contiguous(), out=out, lse=lse, dlse=dlse,
                          **{f.name: getattr(c, f.name) for f in dataclasses.fields(FlexAttnCall)})
    dq, dk, dv = _flex_attn_bwd_op(*values(bwd))
    return {"q": dq, "k": dk, "v": dv}


register_backward(_flex_attn_op, FlexAttnCall, _backward, save_outputs=True)


def resolve_mask(op: str, q: torch.Tensor, k: torch.Tensor, q_ranges, k_ranges, attn_type_map):
    """The three range tensors, from either the tensors themselves or a typed mask passed as ``q_ranges``."""
    if not isinstance(q_ranges, _MaskBase):
        return q_ranges, k_ranges, attn_type_map
    if k_ranges is not None or attn_type_map is not None:
        fail(op, "k_ranges", "must be None (attn_type_map too) when q_ranges is a mask object")
    check_tensor(op, "q", q, ndim=3)
    check_tensor(op, "k", k, ndim=3)
    return q_ranges.range_tensors(q.device, total_q=q.shape[0], total_k=k.shape[0], op=op)


def flex_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_ranges, k_ranges: Optional[torch.Tensor] = None,
                   attn_type_map: Optional[torch.Tensor] = None, *, softmax_scale: Optional[float] = None,
                   softcap: float = 0.0, deterministic: bool = False,
                   backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of slices ``(q_ranges[i], k_ranges[i], attn_type_map[i])``.

    Args:
        q: [total_q, Hq, D]; k, v: [total_k, Hk, D]; fp16/bf16/fp32 (fp64 on the torch backend), same dtype,
            last dim contiguous, Hq % Hk == 0.
        q_ranges, k_ranges: int32 [n, 2], half-open [start, end) global token indices; on q's device or CPU.
            Or a mask object (VarlenFull, BlockCausal, PackedMask, ...) as q_ranges, k_ranges and
            attn_type_map left None; its total_q / total_k must match q's and k's token counts.
        attn_type_map: int32 [n] mask types (0 FULL, 1 CAUSAL, 2 INV_CAUSAL, 3 BI_CAUSAL), None = all FULL.
        softmax_scale: default 1/sqrt(D). softcap: FA3 soft-capping (0 = off).
        deterministic: bitwise-repeatable gradients (the torch backend always is).
        backend: "triton" | "torch" | None (auto).
    Returns:
        (out [total_q, Hq, D] in q's dtype, lse fp32 [total_q, Hq], natural log; -inf for rows that see no key).
    """
    q_ranges, k_ranges, attn_type_map = resolve_mask(OP, q, k, q_ranges, k_ranges, attn_type_map)
    # Metadata checks run here (also under torch.compile tracing); range values are checked inside the op.
    c = FlexAttnCall(q, k, v, q_ranges, k_ranges, attn_type_map, softmax_scale, softcap, deterministic, backend)
    check(c)
    c.softmax_scale = None if softmax_scale is None else float(softmax_scale)
    c.softcap, c.deterministic = float(softcap), bool(deterministic)
    return _flex_attn_op(*values(c))


def merge_attn_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                      lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attention results over disjoint key sets (e.g. context-parallel shards).

    out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse), lse = log(exp(lse_a) + exp(lse_b)), in fp32;
    out in out_a's dtype, lse fp32. Rows where both sides are -inf give out 0, lse -inf. Differentiable.
    """
    op = "merge_attn_states"
    check_tensor(op, "out_a", out_a, dtypes=DTYPES, ndim=3)
    check_tensor(op, "out_b", out_b, dtypes=DTYPES, ndim=3)
    check_tensor(op, "lse_a", lse_a, ndim=2)
    check_tensor(op, "lse_b", lse_b, ndim=2)
    if out_b.shape != out_a.shape:
        fail(op, "out_b", f"must have out_a's shape {list(out_a.shape)}, got {list(out_b.shape)}")
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        if tuple(t.shape) != tuple(out_a.shape[:2]):
            fail(op, name, f"must have shape {list(out_a.shape[:2])} (out's [tokens, heads]), got {list(t.shape)}")
        if not t.is_floating_point():
            fail(op, name, f"must be floating point, got {t.dtype}")
    for name, t in (("out_b", out_b), ("lse_a", lse_a), ("lse_b", lse_b)):
        if t.device != out_a.device:
            fail(op, name, f"must be on out_a's device {out_a.device}, got {t.device}")
    cd = torch.float64 if out_a.dtype == torch.float64 else torch.float32
    la, lb = lse_a.to(cd), lse_b.to(cd)
    lse = torch.logaddexp(la, lb)
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)  # both -inf: weights exp(-inf) = 0
    wa, wb = torch.exp(la - safe), torch.exp(lb - safe)
    out = out_a.to(cd) * wa[..., None] + out_b.to(cd) * wb[..., None]
    return out.to(out_a.dtype), lse.to(torch.float32)
