"""Distributed attention on 2, 4 and 8 gloo processes vs single-process flex_attn_func (see attention_cases)."""

import pytest
import torch

from tests.distributed._launch import assert_all_passed, run_suite


@pytest.mark.parametrize("world", [2, 4, 8])
def test_distributed_attention(world):
    results = run_suite("attention_cases", world, seed=int(torch.initial_seed() % 2**31))
    assert len(results) >= 12
    assert_all_passed(results)
