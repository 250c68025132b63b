"""Bad command-line input: every row is one mistake; each must exit 2 with one clear line naming the
argument (no traceback), BEFORE any model weight is built or read, within 5 s of starting."""

import json
import os
import resource
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from magi_model import generate
from magi_model.config import preset_dict

from ._layout import write_magi1_layout, write_special_tokens

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture
def no_weights(monkeypatch):
    """Make every way of building or loading model weights fail loudly: a row that gets that far has
    validated too late."""
    def forbidden(*args, **kwargs):
        raise AssertionError("model weights were built or loaded before the bad input was reported")

    import magi_model.dit
    import magi_model.loading
    import magi_model.text
    import magi_model.vae
    for mod, name in ((magi_model.dit, "build_dit"), (magi_model.loading, "load_dit"), (magi_model.vae, "load_vae"),
                      (magi_model.vae, "tiny_vae"), (magi_model.text, "T5TextEncoder")):
        monkeypatch.setattr(mod, name, forbidden)


def _config_file(tmp_path, section="runtime_config", **fields):
    d = preset_dict("tiny_distill")
    d[section].update(fields)
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(d))
    return str(p)


def _corrupt_checkpoint(tmp_path):
    """A config pointing at MAGI-1-layout folders whose DiT weights file is garbage."""
    d = preset_dict("tiny_distill")
    d["runtime_config"].update(load=str(tmp_path / "dit"), vae_pretrained=str(tmp_path / "vae"),
                               t5_pretrained=str(tmp_path / "t5"))
    wdir = tmp_path / "dit" / "inference_weight.distill"
    wdir.mkdir(parents=True)
    (wdir / "model.safetensors").write_bytes(b"\xff" * 64)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "ViTVAE", "ddconfig": {}}))
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 16)
    write_special_tokens(tmp_path / "tokens.npz")
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(d))
    return str(p)


def _non_tensor_file(tmp_path):
    p = tmp_path / "emb.pt"
    torch.save({"embeddings": "not a tensor", "note": [1, 2]}, p)
    return str(p)


def _pickle_file(tmp_path):
    import pickle
    p = tmp_path / "emb.pt"
    with open(p, "wb") as f:
        pickle.dump({"embeddings": {1, 2, 3}}, f, protocol=2)
    return str(p)


def _directory(tmp_path, name):
    (tmp_path / name).mkdir()
    return str(tmp_path / name)


def _too_many_embeddings(tmp_path):
    p = tmp_path / "emb.safetensors"
    save_file({"embeddings": torch.zeros(5, 3, 4096)}, str(p))
    return str(p)


# (id, argv overrides -- callables get tmp_path --, message fragment)
ROWS = [
    ("device bogus", {"--device": "bogus"}, "error: device: 'bogus' is not a torch device"),
    ("device cuda:99", {"--device": "cuda:99"}, "error: device: 'cuda:99' requested but"),
    ("output in /proc", {"--output_path": "/proc/x.mp4"}, "error: output_path: cannot write '/proc/x.mp4'"),
    ("output is a directory", {"--output_path": lambda t: _directory(t, "d.mp4")},
     "is an existing directory, expected a file name"),
    ("output not mp4", {"--output_path": "out.avi"}, "output_path: must end in .mp4"),
    ("fps 0", {"--preset": None, "--config_file": lambda t: _config_file(t, fps=0)}, "runtime_config.fps must be >= 1"),
    ("fps 10", {"--preset": None, "--config_file": lambda t: _config_file(t, fps=10)},
     "runtime_config.fps // 2 (the VAE's temporal tile) must be a positive multiple"),
    ("epsilon string", {"--preset": None, "--config_file": lambda t: _config_file(t, "model_config", layernorm_epsilon="1e-6")},
     "model_config.layernorm_epsilon must be a number, got '1e-6'"),
    ("scale_factor string", {"--preset": None, "--config_file": lambda t: _config_file(t, scale_factor="0.18")},
     "runtime_config.scale_factor must be a number"),
    ("config missing", {"--preset": None, "--config_file": "/nonexistent/cfg.json"}, "does not exist"),
    ("seed out of range", {"--seed": str(2 ** 70)}, "seed: must be in"),
    ("embeddings not tensors", {"--prompt": None, "--text_embeddings": _non_tensor_file},
     "must hold a tensor named 'embeddings'"),
    ("embeddings pickle", {"--prompt": None, "--text_embeddings": _pickle_file}, "text_embeddings: cannot read"),
    ("embeddings is a directory", {"--prompt": None, "--text_embeddings": lambda t: _directory(t, "e")},
     "text_embeddings: '"),
    ("embeddings and prompt", {"--text_embeddings": _too_many_embeddings}, "give --prompt or --text_embeddings, not both"),
    ("too many embeddings", {"--prompt": None, "--text_embeddings": _too_many_embeddings},
     "--text_embeddings holds 5 chunk-wise prompts but the video has only 2"),
    ("image is a directory", {"--mode": "i2v", "--image_path": lambda t: _directory(t, "img")}, "is a directory"),
    ("image not an image", {"--mode": "i2v", "--image_path": lambda t: _config_file(t)}, "image_path: cannot decode"),
    ("special tokens missing", {"SPECIAL_TOKEN_PATH": "/nonexistent/tokens.npz"},
     "special tokens: '/nonexistent/tokens.npz' does not exist"),
    ("corrupt DiT checkpoint", {"--preset": None, "--config_file": _corrupt_checkpoint},
     "model.safetensors: not a readable safetensors file"),
]
if not HAS_CUDA:
    ROWS.append(("device cuda", {"--device": "cuda"}, "error: device: 'cuda' requested but"))


def _argv(tmp_path, overrides):
    base = {"--preset": "tiny_distill", "--mode": "t2v", "--prompt": "p", "--output_path": str(tmp_path / "o.mp4")}
    base.update({k: (v(tmp_path) if callable(v) else v) for k, v in overrides.items()})
    argv = ["--no_progress"]
    for k, v in base.items():
        if v is not None:
            argv += [k, v]
    return argv


@pytest.mark.parametrize("overrides, message", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_fails_fast_before_weights(overrides, message, tmp_path, capsys, monkeypatch, no_weights):
    monkeypatch.delenv("SPECIAL_TOKEN_PATH", raising=False)
    monkeypatch.chdir(tmp_path)
    overrides = dict(overrides)
    if "SPECIAL_TOKEN_PATH" in overrides:
        monkeypatch.setenv("SPECIAL_TOKEN_PATH", overrides.pop("SPECIAL_TOKEN_PATH"))
    argv = _argv(tmp_path, overrides)
    if (tmp_path / "tokens.npz").exists():  # written by the rows that stand in MAGI-1's folders
        monkeypatch.setenv("SPECIAL_TOKEN_PATH", str(tmp_path / "tokens.npz"))
    t0 = time.perf_counter()
    code = generate.main(argv)
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3
    assert elapsed < 5.0


def test_output_path_check_leaves_no_file(tmp_path, no_weights):
    out = tmp_path / "new.mp4"
    # A valid run that stops at the first weight load: the writability probe must not leave a file.
    with pytest.raises(AssertionError, match="weights were built"):
        generate.main(["--preset", "tiny_distill", "--prompt", "p", "--output_path", str(out), "--no_progress"])
    assert not out.exists()


def test_check_weights_names_tensor_and_file(tmp_path, monkeypatch, capsys):
    """--check_weights on a MAGI-1-layout checkpoint holding one NaN: a one-line error naming both."""
    from magi_model import build_dit
    from magi_model.config import MagiConfig

    d = preset_dict("tiny_distill")
    d["runtime_config"].update(video_size_h=32, video_size_w=32, num_frames=24, num_steps=4)
    cfg = MagiConfig.from_dict(d)
    sd = build_dit(cfg, seed=5).state_dict()
    key = "final_linear.linear.weight"
    assert key in sd
    sd[key].view(-1)[0] = float("inf")
    cfg_path = write_magi1_layout(tmp_path, d, sd)
    monkeypatch.setenv("SPECIAL_TOKEN_PATH", write_special_tokens(tmp_path / "tokens.npz"))
    save_file({"embeddings": torch.zeros(1, 4, 4096)}, str(tmp_path / "emb.safetensors"))
    argv = ["--config_file", cfg_path, "--text_embeddings", str(tmp_path / "emb.safetensors"),
            "--output_path", str(tmp_path / "o.mp4"), "--no_progress", "--check_weights"]
    assert generate.main(argv) == 2
    err = capsys.readouterr().err
    assert f"tensor {key!r} holds NaN or inf" in err
    assert str(tmp_path / "dit" / cfg.weight_subdir / "model.safetensors") in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--device", "bogus"], "device: 'bogus' is not a torch device"),
    (["--output_path", "/proc/x.mp4"], "output_path: cannot write"),
])
def test_subprocess_fails_within_5_seconds(args, message, tmp_path):
    """The real command line, timed: the child's CPU time (interpreter and torch start-up included)
    stays under 5 s. CPU time rather than wall time, because on a shared 2-core machine the wall
    clock mostly measures the other jobs; on an idle machine the two agree."""
    argv = {"--preset": "tiny_random", "--prompt": "x", "--output_path": str(tmp_path / "o.mp4")}
    for k, v in zip(args[::2], args[1::2]):
        argv[k] = v
    cmd = [sys.executable, "-m", "magi_model.generate", "--no_progress"] + [x for kv in argv.items() for x in kv]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert cpu < 5.0, f"{cpu:.1f} s CPU ({wall:.1f} s wall)"
