"""Cutting attention slices to a rectangle of (query rows x key columns), exactly.

Every distributed layout needs the part of a global mask that one (query shard, key shard) pair
sees: ring attention per step, dispatch per (query chunk, key chunk). A slice's visible keys per row
are one interval whose ends move by 0 or 1 key per row (see ``magi_kernels.ranges.types``);
clipping an end against a fixed column bound turns a slope-1 end into "slope 1, then constant" (or
the reverse), so one slice becomes at most three row segments, each again a slice of one of the
four types. Rows that end up empty are dropped, so every returned slice has a visible cell in
every row (the kernels never see degenerate slices).
"""

from __future__ import annotations

import numpy as np

from magi_kernels.ranges.types import AttnMaskType

Slices = tuple[np.ndarray, np.ndarray, np.ndarray]  # qr int64 [n, 2], kr int64 [n, 2], types int64 [n]


def empty_slices() -> Slices:
    return np.zeros((0, 2), np.int64), np.zeros((0, 2), np.int64), np.zeros(0, np.int64)


def clip_slices(qr: np.ndarray, kr: np.ndarray, ty: np.ndarray, q_lo: int, q_hi: int, k_lo: int,
                k_hi: int) -> Slices:
    """The part of the union mask ``(qr, kr, ty)`` inside rows [q_lo, q_hi) x keys [k_lo, k_hi).

    Coordinates stay global. The result covers exactly the cells of the input inside the rectangle
    (a cell covered by two input slices is covered by two output slices: union semantics keep it once).
    """
    out_q, out_k, out_t = [], [], []
    for (qs, qe), (ks, ke), t in zip(np.asarray(qr).tolist(), np.asarray(kr).tolist(), np.asarray(ty).tolist()):
        a, b = max(qs, q_lo), min(qe, q_hi)
        if a >= b:
            continue
        sl, sh = (t >> 1) & 1, t & 1
        lo_c = ks - sl * qs  # lo(q) = lo_c + sl * q before clipping
        hi_c = ke - sh * (qe - 1)  # hi(q) = hi_c + sh * q before clipping
        p_lo = k_lo - lo_c  # rows >= p_lo have lo(q) >= k_lo (only matters when sl == 1)
        p_hi = k_hi - hi_c  # rows <  p_hi have hi(q) <= k_hi (only matters when sh == 1)
        cuts = sorted({a, b} | {c for c in ((p_lo,) if sl else ()) + ((p_hi,) if sh else ()) if a < c < b})
        for r0, r1 in zip(cuts[:-1], cuts[1:]):
            lo_slope = bool(sl) and r0 >= p_lo
            hi_slope = bool(sh) and r0 < p_hi
            lo0 = lo_c + r0 if lo_slope else max(lo_c + sl * r0, k_lo)
            hi0 = hi_c + r0 if hi_slope else min(hi_c + sh * r0, k_hi)
            # visible length is linear in the row with slope hi_slope - lo_slope: keep the rows where it is > 0
            length0, d = hi0 - lo0, int(hi_slope) - int(lo_slope)
            s0, s1 = r0, r1
            if d == 0 and length0 <= 0:
                continue
            if d == 1:
                s0 = max(r0, r0 - length0 + 1)
            elif d == -1:
                s1 = min(r1, r0 + length0)
            if s0 >= s1:
                continue
            ks_new = lo0 + (s0 - r0 if lo_slope else 0)
            ke_new = hi0 + (s1 - 1 - r0 if hi_slope else 0)
            out_q.append((s0, s1))
            out_k.append((ks_new, ke_new))
            out_t.append((AttnMaskType.INV_CAUSAL if lo_slope else 0) | (AttnMaskType.CAUSAL if hi_slope else 0))
    if not out_q:
        return empty_slices()
    return (np.asarray(out_q, np.int64).reshape(-1, 2), np.asarray(out_k, np.int64).reshape(-1, 2),
            np.asarray(out_t, np.int64))


def shift_slices(s: Slices, dq: int, dk: int) -> Slices:
    """Move slices by ``dq`` rows and ``dk`` keys (global -> shard-local coordinates and back)."""
    qr, kr, ty = s
    return qr + dq, kr + dk, ty


def concat_slices(parts: list[Slices]) -> Slices:
    parts = [p for p in parts if len(p[2])]
    if not parts:
        return empty_slices()
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] for p in parts]))


def permute_slices(s: Slices, q_segments, k_segments) -> Slices:
    """Rewrite a mask for reordered tokens.

    ``q_segments`` / ``k_segments``: ``(original_start, length)`` runs of tokens in their NEW order
    (together a permutation of the rows / keys). Returns the same cells in the new coordinates."""
    def starts(segs):
        out, pos = [], 0
        for _, n in segs:
            out.append(pos)
            pos += n
        return out

    qn, kn = starts(q_segments), starts(k_segments)
    k_hi = max((a + n for a, n in k_segments), default=0)
    pieces = []
    for (a, n), na in zip(q_segments, qn):
        part = clip_slices(*s, a, a + n, 0, k_hi)
        if not len(part[2]):
            continue
        lo, hi = int(part[1][:, 0].min()), int(part[1][:, 1].max())
        for (b, m), nb in zip(k_segments, kn):
            if b >= hi or b + m <= lo:
                continue
            sub = clip_slices(*part, a, a + n, b, b + m)
            if len(sub[2]):
                pieces.append(shift_slices(sub, na - a, nb - b))
    return concat_slices(pieces)
