"""Distributed attention cases, run by tests/distributed/test_attention.py on 2, 4 and 8 gloo ranks.

Every case builds the same random global problem on every rank (same seed), runs single-process
``flex_attn_func`` in float64 as the reference (forward and backward of a random linear loss on
``out`` and the finite ``lse``), runs the distributed function in float32 on this rank's shard, and
compares the shard's out / lse / dq / dk / dv with the reference's slice.
"""

from __future__ import annotations

import functools
import zlib

import numpy as np
import torch
from torch.distributed.device_mesh import init_device_mesh

from magi_kernels import (
    BlockCausal,
    Magi1WindowMask,
    VarlenCausal,
    VarlenFull,
    flex_attn_func,
)
from magi_kernels.distributed import (
    dispatch,
    even_shard_sizes,
    ring_attention,
    ulysses_attention,
    undispatch,
    usp_attention,
)
from magi_kernels.utils.checks import MagiArgumentError
from tests.distributed._count import count_collectives

ATOL, RTOL = 3e-5, 1e-4  # fp32 shard computation vs float64 reference


def _ranges(mask):
    qr, kr, ty = mask.to_ranges()
    return qr, kr, ty, mask.total_q, mask.total_k


def layouts(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    tq, tk = 26, 33
    sl = []
    for _ in range(6):  # random overlapping slices of all four types
        a, b = sorted(rng.integers(0, tq + 1, 2))
        c, d = sorted(rng.integers(0, tk + 1, 2))
        sl.append((a, max(b, a + 1), c, max(d, c + 1), int(rng.integers(0, 4))))
    rand = (torch.tensor([[s[0], s[1]] for s in sl], dtype=torch.int32),
            torch.tensor([[s[2], s[3]] for s in sl], dtype=torch.int32),
            torch.tensor([s[4] for s in sl], dtype=torch.int32), tq, tk)
    return {
        # MAGI-1 window mask with a KV-cache prefix: 4 chunks of 5 tokens after 2 cached chunks
        "magi1_window_prefix": _ranges(Magi1WindowMask(5, (None, 3, 2, 1), slice_point=2)),
        "causal": _ranges(VarlenCausal([0, 23])),
        "varlen": _ranges(VarlenFull([0, 6, 17, 29])),
        "random_slices": rand,
    }


def _split(sizes, r):
    return sum(sizes[:r]), sum(sizes[:r + 1])


def _close(name, got, want):
    got, want = got.double(), want.double()
    same_inf = torch.equal(torch.isneginf(got), torch.isneginf(want))
    if not same_inf:
        raise AssertionError(f"{name}: -inf positions differ")
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


def _problem(seed, layout, hq, hk, d=16):
    qr, kr, ty, tq, tk = layout
    g = torch.Generator().manual_seed(seed)
    q, k, v, gout = (torch.randn(s, generator=g, dtype=torch.float64) for s in
                     ((tq, hq, d), (tk, hk, d), (tk, hk, d), (tq, hq, d)))
    glse = torch.randn((tq, hq), generator=g, dtype=torch.float64)
    return qr, kr, ty, q, k, v, gout, glse


def _loss(out, lse, gout, glse):
    return (out.double() * gout).sum() + (torch.where(torch.isfinite(lse), lse, 0).double() * glse).sum()


def _reference(qr, kr, ty, q, k, v, gout, glse, softmax_scale=None, softcap=0.0):
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = flex_attn_func(qq, kk, vv, qr, kr, ty, softmax_scale=softmax_scale, softcap=softcap)
    _loss(out, lse, gout, glse).backward()
    return out.detach(), lse.detach(), qq.grad, kk.grad, vv.grad


def check_sharded(fn, layout_name, rank, world, seed, *, hq=8, hk=4, q_sizes=None, k_sizes=None, **kw):
    """Contiguous shards (MAGI-1's split unless sizes given) through ``fn``, forward and backward."""
    seed = seed ^ zlib.crc32(layout_name.encode())
    qr, kr, ty, q, k, v, gout, glse = _problem(seed, layouts(seed)[layout_name], hq, hk)
    ref = _reference(qr, kr, ty, q, k, v, gout, glse, kw.get("softmax_scale"), kw.get("softcap", 0.0))
    q_sizes = q_sizes or even_shard_sizes(q.shape[0], world)
    k_sizes = k_sizes or even_shard_sizes(k.shape[0], world)
    (qa, qb), (ka, kb) = _split(q_sizes, rank), _split(k_sizes, rank)
    ql, kl, vl = (t.float().requires_grad_() for t in (q[qa:qb], k[ka:kb], v[ka:kb]))
    out, lse = fn(ql, kl, vl, qr, kr, ty, **kw)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    _loss(out, lse, gout[qa:qb], glse[qa:qb]).backward()
    _close("out", out, ref[0][qa:qb])
    _close("lse", lse, ref[1][qa:qb])
    _close("dq", ql.grad, ref[2][qa:qb])
    _close("dk", kl.grad, ref[3][ka:kb])
    _close("dv", vl.grad, ref[4][ka:kb])


def check_known_shard_sizes(fn, rank, world, seed):
    """With ``shard_sizes`` the call exchanges no lengths: the forward's only collectives move data
    (ring: the K/V hops; Ulysses: the all-to-alls), and the result is still the reference's."""
    name, q_sizes, k_sizes = "magi1_window_prefix", _skewed(20, world), even_shard_sizes(30, world)
    _, _, _, q, k, _, _, _ = _problem(0, layouts(0)[name], 8, 4)
    assert (q.shape[0], k.shape[0]) == (20, 30), (q.shape, k.shape)  # the skewed sizes above fit this layout
    sizes = {"q_sizes": q_sizes, "k_sizes": k_sizes}
    with count_collectives() as without:
        check_sharded(fn, name, rank, world, seed, **sizes)
    with count_collectives() as known:
        check_sharded(fn, name, rank, world, seed, shard_sizes=(q_sizes, k_sizes), **sizes)
    assert without["all_gather"] >= 1, dict(without)  # the length exchange this case removes
    data = {"batch_isend_irecv"} if fn is ring_attention else {"all_to_all_single"}
    assert set(known) <= data, f"collectives besides the data exchange: {dict(known)}"
    assert sum(known.values()) == sum(without[n] for n in data), (dict(known), dict(without))
    ql, kl = torch.zeros(q_sizes[rank], 8, 16), torch.zeros(k_sizes[rank], 4, 16)
    qr = torch.tensor([[0, 20]], dtype=torch.int32)
    kr = torch.tensor([[0, 30]], dtype=torch.int32)
    bad_local = (q_sizes, k_sizes[:rank] + [k_sizes[rank] + 1] + k_sizes[rank + 1:])
    expect_error(lambda: fn(ql, kl, kl, qr, kr, shard_sizes=bad_local),
                 f"argument 'shard_sizes' k_sizes[{rank}] must equal this rank's k length {k_sizes[rank]}")
    expect_error(lambda: fn(ql, kl, kl, qr, kr, shard_sizes=(q_sizes[:-1], k_sizes)),
                 f"q_sizes must hold {world} non-negative lengths")


def check_dispatched(rank, world, seed, mask, chunk_size, hq=4, hk=2):
    """dispatch -> ring_attention -> undispatch equals flex_attn_func on the global tensors (fwd + bwd)."""
    qr, kr, ty = mask.to_ranges()
    _, _, _, q, k, v, gout, glse = _problem(seed, (qr, kr, ty, mask.total_q, mask.total_k), hq, hk)
    ref = _reference(qr, kr, ty, q, k, v, gout, glse)
    qg, kg, vg = (t.float().requires_grad_() for t in (q, k, v))
    ql, meta = dispatch(qg, mask, chunk_size=chunk_size)
    side = "q" if meta.keys_follow_queries else "k"
    kl, _ = dispatch(kg, meta, side=side)
    vl, _ = dispatch(vg, meta, side=side)
    with count_collectives() as counts:
        out, lse = ring_attention(ql, kl, vl, meta.q_ranges, meta.k_ranges, meta.attn_type_map,
                                  shard_sizes=meta.shard_sizes)
    assert set(counts) == {"batch_isend_irecv"}, dict(counts)  # the dispatch metadata has the lengths
    y, ly = undispatch(out, meta), undispatch(lse, meta)
    # The gathered tensors are one logical (replicated) value: each rank's identical loss counts once.
    _loss(y, ly, gout, glse).backward()
    _close("out", y, ref[0])
    _close("lse", ly, ref[1])
    _close("dq", qg.grad, ref[2])
    _close("dk", kg.grad, ref[3])
    _close("dv", vg.grad, ref[4])


def expect_error(fn, pattern):
    try:
        fn()
    except MagiArgumentError as e:
        assert pattern in str(e), str(e)
        return
    raise AssertionError(f"expected an error mentioning {pattern!r}")


def _bad_heads(rank, world, seed, hq, hk, pattern):
    q = torch.randn(4, hq, 8)
    k = torch.randn(4, hk, 8)
    qr = torch.tensor([[0, 4 * world]], dtype=torch.int32)
    expect_error(lambda: ulysses_attention(q, k, k, qr, qr), pattern)


def _skewed(total, world):
    """Deliberately unequal contiguous shards (one rank gets a single token)."""
    sizes = [1] + even_shard_sizes(total - 1, world - 1)
    return sizes


def cases(world: int) -> dict:
    c = {}
    names = list(layouts(0))
    for name in names:
        c[f"ulysses/{name}"] = functools.partial(check_sharded, ulysses_attention, name)
        c[f"ring/{name}"] = functools.partial(check_sharded, ring_attention, name)
    # GQA with more ranks than kv heads (kv heads repeated for Ulysses; ring needs nothing)
    c["ulysses/gqa_more_ranks_than_kv_heads"] = functools.partial(check_sharded, ulysses_attention, "causal",
                                                                  hq=2 * world, hk=1)
    c["ring/gqa"] = functools.partial(check_sharded, ring_attention, "magi1_window_prefix", hq=2 * world, hk=1)
    c["ring/skewed_shards_softcap"] = lambda r, w, s: check_sharded(
        ring_attention, "random_slices", r, w, s, q_sizes=_skewed(26, w), k_sizes=_skewed(33, w)[::-1],
        softcap=5.0)
    c["ulysses/skewed_shards_scale"] = lambda r, w, s: check_sharded(
        ulysses_attention, "magi1_window_prefix", r, w, s, q_sizes=_skewed(20, w), softmax_scale=0.3)
    c["ring/known_shard_sizes_no_length_exchange"] = functools.partial(check_known_shard_sizes, ring_attention)
    c["ulysses/known_shard_sizes_no_length_exchange"] = functools.partial(check_known_shard_sizes,
                                                                          ulysses_attention)
    c["ulysses/error_q_heads"] = lambda r, w, s: _bad_heads(r, w, s, world + 1, 1, "argument 'q'")
    if world > 2:
        c["ulysses/error_kv_heads"] = lambda r, w, s: _bad_heads(r, w, s, 2 * world, 3, "argument 'k'")
    if world >= 4:
        for ring in (2, world // 2) if world == 8 else (2,):
            uly = world // ring

            def usp_case(r, w, s, ring=ring, uly=uly, name="magi1_window_prefix"):
                mesh = init_device_mesh("cpu", (ring, uly), mesh_dim_names=("ring", "ulysses"))
                check_sharded(usp_attention, name, r, w, s, hq=uly * 2, hk=max(1, uly // 2),
                              ulysses_group=mesh["ulysses"], ring_group=mesh["ring"])
            c[f"usp/ring{ring}xulysses{uly}"] = usp_case
    c["dispatch/block_causal"] = lambda r, w, s: check_dispatched(r, w, s, BlockCausal(chunk_size=3, num_chunks=8 * w),
                                                                  chunk_size=3)
    c["dispatch/magi1_window_prefix"] = lambda r, w, s: check_dispatched(
        r, w, s, Magi1WindowMask(4, (None, 3, 2, 1) * 2, slice_point=1), chunk_size=2)
    return c
