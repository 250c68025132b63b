"""Access to the native extension ``magi_kernels._C``.

``_C`` is torch-ABI-free: launchers take raw pointers (``tensor.data_ptr()``) and the current CUDA stream
as an integer. It has three parts: ``_C.cuda`` (device kernels, only when built with nvcc), ``_C.simt``
(the same kernel sources compiled for the CPU under the SIMT emulator) and ``_C.host`` (planning code).
"""

from __future__ import annotations

import functools
from types import ModuleType


@functools.cache
def native() -> ModuleType | None:
    """The extension module, or None when the package was not built (e.g. a bare source checkout)."""
    try:
        from magi_kernels import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _C


def require_native(what: str) -> ModuleType:
    mod = native()
    if mod is None:
        raise RuntimeError(
            f"{what} needs the native extension magi_kernels._C, which is not built; "
            "install the package with `pip install -e .` (or `pip install .`)"
        )
    return mod


@functools.cache
def build_info() -> dict:
    mod = native()
    if mod is None:
        return {"native": False, "cuda": False, "cuda_archs": "", "nvcc_version": "", "simt": False}
    return {"native": True, **mod.build_info()}


def cuda_archs() -> tuple[int, ...]:
    """Compute capabilities (major*10+minor) with SASS in _C, e.g. (80, 89, 90)."""
    out = []
    for a in build_info()["cuda_archs"].replace(",", ";").split(";"):
        a = a.strip().split("-")[0].rstrip("af")
        if a.isdigit():
            out.append(int(a))
    return tuple(out)
