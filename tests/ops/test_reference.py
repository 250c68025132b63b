"""The plain definitions in magi_kernels.reference agree with the optimized torch backend (float64 inputs,
so any difference is a semantic one, not rounding)."""

import pytest
import torch

import magi_kernels as mk
from magi_kernels.reference.flex_attn import flex_attn_ref, union_mask_ref


def test_union_mask_of_each_type_and_overlap():
    qr = torch.tensor([[0, 3], [0, 3], [3, 5]])
    kr = torch.tensor([[0, 4], [0, 4], [1, 4]])
    m = union_mask_ref(qr, kr, torch.tensor([1, 2, 3]), 5, 4)
    # causal (bottom-right, offset sk - sq = 1) union inverse-causal (top-left) covers rows 0..2 fully
    assert m[:3].all()
    # bi-causal on 2 queries x 3 keys starting at key 1: row 3 sees keys 1..2, row 4 keys 2..3
    assert m[3].tolist() == [False, True, True, False] and m[4].tolist() == [False, False, True, True]


@pytest.mark.parametrize("softcap", [0.0, 7.0])
def test_flex_attn_definition_matches_the_torch_backend(softcap):
    torch.manual_seed(3)
    tq, tk = 37, 29
    q, k, v = torch.randn(tq, 4, 16).double(), torch.randn(tk, 2, 16).double(), torch.randn(tk, 2, 16).double()
    qr = torch.tensor([[0, 20], [10, 33], [5, 9], [30, 33]], dtype=torch.int32)
    kr = torch.tensor([[0, 15], [3, 29], [0, 29], [20, 21]], dtype=torch.int32)
    ty = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    out, lse = mk.flex_attn_func(q, k, v, qr, kr, ty, softcap=softcap, backend="torch")
    out_ref, lse_ref = flex_attn_ref(q, k, v, qr, kr, ty, softcap=softcap)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-6, atol=1e-6)  # lse is stored in fp32
    assert torch.isneginf(lse[33:]).all() and (out[33:] == 0).all()  # rows no slice covers
