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


def gpu_description() -> dict:
    """What NVML (nvidia-ml-py) says about the GPUs: name, memory, clocks, power limit, PCIe link.

    ``{"nvml": "unavailable: <why>"}`` when the package or an NVIDIA driver is missing (CPU machines)."""
    try:
        import pynvml
    except ImportError:
        return {"nvml": "unavailable: nvidia-ml-py is not installed (pip install nvidia-ml-py)"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return {"nvml": f"unavailable: {e}"}
    try:
        def get(fn, *args):
            try:
                v = fn(*args)
                return v.decode() if isinstance(v, bytes) else v
            except pynvml.NVMLError:
                return None

        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = get(pynvml.nvmlDeviceGetMemoryInfo, h)
            power = get(pynvml.nvmlDeviceGetPowerManagementLimit, h)
            gpus.append({
                "index": i, "name": get(pynvml.nvmlDeviceGetName, h),
                "memory_total_bytes": None if mem is None else int(mem.total),
                "sm_clock_mhz": get(pynvml.nvmlDeviceGetClockInfo, h, pynvml.NVML_CLOCK_SM),
                "sm_clock_max_mhz": get(pynvml.nvmlDeviceGetMaxClockInfo, h, pynvml.NVML_CLOCK_SM),
                "mem_clock_max_mhz": get(pynvml.nvmlDeviceGetMaxClockInfo, h, pynvml.NVML_CLOCK_MEM),
                "power_limit_w": None if power is None else power / 1000,
                "pcie_gen": get(pynvml.nvmlDeviceGetCurrPcieLinkGeneration, h),
                "pcie_width": get(pynvml.nvmlDeviceGetCurrPcieLinkWidth, h),
            })
        return {"nvml": "ok", "driver": get(pynvml.nvmlSystemGetDriverVersion), "gpus": gpus}
    finally:
        pynvml.nvmlShutdown()


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


def calibration_block(samples: dict[str, list]) -> dict | None:
    """Measured efficiencies for ``python -m magi_model.plan --calibration FILE``: for each key
    (``gemm_bf16``, ``gemm_fp8``, ``attention``) the median measured TFLOPS over the datasheet peak of
    this GPU. Only on a CUDA device whose datasheet the planner knows; None otherwise (a CPU run never
    writes GPU calibration)."""
    if not torch.cuda.is_available():
        return None
    from magi_model.hardware import preset_for_device

    name = torch.cuda.get_device_name()
    gpu = preset_for_device(name)
    if gpu is None:
        return None
    out: dict = {"gpu": name, "datasheet": gpu.name}
    for key, vals in samples.items():
        vals = [v for v in vals if v]
        if vals:
            out[key] = round(statistics.median(vals) / gpu.peak_tflops("fp8" if key == "gemm_fp8" else "bf16"), 4)
            out[f"{key}_samples"] = len(vals)
    return out if len(out) > 2 else None


def write_results(rows: list[dict], csv_path: str | None, json_path: str | None,
                  calibration: dict | None = None) -> None:
    if csv_path and rows:
        Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        out = {"device": device_label(), "gpu": gpu_description(), "rows": rows}
        if calibration:
            out["calibration"] = calibration
        Path(json_path).write_text(json.dumps(out, indent=2))


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
