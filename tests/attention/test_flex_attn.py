"""flex_attn_func (torch path): forward/backward against float64 dense references."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import magi_kernels.ops.flex_attn as fa
from magi_kernels.ops.flex_attn import flex_attn_func, merge_attn_states
from magi_kernels.plan import build_plan
from magi_kernels.ranges import BlockCausal, Magi1WindowMask, SlidingWindow, VarlenCausal
from magi_kernels.kernels.torch.flex_attn import flex_attn_bwd, flex_attn_fwd
from magi_kernels.utils.checks import MagiArgumentError

from ._helpers import RTOL, assert_two_sided, dense_attn, dense_mask, slice_layouts


def _qkv(tq, tk, hq, hk, d, dtype=torch.float32, scale=1.0):
    q = (torch.randn(tq, hq, d) * scale).to(dtype)
    k = (torch.randn(tk, hk, d) * scale).to(dtype)
    v = torch.randn(tk, hk, d).to(dtype)
    return q, k, v


def _ranges(qr, kr, ty):
    return (torch.from_numpy(np.ascontiguousarray(qr)), torch.from_numpy(np.ascontiguousarray(kr)),
            torch.from_numpy(np.ascontiguousarray(ty)))


def _grads64(q, k, v, M, scale, softcap, do, dlse=None, dtype=torch.float64):
    qq, kk, vv = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    o, lse = dense_attn(qq, kk, vv, M, scale, softcap, dtype=dtype)
    loss = (o.double() * do.double()).sum()
    if dlse is not None:
        loss = loss + (torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).double() * dlse.double()).sum()
    g = torch.autograd.grad(loss, (qq, kk, vv))
    return o, lse, g


@settings(max_examples=40, deadline=None)
@given(layout=slice_layouts(max_tokens=70), hk=st.sampled_from([1, 2]), g=st.sampled_from([1, 2, 3, 8]),
       d=st.sampled_from([8, 64]), softcap=st.sampled_from([0.0, 3.0]), bm=st.sampled_from([4, 16]),
       bn=st.sampled_from([4, 8, 16]), step=st.sampled_from([1, 100, 1 << 22]))
def test_plan_walk_is_exact_in_float64(layout, hk, g, d, softcap, bm, bn, step):
    """The tile walk itself (plan + online softmax + FA2 backward) equals dense attention in fp64."""
    qr, kr, ty, tq, tk = layout
    plan = build_plan(qr, kr, ty, tq, tk, bm, bn)
    q, k, v = _qkv(tq, tk, hk * g, hk, d, torch.float64)
    M = dense_mask(qr, kr, ty, tq, tk)
    scale = 1 / math.sqrt(d)
    do, dlse = torch.randn(tq, hk * g, d, dtype=torch.float64), torch.randn(tq, hk * g, dtype=torch.float64)
    o_ref, lse_ref, (gq, gk, gv) = _grads64(q, k, v, M, scale, softcap, do, dlse)
    out = torch.full_like(q, float("nan"))  # poison: every row must be written, covered or not
    lse = torch.full((tq, hk * g), float("nan"))
    out, lse = flex_attn_fwd(q, k, v, plan, scale, softcap, out=out, lse=lse, max_step_elems=step)
    torch.testing.assert_close(out, o_ref, atol=1e-12, rtol=1e-12)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_ref)) and not lse.isnan().any()
    torch.testing.assert_close(lse, lse_ref.float(), atol=1e-6, rtol=1e-6)
    dq = torch.full_like(q, float("nan"))
    dq, dk, dv = flex_attn_bwd(do, q, k, v, out, lse, plan, scale, softcap, dlse=dlse, dq=dq, max_step_elems=step)
    # lse is stored in fp32 (the contract), so gradients carry ~1e-7 relative error
    for got, want in ((dq, gq), (dk, gk), (dv, gv)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _check_against_references(q, k, v, qr, kr, ty, M, softcap=0.0, backend=None):
    """Public op in q's dtype vs fp64 (two-sided scheme vs a same-dtype dense reference)."""
    dtype = q.dtype
    scale = 1 / math.sqrt(q.shape[-1])
    qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = flex_attn_func(qq, kk, vv, *_ranges(qr, kr, ty), softcap=softcap, backend=backend)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.shape == q.shape and lse.shape == q.shape[:2]
    do = torch.randn_like(out)
    gq, gk, gv = torch.autograd.grad(out, (qq, kk, vv), do)
    o64, lse64, g64 = _grads64(q, k, v, M, scale, softcap, do)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), o64, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(lse.double(), lse64, atol=2e-5, rtol=1e-5)
        for got, want in zip((gq, gk, gv), g64):
            torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-3)
        return
    olow, lselow, glow = _grads64(q, k, v, M, scale, softcap, do, dtype=dtype)
    tol = RTOL[dtype]
    assert_two_sided("out", out, o64, olow, rtol=tol["out"])
    assert_two_sided("lse", lse, lse64, lselow, rtol=tol["lse"])
    for name, got, want, low in zip(("dq", "dk", "dv"), (gq, gk, gv), g64, glow):
        assert_two_sided(name, got, want, low, rtol=tol[name], ratio=2.0)


@settings(max_examples=14, deadline=None)
@given(layout=slice_layouts(max_tokens=150, max_slices=5), dtype=st.sampled_from([torch.float16, torch.bfloat16]),
       hk=st.sampled_from([1, 2]), g=st.sampled_from([1, 2, 4, 8]), d=st.sampled_from([64, 128]),
       softcap=st.sampled_from([0.0, 0.0, 20.0]))
def test_low_precision_random_layouts(layout, dtype, hk, g, d, softcap):
    qr, kr, ty, tq, tk = layout
    q, k, v = _qkv(tq, tk, hk * g, hk, d, dtype)
    _check_against_references(q, k, v, qr, kr, ty, dense_mask(qr, kr, ty, tq, tk), softcap)


@settings(max_examples=10, deadline=None)
@given(layout=slice_layouts(max_tokens=300, max_slices=8), g=st.sampled_from([1, 3, 8]), d=st.sampled_from([64, 128]))
def test_fp32_random_layouts_multi_tile(layout, g, d):
    # up to 300 tokens -> several 128x128 tiles of the torch backend's plan
    qr, kr, ty, tq, tk = layout
    q, k, v = _qkv(tq, tk, 2 * g, 2, d)
    _check_against_references(q, k, v, qr, kr, ty, dense_mask(qr, kr, ty, tq, tk))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", [
    Magi1WindowMask(67, (2, 3, 4, 5), 0),          # odd chunk size: chunk edges inside tiles
    Magi1WindowMask(45, (1, 2, 3, 4, 5), 3),       # clean chunk r=1 + KV-cache prefix of 3 chunks
    BlockCausal(chunk_lens=[50, 1, 90, 77], window_chunks=[None, 1, 2, 3], prefix_len=33, prefix_chunk_size=11),
    SlidingWindow([0, 130, 131, 260], 40, 7),
    VarlenCausal([0, 100, 150, 260], [0, 30, 200, 300]),
], ids=["magi1", "magi1-clean-cache", "block-causal", "sliding", "varlen-causal-sq!=sk"])
def test_structured_masks(mask, dtype):
    qr, kr, ty = (x.numpy() for x in mask.to_ranges())
    q, k, v = _qkv(mask.total_q, mask.total_k, 8, 2, 64, dtype)
    _check_against_references(q, k, v, qr, kr, ty, dense_mask(qr, kr, ty, mask.total_q, mask.total_k))


def test_uncovered_rows_give_zero_and_neg_inf():
    qr = np.array([[0, 10], [20, 30], [30, 31]], np.int32)
    kr = np.array([[0, 16], [5, 5], [3, 9]], np.int32)  # rows 10..30 see nothing (gap + empty k range)
    q, k, v = _qkv(40, 16, 4, 2, 64)
    q.requires_grad_()
    out, lse = flex_attn_func(q, k, v, *_ranges(qr, kr, np.zeros(3, np.int32)))
    dead = torch.ones(40, dtype=torch.bool)
    dead[:10] = False
    dead[30] = False
    assert (out[dead] == 0).all() and torch.isneginf(lse[dead]).all()
    assert torch.isfinite(lse[~dead]).all()
    (out.sum() + torch.where(torch.isinf(lse), 0, lse).sum()).backward()
    assert (q.grad[dead] == 0).all() and torch.isfinite(q.grad).all()


def test_no_slices_at_all():
    q, k, v = _qkv(5, 7, 2, 1, 64)
    e = torch.zeros(0, 2, dtype=torch.int32)
    out, lse = flex_attn_func(q, k, v, e, e)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_backward_is_bitwise_deterministic():
    m = Magi1WindowMask(70, (2, 3, 4), 1)
    qr, kr, ty = m.to_ranges()
    q, k, v = _qkv(m.total_q, m.total_k, 4, 1, 64, torch.bfloat16)
    do = torch.randn(m.total_q, 4, 64, dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        out, _ = flex_attn_func(qq, kk, vv, qr, kr, ty, deterministic=True)
        runs.append(torch.autograd.grad(out, (qq, kk, vv), do))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_merge_attn_states_recombines_disjoint_key_sets():
    m = Magi1WindowMask(40, (2, 3, 4), 0)
    qr, kr, ty = m.to_ranges()
    q, k, v = _qkv(m.total_q, m.total_k, 4, 2, 64, torch.float64)
    q.requires_grad_()
    full_out, full_lse = flex_attn_func(q, k, v, qr, kr, ty)
    # split every key range at key 50: part A keys [ks, min(ke, 50)), part B keys [max(ks, 50), ke)
    ka = torch.stack([kr[:, 0], kr[:, 1].clamp(max=50)], 1).clamp(max=kr[:, 1:2].expand(-1, 2))
    ka = torch.stack([ka[:, 0].clamp(max=ka[:, 1]), ka[:, 1]], 1)
    kb = torch.stack([kr[:, 0].clamp(min=50), kr[:, 1]], 1)
    kb = torch.stack([kb[:, 0].clamp(max=kb[:, 1]), kb[:, 1]], 1)
    oa, la = flex_attn_func(q, k, v, qr, ka.int(), ty)
    ob, lb = flex_attn_func(q, k, v, qr, kb.int(), ty)
    out, lse = merge_attn_states(oa, la, ob, lb)
    torch.testing.assert_close(out, full_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, full_lse, atol=1e-6, rtol=1e-6)
    # gradients flow through both partial lse's (the backward's dlse term)
    do = torch.randn_like(out)
    g_merged, = torch.autograd.grad((out * do).sum(), q)
    g_full, = torch.autograd.grad((full_out * do).sum(), q)
    torch.testing.assert_close(g_merged, g_full, atol=1e-5, rtol=1e-5)
    # both sides empty -> 0 / -inf, never NaN
    z = torch.zeros(2, 1, 3)
    ninf = torch.full((2, 1), float("-inf"))
    o, l = merge_attn_states(z, ninf, z, ninf)
    assert (o == 0).all() and torch.isneginf(l).all()
    with pytest.raises(MagiArgumentError, match="'lse_b'"):
        merge_attn_states(z, ninf, z, torch.zeros(3, 1))


def _good():
    q, k, v = _qkv(8, 6, 4, 2, 64)
    qr = torch.tensor([[0, 8]], dtype=torch.int32)
    kr = torch.tensor([[0, 6]], dtype=torch.int32)
    return dict(q=q, k=k, v=v, q_ranges=qr, k_ranges=kr)


@pytest.mark.parametrize("change, arg, rule", [
    (lambda a: a.update(k=a["k"].half()), "k", "q's dtype"),
    (lambda a: a.update(q=a["q"].int()), "q", "dtype"),
    (lambda a: a.update(v=a["v"][:, :1]), "v", "k's shape"),
    (lambda a: a.update(k=torch.randn(6, 3, 64), v=torch.randn(6, 3, 64)), "k", "dividing"),
    (lambda a: a.update(k=torch.randn(6, 2, 32), v=torch.randn(6, 2, 32)), "k", "head_dim"),
    (lambda a: a.update(q=torch.randn(8, 64, 4).transpose(1, 2)), "q", "contiguous last dim"),
    (lambda a: a.update(q=a["q"][None]), "q", "3 dims"),
    (lambda a: a.update(q_ranges=torch.tensor([[0, 9]], dtype=torch.int32)), "q_ranges", "total_q=8"),
    (lambda a: a.update(k_ranges=torch.tensor([[4, 2]], dtype=torch.int32)), "k_ranges", "inverted"),
    (lambda a: a.update(k_ranges=torch.tensor([[-1, 2]], dtype=torch.int32)), "k_ranges", "non-negative"),
    (lambda a: a.update(q_ranges=a["q_ranges"].long()), "q_ranges", "int32"),
    (lambda a: a.update(q_ranges=a["q_ranges"].to("meta")), "q_ranges", "device"),
    (lambda a: a.update(attn_type_map=torch.tensor([7], dtype=torch.int32)), "attn_type_map", "mask types"),
    (lambda a: a.update(softcap=-1.0), "softcap", ">= 0"),
    (lambda a: a.update(softmax_scale=float("nan")), "softmax_scale", "finite"),
])
def test_bad_inputs_raise_naming_the_argument(change, arg, rule):
    a = _good()
    change(a)
    with pytest.raises(MagiArgumentError, match=f"'{arg}'.*{rule}"):
        flex_attn_func(**a)


def test_explicit_unavailable_backend_raises():
    a = _good()
    with pytest.raises(RuntimeError, match="flex_attn"):
        flex_attn_func(**a, backend="cuda")


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    m = Magi1WindowMask(24, (2, 3), 1)
    qr, kr, ty = m.to_ranges()

    def f(q, k, v):
        out, lse = flex_attn_func(q, k, v, qr, kr, ty, softcap=5.0)
        return out.float().sum(-1) + lse

    q, k, v = _qkv(m.total_q, m.total_k, 4, 2, 64)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    eager = f(*leaves)
    ge = torch.autograd.grad(eager.sum(), leaves)
    leaves2 = [x.clone().requires_grad_() for x in (q, k, v)]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves2)
    gc = torch.autograd.grad(compiled.sum(), leaves2)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


def test_custom_ops_pass_opcheck():
    q, k, v = _qkv(9, 7, 4, 2, 16)
    qr = torch.tensor([[0, 5], [3, 9]], dtype=torch.int32)
    kr = torch.tensor([[0, 7], [2, 6]], dtype=torch.int32)
    ty = torch.tensor([1, 3], dtype=torch.int32)
    torch.library.opcheck(torch.ops.magi_kernels.flex_attn.default, (q, k, v, qr, kr, ty, None, 0.0, False, None),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    out, lse = fa._flex_attn_op(q, k, v, qr, kr, ty, None, 0.0, False, None)
    torch.library.opcheck(torch.ops.magi_kernels.flex_attn_bwd.default,
                          (torch.randn_like(out), q, k, v, out, lse, None, qr, kr, ty, None, 0.0, False, None),
                          test_utils=("test_schema", "test_faketensor"))
