"""Builds magi_kernels._C with CMake + ninja (see CMakeLists.txt).

Environment:
  MAGI_CUDA_ARCHS   CUDA architectures for the device kernels, in CMake's CUDA_ARCHITECTURES syntax
                    ("89" = SASS + PTX, "89-real" = SASS only, "120-virtual" = PTX only), or one of the
                    names "release" / "dev". Default: "release" for wheels and `pip install .`, "dev" for
                    editable installs (`pip install -e .`), which keeps the CI build short.
  MAGI_WITH_CUDA    "0" skips the CUDA kernels even when nvcc is found; "1" makes a missing nvcc an error.
  MAX_JOBS          parallel compile jobs (default: all cores).
  CMAKE_BUILD_TYPE  Release (default) or Debug.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


# SASS for every data-center and consumer generation from Ampere on (sm_80 A100, sm_86 RTX 30xx/A10/A40,
# sm_89 Ada L40/RTX 40xx, sm_90a Hopper H100/H200, sm_100 Blackwell B200/GB200 and, by binary compatibility
# within a major version, B300's sm_103, sm_120 consumer Blackwell RTX 50xx/RTX PRO and sm_121), plus PTX of
# the newest one so the driver can JIT the kernels for GPUs newer than this list. Plain sm_100/sm_120 rather
# than the "a" variants: the kernels use no arch-specific instructions there, and "a" SASS would not run on
# sm_103/sm_121. nvcc >= 12.8 is needed for sm_100/sm_120.
CUDA_ARCH_PRESETS = {
    "release": "80-real;86-real;89-real;90a-real;100-real;120",
    # editable source installs: A100, L40/RTX 40, H100/H200 (and PTX for newer GPUs) in about half the nvcc work
    "dev": "80;89;90a",
}
_ARCH_ENTRY = re.compile(r"^\d{2,3}[af]?(-real|-virtual)?$")


def cuda_archs_for(editable: bool) -> str:
    raw = os.environ.get("MAGI_CUDA_ARCHS", "").strip()
    if not raw:
        return CUDA_ARCH_PRESETS["dev" if editable else "release"]
    if raw in CUDA_ARCH_PRESETS:
        return CUDA_ARCH_PRESETS[raw]
    entries = [a.strip() for a in raw.replace(",", ";").split(";") if a.strip()]
    bad = [a for a in entries if not _ARCH_ENTRY.match(a)]
    if bad or not entries:
        raise ValueError(
            f"MAGI_CUDA_ARCHS={raw!r}: each entry must look like 89, 90a, 89-real or 120-virtual "
            f"(';'-separated), or be one of {sorted(CUDA_ARCH_PRESETS)}; bad entries: {bad}"
        )
    return ";".join(entries)


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _find_nvcc() -> str | None:
    for cand in (os.environ.get("CUDACXX"), shutil.which("nvcc")):
        if cand and Path(cand).exists():
            return cand
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    cand = Path(cuda_home) / "bin" / "nvcc"
    return str(cand) if cand.exists() else None


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)

        want_cuda = os.environ.get("MAGI_WITH_CUDA", "auto").lower()
        nvcc = None if want_cuda in ("0", "off", "false") else _find_nvcc()
        if want_cuda in ("1", "on", "true") and nvcc is None:
            raise RuntimeError("MAGI_WITH_CUDA=1 but nvcc was not found (set CUDACXX or CUDA_HOME)")
        # setuptools sets editable_mode for PEP 660 editable installs (pip install -e .)
        archs = cuda_archs_for(editable=bool(getattr(self, "editable_mode", False)))
        if nvcc:
            print(f"magi-kernels: building CUDA kernels with {nvcc} for {archs}", flush=True)
        elif want_cuda in ("0", "off", "false"):
            print("magi-kernels: MAGI_WITH_CUDA=0 -> building host C++ only (no CUDA kernels).", flush=True)
        else:
            print(
                "magi-kernels: nvcc not found -> building host C++ only (planner, SIMT emulator). "
                "The Triton and torch backends work as usual; the 'cuda' backend is unavailable. "
                "Set CUDA_HOME or CUDACXX and reinstall to build the CUDA kernels.",
                flush=True,
            )

        cfg = os.environ.get("CMAKE_BUILD_TYPE", "Release")
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DMAGI_WITH_CUDA={'ON' if nvcc else 'OFF'}",
            f"-DMAGI_CUDA_ARCHS={archs}",
        ]
        if nvcc:
            cmake_args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        if shutil.which("ninja") or _ninja_from_wheel():
            cmake_args += ["-G", "Ninja"]
            if _ninja_from_wheel():
                cmake_args.append(f"-DCMAKE_MAKE_PROGRAM={_ninja_from_wheel()}")
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)

        cmake = _cmake_exe()
        subprocess.run([cmake, str(ROOT), *cmake_args], cwd=build_temp, check=True)
        subprocess.run([cmake, "--build", ".", "--config", cfg, "-j", jobs], cwd=build_temp, check=True)


def _cmake_exe() -> str:
    try:
        import cmake  # the PyPI wheel, a build requirement

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        return shutil.which("cmake") or "cmake"


def _ninja_from_wheel() -> str | None:
    try:
        import ninja

        exe = Path(ninja.BIN_DIR) / "ninja"
        return str(exe) if exe.exists() else None
    except ImportError:
        return None


if __name__ == "__main__":  # setuptools' build backend runs this file as __main__; tests import it
    setup(ext_modules=[CMakeExtension("magi_kernels._C")], cmdclass={"build_ext": CMakeBuild})
