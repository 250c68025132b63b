"""Definition of flex attention: dense, readable, and slow (test sizes only).

The mask is the union of slices ``(q_ranges[i], k_ranges[i], attn_type_map[i])`` with half-open global
token ranges. Inside one slice of ``sq`` queries and ``sk`` keys, local query ``i`` may see local key ``j``:

    FULL (0)        always
    CAUSAL (1)      j <= i + (sk - sq)        (the diagonal anchored bottom-right)
    INV_CAUSAL (2)  j >= i                    (anchored top-left)
    BI_CAUSAL (3)   both

A cell two slices cover counts once. For every query row and q head h (kv head h // (Hq / Hk)):

    s_j = (q . k_j) * scale                        with softcap c > 0: s_j = c * tanh(s_j / c)
    lse = log sum_{j visible} exp(s_j)             natural log; -inf when no key is visible
    out = sum_{j visible} exp(s_j - lse) v_j       0 when no key is visible

The ``torch`` backend (``magi_kernels.kernels.torch.flex_attn``) computes the same without a dense mask.
"""

from __future__ import annotations

import math

import torch


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def union_mask_ref(q_ranges, k_ranges, attn_type_map, total_q: int, total_k: int) -> torch.Tensor:
    """bool [total_q, total_k]: True where some slice lets the query see the key."""
    qr = torch.as_tensor(q_ranges).reshape(-1, 2).tolist()
    kr = torch.as_tensor(k_ranges).reshape(-1, 2).tolist()
    types = [0] * len(qr) if attn_type_map is None else torch.as_tensor(attn_type_map).reshape(-1).tolist()
    mask = torch.zeros(total_q, total_k, dtype=torch.bool)
    for (qs, qe), (ks, ke), t in zip(qr, kr, types):
        i = torch.arange(qe - qs)[:, None]
        j = torch.arange(ke - ks)[None, :]
        below = j <= i + ((ke - ks) - (qe - qs))
        above = j >= i
        visible = {0: torch.ones_like(below), 1: below, 2: above, 3: below & above}[int(t)]
        mask[qs:qe, ks:ke] |= visible
    return mask


def flex_attn_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_ranges, k_ranges, attn_type_map=None, *,
                  softmax_scale: float | None = None, softcap: float = 0.0,
                  compute_dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [Tq, Hq, D] in compute_dtype, lse [Tq, Hq] in compute_dtype) by the definition above."""
    tq, hq, d = q.shape
    groups = hq // k.shape[1]
    scale = default_scale(d) if softmax_scale is None else softmax_scale
    mask = union_mask_ref(q_ranges, k_ranges, attn_type_map, tq, k.shape[0]).to(q.device)
    qc = q.to(compute_dtype)
    kc = k.to(compute_dtype).repeat_interleave(groups, dim=1)
    vc = v.to(compute_dtype).repeat_interleave(groups, dim=1)
    s = torch.einsum("qhd,khd->hqk", qc, kc) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf for rows with no visible key
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    out = torch.einsum("hqk,khd->qhd", p, vc)
    return out, lse.transpose(0, 1)
