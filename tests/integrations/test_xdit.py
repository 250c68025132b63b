"""The xDiT / yunchang (out, lse) contract: shard K/V, merge partial results, compare with the unsplit result.

References are float64 SDPA on the full sequence; merging goes through merge_out_lse (merge_attn_states).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from magi_kernels.compat import xdit
from magi_kernels.utils.checks import MagiArgumentError

F64 = torch.float64


def _sdpa64(q, k, v, causal=False):
    """float64 SDPA in [B, S, H, D] with GQA; causal is bottom-right aligned (FlashAttention 2); lse [B, H, S]."""
    g = q.shape[2] // k.shape[2]
    qq, kk, vv = (t.to(F64).transpose(1, 2) for t in (q, k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)))
    sq, sk = q.shape[1], k.shape[1]
    dense = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + (sk - sq) if causal else None
    out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=dense)
    s = torch.einsum("bhqd,bhkd->bhqk", qq, kk) * q.shape[-1] ** -0.5
    if causal:
        s = s.masked_fill(~dense, float("-inf"))
    return out.transpose(1, 2), torch.logsumexp(s, -1)


def _close(a, b, tol=2e-5):
    err = (a.to(F64) - b.to(F64)).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), err


def test_layout_and_matches_unsplit_reference():
    B, S, H, Hk, D = 2, 11, 4, 2, 16
    q, k, v = torch.randn(B, S, H, D), torch.randn(B, S, Hk, D), torch.randn(B, S, Hk, D)
    out, lse = xdit.attn_forward(q, k, v)
    assert out.shape == (B, S, H, D) and lse.shape == (B, H, S) and lse.dtype == torch.float32
    ref_o, ref_l = _sdpa64(q, k, v)
    _close(out, ref_o)
    _close(lse, ref_l)


def test_key_shards_merge_to_unsplit_result_forward_and_backward():
    # ring attention's inner loop: the same queries against disjoint K/V shards (uneven, one empty)
    B, S, H, Hk, D = 2, 13, 4, 1, 8
    q, k, v = (torch.randn(B, S, h, D, requires_grad=True) for h in (H, Hk, Hk))
    out = lse = None
    for lo, hi in ((0, 5), (5, 5), (5, 13)):
        o_i, l_i = xdit.attn_forward(q, k[:, lo:hi], v[:, lo:hi], 0.0, None, False)
        out, lse = (o_i, l_i) if out is None else xdit.merge_out_lse(out, lse, o_i, l_i)
    q64, k64, v64 = (t.detach().to(F64).requires_grad_() for t in (q, k, v))
    ref_o, ref_l = _sdpa64(q64, k64, v64)
    _close(out, ref_o.detach())
    _close(lse, ref_l.detach())
    g_o, g_l = torch.randn_like(out), torch.randn_like(lse)
    ((out * g_o).sum() + (lse * g_l).sum()).backward()
    ((ref_o * g_o.to(F64)).sum() + (ref_l * g_l.to(F64)).sum()).backward()
    for ours, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        _close(ours, want, tol=5e-5)


def test_causal_ring_step_composes():
    # the last rank's queries: full attention to earlier shards, causal to its own shard, merged
    B, S, H, D, world = 1, 12, 2, 8, 3
    n = S // world
    q, k, v = torch.randn(B, S, H, D), torch.randn(B, S, H, D), torch.randn(B, S, H, D)
    q_last = q[:, -n:]
    out, lse = xdit.attn_forward(q_last, k[:, -n:], v[:, -n:], causal=True)
    for r in range(world - 1):
        o_r, l_r = xdit.attn_forward(q_last, k[:, r * n:(r + 1) * n], v[:, r * n:(r + 1) * n], causal=False)
        out, lse = xdit.merge_out_lse(out, lse, o_r, l_r)
    ref_o, ref_l = _sdpa64(q, k, v, causal=True)
    _close(out, ref_o[:, -n:])
    _close(lse, ref_l[..., -n:])


def test_unsupported_options_raise():
    q = torch.randn(1, 4, 2, 8)
    for kwargs, arg in (({"dropout_p": 0.1}, "dropout_p"), ({"alibi_slopes": torch.ones(2)}, "alibi_slopes"),
                        ({"return_softmax": True}, "return_softmax")):
        with pytest.raises(MagiArgumentError, match=f"'{arg}'"):
            xdit.attn_forward(q, q, q, **kwargs)
    with pytest.raises(MagiArgumentError, match="'window_size'.*as many queries as keys"):
        xdit.attn_forward(q, q[:, :3], q[:, :3], window_size=(1, 1))
    with pytest.raises(MagiArgumentError, match="'lse_a' must have shape"):
        xdit.merge_out_lse(q, torch.zeros(1, 4, 2), q, torch.zeros(1, 4, 2))


def test_window_size_matches_dense_local_attention():
    B, S, H, D, left, right = 2, 10, 2, 8, 3, 1
    q, k, v = torch.randn(B, S, H, D), torch.randn(B, S, H, D), torch.randn(B, S, H, D)
    out, lse = xdit.attn_forward(q, k, v, window_size=(left, right))
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    dense = (j >= i - left) & (j <= i + right)
    qq, kk, vv = (t.to(F64).transpose(1, 2) for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=dense).transpose(1, 2)
    s = (torch.einsum("bhqd,bhkd->bhqk", qq, kk) * D ** -0.5).masked_fill(~dense, float("-inf"))
    _close(out, ref)
    _close(lse, torch.logsumexp(s, -1))
