"""The torch backend of flex attention: walks the block-sparse plan tile by tile (any device, CPU included).

It computes what ``magi_kernels.reference.flex_attn.flex_attn_ref`` defines (the union of the slices,
one softmax per row; see that module) without ever building the dense mask.

Memory is bounded: one q tile at a time, keys in steps of at most ``max_step_elems`` scores; the mask
of a PARTIAL step is built only for that [rows, keys] window from the plan's slice ids; FULL steps
apply no mask at all. K/V heads are never repeated: the q heads of one kv group are stacked into the
rows of a batched matmul against that kv head ([Hk, G*rows, D] x [Hk, D, keys]).

Compute is fp32 for fp16/bf16/fp32 inputs (fp64 stays fp64, which the tests use to check the walk
itself). The backward is FlashAttention-2's: recompute P = exp(S - lse) per tile, dV += P^T dO,
dP = dO V^T, dS = P * (dP - delta) with delta = rowsum(dO * O) - dlse, dQ += dS K, dK += dS^T Q
(times scale, and times 1 - tanh^2 under softcap). It runs one q-major pass in a fixed order with
no atomics, so it is deterministic by construction. One deviation from FA2, for fp16/bf16 only: delta is
computed as sum_j P dP over the tile's keys (a pre-pass) rather than from the rounded stored O.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from magi_kernels.plan.planner import AttnPlan

# Scores per step (rows x q heads x keys); 2^22 fp32 = 16 MiB per score-sized temporary.
DEFAULT_STEP_ELEMS = 1 << 22


def _compute_dtype(dt: torch.dtype) -> torch.dtype:
    return torch.float64 if dt == torch.float64 else torch.float32


def _steps(plan: AttnPlan, m: int, max_keys: int,
           max_full_keys: Optional[int] = None) -> Iterator[tuple[int, int, Optional[list[int]]]]:
    """(key start, key end, slice ids or None for an unmasked step) for q tile m.

    Consecutive k tiles of the same kind merge into one step (fewer, larger matmuls), capped at
    ``max_keys`` keys (``max_full_keys`` for FULL runs when given). A PARTIAL step carries the union of
    its tiles' slice ids.
    """
    t = plan.tensors
    a, b = int(t["q_ptr"][m]), int(t["q_ptr"][m + 1])
    if a == b:
        return
    nf = int(t["q_nfull"][m])
    kidx = t["q_kidx"][a:b].tolist()
    bn = plan.block_n
    tiles_per_step = max(1, max_keys // bn)
    full_tiles_per_step = tiles_per_step if max_full_keys is None else max(1, max_full_keys // bn)
    # FULL run(s)
    i = 0
    while i < nf:
        j = i + 1
        while j < nf and kidx[j] == kidx[j - 1] + 1 and j - i < full_tiles_per_step:
            j += 1
        yield kidx[i] * bn, min(plan.total_k, kidx[j - 1] * bn + bn), None
        i = j
    # PARTIAL run(s)
    p0 = int(t["q_pptr"][m])
    mptr, ms = t["p_mptr"], t["mask_slices"]
    i = nf
    while i < b - a:
        j = i + 1
        while j < b - a and kidx[j] == kidx[j - 1] + 1 and j - i < tiles_per_step:
            j += 1
        ids: set[int] = set()
        for e in range(i, j):
            p = p0 + e - nf
            ids.update(ms[int(mptr[p]):int(mptr[p + 1])].tolist())
        yield kidx[i] * bn, min(plan.total_k, kidx[j - 1] * bn + bn), sorted(ids)
        i = j


def _step_mask(slices: torch.Tensor, ids: list[int], r0: int, r1: int, c0: int, c1: int,
               device: torch.device) -> torch.Tensor:
    """Union mask [r1-r0, c1-c0] of the listed slices over rows [r0, r1) x keys [c0, c1)."""
    rows = torch.arange(r0, r1, device=device)[:, None]
    cols = torch.arange(c0, c1, device=device)[None, :]
    mask = torch.zeros(r1 - r0, c1 - c0, dtype=torch.bool, device=device)
    for s in ids:
        qs, qe, ks, ke, ty = (int(x) for x in slices[s].tolist())
        lo = ks + (rows - qs) if ty & 2 else ks
        hi = ke - (qe - 1 - rows) if ty & 1 else ke
        mask |= (rows >= qs) & (rows < qe) & (cols >= lo) & (cols < hi)
    return mask


def _heads_to_rows(x: torch.Tensor, hk: int, cd: torch.dtype) -> torch.Tensor:
    """[rows, Hq, D] -> [Hk, G*rows, D] (q head h = kv head h // G, group member h % G)."""
    r, hq, d = x.shape
    g = hq // hk
    return x.to(cd).reshape(r, hk, g, d).permute(1, 2, 0, 3).reshape(hk, g * r, d)


def _rows_to_heads(x: torch.Tensor, hk: int, rows: int) -> torch.Tensor:
    """[Hk, G*rows, D] -> [rows, Hq, D]."""
    g = x.shape[1] // rows
    return x.reshape(hk, g, rows, -1).permute(2, 0, 1, 3).reshape(rows, hk * g, -1)


def _vec_to_rows(x: torch.Tensor, hk: int) -> torch.Tensor:
    """[rows, Hq] -> [Hk, G*rows]."""
    r, hq = x.shape
    return x.reshape(r, hk, hq // hk).permute(1, 2, 0).reshape(hk, -1)


def _scores(qt: torch.Tensor, k: torch.Tensor, c0: int, c1: int, scale: float, softcap: float, cd: torch.dtype):
    """Scaled (and soft-capped) scores [Hk, G*rows, keys]; also tanh(.) for the softcap backward."""
    kt = k[c0:c1].to(cd).permute(1, 2, 0)  # [Hk, D, keys]
    s = torch.bmm(qt, kt) * scale
    if softcap > 0:
        th = torch.tanh(s / softcap)
        return th * softcap, th
    return s, None


def _apply_mask(s: torch.Tensor, mask: Optional[torch.Tensor], rows: int) -> torch.Tensor:
    if mask is None:
        return s
    hk, gr, keys = s.shape
    return s.view(hk, gr // rows, rows, keys).masked_fill(~mask, float("-inf")).view(hk, gr, keys)


def flex_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttnPlan, softmax_scale: float,
                  softcap: float = 0.0, out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None,
                  max_step_elems: int = DEFAULT_STEP_ELEMS,
                  fused: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward over the plan. q [Tq, Hq, D], k/v [Tk, Hk, D]. Returns (out in q's dtype, lse fp32 [Tq, Hq]).

    ``fused``: None = automatic (the fused CPU kernel per step when :func:`fused_cpu_available`), False =
    the generic torch loop (any device), True = require the fused CPU path.
    """
    tq, hq, d = q.shape
    dv = v.shape[2]
    dev = q.device
    if out is None:
        out = torch.empty(tq, hq, dv, dtype=q.dtype, device=dev)
    if lse is None:
        lse = torch.empty(tq, hq, dtype=torch.float32, device=dev)
    ok = fused_cpu_available(q, softcap)
    if fused and not ok:
        raise ValueError("fused=True needs a CPU tensor, softcap == 0 and aten::_scaled_dot_product_flash_attention_for_cpu")
    if ok and fused is not False:
        return _fwd_cpu_fused(q, k, v, plan, softmax_scale, out, lse, max_step_elems)
    return _fwd_generic(q, k, v, plan, softmax_scale, softcap, out, lse, max_step_elems)


def _fwd_generic(q, k, v, plan: AttnPlan, softmax_scale: float, softcap: float, out: torch.Tensor, lse: torch.Tensor,
                 max_step_elems: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The device-agnostic loop: explicit online softmax over the plan's steps (bmm + exp per step)."""
    tq, hq, d = q.shape
    hk = k.shape[1]
    dv = v.shape[2]
    cd = _compute_dtype(q.dtype)
    dev = q.device
    bm = plan.block_m
    slices = plan.tensors["slices"]
    for m in range(plan.num_q_tiles):
        r0, r1 = m * bm, min(tq, (m + 1) * bm)
        rows = r1 - r0
        max_keys = max(plan.block_n, max_step_elems // max(1, rows * hq))
        steps = list(_steps(plan, m, max_keys))
        if not steps:  # no visible key in the whole tile
            out[r0:r1].zero_()
            lse[r0:r1].fill_(float("-inf"))
            continue
        qt = _heads_to_rows(q[r0:r1], hk, cd)
        m_i = torch.full((hk, qt.shape[1]), float("-inf"), dtype=cd, device=dev)
        l_i = torch.zeros(hk, qt.shape[1], dtype=cd, device=dev)
        acc = torch.zeros(hk, qt.shape[1], dv, dtype=cd, device=dev)
        for c0, c1, ids in steps:
            s, _ = _scores(qt, k, c0, c1, softmax_scale, softcap, cd)
            mask = None if ids is None else _step_mask(slices, ids, r0, r1, c0, c1, dev)
            s = _apply_mask(s, mask, rows)
            m_new = torch.maximum(m_i, s.amax(dim=-1))
            # rows with nothing visible so far keep m = -inf; shift by 0 there so exp() stays 0, not NaN
            m_use = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_use[..., None])
            alpha = torch.exp(m_i - m_use)
            l_i = l_i * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + torch.bmm(p, v[c0:c1].to(cd).transpose(0, 1))
            m_i = m_new
        seen = l_i > 0
        o = acc / torch.where(seen, l_i, torch.ones_like(l_i))[..., None]
        out[r0:r1] = _rows_to_heads(o, hk, rows).to(out.dtype)
        tile_lse = torch.where(seen, m_i + torch.log(torch.where(seen, l_i, torch.ones_like(l_i))),
                               torch.full_like(l_i, float("-inf")))
        lse[r0:r1] = _rows_to_heads(tile_lse[..., None], hk, rows)[..., 0].to(torch.float32)
    return out, lse


# --------------------------------------------------------------------------------------------------
# Fused CPU forward. Per step the generic loop runs ~6 full passes over a [G*rows, keys] score tensor in
# memory (scale, max, subtract, exp, sum, and the cast), which dominates on CPU. ATen's CPU flash kernel
# does the same online softmax blocked in cache and returns (out, lse), so here each step is one call to
# it over exactly the plan's key span (masked area is never computed, FULL steps carry no mask), and
# steps are combined with the usual lse merge. GQA without copies: q rows [rows, Hk, G, D] are viewed as
# [G, Hk, rows, D] and K/V as a stride-0 expand [G, Hk, keys, D]. Consecutive q tiles with identical
# all-FULL steps are walked as one row group (fewer calls, larger q blocks inside the kernel).

try:
    _CPU_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
except (AttributeError, RuntimeError):  # pragma: no cover - older torch
    _CPU_FLASH = None

# Rows (tokens) per fused row group: the kernel's q blocks are 256 rows from 768 rows up; the output
# temporaries are rows x Hq x D, so this bounds memory independently of the mask.
FUSED_GROUP_ROWS = 2048


def fused_cpu_available(q: torch.Tensor, softcap: float = 0.0) -> bool:
    """Whether the forward can use the fused CPU kernel (CPU tensors, no softcap, op present)."""
    return _CPU_FLASH is not None and q.device.type == "cpu" and softcap == 0


def _row_groups(plan: AttnPlan, tq: int, hq: int, max_step_elems: int):
    """(row start, row end, steps) walking the plan's q tiles; merges consecutive tiles whose steps are the
    same all-FULL key spans, up to FUSED_GROUP_ROWS rows. FULL runs are not split (the fused kernel is
    memory-bounded by itself); PARTIAL runs keep the generic cap (their mask is materialised)."""
    bm = plan.block_m
    cur = None  # [r0, r1, steps, mergeable]
    for m in range(plan.num_q_tiles):
        r0, r1 = m * bm, min(tq, (m + 1) * bm)
        max_keys = max(plan.block_n, max_step_elems // max(1, (r1 - r0) * hq))
        steps = list(_steps(plan, m, max_keys, max_full_keys=plan.total_k))
        mergeable = bool(steps) and all(ids is None for _, _, ids in steps)
        if (cur is not None and mergeable and cur[3] and cur[2] == steps
                and r1 - cur[0] <= max(FUSED_GROUP_ROWS, bm)):
            cur[1] = r1
            continue
        if cur is not None:
            yield cur[0], cur[1], cur[2]
        cur = [r0, r1, steps, mergeable]
    if cur is not None:
        yield cur[0], cur[1], cur[2]


def _fwd_cpu_fused(q, k, v, plan: AttnPlan, scale: float, out: torch.Tensor, lse: torch.Tensor,
                   max_step_elems: int) -> tuple[torch.Tensor, torch.Tensor]:
    tq, hq, d = q.shape
    hk, dv = k.shape[1], v.shape[2]
    g = hq // hk
    cd = _compute_dtype(q.dtype)
    ninf = float("-inf")
    slices = plan.tensors["slices"]
    # fp16/bf16: one fp32 copy of K/V per call (not per tile); fp32/fp64: views, no copy.
    kb = k.to(cd).permute(1, 0, 2)[None].expand(g, -1, -1, -1)  # [G, Hk, Tk, D]
    vb = v.to(cd).permute(1, 0, 2)[None].expand(g, -1, -1, -1)
    for r0, r1, steps in _row_groups(plan, tq, hq, max_step_elems):
        rows = r1 - r0
        if not steps:  # no visible key in these rows
            out[r0:r1].zero_()
            lse[r0:r1].fill_(ninf)
            continue
        qg = q[r0:r1].to(cd).view(rows, hk, g, d).permute(2, 1, 0, 3)  # [G, Hk, rows, D]
        o_acc = l_acc = None
        for c0, c1, ids in steps:
            mask = seen = None
            if ids is not None:
                vis = _step_mask(slices, ids, r0, r1, c0, c1, q.device)
                mask = torch.zeros(vis.shape, dtype=cd).masked_fill_(~vis, ninf)
                seen = vis.any(-1)
            o, l = _CPU_FLASH(qg, kb[:, :, c0:c1], vb[:, :, c0:c1], 0.0, False, attn_mask=mask, scale=scale)
            o = o.permute(2, 1, 0, 3).reshape(rows, hq, dv)  # [rows, Hk, G, D] order = q's head order
            l = l.permute(2, 1, 0).reshape(rows, hq).to(cd)
            if seen is not None:  # rows this step sees nothing of: lse -inf, out 0 (the kernel leaves lse 0)
                l = l.masked_fill(~seen[:, None], ninf)
                o = o.masked_fill(~seen[:, None, None], 0.0)
            if o_acc is None:
                o_acc, l_acc = o, l
                continue
            l_new = torch.logaddexp(l_acc, l)
            safe = l_new.masked_fill(torch.isneginf(l_new), 0.0)  # both -inf: weights exp(-inf) = 0
            o_acc = o_acc * torch.exp(l_acc - safe)[..., None] + o * torch.exp(l - safe)[..., None]
            l_acc = l_new
        out[r0:r1] = o_acc
        lse[r0:r1] = l_acc
    return out, lse


def flex_attn_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, plan: AttnPlan, softmax_scale: float, softcap: float = 0.0,
                  dlse: Optional[torch.Tensor] = None, dq: Optional[torch.Tensor] = None,
                  dk: Optional[torch.Tensor] = None, dv: Optional[torch.Tensor] = None,
                  max_step_elems: int = DEFAULT_STEP_ELEMS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward over the plan (one deterministic q-major pass). Returns (dq, dk, dv) in the inputs' dtypes."""
    tq, hq, d = q.shape
    tk, hk, _ = k.shape
    cd = _compute_dtype(q.dtype)
    dev = q.device
    bm = plan.block_m
    slices = plan.tensors["slices"]
    # delta = rowsum(dO * O): the softmax-Jacobian term; a gradient flowing into lse enters with a minus sign.
    exact_delta = out.dtype in (torch.float16, torch.bfloat16)
    delta = (dout.to(cd) * out.to(cd)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(cd)
    dq = torch.empty_like(q) if dq is None else dq
    dk_acc = torch.zeros(tk, hk, d, dtype=cd, device=dev)
    dv_acc = torch.zeros(tk, hk, v.shape[2], dtype=cd, device=dev)
    for m in range(plan.num_q_tiles):
        r0, r1 = m * bm, min(tq, (m + 1) * bm)
        rows = r1 - r0
        max_keys = max(plan.block_n, max_step_elems // max(1, rows * hq))
        steps = list(_steps(plan, m, max_keys))
        if not steps:
            dq[r0:r1].zero_()
            continue
        qt = _heads_to_rows(q[r0:r1], hk, cd)
        dot = _heads_to_rows(dout[r0:r1], hk, cd)
        lse_t = _vec_to_rows(lse[r0:r1].to(cd), hk)
        # rows with lse = -inf saw no key: use +inf so P = exp(s - lse) is exactly 0 there (never NaN)
        lse_t = torch.where(torch.isneginf(lse_t), torch.full_like(lse_t, float("inf")), lse_t)
        delta_t = _vec_to_rows(delta[r0:r1], hk)
        if exact_delta:
            # delta_i = sum_j P_ij dP_ij = dO_i . O_i with O in full precision. FA2 reads the stored, rounded
            # fp16/bf16 O instead; on rows that see few keys dq/dk are a cancellation and that rounding
            # dominates their error (several x a dense low-precision reference), so pay 2 extra matmuls.
            delta_t = torch.zeros_like(delta_t)
            for c0, c1, ids in steps:
                s, _ = _scores(qt, k, c0, c1, softmax_scale, softcap, cd)
                mask = None if ids is None else _step_mask(slices, ids, r0, r1, c0, c1, dev)
                p = torch.exp(_apply_mask(s, mask, rows) - lse_t[..., None])
                delta_t += (p * torch.bmm(dot, v[c0:c1].to(cd).permute(1, 2, 0))).sum(-1)
            if dlse is not None:
                delta_t -= _vec_to_rows(dlse[r0:r1].to(cd), hk)
        dq_t = torch.zeros_like(qt)
        for c0, c1, ids in steps:
            s, th = _scores(qt, k, c0, c1, softmax_scale, softcap, cd)
            mask = None if ids is None else _step_mask(slices, ids, r0, r1, c0, c1, dev)
            s = _apply_mask(s, mask, rows)
            p = torch.exp(s - lse_t[..., None])
            vt = v[c0:c1].to(cd).transpose(0, 1)  # [Hk, keys, Dv]
            kt = k[c0:c1].to(cd).transpose(0, 1)  # [Hk, keys, D]
            dv_acc[c0:c1] += torch.bmm(p.transpose(1, 2), dot).transpose(0, 1)
            dp = torch.bmm(dot, vt.transpose(1, 2))
            ds = p * (dp - delta_t[..., None])
            if th is not None:
                ds = ds * (1 - th * th)
            ds = ds * softmax_scale
            dq_t += torch.bmm(ds, kt)
            dk_acc[c0:c1] += torch.bmm(ds.transpose(1, 2), qt).transpose(0, 1)
        dq[r0:r1] = _rows_to_heads(dq_t, hk, rows).to(dq.dtype)
    dk = dk_acc.to(k.dtype) if dk is None else dk.copy_(dk_acc)
    dv = dv_acc.to(v.dtype) if dv is None else dv.copy_(dv_acc)
    return dq, dk, dv
