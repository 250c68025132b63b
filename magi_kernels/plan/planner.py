"""Block-sparse attention plan: which (q tile, k tile) pairs to compute, which need masking.

FlexAttention's BlockMask idea, derived analytically from slices instead of by evaluating a mask.

Definitions (both planners, Python here and C++ in ``csrc/host/attn_plan.cpp``, produce exactly this;
the plan is a pure function of the mask, so they must agree bit for bit):

- q tile m covers rows ``[m*BM, (m+1)*BM)``, k tile n covers keys ``[n*BN, (n+1)*BN)``;
  ``Mt = ceil(total_q/BM)``, ``Nt = ceil(total_k/BN)``.
- (m, n) is **visited** iff at least one cell of the tile is visible under the union of slices.
  No tile without a visible cell is ever emitted.
- A visited tile is **FULL** iff the tile lies entirely inside ``[0,total_q) x [0,total_k)`` and every
  cell is visible under the union (a cell two slices cover counts once). A FULL tile needs no mask
  and no bounds checks. Every other visited tile is **PARTIAL**.
- A PARTIAL tile carries the ids (ascending) of the slices that have a visible cell in it. The kernel
  builds the tile's mask as the OR over those slices of ``qs <= r < qe and lo_s(r) <= c < hi_s(r)``
  (``AttnMaskType`` docstring), reading ``slices[s] = (qs, qe, ks, ke, type)``. This represents any
  union exactly, including rows with several disjoint intervals; cost per PARTIAL tile is one
  ``[BM, BN]`` compare-and-or per listed slice (almost always 1, at most a handful on real masks),
  and out-of-range rows/cols are excluded for free because slices lie inside the bounds.

Flat int32 tensors (CSR), E entries of which P are PARTIAL:

  q-major (forward, dQ)   q_ptr [Mt+1], q_nfull [Mt], q_kidx [E], q_pptr [Mt+1]
      entries of q tile m are e in [q_ptr[m], q_ptr[m+1]); the first q_nfull[m] are FULL, ascending in
      k tile; the rest are PARTIAL, ascending in k tile; q_kidx[e] = k tile. PARTIAL entries are numbered
      p = 0..P-1 in this order: the i-th PARTIAL entry of q tile m is p = q_pptr[m] + i.
  PARTIAL masks           p_mptr [P+1], mask_slices [S]
      slice ids of PARTIAL p are mask_slices[p_mptr[p] : p_mptr[p+1]] (ascending, >= 1 of them).
  k-major (dK/dV)         k_ptr [Nt+1], k_nfull [Nt], k_qidx [E], k_pptr [Nt+1], k_pent [P]
      the same entries grouped by k tile: f in [k_ptr[n], k_ptr[n+1]), the first k_nfull[n] FULL, then
      PARTIAL, each ascending in q tile; k_qidx[f] = q tile; the i-th PARTIAL of k tile n has partial id
      k_pent[k_pptr[n] + i] (for its mask slices).
  slices [n, 5]           (qs, qe, ks, ke, type) of the input slices (ids index this table).
  FULL runs (fwd, dQ)     q_rptr [Mt+1], r_lo [R], r_hi [R]
      the FULL entries of q tile m as maximal runs of consecutive k tiles: runs r in [q_rptr[m], q_rptr[m+1]),
      run r covers k tiles [r_lo[r], r_hi[r]), in entry order. Derived from q_ptr/q_nfull/q_kidx (one copy for
      both planners): with them the kernel's FULL loop walks k tiles by an affine index, which Triton's
      software pipeliner can prefetch one stage deeper than an index it must first load from the plan.
  k-major FULL runs (dK/dV)  k_rptr [Nt+1], kr_lo [RK], kr_hi [RK]
      the same for the k-major lists: the FULL entries of k tile n as maximal runs of consecutive q tiles,
      runs r in [k_rptr[n], k_rptr[n+1]), run r covers q tiles [kr_lo[r], kr_hi[r]). Derived from
      k_ptr/k_nfull/k_qidx by the same function, so again one copy for both planners.
  launch order (forward, dQ) q_order [Mt]
      q tiles heaviest first (FULL entries + 2 x PARTIAL entries, ties by tile index): program i of a q-major
      kernel works on q tile q_order[i], so the long tiles start first and the launch ends on short ones.
  PARTIAL row bounds (forward)   q_bptr [Mt+1], b_kidx [B], b_rows [B, 2, BM]
      the PARTIAL tiles of q tile m as bound entries b in [q_bptr[m], q_bptr[m+1]), in entry order: k tile
      b_kidx[b], and for each tile row i the visible keys as one interval [b_rows[b,0,i], b_rows[b,1,i]) in
      global key indices (empty: both 0): the union of the tile's slices, clipped to the tile, merged per row.
      A tile one of whose rows sees several disjoint intervals is listed once per interval (the j-th copy holds
      each row's j-th interval: disjoint cells, so no key counts twice). The forward builds its PARTIAL mask
      from these with no loop and no per-slice load. Derived from the arrays above (one copy for both planners).
  PARTIAL row-bound runs (forward) q_brptr [Mt+1], br_lo [RB], br_hi [RB]
      the bound entries of q tile m as maximal runs of consecutive k tiles (a tile listed once per interval
      starts a new run at each copy): runs r in [q_brptr[m], q_brptr[m+1]), run r covers k tiles
      [br_lo[r], br_hi[r]) and the next br_hi[r] - br_lo[r] bound entries, from q_bptr[m] on in run order. The
      forward walks them like the FULL runs: with the k tile index affine, no index load is left in its PARTIAL
      loop. Built by the same function as the FULL runs, from q_bptr and b_kidx.
  PARTIAL q tiles (sm_90 forward) q_partial [Mp], q_slot [Mt]
      the q tiles with at least one PARTIAL entry, most PARTIAL entries first (ties by tile index), and for each
      q tile its position in q_partial (-1 for none). The sm_90 forward runs FULL and PARTIAL tiles in two
      passes; the q tiles of q_partial hand their softmax state from one to the other in slot q_slot[m].

Only PARTIAL entries carry mask pointers, so a plan is about 2E int32 (the 24B 720p 4-chunk window at
128x128 has E = 285k entries, about 1,000 of them PARTIAL).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
from typing import NamedTuple

import numpy as np
import torch


PLAN_KEYS_Q = ("q_ptr", "q_nfull", "q_kidx", "q_pptr", "p_mptr", "mask_slices")
PLAN_KEYS_K = ("k_ptr", "k_nfull", "k_qidx", "k_pptr", "k_pent")
PLAN_KEYS_RUNS = ("q_rptr", "r_lo", "r_hi", "q_order", "q_partial", "q_slot", "q_bptr", "b_kidx", "b_rows", "k_rptr",
                  "kr_lo", "kr_hi", "q_brptr", "br_lo", "br_hi")
PLAN_KEYS = ("slices",) + PLAN_KEYS_Q + PLAN_KEYS_K + PLAN_KEYS_RUNS


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class PlanEntry(NamedTuple):
    """One (q tile, k tile) entry of a plan, as :meth:`AttnPlan.q_tile_entries` lists them."""

    k_tile: int
    full: bool  # every cell visible and in bounds: no mask
    mask_slices: list[int]  # PARTIAL: ids of the slices whose union is the tile's mask


@dataclasses.dataclass
class AttnPlan:
    block_m: int
    block_n: int
    total_q: int
    total_k: int
    tensors: dict  # name -> CPU int32 torch tensor (see module docstring)
    planner: str = "python"
    _on_device: dict = dataclasses.field(default_factory=dict, repr=False)

    def __getattr__(self, name):
        t = self.__dict__.get("tensors")
        if t is not None and name in t:
            return t[name]
        raise AttributeError(name)

    @property
    def num_q_tiles(self) -> int:
        return self.tensors["q_ptr"].numel() - 1

    @property
    def num_k_tiles(self) -> int:
        return self.tensors["k_ptr"].numel() - 1

    @property
    def num_entries(self) -> int:
        return self.tensors["q_kidx"].numel()

    @property
    def num_full(self) -> int:
        return int(self.tensors["q_nfull"].sum())

    @property
    def num_partial(self) -> int:
        return self.num_entries - self.num_full

    def on(self, device) -> dict:
        """The plan tensors on ``device`` (copied once per device and kept)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.tensors
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = {k: v.to(device, non_blocking=False) for k, v in self.tensors.items()}
        return self._on_device[key]

    def area(self) -> int:
        from magi_kernels.plan.stats import union_area

        s = self.tensors["slices"]
        return union_area(s[:, 0:2], s[:, 2:4], s[:, 4])

    def q_tile_entries(self, m: int) -> list[PlanEntry]:
        """The entries of q tile m, in plan order (debugging / the torch path)."""
        t = self.tensors
        first, end = int(t["q_ptr"][m]), int(t["q_ptr"][m + 1])
        nfull = int(t["q_nfull"][m])
        out = []
        for e in range(first, end):
            if e - first < nfull:
                out.append(PlanEntry(int(t["q_kidx"][e]), True, []))
            else:
                p = int(t["q_pptr"][m]) + (e - first - nfull)
                ids = t["mask_slices"][int(t["p_mptr"][p]):int(t["p_mptr"][p + 1])].tolist()
                out.append(PlanEntry(int(t["q_kidx"][e]), False, ids))
        return out


# --------------------------------------------------------------------------------------------------
# Python planner (the fallback when _C is not built; also the executable spec the C++ one is tested against)

class _SliceInTile(NamedTuple):
    """A slice's share of one q tile: the slice and the tile rows ``[row_start, row_end)`` where it is non-empty."""

    slice_id: int
    q_start: int
    q_end: int
    k_start: int
    k_end: int
    mask_type: int
    row_start: int
    row_end: int

    def lo(self, r: int) -> int:
        """First visible key of row r (INV_CAUSAL / BI_CAUSAL: bit 1 moves it with the row)."""
        return self.k_start + (r - self.q_start) if self.mask_type & 2 else self.k_start

    def hi(self, r: int) -> int:
        """One past the last visible key of row r (CAUSAL / BI_CAUSAL: bit 0 moves it with the row)."""
        return self.k_end - (self.q_end - 1 - r) if self.mask_type & 1 else self.k_end


class _TouchedKTiles(NamedTuple):
    """The k tiles ``[first, end)`` a slice has visible cells in, within one q tile."""

    first: int
    end: int
    slice_id: int


def _nonempty_rows(qs, qe, ks, ke, t):
    """Global row range [f, l] where the slice's row interval is non-empty, or None."""
    sq, sk = qe - qs, ke - ks
    if sq <= 0 or sk <= 0:
        return None
    cau, inv = t & 1, (t >> 1) & 1
    l0 = sk - (sq - 1) * cau  # length of the first row
    slope = cau - inv
    if slope == 0:
        return (qs, qe - 1) if l0 > 0 else None
    if slope > 0:
        f = qs + max(0, 1 - l0)
        return (f, qe - 1) if f <= qe - 1 else None
    last = qs + min(sq - 1, l0 - 1)
    return (qs, last) if last >= qs else None


def _intersect(a, b):
    """Intersection of two sorted disjoint interval lists."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _merge(intervals) -> list[list[int]]:
    """Sorted intervals -> the union as disjoint [lo, hi) lists (touching intervals merge)."""
    merged: list[list[int]] = []
    for lo, hi in intervals:
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return merged


def _full_ktiles(parts: list[_SliceInTile], m0: int, m1: int, bn: int) -> list[tuple[int, int]]:
    """[a, b) runs of k tiles every row of q tile rows [m0, m1) sees entirely (the tile is in bounds)."""
    if len(parts) == 1:
        p = parts[0]
        if p.row_start == m0 and p.row_end == m1:
            first, end = _cdiv(p.lo(m1 - 1), bn), p.hi(m0) // bn
            if first < end:
                return [(first, end)]
        return []
    full = None
    by_start = sorted(parts, key=lambda p: p.row_start)
    for r in range(m0, m1):
        row = sorted((p.lo(r), p.hi(r)) for p in by_start if p.row_start <= r < p.row_end)
        row_full = [(_cdiv(lo, bn), hi // bn) for lo, hi in _merge(row) if _cdiv(lo, bn) < hi // bn]
        full = row_full if full is None else _intersect(full, row_full)
        if not full:
            return []
    return full or []


def _plan_py(qr: np.ndarray, kr: np.ndarray, ty: np.ndarray, total_q: int, total_k: int, bm: int, bn: int) -> dict:
    num_q_tiles, num_k_tiles = _cdiv(total_q, bm), _cdiv(total_k, bn)
    parts_of_tile: list[list[_SliceInTile]] = [[] for _ in range(num_q_tiles)]
    for s in range(qr.shape[0]):
        qs, qe, ks, ke, t = int(qr[s, 0]), int(qr[s, 1]), int(kr[s, 0]), int(kr[s, 1]), int(ty[s])
        rows = _nonempty_rows(qs, qe, ks, ke, t)
        if rows is None:
            continue
        first_row, last_row = rows
        for m in range(first_row // bm, last_row // bm + 1):
            parts_of_tile[m].append(_SliceInTile(s, qs, qe, ks, ke, t, max(first_row, m * bm),
                                                 min(last_row + 1, (m + 1) * bm)))

    q_ptr, q_nfull, q_kidx, q_pptr, p_mptr, mask_slices = [0], [], [], [0], [0], []
    for m in range(num_q_tiles):
        m0, m1 = m * bm, (m + 1) * bm
        parts = parts_of_tile[m]  # in slice-id order, so mask slice ids come out ascending
        touched = [_TouchedKTiles(p.lo(p.row_start) // bn, _cdiv(p.hi(p.row_end - 1), bn), p.slice_id) for p in parts]
        full = _full_ktiles(parts, m0, m1, bn) if parts and m1 <= total_q else []
        for first, end in full:
            q_kidx.extend(range(first, end))
        # PARTIAL: every touched k tile that is not FULL, ascending; its mask lists the slices touching it.
        j = 0
        for first, end in _merge(sorted((t.first, t.end) for t in touched)):
            n = first
            while n < end:
                while j < len(full) and full[j][1] <= n:
                    j += 1
                if j < len(full) and full[j][0] <= n:
                    n = full[j][1]
                    continue
                stop = end if j >= len(full) else min(end, full[j][0])
                for kt in range(n, stop):
                    q_kidx.append(kt)
                    mask_slices.extend(t.slice_id for t in touched if t.first <= kt < t.end)
                    p_mptr.append(len(mask_slices))
                n = stop
        q_nfull.append(sum(end - first for first, end in full))
        q_ptr.append(len(q_kidx))
        q_pptr.append(len(p_mptr) - 1)
    q_ptr = np.asarray(q_ptr, np.int32)
    q_nfull = np.asarray(q_nfull, np.int32).reshape(num_q_tiles)
    q_kidx = np.asarray(q_kidx, np.int32)
    q_pptr = np.asarray(q_pptr, np.int32)
    return {**_qmajor_to_kmajor(q_ptr, q_nfull, q_kidx, q_pptr, num_k_tiles), "q_ptr": q_ptr, "q_nfull": q_nfull,
            "q_kidx": q_kidx, "q_pptr": q_pptr, "p_mptr": np.asarray(p_mptr, np.int32),
            "mask_slices": np.asarray(mask_slices, np.int32)}


def _qmajor_to_kmajor(q_ptr, q_nfull, q_kidx, q_pptr, nt):
    """Group entries by k tile: FULL first, then PARTIAL, each ascending in q tile."""
    e = q_kidx.size
    mt = q_nfull.size
    qt = np.repeat(np.arange(mt, dtype=np.int64), np.diff(q_ptr.astype(np.int64)))
    pos = np.arange(e, dtype=np.int64) - q_ptr[:-1].astype(np.int64)[qt]
    nf = q_nfull.astype(np.int64)[qt]
    partial = pos >= nf
    pid = q_pptr[:-1].astype(np.int64)[qt] + pos - nf  # partial id (meaningful where partial)
    kk = q_kidx.astype(np.int64)
    order = np.lexsort((qt, partial.astype(np.int64), kk))
    k_ptr = np.concatenate([[0], np.cumsum(np.bincount(kk, minlength=nt))]).astype(np.int32)
    k_nfull = np.bincount(kk[~partial], minlength=nt).astype(np.int32)
    k_pptr = np.concatenate([[0], np.cumsum(np.bincount(kk[partial], minlength=nt))]).astype(np.int32)
    op = order[partial[order]]  # k-major order restricted to PARTIAL entries
    return {"k_ptr": k_ptr, "k_nfull": k_nfull.reshape(nt), "k_qidx": qt[order].astype(np.int32),
            "k_pptr": k_pptr, "k_pent": pid[op].astype(np.int32)}


# --------------------------------------------------------------------------------------------------
# Entry point: native planner when available, LRU cache keyed by content.

_CACHE: "collections.OrderedDict[tuple, AttnPlan]" = collections.OrderedDict()
_CACHE_LOCK = threading.Lock()
CACHE_SIZE = int(os.environ.get("MAGI_PLAN_CACHE_SIZE", "64"))
_STATS = {"hits": 0, "misses": 0}


def native_planner():
    """``_C.host.plan_attention`` or None."""
    from magi_kernels._ext import native

    mod = native()
    return getattr(getattr(mod, "host", None), "plan_attention", None) if mod is not None else None


def full_runs(q_ptr, q_nfull, q_kidx) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q_rptr, r_lo, r_hi): each q tile's FULL entries as maximal runs of consecutive k tiles (module docstring).

    The k-major lists have the same shape (k_ptr, k_nfull, k_qidx: FULL entries first, ascending), so the same
    call gives (k_rptr, kr_lo, kr_hi), each k tile's FULL entries as runs of consecutive q tiles.
    """
    q_ptr, q_nfull, q_kidx = (np.asarray(a, dtype=np.int64) for a in (q_ptr, q_nfull, q_kidx))
    nt = q_nfull.shape[0]
    tile = np.repeat(np.arange(nt), q_nfull)  # q tile of each FULL entry, in entry order
    first = np.repeat(q_ptr[:-1] - np.concatenate([[0], np.cumsum(q_nfull)[:-1]]), q_nfull)
    k = q_kidx[first + np.arange(tile.shape[0])]  # FULL entries are the first q_nfull[m] of tile m
    starts = np.ones(k.shape[0], dtype=bool)
    starts[1:] = (tile[1:] != tile[:-1]) | (k[1:] != k[:-1] + 1)
    at = np.nonzero(starts)[0]
    ends = np.append(at[1:], k.shape[0])[:at.shape[0]] - 1  # last entry of each run (none without FULL tiles)
    counts = np.bincount(tile[at], minlength=nt)
    q_rptr = np.concatenate([[0], np.cumsum(counts)])
    return tuple(np.ascontiguousarray(a, dtype=np.int32) for a in (q_rptr, k[at], k[ends] + 1))


def heaviest_first(q_ptr, q_nfull) -> np.ndarray:
    """q tiles ordered by descending work, FULL entries + 2 x PARTIAL entries (a PARTIAL tile also builds its
    mask); ties keep tile order. int32 [Mt]."""
    q_ptr, q_nfull = np.asarray(q_ptr, dtype=np.int64), np.asarray(q_nfull, dtype=np.int64)
    work = 2 * (q_ptr[1:] - q_ptr[:-1]) - q_nfull
    return np.argsort(-work, kind="stable").astype(np.int32)


def partial_q_tiles(q_ptr, q_nfull) -> tuple[np.ndarray, np.ndarray]:
    """(q_partial, q_slot): the q tiles that have PARTIAL entries, most first (ties keep tile order), and each q
    tile's position in that list, -1 where it has none (module docstring). int32 [Mp] and [Mt]."""
    q_ptr, q_nfull = np.asarray(q_ptr, dtype=np.int64), np.asarray(q_nfull, dtype=np.int64)
    n_partial = q_ptr[1:] - q_ptr[:-1] - q_nfull
    order = np.argsort(-n_partial, kind="stable")
    q_partial = order[n_partial[order] > 0]
    q_slot = np.full(n_partial.shape[0], -1, dtype=np.int64)
    q_slot[q_partial] = np.arange(q_partial.shape[0])
    return q_partial.astype(np.int32), q_slot.astype(np.int32)


def _merge_row_intervals(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Union per column i of the intervals [lo[s, i], hi[s, i]) over s (lo >= hi: empty). Returns (lo, hi, count):
    column i's merged intervals, ascending, in rows [0, count[i]) of lo and hi (the other rows 0)."""
    empty = lo >= hi
    order = np.argsort(np.where(empty, np.iinfo(np.int64).max, lo), axis=0, kind="stable")
    lo, hi, empty = (np.take_along_axis(a, order, axis=0) for a in (lo, hi, empty))
    cols = np.arange(lo.shape[1])
    out_lo, out_hi = np.zeros_like(lo), np.zeros_like(hi)
    count = np.zeros(lo.shape[1], dtype=np.int64)
    cur_lo, cur_hi = np.zeros_like(count), np.zeros_like(count)  # the interval being merged, where `have`
    have = np.zeros(lo.shape[1], dtype=bool)
    for s in range(lo.shape[0]):
        take = ~empty[s]
        new = take & (~have | (lo[s] > cur_hi))  # starts a new interval (touching ones merge)
        done = new & have  # ... so the current one is complete
        out_lo[count[done], cols[done]], out_hi[count[done], cols[done]] = cur_lo[done], cur_hi[done]
        count += done
        grow = take & ~new
        cur_hi = np.where(new, hi[s], np.where(grow, np.maximum(cur_hi, hi[s]), cur_hi))
        cur_lo = np.where(new, lo[s], cur_lo)
        have |= take
    out_lo[count[have], cols[have]], out_hi[count[have], cols[have]] = cur_lo[have], cur_hi[have]
    return out_lo, out_hi, count + have


def partial_row_bounds(arrays: dict, slices: np.ndarray, total_k: int, bm: int, bn: int) -> tuple[np.ndarray, ...]:
    """(q_bptr, b_kidx, b_rows): each PARTIAL tile's visible keys as one interval per row, the tile repeated for
    rows that see several (module docstring), from the q-major lists and the slice table [n, 5]
    (qs, qe, ks, ke, type)."""
    q_ptr, q_nfull, q_kidx, q_pptr, p_mptr, mask_slices = (np.asarray(arrays[k], dtype=np.int64) for k in (
        "q_ptr", "q_nfull", "q_kidx", "q_pptr", "p_mptr", "mask_slices"))
    slices = np.asarray(slices, dtype=np.int64).reshape(-1, 5)
    n_tiles, n_parts = q_nfull.shape[0], p_mptr.shape[0] - 1
    tile = np.repeat(np.arange(n_tiles), np.diff(q_pptr))  # q tile of each PARTIAL entry
    ktile = q_kidx[q_ptr[tile] + q_nfull[tile] + np.arange(n_parts) - q_pptr[tile]]
    # One row of intervals per (PARTIAL entry, slice) pair: the slice's keys per tile row, clipped to the k tile.
    part = np.repeat(np.arange(n_parts), np.diff(p_mptr))
    qs, qe, ks, ke, ty = (slices[mask_slices, i][:, None] for i in range(5))
    r = (tile[part] * bm)[:, None] + np.arange(bm)[None, :]
    lo = np.maximum(ks + (r - qs) * ((ty >> 1) & 1), (ktile[part] * bn)[:, None])
    hi = np.minimum(ke - (qe - 1 - r) * (ty & 1), np.minimum(ktile[part] * bn + bn, total_k)[:, None])
    keep = (r >= qs) & (r < qe) & (lo < hi)
    lo, hi = np.where(keep, lo, 0), np.where(keep, hi, 0)
    # An entry with one slice has one interval per row. The others merge theirs per row; a row with several
    # disjoint intervals makes its entry one bound entry per interval.
    copies = np.ones(n_parts, dtype=np.int64)
    merged = {}
    for p in np.nonzero(np.diff(p_mptr) > 1)[0]:
        mlo, mhi, count = _merge_row_intervals(lo[p_mptr[p]:p_mptr[p + 1]], hi[p_mptr[p]:p_mptr[p + 1]])
        copies[p] = int(count.max())
        merged[p] = np.stack([mlo[:copies[p]], mhi[:copies[p]]], axis=1)  # [copies, 2, bm]
    first = np.cumsum(copies) - copies  # each PARTIAL entry's first bound entry
    b_rows = np.zeros((int(copies.sum()), 2, bm), dtype=np.int64)
    single = np.diff(p_mptr) == 1
    b_rows[first[single], 0], b_rows[first[single], 1] = lo[p_mptr[:-1][single]], hi[p_mptr[:-1][single]]
    for p, intervals in merged.items():
        b_rows[first[p]:first[p] + copies[p]] = intervals
    q_bptr = np.concatenate([[0], np.cumsum(np.bincount(tile, weights=copies, minlength=n_tiles))])
    return tuple(np.ascontiguousarray(a, dtype=np.int32) for a in (q_bptr, np.repeat(ktile, copies), b_rows))


def build_plan(qr: np.ndarray, kr: np.ndarray, ty: np.ndarray, total_q: int, total_k: int, block_m: int = 128,
               block_n: int = 128, planner: str = "auto") -> AttnPlan:
    """Plan from validated host arrays, uncached. ``planner``: "auto" (native if built), "native", "python"."""
    if block_m <= 0 or block_n <= 0:
        raise ValueError(f"block_m/block_n must be > 0, got {block_m}x{block_n}")
    qr = np.ascontiguousarray(qr, dtype=np.int32).reshape(-1, 2)
    kr = np.ascontiguousarray(kr, dtype=np.int32).reshape(-1, 2)
    ty = np.ascontiguousarray(ty, dtype=np.int32).reshape(-1)
    fn = native_planner() if planner in ("auto", "native") else None
    if planner == "native" and fn is None:
        raise RuntimeError("planner='native' needs magi_kernels._C (host planner), which is not built")
    if fn is not None:
        arrays, used = fn(qr, kr, ty, int(total_q), int(total_k), int(block_m), int(block_n)), "native"
    else:
        arrays, used = _plan_py(qr, kr, ty, int(total_q), int(total_k), int(block_m), int(block_n)), "python"
    tensors = {"slices": torch.from_numpy(np.concatenate([qr, kr, ty[:, None]], axis=1).astype(np.int32))}
    for k in PLAN_KEYS_Q + PLAN_KEYS_K:
        tensors[k] = torch.from_numpy(np.ascontiguousarray(arrays[k], dtype=np.int32))
    runs = full_runs(arrays["q_ptr"], arrays["q_nfull"], arrays["q_kidx"]) + (
        heaviest_first(arrays["q_ptr"], arrays["q_nfull"]),) + partial_q_tiles(arrays["q_ptr"], arrays["q_nfull"]) + (
        partial_row_bounds(arrays, tensors["slices"].numpy(), int(total_k), int(block_m), int(block_n))) + (
        full_runs(arrays["k_ptr"], arrays["k_nfull"], arrays["k_qidx"]))
    q_bptr, b_kidx = runs[6], runs[7]  # every bound entry of a q tile is in a run, so n_full = all of them
    runs += full_runs(q_bptr, np.diff(q_bptr), b_kidx)
    for k, a in zip(PLAN_KEYS_RUNS, runs):
        tensors[k] = torch.from_numpy(a)
    return AttnPlan(int(block_m), int(block_n), int(total_q), int(total_k), tensors, used)


def get_plan(qr: np.ndarray, kr: np.ndarray, ty: np.ndarray, total_q: int, total_k: int, block_m: int = 128,
             block_n: int = 128, planner: str = "auto") -> AttnPlan:
    """Cached :func:`build_plan`: a model's many layers with the same ranges plan once per step."""
    qr = np.ascontiguousarray(qr, dtype=np.int32)
    kr = np.ascontiguousarray(kr, dtype=np.int32)
    ty = np.ascontiguousarray(ty, dtype=np.int32)
    key = (qr.tobytes(), kr.tobytes(), ty.tobytes(), int(total_q), int(total_k), int(block_m), int(block_n), planner)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            _STATS["hits"] += 1
            return hit
    plan = build_plan(qr, kr, ty, total_q, total_k, block_m, block_n, planner)
    with _CACHE_LOCK:
        _STATS["misses"] += 1
        _CACHE[key] = plan
        while len(_CACHE) > max(1, CACHE_SIZE):
            _CACHE.popitem(last=False)
    return plan


def plan_attention(q_ranges, k_ranges, attn_type_map=None, *, total_q: int, total_k: int, block_m: int = 128,
                   block_n: int = 128, planner: str = "auto", cache: bool = True) -> AttnPlan:
    """Validate ranges (tensors) and return the (cached) plan."""
    from magi_kernels.ranges.validate import validate_ranges

    qr, kr, ty = validate_ranges(q_ranges, k_ranges, attn_type_map, total_q=total_q, total_k=total_k,
                                 op="plan_attention")
    fn = get_plan if cache else build_plan
    return fn(qr, kr, ty, total_q, total_k, block_m, block_n, planner)


def cache_info() -> dict:
    with _CACHE_LOCK:
        return {"size": len(_CACHE), "capacity": CACHE_SIZE, **_STATS}


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()
        _STATS.update(hits=0, misses=0)


__all__ = ["AttnPlan", "PlanEntry", "build_plan", "full_runs", "heaviest_first", "partial_q_tiles",
           "partial_row_bounds", "get_plan",
           "plan_attention", "cache_info", "clear_cache", "native_planner"]
