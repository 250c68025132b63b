"""AOT static check of every shipped Triton kernel config, on a machine without a GPU.

    python -m magi_kernels.tools.aot_check [--arch 90,89,80] [--kernel SUBSTR] [--json PATH] [--jobs N]

For every registered config (``magi_kernels.kernels.triton.aot.registered_configs()``) and every arch in
its ``archs`` (narrowed by ``--arch``), compile it with ``triton.compile(..., target=GPUTarget("cuda",
arch, 32))``, then read the cubin with the ``cuobjdump`` / ``nvdisasm`` bundled in the Triton wheel:

* it compiles;
* no register spills: 0 STL/LDL instructions and STACK 0 (both reported; either alone can hide one);
* shared memory (``kernel.metadata.shared``) fits the arch's per-block opt-in limit;
* the tensor-core class matches the config's ``mma``: None -> no tensor-core instruction at all,
  "f16" -> HGMMA on sm_90 / HMMA on sm_80-89, "fp8" -> QGMMA on sm_90 / QMMA on sm_89. A missing
  HGMMA on sm_90 is how a silent fallback from wgmma to mma.sync shows up.

Prints a table and exits 1 if any row fails. Needs real (non-interpreted) JIT functions, so it must run
with TRITON_INTERPRET unset; the command line re-executes itself without it. The Python API
(:func:`check_config`, :func:`run_checks`) is what tests use on configs that are not registered.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Iterable, Sequence

# Triton 3.9 warns once per process when this is unset; the shipped behaviour (fusion on) is what we check.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from magi_kernels.kernels.triton.aot import AotConfig, registered_configs, resolve_kernel  # noqa: E402

# Per-block shared memory a kernel may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SMEM_LIMIT = {90: 232448, 89: 101376, 80: 166912}
DEFAULT_ARCHS = (90, 89, 80)
TENSOR_CORE_OPS = ("HGMMA", "QGMMA", "HMMA", "QMMA", "IMMA")
SPILL_OPS = ("STL", "LDL")
# (mma class, arch) -> the SASS opcode that must be present.
EXPECTED_MMA = {("f16", 90): "HGMMA", ("f16", 89): "HMMA", ("f16", 80): "HMMA",
                ("fp8", 90): "QGMMA", ("fp8", 89): "QMMA"}

# One SASS instruction in `nvdisasm -c` output: "/*0a30*/  @!P0 HGMMA.64x64x16.F32.BF16 gdesc[UR4], ... ;"
_INSTR = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[0-9T]+\s+)?([A-Z][A-Z0-9_]*)", re.MULTILINE)
_RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


@dataclasses.dataclass
class CheckResult:
    kernel: str
    config: str
    arch: int
    mma: str | None
    regs: int | None = None
    stack: int | None = None
    local: int | None = None
    stl: int | None = None
    ldl: int | None = None
    smem: int | None = None
    mma_ops: dict[str, int] = dataclasses.field(default_factory=dict)  # tensor-core opcode -> count
    compile_s: float = 0.0
    failures: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def mma_found(self) -> str:
        return ", ".join(f"{op} x{n}" for op, n in sorted(self.mma_ops.items())) or "-"

    @property
    def verdict(self) -> str:
        return "ok" if self.ok else "FAIL: " + "; ".join(self.failures)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(ok=self.ok, verdict=self.verdict, mma_found=self.mma_found)
        return d


def _tool(name: str) -> str:
    """Path of a CUDA binary shipped in the Triton wheel (knobs honour TRITON_<NAME>_PATH overrides)."""
    from triton import knobs

    path = getattr(knobs.nvidia, name).path
    if not path or not os.path.exists(path):
        raise RuntimeError(f"aot_check: {name} not found (looked for {path!r}); it ships in the Triton wheel "
                           f"under triton/backends/nvidia/bin")
    return path


def _require_compiled_mode() -> None:
    from magi_kernels.kernels.triton import triton_interpreting

    if triton_interpreting():
        raise RuntimeError("aot_check: TRITON_INTERPRET is set in this process, so @triton.jit functions are "
                           "interpreter objects that cannot be compiled; run the checker in a process without "
                           "TRITON_INTERPRET (the command line re-executes itself without it)")


def sass_counts(cubin: bytes) -> tuple[dict[str, int], dict[str, int]]:
    """(resource usage {REG, STACK, SHARED, LOCAL}, opcode -> count) of a cubin, via cuobjdump and nvdisasm."""
    with tempfile.TemporaryDirectory(prefix="magi_aot_") as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
    m = _RESOURCE.search(usage)
    if m is None:
        raise RuntimeError(f"aot_check: cannot parse cuobjdump resource usage:\n{usage}")
    resources = dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, m.groups())))
    return resources, dict(collections.Counter(_INSTR.findall(sass)))


def check_config(cfg: AotConfig, arch: int) -> CheckResult:
    """Compile one config for sm_<arch> and apply every check (in this process)."""
    res = CheckResult(kernel=cfg.name, config=cfg.config, arch=arch, mma=cfg.mma)
    if arch not in SMEM_LIMIT:
        res.failures.append(f"unknown arch sm_{arch} (known: {sorted(SMEM_LIMIT)})")
        return res
    _require_compiled_mode()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    try:
        fn = resolve_kernel(cfg)
        if not isinstance(fn, triton.runtime.jit.JITFunction):
            raise TypeError(f"{cfg.kernel} is a {type(fn).__name__}, not a @triton.jit function"
                            + (" (TRITON_INTERPRET was set when it was imported)"
                               if type(fn).__name__ == "InterpretedFunction" else ""))
        kernel = triton.compile(ASTSource(fn=fn, signature=dict(cfg.signature), constexprs=dict(cfg.constexprs),
                                          attrs=cfg.attrs()),
                                target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        resources, ops = sass_counts(kernel.asm["cubin"])
    except Exception as e:  # a failed compile is a result to report, not a crash of the whole sweep
        # Triton's CompilationError starts with "at L:C:" and the source; the cause is the last line.
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        where = lines[0] if lines and lines[0].startswith("at ") else ""
        res.failures.append(f"compile error ({type(e).__name__} {where}): {lines[-1] if lines else ''}"[:400])
        res.compile_s = time.perf_counter() - t0
        return res
    res.compile_s = time.perf_counter() - t0

    res.regs, res.stack, res.local = resources["REG"], resources["STACK"], resources["LOCAL"]
    res.stl, res.ldl = ops.get("STL", 0), ops.get("LDL", 0)
    res.smem = int(kernel.metadata.shared)
    res.mma_ops = {op: ops[op] for op in TENSOR_CORE_OPS if ops.get(op)}

    if res.stl or res.ldl:
        res.failures.append(f"register spills: {res.stl} STL / {res.ldl} LDL")
    if res.stack:
        res.failures.append(f"stack frame of {res.stack} B (local memory)")
    if res.smem > SMEM_LIMIT[arch]:
        res.failures.append(f"shared memory {res.smem} B > sm_{arch} limit {SMEM_LIMIT[arch]} B")
    if cfg.mma is None:
        if res.mma_ops:
            res.failures.append(f"declared mma=None but found tensor-core ops {res.mma_found}")
    else:
        want = EXPECTED_MMA.get((cfg.mma, arch))
        if want is None:
            res.failures.append(f"no tensor-core class for mma={cfg.mma!r} on sm_{arch}")
        elif not res.mma_ops.get(want):
            res.failures.append(f"declared mma={cfg.mma!r}: expected {want} on sm_{arch}, found {res.mma_found}")
    return res


def _check_star(job: tuple[AotConfig, int]) -> CheckResult:
    return check_config(*job)


def jobs_for(configs: Iterable[AotConfig], archs: Sequence[int] | None = None) -> list[tuple[AotConfig, int]]:
    """(config, arch) pairs: each config's archs, narrowed to ``archs`` when given."""
    return [(c, a) for c in configs for a in c.archs if archs is None or a in archs]


def run_checks(configs: Iterable[AotConfig], archs: Sequence[int] | None = None, jobs: int = 2) -> list[CheckResult]:
    """Check every (config, arch) pair; compiles run in a pool of ``jobs`` processes (1 = in this process)."""
    _require_compiled_mode()
    work = jobs_for(configs, archs)
    if jobs <= 1 or len(work) <= 1:
        return [check_config(c, a) for c, a in work]
    # fork keeps start-up cheap (no re-import of torch/triton per worker); spawn where fork is unavailable.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context(method)) as ex:
        return list(ex.map(_check_star, work, chunksize=1))


def _print_table(results: Sequence[CheckResult], wall_s: float) -> None:
    failed = [r for r in results if not r.ok]
    cols = ("kernel", "config", "arch", "regs", "spills (STL/LDL)", "stack", "smem", "MMA found", "verdict")
    # The verdict column says ok/FAIL; the reasons are listed under the table, where they have room.
    rows = [(r.kernel, r.config, f"sm_{r.arch}", "-" if r.regs is None else str(r.regs),
             "-" if r.stl is None else f"{r.stl}/{r.ldl}", "-" if r.stack is None else str(r.stack),
             "-" if r.smem is None else str(r.smem), r.mma_found, "ok" if r.ok else "FAIL") for r in results]
    details = [f"FAIL {r.kernel}[{r.config}] sm_{r.arch}: {'; '.join(r.failures)}" for r in failed]
    summary = (f"{len(results)} checks, {len(failed)} failed; max regs "
               f"{max((r.regs or 0) for r in results) if results else 0}; wall {wall_s:.1f} s")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is a declared dependency, but a plain table beats a crash
        widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
        print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
        for row in rows:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
        print("\n".join(details))
        print(summary)
        return
    console = Console(width=max(120, shutil.get_terminal_size((160, 24)).columns))
    table = Table(title="Triton AOT static check", show_lines=False)
    for c in cols:
        table.add_column(c, overflow="fold", justify="right" if c in ("regs", "stack", "smem") else "left")
    for r, row in zip(results, rows):
        table.add_row(*row, style=None if r.ok else "bold red")
    console.print(table)
    for line in details:
        console.print(line, style="red", markup=False, highlight=False)
    console.print(summary, style="bold red" if failed else "bold green")


def _parse_archs(text: str) -> tuple[int, ...]:
    try:
        archs = tuple(int(a.strip().removeprefix("sm_")) for a in text.split(",") if a.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--arch must be a comma list of compute capabilities like 90,89,80, "
                                         f"got {text!r}") from None
    bad = [a for a in archs if a not in SMEM_LIMIT]
    if bad or not archs:
        raise argparse.ArgumentTypeError(f"--arch values must be among {sorted(SMEM_LIMIT)}, got {text!r}")
    return archs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m magi_kernels.tools.aot_check", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=_parse_archs, default=DEFAULT_ARCHS,
                        help="comma-separated compute capabilities to check (default: 90,89,80)")
    parser.add_argument("--kernel", default=None, help="only configs whose name or config label contains SUBSTR")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile processes (default: 2)")
    opts = parser.parse_args(argv)
    if opts.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {opts.jobs}")

    _require_compiled_mode()
    configs = [c for c in registered_configs() if opts.kernel is None or opts.kernel in c.key]
    if not configs:
        print(f"aot_check: no registered config matches --kernel {opts.kernel!r}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    results = run_checks(configs, opts.arch, opts.jobs)
    wall = time.perf_counter() - t0
    _print_table(results, wall)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"wall_s": wall, "archs": list(opts.arch), "ok": all(r.ok for r in results),
                       "results": [r.to_json() for r in results]}, f, indent=1)
    return 0 if results and all(r.ok for r in results) else 1


def _reexec_without_interpreter() -> None:
    """TRITON_INTERPRET turns every @triton.jit into an interpreter object at import; restart without it."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        print("aot_check: TRITON_INTERPRET is set; re-running without it", file=sys.stderr)
        os.execve(sys.executable, [sys.executable, "-m", "magi_kernels.tools.aot_check", *sys.argv[1:]], env)


if __name__ == "__main__":
    _reexec_without_interpreter()
    sys.exit(main())
