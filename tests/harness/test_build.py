"""The installed extension: what it reports about itself matches what is inside it."""

import os
import subprocess
from pathlib import Path

import pytest

from magi_kernels import _ext


def _cuobjdump() -> Path | None:
    try:
        import triton
    except ImportError:
        return None
    exe = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return exe if exe.exists() else None


def test_extension_is_built_with_the_simt_emulator():
    info = _ext.build_info()
    assert info["native"], "magi_kernels._C is missing: install with `pip install -e .`"
    assert info["simt"]


def test_cuda_build_embeds_sass_for_every_requested_arch():
    info = _ext.build_info()
    if not info["cuda"]:
        pytest.skip("this _C was built without nvcc (no CUDA objects to inspect)")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump (shipped in the Triton wheel) is not available")
    so = _ext.native().__file__
    listing = subprocess.run([str(tool), "--list-elf", so], capture_output=True, text=True, check=True).stdout
    # CMake's CUDA_ARCHITECTURES syntax: "89" = SASS + PTX, "89-real" = SASS only, "120-virtual" = PTX only.
    requested = [target for target, sass, _ in _ext.arch_targets() if sass]
    assert requested, info
    for arch in requested:
        assert f".sm_{arch}.cubin" in listing, f"no SASS for sm_{arch} in {os.path.basename(so)}:\n{listing}"
