"""magi_kernels.attention: typed masks over batches and layouts vs float64 SDPA with dense masks.

The dense masks here are written from each mask's definition (chunk indices, window distances), not
from the library's slices, and batches are composed as block-diagonal dense masks, so a wrong
per-sample offset in the library shows up as a mismatch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import magi_kernels as mk
from magi_kernels.utils.checks import MagiArgumentError

F64 = torch.float64


def _block_causal_dense(chunk_lens, prefix=0, window=None):
    """[sum(chunk_lens), prefix + sum(chunk_lens)]: chunk j sees the prefix and chunks <= j (window: last w chunks)."""
    tq = sum(chunk_lens)
    cid = torch.repeat_interleave(torch.arange(len(chunk_lens)), torch.tensor(chunk_lens))
    m = torch.zeros(tq, prefix + tq, dtype=torch.bool)
    m[:, :prefix] = window is None
    m[:, prefix:] = cid[None, :] <= cid[:, None]
    if window is not None:
        m[:, prefix:] &= cid[None, :] > cid[:, None] - window
    return m


def _sliding_dense(n, left, right):
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    m = torch.ones(n, n, dtype=torch.bool)
    if left >= 0:
        m &= j >= i - left
    if right >= 0:
        m &= j <= i + right
    return m


def _block_diag(masks):
    return torch.block_diag(*[m.to(torch.int8) for m in masks]).bool()


def _sdpa64(q, k, v, dense, scale=None):
    """float64 SDPA on [T, H, D] with a dense bool mask [Tq, Tk]; GQA by repeating kv heads; empty rows -> 0, -inf."""
    g = q.shape[1] // k.shape[1]
    qq, kk, vv = (t.to(F64).transpose(0, 1) for t in (q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=dense, scale=scale).transpose(0, 1)
    s = torch.einsum("hqd,hkd->hqk", qq, kk) * scale
    lse = torch.logsumexp(s.masked_fill(~dense, float("-inf")), -1).transpose(0, 1)  # [Tq, H]
    empty = ~dense.any(-1)
    return out.masked_fill(empty[:, None, None], 0.0), lse


def _close(a, b, tol=2e-5):
    a, b = a.to(F64), b.to(F64)
    assert torch.equal(torch.isfinite(a), torch.isfinite(b))
    fin = torch.isfinite(b)
    err = (a[fin] - b[fin]).abs().max().item() if fin.any() else 0.0
    assert err <= tol * max(1.0, b[fin].abs().max().item()), err


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_block_causal_repeated_over_batch_gqa(layout):
    B, chunks, hq, hk, d = 3, [5, 4, 6], 4, 2, 24  # odd sizes, unequal chunks, GQA 2:1
    S = sum(chunks)
    mask = mk.BlockCausal(chunk_lens=chunks)
    q, k, v = torch.randn(B, S, hq, d), torch.randn(B, S, hk, d), torch.randn(B, S, hk, d)
    args = (q, k, v) if layout == "bshd" else tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))
    out, lse = mk.attention(*args, mask=mask, layout=layout, return_lse=True)
    if layout == "bhsd":
        out = out.transpose(1, 2)
    assert out.shape == q.shape and lse.shape == (B, hq, S) and out.dtype == q.dtype
    dense = _block_diag([_block_causal_dense(chunks)] * B)
    ref_o, ref_l = _sdpa64(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), dense)
    _close(out.flatten(0, 1), ref_o)
    _close(lse.transpose(1, 2).flatten(0, 1), ref_l)
    # the explicit batch form is the same call
    out2 = mk.attention(*args, mask=mask.repeat(B), layout=layout)
    assert torch.equal(out2.transpose(1, 2) if layout == "bhsd" else out2, out)


def test_packed_per_sample_masks_thd_varlen():
    # three samples of different kinds and sizes, packed: block-causal with a KV prefix and window,
    # a sliding window, and full cross-attention with sq != sk
    m0 = mk.BlockCausal(chunk_size=3, num_chunks=3, window_chunks=2, prefix_len=6)
    m1 = mk.SlidingWindow([0, 11], left=3, right=1)
    m2 = mk.VarlenFull([0, 5], [0, 9])
    packed = mk.PackedMask([m0, m1, m2])
    assert packed.cu_seqlens_q == (0, 9, 20, 25) and packed.cu_seqlens_k == (0, 15, 26, 35)
    # window of 2 chunks of 3; the 6-token prefix is chunks 0 and 1, so query chunk j is absolute chunk j + 2
    cq = torch.arange(9)[:, None] // 3 + 2
    ck = torch.arange(15)[None, :] // 3
    d0 = (ck <= cq) & (ck > cq - 2)
    dense = _block_diag([d0, _sliding_dense(11, 3, 1), torch.ones(5, 9, dtype=torch.bool)])
    hq, hk, d = 3, 1, 16
    q, k, v = torch.randn(25, hq, d), torch.randn(35, hk, d), torch.randn(35, hk, d)
    out, lse = mk.attention(q, k, v, mask=packed, layout="thd", return_lse=True, scale=0.3)
    ref_o, ref_l = _sdpa64(q, k, v, dense, scale=0.3)
    _close(out, ref_o)
    _close(lse, ref_l)


def test_none_is_full_attention_per_sample_cross_lengths():
    B, sq, sk, h, d = 2, 7, 10, 2, 8
    q, k, v = torch.randn(B, sq, h, d), torch.randn(B, sk, h, d), torch.randn(B, sk, h, d)
    out = mk.attention(q, k, v)
    ref = F.scaled_dot_product_attention(*(t.to(F64).transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    _close(out, ref)


def test_magi1_window_mask_single_sample_and_uncovered_rows():
    m = mk.Magi1WindowMask(chunk_tokens=4, kv_windows=(2, None), slice_point=1)
    q, k, v = torch.randn(1, m.total_q, 2, 8), torch.randn(1, m.total_k, 2, 8), torch.randn(1, m.total_k, 2, 8)
    cq = torch.arange(m.total_q)[:, None] // 4 + 1
    ck = torch.arange(m.total_k)[None, :] // 4
    dense = (ck <= cq) & ((cq == 1) & (ck > cq - 2) | (cq == 2))
    out, lse = mk.attention(q, k, v, mask=m, return_lse=True)
    ref_o, ref_l = _sdpa64(q[0], k[0], v[0], dense)
    _close(out[0], ref_o)
    _close(lse[0].T, ref_l)
    # a varlen mask that leaves the last 3 query rows uncovered: out 0, lse -inf (not garbage)
    hole = mk.PackedMask([mk.VarlenFull([0, 5], [0, 12]), mk.VarlenFull([0, 3], [0, 0])])
    o2, l2 = mk.attention(q[0, :8], k[0], v[0], mask=hole, layout="thd", return_lse=True)
    assert torch.all(o2[5:] == 0) and torch.all(torch.isneginf(l2[5:]))


def test_backward_matches_float64_autograd():
    B, chunks, hq, hk, d = 2, [3, 5], 2, 1, 8
    S = sum(chunks)
    mask = mk.BlockCausal(chunk_lens=chunks)
    q, k, v = (torch.randn(B, S, h, d, requires_grad=True) for h in (hq, hk, hk))
    g = torch.randn(B, S, hq, d)
    (mk.attention(q, k, v, mask=mask) * g).sum().backward()
    q64, k64, v64 = (t.detach().to(F64).requires_grad_() for t in (q, k, v))
    dense = _block_diag([_block_causal_dense(chunks)] * B)
    ref, _ = _sdpa64(q64.flatten(0, 1), k64.flatten(0, 1), v64.flatten(0, 1), dense)
    (ref * g.flatten(0, 1).to(F64)).sum().backward()
    for ours, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        _close(ours, want, tol=5e-5)


def test_compiles_without_graph_breaks():
    mask = mk.BlockCausal(chunk_size=3, num_chunks=2)

    def f(q, k, v):
        return mk.attention(q, k, v, mask=mask)

    q, k, v = torch.randn(2, 6, 2, 8), torch.randn(2, 6, 2, 8), torch.randn(2, 6, 2, 8)
    explained = torch._dynamo.explain(f)(q, k, v)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(f, backend="eager", fullgraph=True)
    assert torch.equal(compiled(q, k, v), f(q, k, v))


def test_bad_inputs_name_argument_and_sizes():
    q = k = v = torch.randn(2, 6, 2, 8)
    with pytest.raises(MagiArgumentError, match=r"'mask'.*total_q=9.*2 sample\(s\) of 6 queries"):
        mk.attention(q, k, v, mask=mk.BlockCausal(chunk_size=3, num_chunks=3))
    with pytest.raises(MagiArgumentError, match="'mask' must be a mask object"):
        mk.attention(q, k, v, mask=torch.ones(6, 6, dtype=torch.bool))
    with pytest.raises(MagiArgumentError, match="'layout'"):
        mk.attention(q, k, v, layout="sbhd")
    with pytest.raises(MagiArgumentError, match="'k' must have q's batch size 2"):
        mk.attention(q, k[:1], v[:1])
    with pytest.raises(MagiArgumentError, match="'q' must have 3 dims"):
        mk.attention(q, k, v, layout="thd")
    with pytest.raises(MagiArgumentError, match="'batch' must be an int >= 1"):
        mk.VarlenFull([0, 3]).repeat(0)
    with pytest.raises(MagiArgumentError, match="'masks'.*entry 1 is str"):
        mk.PackedMask([mk.VarlenFull([0, 3]), "causal"])


def test_kv_lens_key_padding_traces_and_checks_on_device():
    B, sq, sk, hq, hk, d = 3, 5, 9, 4, 2, 8
    q, k, v = torch.randn(B, sq, hq, d), torch.randn(B, sk, hk, d), torch.randn(B, sk, hk, d)
    lens = torch.tensor([9, 4, 0])  # full, padded, and a sample with no valid key (out 0, lse -inf)
    out, lse = mk.attention(q, k, v, kv_lens=lens, return_lse=True)
    dense = _block_diag([(torch.arange(sk) < n).expand(sq, sk) for n in lens.tolist()])
    ref_o, ref_l = _sdpa64(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), dense)
    _close(out.flatten(0, 1), ref_o)
    _close(lse.transpose(1, 2).flatten(0, 1), ref_l)
    explained = torch._dynamo.explain(lambda *a: mk.attention(*a, kv_lens=lens))(q, k, v)
    assert explained.graph_break_count == 0, explained.break_reasons
    with pytest.raises(RuntimeError, match="'kv_lens' must lie in"):
        mk.attention(q, k, v, kv_lens=torch.tensor([9, 10, 0]))
    with pytest.raises(MagiArgumentError, match="'kv_lens' must not be combined with a mask"):
        mk.attention(q, k, v, kv_lens=lens, mask=mk.VarlenFull([0, sq], [0, sk]))


def test_flex_attn_func_takes_a_mask_object():
    mask = mk.PackedMask([mk.BlockCausal(chunk_lens=[2, 3]), mk.VarlenCausal([0, 4], [0, 6])])
    q, k, v = torch.randn(mask.total_q, 2, 8), torch.randn(mask.total_k, 1, 8), torch.randn(mask.total_k, 1, 8)
    out, lse = mk.flex_attn_func(q, k, v, mask)
    ref_o, ref_l = mk.flex_attn_func(q, k, v, *mask.to_ranges())
    assert torch.equal(out, ref_o) and torch.equal(lse, ref_l)
    with pytest.raises(MagiArgumentError, match=r"flex_attn: argument 'mask' covers total_k=11 tokens but the k tensor has 10"):
        mk.flex_attn_func(q, k[:10], v[:10], mask)
    with pytest.raises(MagiArgumentError, match="'k_ranges' must be None"):
        mk.flex_attn_func(q, k, v, mask, mask.to_ranges()[1])


def test_triton_backend_through_the_entry_point():
    # the Triton kernel (interpreter on CPU) behind the same reshapes: bhsd views, GQA, a batch-repeated mask
    B, chunks, hq, hk, d = 2, [4, 5], 2, 1, 64  # the Triton configs ship head_dim 64 and 128
    S = sum(chunks)
    q, k, v = torch.randn(B, hq, S, d), torch.randn(B, hk, S, d), torch.randn(B, hk, S, d)
    out, lse = mk.attention(q, k, v, mask=mk.BlockCausal(chunk_lens=chunks), layout="bhsd", return_lse=True,
                            backend="triton")
    dense = _block_diag([_block_causal_dense(chunks)] * B)
    ref_o, ref_l = _sdpa64(*(t.transpose(1, 2).flatten(0, 1) for t in (q, k, v)), dense)
    _close(out.transpose(1, 2).flatten(0, 1), ref_o, tol=1e-4)
    _close(lse.transpose(1, 2).flatten(0, 1), ref_l, tol=1e-4)
