"""Measuring what the planner predicts: FLOPs of a real call and peak memory on any device.

- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over the call, with our custom ops' formulas
  registered (``magi_kernels.ops.flop_counts``). "attention" is ``magi_kernels::flex_attn``; "linear"
  is everything else the counter sees (ATen matmuls and convolutions, ``magi_kernels::fp8_gemm``).
- Peak memory on CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the call.
- Peak memory on CPU (no allocator statistics there): the PyTorch profiler's allocation records. With
  ``profile_memory=True`` every CPU allocation and free of a tensor storage is recorded; the peak is
  the maximum of the running sum of (allocated - freed) bytes over the call. It counts what the
  call allocated, exactly like ``max_memory_allocated`` does on a GPU (no allocator rounding,
  no caching slack), including temporaries inside ops.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

import magi_kernels.ops  # noqa: F401  (registers the custom ops' FLOP formulas)

ATTENTION_OPS = ("magi_kernels.flex_attn", "magi_kernels.flex_attn_bwd")


def count_flops(fn: Callable[[], object]) -> tuple[object, dict]:
    """Run ``fn`` under FlopCounterMode; returns (result, {"linear": n, "attention": n, "by_op": {...}})."""
    with FlopCounterMode(display=False) as fc:
        result = fn()
    by_op = {str(k): int(v) for k, v in fc.get_flop_counts().get("Global", {}).items()}
    attn = sum(v for k, v in by_op.items() if k in ATTENTION_OPS)
    return result, {"linear": sum(by_op.values()) - attn, "attention": attn, "by_op": by_op}


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[object, int]:
    """Run ``fn``; returns (result, peak bytes allocated during the call above what was allocated before)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    return result, _allocation_peak(prof, device)


def _allocation_peak(prof, device: torch.device) -> int:
    """Peak of the running sum of the profiler's allocation records (frees are negative) on ``device``."""
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.typed[0] == _EventType.Allocation and e.typed[1].device.type == device.type:
            events.append((e.start_time_ns, e.typed[1].alloc_size))
    live = peak = 0
    for _t, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


__all__ = ["count_flops", "peak_memory", "ATTENTION_OPS"]
