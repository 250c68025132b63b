"""Triton kernels. Each module exposes ``supports(args) -> reason | None`` and ``launch(args, *outs)``,
and registers its shipped configs with the AOT checker (``magi_kernels.kernels.triton.aot``)."""

from __future__ import annotations

import functools
import os


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    """True when Triton kernels in this process were decorated in interpreter mode (TRITON_INTERPRET=1)."""
    if not triton_available():
        return False
    from triton import knobs

    return bool(knobs.runtime.interpret) or os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_reason(device) -> str | None:
    """None if Triton kernels can run on ``device`` (op-specific rules live in each module's ``supports``)."""
    from magi_kernels.utils import device as _device

    if not triton_available():
        return "Triton is not installed"
    if device.type == "cpu":
        return None if triton_interpreting() else (
            "Triton on CPU tensors needs the interpreter: set TRITON_INTERPRET=1 before importing magi_kernels")
    if device.type != "cuda":
        return f"Triton kernels run on CUDA devices, not {device.type}"
    if triton_interpreting():
        return "TRITON_INTERPRET=1 is set, so Triton kernels run only on CPU tensors"
    cap = _device.capability(device)
    if cap is not None and cap < (8, 0):
        return f"Triton kernels need sm_80 or newer, device is sm_{cap[0]}{cap[1]}"
    return None
