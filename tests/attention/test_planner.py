"""Planner: the plan covers exactly the union mask, FULL tiles are fully visible, both planners agree."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from magi_kernels.plan import build_plan, cache_info, clear_cache, get_plan, native_planner, plan_attention, tile_efficiency, union_area
from magi_kernels.ranges import BlockCausal, Magi1WindowMask, SlidingWindow, VarlenCausal

from ._helpers import dense_mask, slice_layouts

HAS_NATIVE = native_planner() is not None
PLANNERS = ["python"] + (["native"] if HAS_NATIVE else [])


def check_plan(plan, qr, kr, ty, tq, tk):
    """Every property of the plan against the dense union mask (brute force over tiles)."""
    M = dense_mask(qr, kr, ty, tq, tk)
    bm, bn = plan.block_m, plan.block_n
    mt, nt = -(-tq // bm), -(-tk // bn)
    t = {k: v.numpy() for k, v in plan.tensors.items()}
    assert t["q_ptr"].shape == (mt + 1,) and t["k_ptr"].shape == (nt + 1,)
    covered = torch.zeros_like(M)
    entries = set()
    for m in range(mt):
        a, b, nf = t["q_ptr"][m], t["q_ptr"][m + 1], t["q_nfull"][m]
        ks = t["q_kidx"][a:b]
        assert list(ks[:nf]) == sorted(set(ks[:nf])) and list(ks[nf:]) == sorted(set(ks[nf:]))  # sorted, no dups
        assert not set(ks[:nf]) & set(ks[nf:])
        for i, n in enumerate(ks):
            blk = M[m * bm:(m + 1) * bm, n * bn:(n + 1) * bn]
            assert blk.any(), f"tile ({m},{n}) has no visible cell"
            covered[m * bm:(m + 1) * bm, n * bn:(n + 1) * bn] = True
            entries.add((m, int(n), i < nf))
            if i < nf:
                assert (m + 1) * bm <= tq and (n + 1) * bn <= tk and blk.all(), f"FULL tile ({m},{n}) is not fully visible"
            else:
                p = t["q_pptr"][m] + i - nf
                ids = t["mask_slices"][t["p_mptr"][p]:t["p_mptr"][p + 1]]
                assert len(ids) and list(ids) == sorted(set(ids))
                # the listed slices' union reproduces the tile's mask exactly, and each contributes a cell
                sub = dense_mask(qr[ids], kr[ids], ty[ids], tq, tk)[m * bm:(m + 1) * bm, n * bn:(n + 1) * bn]
                assert torch.equal(sub, blk)
                for s in ids:
                    assert dense_mask(qr[s:s + 1], kr[s:s + 1], ty[s:s + 1], tq, tk)[m * bm:(m + 1) * bm, n * bn:(n + 1) * bn].any()
                # maximal FULL: a fully visible in-bounds tile must not be PARTIAL
                assert not ((m + 1) * bm <= tq and (n + 1) * bn <= tk and blk.all())
    assert bool((covered | ~M).all()), "a visible cell lies outside every visited tile"
    # tiles with a visible cell are all visited
    for m in range(mt):
        for n in range(nt):
            if M[m * bm:(m + 1) * bm, n * bn:(n + 1) * bn].any():
                assert any((m, n, f) in entries for f in (True, False))
    # k-major view holds the same entries, FULL first then PARTIAL, each ascending in q tile
    kmaj = set()
    for n in range(nt):
        a, b, nf = t["k_ptr"][n], t["k_ptr"][n + 1], t["k_nfull"][n]
        qs = t["k_qidx"][a:b]
        assert list(qs[:nf]) == sorted(qs[:nf]) and list(qs[nf:]) == sorted(qs[nf:])
        assert t["k_pptr"][n + 1] - t["k_pptr"][n] == b - a - nf
        for i, m in enumerate(qs):
            kmaj.add((int(m), n, i < nf))
            if i >= nf:  # k_pent points at the q-major partial entry of the same tile
                p = t["k_pent"][t["k_pptr"][n] + i - nf]
                mm = np.searchsorted(t["q_pptr"], p, side="right") - 1
                e = t["q_ptr"][mm] + t["q_nfull"][mm] + (p - t["q_pptr"][mm])
                assert mm == m and t["q_kidx"][e] == n
    assert kmaj == entries
    assert plan.area() == int(M.sum())
    return M


@settings(max_examples=60, deadline=None)
@given(layout=slice_layouts(), bm=st.sampled_from([1, 3, 4, 8, 16]), bn=st.sampled_from([1, 2, 5, 8, 16]))
def test_plan_covers_exactly_the_union_mask(layout, bm, bn):
    qr, kr, ty, tq, tk = layout
    plan = build_plan(qr, kr, ty, tq, tk, bm, bn, planner="python")
    check_plan(plan, qr, kr, ty, tq, tk)


@pytest.mark.skipif(not HAS_NATIVE, reason="magi_kernels._C not built (host planner)")
@settings(max_examples=300, deadline=None)
@given(layout=slice_layouts(max_tokens=300, max_slices=12), bm=st.sampled_from([1, 4, 16, 32, 64, 128]),
       bn=st.sampled_from([1, 5, 16, 32, 64, 128]))
def test_native_and_python_planners_are_identical(layout, bm, bn):
    qr, kr, ty, tq, tk = layout
    a = build_plan(qr, kr, ty, tq, tk, bm, bn, planner="python")
    b = build_plan(qr, kr, ty, tq, tk, bm, bn, planner="native")
    assert a.planner == "python" and b.planner == "native"
    for key in a.tensors:
        assert torch.equal(a.tensors[key], b.tensors[key]), key


@pytest.mark.parametrize("planner", PLANNERS)
@pytest.mark.parametrize("mask", [
    Magi1WindowMask(20, (2, 3, 4, 5), 0),
    Magi1WindowMask(24, (1, 2, 3, 4, 5), 2),
    BlockCausal(chunk_lens=[7, 1, 30, 13], window_chunks=2, prefix_len=9, prefix_chunk_size=3),
    SlidingWindow([0, 50, 51, 90], 6, 3),
    VarlenCausal([0, 17, 60], [0, 40, 41]),
], ids=["magi1", "magi1-cache", "block-causal-prefix", "sliding", "varlen-causal"])
def test_structured_masks(mask, planner):
    q, k, t = (x.numpy() for x in mask.to_ranges())
    for bm, bn in [(8, 8), (16, 4), (5, 7)]:
        plan = build_plan(q, k, t, mask.total_q, mask.total_k, bm, bn, planner=planner)
        check_plan(plan, q, k, t, mask.total_q, mask.total_k)


def test_union_full_tile_across_two_slices():
    # rows 0..3 via slice 0, rows 4..7 via slice 1, both see keys [0, 8): no single slice covers the
    # 8x8 tile, the union does -> FULL, no mask.
    qr = np.array([[0, 4], [4, 8]], np.int32)
    kr = np.array([[0, 8], [0, 8]], np.int32)
    for planner in PLANNERS:
        p = build_plan(qr, kr, np.zeros(2, np.int32), 8, 8, 8, 8, planner=planner)
        assert p.q_tile_entries(0) == [(0, True, [])]
    # a cell covered by two slices counts once: overlapping FULL + CAUSAL on the same tile
    qr = np.array([[0, 8], [0, 8]], np.int32)
    kr = np.array([[0, 8], [0, 8]], np.int32)
    for planner in PLANNERS:
        p = build_plan(qr, kr, np.array([1, 0], np.int32), 8, 8, 8, 8, planner=planner)
        assert p.q_tile_entries(0) == [(0, True, [])]
        assert p.area() == 64


def test_uncovered_rows_and_empty_slices_give_no_entries():
    qr = np.array([[0, 4], [6, 6], [8, 12]], np.int32)
    kr = np.array([[0, 0], [0, 10], [2, 3]], np.int32)
    for planner in PLANNERS:
        p = build_plan(qr, kr, np.zeros(3, np.int32), 16, 10, 4, 4, planner=planner)
        assert [p.q_tile_entries(m) for m in range(4)] == [[], [], [(0, False, [2])], []]


def test_plan_cache_is_content_keyed():
    clear_cache()
    m = Magi1WindowMask(16, (2, 3), 1)
    q, k, t = m.to_ranges()
    p1 = plan_attention(q, k, t, total_q=m.total_q, total_k=m.total_k, block_m=16, block_n=16)
    p2 = plan_attention(q.clone(), k.clone(), t.clone(), total_q=m.total_q, total_k=m.total_k, block_m=16, block_n=16)
    assert p1 is p2
    p3 = plan_attention(q, k, t, total_q=m.total_q, total_k=m.total_k, block_m=16, block_n=8)
    assert p3 is not p1
    info = cache_info()
    assert info["hits"] == 1 and info["misses"] == 2
    k2 = k.clone()
    k2[0, 0] = 1
    assert plan_attention(q, k2, t, total_q=m.total_q, total_k=m.total_k, block_m=16, block_n=16) is not p1


@pytest.mark.parametrize("planner", PLANNERS)
def test_magi1_720p_window_tile_efficiency(planner):
    # 24B 720p: 4 chunks x 21,600 tokens, window r = 2..5; the plan is exact and wastes < 3% at 128x128
    m = Magi1WindowMask(21600, (2, 3, 4, 5), 0)
    q, k, t = (x.numpy() for x in m.to_ranges())
    plan = get_plan(q, k, t, m.total_q, m.total_k, 128, 128, planner=planner)
    area = union_area(q, k, t)
    assert area == 10 * 21600 ** 2
    eff = tile_efficiency(plan, area)
    assert 1.0 <= eff <= 1.03, eff
    # only tiles straddling a chunk edge need a mask
    assert plan.num_partial < 0.01 * plan.num_entries
