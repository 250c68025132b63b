"""AOT static check of every shipped Triton kernel config, on a machine without a GPU.

    python -m magi_kernels.tools.aot_check [--arch 90,89,80] [--kernel SUBSTR] [--json PATH] [--jobs N]
                                           [--anchors DIR]

For every registered config (``magi_kernels.kernels.triton.aot.registered_configs()``) and every arch in
its ``archs`` (narrowed by ``--arch``), compile it with ``triton.compile(..., target=GPUTarget("cuda",
arch, 32))``, then read the cubin with the ``cuobjdump`` / ``nvdisasm`` bundled in the Triton wheel:

* it compiles;
* no register spills: 0 STL/LDL instructions and STACK 0 (both reported; either alone can hide one);
* shared memory (``kernel.metadata.shared``) fits the arch's per-block opt-in limit;
* the tensor-core class matches the config's ``mma``: None -> no tensor-core instruction at all,
  "f16" -> HGMMA on sm_90 / HMMA on sm_80-89, "fp8" -> QGMMA on sm_90 / QMMA on sm_89. A missing
  HGMMA on sm_90 is how a silent fallback from wgmma to mma.sync shows up.

and reports the structure of each config's hot loop (:mod:`magi_kernels.tools.sass`: MMA instructions and
issued instructions per iteration, load kind, CTA barriers, pipeline buffers, wgmma wait depth, warp
specialization). With ``--anchors DIR`` (or ``MAGI_ANCHORS_DIR``) it also compiles the ``@triton.jit``
functions of Triton's tutorials 03 (matmul), 06 (fused attention) and 09 (persistent matmul) found in DIR, in
the same run, at the matching tile sizes and with the divisibility specialization the JIT applies to their
launches, and reports each config's ratio: its issued instructions per MMA FLOP over the matching anchor's
(ours / anchor's; below 1 is leaner). Only the tutorials' jitted functions are loaded; their module code
(driver queries, tests, benchmarks) never runs.

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
from magi_kernels.tools.sass import MMA_OPS, LoopStats, hot_loop_stats  # noqa: E402

# Per-block shared memory a kernel may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SMEM_LIMIT = {90: 232448, 89: 101376, 80: 166912}
DEFAULT_ARCHS = (90, 89, 80)
TENSOR_CORE_OPS = MMA_OPS
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
    loop: LoopStats | None = None  # the hot loop's structure (None: no loop with tensor-core instructions)
    anchor: str | None = None  # key of the matching tutorial kernel (see ANCHORS), if there is one
    ratio: float | None = None  # issued instructions per MMA FLOP, ours / the anchor's (filled by the caller)
    loop_error: str | None = None  # why the hot loop could not be analysed

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
        if self.loop is not None:
            d["loop"]["issued_per_kflop"] = self.loop.issued_per_kflop
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


def disassemble(cubin: bytes) -> tuple[dict[str, int], str]:
    """(resource usage {REG, STACK, SHARED, LOCAL}, ``nvdisasm -c`` text) of a cubin."""
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
    return dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, m.groups()))), sass


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
        resources, sass = disassemble(kernel.asm["cubin"])
        ops = dict(collections.Counter(_INSTR.findall(sass)))
    except Exception as e:  # a failed compile is a result to report, not a crash of the whole sweep
        # Triton's CompilationError starts with "at L:C:" and the source; the cause is the last line.
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        where = lines[0] if lines and lines[0].startswith("at ") else ""
        res.failures.append(f"compile error ({type(e).__name__} {where}): {lines[-1] if lines else ''}"[:400])
        res.compile_s = time.perf_counter() - t0
        return res
    res.compile_s = time.perf_counter() - t0
    res.anchor = anchor_for(cfg, arch)
    try:  # the structure report is informational: a SASS form the parser does not know is noted, not a failure
        res.loop = hot_loop_stats(sass, kernel.asm["ttgir"])
    except ValueError as e:
        res.loop_error = str(e)

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


# --------------------------------------------------------------------------------------------------
# Anchors: Triton's own tutorial kernels, compiled in the same run as ours for a like-for-like ratio.

ANCHOR_ENV = "MAGI_ANCHORS_DIR"
ANCHOR_FILES = {"matmul": "03-matrix-multiplication.py", "attention": "06-fused-attention.py",
                "persistent": "09-persistent-matmul.py"}
NUM_SMS_H100 = 132  # tutorial 09 takes the SM count as a constexpr; an H100 SXM's


@dataclasses.dataclass(frozen=True)
class AnchorSpec:
    """One tutorial kernel at one specialization: what ``triton.compile`` needs, all hashable."""

    file: str  # key of ANCHOR_FILES
    function: str
    label: str
    arch: int
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, object], ...]
    divisible: tuple[str, ...]  # runtime args the JIT would see as 16-byte aligned / multiples of 16
    num_warps: int
    num_stages: int

    @property
    def key(self) -> str:
        return f"{self.label} sm_{self.arch}"


def _attention_anchor(arch: int, head_dim: int, num_warps: int, num_stages: int) -> AnchorSpec:
    """06-fused-attention's forward, non-causal (STAGE=1), fp16, the way its launcher calls it: on sm_90
    warp-specialized at 128x128 (device-side TMA descriptors, 4 warps, 3 stages); elsewhere 128x64 at our
    config's warps and stages."""
    ws = arch == 90
    bm, bn = (128, min(128, head_dim)) if ws else (128, 64)  # 06 asserts BLOCK_N <= HEAD_DIM
    warps, stages = (4, 3) if ws else (num_warps, num_stages)
    sig = (("sm_scale", "fp32"), ("M", "*fp32"), ("Z", "i32"), ("H", "i32"), ("desc_q", "*fp16"),
           ("desc_k", "*fp16"), ("desc_v", "*fp16"), ("desc_o", "*fp16"), ("N_CTX", "i32"))
    consts = (("HEAD_DIM", head_dim), ("BLOCK_M", bm), ("BLOCK_N", bn), ("FP8_OUTPUT", False), ("STAGE", 1),
              ("warp_specialize", ws), ("IS_HOPPER", arch == 90))
    return AnchorSpec("attention", "_attn_fwd", f"06 attn_fwd D={head_dim} {bm}x{bn}{' ws' if ws else ''} "
                      f"w{warps} s{stages}", arch, sig + tuple((n, "constexpr") for n, _ in consts), consts,
                      ("M", "desc_q", "desc_k", "desc_v", "desc_o", "N_CTX"), warps, stages)


def _gemm_anchor(arch: int, bm: int, bn: int, bk: int, num_warps: int, num_stages: int) -> AnchorSpec:
    """fp8 e4m3 GEMM at our tile: on sm_90 tutorial 09's persistent warp-specialized kernel with device-side
    TMA descriptors (FLATTEN off, as its launcher sets it on Hopper); elsewhere tutorial 03's matmul with B
    K-major (unit strides are specialized to constants, as the JIT does for arguments equal to 1)."""
    if arch == 90:
        sig = (("a_ptr", "*fp8e4nv"), ("b_ptr", "*fp8e4nv"), ("c_ptr", "*fp8e4nv"), ("M", "i32"), ("N", "i32"),
               ("K", "i32"))
        consts = (("BLOCK_SIZE_M", bm), ("BLOCK_SIZE_N", bn), ("BLOCK_SIZE_K", bk), ("GROUP_SIZE_M", 8),
                  ("EPILOGUE_SUBTILE", False), ("NUM_SMS", NUM_SMS_H100), ("WARP_SPECIALIZE", True),
                  ("FLATTEN", False))
        return AnchorSpec("persistent", "matmul_kernel_descriptor_persistent",
                          f"09 persistent ws fp8 {bm}x{bn}x{bk} w{num_warps} s{num_stages}", arch,
                          sig + tuple((n, "constexpr") for n, _ in consts), consts,
                          ("a_ptr", "b_ptr", "c_ptr", "M", "N", "K"), num_warps, num_stages)
    runtime = (("a_ptr", "*fp8e4nv"), ("b_ptr", "*fp8e4nv"), ("c_ptr", "*fp16"), ("M", "i32"), ("N", "i32"),
               ("K", "i32"), ("stride_am", "i32"), ("stride_ak", "constexpr"), ("stride_bk", "constexpr"),
               ("stride_bn", "i32"), ("stride_cm", "i32"), ("stride_cn", "constexpr"))
    consts = (("stride_ak", 1), ("stride_bk", 1), ("stride_cn", 1), ("BLOCK_SIZE_M", bm), ("BLOCK_SIZE_N", bn),
              ("BLOCK_SIZE_K", bk), ("GROUP_SIZE_M", 8), ("ACTIVATION", ""))
    return AnchorSpec("matmul", "matmul_kernel", f"03 matmul fp8 {bm}x{bn}x{bk} w{num_warps} s{num_stages}", arch,
                      runtime + tuple((n, "constexpr") for n, _ in consts[3:]), consts,
                      ("a_ptr", "b_ptr", "c_ptr", "M", "N", "K", "stride_am", "stride_bn", "stride_cm"),
                      num_warps, num_stages)


def anchor_spec(cfg: AotConfig, arch: int) -> AnchorSpec | None:
    """The tutorial kernel a config is compared with, or None (no tutorial does the same job)."""
    c = cfg.constexprs
    if cfg.name == "flex_attn_fwd":
        return _attention_anchor(arch, c["HEAD_DIM"], cfg.num_warps, cfg.num_stages)
    if cfg.name == "fp8_gemm":
        return _gemm_anchor(arch, c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], cfg.num_warps, cfg.num_stages)
    return None


def anchor_for(cfg: AotConfig, arch: int) -> str | None:
    spec = anchor_spec(cfg, arch)
    return None if spec is None else spec.key


def target_ratio(cfg: AotConfig, arch: int) -> float | None:
    """The ratio the kernel-structure work aims for (reported, not enforced): see docs/kernel_structure.md."""
    if cfg.name == "flex_attn_fwd" and arch in (89, 90):
        return 1.00
    if cfg.name == "fp8_gemm" and arch in (89, 90):
        block = cfg.constexprs.get("A_MODE") == 2 or cfg.constexprs.get("B_MODE") == 2
        return {(90, False): 1.15, (90, True): 1.5, (89, False): 1.05, (89, True): 1.2}[(arch, block)]
    return None


def load_anchor_module(directory: str, file: str):
    """The ``@triton.jit`` functions (and triton imports) of one tutorial, as a module; nothing else runs.

    Triton's JIT reads a kernel's source from its file, so the extracted functions are written to a
    temporary file (outside the project) and imported from there.
    """
    import ast
    import importlib.util

    path = os.path.join(directory, ANCHOR_FILES[file])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"aot_check: anchor {ANCHOR_FILES[file]!r} not found in --anchors {directory!r}")
    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    keep = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if all(m in ("triton", "triton.language") or m.startswith("triton.tools") for m in mods):
                keep.append(node)
        elif isinstance(node, ast.FunctionDef) and any("triton.jit" in ast.unparse(d) for d in node.decorator_list):
            node.decorator_list = [ast.Attribute(ast.Name("triton", ast.Load()), "jit", ast.Load())]
            keep.append(node)
    name = "magi_anchor_" + re.sub(r"\W", "_", os.path.splitext(ANCHOR_FILES[file])[0])
    tmp = tempfile.mkdtemp(prefix="magi_anchor_")
    src = os.path.join(tmp, name + ".py")
    with open(src, "w") as f:
        f.write(ast.unparse(ast.Module(body=keep, type_ignores=[])) + "\n")
    spec = importlib.util.spec_from_file_location(name, src)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@dataclasses.dataclass
class AnchorResult:
    key: str
    arch: int
    regs: int | None = None
    loop: LoopStats | None = None
    compile_s: float = 0.0
    error: str | None = None


def check_anchor(spec: AnchorSpec, directory: str) -> AnchorResult:
    _require_compiled_mode()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = AnchorResult(spec.key, spec.arch)
    t0 = time.perf_counter()
    try:
        fn = getattr(load_anchor_module(directory, spec.file), spec.function)
        names = [n for n, _ in spec.signature]
        kernel = triton.compile(ASTSource(fn=fn, signature=dict(spec.signature), constexprs=dict(spec.constexprs),
                                          attrs={(names.index(n),): [["tt.divisibility", 16]] for n in spec.divisible}),
                                target=GPUTarget("cuda", spec.arch, 32),
                                options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        resources, sass = disassemble(kernel.asm["cubin"])
        res.regs, res.loop = resources["REG"], hot_loop_stats(sass, kernel.asm["ttgir"])
    except Exception as e:  # reported in the table; the shipped configs' checks still count
        res.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
    res.compile_s = time.perf_counter() - t0
    return res


def _anchor_star(job: tuple[AnchorSpec, str]) -> AnchorResult:
    return check_anchor(*job)


def run_anchors(specs: Iterable[AnchorSpec], directory: str, jobs: int = 2) -> dict[str, AnchorResult]:
    work = [(s, directory) for s in dict.fromkeys(specs)]
    if jobs <= 1 or len(work) <= 1:
        return {s.key: check_anchor(s, d) for s, d in work}
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context(method)) as ex:
        return {r.key: r for r in ex.map(_anchor_star, work, chunksize=1)}


def apply_ratios(results: Sequence[CheckResult], anchors: dict[str, AnchorResult]) -> None:
    """Fill ``ratio`` = ours / anchor's issued instructions per MMA FLOP where both hot loops were found."""
    for r in results:
        a = anchors.get(r.anchor) if r.anchor else None
        if r.loop is not None and a is not None and a.loop is not None:
            r.ratio = r.loop.issued_per_kflop / a.loop.issued_per_kflop


def structure_rows(results: Sequence[CheckResult], anchors: dict[str, AnchorResult] | None = None,
                   configs: dict[str, AotConfig] | None = None) -> list[dict]:
    """One row per hot loop (ours, then the anchors): the report's and docs/kernel_structure.md's table."""
    def row(name, arch, regs, loop, ratio=None, anchor=None, target=None, spills=None):
        return {"kernel": name, "arch": f"sm_{arch}", "regs": regs, "spills": spills,
                "mma/iter": loop.mma_per_iter if loop else None, "issued/iter": loop.issued if loop else None,
                "instr/kFLOP": round(loop.issued_per_kflop, 3) if loop else None,
                "ratio": None if ratio is None else round(ratio, 2), "target": target, "anchor": anchor,
                "ws": loop.warp_specialized if loop else None, "loads": "+".join(loop.loads) if loop and loop.loads
                else "-", "CTA bars": loop.cta_barriers if loop else None,
                "buffers": loop.pipeline_buffers if loop else None,
                "wgmma wait": loop.wgmma_wait if loop else None, "mma": loop.mma_kind if loop else None,
                "loop at": f"{loop.first_addr:#x}-{loop.last_addr:#x}" if loop else None}
    out = []
    for r in results:
        cfg = (configs or {}).get(f"{r.kernel}[{r.config}]")
        name = f"{r.kernel}[{r.config}]" + (f" ({r.loop_error})" if r.loop_error else "")
        out.append(row(name, r.arch, r.regs, r.loop, r.ratio, r.anchor, target_ratio(cfg, r.arch) if cfg else None,
                       None if r.stl is None else r.stl + r.ldl))
    for a in (anchors or {}).values():
        out.append(row(a.key.rsplit(" sm_", 1)[0] + (f" ({a.error})" if a.error else ""), a.arch, a.regs, a.loop))
    return out


def _print_structure(rows: Sequence[dict]) -> None:
    if not rows:
        return
    cols = list(rows[0])
    cols.remove("anchor")
    cells = [["-" if r[c] is None else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    print("\nHot loops (innermost loop with tensor-core instructions; ratio = instr/kFLOP ours / anchor's; "
          "target: the kernel-structure goal, not enforced; loop at: SASS addresses of its label and back branch)")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for x in cells:
        print("  ".join(v.ljust(w) for v, w in zip(x, widths)))
    matched = sorted({(r["kernel"], r["anchor"]) for r in rows if r["anchor"]})
    for k, a in matched:
        print(f"  {k} vs {a}")


def structure_report(keys: Sequence[str], anchors_dir: str | None = None, jobs: int = 2) -> list[dict]:
    """Hot-loop rows (:func:`structure_rows`) for the registered configs named by ``keys`` (``AotConfig.key``), on
    each of their archs, plus their anchors compiled in the same run when ``anchors_dir`` is given."""
    _require_compiled_mode()
    by_key = {c.key: c for c in registered_configs()}
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise KeyError(f"aot_check: no registered config {missing}")
    configs = [by_key[k] for k in keys]
    results = run_checks(configs, None, jobs)
    anchors = {}
    if anchors_dir:
        anchors = run_anchors([s for c in configs for a in c.archs if (s := anchor_spec(c, a)) is not None],
                              anchors_dir, jobs)
        apply_ratios(results, anchors)
    return structure_rows(results, anchors, by_key)


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
    parser.add_argument("--anchors", default=os.environ.get(ANCHOR_ENV), metavar="DIR",
                        help="directory holding Triton's tutorials 03/06/09 (default: $" + ANCHOR_ENV + "); "
                             "their kernels are compiled in the same run and each config gets a ratio")
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
    anchors: dict[str, AnchorResult] = {}
    if opts.anchors:
        if not os.path.isdir(opts.anchors):
            print(f"aot_check: --anchors {opts.anchors!r} is not a directory", file=sys.stderr)
            return 1
        specs = [s for r in results for c in configs if c.key == f"{r.kernel}[{r.config}]"
                 if (s := anchor_spec(c, r.arch)) is not None]
        anchors = run_anchors(specs, opts.anchors, opts.jobs)
        apply_ratios(results, anchors)
    wall = time.perf_counter() - t0
    _print_table(results, wall)
    rows = structure_rows(results, anchors, {c.key: c for c in configs})
    _print_structure(rows)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"wall_s": wall, "archs": list(opts.arch), "ok": all(r.ok for r in results),
                       "results": [r.to_json() for r in results], "hot_loops": rows,
                       "anchors": {k: dataclasses.asdict(a) for k, a in anchors.items()}}, f, indent=1, default=str)
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
