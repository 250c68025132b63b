"""fp8 (e4m3) flex attention forward: the torch definition, emulating every rounding step of the kernel.

Same mask and output convention as ``flex_attn_ref`` (magi_kernels/reference/flex_attn.py): out [Tq, Hq, D],
lse [Tq, Hq] natural log of the *unquantized-convention* scores (-inf where a row sees nothing). What
changes is where values are rounded to e4m3fn (round-to-nearest-even, |x| <= 448), for q tile m of
``block_m`` rows, k tile n of ``block_n`` keys, q head h and its kv head kh:

    mean_k[kh]   = mean over all tokens of k[:, kh, :]                         (fp32, per channel)
    sv[kh, d]    = max(amax_tokens |v[:, kh, d]|, floor) / 448                 (fp32, per channel)
    kc           = k[tile n, kh] - mean_k[kh];  sk = max(amax|kc|, floor) / 448;  k8 = e4m3(kc / sk)
    v8           = e4m3(v / sv)
    sq           = max(amax|q[tile m, h]|, floor) / 448;  q8 = e4m3(q / sq)
    u            = (q8 . k8) * (sq * mul * sk);  qm = (q . mean_k) * mul       mul = scale*log2(e), or scale/c
    s2           = u, or tanh(u + qm) * c * log2(e) with softcap c             (log2-domain score)
                   (without softcap the row max of u is taken as max(q8 . k8) * (sq * mul * sk): scale > 0)

then, over the visited k tiles of the q tile in the kernel's order (the plan's: FULL tiles, then PARTIAL
ones), an online softmax whose P is quantized against its per-row bound 1 (scale 1/448):

    m' = max(m, rowmax s2);  p = exp2(s2 - m' + log2 448);  l = l * 2^(m - m') + sum p
    acc = acc * 2^(m - m') + e4m3(p) . v8
    out = acc / l * sv;  lse = (m + qm + log2(l) - log2 448) * ln 2              (no softcap; with it, no qm)

Subtracting mean_k from every key shifts each row's scores by the same q . mean_k: softmax ignores it, and the
add-back term qm (fp32, unquantized q) restores it in the lse (and inside tanh under softcap), so this
approximates flex attention of the unquantized inputs; the test suite bounds how closely
(tests/attention/test_flex_attn_fp8.py) and benchmarks/bench_fp8_attention.py reports it.
The order of tiles matters only through P's rounding (each tile's P is rounded against the running max).
"""

from __future__ import annotations

import math

import torch

from magi_kernels.reference.flex_attn import default_scale, union_mask_ref
from magi_kernels.reference.fp8 import AMAX_FLOOR, E4M3, E4M3_MAX

LOG2E = 1.4426950408889634
LOG2_QMAX = math.log2(E4M3_MAX)


def e4m3_round(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> the nearest e4m3fn value (ties to even), saturated at +-448, returned in fp32."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).to(torch.float32)


def block_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values of x / s in fp32, s) with one scale s = max(amax|x|, floor) / 448 for the whole block."""
    s = x.abs().amax().clamp_min(AMAX_FLOOR) / E4M3_MAX
    return e4m3_round(x / s), s


def kv_statistics(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean_k [Hk, D], sv [Hk, D]) in fp32: K's per-channel token mean and V's per-channel fp8 scale.

    Token-axis reductions with fp32 accumulation (no full-precision copy of K or V); the Triton launcher
    calls this too, so both paths start from the same statistics.
    """
    mean = torch.sum(k, dim=0, dtype=torch.float32) / max(k.shape[0], 1)
    if v.shape[0] == 0:
        amax = torch.zeros_like(mean)
    else:
        amax = torch.maximum(v.amax(0).abs(), v.amin(0).abs()).float()
    return mean.contiguous(), (amax.clamp_min(AMAX_FLOOR) / E4M3_MAX).contiguous()


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """[H, r, D] -> [H, rows, D], zero rows appended (the last k tile's keys beyond total_k)."""
    return torch.nn.functional.pad(x, (0, 0, 0, rows - x.shape[1]))


def flex_attn_fp8_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_ranges, k_ranges, attn_type_map=None, *,
                      softmax_scale: float | None = None, softcap: float = 0.0, block_m: int = 128,
                      block_n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [Tq, Hq, D] fp32, lse [Tq, Hq] fp32) by the definition above, for the kernel's tile shape."""
    from magi_kernels.plan.planner import plan_attention

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
    q, k, v = (x.detach().cpu() for x in (q, k, v))
    mask = union_mask_ref(q_ranges, k_ranges, attn_type_map, tq, tk)
    plan = plan_attention(torch.as_tensor(q_ranges).cpu(), torch.as_tensor(k_ranges).cpu(),
                          None if attn_type_map is None else torch.as_tensor(attn_type_map).cpu(), total_q=tq,
                          total_k=tk, block_m=block_m, block_n=block_n)
    mean_k, sv = kv_statistics(k, v)
    nt = -(-tk // block_n)
    k8, sk, v8 = [], [], []
    for n in range(nt):
        keys = slice(n * block_n, min((n + 1) * block_n, tk))
        kq = [block_quantize(k[keys, j].float() - mean_k[j]) for j in range(hk)]
        k8.append(_pad_rows(torch.stack([x for x, _ in kq]), block_n))  # [Hk, bn, D]
        sk.append(torch.stack([s for _, s in kq]))  # [Hk]
        v8.append(_pad_rows(e4m3_round(v[keys].float() / sv).transpose(0, 1), block_n))  # [Hk, bn, D]
    k8, sk, v8 = torch.stack(k8), torch.stack(sk), torch.stack(v8)  # [Nt, Hk, bn, D], [Nt, Hk], [Nt, Hk, bn, D]
    kv_head = torch.arange(hq) // groups
    mean_q = mean_k[kv_head][:, None, :]  # [Hq, 1, D]
    for m in range(plan.num_q_tiles):
        rows = slice(m * block_m, min((m + 1) * block_m, tq))
        qf = q[rows].float().transpose(0, 1)  # [Hq, r, D]
        vis = torch.nn.functional.pad(mask[rows], (0, nt * block_n - tk))  # padded keys are never visible
        qm = (qf * mean_q).sum(-1) * mul  # [Hq, r]
        sq = qf.abs().amax((1, 2), keepdim=True).clamp_min(AMAX_FLOOR) / E4M3_MAX  # one scale per (tile, head)
        q8 = e4m3_round(qf / sq)
        score_mul = sq * mul
        m_i = torch.full(qm.shape, float("-inf"))
        l_i = torch.zeros(qm.shape)
        acc = torch.zeros(*qm.shape, d)
        for e in plan.q_tile_entries(m):
            n = e.k_tile
            kt, vt = k8[n][kv_head], v8[n][kv_head]  # [Hq, bn, D]
            s = q8 @ kt.transpose(1, 2)
            tile_mul = score_mul * sk[n][kv_head][:, None, None]  # > 0
            if softcap > 0:
                s = torch.tanh(s * tile_mul + qm[..., None]) * cap_out
            s = s.masked_fill(~vis[:, n * block_n:(n + 1) * block_n], float("-inf"))
            tile_max = s.amax(-1) if softcap > 0 else s.amax(-1) * tile_mul[..., 0]  # max(s * c) = max(s) * c, c > 0
            m_new = torch.maximum(m_i, tile_max)
            m_use = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
            s2 = s if softcap > 0 else s * tile_mul
            p = torch.exp2(s2 - (m_use - LOG2_QMAX)[..., None])
            alpha = torch.exp2(m_i - m_use)
            l_i = l_i * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + e4m3_round(p) @ vt
            m_i = m_new
        if softcap <= 0:
            m_i = m_i + qm  # the per-row smoothing shift, which the softmax itself ignores
        seen = l_i > 0
        l_safe = torch.where(seen, l_i, torch.ones_like(l_i))
        out[rows] = (acc / l_safe[..., None] * sv[kv_head][:, None, :]).transpose(0, 1)
        lse[rows] = torch.where(seen, (m_i + torch.log2(l_safe) - LOG2_QMAX) * math.log(2.0),
                                torch.full_like(l_i, float("-inf"))).transpose(0, 1)
    return out, lse
