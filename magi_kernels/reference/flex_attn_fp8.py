"""Quantized (int8 Q/K, e4m3 or fp16 P/V) flex attention forward: the torch definition, emulating every rounding
step of the kernel.

Same mask and output convention as ``flex_attn_ref`` (magi_kernels/reference/flex_attn.py): out [Tq, Hq, D],
lse [Tq, Hq] natural log of the *unquantized-convention* scores (-inf where a row sees nothing). What
changes is where values are rounded: Q and K to int8 codes with one scale per token (row), P and V to e4m3fn
(round-to-nearest-even, |x| <= 448) or, with ``pv_precision="fp16"``, to fp16. For q tile m of ``block_m``
rows, k tile n of ``block_n`` keys, q head h and its kv head kh:

    mean_k[kh]   = mean over all tokens of k[:, kh, :]                         (fp32, per channel)
    sv[kh, d]    = max(amax_tokens |v[:, kh, d]|, floor) / 448                 (fp32, per channel)
    kc_j         = k_j - mean_k[kh];  sk_j = max(amax_d |kc_j|, floor) / 127;  k8_j = i8(kc_j / sk_j)  (per key j)
    v8           = pv(v / sv)                                                  pv = e4m3 or fp16 rounding
    sq_i         = max(amax_d |q_i|, floor) / 127;  q8_i = i8(q_i / sq_i)      (per query row i)
    u_ij         = ((q8_i . k8_j) * sk_j) * (sq_i * mul);  qm_i = (q_i . mean_k) * mul
                   mul = scale*log2(e), or scale/c with softcap c
    s2           = u, or tanh(u + qm) * c * log2(e) with softcap c             (log2-domain score)
                   (without softcap the row max of u is taken as max_j((q8_i . k8_j) * sk_j) * (sq_i * mul))

i8(y) = trunc(y + (0.5 if y >= 0 else -0.5)) in fp32 (round half away from zero; |y| <= 127 by the scale).
The int8 dot product is exact (|q8 . k8| <= 127^2 * 128 < 2^24, so fp32 holds it). Then, over the visited k
tiles of the q tile in the kernel's order (the plan's: FULL tiles, then PARTIAL ones, each PARTIAL tile once per
key interval of its rows, as the plan's row bounds list them), an online softmax whose P is rounded against its
per-row bound 1 (scale 1/448):

    m' = max(m, rowmax s2);  p = exp2(s2 - m' + log2 448);  l = l * 2^(m - m') + sum p
    acc = acc * 2^(m - m') + pv(p) . v8
    out = acc / l * sv;  lse = (m + qm + log2(l) - log2 448) * ln 2              (no softcap; with it, no qm)

Subtracting mean_k from every key shifts each row's scores by the same q . mean_k: softmax ignores it, and the
add-back term qm (fp32, unquantized q) restores it in the lse (and inside tanh under softcap), so this
approximates flex attention of the unquantized inputs; the test suite bounds how closely
(tests/attention/test_flex_attn_fp8.py) and benchmarks/bench_fp8_attention.py reports it.
The order of tiles matters only through P's rounding (each tile's P is rounded against the running max).

``exact`` names operands ("q", "k", "p", "v") whose rounding is skipped (their scales stay): the benchmark's
error budget switches on one quantization at a time with it.
"""

from __future__ import annotations

import math

import torch

from magi_kernels.reference.flex_attn import default_scale, union_mask_ref
from magi_kernels.reference.fp8 import AMAX_FLOOR, E4M3, E4M3_MAX

LOG2E = 1.4426950408889634
LOG2_QMAX = math.log2(E4M3_MAX)
INT8_MAX = 127.0
PV_PRECISIONS = ("e4m3", "fp16")
OPERANDS = ("q", "k", "p", "v")
K_SCALES = ("key", "block")


def e4m3_round(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> the nearest e4m3fn value (ties to even), saturated at +-448, returned in fp32."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).to(torch.float32)


def int8_round(y: torch.Tensor) -> torch.Tensor:
    """fp32 -> the int8 code of y clamped to +-127, ties away from zero (fp32 trunc(y +- 0.5)), in fp32."""
    y = y.clamp(-INT8_MAX, INT8_MAX)
    return torch.trunc(y + torch.where(y >= 0, 0.5, -0.5))


def pv_round(x: torch.Tensor, pv_precision: str) -> torch.Tensor:
    """P or V (already scaled into +-448) rounded to the PV MMA's operand type, in fp32."""
    return e4m3_round(x) if pv_precision == "e4m3" else x.to(torch.float16).to(torch.float32)


def row_quantize_int8(x: torch.Tensor, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes of x / s in fp32, s [..., 1]) with one scale s = max(amax|row|, floor) / 127 per last-dim row."""
    s = x.abs().amax(-1, keepdim=True).clamp_min(AMAX_FLOOR) / INT8_MAX
    y = x / s
    return (y if exact else int8_round(y)), s


def kv_statistics(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean_k [Hk, D], sv [Hk, D]) in fp32: K's per-channel token mean and V's per-channel 448-scale.

    The Triton statistics kernel computes the same two reductions in one pass (its fp32 sum runs in
    another order, so mean_k agrees to fp32 rounding; the amax is exact in any order).
    """
    mean = torch.sum(k, dim=0, dtype=torch.float32) / max(k.shape[0], 1)
    amax = v.abs().amax(0).float() if v.shape[0] else torch.zeros_like(mean)
    return mean.contiguous(), (amax.clamp_min(AMAX_FLOOR) / E4M3_MAX).contiguous()


def check_quantization_args(op: str, pv_precision: str, exact=()) -> None:
    if pv_precision not in PV_PRECISIONS:
        raise ValueError(f"{op}: pv_precision must be one of {PV_PRECISIONS}, got {pv_precision!r}")
    bad = set(exact) - set(OPERANDS)
    if bad:
        raise ValueError(f"{op}: exact may only name operands {OPERANDS}, got {sorted(bad)}")


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """[H, r, ...] -> [H, rows, ...], zeros appended along dim 1 (the last k tile's keys beyond total_k)."""
    pad = [0, 0] * (x.dim() - 2) + [0, rows - x.shape[1]]
    return torch.nn.functional.pad(x, pad)


def _steps(entries, vis: torch.Tensor, block_n: int):
    """The softmax steps over one q tile's plan entries, as (k tile, visible [rows, block_n]): a FULL tile once;
    a PARTIAL tile once per key interval of its rows, the j-th step holding every row's j-th maximal run of
    visible keys (the plan's row bounds: one interval per row and step, so a tile whose rows see several
    disjoint intervals is walked once per interval)."""
    for e in entries:
        tile = vis[:, e.k_tile * block_n:(e.k_tile + 1) * block_n]
        if e.full:
            yield e.k_tile, tile
            continue
        starts = tile & ~torch.nn.functional.pad(tile[:, :-1], (1, 0))  # first key of each run
        run = torch.cumsum(starts.to(torch.int64), 1) - 1  # run index of every key (visible ones: >= 0)
        for j in range(int(starts.sum(1).max())):
            yield e.k_tile, tile & (run == j)


def flex_attn_fp8_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_ranges, k_ranges, attn_type_map=None, *,
                      softmax_scale: float | None = None, softcap: float = 0.0, block_m: int = 128,
                      block_n: int = 128, pv_precision: str = "e4m3", exact: tuple[str, ...] = (),
                      k_scale: str = "key") -> tuple[torch.Tensor, torch.Tensor]:
    """(out [Tq, Hq, D] fp32, lse [Tq, Hq] fp32) by the definition above, for the kernel's tile shape.

    ``k_scale="block"`` evaluates the alternative K granularity docs/fp8_attention.md weighs against the shipped
    per-key one: one scale per (k tile, kv head), ``skb = max_j sk_j`` over the tile, folded into the row's
    factor (``s = (q8 . k8_j) * (sq_i * mul * skb)``)."""
    from magi_kernels.plan.planner import plan_attention

    check_quantization_args("flex_attn_fp8_ref", pv_precision, exact)
    if k_scale not in K_SCALES:
        raise ValueError(f"flex_attn_fp8_ref: k_scale must be one of {K_SCALES}, got {k_scale!r}")
    tq, hq, d = q.shape
    tk, hk, _ = k.shape
    groups = hq // hk
    scale = default_scale(d) if softmax_scale is None else softmax_scale
    mul = scale / softcap if softcap > 0 else scale * LOG2E
    cap_out = softcap * LOG2E
    out = torch.zeros(tq, hq, d, dtype=torch.float32)
    lse = torch.full((tq, hq), float("-inf"), dtype=torch.float32)
    if tq == 0 or tk == 0:
        return out, lse

    def pv(x, name):
        return x if name in exact else pv_round(x, pv_precision)

    q, k, v = (x.detach().cpu() for x in (q, k, v))
    mask = union_mask_ref(q_ranges, k_ranges, attn_type_map, tq, tk)
    plan = plan_attention(torch.as_tensor(q_ranges).cpu(), torch.as_tensor(k_ranges).cpu(),
                          None if attn_type_map is None else torch.as_tensor(attn_type_map).cpu(), total_q=tq,
                          total_k=tk, block_m=block_m, block_n=block_n)
    mean_k, sv = kv_statistics(k, v)
    nt = -(-tk // block_n)
    kc = _pad_rows((k.float() - mean_k).transpose(0, 1), nt * block_n)  # [Hk, Nt*bn, D]; padded keys: code 0
    k8, sk = row_quantize_int8(kc, "k" in exact)
    sk = sk[..., 0]  # [Hk, Nt*bn]
    if k_scale == "block":
        sk = sk.view(hk, nt, block_n).amax(-1)  # [Hk, Nt]
        y = kc / sk.repeat_interleave(block_n, 1)[..., None]
        k8 = y if "k" in exact else int8_round(y)
    v8 = _pad_rows(pv(v.float() / sv, "v").transpose(0, 1), nt * block_n)  # [Hk, Nt*bn, D]
    kv_head = torch.arange(hq) // groups
    mean_q = mean_k[kv_head][:, None, :]  # [Hq, 1, D]
    for m in range(plan.num_q_tiles):
        rows = slice(m * block_m, min((m + 1) * block_m, tq))
        qf = q[rows].float().transpose(0, 1)  # [Hq, r, D]
        vis = torch.nn.functional.pad(mask[rows], (0, nt * block_n - tk))  # padded keys are never visible
        qm = (qf * mean_q).sum(-1) * mul  # [Hq, r]
        q8, sq = row_quantize_int8(qf, "q" in exact)  # one scale per query row
        score_mul = sq * mul  # [Hq, r, 1], > 0
        m_i = torch.full(qm.shape, float("-inf"))
        l_i = torch.zeros(qm.shape)
        acc = torch.zeros(*qm.shape, d)
        for k_tile, tile_vis in _steps(plan.q_tile_entries(m), vis, block_n):
            keys = slice(k_tile * block_n, (k_tile + 1) * block_n)
            kt, vt = k8[kv_head, keys], v8[kv_head, keys]
            s = q8 @ kt.transpose(1, 2)  # exact integer dot
            if k_scale == "key":
                s, row_mul = s * sk[kv_head, keys][:, None, :], score_mul  # then the key's scale
            else:
                row_mul = score_mul * sk[kv_head, k_tile][:, None, None]  # the tile's scale joins the row's
            if softcap > 0:
                s = torch.tanh(s * row_mul + qm[..., None]) * cap_out
            s = s.masked_fill(~tile_vis, float("-inf"))
            tile_max = s.amax(-1) if softcap > 0 else s.amax(-1) * row_mul[..., 0]  # row_mul > 0
            m_new = torch.maximum(m_i, tile_max)
            m_use = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
            s2 = s if softcap > 0 else s * row_mul
            p = torch.exp2(s2 - (m_use - LOG2_QMAX)[..., None])
            alpha = torch.exp2(m_i - m_use)
            l_i = l_i * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + pv(p, "p") @ vt
            m_i = m_new
        if softcap <= 0:
            m_i = m_i + qm  # the per-row smoothing shift, which the softmax itself ignores
        seen = l_i > 0
        l_safe = torch.where(seen, l_i, torch.ones_like(l_i))
        out[rows] = (acc / l_safe[..., None] * sv[kv_head][:, None, :]).transpose(0, 1)
        lse[rows] = torch.where(seen, (m_i + torch.log2(l_safe) - LOG2_QMAX) * math.log(2.0),
                                torch.full_like(l_i, float("-inf"))).transpose(0, 1)
    return out, lse
