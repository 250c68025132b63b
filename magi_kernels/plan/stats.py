"""Mask area (the FLOP-relevant unmasked cells of the union of slices) and tile efficiency."""

from __future__ import annotations

import numpy as np
import torch

from magi_kernels.ranges.types import slice_area


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def union_area(q_ranges, k_ranges, attn_type_map=None) -> int:
    """Number of (q, k) cells visible under the union of slices (a cell covered twice counts once)."""
    qr = _np(q_ranges).reshape(-1, 2).astype(np.int64)
    kr = _np(k_ranges).reshape(-1, 2).astype(np.int64)
    ty = np.zeros(len(qr), np.int64) if attn_type_map is None else _np(attn_type_map).astype(np.int64)
    keep = [i for i in range(len(qr)) if slice_area(qr[i, 0], qr[i, 1], kr[i, 0], kr[i, 1], ty[i]) > 0]
    qr, kr, ty = qr[keep], kr[keep], ty[keep]
    if len(qr) == 0:
        return 0
    order = np.argsort(qr[:, 0], kind="stable")
    s = qr[order]
    if np.all(s[1:, 0] >= s[:-1, 1]):  # q ranges pairwise disjoint: areas simply add up
        return int(sum(slice_area(*qr[i], *kr[i], ty[i]) for i in range(len(qr))))
    # General case: per-row intervals of every slice, then a vectorised per-row union length.
    rows, los, his = [], [], []
    for i in range(len(qr)):
        r = np.arange(qr[i, 0], qr[i, 1], dtype=np.int64)
        lo = kr[i, 0] + ((r - qr[i, 0]) if ty[i] & 2 else 0)
        hi = kr[i, 1] - ((qr[i, 1] - 1 - r) if ty[i] & 1 else 0)
        lo, hi = np.broadcast_to(lo, r.shape), np.broadcast_to(hi, r.shape)
        ok = lo < hi
        rows.append(r[ok]); los.append(lo[ok]); his.append(hi[ok])
    r, lo, hi = np.concatenate(rows), np.concatenate(los), np.concatenate(his)
    if r.size == 0:
        return 0
    big = int(kr[:, 1].max()) + 1  # offset rows apart so one global running max never leaks across rows
    lo, hi = lo + r * big, hi + r * big
    o = np.lexsort((lo, r))
    lo, hi = lo[o], hi[o]
    prev = np.maximum.accumulate(np.concatenate([[np.iinfo(np.int64).min], hi[:-1]]))
    return int(np.maximum(0, hi - np.maximum(lo, prev)).clip(min=0).sum())


def tile_efficiency(plan, area: int | None = None) -> float:
    """Computed-tile cells / unmasked cells: every visited tile costs block_m x block_n cells of MMA work."""
    area = plan.area() if area is None else area
    return float("inf") if area == 0 else plan.num_entries * plan.block_m * plan.block_n / area
