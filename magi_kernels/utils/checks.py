"""Argument validation shared by every op. Errors name the argument and the rule it broke."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class MagiArgumentError(ValueError):
    """Bad input to a magi_kernels op (subclass of ValueError)."""


def fail(op: str, arg: str, rule: str) -> None:
    raise MagiArgumentError(f"{op}: argument '{arg}' {rule}")


def check_tensor(op: str, arg: str, t, *, dtypes: Iterable[torch.dtype] | None = None,
                 ndim: int | Sequence[int] | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        fail(op, arg, f"must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            fail(op, arg, f"must have dtype in {[str(d).replace('torch.', '') for d in dtypes]}, got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            fail(op, arg, f"must have {' or '.join(map(str, allowed))} dims, got shape {tuple(t.shape)}")


def check_same_device(op: str, ref_arg: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            fail(op, name, f"must be on {ref_arg}'s device {ref.device}, got {t.device}")


def check_last_dim_contiguous(op: str, arg: str, t: torch.Tensor) -> None:
    if t.dim() and t.stride(-1) != 1:
        fail(op, arg, f"must have a contiguous last dim (stride 1), got strides {t.stride()}")


def check_choice(op: str, arg: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        fail(op, arg, f"must be one of {list(choices)}, got {value!r}")


def check_dtype_arg(op: str, arg: str, value, allowed: Iterable[torch.dtype] = FLOAT_DTYPES, *,
                    allow_none: bool = True) -> None:
    """A dtype-valued argument (e.g. ``out_dtype``): a ``torch.dtype`` from ``allowed`` (or None)."""
    allowed = tuple(allowed)
    if value is None and allow_none:
        return
    if not isinstance(value, torch.dtype) or value not in allowed:
        names = ", ".join(str(d) for d in allowed)
        fail(op, arg, f"must be a torch.dtype, one of ({names}){' or None' if allow_none else ''}; got {value!r}")


def check_number(op: str, arg: str, value, *, integer: bool = False, minimum=None, exclusive_min: bool = False):
    """A real scalar argument: int or float (int only if ``integer``), never bool, finite, >= / > ``minimum``."""
    import math

    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        fail(op, arg, f"must be {'an int' if integer else 'a number'}, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        fail(op, arg, f"must be finite, got {value!r}")
    if minimum is not None and (value <= minimum if exclusive_min else value < minimum):
        fail(op, arg, f"must be {'>' if exclusive_min else '>='} {minimum}, got {value!r}")


def rows_view(op: str, arg: str, t: torch.Tensor) -> torch.Tensor:
    """``[..., K]`` as a ``[M, K]`` view (no copy: kernels write through it), else an error naming ``arg``."""
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        fail(op, arg, f"must have leading dims that flatten to rows without a copy; got shape {list(t.shape)} "
                      f"strides {list(t.stride())}")
