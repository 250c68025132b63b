"""One declaration per op: a dataclass lists the op's arguments once (names, types, defaults).

From that declaration this module derives everything torch needs:

- the ``torch.library.custom_op`` schema (from the field annotations, in field order);
- the fake (meta) implementation's and the real implementation's view of the arguments (one ``call``
  object instead of a dozen positional parameters);
- the autograd plumbing: which inputs are tensors to save, and the gradient tuple in schema order
  (``backward`` returns ``{field name: gradient}``; every other field gets ``None``).

So adding an option to an op means adding one field and reading it where it matters.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any, Callable

import torch

NAMESPACE = "magi_kernels"
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")  # owns every registration below (kept alive here)


def field_names(call_cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(call_cls))


def values(call) -> list[Any]:
    """The call's field values in declaration (= schema) order. Not ``dataclasses.astuple``: that copies
    tensors. Reads the names ``define_op`` stored on the class (``dataclasses.fields`` does not trace)."""
    return [getattr(call, n) for n in type(call).op_fields]


def _tensor_fields(call_cls: type) -> tuple[str, ...]:
    hints = typing.get_type_hints(call_cls)
    return tuple(n for n in field_names(call_cls)
                 if hints[n] is torch.Tensor or hints[n] == typing.Optional[torch.Tensor])


def define_op(name: str, call_cls: type, *, returns: Any, impl: Callable, fake: Callable):
    """Register ``magi_kernels::<name>`` whose arguments are exactly ``call_cls``'s fields, in order.

    ``impl(call)`` and ``fake(call)`` receive one ``call_cls`` instance. Returns the op (an OpOverload).

    Registered with ``torch.library.define`` / ``impl`` rather than ``torch.library.custom_op``: the latter
    wraps every kernel in a lazy ``torch._dynamo`` import, which imports Triton on the first eager call,
    and a CPU-only user of the torch backend should never load Triton. torch.compile treats both alike
    (one opaque node, the fake for shapes).
    """
    call_cls.op_fields = field_names(call_cls)
    hints = typing.get_type_hints(call_cls)
    # Defaults go into the schema too, so a caller of the raw op (torch.ops.magi_kernels.<name>, opcheck) may
    # leave trailing options out exactly as with the Python wrapper.
    params = [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=hints[f.name],
                                default=inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default)
              for f in dataclasses.fields(call_cls)]

    def run(*args):
        return impl(call_cls(*args))

    run.__signature__ = inspect.Signature(params, return_annotation=returns)
    qualname = f"{NAMESPACE}::{name}"
    torch.library.define(qualname, torch.library.infer_schema(run, mutates_args=()), lib=_LIB)
    torch.library.impl(qualname, "CompositeExplicitAutograd", run, lib=_LIB)
    torch.library.register_fake(qualname, lambda *args: fake(call_cls(*args)), lib=_LIB)
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def register_backward(op, call_cls: type, backward: Callable, *, save_outputs: bool = False) -> None:
    """Attach autograd to ``op``: ``backward(call, outputs, *grads) -> {field name: gradient}``.

    Tensor fields (and the outputs, when ``save_outputs``) go through ``ctx.save_for_backward``; the
    other fields ride along as plain values. ``outputs`` is None unless ``save_outputs``.
    """
    names = field_names(call_cls)
    tensors = _tensor_fields(call_cls)

    def setup_context(ctx, inputs, output):
        bound = dict(zip(names, inputs))
        outs = tuple(output) if isinstance(output, (tuple, list)) else (output,)
        ctx.save_for_backward(*(bound[n] for n in tensors), *(outs if save_outputs else ()))
        ctx.plain = {n: v for n, v in bound.items() if n not in tensors}

    def bwd(ctx, *grads):
        saved = ctx.saved_tensors
        call = call_cls(**dict(zip(tensors, saved)), **ctx.plain)
        outs = tuple(saved[len(tensors):]) if save_outputs else None
        got = backward(call, outs, *grads)
        unknown = set(got) - set(names)
        if unknown:  # a typo here would silently drop a gradient
            raise KeyError(f"{op}: backward returned gradients for unknown arguments {sorted(unknown)}")
        return tuple(got.get(n) for n in names)

    torch.library.register_autograd(op, bwd, setup_context=setup_context, lib=_LIB)
