"""Triton kernels for flex_attn: block-sparse forward and backward driven by the planner's tile lists.

Math (per query row r and q head h, kv head kh = h // G; see magi_kernels/reference/flex_attn.py):

    s_j   = (q . k_j) * scale                 softcap c > 0:  s_j = c * tanh((q . k_j) * scale / c)
    lse   = log sum_{j visible} exp(s_j)      natural log, fp32; -inf when no key is visible
    out   = sum_{j visible} exp(s_j - lse) v_j            (0 when no key is visible)
    backward (FA2 with a pre-pass delta):
    P = exp(S - lse), dP = dO V^T, delta = sum_j P dP - dlse, dS = P (dP - delta) * dS/dS_raw
    dV = P^T dO, dQ = scale * dS K, dK = scale * dS^T Q      (dS/dS_raw = 1 - tanh^2 under softcap)

Design:

* The plan (magi_kernels/plan/planner.py) lists, per q tile, the k tiles that have a visible cell:
  FULL ones first (every cell visible and in bounds: no mask, no bounds check), then PARTIAL ones,
  whose mask is rebuilt in registers as the OR over the tile's few slices of
  ``qs <= r < qe and lo(r) <= c < hi(r)``. So the hot loop is the unmasked one (tutorial 06's
  two-loop idea, generalised to arbitrary slice unions), and no fully-masked tile is ever touched.
* Scores live in the log2 domain: scale * log2(e) is folded into one multiply so the softmax uses
  exp2 (one MUFU.EX2 per score); lse is converted back to natural log at the end.
* GQA maps q head h to kv head h // G in the address computation: K/V are never repeated.
* Backward is two kernels, both without atomics, so gradients are bitwise deterministic and the
  ``deterministic=True`` flag needs no separate path:
    1. dQ, one program per (q tile, q head). It first walks its k tiles once to recompute the row's lse
       (log2 domain, online) and delta = sum_j P dP in fp32 (the pre-pass), stores both for kernel 2,
       then walks them again for dQ. (Recomputing lse rather than converting the stored natural-log one
       keeps P = 1 exactly on rows that see a single key, so their dS is exactly 0.)
       FA2 uses delta = rowsum(dO * O) from the stored O instead; for fp16/bf16 that O is rounded,
       and on rows that see 1-2 keys dQ/dK are a cancellation dominated by that rounding (it failed the
       ratio-2 two-sided tolerance in the torch path). The pre-pass costs 2 of the backward's 9 tile GEMMs.
    2. dK/dV, one program per (k tile, kv head), walking the plan's k-major lists; the G q heads
       of the group are looped over inside the program, so dK/dV of a kv head are summed in
       registers in a fixed order instead of with atomics.
* fp32 accumulators everywhere; P and dS are rounded to the input dtype only as tensor-core operands.
* Configs (tile shapes, warps, stages) are per arch and per kernel; each is registered with the AOT
  checker (``python -m magi_kernels.tools.aot_check --kernel flex_attn``). Pointer arguments and
  token/head strides are compiled as divisible by 16; the launcher guarantees it (copying a
  misaligned input, or computing into an aligned temporary), every other integer is marked
  do_not_specialize so the binary that runs is the one the checker inspected.
* fp32 inputs run only under the interpreter (tests: tight error bounds); on a GPU the torch path
  serves fp32. bf16 runs on GPUs only (the interpreter's bf16 tl.dot is broken).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from magi_kernels.kernels.triton import triton_interpreting
from magi_kernels.kernels.triton._io import check_i32, dummy
from magi_kernels.kernels.triton.aot import AotConfig, register_aot

OP = "flex_attn"
LOG2E = 1.4426950408889634
HEAD_DIMS = (64, 128)
GPU_DTYPES = (torch.float16, torch.bfloat16)
_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


# --------------------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def _tanh(x):
    """tanh via exp2 of -2|x| (in (0, 1], never overflows); odd symmetry restores the sign."""
    e = tl.exp2(-2.8853900817779268 * tl.abs(x))  # exp(-2|x|) = 2^(-2 log2(e) |x|)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _scores_log2(q, kt, qk_scale, cap_in, cap_out, SOFTCAP: tl.constexpr):
    """Scores of q [M, D] against kt [D, N] in the log2 domain, plus tanh(.) for the softcap backward.

    Without softcap: s * log2(e) = (q . k) * (scale * log2(e)) = (q . k) * qk_scale.
    With softcap c:  c * tanh((q . k) * scale / c) * log2(e) = tanh((q . k) * cap_in) * cap_out.
    """
    s = tl.dot(q, kt)
    if SOFTCAP:
        th = _tanh(s * cap_in)
        return th * cap_out, th
    else:
        return s * qk_scale, s  # second value unused


@triton.jit
def _slice_mask(slices, mask_slices, j0, j1, r, c):
    """OR over slice ids mask_slices[j0:j1] of (qs <= r < qe and lo(r) <= c < hi(r)).

    r (query rows) and c (key columns) broadcast against each other; slices[s] = (qs, qe, ks, ke, type),
    lo = ks + (r - qs) for INV_CAUSAL/BI_CAUSAL (type bit 1), hi = ke - (qe - 1 - r) for CAUSAL/BI_CAUSAL
    (type bit 0). Slices lie inside [0, total_q) x [0, total_k), so this also masks out-of-bounds cells.
    """
    vis = (r < 0) & (c < 0)  # all False, in the broadcast shape
    for j in range(j0, j1):
        sid = tl.load(mask_slices + j)
        qs = tl.load(slices + sid * 5 + 0)
        qe = tl.load(slices + sid * 5 + 1)
        ks = tl.load(slices + sid * 5 + 2)
        ke = tl.load(slices + sid * 5 + 3)
        ty = tl.load(slices + sid * 5 + 4)
        lo = ks + (r - qs) * ((ty >> 1) & 1)
        hi = ke - (qe - 1 - r) * (ty & 1)
        vis = vis | ((r >= qs) & (r < qe) & (c >= lo) & (c < hi))
    return vis


# --------------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, K, V, n, offs_m, offs_d, k_st, k_sh, v_st, v_sh, kh, total_k,
              slices, mask_slices, j0, j1, qk_scale, cap_in, cap_out,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, SOFTCAP: tl.constexpr):
    """One online-softmax step over k tile n (log2 domain)."""
    s2, _, k, v = _kv_tile_scores(q, K, V, n, offs_m, offs_d, k_st, k_sh, v_st, v_sh, kh, total_k, slices,
                                  mask_slices, j0, j1, qk_scale, cap_in, cap_out, BLOCK_N, MASKED, SOFTCAP)
    m_new = tl.maximum(m_i, tl.max(s2, 1))
    if MASKED:
        # A row that has seen nothing yet keeps m = -inf: shift by 0 there so exp2 gives 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new  # a FULL tile makes every row's max finite
    p = tl.exp2(s2 - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)  # rescales what was accumulated under the old max
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["total_q", "total_k", "groups", "lse_st"])
def _flex_attn_fwd_kernel(Q, K, V, O, LSE,
                          q_ptr, q_nfull, q_kidx, q_pptr, p_mptr, mask_slices, slices,
                          q_st, q_sh, k_st, k_sh, v_st, v_sh, o_st, o_sh, lse_st,
                          total_q, total_k, groups, qk_scale, cap_in, cap_out,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                          SOFTCAP: tl.constexpr):
    m = tl.program_id(0)
    h = tl.program_id(1)
    kh = h // groups
    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < total_q
    rows64 = offs_m.to(tl.int64)
    q = tl.load(Q + rows64[:, None] * q_st + h * q_sh + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    e0 = tl.load(q_ptr + m)
    e1 = tl.load(q_ptr + m + 1)
    e_mid = e0 + tl.load(q_nfull + m)  # [e0, e_mid) FULL, [e_mid, e1) PARTIAL
    p0 = tl.load(q_pptr + m) - e_mid  # partial id of entry e is p0 + e

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for e in range(e0, e_mid):
        n = tl.load(q_kidx + e)
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, K, V, n, offs_m, offs_d, k_st, k_sh, v_st, v_sh, kh, total_k,
                                  slices, mask_slices, 0, 0, qk_scale, cap_in, cap_out, BLOCK_N, False, SOFTCAP)
    for e in range(e_mid, e1):
        n = tl.load(q_kidx + e)
        j0 = tl.load(p_mptr + p0 + e)
        j1 = tl.load(p_mptr + p0 + e + 1)
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, K, V, n, offs_m, offs_d, k_st, k_sh, v_st, v_sh, kh, total_k,
                                  slices, mask_slices, j0, j1, qk_scale, cap_in, cap_out, BLOCK_N, True, SOFTCAP)

    # Rows that saw no key (l = 0; acc is 0 there too): out 0, lse -inf.
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))  # log2 -> natural log
    tl.store(O + rows64[:, None] * o_st + h * o_sh + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + rows64 * lse_st + h, lse, mask=row_ok)


# --------------------------------------------------------------------------------------------------
# Backward, kernel 1: delta pre-pass + dQ per (q tile, q head)


@triton.jit
def _kv_tile_scores(q, K, V, n, offs_m, offs_d, k_st, k_sh, v_st, v_sh, kh, total_k, slices, mask_slices, j0, j1,
                    qk_scale, cap_in, cap_out, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, SOFTCAP: tl.constexpr):
    """K and V of k tile n, and the (masked) log2-domain scores of q against it."""
    cols = n * BLOCK_N + tl.arange(0, BLOCK_N)
    koff = cols.to(tl.int64)[:, None] * k_st + kh * k_sh + offs_d[None, :]
    voff = cols.to(tl.int64)[:, None] * v_st + kh * v_sh + offs_d[None, :]
    if MASKED:
        col_ok = (cols < total_k)[:, None]
        k = tl.load(K + koff, mask=col_ok, other=0.0)
        v = tl.load(V + voff, mask=col_ok, other=0.0)
    else:
        k = tl.load(K + koff)
        v = tl.load(V + voff)
    s2, th = _scores_log2(q, tl.trans(k), qk_scale, cap_in, cap_out, SOFTCAP)
    if MASKED:
        vis = _slice_mask(slices, mask_slices, j0, j1, offs_m[:, None], cols[None, :])
        s2 = tl.where(vis, s2, float("-inf"))
    return s2, th, k, v


@triton.jit
def _bwd_q_tile(dq, m_i, l_i, dacc, q, do, lse2, delta, K, V, n, offs_m, offs_d, k_st, k_sh, v_st, v_sh, kh,
                total_k, slices, mask_slices, j0, j1, qk_scale, cap_in, cap_out,
                BLOCK_N: tl.constexpr, MASKED: tl.constexpr, SOFTCAP: tl.constexpr, DELTA_PASS: tl.constexpr):
    """DELTA_PASS: one online step of (row max m, sum l, sum P dP) -- the lse and delta pre-pass.
    Else: dq += dS K (unscaled by softmax_scale), with P = exp2(s2 - lse2) from the pre-pass's lse2."""
    s2, th, k, v = _kv_tile_scores(q, K, V, n, offs_m, offs_d, k_st, k_sh, v_st, v_sh, kh, total_k, slices,
                                   mask_slices, j0, j1, qk_scale, cap_in, cap_out, BLOCK_N, MASKED, SOFTCAP)
    dp = tl.dot(do, tl.trans(v))
    if DELTA_PASS:
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s2 - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        return dq, m_new, l_i * alpha + tl.sum(p, 1), dacc * alpha + tl.sum(p * dp, 1)
    else:
        p = tl.exp2(s2 - lse2[:, None])  # lse2 = +inf on rows that see nothing: p = 0, never NaN
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - th * th)
        return dq + tl.dot(ds.to(k.dtype), k), m_i, l_i, dacc


@triton.jit
def _bwd_q_walk(dq, m_i, l_i, dacc, q, do, lse2, delta, K, V, q_kidx, p_mptr, e0, e_mid, e1, p0, offs_m, offs_d,
                k_st, k_sh, v_st, v_sh, kh, total_k, slices, mask_slices, qk_scale, cap_in, cap_out,
                BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr, DELTA_PASS: tl.constexpr):
    for e in range(e0, e_mid):
        n = tl.load(q_kidx + e)
        dq, m_i, l_i, dacc = _bwd_q_tile(dq, m_i, l_i, dacc, q, do, lse2, delta, K, V, n, offs_m, offs_d, k_st,
                                         k_sh, v_st, v_sh, kh, total_k, slices, mask_slices, 0, 0, qk_scale, cap_in,
                                         cap_out, BLOCK_N, False, SOFTCAP, DELTA_PASS)
    for e in range(e_mid, e1):
        n = tl.load(q_kidx + e)
        j0 = tl.load(p_mptr + p0 + e)
        j1 = tl.load(p_mptr + p0 + e + 1)
        dq, m_i, l_i, dacc = _bwd_q_tile(dq, m_i, l_i, dacc, q, do, lse2, delta, K, V, n, offs_m, offs_d, k_st,
                                         k_sh, v_st, v_sh, kh, total_k, slices, mask_slices, j0, j1, qk_scale, cap_in,
                                         cap_out, BLOCK_N, True, SOFTCAP, DELTA_PASS)
    return dq, m_i, l_i, dacc


@triton.jit(do_not_specialize=["total_q", "total_k", "groups", "lse_st", "has_dlse"])
def _flex_attn_bwd_dq_kernel(Q, K, V, DO, DLSE, LSE2, DELTA, DQ,
                             q_ptr, q_nfull, q_kidx, q_pptr, p_mptr, mask_slices, slices,
                             q_st, q_sh, k_st, k_sh, v_st, v_sh, do_st, do_sh, dq_st, dq_sh, lse_st,
                             total_q, total_k, groups, has_dlse, softmax_scale, qk_scale, cap_in, cap_out,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                             SOFTCAP: tl.constexpr):
    m = tl.program_id(0)
    h = tl.program_id(1)
    kh = h // groups
    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < total_q
    rows64 = offs_m.to(tl.int64)
    q = tl.load(Q + rows64[:, None] * q_st + h * q_sh + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + rows64[:, None] * do_st + h * do_sh + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    e0 = tl.load(q_ptr + m)
    e1 = tl.load(q_ptr + m + 1)
    e_mid = e0 + tl.load(q_nfull + m)
    p0 = tl.load(q_pptr + m) - e_mid

    # Pass 1 (pre-pass): recompute the row's lse (log2 domain, online like the forward) and
    # delta = sum_j P dP = dO . O with O unrounded. Recomputing lse here instead of converting the stored
    # natural-log lse keeps P exact where it should be: a row that sees one key gets lse2 = s2 exactly,
    # P = exp2(0) = 1 and dS = 0 exactly, as in exact arithmetic (the ln <-> log2 round trip leaves ~1e-7).
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    dacc = tl.zeros([BLOCK_M], tl.float32)
    dq, m_i, l_i, dacc = _bwd_q_walk(dq, m_i, l_i, dacc, q, do, l_i, l_i, K, V, q_kidx, p_mptr, e0, e_mid, e1, p0,
                                     offs_m, offs_d, k_st, k_sh, v_st, v_sh, kh, total_k, slices, mask_slices,
                                     qk_scale, cap_in, cap_out, BLOCK_N, SOFTCAP, True)
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    lse2 = tl.where(seen, m_i + tl.log2(l_safe), float("inf"))  # +inf: P = 0 on rows that see nothing
    dlse_ok = tl.where(has_dlse != 0, row_ok, False)  # (tl.where: the interpreter mistypes tensor & scalar)
    # A gradient flowing into lse enters delta with a minus sign (d lse / d s_j = P_j).
    delta = dacc / l_safe - tl.load(DLSE + rows64 * lse_st + h, mask=dlse_ok, other=0.0)
    tl.store(LSE2 + rows64 * lse_st + h, lse2, mask=row_ok)
    tl.store(DELTA + rows64 * lse_st + h, delta, mask=row_ok)
    # Pass 2: dQ = scale * sum_j dS K.
    dq, m_i, l_i, dacc = _bwd_q_walk(dq, m_i, l_i, dacc, q, do, lse2, delta, K, V, q_kidx, p_mptr, e0, e_mid, e1,
                                     p0, offs_m, offs_d, k_st, k_sh, v_st, v_sh, kh, total_k, slices, mask_slices,
                                     qk_scale, cap_in, cap_out, BLOCK_N, SOFTCAP, False)
    dq = dq * softmax_scale
    tl.store(DQ + rows64[:, None] * dq_st + h * dq_sh + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


# --------------------------------------------------------------------------------------------------
# Backward, kernel 2: dK/dV per (k tile, kv head), the group's q heads looped inside


@triton.jit
def _bwd_kv_tile(dk, dv, k, v, Q, DO, LSE2, DELTA, m, h, cols, offs_d, q_st, q_sh, do_st, do_sh, lse_st, total_q,
                 slices, mask_slices, j0, j1, qk_scale, cap_in, cap_out,
                 BLOCK_M: tl.constexpr, MASKED: tl.constexpr, SOFTCAP: tl.constexpr):
    """dV += P^T dO and dK += dS^T Q for q tile m, q head h, in the transposed [keys, rows] layout."""
    rows = m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    qoff = rows64[:, None] * q_st + h * q_sh + offs_d[None, :]
    dooff = rows64[:, None] * do_st + h * do_sh + offs_d[None, :]
    if MASKED:
        row_ok = rows < total_q
        q = tl.load(Q + qoff, mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + dooff, mask=row_ok[:, None], other=0.0)
        lse2 = tl.load(LSE2 + rows64 * lse_st + h, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + rows64 * lse_st + h, mask=row_ok, other=0.0)
    else:
        q = tl.load(Q + qoff)
        do = tl.load(DO + dooff)
        lse2 = tl.load(LSE2 + rows64 * lse_st + h)  # kernel 1's log2-domain lse (+inf: row sees nothing)
        delta = tl.load(DELTA + rows64 * lse_st + h)
    s2t, tht = _scores_log2(k, tl.trans(q), qk_scale, cap_in, cap_out, SOFTCAP)  # [BLOCK_N, BLOCK_M]
    if MASKED:
        vis = _slice_mask(slices, mask_slices, j0, j1, rows[None, :], cols[:, None])
        s2t = tl.where(vis, s2t, float("-inf"))
    pt = tl.exp2(s2t - lse2[None, :])
    dv += tl.dot(pt.to(do.dtype), do)
    dpt = tl.dot(v, tl.trans(do))
    dst = pt * (dpt - delta[None, :])
    if SOFTCAP:
        dst = dst * (1.0 - tht * tht)
    dk += tl.dot(dst.to(q.dtype), q)
    return dk, dv


@triton.jit(do_not_specialize=["total_q", "total_k", "groups", "lse_st"])
def _flex_attn_bwd_dkdv_kernel(Q, K, V, DO, LSE2, DELTA, DK, DV,
                               k_ptr, k_nfull, k_qidx, k_pptr, k_pent, p_mptr, mask_slices, slices,
                               q_st, q_sh, k_st, k_sh, v_st, v_sh, do_st, do_sh, dk_st, dk_sh, dv_st, dv_sh,
                               lse_st, total_q, total_k, groups, softmax_scale, qk_scale, cap_in, cap_out,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                               SOFTCAP: tl.constexpr):
    n = tl.program_id(0)
    kh = tl.program_id(1)
    cols = n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = cols < total_k
    cols64 = cols.to(tl.int64)
    k = tl.load(K + cols64[:, None] * k_st + kh * k_sh + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + cols64[:, None] * v_st + kh * v_sh + offs_d[None, :], mask=col_ok[:, None], other=0.0)

    f0 = tl.load(k_ptr + n)
    f1 = tl.load(k_ptr + n + 1)
    f_mid = f0 + tl.load(k_nfull + n)  # [f0, f_mid) FULL, [f_mid, f1) PARTIAL
    pe0 = tl.load(k_pptr + n) - f_mid  # k_pent index of entry f is pe0 + f

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    # The q heads of this kv head's group, in a fixed order: the GQA sum happens here, not in atomics.
    for g in range(0, groups):
        h = kh * groups + g
        for f in range(f0, f_mid):
            m = tl.load(k_qidx + f)
            dk, dv = _bwd_kv_tile(dk, dv, k, v, Q, DO, LSE2, DELTA, m, h, cols, offs_d, q_st, q_sh, do_st, do_sh,
                                  lse_st, total_q, slices, mask_slices, 0, 0, qk_scale, cap_in, cap_out,
                                  BLOCK_M, False, SOFTCAP)
        for f in range(f_mid, f1):
            m = tl.load(k_qidx + f)
            pid = tl.load(k_pent + pe0 + f)
            j0 = tl.load(p_mptr + pid)
            j1 = tl.load(p_mptr + pid + 1)
            dk, dv = _bwd_kv_tile(dk, dv, k, v, Q, DO, LSE2, DELTA, m, h, cols, offs_d, q_st, q_sh, do_st, do_sh,
                                  lse_st, total_q, slices, mask_slices, j0, j1, qk_scale, cap_in, cap_out,
                                  BLOCK_M, True, SOFTCAP)
    dk = dk * softmax_scale
    tl.store(DK + cols64[:, None] * dk_st + kh * dk_sh + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=col_ok[:, None])
    tl.store(DV + cols64[:, None] * dv_st + kh * dv_sh + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=col_ok[:, None])


# --------------------------------------------------------------------------------------------------
# Shipped configurations (each is compiled and inspected by `python -m magi_kernels.tools.aot_check`)

KERNELS = {  # kind -> (AOT name, "module:attr")
    "fwd": ("flex_attn_fwd", f"{__name__}:_flex_attn_fwd_kernel"),
    "bwd_dq": ("flex_attn_bwd_dq", f"{__name__}:_flex_attn_bwd_dq_kernel"),
    "bwd_dkdv": ("flex_attn_bwd_dkdv", f"{__name__}:_flex_attn_bwd_dkdv_kernel"),
}
ARCHS = (80, 89, 90)

# (kind, arch, head_dim) -> (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M is always the q-row tile
# and BLOCK_N the key tile (for dK/dV the program owns BLOCK_N keys and walks q tiles of BLOCK_M rows).
# Chosen so that every config compiles with 0 spills (aot_check), the largest tiles that do:
# * fwd sm_90: 8 warps = 2 warpgroups of 64 rows each (the wgmma M atom is 64); sm_80 d128 needs BN=32 to
#   stay spill-free at 3 stages; sm_89 (101 KB smem) runs 2 stages.
# * bwd dQ holds q, dO and the dq accumulator for the whole walk: d128 takes 32-key steps.
# * bwd dK/dV holds k, v and two [BN, D] fp32 accumulators: d128 uses 8 warps to spread them.
TILES = {
    ("fwd", 90, 64): (128, 128, 8, 3), ("fwd", 90, 128): (128, 64, 8, 3),
    ("fwd", 80, 64): (128, 64, 4, 3), ("fwd", 80, 128): (128, 32, 8, 3),
    ("fwd", 89, 64): (128, 64, 4, 2), ("fwd", 89, 128): (128, 64, 8, 2),
    ("bwd_dq", 90, 64): (64, 64, 4, 2), ("bwd_dq", 90, 128): (64, 32, 4, 2),
    ("bwd_dq", 80, 64): (64, 64, 4, 2), ("bwd_dq", 80, 128): (64, 32, 4, 2),
    ("bwd_dq", 89, 64): (64, 64, 4, 2), ("bwd_dq", 89, 128): (64, 32, 4, 2),
    ("bwd_dkdv", 90, 64): (32, 64, 4, 2), ("bwd_dkdv", 90, 128): (32, 64, 8, 2),
    ("bwd_dkdv", 80, 64): (32, 64, 4, 2), ("bwd_dkdv", 80, 128): (64, 64, 8, 2),
    ("bwd_dkdv", 89, 64): (32, 64, 4, 2), ("bwd_dkdv", 89, 128): (64, 64, 8, 2),
}

_PLAN_Q = ("q_ptr", "q_nfull", "q_kidx", "q_pptr", "p_mptr", "mask_slices", "slices")
_PLAN_K = ("k_ptr", "k_nfull", "k_qidx", "k_pptr", "k_pent", "p_mptr", "mask_slices", "slices")
_TAIL = {"BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "HEAD_DIM": "constexpr", "SOFTCAP": "constexpr"}


def _signature(kind: str, dt: str) -> tuple[dict, tuple]:
    """(argument -> Triton type in kernel order, args compiled as divisible by 16)."""
    t, f32, i32 = f"*{dt}", "*fp32", "*i32"
    if kind == "fwd":
        ptrs = {"Q": t, "K": t, "V": t, "O": t, "LSE": f32, **{p: i32 for p in _PLAN_Q}}
        strides = ("q_st", "q_sh", "k_st", "k_sh", "v_st", "v_sh", "o_st", "o_sh")
        ints = ("lse_st", "total_q", "total_k", "groups")
        floats = ("qk_scale", "cap_in", "cap_out")
    elif kind == "bwd_dq":
        ptrs = {"Q": t, "K": t, "V": t, "DO": t, "DLSE": f32, "LSE2": f32, "DELTA": f32, "DQ": t,
                **{p: i32 for p in _PLAN_Q}}
        strides = ("q_st", "q_sh", "k_st", "k_sh", "v_st", "v_sh", "do_st", "do_sh", "dq_st", "dq_sh")
        ints = ("lse_st", "total_q", "total_k", "groups", "has_dlse")
        floats = ("softmax_scale", "qk_scale", "cap_in", "cap_out")
    else:
        ptrs = {"Q": t, "K": t, "V": t, "DO": t, "LSE2": f32, "DELTA": f32, "DK": t, "DV": t,
                **{p: i32 for p in _PLAN_K}}
        strides = ("q_st", "q_sh", "k_st", "k_sh", "v_st", "v_sh", "do_st", "do_sh", "dk_st", "dk_sh",
                   "dv_st", "dv_sh")
        ints = ("lse_st", "total_q", "total_k", "groups")
        floats = ("softmax_scale", "qk_scale", "cap_in", "cap_out")
    sig = {**ptrs, **{s: "i32" for s in strides}, **{i: "i32" for i in ints}, **{x: "fp32" for x in floats}, **_TAIL}
    return sig, tuple(ptrs) + strides


def make_config(kind: str, dtype: torch.dtype, head_dim: int, softcap: bool, block_m: int, block_n: int,
                num_warps: int = 4, num_stages: int = 2, archs: tuple[int, ...] = ARCHS) -> AotConfig:
    """A config for one kernel (shipped ones come from TILES; tests build small-tile ones for the interpreter)."""
    name, kernel = KERNELS[kind]
    dt = _TRITON_DTYPE[dtype]
    sig, div16 = _signature(kind, dt)
    arch = "/".join(f"sm{a}" for a in archs)
    label = f"{arch} {dt} D={head_dim} BM={block_m} BN={block_n} w{num_warps} s{num_stages}" + (
        " softcap" if softcap else "")
    return AotConfig(kernel=kernel, name=name, config=label, signature=sig,
                     constexprs={"BLOCK_M": block_m, "BLOCK_N": block_n, "HEAD_DIM": head_dim, "SOFTCAP": softcap},
                     num_warps=num_warps, num_stages=num_stages, archs=tuple(archs), mma="f16",
                     divisible_by_16=div16)


def _shipped() -> dict:
    cfgs = {}
    for (kind, arch, d), (bm, bn, w, s) in TILES.items():
        for dtype in GPU_DTYPES:
            for cap in (False, True):
                cfgs[(kind, arch, dtype, d, cap)] = make_config(kind, dtype, d, cap, bm, bn, w, s, (arch,))
    return cfgs


_CONFIGS = _shipped()
for _cfg in _CONFIGS.values():
    register_aot(_cfg)


def shipped_configs() -> list[AotConfig]:
    """Every config the launchers can select on a GPU (all registered with the AOT checker at import)."""
    return list(_CONFIGS.values())


def arch_of(device: torch.device) -> int:
    """The config family for a device: sm_90 -> 90; sm_86/89 and newer consumer parts (~100 KB smem) -> 89;
    everything else (sm_80, sm_87, ...) and the interpreter -> 80."""
    if device.type != "cuda":
        return 80
    major, minor = torch.cuda.get_device_capability(device)
    cc = major * 10 + minor
    if cc == 90:
        return 90
    if cc in (86, 89) or major >= 10 and cc not in (100, 103):
        return 89
    return 80


def select_config(kind: str, dtype: torch.dtype, head_dim: int, softcap: bool, arch: int) -> AotConfig:
    """The shipped config for a call; raises ValueError (naming the limit) when none fits.

    Under the interpreter fp32 is accepted too: it runs the same tile shapes with fp32 pointers (a config that
    is never compiled for a GPU, so it is not registered).
    """
    if kind not in KERNELS:
        raise ValueError(f"{OP}: unknown kernel kind {kind!r}")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"{OP}: the Triton kernels support head_dim in {HEAD_DIMS}, got {head_dim}")
    if arch not in ARCHS:
        raise ValueError(f"{OP}: no configs for sm_{arch} (have {ARCHS})")
    if dtype in GPU_DTYPES:
        return _CONFIGS[(kind, arch, dtype, head_dim, bool(softcap))]
    if dtype == torch.float32 and triton_interpreting():
        bm, bn, w, s = TILES[(kind, arch, head_dim)]
        return make_config(kind, dtype, head_dim, bool(softcap), bm, bn, w, s, (arch,))
    raise ValueError(f"{OP}: the Triton kernels take fp16/bf16 (fp32 only under the interpreter), got {dtype}")


# --------------------------------------------------------------------------------------------------
# Host side


def supports(info) -> str | None:
    """None if the Triton kernels can run this call, else why not (device checks are done by the registry)."""
    d = int(info.extra.get("head_dim", 0))
    if d not in HEAD_DIMS:
        return f"head_dim {d} is not one of {HEAD_DIMS}"
    if info.dtype in GPU_DTYPES:
        if info.dtype == torch.bfloat16 and info.device.type == "cpu":
            return "bf16 tl.dot is broken in the Triton interpreter; bf16 runs on GPUs only"
        return None
    if info.dtype == torch.float32 and info.device.type == "cpu":
        return None  # interpreter only (the registry's host gate requires TRITON_INTERPRET=1 for CPU tensors)
    return f"q dtype {info.dtype} is not fp16/bf16" + (" (fp32: interpreter only)" if info.dtype == torch.float32
                                                       else "")


supports_bwd = supports


def _aligned_ok(t: torch.Tensor, n_strides: int = 2) -> bool:
    """16-byte aligned data pointer, leading strides multiples of 16 elements, last dim contiguous."""
    return (t.data_ptr() % 16 == 0 and t.stride(-1) == 1
            and all(s % 16 == 0 for s in t.stride()[:n_strides]))


def _aligned_input(t: torch.Tensor) -> torch.Tensor:
    """t itself when it meets the compiled divisibility hints, else an aligned contiguous copy."""
    return t if _aligned_ok(t) else t.contiguous().clone()


def _aligned_vec(t: torch.Tensor) -> torch.Tensor:
    """[T, H] fp32 with stride (H, 1) and an aligned pointer (lse, dlse)."""
    t = t.to(torch.float32)
    return t if (t.is_contiguous() and t.data_ptr() % 16 == 0) else t.contiguous().clone()


def _out_buffer(t: torch.Tensor) -> torch.Tensor:
    return t if _aligned_ok(t) else torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _scalars(a) -> tuple[float, float, float]:
    """(qk_scale, cap_in, cap_out): scale*log2(e); with softcap c: scale/c and c*log2(e)."""
    cap = a.softcap
    return (a.softmax_scale * LOG2E, a.softmax_scale / cap if cap > 0 else 1.0, cap * LOG2E if cap > 0 else 1.0)


def _plan_ptrs(a, cfg: AotConfig, names: tuple[str, ...]) -> list[torch.Tensor]:
    plan = a.plan(cfg.constexprs["BLOCK_M"], cfg.constexprs["BLOCK_N"]).on(a.q.device)
    out = []
    for n in names:
        t = plan[n]
        if t.numel() == 0 or t.data_ptr() % 16 != 0:  # empty lists still need a valid aligned pointer
            t = t.clone() if t.numel() else dummy(a.q.device, torch.int32)
        out.append(t)
    return out


def _run(cfg: AotConfig, grid: tuple[int, ...], args: list) -> None:
    from magi_kernels.kernels.triton.aot import resolve_kernel

    if any(g == 0 for g in grid):
        return
    resolve_kernel(cfg)[grid](*args, **cfg.constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _strides(*ts: torch.Tensor) -> list[int]:
    return [s for t in ts for s in (t.stride(0), t.stride(1))]


def _check_sizes(a, *ts: torch.Tensor) -> None:
    vals = {"total_q": a.total_q, "total_k": a.total_k}
    for i, t in enumerate(ts):
        vals[f"stride{i}"] = t.stride(0)
        vals[f"head_extent{i}"] = t.shape[1] * t.stride(1)
    check_i32(OP, **vals)


def launch_fwd(a, out: torch.Tensor, lse: torch.Tensor, config: AotConfig | None = None) -> None:
    """Write out [Tq, Hq, D] (q's dtype) and lse [Tq, Hq] (fp32) for FlexAttnArgs ``a``."""
    tq, hq, d = a.q.shape
    if tq == 0:
        return
    cfg = config or select_config("fwd", a.q.dtype, d, a.softcap > 0, arch_of(a.q.device))
    q, k, v = (_aligned_input(t) for t in (a.q, a.k, a.v))
    o_buf = _out_buffer(out)
    lse_buf = lse if (lse.is_contiguous() and lse.data_ptr() % 16 == 0) else torch.empty_like(lse).contiguous()
    _check_sizes(a, q, k, v, o_buf)
    grid = (triton.cdiv(tq, cfg.constexprs["BLOCK_M"]), hq)
    args = [q, k, v, o_buf, lse_buf, *_plan_ptrs(a, cfg, _PLAN_Q), *_strides(q, k, v, o_buf), lse_buf.stride(0),
            a.total_q, a.total_k, a.groups, *_scalars(a)]
    _run(cfg, grid, args)
    if o_buf is not out:
        out.copy_(o_buf)
    if lse_buf is not lse:
        lse.copy_(lse_buf)


def launch_bwd(a, dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dlse, dq: torch.Tensor,
               dk: torch.Tensor, dv: torch.Tensor, configs: tuple[AotConfig, AotConfig] | None = None) -> None:
    """Write dq, dk, dv. Deterministic by construction (no atomics), whatever ``a.deterministic`` says.

    ``out`` and ``lse`` are not read: the pre-pass recomputes lse and delta (module docstring).
    """
    tq, hq, d = a.q.shape
    tk, hk, _ = a.k.shape
    arch = arch_of(a.q.device)
    cap = a.softcap > 0
    cq, ckv = configs or (select_config("bwd_dq", a.q.dtype, d, cap, arch),
                          select_config("bwd_dkdv", a.q.dtype, d, cap, arch))
    q, k, v, do = (_aligned_input(t) for t in (a.q, a.k, a.v, dout))
    has_dlse = dlse is not None
    dlse_c = _aligned_vec(dlse) if has_dlse else dummy(a.q.device)
    # Kernel 1 writes the recomputed log2-domain lse and delta per (row, q head); kernel 2 reads them.
    lse2 = torch.empty(tq, hq, dtype=torch.float32, device=a.q.device)
    delta = torch.empty(tq, hq, dtype=torch.float32, device=a.q.device)
    dq_buf, dk_buf, dv_buf = (_out_buffer(t) for t in (dq, dk, dv))
    _check_sizes(a, q, k, v, do, dq_buf, dk_buf, dv_buf)
    scal = _scalars(a)
    if tq > 0:
        args = [q, k, v, do, dlse_c, lse2, delta, dq_buf, *_plan_ptrs(a, cq, _PLAN_Q),
                *_strides(q, k, v, do, dq_buf), hq, a.total_q, a.total_k, a.groups, int(has_dlse),
                a.softmax_scale, *scal]
        _run(cq, (triton.cdiv(tq, cq.constexprs["BLOCK_M"]), hq), args)
    if tk > 0:
        args = [q, k, v, do, lse2, delta, dk_buf, dv_buf, *_plan_ptrs(a, ckv, _PLAN_K),
                *_strides(q, k, v, do, dk_buf, dv_buf), hq, a.total_q, a.total_k, a.groups, a.softmax_scale, *scal]
        _run(ckv, (triton.cdiv(tk, ckv.constexprs["BLOCK_N"]), hk), args)
    for buf, dst in ((dq_buf, dq), (dk_buf, dk), (dv_buf, dv)):
        if buf is not dst:
            dst.copy_(buf)
