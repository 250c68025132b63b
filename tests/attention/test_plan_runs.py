"""The plan's FULL runs (q_rptr, r_lo, r_hi): each q tile's FULL entries as maximal runs of consecutive k tiles,
which the Triton forward and dQ kernels walk by an affine tile index instead of reading q_kidx per tile, and the
k-major ones (k_rptr, kr_lo, kr_hi) the dK/dV kernel walks the same way; and its launch order
(q_order), heaviest q tile first; and the q tiles with PARTIAL entries (q_partial, q_slot) through which the sm_90
forward's two passes hand over their softmax state; and the PARTIAL tiles' per-row key intervals (q_bptr, b_kidx,
b_rows) from which the forward builds its masks, with their runs of consecutive k tiles (q_brptr, br_lo, br_hi)."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from magi_kernels.plan import build_plan, native_planner
from magi_kernels.plan.planner import full_runs, heaviest_first, partial_q_tiles

from ._helpers import dense_mask, slice_layouts

PLANNERS = ["python"] + (["native"] if native_planner() is not None else [])


# Random slice layouts and tile shapes, through both planners (128 keys: the sm_90 dK/dV tile, ragged at 300 tokens).
PLANS = dict(layout=slice_layouts(max_tokens=300, max_slices=12), bm=st.sampled_from([1, 4, 16, 64]),
             bn=st.sampled_from([1, 5, 16, 64, 128]), planner=st.sampled_from(PLANNERS))


def _plan_arrays(layout, bm, bn, planner) -> dict:
    qr, kr, ty, tq, tk = layout
    return {k: v.numpy() for k, v in build_plan(qr, kr, ty, tq, tk, bm, bn, planner=planner).tensors.items()}


def _assert_runs_expand_to(t: dict, names: tuple[str, str, str], i: int, want: list) -> None:
    """Tile i's runs (names: pointer, lo, hi arrays) expand to exactly ``want``, in order; none is empty and no two
    neighbours could merge (maximal)."""
    rptr, lo, hi = (t[n] for n in names)
    runs = list(range(rptr[i], rptr[i + 1]))
    got = [x for r in runs for x in range(lo[r], hi[r])]
    assert got == want, (names, i, got, want)
    assert all(lo[r] < hi[r] for r in runs)
    assert all(hi[a] != lo[b] for a, b in zip(runs, runs[1:]))


# q-major: each q tile's FULL k tiles (forward, dQ); k-major: each k tile's FULL q tiles, which the dK/dV kernel
# sums in the same order. (entry pointer, FULL count, tile index; run pointer, lo, hi)
MAJORS = {"q": ("q_ptr", "q_nfull", "q_kidx", "q_rptr", "r_lo", "r_hi"),
          "k": ("k_ptr", "k_nfull", "k_qidx", "k_rptr", "kr_lo", "kr_hi")}


@pytest.mark.parametrize("major", list(MAJORS))
@settings(max_examples=150, deadline=None)
@given(**PLANS)
def test_runs_expand_to_exactly_the_full_entries_and_are_maximal(major, layout, bm, bn, planner):
    ptr, nfull, idx, *runs = MAJORS[major]
    t = _plan_arrays(layout, bm, bn, planner)
    assert t[runs[0]].shape == t[ptr].shape and t[runs[0]][0] == 0
    for i in range(t[nfull].shape[0]):
        e0 = t[ptr][i]
        _assert_runs_expand_to(t, tuple(runs), i, t[idx][e0:e0 + t[nfull][i]].tolist())
    assert all(t[k].dtype == np.int32 for k in runs)


def test_runs_of_hand_made_entry_lists():
    # tile 0: FULL 3,4,5,7 then a PARTIAL 9; tile 1: none; tile 2: FULL 0 and 2.
    q_ptr, q_nfull, q_kidx = [0, 5, 5, 7], [4, 0, 2], [3, 4, 5, 7, 9, 0, 2]
    q_rptr, lo, hi = full_runs(q_ptr, q_nfull, q_kidx)
    assert q_rptr.tolist() == [0, 2, 2, 4] and lo.tolist() == [3, 7, 0, 2] and hi.tolist() == [6, 8, 1, 3]
    q_rptr, lo, hi = full_runs([0, 0], [0], [])
    assert q_rptr.tolist() == [0, 0] and lo.size == 0 and hi.size == 0
    assert all(a.dtype == np.int32 for a in (q_rptr, lo, hi))


@settings(max_examples=100, deadline=None)
@given(**PLANS)
def test_launch_order_is_a_permutation_heaviest_first(layout, bm, bn, planner):
    t = _plan_arrays(layout, bm, bn, planner)
    order = t["q_order"].tolist()
    assert sorted(order) == list(range(t["q_nfull"].shape[0]))
    n_entries = np.diff(t["q_ptr"])
    work = [2 * int(n_entries[m]) - int(t["q_nfull"][m]) for m in order]  # FULL + 2 x PARTIAL
    assert all(a > b or (a == b and i < j) for (a, i), (b, j) in zip(zip(work, order), zip(work[1:], order[1:])))


def test_launch_order_puts_partial_heavy_tiles_first():
    assert heaviest_first([0, 1, 4, 6, 6], [1, 3, 0, 0]).tolist() == [2, 1, 0, 3]  # work 1, 3, 4, 0


@settings(max_examples=100, deadline=None)
@given(**PLANS)
def test_partial_tiles_list_every_q_tile_with_a_partial_entry_once_most_first(layout, bm, bn, planner):
    t = _plan_arrays(layout, bm, bn, planner)
    n_partial = np.diff(t["q_ptr"]) - t["q_nfull"]
    listed = t["q_partial"].tolist()
    assert sorted(listed) == np.nonzero(n_partial > 0)[0].tolist()
    counts = [int(n_partial[m]) for m in listed]
    assert all(a > b or (a == b and i < j) for (a, i), (b, j) in zip(zip(counts, listed), zip(counts[1:], listed[1:])))
    assert t["q_slot"].shape == t["q_nfull"].shape
    assert [int(t["q_slot"][m]) for m in listed] == list(range(len(listed)))
    assert (t["q_slot"][n_partial == 0] == -1).all()


def test_partial_tiles_of_hand_made_entry_lists():
    # tile 0: 2 FULL + 1 PARTIAL; tile 1: only FULL; tile 2: 2 PARTIAL; tile 3: nothing; tile 4: 1 PARTIAL.
    q_partial, q_slot = partial_q_tiles([0, 3, 4, 6, 6, 7], [2, 1, 0, 0, 0])
    assert q_partial.tolist() == [2, 0, 4] and q_slot.tolist() == [1, -1, 0, -1, 2]
    q_partial, q_slot = partial_q_tiles([0], [])
    assert q_partial.size == 0 and q_slot.size == 0
    assert q_partial.dtype == np.int32 and q_slot.dtype == np.int32


def _union_mask(layout) -> np.ndarray:
    qr, kr, ty, tq, tk = layout
    return dense_mask(qr, kr, ty, tq, tk).numpy()


@settings(max_examples=150, deadline=None)
@given(**PLANS)
def test_row_bounds_rebuild_exactly_each_partial_tiles_mask(layout, bm, bn, planner):
    """Expanding every bound entry of a q tile gives each PARTIAL tile's union mask, each cell once."""
    t = _plan_arrays(layout, bm, bn, planner)
    mask, tq, tk = _union_mask(layout), layout[3], layout[4]
    assert t["b_rows"].shape == (t["b_kidx"].shape[0], 2, bm) and t["q_bptr"].shape == t["q_ptr"].shape
    cols = np.arange(tk)
    for m in range(t["q_nfull"].shape[0]):
        e_mid, e1 = t["q_ptr"][m] + t["q_nfull"][m], t["q_ptr"][m + 1]
        partial_tiles = t["q_kidx"][e_mid:e1].tolist()
        entries = range(t["q_bptr"][m], t["q_bptr"][m + 1])
        assert sorted({t["b_kidx"][b] for b in entries}) == partial_tiles
        assert [t["b_kidx"][b] for b in entries] == sorted(t["b_kidx"][b] for b in entries)  # entry order
        # The kernels walk the bound entries as runs of consecutive k tiles, the entries in run order.
        _assert_runs_expand_to(t, ("q_brptr", "br_lo", "br_hi"), m, [t["b_kidx"][b] for b in entries])
        seen = np.zeros((bm, tk), dtype=np.int64)
        for b in entries:
            lo, hi = (t["b_rows"][b, i][:, None] for i in range(2))
            n = t["b_kidx"][b]
            vis = (cols >= lo) & (cols < hi)
            assert not vis[:, (cols < n * bn) | (cols >= (n + 1) * bn)].any()  # inside its own k tile
            seen += vis
        rows = slice(m * bm, min((m + 1) * bm, tq))
        want = np.zeros((bm, tk), dtype=bool)
        want[:rows.stop - rows.start] = mask[rows]
        for n in partial_tiles:
            inside = (cols >= n * bn) & (cols < (n + 1) * bn)
            assert (seen[:, inside] == want[:, inside]).all(), (m, n)
        assert seen.max(initial=0) <= 1


def test_row_bounds_list_a_tile_once_per_interval_of_its_busiest_row():
    # Row 0 sees keys 1, 5 and 9 (three one-key slices) in one 16-key tile, row 1 only keys [2, 4): three bound
    # entries, the j-th holding each row's j-th interval.
    qr = np.array([[0, 1], [0, 1], [0, 1], [1, 2]], np.int32)
    kr = np.array([[1, 2], [5, 6], [9, 10], [2, 4]], np.int32)
    t = build_plan(qr, kr, np.zeros(4, np.int32), 2, 16, 2, 16, planner="python").tensors
    assert t["q_bptr"].tolist() == [0, 3] and t["b_kidx"].tolist() == [0, 0, 0]
    assert t["b_rows"].tolist() == [[[1, 2], [2, 4]], [[5, 0], [6, 0]], [[9, 0], [10, 0]]]
    # Touching intervals merge: keys [1, 5) and [5, 9) are one interval.
    t = build_plan(qr[:2], np.array([[1, 5], [5, 9]], np.int32), np.zeros(2, np.int32), 1, 16, 1, 16,
                   planner="python").tensors
    assert t["b_rows"].tolist() == [[[1], [9]]]
