"""flex_attn benchmark: MagiAttention's kernel cases on GPU; the torch path vs baselines and tile efficiency on CPU.

    python benchmarks/bench_attention.py [--quick] [--reps N] [--bwd] [--seqlens 1024,4096] [--no-compile]
                                         [--csv F] [--json F] [--png F]

GPU (when CUDA is available): MagiAttention's kernel benchmark cases (its ``exps/attn/run_benchmark.py``): full,
causal, varlen full, varlen causal, varlen block-causal, sliding window; 1k-64k tokens, hd 128, 64 q /
8 kv heads, bf16. Every registered flex_attn backend that can run the call, plus baselines when they are
installed and runnable: torch SDPA (is_causal, or a dense boolean mask while it fits in memory),
torch.nn.attention.flex_attention (compiled, with a BlockMask), flash-attn (varlen; not block-causal),
MagiAttention (flex_flash_attn_func). Median of triton.testing.do_bench. TFLOPS count the unmasked area
only: 4 * area * nh_q * d (x2.5 for backward), area = magi_kernels.plan.union_area of the slices.

CPU (always): one MAGI-1-like window (4 chunks, key windows r = 2,3,4,5 as MAGI-1's noise2clean_kvrange
gives oldest-to-newest, behind a KV-cache prefix of ``slice_point`` chunks; hd 128, 8 q heads : 1 kv head)
timed with the magi_kernels torch path, dense-masked SDPA (F.scaled_dot_product_attention with a boolean
mask, enable_gqa) and flex_attention (eager, and compiled unless --no-compile), all in one run, reported
as ratios to the torch path. Median of --reps wall-clock runs. Plus the tile efficiency (visited-tile
cells / unmasked cells) of MAGI-1 720p windows (4 x 21,600-token chunks; every window of the 24B
(32 steps) and 4.5B (64 steps) schedules for a 96-frame video) at the shipped tile sizes.

Every number printed is measured (or counted) in this run; rows that could not run say why instead.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # source checkout without pip install
from common import bench, calibration_block, device_label, print_table, write_results  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from magi_kernels import flex_attn_func, registry  # noqa: E402
from magi_kernels.plan import build_plan, tile_efficiency, union_area  # noqa: E402
from magi_kernels.ranges import Magi1WindowMask, SlidingWindow, VarlenCausal, VarlenFull  # noqa: E402

TILES = [(128, 128), (128, 64), (64, 64)]  # the shipped tile shapes
GPU_SEQLENS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
HEAD_DIM = 128
GPU_HEADS = (64, 8)
CPU_HEADS = (8, 1)


def attn_flops(area: int, nh_q: int, d: int, bwd: bool = False) -> float:
    """MagiAttention's accounting: 4 * area * nh_q * d forward, x2.5 for backward."""
    return 4.0 * area * nh_q * d * (2.5 if bwd else 1.0)


# --------------------------------------------------------------------------------------------------
# Masks as raw slices: list of (qs, qe, ks, ke, type). Returned with total_q/total_k and a mask_mod for
# flex_attention (per-token document/chunk lookups; no dense mask).

class Case:
    def __init__(self, name: str, slices: list, total_q: int, total_k: int, causal_only: bool = False,
                 docs: list | None = None, window: tuple | None = None):
        self.name, self.slices, self.total_q, self.total_k = name, slices, total_q, total_k
        self.causal_only = causal_only  # the mask is exactly plain causal (SDPA is_causal works)
        self.docs = docs  # cu_seqlens when the case is per-document (flash-attn varlen)
        self.window = window  # flash-attn window_size when it applies

    def ranges(self, device):
        q = torch.tensor([[s[0], s[1]] for s in self.slices], dtype=torch.int32, device=device).reshape(-1, 2)
        k = torch.tensor([[s[2], s[3]] for s in self.slices], dtype=torch.int32, device=device).reshape(-1, 2)
        t = torch.tensor([s[4] for s in self.slices], dtype=torch.int32, device=device).reshape(-1)
        return q, k, t

    def area(self) -> int:
        q, k, t = self.ranges("cpu")
        return union_area(q, k, t)

    def dense_mask(self, device) -> torch.Tensor:
        """bool [total_q, total_k] (baselines only; the torch path never builds one)."""
        m = torch.zeros(self.total_q, self.total_k, dtype=torch.bool, device=device)
        for qs, qe, ks, ke, ty in self.slices:
            r = torch.arange(qs, qe, device=device)[:, None]
            c = torch.arange(ks, ke, device=device)[None, :]
            ok = torch.ones(qe - qs, ke - ks, dtype=torch.bool, device=device)
            if ty & 1:
                ok &= c < ke - (qe - 1 - r)
            if ty & 2:
                ok &= c >= ks + (r - qs)
            m[qs:qe, ks:ke] |= ok
        return m

    def mask_mod(self, device):
        """flex_attention mask_mod: OR over slices, with the slice bounds as Python constants (no captured
        buffers, which the compiled CPU template rejects)."""
        slices = [tuple(int(x) for x in s) for s in self.slices]

        def mod(b, h, qi, ki):
            vis = qi < 0  # all False, right shape
            for qs, qe, ks, ke, ty in slices:
                lo = ks + (qi - qs) if ty & 2 else ks
                hi = ke - (qe - 1 - qi) if ty & 1 else ke
                vis = vis | ((qi >= qs) & (qi < qe) & (ki >= lo) & (ki < hi))
            return vis

        return mod


def _doc_lengths(total: int, seed: int) -> list[int]:
    """Deterministic varlen split: lengths in [total/32, total/4], multiples of 64, summing to total."""
    g = torch.Generator().manual_seed(seed)
    lens, left = [], total
    while left > 0:
        lo, hi = max(64, total // 32), max(64, total // 4)
        n = int(torch.randint(lo // 64, hi // 64 + 1, (1,), generator=g)) * 64
        n = min(n, left)
        lens.append(n)
        left -= n
    return lens


def gpu_cases(total: int) -> list[Case]:
    cu = [0]
    for n in _doc_lengths(total, seed=total):
        cu.append(cu[-1] + n)
    cases = [
        Case("full", VarlenFull([0, total]).slices(), total, total, docs=[0, total]),
        Case("causal", VarlenCausal([0, total]).slices(), total, total, causal_only=True, docs=[0, total]),
        Case("varlen full", VarlenFull(cu).slices(), total, total, docs=cu),
        Case("varlen causal", VarlenCausal(cu).slices(), total, total, docs=cu),
    ]
    # varlen block-causal: each document is block-causal over blocks of total/16 tokens (>= 128)
    blk = max(128, total // 16)
    sl = []
    for a, b in zip(cu[:-1], cu[1:]):
        for c0 in range(a, b, blk):
            sl.append((c0, min(b, c0 + blk), a, min(b, c0 + blk), 0))
    cases.append(Case("varlen block-causal", sl, total, total))
    w = max(128, total // 8)  # causal sliding window of total/8 keys
    cases.append(Case("sliding window", SlidingWindow([0, total], w, 0).slices(), total, total, docs=[0, total],
                      window=(w, 0)))
    return cases


def magi1_window(chunk_tokens: int, slice_point: int) -> Case:
    m = Magi1WindowMask(chunk_tokens, (2, 3, 4, 5), slice_point)
    return Case(f"MAGI-1 window 4x{chunk_tokens}, cache {slice_point} chunks", m.slices(), m.total_q, m.total_k)


# --------------------------------------------------------------------------------------------------
# Runners: each returns a zero-argument callable producing out [total_q, nh_q, d], or raises to be skipped.

def _thd_to_bhsd(x):
    return x.transpose(0, 1).unsqueeze(0)


def run_ours(case, q, k, v, backend, bwd):
    qr, kr, ty = case.ranges(q.device)

    def fwd():
        return flex_attn_func(q, k, v, qr, kr, ty, backend=backend)[0]

    return fwd if not bwd else _with_bwd(fwd, q, k, v)


def run_sdpa(case, q, k, v, bwd, max_mask_bytes):
    gqa = q.shape[1] != k.shape[1]
    qb, kb, vb = _thd_to_bhsd(q), _thd_to_bhsd(k), _thd_to_bhsd(v)
    if case.causal_only:
        def fwd():
            return F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=gqa)[0].transpose(0, 1)
    else:
        if case.total_q * case.total_k > max_mask_bytes:
            raise RuntimeError(f"dense mask would take {case.total_q * case.total_k / 2**30:.1f} GiB")
        mask = case.dense_mask(q.device)

        def fwd():
            return F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, enable_gqa=gqa)[0].transpose(0, 1)
    return fwd if not bwd else _with_bwd(fwd, q, k, v)


def run_flex(case, q, k, v, bwd, compiled):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    bm = create_block_mask(case.mask_mod(q.device), None, None, case.total_q, case.total_k, device=q.device)
    fa = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    qb, kb, vb = _thd_to_bhsd(q), _thd_to_bhsd(k), _thd_to_bhsd(v)
    gqa = q.shape[1] != k.shape[1]

    def fwd():
        return fa(qb, kb, vb, block_mask=bm, enable_gqa=gqa)[0].transpose(0, 1)

    return fwd if not bwd else _with_bwd(fwd, q, k, v)


def run_flash_attn(case, q, k, v, bwd):
    from flash_attn import flash_attn_varlen_func

    if case.docs is None:
        raise RuntimeError("mask is not expressible as flash-attn varlen documents")
    cu = torch.tensor(case.docs, dtype=torch.int32, device=q.device)
    mx = int((cu[1:] - cu[:-1]).max())
    causal = case.causal_only or case.name == "varlen causal"
    window = case.window or (-1, -1)

    def fwd():
        return flash_attn_varlen_func(q, k, v, cu, cu, mx, mx, causal=causal and case.window is None,
                                      window_size=window)

    return fwd if not bwd else _with_bwd(fwd, q, k, v)


def run_magi_attention(case, q, k, v, bwd):
    from magi_attention.functional import flex_flash_attn_func

    qr, kr, ty = case.ranges(q.device)

    def fwd():
        return flex_flash_attn_func(q, k, v, qr, kr, attn_type_map=ty)[0]

    return fwd if not bwd else _with_bwd(fwd, q, k, v)


def _with_bwd(fwd, q, k, v):
    """Time one backward: forward once with grad, then backward with a fixed dO (retain_graph)."""
    for t in (q, k, v):
        t.requires_grad_(True)
    out = fwd()
    do = torch.randn_like(out)

    def run():
        for t in (q, k, v):
            t.grad = None
        out.backward(do, retain_graph=True)

    return run


# --------------------------------------------------------------------------------------------------

def _qkv(tq, tk, hq, hk, d, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda t, h: torch.randn(t, h, d, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return mk(tq, hq), mk(tk, hk), mk(tk, hk)


def gpu_rows(args) -> list[dict]:
    dev = torch.device("cuda")
    hq, hk = GPU_HEADS
    rows = []
    seqlens = [int(x) for x in args.seqlens.split(",")] if args.seqlens else GPU_SEQLENS
    backends = sorted(registry.implementations("flex_attn"))
    for total in seqlens:
        for case in gpu_cases(total):
            area = case.area()
            runners = [(f"magi_kernels[{b}]", (lambda c, q, k, v, bw, b=b: run_ours(c, q, k, v, b, bw)))
                       for b in backends if b != "torch" or total <= 8192]  # torch path: fallback, keep it short
            runners += [
                ("torch SDPA", lambda c, q, k, v, bw: run_sdpa(c, q, k, v, bw, max_mask_bytes=8 << 30)),
                ("flex_attention (compiled)", lambda c, q, k, v, bw: run_flex(c, q, k, v, bw, compiled=True)),
                ("flash-attn", run_flash_attn),
                ("MagiAttention", run_magi_attention),
            ]
            for name, make in runners:
                for bwd in ([False, True] if args.bwd else [False]):
                    row = {"device": device_label(), "case": case.name, "tokens": total, "dtype": "bf16",
                           "pass": "bwd" if bwd else "fwd", "impl": name, "area": area}
                    try:
                        q, k, v = _qkv(total, total, hq, hk, HEAD_DIM, torch.bfloat16, dev)
                        fn = make(case, q, k, v, bwd)
                        t = bench(fn, dev)
                        row.update(ms=round(t * 1e3, 4), tflops=round(attn_flops(area, hq, HEAD_DIM, bwd) / t / 1e12, 1),
                                   note="")
                    except Exception as e:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
                        row.update(ms=None, tflops=None, note=f"skipped: {type(e).__name__}: {str(e)[:80]}")
                    finally:
                        torch.cuda.empty_cache()
                    rows.append(row)
    return rows


def cpu_rows(args) -> list[dict]:
    """The torch path vs dense-masked SDPA vs flex_attention on MAGI-1-like windows (CPU)."""
    dev = torch.device("cpu")
    hq, hk = CPU_HEADS
    rows = []
    for chunk, sp in args.cpu_windows:
        case = magi1_window(chunk, sp)
        area = case.area()
        q, k, v = _qkv(case.total_q, case.total_k, hq, hk, HEAD_DIM, torch.float32, dev)
        ref = None
        impls = [("magi_kernels torch path", lambda: run_ours(case, q, k, v, "torch", False)),
                 ("SDPA dense bool mask", lambda: run_sdpa(case, q, k, v, False, max_mask_bytes=4 << 30)),
                 ("flex_attention eager", lambda: run_flex(case, q, k, v, False, compiled=False))]
        if not args.no_compile:
            impls.append(("flex_attention compiled", lambda: run_flex(case, q, k, v, False, compiled=True)))
        base_t = None
        for name, make in impls:
            row = {"device": "CPU", "case": case.name, "tokens_q": case.total_q, "tokens_k": case.total_k,
                   "dtype": "fp32", "heads": f"{hq}:{hk}", "impl": name, "unmasked_frac": round(area / (case.total_q * case.total_k), 3)}
            try:
                with warnings.catch_warnings():  # eager flex_attention warns that it is not the fast path
                    warnings.simplefilter("ignore")
                    t0 = time.perf_counter()
                    fn = make()
                    out = fn()  # first call (includes compilation for the compiled variant)
                    first = time.perf_counter() - t0
                    t = bench(fn, dev, cpu_reps=args.reps)
                if ref is None:
                    ref = out.float()
                err = (out.float() - ref).abs().max().item()
                if base_t is None:
                    base_t = t
                row.update(ms=round(t * 1e3, 2), gflops=round(attn_flops(area, hq, HEAD_DIM) / t / 1e9, 1),
                           torch_path_speedup=round(t / base_t, 2), first_call_s=round(first, 2),
                           max_abs_diff=float(f"{err:.3g}"), note="")
            except Exception as e:  # noqa: BLE001
                if args.verbose:
                    traceback.print_exc()
                row.update(ms=None, gflops=None, torch_path_speedup=None, first_call_s=None, max_abs_diff=None,
                           note=f"skipped: {type(e).__name__}: {str(e)[:80]}")
            rows.append(row)
    return rows


def magi1_720p_windows(num_steps: int, chunk_tokens: int = 21600, num_frames: int = 96) -> list[Magi1WindowMask]:
    """Every window MAGI-1's schedule runs for a T2V video (docs/magi1.md#window-stages), one per DiT step."""
    chunk_num = math.ceil((num_frames // 4) / 6)
    per_stage = num_steps // 4
    total = per_stage * (chunk_num + 4 - 1)
    return [Magi1WindowMask.from_schedule(chunk_tokens, chunk_num, num_steps, s) for s in range(total)]


def efficiency_rows(args) -> list[dict]:
    rows = []
    scheds = {"24B 720p (32 steps)": 32, "4.5B schedule at 720p (64 steps)": 64}
    for name, steps in scheds.items():
        wins = magi1_720p_windows(steps)
        steady = [w for w in wins if w.num_chunks == 4 and w.kv_windows == (2, 3, 4, 5)]
        uniq = {}
        for w in wins:
            uniq.setdefault((w.chunk_tokens, w.kv_windows, w.slice_point), [w, 0])[1] += 1
        for bm, bn in TILES:
            cells = area_sum = 0
            worst = 0.0
            for (w, count) in uniq.values():
                q, k, t = (x.numpy() for x in w.to_ranges())
                a = union_area(q, k, t)
                p = build_plan(q, k, t, w.total_q, w.total_k, bm, bn)
                cells += count * p.num_entries * bm * bn
                area_sum += count * a
                worst = max(worst, tile_efficiency(p, a))
            sw = steady[0] if steady else wins[0]
            q, k, t = (x.numpy() for x in sw.to_ranges())
            p = build_plan(q, k, t, sw.total_q, sw.total_k, bm, bn)
            rows.append({"schedule": name, "tile": f"{bm}x{bn}", "windows": len(wins),
                         "distinct": len(uniq), "steady_4chunk_eff": round(tile_efficiency(p, union_area(q, k, t)), 4),
                         "step_weighted_eff": round(cells / area_sum, 4), "worst_window_eff": round(worst, 4)})
    return rows


def write_png(path: str, gpu: list[dict], cpu: list[dict]) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "PNG skipped: matplotlib is not installed"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if gpu:
        cases = list(dict.fromkeys(r["case"] for r in gpu))
        fig, axes = plt.subplots(1, len(cases), figsize=(4 * len(cases), 3.5), squeeze=False)
        for ax, c in zip(axes[0], cases):
            for impl in dict.fromkeys(r["impl"] for r in gpu):
                pts = [(r["tokens"], r["tflops"]) for r in gpu if r["case"] == c and r["impl"] == impl
                       and r["pass"] == "fwd" and r["tflops"] is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_title(c)
            ax.set_xlabel("tokens")
            ax.set_ylabel("TFLOPS (fwd)")
        axes[0][0].legend(fontsize=7)
    else:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels = [f"{r['impl']}\n{r['case']}" for r in cpu if r["ms"] is not None]
        ax.barh(labels, [r["ms"] for r in cpu if r["ms"] is not None])
        ax.set_xlabel("ms (CPU, median)")
        ax.tick_params(axis="y", labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"PNG written to {path}"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smallest CPU window only (what the test runs)")
    ap.add_argument("--reps", type=int, default=None, help="CPU timed repetitions (median reported)")
    ap.add_argument("--bwd", action="store_true", help="GPU: also time the backward")
    ap.add_argument("--seqlens", help="GPU: comma-separated total token counts")
    ap.add_argument("--no-compile", action="store_true", help="CPU: skip compiled flex_attention")
    ap.add_argument("--no-efficiency", action="store_true", help="skip the MAGI-1 720p tile-efficiency table")
    ap.add_argument("--cpu-only", action="store_true", help="skip the GPU cases even when CUDA is available")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--csv")
    ap.add_argument("--json")
    ap.add_argument("--png")
    args = ap.parse_args(argv)
    if args.quick:
        args.cpu_windows = [(256, 2)]
        args.reps = args.reps or 3
    else:
        # chunk tokens, KV-cache prefix in chunks: a window early in the video and one further in
        args.cpu_windows = [(1024, 2), (1024, 6)]
        args.reps = args.reps or 5
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    gpu = gpu_rows(args) if torch.cuda.is_available() and not args.cpu_only else []
    cpu = cpu_rows(args)
    eff = [] if args.no_efficiency else efficiency_rows(args)
    if gpu:
        print_table(f"flex_attn on {device_label()} (median of do_bench; TFLOPS over the unmasked area)", gpu)
    print_table(f"CPU: MAGI-1-like window, fp32, hd {HEAD_DIM}, {CPU_HEADS[0]}:{CPU_HEADS[1]} GQA, "
                f"{args.threads} threads, median of {args.reps} runs; speedup = impl ms / torch path ms", cpu)
    if eff:
        shown = [{c: (f"{x:.4f}" if isinstance(x, float) else x) for c, x in r.items()} for r in eff]
        print_table("Tile efficiency of MAGI-1 720p windows (4 x 21,600 tokens; visited-tile cells / unmasked cells)",
                    shown)
    rows = [dict(section="gpu", **r) for r in gpu] + [dict(section="cpu", **r) for r in cpu] + \
        [dict(section="tile_efficiency", **r) for r in eff]
    if args.csv:  # one CSV per section (their columns differ)
        for sec, rs in (("gpu", gpu), ("cpu", cpu), ("tile_efficiency", eff)):
            if rs:
                p = Path(args.csv)
                write_results(rs, str(p.with_name(f"{p.stem}_{sec}{p.suffix}")), None)
    # Planner calibration (GPU runs only): best backend per case at MAGI-1-like sizes (>= 8k tokens), forward.
    best: dict = {}
    for r in gpu:
        if r["impl"].startswith("magi_kernels[") and r["pass"] == "fwd" and r["tokens"] >= 8192 and r["tflops"]:
            best[(r["case"], r["tokens"])] = max(best.get((r["case"], r["tokens"]), 0), r["tflops"])
    write_results(rows, None, args.json, calibration=calibration_block({"attention": list(best.values())}))
    if args.png:
        print(write_png(args.png, gpu, cpu))
    return {"gpu": gpu, "cpu": cpu, "tile_efficiency": eff}


if __name__ == "__main__":
    main()
