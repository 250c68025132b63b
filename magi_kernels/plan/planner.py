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

Only PARTIAL entries carry mask pointers, so a plan is about 2E int32 (the 24B 720p 4-chunk window at
128x128 has E = 285k entries, about 1,000 of them PARTIAL).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading

import numpy as np
import torch

from magi_kernels.ranges.types import slice_area

PLAN_KEYS_Q = ("q_ptr", "q_nfull", "q_kidx", "q_pptr", "p_mptr", "mask_slices")
PLAN_KEYS_K = ("k_ptr", "k_nfull", "k_qidx", "k_pptr", "k_pent")
PLAN_KEYS = ("slices",) + PLAN_KEYS_Q + PLAN_KEYS_K


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


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

    def q_tile_entries(self, m: int) -> list[tuple[int, bool, list[int]]]:
        """(k tile, is_full, mask slice ids) for q tile m, in plan order (debugging / the torch path)."""
        t = self.tensors
        a, b = int(t["q_ptr"][m]), int(t["q_ptr"][m + 1])
        nf = int(t["q_nfull"][m])
        out = []
        for e in range(a, b):
            if e - a < nf:
                out.append((int(t["q_kidx"][e]), True, []))
            else:
                p = int(t["q_pptr"][m]) + (e - a - nf)
                ms = t["mask_slices"][int(t["p_mptr"][p]):int(t["p_mptr"][p + 1])].tolist()
                out.append((int(t["q_kidx"][e]), False, ms))
        return out


# --------------------------------------------------------------------------------------------------
# Python planner (the fallback when _C is not built; also the executable spec the C++ one is tested against)

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


def _plan_py(qr: np.ndarray, kr: np.ndarray, ty: np.ndarray, total_q: int, total_k: int, bm: int, bn: int) -> dict:
    n_sl = qr.shape[0]
    mt, nt = _cdiv(total_q, bm), _cdiv(total_k, bn)
    per_tile: list[list] = [[] for _ in range(mt)]
    for s in range(n_sl):
        qs, qe, ks, ke, t = int(qr[s, 0]), int(qr[s, 1]), int(kr[s, 0]), int(kr[s, 1]), int(ty[s])
        rows = _nonempty_rows(qs, qe, ks, ke, t)
        if rows is None:
            continue
        f, l = rows
        for m in range(f // bm, l // bm + 1):
            per_tile[m].append((s, qs, qe, ks, ke, t, max(f, m * bm), min(l + 1, (m + 1) * bm)))

    def lo_of(r, qs, ks, t):
        return ks + (r - qs) if t & 2 else ks

    def hi_of(r, qe, ke, t):
        return ke - (qe - 1 - r) if t & 1 else ke

    q_ptr, q_nfull, q_kidx, q_pptr, p_mptr, mask_slices = [0], [], [], [0], [0], []
    for m in range(mt):
        m0, m1 = m * bm, (m + 1) * bm
        sl = per_tile[m]
        touched = []  # (na, nb, slice record)
        for rec in sl:
            s, qs, qe, ks, ke, t, ra, rb = rec
            c0, c1 = lo_of(ra, qs, ks, t), hi_of(rb - 1, qe, ke, t)
            touched.append((c0 // bn, _cdiv(c1, bn), s))
        # FULL k tiles: intersection over the tile's rows of the k tiles inside the row's union.
        full: list = []
        if sl and m1 <= total_q:
            if len(sl) == 1:
                s, qs, qe, ks, ke, t, ra, rb = sl[0]
                if ra == m0 and rb == m1:
                    a, b = _cdiv(lo_of(m1 - 1, qs, ks, t), bn), hi_of(m0, qe, ke, t) // bn
                    if a < b:
                        full = [(a, b)]
            else:
                full = None
                order = sorted(sl, key=lambda rec: rec[6])
                for r in range(m0, m1):
                    iv = []
                    for (s, qs, qe, ks, ke, t, ra, rb) in order:
                        if ra > r:
                            break
                        if r < rb:
                            iv.append((lo_of(r, qs, ks, t), hi_of(r, qe, ke, t)))
                    iv.sort()
                    tiles, cur = [], None
                    for lo, hi in iv:  # merge touching/overlapping intervals, then keep whole k tiles
                        if cur is not None and lo <= cur[1]:
                            cur[1] = max(cur[1], hi)
                        else:
                            if cur is not None:
                                tiles.append(cur)
                            cur = [lo, hi]
                    if cur is not None:
                        tiles.append(cur)
                    row_full = [(_cdiv(a, bn), b // bn) for a, b in tiles if _cdiv(a, bn) < b // bn]
                    full = row_full if full is None else _intersect(full, row_full)
                    if not full:
                        break
                full = full or []
        # touched union, minus FULL -> PARTIAL
        tu = []
        for na, nb, _ in sorted(touched):
            if tu and na <= tu[-1][1]:
                tu[-1][1] = max(tu[-1][1], nb)
            else:
                tu.append([na, nb])
        full_set_iv = full
        for a, b in full_set_iv:
            q_kidx.extend(range(a, b))
        nfull = sum(b - a for a, b in full_set_iv)
        j = 0
        for a, b in tu:
            n = a
            while n < b:
                while j < len(full_set_iv) and full_set_iv[j][1] <= n:
                    j += 1
                if j < len(full_set_iv) and full_set_iv[j][0] <= n:
                    n = full_set_iv[j][1]
                    continue
                stop = b if j >= len(full_set_iv) else min(b, full_set_iv[j][0])
                for nn in range(n, stop):
                    q_kidx.append(nn)
                    mask_slices.extend(s for na, nb, s in touched if na <= nn < nb)
                    p_mptr.append(len(mask_slices))
                n = stop
        q_nfull.append(nfull)
        q_ptr.append(len(q_kidx))
        q_pptr.append(len(p_mptr) - 1)
    # The per-tile touched list is in slice-id order already (slices were appended in id order),
    # so mask slice ids are ascending per entry.
    q_ptr = np.asarray(q_ptr, np.int32)
    q_nfull = np.asarray(q_nfull, np.int32).reshape(mt)
    q_kidx = np.asarray(q_kidx, np.int32)
    q_pptr = np.asarray(q_pptr, np.int32)
    return {**_qmajor_to_kmajor(q_ptr, q_nfull, q_kidx, q_pptr, nt), "q_ptr": q_ptr, "q_nfull": q_nfull,
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

    qr, kr, ty = validate_ranges(q_ranges, k_ranges, attn_type_map, total_q=total_q, total_k=total_k, op="plan_attention")
    fn = get_plan if cache else build_plan
    return fn(qr, kr, ty, total_q, total_k, block_m, block_n, planner)


def cache_info() -> dict:
    with _CACHE_LOCK:
        return {"size": len(_CACHE), "capacity": CACHE_SIZE, **_STATS}


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()
        _STATS.update(hits=0, misses=0)


__all__ = ["AttnPlan", "build_plan", "get_plan", "plan_attention", "cache_info", "clear_cache", "native_planner",
           "slice_area"]
