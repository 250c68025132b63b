"""python -m magi_model.plan --model 24B_distill_quant --gpus 8x4090 [--cp_size 4 --pp_size 2] [--json F] [--png F]

Predicts (does not measure) whether a MAGI-1 config fits on the given GPUs, with which layout, and
the seconds per video; prints the physical floor and the prediction's ratio to it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from magi_model.config import PRESETS, ConfigError
from magi_model.hardware import GIB, HardwareError
from magi_model.plan import Plan, plan
from magi_model.plan.memory import CUDA_CONTEXT_BYTES, FRAGMENTATION, IMPLEMENTATIONS, NCCL_BUFFER_BYTES

MODELS = sorted({p for p in PRESETS} | {"4.5B", "24B"})
OTHER_TERMS = ("memory_bound", "kv_offload", "t5")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m magi_model.plan", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config_file", help="a MAGI-1 config.json")
    src.add_argument("--model", choices=MODELS, help="a preset: {4.5B,24B}[_distill][_quant] (4.5B = 4.5B_base)")
    p.add_argument("--gpus", required=True, help="<count>x<gpu>: 8x4090, 4xH100-SXM, 1xH200, 1x12GB, 8xA100, ...")
    p.add_argument("--hardware", help="JSON file overriding GPU fields (e.g. {\"link_gbps\": 16})")
    p.add_argument("--height", type=int), p.add_argument("--width", type=int)
    p.add_argument("--frames", type=int), p.add_argument("--steps", type=int)
    p.add_argument("--window", type=int, help="evaluate this window only (default: search 1..config window)")
    p.add_argument("--cp_size", type=int, help="evaluate this Ulysses CP size only")
    p.add_argument("--pp_size", type=int, help="evaluate this pipeline size only")
    p.add_argument("--kv_offload", choices=("on", "off"), help="KV cache in host memory (default: search both)")
    p.add_argument("--implementation", choices=IMPLEMENTATIONS, default="magi1",
                   help="activation-memory model: magi1 = MAGI-1's code path (default), magi_model = this package's DiT")
    p.add_argument("--tf32", action="store_true",
                   help="fp32 GEMMs (linear_proj, embedders, T5) on TF32 tensor cores instead of fp32 (torch's default)")
    p.add_argument("--mode", choices=("t2v", "i2v"), default="t2v")
    p.add_argument("--text_tokens", type=int, default=64, help="valid caption tokens of the prompt (default 64)")
    p.add_argument("--calibration", nargs="*", default=[],
                   help="JSON files from benchmarks/bench_gemm.py / bench_attention.py --json run on a GPU")
    p.add_argument("--top", type=int, default=12, help="table rows (default 12)")
    p.add_argument("--json", help="write every evaluated layout to this file")
    p.add_argument("--png", help="stacked bars of the predicted time per fitting layout (needs matplotlib)")
    a = p.parse_args(argv)
    for name in ("height", "width", "frames", "steps", "window", "cp_size", "pp_size", "text_tokens", "top"):
        v = getattr(a, name)
        if v is not None and v < 1:
            p.error(f"argument --{name}: must be >= 1, got {v}")
    return a


def _gib(b: int) -> str:
    return f"{b / GIB:.1f}"


def _other(res) -> float:
    return sum(res.time_s[k] for k in OTHER_TERMS)


def print_plan(pl: Plan, top: int, file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(file=file, width=170)
    wl, g, eff = pl.workload, pl.cluster.gpu, pl.efficiency
    r, e = wl.config.runtime, wl.config.engine
    con.print(f"[bold]MAGI-1 plan (PREDICTION, not a measurement)[/]: {pl.model} on {pl.cluster.label}")
    con.print(f"video {r.video_size_h}x{r.video_size_w}, {r.num_frames} frames, {r.num_steps} steps, window "
              f"{r.window_size}, cfg {r.cfg_number}{', distill' if e.distill else ''}{', fp8' if e.fp8_quant else ''}"
              f" ({wl.mode}): {len(wl.forwards)} DiT forwards, up to {wl.max_tokens:,} tokens each; "
              f"DiT {wl.flops.total / 1e15:.1f} PFLOP (linear {wl.flops.total_linear / 1e15:.1f}, attention "
              f"{wl.flops.total_attention / 1e15:.1f}), VAE decode {wl.vae_flops / 1e15:.2f}, T5 {wl.t5_flops / 1e12:.1f} TFLOP")
    con.print(f"GPU: {g.name}: {_gib(g.memory_bytes)} GiB, bf16 {g.bf16_tflops} / fp8 {g.fp8_tflops} / fp32 "
              f"{g.fp32_tflops} TFLOPS dense, HBM {g.hbm_gbps:.0f} GB/s, {g.interconnect} {g.link_gbps:.0f} GB/s per "
              f"direction{'' if g.p2p else ', no peer-to-peer (collectives staged through host memory)'}")
    con.print(f"efficiencies ({eff.source}): gemm bf16 {eff.gemm_bf16}, fp8 {eff.gemm_fp8}, fp32 {eff.gemm_fp32}, "
              f"attention {eff.attention}, HBM {eff.hbm}, link {eff.link if g.p2p else eff.host_staged}; "
              f"fp32 GEMMs as {'TF32' if pl.tf32 else 'fp32 (no TF32, torch default)'}; memory model: {pl.implementation}")
    fitting = pl.fitting
    rows = fitting[:top] if fitting else pl.results[:top]
    t = Table(title="fitting layouts, fastest first (predicted)" if fitting else "NO layout fits; closest ones")
    for col in ("layout", "fits", "GiB/rank", "predicted s", "x floor", "linear", "attention", "comm", "VAE",
                "other", "peak phase"):
        t.add_column(col, justify="left" if col in ("layout", "peak phase") else "right")
    for res in rows:
        ts = res.time_s
        t.add_row(res.layout.label, "yes" if res.fits else "NO", f"{_gib(res.peak_bytes)}/{_gib(res.capacity_bytes)}",
                  f"{res.predicted_s:,.1f}", f"{res.ratio:.2f}", f"{ts['linear']:.1f}", f"{ts['attention']:.1f}",
                  f"{ts['communication']:.1f}", f"{ts['vae']:.1f}", f"{_other(res):.1f}",
                  res.peak_phase if res.fits else res.why_not)
    con.print(t)
    n_bad = len(pl.results) - len(fitting)
    if n_bad:
        con.print(f"{n_bad} of {len(pl.results)} evaluated layouts do not fit (see --json for why).")
    best = pl.best or pl.results[0]
    con.print(f"physical floor (every FLOP at datasheet peak on all {pl.cluster.count} GPUs, no communication): "
              f"{best.floor_s:.1f} s; {'best' if pl.best else 'closest'} layout {best.layout.label}: predicted "
              f"{best.predicted_s:.1f} s = {best.ratio:.2f}x the floor")
    c = best.comm_bytes_per_layer
    if c and best.layout.ranks > 1:
        con.print(f"communication per rank for the largest forward: Ulysses all-to-all {c['ulysses'] / 2**20:,.1f} MiB "
                  f"per layer (a ring CP would send {c['ring_alternative'] / 2**20:,.1f} MiB), pipeline sends "
                  f"{c['pp_per_forward'] / 2**20:,.1f} MiB per forward")
    mem = best.memory
    con.print("memory per rank of that layout (GiB): " + ", ".join(f"{k} {_gib(v)}" for k, v in mem.items() if v)
              + f"; activation peak at {best.activation_phase}")
    con.print("assumptions: compute at peak x efficiency; Ulysses all-to-all and pipeline sends not overlapped; "
              "pipeline stages serial for one video; KV offload copies on the critical path; VAE decode not overlapped"
              f"; allocator slack {FRAGMENTATION:.0%} of activations, CUDA context {_gib(CUDA_CONTEXT_BYTES)} GiB, "
              f"NCCL buffers {_gib(NCCL_BUFFER_BYTES)} GiB per rank when world > 1; T5 on the GPU only if it fits "
              f"(else CPU at {eff.cpu_tflops} TFLOPS)")


def write_png(pl: Plan, path: str, top: int) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no PNG written", file=sys.stderr)
        return False
    rows = (pl.fitting or pl.results)[:top]
    labels = [r.layout.label for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(rows) + 2), 4.5))
    bottom = [0.0] * len(rows)
    for term, key in (("linear", "linear"), ("attention", "attention"), ("communication", "communication"),
                      ("VAE", "vae"), ("other", None)):
        vals = [(_other(r) if key is None else r.time_s[key]) for r in rows]
        ax.bar(labels, vals, bottom=bottom, label=term)
        bottom = [b + v for b, v in zip(bottom, vals)]
    if rows:
        ax.axhline(rows[0].floor_s, color="k", linestyle="--", linewidth=1, label="physical floor")
    ax.set_ylabel("seconds per video (predicted)")
    ax.set_title(f"{pl.model} on {pl.cluster.label}: PREDICTION")
    ax.tick_params(axis="x", rotation=45)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        pl = plan(a.config_file or a.model, a.gpus, cp=a.cp_size, pp=a.pp_size, window=a.window,
                  kv_offload=None if a.kv_offload is None else a.kv_offload == "on", height=a.height, width=a.width,
                  frames=a.frames, steps=a.steps, hardware_file=a.hardware, calibration=a.calibration,
                  implementation=a.implementation, mode=a.mode, text_tokens=a.text_tokens, tf32=a.tf32)
    except (ConfigError, HardwareError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_plan(pl, a.top)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(pl.to_json(), indent=1))
        print(f"wrote {a.json}")
    if a.png and write_png(pl, a.png, a.top):
        print(f"wrote {a.png}")
    return 0 if pl.best else 1


if __name__ == "__main__":
    raise SystemExit(main())
