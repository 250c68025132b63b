"""Triton kernels. Each module exposes ``supports(info) -> reason | None`` and ``launch(args, *outs)``,
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
