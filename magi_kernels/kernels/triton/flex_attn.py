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
  The forward reads a PARTIAL tile's mask instead as the plan's row bounds (the union merged into one key
  interval per row, a tile repeated for rows that see several): two vector loads the pipeliner prefetches, and a
  mask without a loop. The forward (sm_80/89) and dQ kernels walk FULL tiles as the plan's runs of consecutive k
  tiles, an affine index the pipeliner prefetches one stage deeper than one loaded per tile (the forward walks its
  PARTIAL tiles' bound entries the same way); q-major kernels take
  their q tile from the plan's heaviest-first launch order (docs/kernel_structure.md).
* sm_90 forward: two passes of the same kernel (PASS constexpr). Pass 1 walks the FULL tiles in a warp-specialized
  loop fed by TMA tensor descriptors (a producer warp copies K/V, two consumer warpgroups compute), pass 2 the PARTIAL
  tiles, resuming from the fp32 softmax state pass 1 saved for the q tiles that have any. Triton 3.9's Hopper
  warp specialization rejects a PARTIAL loop after (or before) the FULL one in the same program, hence two passes
  (docs/kernel_structure.md has the reduction). sm_80/89 run both kinds of tiles in one pass with pointer loads.
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
* Configs (tile shapes, warps, stages) are per arch and per kernel, and may differ with softcap (TILES); each is
  registered with the AOT checker (``python -m magi_kernels.tools.aot_check --kernel flex_attn``). Pointer arguments and
  token/head strides are compiled as divisible by 16; the launcher guarantees it (copying a
  misaligned input, or computing into an aligned temporary), every other integer is marked
  do_not_specialize so the binary that runs is the one the checker inspected.
* fp32 inputs run only under the interpreter (tests: tight error bounds); on a GPU the torch path
  serves fp32. bf16 runs on GPUs only (the interpreter's bf16 tl.dot is broken).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from magi_kernels.kernels.triton import triton_interpreting
from magi_kernels.kernels.triton._io import check_i32, dummy, ensure_descriptor_allocator
from magi_kernels.kernels.triton.aot import AotConfig, KernelLaunch, kernel_parameters, register_aot

OP = "flex_attn"
LOG2E = 1.4426950408889634
HEAD_DIMS = (64, 128)
GPU_DTYPES = (torch.float16, torch.bfloat16)
_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


# --------------------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def _tanh(x):
    """tanh via exp2 of -2|x| (in (0, 1], never overflows); odd symmetry restores the sign.

    The denominator lies in [1, 2], so the approximate division (2 ulp at most there) is as good as an IEEE one for
    a soft cap and avoids its slow-path sequence in every score of the loop.
    """
    e = tl.exp2(-2.8853900817779268 * tl.abs(x))  # exp(-2|x|) = 2^(-2 log2(e) |x|)
    t = tl.fdiv(1.0 - e, 1.0 + e, approx=True)
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
def _slice_mask(slices_ptr, mask_slices_ptr, j0, j1, r, c):
    """OR over slice ids mask_slices_ptr[j0:j1] of (qs <= r < qe and lo(r) <= c < hi(r)).

    r (query rows) and c (key columns) broadcast against each other; slices_ptr[s] = (qs, qe, ks, ke, type),
    lo = ks + (r - qs) for INV_CAUSAL/BI_CAUSAL (type bit 1), hi = ke - (qe - 1 - r) for CAUSAL/BI_CAUSAL
    (type bit 0). Slices lie inside [0, total_q) x [0, total_k), so this also masks out-of-bounds cells.
    """
    vis = (r < 0) & (c < 0)  # all False, in the broadcast shape
    for j in range(j0, j1):
        sid = tl.load(mask_slices_ptr + j)
        qs = tl.load(slices_ptr + sid * 5 + 0)
        qe = tl.load(slices_ptr + sid * 5 + 1)
        ks = tl.load(slices_ptr + sid * 5 + 2)
        ke = tl.load(slices_ptr + sid * 5 + 3)
        ty = tl.load(slices_ptr + sid * 5 + 4)
        lo = ks + (r - qs) * ((ty >> 1) & 1)
        hi = ke - (qe - 1 - r) * (ty & 1)
        vis = vis | ((r >= qs) & (r < qe) & (c >= lo) & (c < hi))
    return vis


# --------------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _load_kv_tile(k_src, v_src, row0, offs_d, stride_kt, stride_vt, total_k, ROWS: tl.constexpr, MASKED: tl.constexpr,
                 TMA: tl.constexpr):
    """K and V rows [row0, row0 + ROWS) of one kv head. With TMA, k_src/v_src are tensor descriptors of the head's
    [total_k, D] rows (the copy engine zero-fills rows past total_k); otherwise pointers to the head's first row."""
    if TMA:
        k = k_src.load([row0, 0])
        v = v_src.load([row0, 0])
    else:
        cols = (row0 + tl.arange(0, ROWS)).to(tl.int64)
        koff = cols[:, None] * stride_kt + offs_d[None, :]
        voff = cols[:, None] * stride_vt + offs_d[None, :]
        if MASKED:
            col_ok = (cols < total_k)[:, None]
            k = tl.load(k_src + koff, mask=col_ok, other=0.0)
            v = tl.load(v_src + voff, mask=col_ok, other=0.0)
        else:
            k = tl.load(k_src + koff)
            v = tl.load(v_src + voff)
    return k, v


@triton.jit
def _fwd_full_step(acc, m_i, l_i, q, k, v, qk_scale, cap_in, cap_out, SOFTCAP: tl.constexpr):
    """One online-softmax step over a FULL k tile (log2 domain; every row's max is finite afterwards)."""
    if SOFTCAP:
        s2, _ = _scores_log2(q, tl.trans(k), qk_scale, cap_in, cap_out, SOFTCAP)
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        p = tl.exp2(s2 - m_new[:, None])
    else:
        # max(s) * c == max(s * c) exactly for c > 0 (rounding is monotonic; the launcher keeps qk_scale > 0),
        # and s * c - m is then one FFMA per score instead of a multiply and a subtract.
        s = tl.dot(q, tl.trans(k))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old max
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _row_bounds_mask(col0, lo, hi, COLS: tl.constexpr, TILE_RELATIVE: tl.constexpr):
    """[rows, COLS] visibility of keys col0 + j for rows that see the keys in [lo[i], hi[i]) (the plan's row bounds;
    an empty row has lo = hi): lo <= col0 + j < hi as one unsigned compare per key, no loop over slices.

    TILE_RELATIVE: (j - (lo - col0)) <u (hi - lo), a subtract from the tile-relative column j per key (lo - col0 is
    per row), one instruction per key fewer than the absolute column (the 16-bit forward). Else
    (col0 + j - lo) <u (hi - lo): the quantized forward keeps this form because the tile-relative one costs its
    register-bound loops spills (sm_89 D=128 and the sm_90 PARTIAL pass; docs/fp8_attention.md).
    """
    if TILE_RELATIVE:
        j = tl.arange(0, COLS)[None, :]
        return (j - (lo - col0)[:, None]).to(tl.uint32) < (hi - lo).to(tl.uint32)[:, None]
    else:
        cols = col0 + tl.arange(0, COLS)
        return (cols[None, :] - lo[:, None]).to(tl.uint32) < (hi - lo).to(tl.uint32)[:, None]


@triton.jit
def _fwd_partial_step(acc, m_i, l_i, q, k, v, col0, lo, hi, qk_scale, cap_in, cap_out, ROWS: tl.constexpr,
                      SOFTCAP: tl.constexpr):
    """One online-softmax step over keys [col0, col0 + ROWS) of a PARTIAL k tile, of which row i sees the keys in
    [lo[i], hi[i]) (the plan's row bounds): a loop-free mask."""
    vis = _row_bounds_mask(col0, lo, hi, ROWS, True)
    if SOFTCAP:
        s2, _ = _scores_log2(q, tl.trans(k), qk_scale, cap_in, cap_out, SOFTCAP)
        s2 = tl.where(vis, s2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        # A row that has seen nothing yet keeps m = -inf: shift by 0 there so exp2 gives 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s2 - m_use[:, None])
    else:
        # As in the FULL step: max before scaling, then one FFMA per score (masked keys: -inf * c - m = -inf,
        # for the launcher's c > 0).
        s = tl.where(vis, tl.dot(q, tl.trans(k)), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s * qk_scale - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _state_rows(slot, state_heads, BLOCK_M: tl.constexpr):
    """This program's rows of the handed-over softmax state: slot's BLOCK_M rows, the launch's head (grid dim 1)."""
    return (slot * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64) * state_heads + tl.program_id(1)


@triton.jit
def _softmax_state_start(state_acc_ptr, state_m_ptr, state_l_ptr, slot, state_heads, offs_d, BLOCK_M: tl.constexpr,
                         HEAD_DIM: tl.constexpr, RESUME: tl.constexpr):
    """(acc, m, l) to start from: the saved state of ``slot`` (the PARTIAL pass) or empty (every other pass)."""
    if RESUME:
        srow = _state_rows(slot, state_heads, BLOCK_M)
        m_i = tl.load(state_m_ptr + srow)
        l_i = tl.load(state_l_ptr + srow)
        acc = tl.load(state_acc_ptr + srow[:, None] * HEAD_DIM + offs_d[None, :])
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    return acc, m_i, l_i


@triton.jit
def _store_rows(ptr, row_stride, n_rows, x, WIDTH: tl.constexpr):
    """Store the first n_rows rows of x [R, WIDTH] (an MMA accumulator) at ptr + r * row_stride + c.

    A plain [R, WIDTH] store makes Triton move the accumulator into a row-coalesced layout through shared memory: a
    tile of scratch per consumer warpgroup, which kept the sm_90 FULL pass at two K/V buffers. Here the tile goes
    out as a 5-D view whose dimensions follow the bits of the Hopper accumulator layout, row r = 16 r54 + 8 r3 + r210
    and column c = 8 chi + 2 c21 + c0 (a warp owns 16 rows; its lanes hold rows r210 and column pairs c21, each
    thread a column pair c0 for both r3): [(r3, chi), r54, r210, c21, c0]. The coalesced layout Triton picks for
    that view fills the contiguous c0 pair first (the vector), then lanes over c21 and r210 and warps over r54,
    which is the accumulator's own, so the conversion moves no data. r54 stays in dimension 0 or 1 throughout:
    the warp-specialization pass splits the rows over the consumer warpgroups and accepts no other dimension.
    """
    R: tl.constexpr = x.shape[0]
    tl.static_assert(R % 16 == 0 and WIDTH % 8 == 0)
    xv = tl.reshape(x, [R // 16, 2, 8, WIDTH // 8, 4, 2])  # [r54, r3, r210, chi, c21, c0]
    xv = tl.reshape(tl.permute(xv, [0, 1, 3, 2, 4, 5]), [R // 16, WIDTH // 4, 8, 4, 2])  # [r54, (r3, chi), ...]
    xv = tl.permute(xv, [1, 0, 2, 3, 4])  # [(r3, chi), r54, r210, c21, c0]
    hi = tl.arange(0, WIDTH // 4)
    rows = (((hi // (WIDTH // 8)) * 8)[:, None, None, None, None]
            + (tl.arange(0, R // 16) * 16)[None, :, None, None, None] + tl.arange(0, 8)[None, None, :, None, None])
    cols = (((hi % (WIDTH // 8)) * 8)[:, None, None, None, None] + (tl.arange(0, 4) * 2)[None, None, None, :, None]
            + tl.arange(0, 2)[None, None, None, None, :])
    tl.store(ptr + rows.to(tl.int64) * row_stride + cols, xv, mask=rows < n_rows)


@triton.jit
def _softmax_state_save(state_acc_ptr, state_m_ptr, state_l_ptr, q_slot_ptr, m, state_heads, acc, m_i, l_i, offs_d,
                        BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Save the FULL pass's raw (acc, m, l) if q tile m has a slot (PARTIAL entries follow); returns that row mask.

    Masked stores rather than a branch on the slot: the warp-specialized loop's results feed both uses.
    """
    slot = tl.load(q_slot_ptr + m)
    srow = _state_rows(tl.maximum(slot, 0), state_heads, BLOCK_M)
    # (Broadcast before comparing: the interpreter rejects a mask that mixes a loaded scalar's bool in.)
    to_state = (tl.zeros([BLOCK_M], tl.int32) + slot) >= 0
    tl.store(state_m_ptr + srow, m_i, mask=to_state)
    tl.store(state_l_ptr + srow, l_i, mask=to_state)
    # The slot's rows are state_heads * HEAD_DIM apart; none is written without a slot.
    slot_base = ((tl.maximum(slot, 0) * BLOCK_M).to(tl.int64) * state_heads + tl.program_id(1)) * HEAD_DIM
    _store_rows(state_acc_ptr + slot_base, state_heads * HEAD_DIM, tl.where(slot >= 0, BLOCK_M, 0), acc, HEAD_DIM)
    return to_state


@triton.jit(do_not_specialize=["total_q", "total_k", "groups", "q_heads", "head_base", "state_heads"])
def _flex_attn_fwd_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, q_order_ptr, q_start_ptr, q_nfull_ptr, q_kidx_ptr,
                          q_rstart_ptr, run_lo_ptr, run_hi_ptr, q_bstart_ptr, q_brstart_ptr, brun_lo_ptr, brun_hi_ptr,
                          bound_rows_ptr,
                          q_partial_ptr, q_slot_ptr, state_acc_ptr, state_m_ptr, state_l_ptr,
                          stride_qt, stride_qh, stride_kt, stride_kh,
                          stride_vt, stride_vh, stride_ot, stride_oh, q_heads, total_q, total_k, groups,
                          head_base, state_heads, qk_scale: tl.float32, cap_in: tl.float32, cap_out: tl.float32,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, SOFTCAP: tl.constexpr,
                          PASS: tl.constexpr):
    """One (q tile, q head) per program. PASS (docs/kernel_structure.md):

    0: every tile of the q tile in one program, pointer loads, FULL tiles walked as the plan's runs (sm_80/89).
    1: FULL tiles only, warp-specialized, Q/K/V by TMA descriptors (sm_90). A q tile with PARTIAL entries saves
       its raw softmax state (acc, m, l; fp32) in slot q_slot[m] of state_*; the others write out and lse.
    2: PARTIAL tiles of the q tiles in q_partial, by TMA descriptors, resuming from their slot's state (sm_90).
    """
    TMA: tl.constexpr = PASS != 0
    if PASS == 2:
        slot = tl.program_id(0)
        m = tl.load(q_partial_ptr + slot)  # most PARTIAL entries first
    else:
        m = tl.load(q_order_ptr + tl.program_id(0))  # heaviest q tiles first (the plan's launch order)
    # A launch covers q heads [head_base, head_base + grid[1]); the state holds state_heads of them per row.
    h = head_base + tl.program_id(1)
    kh = h // groups
    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < total_q
    rows64 = offs_m.to(tl.int64)
    if TMA:
        # Per-head 2-D views [tokens, D]: any token and head strides (multiples of 16 elements), and out-of-range
        # rows read as zeros. Triton's Hopper warp specialization takes descriptor loads only: one plain tensor
        # load anywhere in the kernel (q included) makes the pass fail.
        q_src = tl.make_tensor_descriptor(q_ptr + h * stride_qh, shape=[total_q, HEAD_DIM], strides=[stride_qt, 1],
                                          block_shape=[BLOCK_M, HEAD_DIM])
        k_src = tl.make_tensor_descriptor(k_ptr + kh * stride_kh, shape=[total_k, HEAD_DIM], strides=[stride_kt, 1],
                                          block_shape=[BLOCK_N, HEAD_DIM])
        v_src = tl.make_tensor_descriptor(v_ptr + kh * stride_vh, shape=[total_k, HEAD_DIM], strides=[stride_vt, 1],
                                          block_shape=[BLOCK_N, HEAD_DIM])
        q = q_src.load([m * BLOCK_M, 0])
    else:
        k_src = k_ptr + kh * stride_kh
        v_src = v_ptr + kh * stride_vh
        q = tl.load(q_ptr + rows64[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=row_ok[:, None],
                    other=0.0)

    e0 = tl.load(q_start_ptr + m)
    e_mid = e0 + tl.load(q_nfull_ptr + m)  # FULL entries [e0, e_mid)

    # (In PASS 2 the slot is the program id.)
    acc, m_i, l_i = _softmax_state_start(state_acc_ptr, state_m_ptr, state_l_ptr, tl.program_id(0), state_heads,
                                         offs_d, BLOCK_M, HEAD_DIM, PASS == 2)
    if PASS == 1:
        # One flat loop over the FULL entries. The warp-specialization pass fails on a loop nested in another that
        # carries the accumulator (the runs of PASS 0) and on any loop after it that does (the PARTIAL loop, hence
        # PASS 2). The k tile index it loads from the plan goes to the producer warp with the copies, so the
        # consumer loop has no load at all.
        for e in tl.range(e0, e_mid, warp_specialize=True):
            k, v = _load_kv_tile(k_src, v_src, tl.load(q_kidx_ptr + e) * BLOCK_N, offs_d, stride_kt, stride_vt,
                                total_k, BLOCK_N, False, TMA)
            acc, m_i, l_i = _fwd_full_step(acc, m_i, l_i, q, k, v, qk_scale, cap_in, cap_out, SOFTCAP)
    elif PASS == 0:
        # FULL tiles by runs of consecutive k tiles: an affine tile index lets the pipeliner prefetch one stage
        # deeper than an index loaded from the plan. Same tiles, same order as the entry list.
        for r in range(tl.load(q_rstart_ptr + m), tl.load(q_rstart_ptr + m + 1)):
            for n in range(tl.load(run_lo_ptr + r), tl.load(run_hi_ptr + r)):
                k, v = _load_kv_tile(k_src, v_src, n * BLOCK_N, offs_d, stride_kt, stride_vt, total_k, BLOCK_N, False,
                                    TMA)
                acc, m_i, l_i = _fwd_full_step(acc, m_i, l_i, q, k, v, qk_scale, cap_in, cap_out, SOFTCAP)
    if PASS != 1:
        # PARTIAL tiles by the plan's row bounds: a loop-free mask from two [BLOCK_M] vectors per tile, the tiles
        # walked as runs of consecutive k tiles like the FULL ones (an affine index: no index load in the loop).
        offs_r = tl.arange(0, BLOCK_M)
        b_first = tl.load(q_bstart_ptr + m)  # bound entry of the run's first tile
        for r in range(tl.load(q_brstart_ptr + m), tl.load(q_brstart_ptr + m + 1)):
            n_lo = tl.load(brun_lo_ptr + r)
            n_hi = tl.load(brun_hi_ptr + r)
            # Tile n's bound entry is b_first + n - n_lo (int32 offsets: the launcher checks the size).
            rows_run = bound_rows_ptr + (b_first - n_lo) * (2 * BLOCK_M) + offs_r
            for n in range(n_lo, n_hi):
                rows_b = rows_run + n * (2 * BLOCK_M)
                lo = tl.load(rows_b)
                hi = tl.load(rows_b + BLOCK_M)
                k, v = _load_kv_tile(k_src, v_src, n * BLOCK_N, offs_d, stride_kt, stride_vt, total_k, BLOCK_N, True,
                                     TMA)
                acc, m_i, l_i = _fwd_partial_step(acc, m_i, l_i, q, k, v, n * BLOCK_N, lo, hi, qk_scale, cap_in,
                                                  cap_out, BLOCK_N, SOFTCAP)
            b_first += n_hi - n_lo

    final = row_ok
    if PASS == 1:
        to_state = _softmax_state_save(state_acc_ptr, state_m_ptr, state_l_ptr, q_slot_ptr, m, state_heads, acc, m_i,
                                       l_i, offs_d, BLOCK_M, HEAD_DIM)
        final = row_ok & ~to_state
    # Rows that saw no key (l = 0; acc is 0 there too): out 0, lse -inf.
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))  # log2 -> natural log
    if PASS == 1:
        # Rows past the end, and every row of a q tile the PARTIAL pass finishes, are not written.
        n_out = tl.where(tl.load(q_slot_ptr + m) >= 0, 0, total_q - m * BLOCK_M)
        _store_rows(out_ptr + h * stride_oh + (m * BLOCK_M).to(tl.int64) * stride_ot, stride_ot, n_out,
                    out.to(out_ptr.dtype.element_ty), HEAD_DIM)
    else:  # (the shared-memory scratch of a plain store overlaps the dead pipeline buffers of these passes)
        tl.store(out_ptr + rows64[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=final[:, None])
    tl.store(lse_ptr + rows64 * q_heads + h, lse, mask=final)


# --------------------------------------------------------------------------------------------------
# Backward, kernel 1: delta pre-pass + dQ per (q tile, q head)


@triton.jit
def _kv_tile_scores(q, k_ptr, v_ptr, n, offs_m, offs_d, stride_kt, stride_kh, stride_vt, stride_vh, kh, total_k,
                    slices_ptr, mask_slices_ptr, j0, j1, qk_scale, cap_in, cap_out, BLOCK_N: tl.constexpr,
                    MASKED: tl.constexpr, SOFTCAP: tl.constexpr):
    """K and V of k tile n, and the (masked) log2-domain scores of q against it."""
    cols = n * BLOCK_N + tl.arange(0, BLOCK_N)
    k, v = _load_kv_tile(k_ptr + kh * stride_kh, v_ptr + kh * stride_vh, n * BLOCK_N, offs_d, stride_kt, stride_vt,
                         total_k, BLOCK_N, MASKED, False)
    s2, th = _scores_log2(q, tl.trans(k), qk_scale, cap_in, cap_out, SOFTCAP)
    if MASKED:
        vis = _slice_mask(slices_ptr, mask_slices_ptr, j0, j1, offs_m[:, None], cols[None, :])
        s2 = tl.where(vis, s2, float("-inf"))
    return s2, th, k, v


@triton.jit
def _bwd_delta_tile(m_i, l_i, dacc, q, do, k_ptr, v_ptr, n, offs_m, offs_d, stride_kt, stride_kh, stride_vt, stride_vh,
                    kh, total_k, slices_ptr, mask_slices_ptr, j0, j1, qk_scale, cap_in, cap_out, BLOCK_N: tl.constexpr,
                    MASKED: tl.constexpr, SOFTCAP: tl.constexpr):
    """Pre-pass step over k tile n: online (row max m, sum l = sum 2^(s2 - m), sum P dP), log2 domain."""
    s2, _, _, v = _kv_tile_scores(q, k_ptr, v_ptr, n, offs_m, offs_d, stride_kt, stride_kh, stride_vt, stride_vh, kh,
                                  total_k, slices_ptr, mask_slices_ptr, j0, j1, qk_scale, cap_in, cap_out, BLOCK_N,
                                  MASKED, SOFTCAP)
    dp = tl.dot(do, tl.trans(v))
    m_new = tl.maximum(m_i, tl.max(s2, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s2 - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    return m_new, l_i * alpha + tl.sum(p, 1), dacc * alpha + tl.sum(p * dp, 1)


@triton.jit
def _bwd_delta_walk(q, do, k_ptr, v_ptr, q_kidx_ptr, p_mstart_ptr, run_lo_ptr, run_hi_ptr, r0, r1, e_mid, e1, p0,
                    offs_m, offs_d, stride_kt, stride_kh, stride_vt, stride_vh, kh, total_k, slices_ptr,
                    mask_slices_ptr, qk_scale, cap_in, cap_out, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    SOFTCAP: tl.constexpr):
    """The delta pre-pass over a q tile's k tiles: per row (lse2, sum_j P_j dP_j), lse2 = +inf where unseen.

    Recomputing lse here instead of converting the stored natural-log lse keeps P exact where it should be:
    a row that sees one key gets lse2 = s2 exactly, P = exp2(0) = 1 and dS = 0 exactly, as in exact
    arithmetic (the ln <-> log2 round trip leaves ~1e-7).
    """
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    dacc = tl.zeros([BLOCK_M], tl.float32)
    for r in range(r0, r1):  # FULL tiles by runs (affine index), as in the forward
        for n in range(tl.load(run_lo_ptr + r), tl.load(run_hi_ptr + r)):
            m_i, l_i, dacc = _bwd_delta_tile(m_i, l_i, dacc, q, do, k_ptr, v_ptr, n, offs_m, offs_d, stride_kt,
                                             stride_kh, stride_vt, stride_vh, kh, total_k, slices_ptr, mask_slices_ptr,
                                             0, 0, qk_scale, cap_in, cap_out, BLOCK_N, False, SOFTCAP)
    for e in range(e_mid, e1):
        n = tl.load(q_kidx_ptr + e)
        j0 = tl.load(p_mstart_ptr + p0 + e)
        j1 = tl.load(p_mstart_ptr + p0 + e + 1)
        m_i, l_i, dacc = _bwd_delta_tile(m_i, l_i, dacc, q, do, k_ptr, v_ptr, n, offs_m, offs_d, stride_kt, stride_kh,
                                         stride_vt, stride_vh, kh, total_k, slices_ptr, mask_slices_ptr, j0, j1,
                                         qk_scale, cap_in, cap_out, BLOCK_N, True, SOFTCAP)
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    lse2 = tl.where(seen, m_i + tl.log2(l_safe), float("inf"))  # +inf: P = 0 on rows that see nothing
    return lse2, dacc / l_safe


@triton.jit
def _bwd_dq_tile(dq, q, do, lse2, delta, k_ptr, v_ptr, n, offs_m, offs_d, stride_kt, stride_kh, stride_vt, stride_vh,
                 kh, total_k, slices_ptr, mask_slices_ptr, j0, j1, qk_scale, cap_in, cap_out, BLOCK_N: tl.constexpr,
                 MASKED: tl.constexpr, SOFTCAP: tl.constexpr):
    """dq += dS K over k tile n (unscaled by softmax_scale), with P = exp2(s2 - lse2) from the pre-pass."""
    s2, th, k, v = _kv_tile_scores(q, k_ptr, v_ptr, n, offs_m, offs_d, stride_kt, stride_kh, stride_vt, stride_vh, kh,
                                   total_k, slices_ptr, mask_slices_ptr, j0, j1, qk_scale, cap_in, cap_out, BLOCK_N,
                                   MASKED, SOFTCAP)
    dp = tl.dot(do, tl.trans(v))
    p = tl.exp2(s2 - lse2[:, None])  # lse2 = +inf on rows that see nothing: p = 0, never NaN
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - th * th)
    return dq + tl.dot(ds.to(k.dtype), k)


@triton.jit
def _bwd_dq_walk(q, do, lse2, delta, k_ptr, v_ptr, q_kidx_ptr, p_mstart_ptr, run_lo_ptr, run_hi_ptr, r0, r1, e_mid,
                 e1, p0, offs_m, offs_d, stride_kt, stride_kh, stride_vt, stride_vh, kh, total_k, slices_ptr,
                 mask_slices_ptr, qk_scale, cap_in, cap_out, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HEAD_DIM: tl.constexpr, SOFTCAP: tl.constexpr):
    """dQ / softmax_scale = sum over the q tile's k tiles of dS K."""
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for r in range(r0, r1):  # FULL tiles by runs (affine index)
        for n in range(tl.load(run_lo_ptr + r), tl.load(run_hi_ptr + r)):
            dq = _bwd_dq_tile(dq, q, do, lse2, delta, k_ptr, v_ptr, n, offs_m, offs_d, stride_kt, stride_kh, stride_vt,
                              stride_vh, kh, total_k, slices_ptr, mask_slices_ptr, 0, 0, qk_scale, cap_in, cap_out,
                              BLOCK_N, False, SOFTCAP)
    for e in range(e_mid, e1):
        n = tl.load(q_kidx_ptr + e)
        j0 = tl.load(p_mstart_ptr + p0 + e)
        j1 = tl.load(p_mstart_ptr + p0 + e + 1)
        dq = _bwd_dq_tile(dq, q, do, lse2, delta, k_ptr, v_ptr, n, offs_m, offs_d, stride_kt, stride_kh, stride_vt,
                          stride_vh, kh, total_k, slices_ptr, mask_slices_ptr, j0, j1, qk_scale, cap_in, cap_out,
                          BLOCK_N, True, SOFTCAP)
    return dq


@triton.jit(do_not_specialize=["total_q", "total_k", "groups", "q_heads", "has_dlse"])
def _flex_attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, dlse_ptr, lse2_ptr, delta_ptr, dq_ptr, q_order_ptr,
                             q_start_ptr, q_nfull_ptr, q_kidx_ptr, q_pstart_ptr, q_rstart_ptr, run_lo_ptr, run_hi_ptr,
                             p_mstart_ptr, mask_slices_ptr, slices_ptr,
                             stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                             stride_dqt, stride_dqh, q_heads, total_q, total_k, groups, has_dlse,
                             softmax_scale: tl.float32, qk_scale: tl.float32, cap_in: tl.float32, cap_out: tl.float32,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                             SOFTCAP: tl.constexpr):
    m = tl.load(q_order_ptr + tl.program_id(0))  # heaviest q tiles first (the plan's launch order)
    h = tl.program_id(1)
    kh = h // groups
    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < total_q
    rows64 = offs_m.to(tl.int64)
    q = tl.load(q_ptr + rows64[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(do_ptr + rows64[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=row_ok[:, None],
                 other=0.0)

    e0 = tl.load(q_start_ptr + m)
    e1 = tl.load(q_start_ptr + m + 1)
    e_mid = e0 + tl.load(q_nfull_ptr + m)
    p0 = tl.load(q_pstart_ptr + m) - e_mid

    # Pass 1, the pre-pass: the row's lse (log2 domain, recomputed online like the forward) and
    # delta = sum_j P dP = dO . O with O unrounded.
    r0 = tl.load(q_rstart_ptr + m)
    r1 = tl.load(q_rstart_ptr + m + 1)
    lse2, delta = _bwd_delta_walk(q, do, k_ptr, v_ptr, q_kidx_ptr, p_mstart_ptr, run_lo_ptr, run_hi_ptr, r0, r1, e_mid,
                                  e1, p0, offs_m, offs_d, stride_kt, stride_kh, stride_vt, stride_vh, kh, total_k,
                                  slices_ptr, mask_slices_ptr, qk_scale, cap_in, cap_out, BLOCK_M, BLOCK_N, SOFTCAP)
    dlse_ok = tl.where(has_dlse != 0, row_ok, False)  # (tl.where: the interpreter mistypes tensor & scalar)
    # A gradient flowing into lse enters delta with a minus sign (d lse / d s_j = P_j).
    delta = delta - tl.load(dlse_ptr + rows64 * q_heads + h, mask=dlse_ok, other=0.0)
    tl.store(lse2_ptr + rows64 * q_heads + h, lse2, mask=row_ok)
    tl.store(delta_ptr + rows64 * q_heads + h, delta, mask=row_ok)
    # Pass 2: dQ = scale * sum_j dS K.
    dq = _bwd_dq_walk(q, do, lse2, delta, k_ptr, v_ptr, q_kidx_ptr, p_mstart_ptr, run_lo_ptr, run_hi_ptr, r0, r1, e_mid,
                      e1, p0, offs_m, offs_d, stride_kt, stride_kh, stride_vt, stride_vh, kh, total_k, slices_ptr,
                      mask_slices_ptr, qk_scale, cap_in, cap_out, BLOCK_M, BLOCK_N, HEAD_DIM, SOFTCAP)
    dq = dq * softmax_scale
    tl.store(dq_ptr + rows64[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty),
             mask=row_ok[:, None])


# --------------------------------------------------------------------------------------------------
# Backward, kernel 2: dK/dV per (k tile, kv head), the group's q heads looped inside


@triton.jit
def _bwd_kv_tile(dk, dv, k, v, q_ptr, do_ptr, lse2_ptr, delta_ptr, m, h, cols, offs_d, stride_qt, stride_qh, stride_dot,
                 stride_doh, q_heads, total_q, slices_ptr, mask_slices_ptr, j0, j1, qk_scale, cap_in, cap_out,
                 BLOCK_M: tl.constexpr, MASKED: tl.constexpr, SOFTCAP: tl.constexpr):
    """dV += P^T dO and dK += dS^T Q for q tile m, q head h, in the transposed [keys, rows] layout."""
    rows = m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    qoff = rows64[:, None] * stride_qt + h * stride_qh + offs_d[None, :]
    dooff = rows64[:, None] * stride_dot + h * stride_doh + offs_d[None, :]
    if MASKED:
        row_ok = rows < total_q
        q = tl.load(q_ptr + qoff, mask=row_ok[:, None], other=0.0)
        do = tl.load(do_ptr + dooff, mask=row_ok[:, None], other=0.0)
        lse2 = tl.load(lse2_ptr + rows64 * q_heads + h, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_ptr + rows64 * q_heads + h, mask=row_ok, other=0.0)
    else:
        q = tl.load(q_ptr + qoff)
        do = tl.load(do_ptr + dooff)
        lse2 = tl.load(lse2_ptr + rows64 * q_heads + h)  # kernel 1's log2-domain lse (+inf: row sees nothing)
        delta = tl.load(delta_ptr + rows64 * q_heads + h)
    s2t, tht = _scores_log2(k, tl.trans(q), qk_scale, cap_in, cap_out, SOFTCAP)  # [BLOCK_N, BLOCK_M]
    if MASKED:
        vis = _slice_mask(slices_ptr, mask_slices_ptr, j0, j1, rows[None, :], cols[:, None])
        s2t = tl.where(vis, s2t, float("-inf"))
    pt = tl.exp2(s2t - lse2[None, :])
    dv += tl.dot(pt.to(do.dtype), do)
    dpt = tl.dot(v, tl.trans(do))
    dst = pt * (dpt - delta[None, :])
    if SOFTCAP:
        dst = dst * (1.0 - tht * tht)
    dk += tl.dot(dst.to(q.dtype), q)
    return dk, dv


@triton.jit(do_not_specialize=["total_q", "total_k", "groups", "q_heads"])
def _flex_attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse2_ptr, delta_ptr, dk_ptr, dv_ptr, k_start_ptr,
                               k_nfull_ptr, k_qidx_ptr, k_pstart_ptr, k_pent_ptr, k_rstart_ptr, krun_lo_ptr,
                               krun_hi_ptr, p_mstart_ptr, mask_slices_ptr, slices_ptr, stride_qt, stride_qh,
                               stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_dkt,
                               stride_dkh, stride_dvt, stride_dvh, q_heads, total_q, total_k, groups,
                               softmax_scale: tl.float32, qk_scale: tl.float32, cap_in: tl.float32, cap_out: tl.float32,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                               SOFTCAP: tl.constexpr):
    n = tl.program_id(0)
    kh = tl.program_id(1)
    cols = n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = cols < total_k
    cols64 = cols.to(tl.int64)
    k = tl.load(k_ptr + cols64[:, None] * stride_kt + kh * stride_kh + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(v_ptr + cols64[:, None] * stride_vt + kh * stride_vh + offs_d[None, :], mask=col_ok[:, None], other=0.0)

    f0 = tl.load(k_start_ptr + n)
    f1 = tl.load(k_start_ptr + n + 1)
    f_mid = f0 + tl.load(k_nfull_ptr + n)  # [f0, f_mid) FULL, [f_mid, f1) PARTIAL
    pe0 = tl.load(k_pstart_ptr + n) - f_mid  # partial-id index of entry f is pe0 + f
    r0 = tl.load(k_rstart_ptr + n)  # the FULL entries as runs of consecutive q tiles [krun_lo, krun_hi)
    r1 = tl.load(k_rstart_ptr + n + 1)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    # The q heads of this kv head's group, in a fixed order: the GQA sum happens here, not in atomics.
    for g in range(0, groups):
        h = kh * groups + g
        # FULL tiles by runs: an affine q tile index the pipeliner can prefetch without first loading it.
        for r in range(r0, r1):
            for m in range(tl.load(krun_lo_ptr + r), tl.load(krun_hi_ptr + r)):
                dk, dv = _bwd_kv_tile(dk, dv, k, v, q_ptr, do_ptr, lse2_ptr, delta_ptr, m, h, cols, offs_d,
                                      stride_qt, stride_qh, stride_dot, stride_doh, q_heads, total_q, slices_ptr,
                                      mask_slices_ptr, 0, 0, qk_scale, cap_in, cap_out, BLOCK_M, False, SOFTCAP)
        for f in range(f_mid, f1):
            m = tl.load(k_qidx_ptr + f)
            pid = tl.load(k_pent_ptr + pe0 + f)
            j0 = tl.load(p_mstart_ptr + pid)
            j1 = tl.load(p_mstart_ptr + pid + 1)
            dk, dv = _bwd_kv_tile(dk, dv, k, v, q_ptr, do_ptr, lse2_ptr, delta_ptr, m, h, cols, offs_d, stride_qt,
                                  stride_qh, stride_dot, stride_doh, q_heads, total_q, slices_ptr, mask_slices_ptr, j0,
                                  j1, qk_scale, cap_in, cap_out, BLOCK_M, True, SOFTCAP)
    dk = dk * softmax_scale
    tl.store(dk_ptr + cols64[:, None] * stride_dkt + kh * stride_dkh + offs_d[None, :], dk.to(dk_ptr.dtype.element_ty),
             mask=col_ok[:, None])
    tl.store(dv_ptr + cols64[:, None] * stride_dvt + kh * stride_dvh + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=col_ok[:, None])


# --------------------------------------------------------------------------------------------------
# Shipped configurations (each is compiled and inspected by `python -m magi_kernels.tools.aot_check`)

KERNELS = {  # kind -> (AOT name, "module:attr")
    "fwd": ("flex_attn_fwd", f"{__name__}:_flex_attn_fwd_kernel"),
    "fwd_partial": ("flex_attn_fwd_partial", f"{__name__}:_flex_attn_fwd_kernel"),  # PASS 2 of the sm_90 forward
    "bwd_dq": ("flex_attn_bwd_dq", f"{__name__}:_flex_attn_bwd_dq_kernel"),
    "bwd_dkdv": ("flex_attn_bwd_dkdv", f"{__name__}:_flex_attn_bwd_dkdv_kernel"),
}
ARCHS = (80, 89, 90)

# (kind, arch, head_dim) -> (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M is always the q-row tile
# and BLOCK_N the key tile (for dK/dV the program owns BLOCK_N keys and walks q tiles of BLOCK_M rows).
# Chosen so that every config compiles with 0 spills (aot_check), the largest tiles that do:
# * fwd sm_90 (TMA_ARCHS): the FULL pass is warp-specialized, 4 warps given; the compiler adds a producer warp and
#   splits the 128 rows over two consumer warpgroups of 64 (the wgmma M atom). d128 holds 3 K/V buffers beside Q
#   (224 KB of the 227 KB) since its epilogue stores need no shared-memory scratch (_store_rows). The PARTIAL pass
#   (fwd_partial) must use the same tiles (both passes read one plan) and takes 8 warps: it holds the scores and the
#   accumulator in registers at once.
#   sm_80 d128 needs BN=32 to stay spill-free at 3 stages; sm_89 runs 3 stages (2 K/V buffers: 98 of its 99 KB of
#   shared memory at d128) with 8 warps at both head dims (4 warps at d64 use all 255 registers).
# * bwd dQ holds q, dO and the dq accumulator for the whole walk: d128 takes 32-key steps.
# * bwd dK/dV holds k, v and two [BN, D] fp32 accumulators: d128 uses 8 warps to spread them. Its FULL loop walks
#   q tiles by an affine index (the plan's k-major runs), so 3 stages give 2 Q/dO tiles in flight ahead of the one
#   in use (3 buffers on sm_90); sm_89 d128 stays at 2 stages: a third 64x128 Q/dO stage needs 107.5 KB of shared
#   memory, over its 99 KB. A 128-key tile halves the loop's instructions per MMA FLOP on sm_90 (d128 32x128: 0.618
#   against 1.020 at 32x64; d64 64x128: 0.677 against 0.858), but the tanh of the soft-capped loop spills there
#   (d128: 4 STL, d64: 13 STL), so soft-capped calls keep 64-key tiles. sm_89 d64 takes 32x128 with 8 warps either
#   way (1.038 / 1.720 against 1.095 / 1.789 with softcap, 0 spills); at sm_89 d128 every 128-key tile spills.
# A key (kind, arch, head_dim) serves both softcap settings; (kind, arch, head_dim, softcap) rows split them (tile_for).
TILES = {
    ("fwd", 90, 64): (128, 128, 4, 3), ("fwd", 90, 128): (128, 128, 4, 3),
    ("fwd_partial", 90, 64): (128, 128, 8, 3), ("fwd_partial", 90, 128): (128, 128, 8, 2),
    ("fwd", 80, 64): (128, 64, 4, 3), ("fwd", 80, 128): (128, 32, 8, 3),
    ("fwd", 89, 64): (128, 64, 8, 3), ("fwd", 89, 128): (128, 64, 8, 3),
    ("bwd_dq", 90, 64): (64, 64, 4, 2), ("bwd_dq", 90, 128): (64, 32, 4, 2),
    ("bwd_dq", 80, 64): (64, 64, 4, 2), ("bwd_dq", 80, 128): (64, 32, 4, 2),
    ("bwd_dq", 89, 64): (64, 64, 4, 2), ("bwd_dq", 89, 128): (64, 32, 4, 2),
    ("bwd_dkdv", 90, 64, False): (64, 128, 8, 3), ("bwd_dkdv", 90, 64, True): (32, 64, 4, 3),
    ("bwd_dkdv", 90, 128, False): (32, 128, 8, 3), ("bwd_dkdv", 90, 128, True): (32, 64, 8, 3),
    ("bwd_dkdv", 80, 64): (32, 64, 4, 3), ("bwd_dkdv", 80, 128): (64, 64, 8, 3),
    ("bwd_dkdv", 89, 64): (32, 128, 8, 3), ("bwd_dkdv", 89, 128): (64, 64, 8, 2),
}
# kind -> archs whose forward configs are the two-pass TMA shape (fwd: PASS 1, fwd_partial: PASS 2).
TMA_ARCHS = {"fwd": (90,), "fwd_partial": (90,)}

# Kernel parameter -> plan tensor (magi_kernels/plan/planner.py documents the layout). Every other pointer
# is an attention tensor: fp32 for the per-row statistics below, the input dtype otherwise.
PLAN_ARGS = {
    "q_start_ptr": "q_ptr", "q_nfull_ptr": "q_nfull", "q_kidx_ptr": "q_kidx", "q_pstart_ptr": "q_pptr",
    "k_start_ptr": "k_ptr", "k_nfull_ptr": "k_nfull", "k_qidx_ptr": "k_qidx", "k_pstart_ptr": "k_pptr",
    "k_pent_ptr": "k_pent", "p_mstart_ptr": "p_mptr", "mask_slices_ptr": "mask_slices", "slices_ptr": "slices",
    "q_rstart_ptr": "q_rptr", "run_lo_ptr": "r_lo", "run_hi_ptr": "r_hi", "q_order_ptr": "q_order",
    "q_partial_ptr": "q_partial", "q_slot_ptr": "q_slot", "q_bstart_ptr": "q_bptr", "bound_kidx_ptr": "b_kidx",
    "bound_rows_ptr": "b_rows", "k_rstart_ptr": "k_rptr", "krun_lo_ptr": "kr_lo", "krun_hi_ptr": "kr_hi",
    "q_brstart_ptr": "q_brptr", "brun_lo_ptr": "br_lo", "brun_hi_ptr": "br_hi",
}
_FP32_ARGS = ("lse_ptr", "dlse_ptr", "lse2_ptr", "delta_ptr", "state_acc_ptr", "state_m_ptr", "state_l_ptr")
# Every pointer and every token/head stride is compiled as a multiple of 16; the launcher guarantees it.
_DIVISIBLE_BY_16 = ("*_ptr", "stride_*")


def _pointer_dtypes(kind: str, dt: str) -> dict[str, str]:
    fn = {"fwd": _flex_attn_fwd_kernel, "fwd_partial": _flex_attn_fwd_kernel, "bwd_dq": _flex_attn_bwd_dq_kernel,
          "bwd_dkdv": _flex_attn_bwd_dkdv_kernel}[kind]
    ptrs = [n for n, t in kernel_parameters(fn) if t == "ptr"]
    return {n: "i32" if n in PLAN_ARGS else "fp32" if n in _FP32_ARGS else dt for n in ptrs}


def make_config(kind: str, dtype: torch.dtype, head_dim: int, softcap: bool, block_m: int, block_n: int,
                num_warps: int = 4, num_stages: int = 2, archs: tuple[int, ...] = ARCHS,
                tma: bool = False) -> AotConfig:
    """A config for one kernel (shipped ones come from TILES; tests build small-tile ones for the interpreter).

    ``tma`` selects the forward's two-pass shape: kind "fwd" is then its warp-specialized FULL pass (PASS 1) and
    kind "fwd_partial", which exists only in that shape, its PARTIAL pass (PASS 2).
    """
    name, kernel = KERNELS[kind]
    if tma and kind not in ("fwd", "fwd_partial"):
        raise ValueError(f"{OP}: tma=True is a forward option, got kind {kind!r}")
    if kind == "fwd_partial" and not tma:
        raise ValueError(f"{OP}: kind 'fwd_partial' is the PARTIAL pass of the TMA forward and needs tma=True")
    dt = _TRITON_DTYPE[dtype]
    arch = "/".join(f"sm{a}" for a in archs)
    label = f"{arch} {dt} D={head_dim} BM={block_m} BN={block_n} w{num_warps} s{num_stages}" + (
        " softcap" if softcap else "") + (" tma" if tma else "") + (" ws" if tma and kind == "fwd" else "")
    constexprs = {"BLOCK_M": block_m, "BLOCK_N": block_n, "HEAD_DIM": head_dim, "SOFTCAP": softcap}
    if kind in ("fwd", "fwd_partial"):
        constexprs["PASS"] = 2 if kind == "fwd_partial" else 1 if tma else 0
    return AotConfig(kernel=kernel, name=name, config=label, pointer_dtypes=_pointer_dtypes(kind, dt),
                     constexprs=constexprs, num_warps=num_warps, num_stages=num_stages, archs=tuple(archs), mma="f16",
                     divisible_by_16=_DIVISIBLE_BY_16)


def tile_for(kind: str, arch: int, head_dim: int, softcap: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of a call from TILES: the row for its softcap setting if the
    table splits the two, else the row they share."""
    own = TILES.get((kind, arch, head_dim, bool(softcap)))
    return own if own is not None else TILES[(kind, arch, head_dim)]


def _shipped() -> dict:
    cfgs = {}
    for kind, arch, d in dict.fromkeys(key[:3] for key in TILES):
        for cap in (False, True):
            bm, bn, w, s = tile_for(kind, arch, d, cap)
            for dtype in GPU_DTYPES:
                cfgs[(kind, arch, dtype, d, cap)] = make_config(kind, dtype, d, cap, bm, bn, w, s, (arch,),
                                                                arch in TMA_ARCHS.get(kind, ()))
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
    if kind == "fwd_partial" and arch not in TMA_ARCHS[kind]:
        archs = ", ".join(f"sm_{x}" for x in TMA_ARCHS[kind])
        raise ValueError(f"{OP}: kind 'fwd_partial' is the PARTIAL pass of the two-pass forward of {archs}; "
                         f"sm_{arch} runs the forward in one pass")
    if dtype in GPU_DTYPES:
        return _CONFIGS[(kind, arch, dtype, head_dim, bool(softcap))]
    if dtype == torch.float32 and triton_interpreting():
        bm, bn, w, s = tile_for(kind, arch, head_dim, softcap)
        return make_config(kind, dtype, head_dim, bool(softcap), bm, bn, w, s, (arch,),
                           arch in TMA_ARCHS.get(kind, ()))
    raise ValueError(f"{OP}: the Triton kernels take fp16/bf16 (fp32 only under the interpreter), got {dtype}")


# --------------------------------------------------------------------------------------------------
# Host side


def supports(a) -> str | None:
    """None if the Triton kernels can run this ``FlexAttnArgs`` call, else why not (device rules:
    ``magi_kernels.kernels.triton.device_reason``)."""
    d, dtype, dev = a.q.shape[2], a.q.dtype, a.q.device.type
    if d not in HEAD_DIMS:
        return f"head_dim {d} is not one of {HEAD_DIMS}"
    if dtype in GPU_DTYPES:
        if dtype == torch.bfloat16 and dev == "cpu":
            return "bf16 tl.dot is broken in the Triton interpreter; bf16 runs on GPUs only"
        return None
    if dtype == torch.float32 and dev == "cpu":
        return None  # interpreter only (device_reason requires TRITON_INTERPRET=1 for CPU tensors)
    return f"q dtype {dtype} is not fp16/bf16" + (" (fp32: interpreter only)" if dtype == torch.float32 else "")


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


def _scalars(a) -> dict[str, float]:
    """qk_scale = scale*log2(e); with softcap c: cap_in = scale/c and cap_out = c*log2(e) (else 1.0)."""
    cap = a.softcap
    return dict(qk_scale=a.softmax_scale * LOG2E, cap_in=a.softmax_scale / cap if cap > 0 else 1.0,
                cap_out=cap * LOG2E if cap > 0 else 1.0)


def _plan_args(a, cfg: AotConfig) -> dict[str, torch.Tensor]:
    """The plan tensors the config's kernel takes, by parameter name, on q's device and 16-byte aligned."""
    plan = a.plan(cfg.constexprs["BLOCK_M"], cfg.constexprs["BLOCK_N"]).on(a.q.device)
    out = {}
    for name in cfg.runtime_args:
        if name not in PLAN_ARGS:
            continue
        t = plan[PLAN_ARGS[name]]
        if t.numel() == 0 or t.data_ptr() % 16 != 0:  # empty lists still need a valid aligned pointer
            t = t.clone() if t.numel() else dummy(a.q.device, torch.int32)
        out[name] = t
    return out


def _strides(**ts: torch.Tensor) -> dict[str, int]:
    """{"stride_<x>t": token stride, "stride_<x>h": head stride} for each [T, H, D] tensor x."""
    return {f"stride_{x}{axis}": t.stride(dim) for x, t in ts.items() for axis, dim in (("t", 0), ("h", 1))}


def _check_sizes(a, *ts: torch.Tensor) -> None:
    vals = {"total_q": a.total_q, "total_k": a.total_k}
    for i, t in enumerate(ts):
        vals[f"stride{i}"] = t.stride(0)
        vals[f"head_extent{i}"] = t.shape[1] * t.stride(1)
    check_i32(OP, **vals)


# Largest PASS 1 -> PASS 2 state of one sm_90 forward launch pair (bytes); more q heads run in further pairs.
STATE_BYTES_MAX = 256 << 20


def softmax_state_buffers(n_partial_tiles: int, block_m: int, q_heads: int, head_dim: int,
                          device: torch.device) -> tuple[dict[str, torch.Tensor], int]:
    """The PASS 1 -> PASS 2 softmax state (kernel arguments) and how many q heads one launch pair covers.

    BLOCK_M rows x (D + 2) fp32 per q head and slot (one slot per q tile with PARTIAL entries); the passes run over
    groups of q heads so that the state stays within STATE_BYTES_MAX.
    """
    per_head = n_partial_tiles * block_m * (head_dim + 2) * 4
    heads = q_heads if per_head == 0 else max(1, min(q_heads, STATE_BYTES_MAX // per_head))
    if not n_partial_tiles:
        return dict(state_acc_ptr=dummy(device), state_m_ptr=dummy(device), state_l_ptr=dummy(device)), heads
    rows = n_partial_tiles * block_m
    return dict(state_acc_ptr=torch.empty(rows, heads, head_dim, dtype=torch.float32, device=device),
                state_m_ptr=torch.empty(rows, heads, dtype=torch.float32, device=device),
                state_l_ptr=torch.empty(rows, heads, dtype=torch.float32, device=device)), heads


def forward_configs(dtype: torch.dtype, head_dim: int, softcap: bool, arch: int) -> tuple[AotConfig, ...]:
    """The forward's launches in order: (single pass,) on sm_80/89, (FULL pass, PARTIAL pass) on sm_90."""
    full = select_config("fwd", dtype, head_dim, softcap, arch)
    if full.constexprs["PASS"] == 0:
        return (full,)
    return full, select_config("fwd_partial", dtype, head_dim, softcap, arch)


def launch_fwd(a, out: torch.Tensor, lse: torch.Tensor, configs: tuple[AotConfig, ...] | None = None) -> None:
    """Write out [Tq, Hq, D] (q's dtype) and lse [Tq, Hq] (fp32) for FlexAttnArgs ``a``.

    ``configs``: a single-pass config (PASS 0), or a FULL-pass and a PARTIAL-pass config with the same tiles
    (PASS 1, PASS 2); default :func:`forward_configs` for the device.
    """
    tq, hq, d = a.q.shape
    if tq == 0:
        return
    cfgs = configs or forward_configs(a.q.dtype, d, a.softcap > 0, arch_of(a.q.device))
    passes = tuple(c.constexprs.get("PASS") for c in cfgs)
    if passes not in ((0,), (1, 2)):
        raise ValueError(f"{OP}: forward configs must be one PASS 0 config or a PASS 1 and a PASS 2 config, got "
                         f"PASS {passes}")
    bm, bn = cfgs[0].constexprs["BLOCK_M"], cfgs[0].constexprs["BLOCK_N"]
    if any((c.constexprs["BLOCK_M"], c.constexprs["BLOCK_N"]) != (bm, bn) for c in cfgs):
        raise ValueError(f"{OP}: the two forward passes read one plan and need the same tiles, got "
                         f"{[c.key for c in cfgs]}")
    q, k, v = (_aligned_input(t) for t in (a.q, a.k, a.v))
    scalars = _scalars(a)
    # The kernel takes the row max before scaling, which needs a positive scale: (q . -k) * |scale| is exactly
    # (q . k) * scale, and with scale 0 every score is 0, as (0 . k) * 1 is.
    if a.softmax_scale < 0:
        k = _aligned_input(-k)
        scalars = _scalars(dataclasses.replace(a, softmax_scale=-a.softmax_scale))
    elif a.softmax_scale == 0:
        q = torch.zeros_like(q)
        scalars = _scalars(dataclasses.replace(a, softmax_scale=1.0))
    o_buf = _out_buffer(out)
    lse_buf = lse if (lse.is_contiguous() and lse.data_ptr() % 16 == 0) else torch.empty_like(lse).contiguous()
    _check_sizes(a, q, k, v, o_buf)
    plan_args = _plan_args(a, cfgs[0])
    check_i32(OP, bound_rows=plan_args["bound_rows_ptr"].numel())
    n_partial_tiles = a.plan(bm, bn).q_partial.numel() if len(cfgs) == 2 else 0
    state, heads = softmax_state_buffers(n_partial_tiles, bm, hq, d, q.device)
    if len(cfgs) == 2 and q.device.type == "cuda":
        ensure_descriptor_allocator()
    # lse [Tq, Hq] is contiguous here, so its row stride is the number of q heads.
    args = dict(q_ptr=q, k_ptr=k, v_ptr=v, out_ptr=o_buf, lse_ptr=lse_buf, **plan_args, **state,
                **_strides(q=q, k=k, v=v, o=o_buf), q_heads=hq, total_q=a.total_q, total_k=a.total_k,
                groups=a.groups, state_heads=heads, **scalars)
    for head_base in range(0, hq, heads):
        n_heads = min(heads, hq - head_base)
        KernelLaunch(cfgs[0], (triton.cdiv(tq, bm), n_heads), dict(args, head_base=head_base)).run()
        if n_partial_tiles:
            KernelLaunch(cfgs[1], (n_partial_tiles, n_heads), dict(args, head_base=head_base)).run()
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
    # Arguments both kernels take (lse2, delta and dlse are [Tq, Hq] contiguous: row stride = q heads).
    shared = dict(q_ptr=q, k_ptr=k, v_ptr=v, do_ptr=do, lse2_ptr=lse2, delta_ptr=delta, q_heads=hq,
                  total_q=a.total_q, total_k=a.total_k, groups=a.groups, softmax_scale=float(a.softmax_scale),
                  **_strides(q=q, k=k, v=v, do=do), **_scalars(a))
    if tq > 0:
        KernelLaunch(cq, (triton.cdiv(tq, cq.constexprs["BLOCK_M"]), hq), dict(
            shared, dlse_ptr=dlse_c, dq_ptr=dq_buf, has_dlse=int(has_dlse), **_plan_args(a, cq),
            **_strides(dq=dq_buf))).run()
    if tk > 0:
        KernelLaunch(ckv, (triton.cdiv(tk, ckv.constexprs["BLOCK_N"]), hk), dict(
            shared, dk_ptr=dk_buf, dv_ptr=dv_buf, **_plan_args(a, ckv), **_strides(dk=dk_buf, dv=dv_buf))).run()
    for buf, dst in ((dq_buf, dq), (dk_buf, dk), (dv_buf, dv)):
        if buf is not dst:
            dst.copy_(buf)
