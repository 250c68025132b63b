"""Static resource check of the CUDA kernels: registers, spills, stack and shared memory per kernel.

Compiles every ``csrc/cuda/*.cu`` with ``nvcc -cubin -arch=<arch> -Xptxas -v`` (no GPU needed) and parses
ptxas' report for each kernel instantiation. Exits 1 if any kernel spills registers, uses more than 255
registers or more static shared memory than a block may have; 2 if a file fails to compile; 0 otherwise,
including when nvcc is absent (then nothing is checked, and it says so).

    python -m magi_kernels.tools.ptxas_check               # sm_89 and sm_90a, rich table
    python -m magi_kernels.tools.ptxas_check --json        # machine-readable
    python -m magi_kernels.tools.ptxas_check --arch sm_80 --arch sm_90a
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ARCHS = ("sm_89", "sm_90a")
MAX_REGISTERS = 255
# Static __shared__ per block is capped at 48 KiB on every arch; more needs dynamic smem + opt-in.
MAX_STATIC_SMEM = 48 * 1024


@dataclasses.dataclass
class KernelUsage:
    file: str
    arch: str
    mangled: str
    kernel: str = ""
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    smem: int = 0
    barriers: int = 0

    def problems(self) -> list[str]:
        out = []
        if self.spill_stores or self.spill_loads:
            out.append(f"spills ({self.spill_stores} B stored, {self.spill_loads} B loaded)")
        if self.registers > MAX_REGISTERS:
            out.append(f"{self.registers} registers > {MAX_REGISTERS}")
        if self.smem > MAX_STATIC_SMEM:
            out.append(f"{self.smem} B static smem > {MAX_STATIC_SMEM}")
        return out


def find_nvcc() -> str | None:
    for cand in (os.environ.get("CUDACXX"), shutil.which("nvcc")):
        if cand and Path(cand).exists():
            return cand
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    cand = Path(home) / "bin" / "nvcc"
    return str(cand) if cand.exists() else None


def sources(root: Path = ROOT) -> list[Path]:
    return sorted((root / "csrc" / "cuda").glob("*.cu"))


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_BARS = re.compile(r"used (\d+) barriers")


def parse_ptxas(text: str, file: str, arch: str) -> list[KernelUsage]:
    """Parse ``-Xptxas -v`` output into one record per kernel (entry function)."""
    kernels: dict[str, KernelUsage] = {}
    current: KernelUsage | None = None
    props_for: str | None = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = kernels.setdefault(m.group(1), KernelUsage(file, arch, m.group(1)))
            continue
        if m := _PROPS.search(line):
            props_for = m.group(1)
            continue
        if (m := _FRAME.search(line)) and props_for in kernels:
            k = kernels[props_for]
            k.stack, k.spill_stores, k.spill_loads = (int(g) for g in m.groups())
            continue
        if current is not None and (m := _USED.search(line)):
            current.registers = int(m.group(1))
            if s := _SMEM.search(line):
                current.smem = int(s.group(1))
            if b := _BARS.search(line):
                current.barriers = int(b.group(1))
    return list(kernels.values())


def _demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt") or shutil.which("cu++filt")
    if not filt or not names:
        return {n: n for n in names}
    res = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
    out = res.stdout.splitlines()
    if res.returncode != 0 or len(out) != len(names):
        return {n: n for n in names}
    # Shorten: drop the backend namespace and the (always identical) parameter list.
    short = [re.sub(r"\(.*\)$", "", o).replace("magi::cuda_backend::", "").removeprefix("void ") for o in out]
    return dict(zip(names, short))


def compile_one(nvcc: str, src: Path, arch: str, root: Path = ROOT) -> tuple[list[KernelUsage], str | None]:
    """(kernels, error text or None) for one .cu file and one arch."""
    with tempfile.TemporaryDirectory(prefix="magi_ptxas_") as tmp:
        cmd = [nvcc, "-std=c++17", "-O3", "-cubin", f"-arch={arch}", "-Xptxas", "-v",
               "-I", str(root / "csrc" / "include"), "-I", str(root / "csrc"),
               "-o", str(Path(tmp) / "out.cubin"), str(src)]
        res = subprocess.run(cmd, capture_output=True, text=True)
    text = res.stdout + res.stderr
    rel = str(src.relative_to(root)) if src.is_relative_to(root) else str(src)
    if res.returncode != 0:
        return [], f"{rel} ({arch}): nvcc failed:\n{text[-4000:]}"
    return parse_ptxas(text, rel, arch), None


def run(archs=DEFAULT_ARCHS, root: Path = ROOT, jobs: int = 1) -> dict:
    """Check every kernel; returns {"nvcc", "checked", "kernels": [...], "errors": [...], "problems": [...]}."""
    nvcc = find_nvcc()
    if nvcc is None:
        return {"nvcc": None, "checked": False, "reason": "nvcc not found (set CUDA_HOME or CUDACXX)",
                "kernels": [], "errors": [], "problems": []}
    srcs = sources(root)
    if not srcs:
        return {"nvcc": nvcc, "checked": False, "reason": f"no CUDA sources under {root / 'csrc' / 'cuda'}",
                "kernels": [], "errors": [], "problems": []}
    tasks = [(s, a) for s in srcs for a in archs]
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = list(pool.map(lambda t: compile_one(nvcc, t[0], t[1], root), tasks))
    kernels = [k for ks, _ in results for k in ks]
    names = _demangle(sorted({k.mangled for k in kernels}))
    for k in kernels:
        k.kernel = names.get(k.mangled, k.mangled)
    problems = [f"{k.arch} {k.kernel}: {p}" for k in kernels for p in k.problems()]
    return {"nvcc": nvcc, "checked": True, "archs": list(archs), "kernels": [dataclasses.asdict(k) for k in kernels],
            "errors": [e for _, e in results if e], "problems": problems}


def _print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # piped (CI logs): do not squeeze kernel names into 80 columns
    table = Table(title=f"ptxas resource usage ({', '.join(report['archs'])})")
    for col in ("arch", "kernel", "regs", "spill st (B)", "spill ld (B)", "stack (B)", "smem (B)"):
        table.add_column(col, justify="left" if col in ("arch", "kernel") else "right")
    for k in sorted(report["kernels"], key=lambda k: (k["kernel"], k["arch"])):
        bad = k["spill_stores"] or k["spill_loads"]
        style = "red" if bad or k["registers"] > MAX_REGISTERS or k["smem"] > MAX_STATIC_SMEM else None
        table.add_row(k["arch"], k["kernel"], str(k["registers"]), str(k["spill_stores"]), str(k["spill_loads"]),
                      str(k["stack"]), str(k["smem"]), style=style)
    console.print(table)
    for e in report["errors"]:
        console.print(f"[red]error:[/red] {e}")
    for p in report["problems"]:
        console.print(f"[red]problem:[/red] {p}")
    n = len(report["kernels"])
    if not report["errors"] and not report["problems"]:
        console.print(f"[green]{n} kernel instantiations checked: no spills, registers <= {MAX_REGISTERS}, "
                      f"static smem <= {MAX_STATIC_SMEM} B[/green]")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m magi_kernels.tools.ptxas_check", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", action="append", help="target, e.g. sm_89 (repeatable; default sm_89 and sm_90a)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--jobs", type=int, default=1, help="parallel nvcc processes (default 1)")
    args = ap.parse_args(argv)
    report = run(tuple(args.arch or DEFAULT_ARCHS), jobs=args.jobs)
    if not report["checked"]:
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print(f"ptxas_check: nothing checked: {report['reason']}")
        return 0
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)
    if report["errors"]:
        return 2
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
