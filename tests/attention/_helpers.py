"""Test-only references for flex attention: dense masks and dense float64 attention (fine at test sizes)."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st

RTOL = {  # MagiAttention's per-tensor rtol (its ``magi_attention/testing/precision.py``)
    torch.bfloat16: {"out": 0.05, "lse": 0.001, "dq": 0.3, "dk": 0.15, "dv": 0.05},
    torch.float16: {"out": 0.05, "lse": 0.001, "dq": 0.2, "dk": 0.08, "dv": 0.05},
}


def dense_mask(qr, kr, ty, tq: int, tk: int) -> torch.Tensor:
    """bool [tq, tk] straight from the mask-type definitions (docs/attention.md#mask-types) in local indices (independent of the library)."""
    M = torch.zeros(tq, tk, dtype=torch.bool)
    qr, kr = np.asarray(qr).reshape(-1, 2), np.asarray(kr).reshape(-1, 2)
    ty = np.zeros(len(qr), np.int64) if ty is None else np.asarray(ty).reshape(-1)
    for (qs, qe), (ks, ke), t in zip(qr.tolist(), kr.tolist(), ty.tolist()):
        sq, sk = qe - qs, ke - ks
        i = torch.arange(sq)[:, None]
        j = torch.arange(sk)[None, :]
        if t == 0:
            allowed = torch.ones(sq, sk, dtype=torch.bool)
        elif t == 1:
            allowed = j <= i + (sk - sq)
        elif t == 2:
            allowed = j >= i
        else:
            allowed = (j >= i) & (j <= i + (sk - sq))
        M[qs:qe, ks:ke] |= allowed
    return M


def dense_attn(q, k, v, mask, scale, softcap=0.0, dtype=torch.float64):
    """Dense masked attention in ``dtype`` (GQA by repeating heads: fine for a test reference)."""
    g = q.shape[1] // k.shape[1]
    qq, kk, vv = q.to(dtype), k.to(dtype).repeat_interleave(g, 1), v.to(dtype).repeat_interleave(g, 1)
    s = torch.einsum("qhd,khd->hqk", qq, kk)
    s = s * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask[None], float("-inf"))
    # lse in fp32 at least. P = softmax in the compute dtype: for fp16/bf16 this is SDPA's math path with
    # low-precision inputs (P rounded, softmax backward's sum(dP*P) from the rounded P), the baseline that
    # MagiAttention's two-sided scheme calibrates against. Rows with no visible key give NaN -> 0.
    lse = torch.logsumexp(s.float() if dtype in (torch.float16, torch.bfloat16) else s, -1)
    p = torch.softmax(s, -1)
    p = torch.where(torch.isinf(lse)[..., None], torch.zeros_like(p), p)
    o = torch.einsum("hqk,khd->qhd", p, vv)
    return o, lse.transpose(0, 1)


def assert_two_sided(name, ours, ref64, low, *, min_norm=1e-4, ratio=2.0, rtol=None, atol=1e-8, mismatch_ratio=2.0,
                     mismatch_floor=1e-3):
    """MagiAttention's scheme: ||ours - ref64||inf <= max(min_norm, ratio * ||low - ref64||inf), and the fraction
    of elements outside atol + rtol*|ref| at most 2x the low-precision reference's (clamped to [1e-3, 0.75])."""
    ours, ref64, low = ours.double(), ref64.double(), low.double()
    fin = torch.isfinite(ref64)
    assert torch.equal(torch.isfinite(ours), fin), f"{name}: finite/inf pattern differs from the reference"
    e_ours = (ours[fin] - ref64[fin]).abs().max().item() if fin.any() else 0.0
    e_low = (low[fin] - ref64[fin]).abs().max().item() if fin.any() else 0.0
    assert e_ours <= max(min_norm, ratio * e_low), f"{name}: max err {e_ours:.3e} > max({min_norm}, {ratio}x{e_low:.3e})"
    # The relative mismatch count is meaningless on a numerically-zero tensor (e.g. dq of rows that see
    # a single key is exactly 0 in fp64, while FA2's delta = rowsum(dO*O) from the rounded O leaves ~1e-6).
    if rtol is not None and fin.any() and ref64[fin].abs().max().item() > min_norm:
        tol = atol + rtol * ref64[fin].abs()
        mis_ours = ((ours[fin] - ref64[fin]).abs() > tol).double().mean().item()
        mis_low = ((low[fin] - ref64[fin]).abs() > tol).double().mean().item()
        assert mis_ours <= min(0.75, max(mismatch_floor, mismatch_ratio * mis_low)), f"{name}: mismatch {mis_ours:.3%} vs low-precision {mis_low:.3%}"


@st.composite
def slice_layouts(draw, max_tokens=80, max_slices=6):
    """Random (qr, kr, types, total_q, total_k): overlaps, gaps, uncovered rows, empty and length-1 ranges."""
    tq = draw(st.integers(1, max_tokens))
    tk = draw(st.integers(1, max_tokens))
    n = draw(st.integers(0, max_slices))
    qr, kr, ty = [], [], []
    for _ in range(n):
        qs = draw(st.integers(0, tq))
        qe = draw(st.one_of(st.just(qs), st.just(min(tq, qs + 1)), st.integers(qs, tq)))
        ks = draw(st.integers(0, tk))
        ke = draw(st.one_of(st.just(ks), st.just(min(tk, ks + 1)), st.integers(ks, tk)))
        qr.append([qs, qe])
        kr.append([ks, ke])
        ty.append(draw(st.integers(0, 3)))
    return (np.asarray(qr, np.int32).reshape(-1, 2), np.asarray(kr, np.int32).reshape(-1, 2),
            np.asarray(ty, np.int32).reshape(-1), tq, tk)
