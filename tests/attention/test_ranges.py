"""Mask types, typed masks and range validation."""

import numpy as np
import pytest
import torch

from magi_kernels.ranges import (AttnMaskType, BlockCausal, Magi1WindowMask, SlidingWindow, VarlenCausal, VarlenFull,
                                 slice_area, validate_ranges)
from magi_kernels.plan import union_area
from magi_kernels.utils.checks import MagiArgumentError

from ._helpers import dense_mask


def _grid(rows):
    return torch.tensor([[c == "1" for c in r] for r in rows])


@pytest.mark.parametrize("t, sq, sk, rows", [
    # MagiAttention's mask-type docstring examples (docs/attention.md#mask-types), 1 = attend
    (AttnMaskType.CAUSAL, 5, 2, ["00", "00", "00", "10", "11"]),
    (AttnMaskType.CAUSAL, 2, 5, ["11110", "11111"]),
    (AttnMaskType.INV_CAUSAL, 5, 2, ["11", "01", "00", "00", "00"]),
    (AttnMaskType.INV_CAUSAL, 2, 5, ["11111", "01111"]),
    (AttnMaskType.BI_CAUSAL, 5, 2, ["00"] * 5),
    (AttnMaskType.BI_CAUSAL, 2, 5, ["11110", "01111"]),
    (AttnMaskType.BI_CAUSAL, 3, 3, ["100", "010", "001"]),
])
def test_mask_type_definitions_match_magiattention_examples(t, sq, sk, rows):
    # offset the slice inside a bigger grid so global-vs-local index handling is exercised
    M = dense_mask([[3, 3 + sq]], [[7, 7 + sk]], [int(t)], 3 + sq + 2, 7 + sk + 1)
    assert torch.equal(M[3:3 + sq, 7:7 + sk], _grid(rows))
    assert int(M.sum()) == int(_grid(rows).sum()) == slice_area(3, 3 + sq, 7, 7 + sk, int(t))
    assert union_area([[3, 3 + sq]], [[7, 7 + sk]], [int(t)]) == int(M.sum())


def test_mask_type_parse():
    assert AttnMaskType.parse("causal") is AttnMaskType.CAUSAL
    assert AttnMaskType.parse("invcausal") is AttnMaskType.INV_CAUSAL
    assert AttnMaskType.parse(3) is AttnMaskType.BI_CAUSAL
    with pytest.raises(ValueError):
        AttnMaskType.parse("diagonal")


def _mask_of(m):
    q, k, t = m.to_ranges()
    assert q.dtype == k.dtype == t.dtype == torch.int32 and q.shape[1] == 2
    return dense_mask(q.numpy(), k.numpy(), t.numpy(), m.total_q, m.total_k)


def test_varlen_full_and_causal():
    cq, ck = [0, 5, 5, 12], [0, 3, 9, 20]  # an empty q doc, sq != sk both ways
    Mf, Mc = _mask_of(VarlenFull(cq, ck)), _mask_of(VarlenCausal(cq, ck))
    want_f = torch.zeros(12, 20, dtype=torch.bool)
    want_c = torch.zeros(12, 20, dtype=torch.bool)
    for d in range(3):
        for i in range(cq[d], cq[d + 1]):
            for j in range(ck[d], ck[d + 1]):
                want_f[i, j] = True
                # bottom-right causal: local j <= local i + (sk - sq)
                want_c[i, j] = (j - ck[d]) <= (i - cq[d]) + (ck[d + 1] - ck[d]) - (cq[d + 1] - cq[d])
    assert torch.equal(Mf, want_f) and torch.equal(Mc, want_c)


@pytest.mark.parametrize("left,right", [(4, 0), (3, 2), (5, 5), (-1, 0), (0, 0), (0, -1), (-1, -1), (2, 7), (40, 1)])
def test_sliding_window_exact(left, right):
    cu = [0, 16, 17, 29, 29, 40]  # includes a length-1 and an empty document
    m = SlidingWindow(cu, left, right)
    got = _mask_of(m)
    want = torch.zeros(40, 40, dtype=torch.bool)
    for d in range(len(cu) - 1):
        for i in range(cu[d], cu[d + 1]):
            for j in range(cu[d], cu[d + 1]):
                want[i, j] = (left < 0 or j >= i - left) and (right < 0 or j <= i + right)
    assert torch.equal(got, want)
    # every cell covered exactly once: the slices' areas add up to the union's
    q, k, t = m.to_ranges()
    assert sum(slice_area(*q[i].tolist(), *k[i].tolist(), int(t[i])) for i in range(len(t))) == int(want.sum())
    assert len(t) <= 3 * (len(cu) - 1)


def test_block_causal_plain_window_and_prefix():
    m = BlockCausal(chunk_lens=[3, 4, 2])
    assert (m.total_q, m.total_k) == (9, 9)
    assert m.slices() == [(0, 3, 0, 3, 0), (3, 7, 0, 7, 0), (7, 9, 0, 9, 0)]
    w = BlockCausal(chunk_size=4, num_chunks=3, window_chunks=2, prefix_len=8)
    # keys: 8 cached tokens (2 prefix chunks of 4) then the 12 current ones
    assert (w.total_q, w.total_k) == (12, 20)
    assert w.slices() == [(0, 4, 4, 12, 0), (4, 8, 8, 16, 0), (8, 12, 12, 20, 0)]
    per = BlockCausal(chunk_size=4, num_chunks=3, window_chunks=[None, 1, 3], prefix_len=8)
    assert per.slices() == [(0, 4, 0, 12, 0), (4, 8, 12, 16, 0), (8, 12, 8, 20, 0)]
    clip = BlockCausal(chunk_lens=[5, 5], window_chunks=4, prefix_len=3, prefix_chunk_size=5)
    assert clip.slices() == [(0, 5, 0, 8, 0), (5, 10, 0, 13, 0)]


def _magi_spec_ranges(n, slice_point, r):
    """MAGI-1's key-range rule (docs/magi1.md#attention-windows): q_range[j] = [j n, (j+1) n), k_range = [max(0, a+1-r_j) n, (a+1) n)."""
    return [(j * n, (j + 1) * n, max(0, slice_point + j + 1 - rj) * n, (slice_point + j + 1) * n, 0)
            for j, rj in enumerate(r)]


def test_magi1_window_mask_matches_spec():
    for sp, r in [(0, (2, 3, 4, 5)), (3, (1, 2, 3, 4, 5)), (1, (5,)), (6, (1, 5, 4))]:
        m = Magi1WindowMask(7, r, sp)
        assert m.slices() == _magi_spec_ranges(7, sp, r)
        assert (m.total_q, m.total_k) == (7 * len(r), 7 * (sp + len(r)))
        # same mask as BlockCausal with a cache prefix of slice_point chunks
        b = BlockCausal(chunk_size=7, num_chunks=len(r), window_chunks=list(r), prefix_len=7 * sp)
        assert b.slices() == m.slices()


def test_magi1_schedule_t2v_example():
    # MAGI-1's window example (docs/magi1.md#window-stages): 4 chunks, W=4 -> clip_start [0,0,0,0,1,2,3], clip_end [1,2,3,4,4,4,4]; 32 steps
    per = 8
    starts, counts = [], []
    for stage in range(7):
        s = Magi1WindowMask.schedule(4, 32, stage * per + 1)  # d=1: no clean re-forward
        starts.append(s["slice_point"])
        counts.append(len(s["steps"]))
    assert starts == [0, 0, 0, 0, 1, 2, 3]
    assert counts == [1, 2, 3, 4, 3, 2, 1]
    # d == 0 after the window slid: the finished chunk is re-forwarded clean, slice_point = clip_start - 1
    s = Magi1WindowMask.schedule(4, 32, 4 * per)
    assert s == {"slice_point": 0, "steps": [32, 3 * per + 0, 2 * per, 1 * per]}
    m = Magi1WindowMask.from_schedule(10, 4, 32, 4 * per)
    # clean chunk r=1; noisy chunks: steps 24, 16, 8 -> stages 3, 2, 1 -> r = 2, 3, 4
    assert m.kv_windows == (1, 2, 3, 4)
    assert m.slices() == _magi_spec_ranges(10, 0, (1, 2, 3, 4))
    full = Magi1WindowMask.from_schedule(10, 4, 32, 3 * per + 5)  # the 4-chunk window, sub-step 5
    assert full.kv_windows == (2, 3, 4, 5) and full.slice_point == 0
    assert Magi1WindowMask.for_step(10, 0, [3, 31], 32, noise2clean_kvrange=()).kv_windows == (None, None)


def test_mask_constructor_errors_name_the_argument():
    with pytest.raises(MagiArgumentError, match="cu_seqlens_q.*start at 0"):
        VarlenFull([1, 4])
    with pytest.raises(MagiArgumentError, match="cu_seqlens_q.*non-decreasing"):
        VarlenFull([0, 4, 3])
    with pytest.raises(MagiArgumentError, match="cu_seqlens_k.*as many entries"):
        VarlenCausal([0, 4], [0, 2, 3])
    with pytest.raises(MagiArgumentError, match="'left'"):
        SlidingWindow([0, 4], -2, 0)
    with pytest.raises(MagiArgumentError, match="window_chunks.*>= 1"):
        BlockCausal(chunk_size=4, num_chunks=2, window_chunks=0)
    with pytest.raises(MagiArgumentError, match="window_chunks.*one entry per chunk"):
        BlockCausal(chunk_size=4, num_chunks=2, window_chunks=[1, 2, 3])
    with pytest.raises(MagiArgumentError, match="prefix_chunk_size"):
        BlockCausal(chunk_lens=[3, 4], window_chunks=2, prefix_len=5)
    with pytest.raises(MagiArgumentError, match="kv_windows"):
        Magi1WindowMask(10, [0, 2])
    with pytest.raises(MagiArgumentError, match="chunk_tokens"):
        Magi1WindowMask(0, [1])
    with pytest.raises(MagiArgumentError, match="steps"):
        Magi1WindowMask.for_step(10, 0, [33], 32)


def _r(x):
    return torch.tensor(x, dtype=torch.int32).reshape(-1, 2)


@pytest.mark.parametrize("q, k, t, arg, rule", [
    (_r([[0, 4]]).long(), _r([[0, 4]]), None, "q_ranges", "int32"),
    (_r([[0, 4]]), _r([[0, 4]]).float(), None, "k_ranges", "int32"),
    (torch.tensor([0, 4], dtype=torch.int32), _r([[0, 4]]), None, "q_ranges", r"shape \[n, 2\]"),
    (_r([[0, 4]]), _r([[0, 4], [0, 1]]), None, "k_ranges", "as many slices"),
    (_r([[-1, 4]]), _r([[0, 4]]), None, "q_ranges", "non-negative"),
    (_r([[0, 4]]), _r([[3, 2]]), None, "k_ranges", "inverted"),
    (_r([[0, 9]]), _r([[0, 4]]), None, "q_ranges", "total_q=8"),
    (_r([[0, 4]]), _r([[0, 11]]), None, "k_ranges", "total_k=10"),
    (_r([[0, 4]]), _r([[0, 4]]), torch.tensor([4], dtype=torch.int32), "attn_type_map", "0 FULL"),
    (_r([[0, 4]]), _r([[0, 4]]), torch.tensor([1, 1], dtype=torch.int32), "attn_type_map", r"shape \[1\]"),
    (_r([[0, 4]]), _r([[0, 4]]), torch.tensor([1], dtype=torch.int64), "attn_type_map", "int32"),
    ([[0, 4]], _r([[0, 4]]), None, "q_ranges", "torch.Tensor"),
])
def test_validate_ranges_errors(q, k, t, arg, rule):
    with pytest.raises(MagiArgumentError, match=f"'{arg}'.*{rule}"):
        validate_ranges(q, k, t, total_q=8, total_k=10)


def test_validate_ranges_accepts_empty_and_returns_host_copies():
    qr, kr, ty = validate_ranges(_r([[2, 2], [0, 8]]), _r([[0, 0], [10, 10]]), None, total_q=8, total_k=10)
    assert isinstance(qr, np.ndarray) and qr.dtype == np.int32 and ty.tolist() == [0, 0]
    qr, kr, ty = validate_ranges(_r([]), _r([]), None, total_q=0, total_k=0)
    assert qr.shape == (0, 2)
