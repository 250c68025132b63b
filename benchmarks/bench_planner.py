"""Planner time and tile efficiency on MAGI-1 attention windows (CPU; the planner is host code).

    python benchmarks/bench_planner.py [--quick] [--reps N] [--csv F] [--json F]

Rows: MAGI-1 self-attention windows (docs/magi1.md#window-stages): the 4-chunk window of a 24B 720p T2V run
(21,600 tokens per chunk, r = 2..5), the same after the window slides (clean chunk + KV-cache prefix),
and 720x720 chunks (12,150 tokens). For each tile shape (64x64, 128x64, 128x128) it reports the median
wall time of a fresh (uncached) plan with the native C++ planner and with the Python fallback, the
number of visited tiles (FULL / PARTIAL), and the tile efficiency = visited tiles x BM x BN / unmasked
cells (1.0 = no wasted MMA work). A cached lookup (what every layer after the first pays) is timed too.
Every number printed is measured in this run; planners that are not available print "n/a".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # source checkout without pip install
from common import write_results  # noqa: E402

from magi_kernels.plan import build_plan, clear_cache, get_plan, native_planner, tile_efficiency, union_area  # noqa: E402
from magi_kernels.ranges import Magi1WindowMask  # noqa: E402

TILES = [(64, 64), (128, 64), (128, 128)]


def windows(quick: bool) -> dict[str, Magi1WindowMask]:
    w = {
        "24B 720p, 4 chunks (r=2..5)": Magi1WindowMask(21600, (2, 3, 4, 5), 0),
        "24B 720p, clean + 4 noisy, cache 1": Magi1WindowMask.from_schedule(21600, 6, 32, 4 * 8 + 8),
    }
    if not quick:
        w["720x720, 4 chunks (r=2..5)"] = Magi1WindowMask(12150, (2, 3, 4, 5), 0)
    return w


def median_time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer windows and repetitions")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per planner (median reported)")
    ap.add_argument("--csv")
    ap.add_argument("--json")
    args = ap.parse_args()
    reps = args.reps or (5 if args.quick else 20)
    has_native = native_planner() is not None
    rows = []
    for name, mask in windows(args.quick).items():
        q, k, t = (x.numpy() for x in mask.to_ranges())
        area = union_area(q, k, t)
        for bm, bn in TILES:
            def plan(which):
                return build_plan(q, k, t, mask.total_q, mask.total_k, bm, bn, planner=which)

            p = plan("native" if has_native else "python")
            nat = median_time(lambda: plan("native"), reps) if has_native else None
            py = median_time(lambda: plan("python"), max(1, reps // 4))
            clear_cache()
            get_plan(q, k, t, mask.total_q, mask.total_k, bm, bn)
            cached = median_time(lambda: get_plan(q, k, t, mask.total_q, mask.total_k, bm, bn), reps)
            rows.append({
                "window": name, "tokens_q": mask.total_q, "tokens_k": mask.total_k, "tile": f"{bm}x{bn}",
                "native_ms": None if nat is None else round(nat * 1e3, 3), "python_ms": round(py * 1e3, 2),
                "cached_us": round(cached * 1e6, 1), "tiles": p.num_entries, "full": p.num_full,
                "partial": p.num_partial, "efficiency": round(tile_efficiency(p, area), 4),
            })
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"Attention planner (CPU, median of {reps} runs; efficiency = visited-tile cells / unmasked cells)")
        cols = ["window", "tokens_q", "tokens_k", "tile", "native_ms", "python_ms", "cached_us", "tiles", "full",
                "partial", "efficiency"]
        for c in cols:
            table.add_column(c, justify="left" if c == "window" else "right")
        for r in rows:
            table.add_row(*["n/a" if r[c] is None else str(r[c]) for c in cols])
        Console(width=max(160, Console().width)).print(table)
    except ImportError:  # rich is a dependency, but keep the numbers reachable without it
        for r in rows:
            print(r)
    write_results(rows, args.csv, args.json)


if __name__ == "__main__":
    main()
