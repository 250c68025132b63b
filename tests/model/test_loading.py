"""Save + load tiny random checkpoints in the official layouts via safetensors; bad checkpoints."""

import json
import os

import pytest
import torch

from magi_model import build_dit, load_dit, save_checkpoint
from magi_model.config import MagiConfig, preset_dict
from magi_model.loading import CheckpointError, checkpoint_files, weight_dir


def small(name="tiny_random", **model):
    d = preset_dict(name)
    d["model_config"].update(num_layers=3, caption_max_length=32, caption_channels=64, ffn_hidden_size=256, **model)
    return d


def mapped_ranges(path):
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(os.path.realpath(path)):
                lo, hi = line.split()[0].split("-")
                out.append((int(lo, 16), int(hi, 16)))
    return out


@pytest.mark.parametrize("name,subdir", [("tiny_random", "inference_weight"), ("tiny_distill", "inference_weight.distill"),
                                         ("tiny_distill_quant", "inference_weight.fp8.distill")])
@pytest.mark.parametrize("shards", [1, 3])
def test_round_trip_official_layout(tmp_path, name, subdir, shards):
    d = small(name)
    d["runtime_config"]["load"] = str(tmp_path)
    cfg = MagiConfig.from_dict(d)
    assert weight_dir(cfg) == os.path.join(str(tmp_path), subdir)
    src = build_dit(cfg, seed=3)
    paths = save_checkpoint(src, weight_dir(cfg), num_shards=shards)
    files = sorted(os.listdir(weight_dir(cfg)))
    if shards == 1:
        assert files == ["model.safetensors"]
    else:
        assert files == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                         "model-00003-of-00003.safetensors", "model.safetensors.index.json"]
        index = json.load(open(os.path.join(weight_dir(cfg), "model.safetensors.index.json")))
        assert set(index["weight_map"]) == set(src.state_dict())
    model = load_dit(cfg, progress=False)
    want = src.state_dict()
    got = model.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), k
    # Memory-mapped: an unconverted parameter is a view of the file, not a copy.
    if os.path.exists("/proc/self/maps"):
        key = "videodit_blocks.layers.0.mlp.linear_fc1.weight"
        path = paths[0] if shards == 1 else os.path.join(weight_dir(cfg), index["weight_map"][key])
        ptr = got[key].data_ptr()
        assert any(lo <= ptr < hi for lo, hi in mapped_ranges(path))
    # Same weights, same velocity.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 6, 8, 8, generator=g)
    t = torch.tensor([[0.4]])
    cap = torch.randn(1, 1, 32, 64, generator=g)
    mask = torch.ones(1, 1, 32)
    kw = {"distill_dt": 4.0} if "distill" in name else {}
    torch.testing.assert_close(model(x, t, cap, mask, **kw), src(x, t, cap, mask, **kw), rtol=0, atol=0)


def test_load_with_dtype_override_keeps_promotion(tmp_path):
    cfg = MagiConfig.from_dict(small())
    src = build_dit(cfg, seed=1)
    save_checkpoint(src, str(tmp_path))
    model = load_dit(cfg, checkpoint_dir=str(tmp_path), dtype=torch.float32, progress=False)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.act_dtype == torch.float32


def _broken(tmp_path, edit):
    cfg = MagiConfig.from_dict(small())
    sd = dict(build_dit(cfg, seed=0).state_dict())
    edit(sd)
    save_checkpoint(sd, str(tmp_path), num_shards=2)
    with pytest.raises(CheckpointError) as ei:
        load_dit(cfg, checkpoint_dir=str(tmp_path), progress=False)
    return str(ei.value)


def test_missing_key_file(tmp_path):
    def edit(sd):
        for i in range(3):
            del sd[f"videodit_blocks.layers.{i}.self_attention.k_layernorm.bias"]
    msg = _broken(tmp_path, edit)
    assert "missing from the checkpoint (3)" in msg
    assert "videodit_blocks.layers.{0-2}.self_attention.k_layernorm.bias   (3 layers)" in msg


def test_unexpected_key_file(tmp_path):
    msg = _broken(tmp_path, lambda sd: sd.update({"videodit_blocks.layers.self_attention.linear_qkv.weight":
                                                  torch.zeros(3, 4)}))
    assert "unexpected in the checkpoint (1)" in msg and "MAGI-1.1 stacked layout" in msg


def test_misshaped_key_file(tmp_path):
    msg = _broken(tmp_path, lambda sd: sd.update({"final_linear.linear.weight": torch.zeros(32, 256)}))
    assert "final_linear.linear.weight: shape [32, 256] in checkpoint, model needs [64, 256]" in msg


def test_bad_directories(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint_files(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has neither model.safetensors.index.json nor model.safetensors"):
        checkpoint_files(str(tmp_path / "empty"))
    ck = tmp_path / "ck"
    save_checkpoint({"a": torch.zeros(2), "b": torch.zeros(2)}, str(ck), num_shards=2)
    os.remove(ck / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="shard 'model-00002-of-00002.safetensors' listed in weight_map is missing"):
        checkpoint_files(str(ck))
    cfg = MagiConfig.from_dict(small())  # tiny has no runtime_config.load
    with pytest.raises(CheckpointError, match="runtime_config.load: is not set"):
        load_dit(cfg)
