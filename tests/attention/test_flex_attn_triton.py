"""Triton flex_attn kernels (forward, dQ + delta pre-pass, dK/dV) under the interpreter, against float64 dense
attention; plus host-side checks that the launchers only pick configs registered with the AOT checker.

The forward runs in both of its shapes: the single pass of sm_80/89 (PASS 0) and the two passes of sm_90 (PASS 1
FULL tiles, PASS 2 PARTIAL tiles resuming from the saved softmax state), with the same kernel body the AOT check
compiles. The interpreter executes the sm_90 shape's tensor-descriptor loads (zero fill past the last row included)
and its state handover, but ignores ``warp_specialize``: the producer/consumer split exists only in compiled code.

fp32 inputs get tight bounds (the kernels' arithmetic is fp32 throughout); fp16 inputs get MagiAttention's
two-sided scheme against an fp16 dense reference. bf16 is not run here: the interpreter's bf16 tl.dot is
broken (supports() declines it on CPU), and GPU numerics are out of reach on this machine.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from magi_kernels.kernels.triton import flex_attn as kern
from magi_kernels.kernels.triton.aot import KernelLaunch, registered_configs
from magi_kernels.ops.flex_attn import flex_attn_func, make_args
from magi_kernels.ranges import Magi1WindowMask

from ._helpers import RTOL, assert_two_sided, dense_attn, dense_mask, slice_layouts

# (BLOCK_M, BLOCK_N) of the forward and dQ; dK/dV runs the transpose (_run_kernels), so (64, 16) gives it a key tile
# four times its q tile, the shape of the sm_90 128-key tiles. Several tiles per axis at interpreter-friendly sizes.
SMALL_TILES = [(16, 16), (16, 32), (32, 16), (64, 16)]


def _qkv(tq, tk, hq, hk, d, dtype):
    return (torch.randn(tq, hq, d).to(dtype), torch.randn(tk, hk, d).to(dtype), torch.randn(tk, hk, d).to(dtype))


def _ranges(qr, kr, ty):
    return tuple(torch.from_numpy(np.ascontiguousarray(x, dtype=np.int32)) for x in (qr, kr, ty))


def _nan(t):
    return torch.full_like(t, float("nan"))


def _ref(q, k, v, M, scale, softcap, do, dlse=None, dtype=torch.float64):
    """Dense attention in ``dtype`` and its gradients (dlse enters through lse where lse is finite)."""
    qq, kk, vv = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    o, lse = dense_attn(qq, kk, vv, M, scale, softcap, dtype=dtype)
    loss = (o.double() * do.double()).sum()
    if dlse is not None:
        loss = loss + (torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).double() * dlse.double()).sum()
    return o, lse, torch.autograd.grad(loss, (qq, kk, vv))


def _fwd_configs(dtype, d, cap, bm, bn, tma):
    """Small-tile forward configs: the single pass (tma=False) or the sm_90 shape's FULL and PARTIAL passes."""
    if not tma:
        return (kern.make_config("fwd", dtype, d, cap, bm, bn),)
    return tuple(kern.make_config(kind, dtype, d, cap, bm, bn, tma=True) for kind in ("fwd", "fwd_partial"))


def _run_kernels(q, k, v, qr, kr, ty, softcap, do, dlse, tiles, tma=False, scale=None):
    """launch_fwd/launch_bwd with small-tile configs, every output poisoned with NaN first."""
    a = make_args(q, k, v, *_ranges(qr, kr, ty), scale, softcap, False)
    d, cap = q.shape[-1], softcap > 0
    bm, bn = tiles
    out, lse = _nan(q), torch.full(q.shape[:2], float("nan"))
    kern.launch_fwd(a, out, lse, _fwd_configs(q.dtype, d, cap, bm, bn, tma))
    dq, dk, dv = _nan(q), _nan(k), _nan(v)
    cfgs = (kern.make_config("bwd_dq", q.dtype, d, cap, bm, bn), kern.make_config("bwd_dkdv", q.dtype, d, cap, bn, bm))
    kern.launch_bwd(a, do, out, lse, dlse, dq, dk, dv, cfgs)
    return a, out, lse, (dq, dk, dv)


@settings(max_examples=25, deadline=None)
@given(layout=slice_layouts(max_tokens=60, max_slices=5), hk=st.sampled_from([1, 2]), g=st.sampled_from([1, 2, 4]),
       d=st.sampled_from([64, 128]), softcap=st.sampled_from([0.0, 0.0, 3.0]), tiles=st.sampled_from(SMALL_TILES),
       with_dlse=st.booleans(), tma=st.booleans())
def test_fp32_random_layouts_forward_and_backward(layout, hk, g, d, softcap, tiles, with_dlse, tma):
    """Overlapping q ranges, gaps, uncovered rows, empty/length-1 ranges, all four types, sq != sk, GQA 1-4."""
    qr, kr, ty, tq, tk = layout
    q, k, v = _qkv(tq, tk, hk * g, hk, d, torch.float32)
    do = torch.randn_like(q)
    dlse = torch.randn(tq, hk * g) if with_dlse else None
    a, out, lse, grads = _run_kernels(q, k, v, qr, kr, ty, softcap, do, dlse, tiles, tma)
    o64, lse64, g64 = _ref(q, k, v, dense_mask(qr, kr, ty, tq, tk), a.softmax_scale, softcap, do, dlse)
    torch.testing.assert_close(out.double(), o64, atol=2e-5, rtol=1e-4)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse64)) and not lse.isnan().any()
    torch.testing.assert_close(lse.double(), lse64, atol=2e-5, rtol=1e-5)
    for name, got, want in zip(("dq", "dk", "dv"), grads, g64):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("tma", [False, True], ids=["one_pass", "tma_two_pass"])
@pytest.mark.parametrize("mask_type", [0, 1, 2, 3], ids=["full", "causal", "inv_causal", "bi_causal"])
def test_each_mask_type_multi_tile(mask_type, tma):
    """One type at a time with sq < sk, sq > sk, an overlapping range and an empty BI_CAUSAL-style slice."""
    qr = np.array([[0, 40], [30, 75], [75, 77], [80, 90]], np.int32)
    kr = np.array([[5, 70], [0, 20], [10, 60], [3, 3]], np.int32)
    ty = np.full(4, mask_type, np.int32)
    q, k, v = _qkv(96, 70, 2, 1, 64, torch.float32)
    do, dlse = torch.randn_like(q), torch.randn(96, 2)
    a, out, lse, grads = _run_kernels(q, k, v, qr, kr, ty, 0.0, do, dlse, (16, 32), tma)
    o64, lse64, g64 = _ref(q, k, v, dense_mask(qr, kr, ty, 96, 70), a.softmax_scale, 0.0, do, dlse)
    torch.testing.assert_close(out.double(), o64, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), lse64, atol=2e-5, rtol=1e-5)
    assert (out[90:] == 0).all() and torch.isneginf(lse[90:]).all()  # uncovered rows
    for got, want in zip(grads, g64):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("tiles", [(16, 16), (64, 16)], ids=["square", "dkdv_16x64"])
def test_dkdv_walks_several_full_runs_per_k_tile_over_a_head_group(tiles):
    """k tiles whose FULL q tiles form several runs (q ranges with gaps and an overlap), then PARTIAL tiles, GQA 3;
    ragged last q and k tiles, and keys no row sees (dK/dV 0). dK/dV runs the transpose of ``tiles``: at
    (64, 16) a 64-key tile over 16-row q tiles, while dQ walks 16-key tiles of a 64-row q tile (each its own plan)."""
    qr = np.array([[0, 32], [64, 96], [80, 112], [40, 50]], np.int32)
    kr = np.array([[0, 64], [0, 64], [16, 48], [5, 60]], np.int32)
    ty = np.array([0, 0, 0, 1], np.int32)
    q, k, v = _qkv(121, 77, 3, 1, 64, torch.float32)
    plan = make_args(q, k, v, *_ranges(qr, kr, ty), None, 0.0, False).plan(tiles[1], tiles[0])
    runs_per_ktile = np.diff(plan.k_rptr.numpy())
    assert runs_per_ktile.max() >= 2 and plan.k_nfull.numpy().min() < np.diff(plan.k_ptr.numpy()).max()
    do, dlse = torch.randn_like(q), torch.randn(121, 3)
    a, _, _, grads = _run_kernels(q, k, v, qr, kr, ty, 0.0, do, dlse, tiles)
    _, _, g64 = _ref(q, k, v, dense_mask(qr, kr, ty, 121, 77), a.softmax_scale, 0.0, do, dlse)
    for name, got, want in zip(("dq", "dk", "dv"), grads, g64):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")
    assert (grads[1][64:] == 0).all() and (grads[2][64:] == 0).all()  # keys 64.. are in no slice


@pytest.mark.parametrize("softcap", [0.0, 4.0])
@pytest.mark.parametrize("d", [64, 128])
def test_backward_at_the_sm90_tiles(monkeypatch, d, softcap):
    """The sm_90 backward's own tiles (fp32 under the interpreter): dK/dV over 128 keys without softcap (64 with it),
    dQ over its own tile. Odd sizes (ragged last q and k tiles), GQA 2, causal and overlapping slices, uncovered
    rows and keys, dlse; every output poisoned."""
    monkeypatch.setattr(kern, "arch_of", lambda device: 90)
    qr = np.array([[0, 70], [20, 100], [160, 171]], np.int32)
    kr = np.array([[0, 200], [30, 150], [140, 141]], np.int32)
    ty = np.array([1, 3, 0], np.int32)  # rows 100..159 see nothing, keys 200..210 are in no slice
    q, k, v = _qkv(171, 211, 4, 2, d, torch.float32)
    a = make_args(q, k, v, *_ranges(qr, kr, ty), None, softcap, False)
    assert kern.select_config("bwd_dkdv", torch.float32, d, softcap > 0, 90).constexprs["BLOCK_N"] == (
        64 if softcap else 128)
    do, dlse = torch.randn_like(q), torch.randn(171, 4)
    out, lse = torch.empty_like(q), torch.empty(171, 4)
    kern.launch_fwd(a, out, lse)
    dq, dk, dv = _nan(q), _nan(k), _nan(v)
    kern.launch_bwd(a, do, out, lse, dlse, dq, dk, dv)
    _, _, g64 = _ref(q, k, v, dense_mask(qr, kr, ty, 171, 211), a.softmax_scale, softcap, do, dlse)
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), g64):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")
    assert (dk[200:] == 0).all() and (dv[200:] == 0).all() and (dq[100:160] == 0).all()


def _check_op_fp16(q, k, v, qr, kr, ty, softcap=0.0):
    """Public op with backend='triton' (shipped configs, autograd) vs fp64, two-sided against an fp16 reference."""
    M = dense_mask(qr, kr, ty, q.shape[0], k.shape[0])
    scale = 1 / math.sqrt(q.shape[-1])
    qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = flex_attn_func(qq, kk, vv, *_ranges(qr, kr, ty), softcap=softcap, backend="triton")
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (qq, kk, vv), do)
    o64, lse64, g64 = _ref(q, k, v, M, scale, softcap, do)
    olow, lselow, glow = _ref(q, k, v, M, scale, softcap, do, dtype=q.dtype)
    tol = RTOL[q.dtype]
    assert_two_sided("out", out, o64, olow, rtol=tol["out"])
    assert_two_sided("lse", lse, lse64, lselow, rtol=tol["lse"])
    for name, got, want, low in zip(("dq", "dk", "dv"), grads, g64, glow):
        assert_two_sided(name, got, want, low, rtol=tol[name], ratio=2.0)


@settings(max_examples=10, deadline=None)
@given(layout=slice_layouts(max_tokens=150, max_slices=5), hk=st.sampled_from([1, 2]), g=st.sampled_from([1, 4]),
       d=st.sampled_from([64, 128]), softcap=st.sampled_from([0.0, 20.0]))
def test_fp16_random_layouts_through_the_op(layout, hk, g, d, softcap):
    qr, kr, ty, tq, tk = layout
    _check_op_fp16(*_qkv(tq, tk, hk * g, hk, d, torch.float16), qr, kr, ty, softcap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_magi1_window_mask(dtype):
    m = Magi1WindowMask(45, (1, 2, 3), 2)  # clean chunk + KV-cache prefix: sq != sk, shifted key windows
    qr, kr, ty = (x.numpy() for x in m.to_ranges())
    q, k, v = _qkv(m.total_q, m.total_k, 4, 2, 64, dtype)
    if dtype == torch.float16:
        _check_op_fp16(q, k, v, qr, kr, ty)
        return
    do = torch.randn_like(q)
    for tma in (False, True):
        a, out, lse, grads = _run_kernels(q, k, v, qr, kr, ty, 0.0, do, None, (32, 16), tma)
        o64, lse64, g64 = _ref(q, k, v, dense_mask(qr, kr, ty, m.total_q, m.total_k), a.softmax_scale, 0.0, do)
        torch.testing.assert_close(out.double(), o64, atol=2e-5, rtol=1e-4)
        for got, want in zip(grads, g64):
            torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("state_bytes", [1, 3 * 2 * 32 * 66 * 4])
def test_two_pass_forward_over_head_groups(monkeypatch, state_bytes):
    """A state budget below all q heads' state runs the two passes over groups of heads (1 and 3 of 5 here)."""
    monkeypatch.setattr(kern, "STATE_BYTES_MAX", state_bytes)
    launches = []
    run = KernelLaunch.run
    monkeypatch.setattr(KernelLaunch, "run", lambda launch: (launches.append(launch), run(launch)))
    qr, kr, ty = [[0, 30], [30, 45]], [[0, 30], [10, 45]], [1, 0]  # 2 q tiles of 32 rows, both with PARTIAL tiles
    q, k, v = _qkv(45, 45, 5, 1, 64, torch.float32)
    a = make_args(q, k, v, *_ranges(qr, kr, ty), None, 0.0, False)
    out, lse = _nan(q), torch.full((45, 5), float("nan"))
    kern.launch_fwd(a, out, lse, _fwd_configs(torch.float32, 64, False, 32, 16, True))
    assert a.plan(32, 16).q_partial.numel() == 2  # state: 2 slots x 32 rows x (64 + 2) fp32 per q head
    per_launch = 1 if state_bytes == 1 else 3
    assert [(x.args["head_base"], x.grid[1]) for x in launches[::2]] == [
        (h, min(per_launch, 5 - h)) for h in range(0, 5, per_launch)]
    assert all(x.args["state_heads"] == per_launch for x in launches)
    o64, lse64, _ = _ref(q, k, v, dense_mask(qr, kr, ty, 45, 45), a.softmax_scale, 0.0, torch.randn_like(q))
    torch.testing.assert_close(out.double(), o64, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), lse64, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("tma", [False, True], ids=["one_pass", "tma_two_pass"])
def test_forward_walks_partial_tiles_as_runs(tma):
    """PARTIAL tiles as runs of consecutive k tiles: a tile repeated for a row with two disjoint intervals, a run
    of three, a gap before the last tile; rows that see nothing; odd sizes."""
    qr = np.array([[0, 1], [0, 1], [0, 1], [0, 1], [0, 1], [1, 5], [6, 21]], np.int32)
    kr = np.array([[1, 2], [5, 6], [17, 21], [35, 36], [70, 71], [0, 40], [3, 3]], np.int32)
    ty = np.zeros(7, np.int32)
    q, k, v = _qkv(21, 77, 2, 1, 64, torch.float32)
    a = make_args(q, k, v, *_ranges(qr, kr, ty), None, 0.0, False)
    plan = a.plan(16, 16)
    assert plan.b_kidx.tolist() == [0, 0, 1, 2, 4] and plan.q_brptr.tolist() == [0, 3, 3]
    assert plan.br_lo.tolist() == [0, 0, 4] and plan.br_hi.tolist() == [1, 3, 5]
    out, lse = _nan(q), torch.full((21, 2), float("nan"))
    kern.launch_fwd(a, out, lse, _fwd_configs(torch.float32, 64, False, 16, 16, tma))
    o64, lse64, _ = _ref(q, k, v, dense_mask(qr, kr, ty, 21, 77), a.softmax_scale, 0.0, torch.randn_like(q))
    torch.testing.assert_close(out.double(), o64, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), lse64, atol=2e-5, rtol=1e-5)
    assert (out[5:] == 0).all() and torch.isneginf(lse[5:]).all()


@pytest.mark.parametrize("tiles", [(32, 16), (16, 32)])
def test_two_pass_forward_writes_only_its_rows_of_a_strided_output(tiles):
    """The FULL pass stores out and the state as a view of the accumulator's register layout: every row and column
    of a q tile lands where a plain [rows, D] store puts it, and nothing past the last row or outside the heads."""
    # q tiles with PARTIAL entries, FULL-only ones, and a last one that sees nothing and ends past row 77.
    qr, kr, ty = [[0, 32], [32, 64]], [[20, 52], [0, 64]], [1, 0]
    q, k, v = _qkv(77, 64, 2, 1, 128, torch.float32)
    a = make_args(q, k, v, *_ranges(qr, kr, ty), None, 0.0, False)
    # out is a window of a bigger buffer: token stride (3 heads) * 128, a spare head and 16 spare rows after it.
    big = torch.full((77 + 16, 3, 128), 7.0)
    out, lse = big[:77, :2], torch.full((77, 2), float("nan"))
    kern.launch_fwd(a, out, lse, _fwd_configs(torch.float32, 128, False, *tiles, True))
    assert (big[77:] == 7.0).all() and (big[:, 2] == 7.0).all()
    o64, lse64, _ = _ref(q, k, v, dense_mask(qr, kr, ty, 77, 64), a.softmax_scale, 0.0, torch.randn_like(q))
    torch.testing.assert_close(out.double(), o64, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), lse64, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("tma", [False, True], ids=["one_pass", "tma_two_pass"])
@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_forward_with_negative_and_zero_scale(tma, softcap):
    """The FULL step takes the row max before scaling; the launcher keeps that exact for scales <= 0."""
    qr, kr, ty = [[0, 40], [20, 50]], [[0, 37], [30, 61]], [0, 1]  # FULL and PARTIAL tiles at 16 x 16
    q, k, v = _qkv(50, 61, 2, 1, 64, torch.float32)
    for scale in (-0.3, 0.0):
        a, out, lse, _ = _run_kernels(q, k, v, qr, kr, ty, softcap, torch.randn_like(q), None, (16, 16), tma, scale)
        o64, lse64, _ = _ref(q, k, v, dense_mask(qr, kr, ty, 50, 61), scale, softcap, torch.randn_like(q))
        torch.testing.assert_close(out.double(), o64, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(lse.double(), lse64, atol=2e-5, rtol=1e-5)


def test_uncovered_rows_through_the_op():
    qr = np.array([[0, 10], [20, 30], [30, 31]], np.int32)
    kr = np.array([[0, 16], [5, 5], [3, 9]], np.int32)  # rows 10..30 see nothing (gap + empty k range)
    q, k, v = _qkv(40, 16, 4, 2, 64, torch.float16)
    q.requires_grad_()
    out, lse = flex_attn_func(q, k, v, *_ranges(qr, kr, np.zeros(3, np.int32)), backend="triton")
    dead = torch.ones(40, dtype=torch.bool)
    dead[:10] = False
    dead[30] = False
    assert (out[dead] == 0).all() and torch.isneginf(lse[dead]).all() and torch.isfinite(lse[~dead]).all()
    (out.float().sum() + torch.where(torch.isinf(lse), 0, lse).sum()).backward()
    assert (q.grad[dead] == 0).all() and torch.isfinite(q.grad).all()


def test_backward_is_bitwise_deterministic():
    m = Magi1WindowMask(30, (2, 3, 4), 1)
    qr, kr, ty = m.to_ranges()
    q, k, v = _qkv(m.total_q, m.total_k, 4, 1, 64, torch.float16)  # GQA 4: dK/dV sum over the group
    do = torch.randn_like(q)
    runs = []
    for det in (True, True, False):
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        out, _ = flex_attn_func(qq, kk, vv, qr, kr, ty, deterministic=det, backend="triton")
        runs.append(torch.autograd.grad(out, (qq, kk, vv), do))
    for r in runs[1:]:
        for a, b in zip(runs[0], r):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# Host side: configs, selection, supports


_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32"}


def _triton_type(v) -> str:
    if isinstance(v, torch.Tensor):
        return _PTR[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2**31 <= v < 2**31 else "i64"
    return "fp32" if isinstance(v, float) else type(v).__name__


def test_shipped_configs_are_registered_and_cover_every_arch():
    registered = {c.key: c for c in registered_configs()}
    shipped = kern.shipped_configs()
    assert shipped and all(registered.get(c.key) == c for c in shipped)
    assert all(c.mma == "f16" for c in shipped)
    # A (kind, arch, head_dim) has one row for both softcap settings or one row for each, never a mix.
    for key in kern.TILES:
        assert len(key) == 3 or (key[:3] not in kern.TILES and (*key[:3], not key[3]) in kern.TILES), key
    for kind in kern.KERNELS:
        for arch in kern.ARCHS:
            for dtype in kern.GPU_DTYPES:
                for d in kern.HEAD_DIMS:
                    for cap in (False, True):
                        if kind == "fwd_partial" and arch not in kern.TMA_ARCHS[kind]:
                            with pytest.raises(ValueError, match="fwd_partial"):
                                kern.select_config(kind, dtype, d, cap, arch)
                            continue
                        cfg = kern.select_config(kind, dtype, d, cap, arch)
                        assert cfg.key in registered and cfg.archs == (arch,)
                        assert cfg.constexprs["HEAD_DIM"] == d and cfg.constexprs["SOFTCAP"] == cap


@pytest.mark.parametrize("arch", kern.ARCHS)
def test_forward_configs_are_the_two_pass_tma_shape_exactly_on_sm90(arch):
    for dtype in kern.GPU_DTYPES:
        for d in kern.HEAD_DIMS:
            for cap in (False, True):
                cfgs = kern.forward_configs(dtype, d, cap, arch)
                passes = [c.constexprs["PASS"] for c in cfgs]
                if arch == 90:
                    assert passes == [1, 2] and [c.name for c in cfgs] == ["flex_attn_fwd", "flex_attn_fwd_partial"]
                    assert cfgs[0].config.endswith("tma ws") and cfgs[0].constexprs["BLOCK_N"] == 128
                    assert {(c.constexprs["BLOCK_M"], c.constexprs["BLOCK_N"]) for c in cfgs} == {(128, 128)}
                else:
                    assert passes == [0] and "tma" not in cfgs[0].config


def test_forward_config_rules_name_the_problem():
    with pytest.raises(ValueError, match="needs tma=True"):
        kern.make_config("fwd_partial", torch.float16, 64, False, 128, 128)
    with pytest.raises(ValueError, match="forward option"):
        kern.make_config("bwd_dq", torch.float16, 64, False, 64, 64, tma=True)
    q, k, v = _qkv(20, 20, 2, 1, 64, torch.float32)
    a = make_args(q, k, v, *_ranges([[0, 20]], [[0, 20]], [1]), None, 0.0, False)
    out, lse = torch.empty_like(q), torch.empty(20, 2)
    full, partial = _fwd_configs(torch.float32, 64, False, 16, 16, True)
    with pytest.raises(ValueError, match="PASS"):
        kern.launch_fwd(a, out, lse, (partial,))
    with pytest.raises(ValueError, match="same tiles"):
        kern.launch_fwd(a, out, lse, (full, kern.make_config("fwd_partial", torch.float32, 64, False, 16, 32,
                                                              tma=True)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "qkv-views", "misaligned"])
def test_launchers_pick_registered_configs_with_matching_arg_types(monkeypatch, dtype, layout):
    """Argument types match the registered signature and every divisible_by_16 argument really is."""
    seen = []
    monkeypatch.setattr(KernelLaunch, "run", lambda launch: seen.append((launch.config, launch.grid, launch.args)))
    monkeypatch.setattr(kern, "arch_of", lambda device: 90)
    tq, hq, hk, d = 50, 4, 2, 64
    if layout == "qkv-views":  # one packed buffer, heads sliced out: strided but aligned
        buf = torch.randn(tq, hq + 2 * hk, d).to(dtype)
        q, k, v = buf[:, :hq], buf[:, hq:hq + hk], buf[:, hq + hk:]
    elif layout == "misaligned":  # a view 1 element into its storage: the launcher must copy it
        q = torch.randn(tq * hq * d + 1).to(dtype)[1:].view(tq, hq, d)
        k, v = torch.randn(tq, hk, d).to(dtype), torch.randn(tq, hk, d).to(dtype)
    else:
        q, k, v = _qkv(tq, tq, hq, hk, d, dtype)
    qr, kr, ty = _ranges([[0, 50]], [[0, 50]], [1])
    a = make_args(q, k, v, qr, kr, ty, None, 0.0, False)
    out, lse = torch.empty_like(q), torch.empty(tq, hq)
    kern.launch_fwd(a, out, lse)
    kern.launch_bwd(a, torch.randn(tq, hq, d).to(dtype), out, lse, torch.randn(tq, hq), torch.empty_like(q),
                    torch.empty_like(k), torch.empty_like(v))
    registered = {c.key: c for c in registered_configs()}
    # sm_90: the FULL pass, then the PARTIAL pass (the causal diagonal tile is PARTIAL), then the backward.
    assert [c.name for c, _, _ in seen] == ["flex_attn_fwd", "flex_attn_fwd_partial", "flex_attn_bwd_dq",
                                            "flex_attn_bwd_dkdv"]
    for cfg, grid, args in seen:
        assert registered.get(cfg.key) == cfg
        runtime = [n for n, t in cfg.signature.items() if t != "constexpr"]
        assert sorted(runtime) == sorted(args)
        assert {n for n in runtime if n.endswith("_ptr") or n.startswith("stride_")} == set(cfg.divisible_args)
        for name in runtime:
            val = args[name]
            assert _triton_type(val) == cfg.signature[name], f"{cfg.key}: {name}"
            if name in cfg.divisible_args:
                assert (val.data_ptr() if isinstance(val, torch.Tensor) else val) % 16 == 0, f"{cfg.key}: {name}"
        assert all(x > 0 for x in grid)


@pytest.mark.parametrize("softcap", [0.0, 5.0])
@pytest.mark.parametrize("d", [64, 128])
def test_backward_kernels_each_get_the_plan_of_their_own_tile(monkeypatch, d, softcap):
    """sm_90 ships 128-key dK/dV tiles without softcap and 64-key ones with it, and dQ another tile again: each
    launch's grid and plan lists (q-major for dQ, k-major runs for dK/dV) follow its own config's tiles."""
    seen = {}
    monkeypatch.setattr(KernelLaunch, "run", lambda launch: seen.setdefault(launch.config.name, launch))
    monkeypatch.setattr(kern, "arch_of", lambda device: 90)
    tq, tk, hq, hk = 300, 333, 4, 2
    q, k, v = _qkv(tq, tk, hq, hk, d, torch.float16)
    a = make_args(q, k, v, *_ranges([[0, 300], [0, 64]], [[0, 333], [200, 333]], [1, 0]), None, softcap, False)
    kern.launch_bwd(a, torch.randn_like(q), torch.empty_like(q), torch.empty(tq, hq), None, torch.empty_like(q),
                    torch.empty_like(k), torch.empty_like(v))
    dq, dkdv = seen["flex_attn_bwd_dq"], seen["flex_attn_bwd_dkdv"]
    assert dkdv.config.constexprs["BLOCK_N"] == (64 if softcap else 128)
    tiles = [(c.constexprs["BLOCK_M"], c.constexprs["BLOCK_N"]) for c in (dq.config, dkdv.config)]
    assert tiles[0] != tiles[1]
    q_major = ("q_start_ptr", "q_rstart_ptr", "run_lo_ptr", "q_kidx_ptr")
    k_major = ("k_start_ptr", "k_rstart_ptr", "krun_lo_ptr", "krun_hi_ptr", "k_qidx_ptr")
    # dQ: one program per q tile of its plan; dK/dV: one per k tile of its own.
    assert dq.grid[0] == a.plan(*tiles[0]).num_q_tiles and dkdv.grid[0] == a.plan(*tiles[1]).num_k_tiles
    for launch, lists in ((dq, q_major), (dkdv, k_major)):
        plan = a.plan(launch.config.constexprs["BLOCK_M"], launch.config.constexprs["BLOCK_N"])
        for name in lists:
            want = plan.tensors[kern.PLAN_ARGS[name]]
            assert want.numel() and torch.equal(launch.args[name], want), f"{launch.config.key}: {name}"


def test_select_config_and_supports_name_the_limit():
    with pytest.raises(ValueError, match="head_dim"):
        kern.select_config("fwd", torch.float16, 96, False, 90)
    with pytest.raises(ValueError, match="fp16/bf16"):
        kern.select_config("fwd", torch.float64, 64, False, 90)
    def args(dtype, d):
        qkv = _qkv(4, 4, 2, 1, d, dtype)
        return make_args(*qkv, *_ranges([[0, 4]], [[0, 4]], [0]), None, 0.0, False)

    assert kern.supports(args(torch.float16, 64)) is None and kern.supports(args(torch.float32, 128)) is None
    assert "head_dim" in kern.supports(args(torch.float16, 96))
    assert "interpreter" in kern.supports(args(torch.bfloat16, 64))
    assert "float64" in kern.supports(args(torch.float64, 64))
