"""Shared benchmark plumbing: timing that is honest about the device, and result output.

On a GPU, times come from ``triton.testing.do_bench`` (median, L2 flushed between runs). On a CPU
only CPU paths are timed (median of wall-clock repeats) and every row says so. Nothing here
prints a number that was not measured in this run.
"""

from __future__ import annotations

import csv
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

# Peak DRAM bandwidth (bytes/s) for %-of-peak columns; public datasheet numbers.
HBM_PEAK = {"H100": 3.35e12, "H200": 4.8e12, "H800": 3.35e12, "RTX 4090": 1.008e12, "A100": 2.0e12}


def device_label() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "CPU"


def peak_bandwidth() -> float | None:
    name = device_label()
    for key, bw in HBM_PEAK.items():
        if key in name:
            return bw
    return None


def bench(fn: Callable[[], object], device: torch.device, *, cpu_reps: int = 5) -> float:
    """Median seconds per call of ``fn`` on ``device``."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
    fn()  # warm-up
    times = []
    for _ in range(cpu_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_results(rows: list[dict], csv_path: str | None, json_path: str | None) -> None:
    if csv_path and rows:
        Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps({"device": device_label(), "rows": rows}, indent=2))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def print_table(title: str, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    if not rows:
        Console().print(f"{title}: no rows")
        return
    for col in rows[0]:
        table.add_column(col)
    for r in rows:
        table.add_row(*[_fmt(v) for v in r.values()])
    Console(width=200).print(table)
