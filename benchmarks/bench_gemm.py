"""fp8 GEMM benchmark: MAGI-1 24B / 4.5B layer shapes and square sweeps.

    python benchmarks/bench_gemm.py                       # GPU: Triton fp8 (tensor/row/block), baselines
    python benchmarks/bench_gemm.py --csv out.csv --json out.json --png out.png
    python benchmarks/bench_gemm.py --shapes square --m 4096

On a GPU each case is timed with triton.testing.do_bench (median ms): magi fp8_gemm (Triton) per scale recipe,
promoted and, for the tensor and row recipes, with fast_accum=True (column "fast_accum"), torch bf16 matmul, and
torch._scaled_mm (cuBLASLt, per-tensor and row-wise; per-tensor also with use_fast_accum=True, MAGI-1's own
GEMM) where the installed torch has it.
On CPU only the torch reference path runs, at small M (--cpu-m), and every row is labelled device=cpu;
nothing is extrapolated. Rows that could not run say so in "note" and carry no timing.
TFLOPS = 2*M*N*K / t (SwiGLU cases count the full 2N-wide GEMM).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from magi_kernels.ops.fp8_gemm import fp8_gemm  # noqa: E402
from magi_kernels.ops.fp8_quantize import fp8_quantize  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import calibration_block, gpu_description  # noqa: E402

# (model, layer, N, K, epilogue) from MAGI-1's layer shapes (docs/magi1.md#checkpoint-layout-and-keys; weights are [N, K]).
MAGI_LAYERS = [
    ("24B", "q/qx", 6144, 6144, None), ("24B", "k/v", 1024, 6144, None),
    ("24B", "linear_proj", 6144, 12288, None), ("24B", "fc1+swiglu", 32768, 6144, "swiglu"),
    ("24B", "fc2", 6144, 16384, None),
    ("4.5B", "q/qx", 3072, 3072, None), ("4.5B", "k/v", 1024, 3072, None),
    ("4.5B", "linear_proj", 3072, 6144, None), ("4.5B", "fc1+gelu", 12288, 3072, "gelu"),
    ("4.5B", "fc2", 3072, 12288, None),
]
TOKENS_PER_CHUNK = 21600  # 720p chunk (docs/magi1.md#sizes); M = 1..4 chunks
RECIPES = {"tensor": ("tensor", "tensor"), "row": ("row", "row"), "block": ("block1x128", "block128x128")}


def cases(kind: str, ms: list[int]):
    if kind in ("magi", "all"):
        for model, layer, n, k, epi in MAGI_LAYERS:
            for m in ms:
                yield dict(suite=f"magi-{model}", layer=layer, m=m, n=n, k=k, epilogue=epi)
    if kind in ("square", "all"):
        for s in (1024, 2048, 4096, 8192):
            yield dict(suite="square", layer=f"{s}^3", m=s, n=s, k=s, epilogue=None)


def _timer(device: str):
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100)

    def cpu_time(fn, reps=3):
        fn()
        t = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            t.append((time.perf_counter() - t0) * 1e3)
        return sorted(t)[len(t) // 2]

    return cpu_time


def run(case, device, timer, recipes, baselines):
    m, n, k, epi = case["m"], case["n"], case["k"], case["epilogue"]
    flops = 2.0 * m * n * k
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    rows = []
    backend = "triton" if device == "cuda" else "torch"

    def record(impl, fn, note="", fast_accum=None):
        row = dict(case, device=device, impl=impl, fast_accum=fast_accum, ms=None, tflops=None, note=note)
        if fn is not None:
            try:
                ms = timer(fn)
                row.update(ms=round(ms, 4), tflops=float(f"{flops / ms / 1e9:.4g}"))
            except Exception as e:  # report, don't invent a number
                row["note"] = f"failed: {type(e).__name__}: {str(e)[:120]}"
        rows.append(row)

    for name in recipes:
        ga, gw = RECIPES[name]
        xq, xs = fp8_quantize(x, ga)
        wq, ws = fp8_quantize(w, gw)
        ws = ws.view(-1) if name == "row" else ws
        for fast in (False, True) if name != "block" else (False,):  # block scales need the promoted loop
            record(f"magi-fp8-{name}{'-fast' if fast else ''}-{backend}",
                   lambda: fp8_gemm(xq, wq, xs, ws, epilogue=epi, out_dtype=torch.bfloat16, backend=backend,
                                    fast_accum=fast), fast_accum=fast)
    if "bf16" in baselines:
        record("torch-bf16-matmul", lambda: x @ w.t())
    if "scaled_mm" in baselines:
        if device != "cuda" or not hasattr(torch, "_scaled_mm"):
            record("torch._scaled_mm", None, "needs a CUDA device")
        else:
            xq, _ = fp8_quantize(x, "tensor")
            wq, _ = fp8_quantize(w, "tensor")
            one = torch.ones((), device=device)
            for fast in (False, True):
                record(f"torch._scaled_mm-tensor{'-fast' if fast else ''}",
                       lambda: torch._scaled_mm(xq, wq.t(), one, one, out_dtype=torch.bfloat16, use_fast_accum=fast),
                       fast_accum=fast)
            xr, xs = fp8_quantize(x, "row")
            wr, ws = fp8_quantize(w, "row")
            record("torch._scaled_mm-row", lambda: torch._scaled_mm(xr, wr.t(), xs, ws.view(1, -1),
                                                                    out_dtype=torch.bfloat16), fast_accum=False)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", choices=("magi", "square", "all"), default="all")
    p.add_argument("--m", type=int, nargs="*", default=None, help="token counts (default: 1-4 chunks of 21,600)")
    p.add_argument("--cpu-m", type=int, default=64, help="M used on CPU (the torch path is slow)")
    p.add_argument("--cpu-max-nk", type=int, default=6144 * 6144, help="skip CPU cases with N*K above this")
    p.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--baselines", nargs="*", default=["bf16", "scaled_mm"], choices=["bf16", "scaled_mm"])
    p.add_argument("--csv"), p.add_argument("--json"), p.add_argument("--png")
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(2)
        ms = [a.cpu_m]
    else:
        ms = a.m or [TOKENS_PER_CHUNK * c for c in (1, 2, 4)]
    timer = _timer(device)
    rows = []
    for c in cases(a.shapes, ms):
        if device == "cpu":
            c["m"] = a.cpu_m
            if c["n"] * c["k"] > a.cpu_max_nk:
                rows.append(dict(c, device=device, impl="-", fast_accum=None, ms=None, tflops=None,
                                 note="skipped on CPU (size)"))
                continue
        case_rows = run(c, device, timer, a.recipes, a.baselines)
        rows.extend(case_rows)
        for r in case_rows:
            t = "-" if r["tflops"] is None else f"{r['tflops']:.4g} TFLOPS ({r['ms']:.3f} ms)"
            print(f"[{device}] {r['suite']:10s} {r['layer']:12s} M={r['m']:6d} N={r['n']:6d} K={r['k']:6d} "
                  f"{r['impl']:28s} {t} {r['note']}", flush=True)
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            wr.writeheader()
            wr.writerows(rows)
    if a.json:
        meta = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                    gpu=gpu_description())
        out = dict(meta=meta, rows=rows)
        # Planner calibration (GPU runs only): MAGI-1 layer shapes, our per-tensor fp8 path (best of the promoted
        # and fast-accumulation rows per shape: MAGI-1's layers run with fast_accum) and the bf16 matmul baseline.
        best_fp8: dict = {}
        for r in rows:
            if r["suite"].startswith("magi") and r["impl"].startswith("magi-fp8-tensor") and r["tflops"]:
                key = (r["suite"], r["layer"], r["m"])
                best_fp8[key] = max(best_fp8.get(key, 0), r["tflops"])
        cal = calibration_block({"gemm_fp8": list(best_fp8.values()),
                                 "gemm_bf16": [r["tflops"] for r in rows if r["suite"].startswith("magi")
                                               and r["impl"] == "torch-bf16-matmul"]})
        if cal:
            out["calibration"] = cal
        Path(a.json).write_text(json.dumps(out, indent=1))
    if a.png:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no PNG written")
            return 0
        timed = [r for r in rows if r["tflops"] is not None]
        labels = sorted({f"{r['suite']} {r['layer']} M={r['m']}" for r in timed})
        impls = sorted({r["impl"] for r in timed})
        fig, ax = plt.subplots(figsize=(max(8, len(labels) * 0.9), 5))
        wdt = 0.8 / max(1, len(impls))
        for i, impl in enumerate(impls):
            vals = {f"{r['suite']} {r['layer']} M={r['m']}": r["tflops"] for r in timed if r["impl"] == impl}
            ax.bar([j + i * wdt for j in range(len(labels))], [vals.get(lb, 0) for lb in labels], wdt, label=impl)
        ax.set_xticks([j + 0.4 for j in range(len(labels))], labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("TFLOPS")
        ax.set_title(f"fp8 GEMM ({device}{'' if device == 'cuda' else ': torch reference path, not a GPU number'})")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(a.png, dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
