"""The tiny MAGI-1 model under cp / pp layouts on 2, 4 and 8 gloo processes (see model_cases)."""

import pytest
import torch

from tests.distributed._launch import assert_all_passed, run_suite


@pytest.mark.parametrize("world", [2, 4, 8])
def test_distributed_magi1(world):
    results = run_suite("model_cases", world, seed=int(torch.initial_seed() % 2**31))
    assert_all_passed(results)
