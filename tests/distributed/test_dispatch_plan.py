"""Host-side pieces of magi_kernels.distributed: slice clipping, mask permutation and the dispatch solver
(no processes)."""

import numpy as np
import pytest
import torch

from magi_kernels import BlockCausal, Magi1WindowMask, VarlenCausal
from magi_kernels.distributed import even_shard_sizes, permute_mask, plan_dispatch
from magi_kernels.distributed._slices import clip_slices
from magi_kernels.ranges.types import row_bounds
from magi_kernels.utils.checks import MagiArgumentError


def dense(qr, kr, ty, tq, tk):
    m = np.zeros((tq, tk), bool)
    rows = np.arange(tq)
    for (qs, qe), (ks, ke), t in zip(np.asarray(qr).tolist(), np.asarray(kr).tolist(), np.asarray(ty).tolist()):
        lo, hi = row_bounds(rows, qs, qe, ks, ke, t)
        for r in range(tq):
            if lo[r] < hi[r]:
                m[r, lo[r]:hi[r]] = True
    return m


def test_clip_slices_matches_dense_rectangle():
    rng = np.random.default_rng(int(torch.initial_seed() % 2**31))
    for _ in range(400):
        tq, tk = rng.integers(1, 16, 2)
        n = int(rng.integers(1, 4))
        qr = np.sort(rng.integers(0, tq + 1, (n, 2)), axis=1)
        kr = np.sort(rng.integers(0, tk + 1, (n, 2)), axis=1)
        ty = rng.integers(0, 4, n)
        q0, q1 = sorted(rng.integers(0, tq + 1, 2))
        k0, k1 = sorted(rng.integers(0, tk + 1, 2))
        cq, ck, ct = clip_slices(qr, kr, ty, q0, q1, k0, k1)
        want = np.zeros((tq, tk), bool)
        want[q0:q1, k0:k1] = dense(qr, kr, ty, tq, tk)[q0:q1, k0:k1]
        assert (dense(cq, ck, ct, tq, tk) == want).all()
        for (qs, qe), (ks, ke), t in zip(cq, ck, ct):  # no degenerate output slices, inside the rectangle
            lo, hi = row_bounds(np.arange(qs, qe), qs, qe, ks, ke, t)
            assert (lo < hi).all() and k0 <= ks and ke <= k1 and q0 <= qs and qe <= q1


@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("per_rank", [8, 11])
def test_dispatch_balances_block_causal(world, per_rank):
    mask = BlockCausal(chunk_size=7, num_chunks=per_rank * world)
    meta = plan_dispatch(mask, world, 7)
    assert meta.balance <= 1.05, meta.areas
    assert sum(meta.areas) == mask.area()
    sizes = even_shard_sizes(mask.total_q, world)
    qr, kr, ty = mask.to_ranges()
    d = dense(qr, kr, ty, mask.total_q, mask.total_k)
    starts = np.cumsum([0] + sizes)
    contiguous = [int(d[starts[r]:starts[r + 1]].sum()) for r in range(world)]
    assert max(contiguous) / np.mean(contiguous) > 1.3  # the problem dispatch solves is real


@pytest.mark.parametrize("mask,chunk,world", [
    (BlockCausal(chunk_size=5, num_chunks=16), 5, 4),
    (Magi1WindowMask(6, (None, 3, 2, 1, 4), slice_point=2), 4, 3),  # keys = prefix + current
    (VarlenCausal([0, 9, 30, 41]), 3, 2),  # last chunk partial
])
def test_dispatched_mask_is_the_permuted_mask(mask, chunk, world):
    meta = plan_dispatch(mask, world, chunk)
    qr, kr, ty = mask.to_ranges()
    want = dense(qr, kr, ty, mask.total_q, mask.total_k)[meta.q_perm.numpy()][:, meta.k_perm.numpy()]
    got = dense(meta.q_ranges, meta.k_ranges, meta.attn_type_map, mask.total_q, mask.total_k)
    assert (got == want).all()
    assert sorted(meta.q_perm.tolist()) == list(range(mask.total_q))
    assert sum(meta.q_sizes) == mask.total_q and sum(meta.k_sizes) == mask.total_k
    counts = [sum(1 for o in meta.owner if o == r) for r in range(world)]
    assert max(counts) - min(counts) <= 1


def test_dispatch_rejects_bad_arguments():
    mask = BlockCausal(chunk_size=4, num_chunks=4)
    with pytest.raises(MagiArgumentError, match="'chunk_size'.*fewer than the 8 ranks"):
        plan_dispatch(mask, 8, 4)
    with pytest.raises(MagiArgumentError, match="'world'"):
        plan_dispatch(mask, 0, 4)
    with pytest.raises(MagiArgumentError, match="'chunk_size'"):
        plan_dispatch(mask, 2, 0)
    with pytest.raises(MagiArgumentError, match="'total_q'"):
        plan_dispatch(mask.to_ranges(), 2, 4)


def test_even_shard_sizes_follow_magi1():
    assert even_shard_sizes(10, 4) == [3, 3, 2, 2]
    assert even_shard_sizes(3, 4) == [1, 1, 1, 0]


def _random_runs(rng, total):
    """A random reordering of [0, total) as (original_start, length) runs, zero-length runs included."""
    cuts = np.unique(np.concatenate([[0, total], rng.integers(0, total + 1, int(rng.integers(0, 6)))]))
    runs = [(int(a), int(b - a)) for a, b in zip(cuts[:-1], cuts[1:])] + [(int(rng.integers(0, total + 1)), 0)]
    return [runs[i] for i in rng.permutation(len(runs))]


def _perm(runs):
    return np.concatenate([np.arange(a, a + n) for a, n in runs]).astype(np.int64)


def test_permute_mask_matches_the_permuted_dense_mask():
    rng = np.random.default_rng(int(torch.initial_seed() % 2**31))
    for _ in range(200):
        tq, tk = (int(x) for x in rng.integers(1, 20, 2))
        n = int(rng.integers(0, 5))
        qr = np.sort(rng.integers(0, tq + 1, (n, 2)), axis=1)
        kr = np.sort(rng.integers(0, tk + 1, (n, 2)), axis=1)
        ty = rng.integers(0, 4, n)
        q_runs, k_runs = _random_runs(rng, tq), _random_runs(rng, tk)
        t = [torch.tensor(x, dtype=torch.int32).reshape(-1, 2) for x in (qr, kr)]
        got = permute_mask(t[0], t[1], torch.tensor(ty, dtype=torch.int32), q_segments=q_runs, k_segments=k_runs)
        assert all(x.dtype == torch.int32 for x in got)
        want = dense(qr, kr, ty, tq, tk)[_perm(q_runs)][:, _perm(k_runs)]
        assert (dense(*got, tq, tk) == want).all()


@pytest.mark.parametrize("segments,rule", [
    ([(0, 3), (2, 4)], "run starting at 2 overlaps another"),
    ([(0, 3), (4, 2)], r"leaves tokens \[3, 4\) out"),
    ([(0, -1)], "non-negative"),
    ([(0,)], "pairs of ints"),
])
def test_permute_mask_rejects_segments_that_are_not_a_permutation(segments, rule):
    qr = torch.tensor([[0, 2]], dtype=torch.int32)
    with pytest.raises(MagiArgumentError, match=f"'q_segments' .*{rule}"):
        permute_mask(qr, qr, None, q_segments=segments, k_segments=[(0, 6)])
    with pytest.raises(MagiArgumentError, match="'k_ranges'.*inside"):  # ranges checked against the runs' total
        permute_mask(qr, torch.tensor([[0, 9]], dtype=torch.int32), None, q_segments=[(0, 6)], k_segments=[(0, 6)])
