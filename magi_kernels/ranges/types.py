"""Mask types of an attention slice, exactly as MagiAttention defines them.

A slice is ``(q_range [qs, qe), k_range [ks, ke), type)`` in global token indices. With
``sq = qe - qs``, ``sk = ke - ks`` and local indices ``i = q - qs``, ``j = k - ks``:

    FULL       (0)  every (i, j)
    CAUSAL     (1)  j <= i + (sk - sq)            bottom-right aligned (FlashAttention convention)
    INV_CAUSAL (2)  j >= i                        top-left aligned
    BI_CAUSAL  (3)  i <= j <= i + (sk - sq)       AND of the two; empty when sq > sk

Equivalently, per global query row ``q`` the visible keys are one half-open interval

    lo(q) = ks + (q - qs)       if type & 2 else ks
    hi(q) = ke - (qe - 1 - q)   if type & 1 else ke

(empty when lo >= hi). Both ends move by 0 or 1 key per row, which is what the planner and the
kernels exploit: a slice restricted to a tile is a trapezoid described by five integers.
"""

from __future__ import annotations

import enum

import numpy as np


class AttnMaskType(enum.IntEnum):
    FULL = 0
    CAUSAL = 1
    INV_CAUSAL = 2
    BI_CAUSAL = 3

    @classmethod
    def parse(cls, value) -> "AttnMaskType":
        """Accept an AttnMaskType, its int, or a name ("full", "causal", "inv_causal"/"invcausal", ...)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            key = value.strip().lower().replace("-", "_")
            key = {"invcausal": "inv_causal", "bicausal": "bi_causal"}.get(key, key)
            try:
                return cls[key.upper()]
            except KeyError:
                raise ValueError(f"unknown mask type {value!r}; use one of {[m.name.lower() for m in cls]}") from None
        return cls(int(value))


def row_bounds(rows, qs, qe, ks, ke, mask_type):
    """Visible key interval [lo, hi) of global query rows ``rows`` for one slice (numpy or torch ints).

    Rows outside [qs, qe) and rows whose interval is empty come back with lo >= hi.
    """
    t = int(mask_type)
    lo = ks + (rows - qs) if t & 2 else rows * 0 + ks
    hi = ke - (qe - 1 - rows) if t & 1 else rows * 0 + ke
    if isinstance(rows, np.ndarray):
        outside = (rows < qs) | (rows >= qe)
        hi = np.where(outside, lo, hi)
    else:
        outside = (rows < qs) | (rows >= qe)
        hi = hi.masked_fill(outside, 0)
        lo = lo.masked_fill(outside, 0)
    return lo, hi


def slice_area(qs: int, qe: int, ks: int, ke: int, mask_type: int) -> int:
    """Number of visible cells of one slice (closed form: row lengths form an arithmetic sequence)."""
    sq, sk = qe - qs, ke - ks
    if sq <= 0 or sk <= 0:
        return 0
    t = int(mask_type)
    # length of local row i: sk - (sq - 1 - i)*causal - i*inv, i.e. L0 + slope*i
    cau, inv = t & 1, (t >> 1) & 1
    l0 = sk - (sq - 1) * cau
    slope = cau - inv
    if slope == 0:
        return max(0, l0) * sq
    if slope > 0:  # increasing: rows with l0 + i > 0
        first = max(0, 1 - l0)
        if first >= sq:
            return 0
        n = sq - first
        a, b = l0 + first, l0 + sq - 1
        return (a + b) * n // 2
    # decreasing: rows with l0 - i > 0
    last = min(sq - 1, l0 - 1)
    if last < 0:
        return 0
    n = last + 1
    return (l0 + (l0 - last)) * n // 2
