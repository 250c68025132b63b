"""Bad input to magi_model's config, device, checkpoint and text-embedding readers: each row is one
mistake a user can make, and each must give a clear error naming the argument / field / file (no
TypeError from deep inside, no raw SafetensorError, no unpickling of arbitrary objects)."""

import json
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from magi_model import build_dit
from magi_model import loading as LD
from magi_model import text as TX
from magi_model import vae as V
from magi_model.config import ConfigError, MagiConfig, preset_dict
from magi_model.device import DeviceError, resolve_device

HAS_CUDA = torch.cuda.is_available()

# --------------------------------------------------------------------------------------------------
# Config fields: (section, field, bad value, message fragment)

CONFIG_ROWS = [
    ("model_config", "layernorm_epsilon", "1e-6", "model_config.layernorm_epsilon must be a number, got '1e-6'"),
    ("model_config", "x_rescale_factor", "0.1", "model_config.x_rescale_factor must be a number"),
    ("runtime_config", "scale_factor", "0.18", "runtime_config.scale_factor must be a number"),
    ("model_config", "num_layers", "4", "model_config.num_layers must be an integer"),
    ("model_config", "num_layers", 2.5, "model_config.num_layers must be an integer"),
    ("model_config", "num_layers", True, "model_config.num_layers must be an integer"),
    ("model_config", "hidden_size", None, "model_config.hidden_size must be set, got null"),
    ("model_config", "apply_layernorm_1p", "true", "model_config.apply_layernorm_1p must be true or false"),
    ("model_config", "params_dtype", "bf16", "model_config.params_dtype must be one of"),
    ("model_config", "layernorm_epsilon", float("nan"), "model_config.layernorm_epsilon must be finite"),
    ("model_config", "layernorm_epsilon", 0, "model_config.layernorm_epsilon must be > 0"),
    ("model_config", "x_rescale_factor", 0, "model_config.x_rescale_factor must be non-zero"),
    ("model_config", "cond_hidden_ratio", -0.25, "model_config.cond_hidden_ratio must be > 0"),
    ("model_config", "model_name", 7, "model_config.model_name must be a string"),
    ("runtime_config", "fps", 0, "runtime_config.fps must be >= 1"),
    ("runtime_config", "fps", "24", "runtime_config.fps must be an integer"),
    ("runtime_config", "scale_factor", 0, "runtime_config.scale_factor must be > 0"),
    ("runtime_config", "num_steps", None, "runtime_config.num_steps must be set, got null"),
    ("runtime_config", "cfg_t_range", "0,0.1", "runtime_config.cfg_t_range must be a list"),
    ("runtime_config", "text_scales", [7.5, "x", 7.5, 0, 0], "runtime_config.text_scales[1] must be a number"),
    ("runtime_config", "noise2clean_kvrange", [5, 4.5, 3, 2], "runtime_config.noise2clean_kvrange[1] must be an int"),
    ("runtime_config", "noise2clean_kvrange", [5, -1, 3, 2], "runtime_config.noise2clean_kvrange entries must be >= 0"),
    ("runtime_config", "cfg_t_range", [0, 0.1, 0.3, 0.9, 1.5], "runtime_config.cfg_t_range entries must be in [0, 1]"),
    ("runtime_config", "clean_t", 2.0, "runtime_config.clean_t must be in [0, 1]"),
    ("runtime_config", "seed", 2 ** 70, "runtime_config.seed must be in"),
    ("runtime_config", "t5_device", "gpu", "runtime_config.t5_device must be a torch device"),
    ("runtime_config", "load", 5, "runtime_config.load must be a string"),
    ("runtime_config", "video_size_h", 100, "runtime_config.video_size_h must be a positive multiple of 16"),
    ("engine_config", "cp_size", 0, "engine_config.cp_size must be >= 1"),
    ("engine_config", "fp8_quant", 1, "engine_config.fp8_quant must be true or false"),
    ("engine_config", "distill_nearly_clean_chunk_threshold", 1.5,
     "engine_config.distill_nearly_clean_chunk_threshold must be in [0, 1]"),
]


@pytest.mark.parametrize("section, field, value, message", CONFIG_ROWS,
                         ids=[f"{r[1]}={r[2]!r}" for r in CONFIG_ROWS])
def test_bad_config_field(section, field, value, message, tmp_path):
    d = preset_dict("tiny_random")
    d[section][field] = value
    with pytest.raises(ConfigError) as e:
        MagiConfig.from_dict(d)
    assert message in str(e.value)
    # The same through a JSON file (what the CLI reads); NaN goes through json as NaN.
    p = tmp_path / "c.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="in " + str(p)):
        MagiConfig.from_json(p)


def test_integral_floats_are_accepted_as_integers():
    d = preset_dict("tiny_random")
    d["runtime_config"]["fps"] = 24.0  # JSON writers may emit 24.0
    assert MagiConfig.from_dict(d).runtime.fps == 24


# --------------------------------------------------------------------------------------------------
# Devices


DEVICE_ROWS = [
    ("bogus", "device: 'bogus' is not a torch device"),
    ("cuda:99", "cuda"),
    ("meta", "'meta' holds no data"),
    ("xla", "device type 'xla' is not supported"),
]
if not HAS_CUDA:
    DEVICE_ROWS.append(("cuda", "device: 'cuda' requested but"))


@pytest.mark.parametrize("device, message", DEVICE_ROWS, ids=[r[0] for r in DEVICE_ROWS])
def test_bad_device(device, message):
    with pytest.raises(DeviceError, match=message.replace("(", r"\(")):
        resolve_device(device)


@pytest.mark.skipif(HAS_CUDA, reason="checks the message for a machine without CUDA")
def test_build_dit_on_cuda_without_cuda():
    with pytest.raises(DeviceError, match="device: 'cuda' requested but"):
        build_dit("preset:tiny_random", device="cuda")
    with pytest.raises(DeviceError, match="device: 'cuda' requested but"):
        V.build_vae(V.TINY_DDCONFIG, device="cuda")


def test_good_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if HAS_CUDA else "cpu")
    assert resolve_device("meta", allow_meta=True).type == "meta"


# --------------------------------------------------------------------------------------------------
# Checkpoint files: corrupt safetensors name the file; NaN/inf found on request


def _tiny_checkpoint(tmp_path, cfg):
    d = tmp_path / "ckpt"
    LD.save_checkpoint(build_dit(cfg, seed=1), str(d))
    return d, d / LD.SINGLE_FILE


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _random_bytes(path):
    path.write_bytes(np.random.default_rng(0).bytes(4096))


def _huge_header(path):
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")


def _empty(path):
    path.write_bytes(b"")


CORRUPTIONS = [_truncate, _random_bytes, _huge_header, _empty]


@pytest.fixture(scope="module")
def tiny_cfg():
    d = preset_dict("tiny_random")  # smaller still: only the file handling is under test
    d["model_config"].update(num_layers=3, caption_channels=32, caption_max_length=16, ffn_hidden_size=256)
    return MagiConfig.from_dict(d)


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=[c.__name__.strip("_") for c in CORRUPTIONS])
def test_corrupt_dit_checkpoint_names_the_file(corrupt, tmp_path, tiny_cfg):
    d, f = _tiny_checkpoint(tmp_path, tiny_cfg)
    corrupt(f)
    with pytest.raises(LD.CheckpointError) as e:
        LD.load_dit(tiny_cfg, checkpoint_dir=str(d), progress=False)
    assert str(f) in str(e.value)


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=[c.__name__.strip("_") for c in CORRUPTIONS])
def test_corrupt_vae_checkpoint_names_the_file(corrupt, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "ViTVAE", "ddconfig": V.TINY_DDCONFIG}))
    f = tmp_path / V.WEIGHTS_FILE
    save_file(V.tiny_vae(0).state_dict(), str(f))
    corrupt(f)
    with pytest.raises(V.VAEError) as e:
        V.load_vae(str(tmp_path))
    assert str(f) in str(e.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_check_finite_names_key_and_file(bad, tmp_path, tiny_cfg):
    model = build_dit(tiny_cfg, seed=1)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    key = "videodit_blocks.layers.2.mlp.linear_fc1.weight"
    assert key in sd
    sd[key].view(-1)[17] = bad
    d = tmp_path / "ckpt"
    LD.save_checkpoint(sd, str(d), num_shards=2)
    # Default: a NaN checkpoint loads (scanning costs a pass over the weights); on request it is refused.
    assert LD.load_dit(tiny_cfg, checkpoint_dir=str(d), progress=False) is not None
    with pytest.raises(LD.CheckpointError) as e:
        LD.load_dit(tiny_cfg, checkpoint_dir=str(d), progress=False, check_finite=True)
    shard = json.loads((d / LD.INDEX_FILE).read_text())["weight_map"][key]
    assert f"tensor {key!r} holds NaN or inf" in str(e.value) and str(d / shard) in str(e.value)


def test_vae_check_finite(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "ViTVAE", "ddconfig": V.TINY_DDCONFIG}))
    sd = {k: v.clone() for k, v in V.tiny_vae(0).state_dict().items()}
    sd["decoder.norm.bias"][3] = float("nan")
    save_file(sd, str(tmp_path / V.WEIGHTS_FILE))
    with pytest.raises(LD.CheckpointError, match="'decoder.norm.bias' holds NaN or inf"):
        V.load_vae(str(tmp_path), check_finite=True)


# --------------------------------------------------------------------------------------------------
# Text embeddings: only tensors, never arbitrary objects


class _Payload:
    """Unpickling this would create a file: proof that a loader unpickled an arbitrary object."""

    marker = None

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_with_code(path):
    _Payload.marker = str(path) + ".pwned"
    with open(path, "wb") as f:
        pickle.dump({"embeddings": _Payload()}, f, protocol=2)


def _torch_save_object(path):
    torch.save({"embeddings": {"not": "a tensor"}, "extra": _Payload.__name__}, path)


def _text_file(path):
    path.write_text("a red fox\n")


def _npz_object_array(path):
    np.savez(open(path, "wb"), embeddings=np.array([{"a": 1}], dtype=object))


def _safetensors_garbage(path):
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")


def _int_embeddings(path):
    torch.save({"embeddings": torch.ones(1, 4, 64, dtype=torch.int64)}, path)


def _nan_embeddings(path):
    e = torch.zeros(1, 4, 64)
    e[0, 1, 2] = float("nan")
    torch.save({"embeddings": e}, path)


def _wrong_width(path):
    torch.save({"embeddings": torch.zeros(1, 4, 32)}, path)


def _bad_mask(path):
    torch.save({"embeddings": torch.zeros(1, 4, 64), "mask": torch.full((1, 4), 0.5)}, path)


TEXT_ROWS = [
    (_pickle_with_code, "x.pt", "text_embeddings: cannot read"),
    (_torch_save_object, "x.pt", "must hold a tensor named 'embeddings'"),
    (_text_file, "x.pt", "text_embeddings: cannot read"),
    (_npz_object_array, "x.npz", "text_embeddings: cannot read"),
    (_safetensors_garbage, "x.safetensors", "text_embeddings: cannot read"),
    (_int_embeddings, "x.pt", "must be floating point"),
    (_nan_embeddings, "x.pt", "holds NaN or inf"),
    (_wrong_width, "x.pt", r"must be \(P, L, 64\)"),
    (_bad_mask, "x.pt", "must hold only 0 and 1"),
]


@pytest.mark.parametrize("make, name, message", TEXT_ROWS, ids=[r[0].__name__.strip("_") for r in TEXT_ROWS])
def test_bad_text_embeddings(make, name, message, tmp_path):
    path = tmp_path / name
    make(path)
    with pytest.raises(TX.TextError, match=message):
        TX.load_text_embeddings(str(path), dim=64, max_length=8)
    assert not os.path.exists(str(path) + ".pwned")  # nothing was unpickled


def test_good_text_embeddings_all_formats(tmp_path):
    e = torch.randn(2, 5, 64)
    m = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    torch.save({"embeddings": e, "mask": m}, tmp_path / "a.pt")
    save_file({"embeddings": e, "mask": m}, str(tmp_path / "a.safetensors"))
    np.savez(tmp_path / "a.npz", embeddings=e.numpy(), mask=m.numpy())
    for name in ("a.pt", "a.safetensors", "a.npz"):
        got = TX.load_text_embeddings(str(tmp_path / name), dim=64, max_length=8)
        assert len(got) == 2 and got[0][0].shape == (8, 64)
        assert torch.equal(got[1][0][:5], e[1]) and torch.equal(got[0][1], torch.tensor([1., 1, 1, 0, 0, 0, 0, 0]))
