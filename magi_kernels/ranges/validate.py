"""Validation of ``(q_ranges, k_ranges, attn_type_map)``.

Two stages, because the second reads tensor values:

- :func:`check_ranges_meta` looks only at types, dtypes, shapes and devices. It is safe on fake
  tensors, so the public op runs it eagerly even while ``torch.compile`` traces.
- :func:`check_ranges_values` copies the (small) range tensors to the host and checks bounds,
  signs and inversion. It runs inside the op, at run time, and returns the host copies the planner
  needs anyway (range tensors on a GPU cost one small device-to-host copy; flex_attn keeps the result
  per range tensor, so only the first call with a given tensor pays it).

Every error names the argument and the rule (``MagiArgumentError``, a ``ValueError``).
"""

from __future__ import annotations

import numpy as np
import torch

from magi_kernels.utils.checks import fail

NUM_MASK_TYPES = 4


def _check_ranges_tensor(op: str, name: str, t, device: torch.device | None) -> None:
    if not isinstance(t, torch.Tensor):
        fail(op, name, f"must be a torch.Tensor of int32 [n, 2], got {type(t).__name__}")
    if t.dtype != torch.int32:
        fail(op, name, f"must have dtype int32, got {str(t.dtype).replace('torch.', '')}")
    if t.dim() != 2 or t.shape[1] != 2:
        fail(op, name, f"must have shape [n, 2] (half-open [start, end) per slice), got {list(t.shape)}")
    if device is not None and t.device != device and t.device.type != "cpu":
        fail(op, name, f"must be on q's device {device} or on the CPU, got {t.device}")


def check_ranges_meta(op: str, q_ranges, k_ranges, attn_type_map, device: torch.device | None = None) -> None:
    """Types/dtypes/shapes/devices only (no value reads)."""
    _check_ranges_tensor(op, "q_ranges", q_ranges, device)
    _check_ranges_tensor(op, "k_ranges", k_ranges, device)
    if k_ranges.shape[0] != q_ranges.shape[0]:
        fail(op, "k_ranges", f"must have as many slices as q_ranges ({q_ranges.shape[0]}), got {k_ranges.shape[0]}")
    if attn_type_map is not None:
        if not isinstance(attn_type_map, torch.Tensor):
            fail(op, "attn_type_map", f"must be a torch.Tensor of int32 [n] or None, got {type(attn_type_map).__name__}")
        if attn_type_map.dtype != torch.int32:
            fail(op, "attn_type_map", f"must have dtype int32, got {str(attn_type_map.dtype).replace('torch.', '')}")
        if attn_type_map.dim() != 1 or attn_type_map.shape[0] != q_ranges.shape[0]:
            fail(op, "attn_type_map", f"must have shape [{q_ranges.shape[0]}] (one type per slice), got {list(attn_type_map.shape)}")
        if device is not None and attn_type_map.device != device and attn_type_map.device.type != "cpu":
            fail(op, "attn_type_map", f"must be on q's device {device} or on the CPU, got {attn_type_map.device}")


def _host(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu").contiguous().numpy()


def _check_bounds(op: str, name: str, r: np.ndarray, total: int, total_name: str) -> None:
    if r.shape[0] == 0:
        return
    neg = np.nonzero(r.min(axis=1) < 0)[0]
    if neg.size:
        i = int(neg[0])
        fail(op, name, f"must have non-negative starts and ends; slice {i} is [{r[i, 0]}, {r[i, 1]})")
    inv = np.nonzero(r[:, 0] > r[:, 1])[0]
    if inv.size:
        i = int(inv[0])
        fail(op, name, f"must have start <= end (half-open [start, end)); slice {i} is inverted: [{r[i, 0]}, {r[i, 1]})")
    oob = np.nonzero(r[:, 1] > total)[0]
    if oob.size:
        i = int(oob[0])
        fail(op, name, f"must lie inside [0, {total_name}={total}); slice {i} is [{r[i, 0]}, {r[i, 1]})")


def check_ranges_values(op: str, q_ranges: torch.Tensor, k_ranges: torch.Tensor, attn_type_map: torch.Tensor | None,
                        total_q: int, total_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bounds / sign / inversion / type-value checks. Returns host int32 arrays (qr [n,2], kr [n,2], types [n])."""
    qr, kr = _host(q_ranges), _host(k_ranges)
    _check_bounds(op, "q_ranges", qr, total_q, "total_q")
    _check_bounds(op, "k_ranges", kr, total_k, "total_k")
    if attn_type_map is None:
        types = np.zeros(qr.shape[0], dtype=np.int32)
    else:
        types = _host(attn_type_map)
        bad = np.nonzero((types < 0) | (types >= NUM_MASK_TYPES))[0]
        if bad.size:
            i = int(bad[0])
            fail(op, "attn_type_map", f"must hold mask types 0 FULL, 1 CAUSAL, 2 INV_CAUSAL, 3 BI_CAUSAL; slice {i} has {types[i]}")
    return qr.astype(np.int32, copy=False), kr.astype(np.int32, copy=False), types.astype(np.int32, copy=False)


def validate_ranges(q_ranges, k_ranges, attn_type_map=None, *, total_q: int, total_k: int,
                    device: torch.device | None = None, op: str = "ranges"):
    """Full validation (meta + values). Returns host numpy copies ``(qr, kr, types)``."""
    check_ranges_meta(op, q_ranges, k_ranges, attn_type_map, device)
    return check_ranges_values(op, q_ranges, k_ranges, attn_type_map, total_q, total_k)
