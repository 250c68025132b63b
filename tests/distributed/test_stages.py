"""Pipeline stages build and load only their layers (single process: building needs no process group)."""

import pytest
import torch

from magi_model.config import preset
from magi_model.dit import build_dit
from magi_model.loading import load_dit, save_checkpoint
from magi_model.parallel import (
    ParallelConfigError,
    ParallelLayout,
    build_stage_dit,
    check_layout,
    materialized_parameters,
    owns_key,
    stage_layers,
)


def test_stage_layers_are_contiguous_and_cover_the_model():
    for L, pp in ((4, 2), (5, 2), (34, 4), (48, 8), (3, 3)):
        parts = [stage_layers(L, pp, s) for s in range(pp)]
        assert [i for p in parts for i in p] == list(range(L))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ParallelConfigError, match="pp_size"):
        stage_layers(4, 5, 0)


@pytest.mark.parametrize("num_shards", [1, 3])
def test_stage_loads_only_its_keys_from_the_checkpoint(tmp_path, num_shards):
    cfg = preset("tiny_random")
    full = build_dit(cfg, seed=3)
    save_checkpoint(full, str(tmp_path), num_shards=num_shards)
    ref = load_dit(cfg, checkpoint_dir=str(tmp_path), progress=False).state_dict()
    per_layer = sum(p.numel() for p in full.videodit_blocks.layers[0].parameters())
    top = sum(p.numel() for n, p in full.named_parameters() if not n.startswith("videodit_blocks.layers."))
    for stage in range(2):
        layout = ParallelLayout(cp_size=1, pp_size=2, cp_strategy="none", rank=stage, device=torch.device("cpu"))
        m = build_stage_dit(cfg, layout, checkpoint_dir=str(tmp_path))
        own = stage_layers(cfg.model.num_layers, 2, stage)
        assert materialized_parameters(m) == top + len(own) * per_layer
        for k, v in m.state_dict(keep_vars=True).items():
            if owns_key(k, own):
                assert not v.is_meta and torch.equal(v, ref[k]), k
            else:
                assert v.is_meta, k


def test_random_stage_weights_equal_the_full_models():
    cfg = preset("tiny_random")
    full = build_dit(cfg, seed=7).state_dict()
    layout = ParallelLayout(cp_size=1, pp_size=2, cp_strategy="none", rank=1, device=torch.device("cpu"))
    m = build_stage_dit(cfg, layout, seed=7)
    for k, v in m.state_dict(keep_vars=True).items():
        if not v.is_meta:
            assert torch.equal(v, full[k]), k


def test_layout_rules():
    cfg = preset("tiny_random")  # 4 heads, 2 kv groups, 4 layers
    assert check_layout(cfg, 4, cp_size=4, pp_size=1) == (4, 1, "cp_ulysses")
    assert check_layout(cfg, 6, cp_size=3, pp_size=2, cp_strategy="cp_shuffle_overlap")[2] == "cp_shuffle_overlap"
    with pytest.raises(ParallelConfigError, match="cp_size must divide them; got 3"):
        check_layout(cfg, 3, cp_size=3, pp_size=1, cp_strategy="cp_ulysses")
    with pytest.raises(ParallelConfigError, match="must equal the world size 8"):
        check_layout(cfg, 8, cp_size=2, pp_size=2)
    with pytest.raises(ParallelConfigError, match="int >= 1"):
        check_layout(cfg, 1, cp_size=0, pp_size=1)
