"""Environment report for bug reports: versions, how ``_C`` was built, and which backends each op can use here.

    python -m magi_kernels.tools.info           # human-readable
    python -m magi_kernels.tools.info --json    # the same facts as one JSON object

The CUDA architectures in ``_C`` are read from the binary with ``cuobjdump`` (the copy shipped in the Triton
wheel, else one on PATH or in CUDA_HOME); without cuobjdump the list recorded at build time is shown and
labelled as such. Backend availability comes from the registry's device rules for this machine's device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path


def find_cuobjdump() -> str | None:
    """cuobjdump from the Triton wheel (so no CUDA toolkit is needed), else from PATH or CUDA_HOME."""
    try:
        import triton

        cand = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    except ImportError:
        pass
    cand = shutil.which("cuobjdump")
    if cand:
        return cand
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    cand = Path(cuda_home) / "bin" / "cuobjdump"
    return str(cand) if cand.is_file() else None


def _listing(cuobjdump: str, flag: str, path: str) -> list[str]:
    r = subprocess.run([cuobjdump, flag, path], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        # cuobjdump exits non-zero on a file without device code; that is an empty list, not an error.
        if "does not contain" in (r.stdout + r.stderr):
            return []
        raise RuntimeError(f"{cuobjdump} {flag} {path} failed: {(r.stderr or r.stdout).strip()}")
    # lines look like "ELF file    1: _C.1.sm_90a.cubin" / "PTX file    1: _C.1.sm_120.ptx"
    return sorted({m.group(1) for m in re.finditer(r"\.(sm_\d+[af]?)\.(?:cubin|ptx)", r.stdout)},
                  key=lambda a: (int(re.sub(r"\D", "", a)), a))


def device_code_in(path: str, cuobjdump: str | None = None) -> dict | None:
    """{"sass": ["sm_80", ...], "ptx": ["sm_120"]} read from the binary, or None without cuobjdump."""
    cuobjdump = cuobjdump or find_cuobjdump()
    if cuobjdump is None:
        return None
    return {"sass": _listing(cuobjdump, "--list-elf", path), "ptx": _listing(cuobjdump, "--list-ptx", path),
            "cuobjdump": cuobjdump}


def _arch_numbers(names: list[str]) -> list[str]:
    return sorted(re.sub(r"[af]$", "", n) for n in names)


def _gpu() -> dict | None:
    import torch

    if not torch.cuda.is_available():
        return None
    from magi_kernels import _ext

    p = torch.cuda.get_device_properties(0)
    image = _ext.kernel_image_for(p.major * 10 + p.minor) if _ext.build_info()["cuda"] else None
    return {"name": p.name, "capability": f"sm_{p.major}{p.minor}", "count": torch.cuda.device_count(),
            "memory_gib": round(p.total_memory / 2**30, 1), "runs_from_C": image or "nothing (no matching code)"}


def _backends(device) -> dict:
    """{op: {backend: "ok" | reason}}: ``registry.device_reason`` for each backend the op implements.

    These are the device-level rules (build, arch, interpreter); each op adds per-call limits (dtype,
    head_dim, ...) on top, which ``registry.why_not(op, backend, args)`` reports for a concrete call.
    """
    from magi_kernels import registry

    registry._load_impls()
    out: dict[str, dict] = {}
    for op in registry.ops():
        row = {}
        for backend in registry.implementations(op):
            reason = registry.device_reason(backend, device)
            row[backend] = "ok" if reason is None else reason
        out[op] = row
    return out


def collect() -> dict:
    import torch

    import magi_kernels
    from magi_kernels import _ext

    bi = dict(_ext.build_info())
    mod = _ext.native()
    c_path = getattr(mod, "__file__", None) if mod is not None else None
    code = None
    if c_path and bi.get("cuda"):
        try:
            code = device_code_in(c_path)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            code = {"error": str(e)}
        if code is not None and "error" not in code:
            # What the build recorded, in cuobjdump's names; a mismatch means a mixed-up or stale _C.
            targets = _ext.arch_targets()
            code["recorded_sass"] = sorted(f"sm_{t}" for t, sass, _ in targets if sass)
            code["recorded_ptx"] = sorted(f"sm_{t}" for t, _, ptx in targets if ptx)
            # compared without the "a"/"f" suffix: older cuobjdumps name a sm_90a cubin "sm_90"
            code["matches_build"] = (_arch_numbers(code["sass"]) == _arch_numbers(code["recorded_sass"])
                                     and _arch_numbers(code["ptx"]) == _arch_numbers(code["recorded_ptx"]))
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {
        "magi_kernels": magi_kernels.__version__,
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "gpu": _gpu(),
        "_C": {"path": c_path, **bi},
        "_C_device_code": code,
        "backends_on": str(device),
        "backends": _backends(device),
    }


def render(r: dict) -> str:
    c = r["_C"]
    lines = [
        f"magi-kernels {r['magi_kernels']}",
        f"python       {r['python']}",
        f"platform     {r['platform']}",
        f"torch        {r['torch']} (CUDA {r['torch_cuda'] or 'none: CPU build'})",
        f"triton       {r['triton'] or 'not installed'}{' (TRITON_INTERPRET=1)' if r['triton_interpret'] else ''}",
        "gpu          " + (f"{r['gpu']['name']} ({r['gpu']['capability']}, {r['gpu']['memory_gib']} GiB, "
                           f"{r['gpu']['count']} device(s)); from _C it runs {r['gpu']['runs_from_C']}"
                           if r["gpu"] else "none"),
    ]
    if not c["native"]:
        lines.append("_C           NOT built (source checkout without `pip install`): torch backend only")
    else:
        lines.append(f"_C           {c['path']}")
        lines.append(f"  built with {c.get('cxx_compiler', '?')}, CMake {c.get('cmake_version', '?')}, "
                     f"{c.get('build_type', '?')}, for Python {c.get('python_version', '?')}")
        if c["cuda"]:
            lines.append(f"  CUDA       nvcc {c['nvcc_version']}, cudart {c.get('cudart', '?')}; "
                         f"archs requested at build: {c['cuda_archs']}")
            code = r["_C_device_code"]
            if code is None:
                lines.append("  in _C      (no cuobjdump found: showing only the recorded list above)")
            elif "error" in code:
                lines.append(f"  in _C      cuobjdump failed: {code['error']}")
            else:
                ptx = [a.replace("sm_", "compute_") for a in code["ptx"]]
                lines.append(f"  in _C      SASS {', '.join(code['sass']) or 'none'}; PTX {', '.join(ptx) or 'none'}"
                             f" (read with {code['cuobjdump']})")
                if not code["matches_build"]:
                    lines.append("  WARNING    the device code in _C differs from what the build recorded: reinstall")
        else:
            lines.append("  CUDA       none: built without nvcc (the 'cuda' backend runs only in the SIMT emulator "
                         "on CPU tensors)")
    auto = ("auto-selection uses torch on CPU tensors; on request 'triton' runs in the Triton interpreter and "
            "'cuda' in the SIMT emulator, for testing" if r["backends_on"] == "cpu"
            else "auto-selection tries them in each op's preference order")
    lines.append(f"backends on {r['backends_on']} (device rules; ops add per-call limits; {auto}):")
    for op, row in r["backends"].items():
        lines.append(f"  {op}")
        for backend, verdict in row.items():
            lines.append(f"    {backend:<10} {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m magi_kernels.tools.info", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = ap.parse_args(argv)
    report = collect()
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
