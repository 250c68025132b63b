"""magi_kernels.compat.magi_attention.flex_flash_attn_func: MagiAttention's call forms."""

import pytest
import torch

from magi_kernels.compat.magi_attention import flex_flash_attn_func
from magi_kernels.ops.flex_attn import flex_attn_func
from magi_kernels.ranges import Magi1WindowMask, VarlenFull


def _case(dtype=torch.bfloat16):
    m = Magi1WindowMask(33, (2, 3, 4), 1)
    qr, kr, ty = m.to_ranges()
    q = torch.randn(m.total_q, 6, 64, dtype=dtype)
    k = torch.randn(m.total_k, 2, 64, dtype=dtype)
    v = torch.randn(m.total_k, 2, 64, dtype=dtype)
    return m, q, k, v, qr, kr, ty


def test_magi1_self_attention_call_form():
    # inference/model/dit/dit_module.py: positional max_seqlen_q/max_seqlen_k, no attn_type_map (all FULL)
    m, q, k, v, qr, kr, _ = _case()
    max_k = int((kr[:, 1] - kr[:, 0]).max())
    out, lse = flex_flash_attn_func(q, k, v, qr, kr, 33, max_k, softmax_scale=None, deterministic=False,
                                    disable_fwd_atomic_reduction=True)
    ref_out, ref_lse = flex_attn_func(q, k, v, qr, kr)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32


def test_magi1_cross_attention_call_form():
    # cross-attention: q ranges over video tokens, k ranges over each chunk's caption tokens
    cross = VarlenFull([0, 40, 80], [0, 12, 24])
    qr, kr, _ = cross.to_ranges()
    q = torch.randn(80, 4, 64, dtype=torch.bfloat16)
    k = torch.randn(24, 4, 64, dtype=torch.bfloat16)
    out, lse = flex_flash_attn_func(q, k, k, qr, kr, 40, 800, deterministic=False, disable_fwd_atomic_reduction=True)
    assert torch.equal(out, flex_attn_func(q, k, k, qr, kr)[0])


def test_head_form_and_positional_v10_tail():
    m, q, k, v, qr, kr, ty = _case(torch.float32)
    ref = flex_attn_func(q, k, v, qr, kr, ty, softmax_scale=0.2, softcap=3.0)
    got = flex_flash_attn_func(q, k, v, qr, kr, ty, softmax_scale=0.2, softcap=3.0, sm_margin=4, auto_range_merge=True,
                               ref_block_size=(128, 128), pack_gqa=True, return_max_logits=False, sink=None)
    assert torch.equal(got[0], ref[0])
    # v1.0: (q, k, v, q_ranges, k_ranges, max_seqlen_q, max_seqlen_k, attn_type_map, softmax_scale, softcap, ...)
    got = flex_flash_attn_func(q, k, v, qr, kr, 33, 99, ty, 0.2, 3.0, True, 0)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_gradients_flow_through_compat():
    m, q, k, v, qr, kr, _ = _case(torch.float32)
    q.requires_grad_()
    out, _ = flex_flash_attn_func(q, k, v, qr, kr, 33, 99, disable_fwd_atomic_reduction=True)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_unsupported_and_unknown_arguments():
    m, q, k, v, qr, kr, ty = _case(torch.float32)
    with pytest.raises(NotImplementedError, match="sink"):
        flex_flash_attn_func(q, k, v, qr, kr, sink=torch.zeros(1, 6))
    with pytest.raises(NotImplementedError, match="return_max_logits"):
        flex_flash_attn_func(q, k, v, qr, kr, return_max_logits=True)
    with pytest.raises(TypeError, match="unexpected keyword"):
        flex_flash_attn_func(q, k, v, qr, kr, bogus=1)
    with pytest.raises(TypeError, match="multiple values"):
        flex_flash_attn_func(q, k, v, qr, kr, 33, 99, max_seqlen_q=33)
    with pytest.raises(TypeError, match="keyword-only"):
        flex_flash_attn_func(q, k, v, qr, kr, ty, 0.5)
    with pytest.raises(TypeError, match="required"):
        flex_flash_attn_func(q, k, v)
