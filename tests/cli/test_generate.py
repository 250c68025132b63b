"""`python -m magi_model.generate` end to end on the tiny preset (random weights, CPU, no downloads):
T2V / I2V / V2V write playable H.264 mp4s with the frame counts of docs/magi1.md#i2v-and-v2v; bad inputs fail clearly."""

import json
import os
import subprocess
import sys

import pytest
import torch

import av  # a core dependency: the CLI writes mp4 with PyAV

from magi_model import generate  # noqa: E402
from magi_model.config import preset_dict  # noqa: E402
from magi_model.schedule import chunk_layout  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read_back(path):
    with av.open(path) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264" and s.codec_context.pix_fmt == "yuv420p"
        rate = s.average_rate
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    return frames, rate


@pytest.fixture(scope="module")
def t2v_video(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cli") / "t2v.mp4")
    # A real subprocess once: the documented command line, with nothing but the repo on the path.
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "magi_model.generate", "--preset", "tiny_random", "--mode", "t2v",
                        "--prompt", "a red ball", "--output_path", out, "--no_progress"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "RANDOM weights" in r.stderr
    return out


def test_t2v(t2v_video):
    frames, rate = read_back(t2v_video)
    r = preset_dict("tiny_random")["runtime_config"]
    assert len(frames) == chunk_layout(r["num_frames"]).output_frames == 48
    assert frames[0].shape == (r["video_size_h"], r["video_size_w"], 3) and rate == r["fps"]


def test_i2v(t2v_video, tmp_path):
    img = str(tmp_path / "first.png")
    frames, _ = read_back(t2v_video)
    with av.open(img, "w") as c:  # a PNG of another size: stretched to the video size
        s = c.add_stream("png")
        s.width, s.height, s.pix_fmt = 96, 64, "rgb24"
        for p in s.encode(av.VideoFrame.from_ndarray(frames[5][:64, :96].copy(), format="rgb24")):
            c.mux(p)
    out = str(tmp_path / "i2v.mp4")
    assert generate.main(["--preset", "tiny_distill", "--mode", "i2v", "--prompt", "go", "--image_path", img,
                          "--output_path", out, "--no_progress"]) == 0
    got, _ = read_back(out)
    assert len(got) == chunk_layout(48, mode="i2v").output_frames == 72  # the image latent is output too


def test_v2v_chunkwise_prompts(t2v_video, tmp_path):
    out = str(tmp_path / "v2v.mp4")
    assert generate.main(["--preset", "tiny_distill", "--mode", "v2v", "--prompt", "first", "--prompt", "then",
                          "--prefix_video_path", t2v_video, "--output_path", out, "--no_progress"]) == 0
    got, _ = read_back(out)
    # 32 prefix frames -> 8 latents; ceil((12 + 8) / 6) = 4 chunks, the 8 prefix latents are not output.
    assert len(got) == chunk_layout(48, mode="v2v", prefix_latent_frames=8).output_frames == 64


@pytest.mark.parametrize("args, message", [
    (["--mode", "i2v"], "image_path: --mode i2v needs --image_path"),
    (["--mode", "v2v"], "prefix_video_path: --mode v2v needs --prefix_video_path"),
    (["--mode", "t2v", "--image_path", "x.png"], "image_path: only used with --mode i2v"),
    (["--mode", "i2v", "--image_path", "/nonexistent.png"], "image_path: '/nonexistent.png' does not exist"),
    (["--output_path", "out.avi"], "output_path: must end in .mp4"),
    (["--output_path", "{tmp}/a_file/out.mp4"], "output_path: cannot create folder"),
    (["--prompt", "a", "--prompt", "b", "--prompt", "c"], "got 3 chunk-wise prompts but the video has only 2"),
])
def test_bad_arguments(args, message, capsys, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    args = [x.replace("{tmp}", str(tmp_path)) for x in args]
    base = {"--mode": "t2v", "--prompt": "p", "--output_path": str(tmp_path / "o.mp4")}
    argv = ["--preset", "tiny_distill", "--no_progress"]
    for k, v in base.items():
        if k not in args:
            argv += [k, v]
    assert generate.main(argv + args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_output_folder_is_created(tmp_path):
    out = tmp_path / "new" / "sub" / "t2v.mp4"
    assert generate.main(["--preset", "tiny_distill", "--no_progress", "--mode", "t2v", "--prompt", "p",
                          "--output_path", str(out)]) == 0
    assert out.stat().st_size > 0


def test_bad_config_file(tmp_path, capsys):
    d = preset_dict("tiny_random")
    d["runtime_config"]["video_size_h"] = 100  # not a multiple of 16
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(d))
    assert generate.main(["--config_file", str(p), "--prompt", "x", "--output_path", str(tmp_path / "o.mp4")]) == 2
    assert "video_size_h must be a positive multiple of 16" in capsys.readouterr().err
    d = preset_dict("tiny_random")
    d["runtime_config"]["load"] = str(tmp_path / "nowhere")
    d["runtime_config"]["vae_pretrained"] = str(tmp_path / "vae")
    p.write_text(json.dumps(d))
    assert generate.main(["--config_file", str(p), "--prompt", "x", "--output_path", str(tmp_path / "o.mp4")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_config_file_with_checkpoint_vae_embeddings_and_special_tokens(tmp_path, monkeypatch):
    """The non-preset path: MAGI-1-layout DiT weights (runtime_config.load), a ViTVAE folder,
    precomputed text features and a special_tokens.npz -- all local, as MAGI-1's folders."""
    from safetensors.torch import save_file

    from magi_model import build_dit
    from magi_model.config import MagiConfig

    from ._layout import write_magi1_layout, write_special_tokens

    d = preset_dict("tiny_distill")
    d["runtime_config"].update(video_size_h=32, video_size_w=48, num_frames=24, num_steps=4)
    cfg_path = write_magi1_layout(tmp_path, d, build_dit(MagiConfig.from_dict(d), seed=5))
    monkeypatch.setenv("SPECIAL_TOKEN_PATH", write_special_tokens(tmp_path / "special_tokens.npz"))
    emb = torch.randn(1, 7, 4096, generator=torch.Generator().manual_seed(0)) * 0.1
    save_file({"embeddings": emb}, str(tmp_path / "emb.safetensors"))
    out = str(tmp_path / "out.mp4")
    assert generate.main(["--config_file", cfg_path, "--mode", "t2v", "--text_embeddings",
                          str(tmp_path / "emb.safetensors"), "--output_path", out, "--no_progress"]) == 0
    frames, rate = read_back(out)
    assert len(frames) == 24 and frames[0].shape == (32, 48, 3) and rate == 24



def test_read_video_resamples_to_fps_and_stretches(tmp_path):
    """A 48 fps source read at 24 fps keeps every other frame (nearest in time); frames are stretched."""
    import numpy as np

    path = str(tmp_path / "src.mp4")
    with av.open(path, "w") as c:
        s = c.add_stream("libx264", rate=48)
        s.width, s.height, s.pix_fmt = 64, 32, "yuv420p"
        for i in range(20):
            img = np.full((32, 64, 3), 10 * i, dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    got = generate.read_video(path, 16, 48, fps=24, max_frames=8)
    assert got.shape == (8, 48, 16, 3) and got.dtype == torch.uint8
    levels = got.float().mean(dim=(1, 2, 3))
    torch.testing.assert_close(levels, torch.arange(0, 160, 20).float(), atol=3, rtol=0)
