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


def arch_targets() -> list[tuple[str, bool, bool]]:
    """(target, has SASS, has PTX) per architecture recorded at build time, e.g. ("90a", True, False).

    The record is CMake's CUDA_ARCHITECTURES list: "89" = SASS + PTX, "89-real" = SASS only,
    "120-virtual" = PTX only.
    """
    out = []
    for a in build_info()["cuda_archs"].replace(",", ";").split(";"):
        target, _, kind = a.strip().partition("-")
        if target:
            out.append((target, kind in ("", "real"), kind in ("", "virtual")))
    return out


def _arch_entries() -> list[tuple[int, bool, bool]]:
    """(cc, has SASS, has portable PTX). PTX of an arch-specific target ("90a", "100f") JIT-compiles only
    for that arch or family, so it does not count as portable."""
    out = []
    for target, sass, ptx in arch_targets():
        num = target.rstrip("af")
        if num.isdigit():
            out.append((int(num), sass, ptx and num == target))
    return out


def cuda_archs() -> tuple[int, ...]:
    """Compute capabilities (major*10+minor) with SASS in _C, e.g. (80, 89, 90)."""
    return tuple(cc for cc, sass, _ in _arch_entries() if sass)


def ptx_archs() -> tuple[int, ...]:
    """Compute capabilities with PTX in _C (the driver JIT-compiles it for that or any newer GPU)."""
    return tuple(cc for cc, _, ptx in _arch_entries() if ptx)


def kernel_image_for(cc: int) -> str | None:
    """Which code in _C a GPU of compute capability ``cc`` (e.g. 90) would run, or None if none can.

    SASS for sm_XY runs on sm_XZ with Z >= Y (same major); "a" SASS (e.g. 90a) runs only on its own
    capability, which the "Z >= Y" rule already gives for 90a since no sm_91 exists. PTX for
    compute_XY is JIT-compiled by the driver for any GPU of capability >= XY.
    """
    sass = [a for a in cuda_archs() if a // 10 == cc // 10 and a <= cc]
    if sass:
        return f"SASS sm_{max(sass)}"
    ptx = [a for a in ptx_archs() if a <= cc]
    if ptx:
        return f"PTX compute_{max(ptx)} (JIT-compiled by the driver on first use)"
    return None
