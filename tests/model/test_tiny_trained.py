"""The trained tiny model (``--preset tiny``, docs/tiny_model.md): the procedural data and its detector,
the training-only attention, the grammar text encoder, and an evaluation of the shipped weights on
generated frames (object colour and centroid track) for T2V, chunk-wise prompts, I2V and V2V."""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch

from magi_model import procedural as P
from magi_model import text as text_mod
from magi_model import vae as vae_mod
from magi_model.attention import range_attention, ranges_tensor
from magi_model.config import TRAINED_PRESETS, preset
from magi_model.train_tiny import dense_range_attention

PRESET = TRAINED_PRESETS[0]


# --------------------------------------------------------------------------------------------------
# Data and detector


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_procedural_captions_match_what_the_detector_sees(seed):
    """Every chunk's caption names the object's colour and the direction the detector measures."""
    rng = np.random.default_rng(seed)
    for _ in range(4):
        clip = P.make_clip(rng, num_chunks=3)
        assert clip.frames.shape == (72, 32, 32, 3) and clip.frames.dtype == np.uint8
        for c, (cap, d) in enumerate(zip(clip.captions, clip.directions)):
            assert f" {clip.spec.colour} " in cap and f"moves {d} " in cap
            det = P.detect(clip.frames[c * 24:(c + 1) * 24], clip.spec.background)
            assert det.colour == clip.spec.colour
            assert P.motion_direction(det.centroids) == d
            # The detected centroid is the true centre to within a fraction of a pixel.
            err = np.abs(det.centroids - clip.centres[c * 24:(c + 1) * 24]).max()
            assert err < 0.35, err
        assert set(" ".join(clip.captions).split()) <= set(P.vocabulary())


def test_procedural_refuses_a_direction_that_leaves_the_frame():
    spec = P.ObjectSpec("red", "circle", "big", "quickly", "black")
    with pytest.raises(ValueError, match="out of the frame"):
        P.make_clip(np.random.default_rng(0), num_chunks=4, spec=spec, directions=["right"] * 4)
    with pytest.raises(ValueError, match="'directions' needs one entry per chunk"):
        P.make_clip(np.random.default_rng(0), num_chunks=2, directions=["left"])


def test_detector_finds_nothing_on_a_plain_background():
    frames = np.broadcast_to(np.array(P.BACKGROUNDS["gray"], dtype=np.uint8), (8, 32, 32, 3)).copy()
    det = P.detect(frames)
    assert det.colour is None and np.isnan(det.centroids).all()
    assert P.motion_direction(det.centroids) is None


# --------------------------------------------------------------------------------------------------
# Training-only attention == the kernels' range attention


@pytest.mark.parametrize("batch,heads", [(1, (4, 4)), (3, (4, 2)), (2, (6, 1))])
def test_dense_range_attention_matches_range_attention(batch, heads):
    """Block-causal windows per batch element (as the DiT builds them), GQA, a row with no keys."""
    hq, hk = heads
    n, chunks, d = 5, 3, 8
    S = n * chunks
    q = torch.randn(batch * S, hq, d, dtype=torch.float64)
    k = torch.randn(batch * S, hk, d, dtype=torch.float64)
    v = torch.randn(batch * S, hk, d, dtype=torch.float64)
    qr, kr = [], []
    for b in range(batch):
        for j, window in enumerate([1, 2, 0]):
            lo = 0 if window == 0 else max(0, j + 1 - window)
            qr.append((b * S + j * n, b * S + (j + 1) * n - (1 if j == 2 else 0)))  # last row of each: no keys
            kr.append((b * S + lo * n, b * S + (j + 1) * n))
    qr, kr = ranges_tensor(qr, "cpu"), ranges_tensor(kr, "cpu")
    want = range_attention(q, k, v, qr, kr)
    got = dense_range_attention(q, k, v, qr, kr)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1])
def test_dense_range_attention_matches_on_unequal_groups(seed):
    """Cross-attention's layout: each chunk's queries see only its own caption segment, and the
    segments have different lengths (groups of unequal size, padded inside the dense attention)."""
    g = torch.Generator().manual_seed(seed)
    n, chunks, hq, hk, d = 6, 5, 4, 2, 8
    seg = torch.randint(1, 9, (chunks,), generator=g).tolist()
    ends = torch.tensor(seg).cumsum(0).tolist()
    q = torch.randn(n * chunks, hq, d, dtype=torch.float64, generator=g)
    k = torch.randn(ends[-1], hk, d, dtype=torch.float64, generator=g)
    v = torch.randn(ends[-1], hk, d, dtype=torch.float64, generator=g)
    qr = ranges_tensor([(j * n, (j + 1) * n) for j in range(chunks)], "cpu")
    kr = ranges_tensor(list(zip([0] + ends[:-1], ends)), "cpu")
    want = range_attention(q, k, v, qr, kr)
    got = dense_range_attention(q, k, v, qr, kr)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # Gradients flow to every input (the training backward goes through this function).
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    dense_range_attention(*leaves, qr, kr).square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in leaves)


# --------------------------------------------------------------------------------------------------
# Grammar text encoder


def test_grammar_encoder_interface_and_unknown_words():
    enc = text_mod.GrammarTextEncoder(P.vocabulary(), dim=16, max_length=20)
    emb, mask = enc("a small green square moves up slowly on a gray background")
    assert emb.shape == (20, 16) and mask.shape == (20,)
    assert mask.tolist() == [1.0] * 12 + [0.0] * 8  # 11 words + the end token
    assert torch.isfinite(emb).all() and (emb[12:] == 0).all()
    with pytest.raises(text_mod.TextError, match=r"unknown \['dog'\]"):
        enc("a red dog moves left")


# --------------------------------------------------------------------------------------------------
# Evaluation of the shipped weights


def _assets_present() -> bool:
    r = preset(PRESET).runtime
    return all(os.path.exists(p) for p in (r.load, r.vae_pretrained, r.t5_pretrained))


@functools.lru_cache(maxsize=1)
def _models():
    from magi_model.loading import load_dit

    cfg = preset(PRESET)
    r = cfg.runtime
    dit = load_dit(cfg, progress=False)
    vae = vae_mod.load_vae(r.vae_pretrained, dtype=torch.float32, tile_sample_min_length=r.fps // 2,
                           tile_sample_min_size=r.video_size_w)
    enc = text_mod.load_grammar_encoder(r.t5_pretrained)
    special = text_mod.load_special_tokens(text_mod.grammar_special_tokens_path(r.t5_pretrained))
    return cfg, dit, vae, enc, special


def _generate(prompts, seed, *, mode="t2v", image=None, prefix_frames=None):
    """uint8 frames (T, 32, 32, 3) of one generation with the shipped weights."""
    from magi_model import schedule
    from magi_model.pipeline import generate_latents

    cfg, dit, vae, enc, special = _models()
    r = cfg.runtime
    prefix = None
    if mode == "i2v":
        prefix = vae_mod.encode_image(vae, torch.from_numpy(image), r.scale_factor)
    elif mode == "v2v":
        prefix = vae_mod.encode_video(vae, torch.from_numpy(prefix_frames), r.scale_factor)
    layout = schedule.chunk_layout(r.num_frames, mode=mode,
                                   prefix_latent_frames=0 if prefix is None else prefix.shape[2],
                                   chunk_width=r.chunk_width, temporal_downsample_factor=r.temporal_downsample_factor)
    null, null_mask = dit.null_caption(layout.infer_chunk_num)
    caps = text_mod.build_captions([enc(p) for p in prompts], num_chunks=layout.infer_chunk_num,
                                   chunk_offset=layout.chunk_offset, null=null[0, 0], null_mask=null_mask[0, 0],
                                   special_tokens=special, flags=dict(text_mod.DEFAULT_FLAGS))
    lat = generate_latents(dit, cfg, caps, mode=mode, prefix_latent=prefix, seed=seed, progress=False)
    return vae_mod.decode_latents(vae, lat, r.scale_factor).numpy()


def needs_weights(test):
    """The evaluation of the shipped trained weights (marker ``trained_weights``: ``-m trained_weights``
    runs just these). Against a missing asset folder it fails, it never skips."""
    @functools.wraps(test)
    def run():
        assert _assets_present(), ("magi_model/assets/tiny/ holds no trained weights: "
                                   "train them with `python -m magi_model.train_tiny` first")
        test()
    return pytest.mark.trained_weights(run)
EVAL_CASES = [("red", "right", "black"), ("green", "left", "dark blue"), ("yellow", "down", "gray"),
              ("white", "up", "dark green"), ("blue", "right", "gray"), ("red", "up", "dark blue"),
              ("yellow", "left", "black"), ("green", "down", "gray"), ("white", "right", "dark blue"),
              ("blue", "left", "black")]


@needs_weights
def test_t2v_has_the_prompted_colour_and_direction_for_8_of_10_seeds():
    hits, report = 0, []
    for seed, (colour, direction, bg) in enumerate(EVAL_CASES):
        prompt = f"a big {colour} circle moves {direction} quickly on a {bg} background"
        frames = _generate([prompt], seed)
        det = P.detect(frames, bg)
        got = P.motion_direction(det.centroids)
        ok = det.colour == colour and got == direction
        hits += ok
        report.append(f"seed {seed}: want {colour}/{direction}, got {det.colour}/{got}")
    assert hits >= 8, "\n".join(report)


@needs_weights
def test_chunkwise_prompts_reverse_the_motion():
    p = "a big yellow square moves {} quickly on a black background"
    wins = 0
    for seed in range(3):
        frames = _generate([p.format("right"), p.format("left")], 100 + seed)
        first = P.motion_direction(P.detect(frames[:24], "black").centroids)
        second = P.motion_direction(P.detect(frames[24:48], "black").centroids)
        wins += (first, second) == ("right", "left")
    assert wins >= 2, wins


@needs_weights
def test_i2v_continues_the_given_first_frame():
    spec = P.ObjectSpec("green", "circle", "big", "quickly", "dark blue")
    start = np.array([9.0, 16.0])
    image = P.render_frame(spec, start, 32)
    frames = _generate([P.caption(spec, "right")], 7, mode="i2v", image=image)
    det = P.detect(frames[:24], "dark blue")
    assert det.colour == "green"
    c0 = det.centroids[:4][np.isfinite(det.centroids[:4]).all(axis=1)].mean(axis=0)
    assert np.abs(c0 - start).max() < 4.0, (c0, start)
    assert P.motion_direction(det.centroids) == "right"


@needs_weights
def test_v2v_continues_the_prefix_clip():
    spec = P.ObjectSpec("red", "square", "big", "slowly", "gray")
    # A 32-frame prefix moving down from near the top (room for the continuation to keep going).
    step = np.array(P.DIRECTIONS["down"]) * P.SPEEDS[spec.speed]
    centres = np.array([12.0, 8.0]) + np.arange(33)[:, None] * step
    prefix = np.stack([P.render_frame(spec, c, 32) for c in centres[:32]])
    frames = _generate([P.caption(spec, "down")], 11, mode="v2v", prefix_frames=prefix)
    det = P.detect(frames, "gray")
    assert det.colour == "red"
    # The continuation starts where the prefix ended (its frame 32) and keeps moving down.
    c0 = det.centroids[:4][np.isfinite(det.centroids[:4]).all(axis=1)].mean(axis=0)
    assert np.abs(c0 - centres[32]).max() < 4.0, (c0, centres[32])
    assert P.motion_direction(det.centroids[:16]) == "down"


# --------------------------------------------------------------------------------------------------
# The CLI's wiring of a trained preset (folder layout, fp32 VAE, grammar encoder, --frames_png)


def test_cli_trained_preset_without_weights_names_the_folder(tmp_path, monkeypatch, capsys):
    from magi_model import config, generate

    monkeypatch.setattr(config, "TINY_TRAINED_ASSETS", str(tmp_path / "missing"))
    argv = ["--preset", PRESET, "--prompt", "a big red circle moves left quickly on a black background",
            "--output_path", str(tmp_path / "o.mp4"), "--no_progress"]
    assert generate.main(argv) == 2
    err = capsys.readouterr().err
    assert "needs its trained weights in" in err and "missing" in err and "train_tiny" in err


def test_cli_runs_a_trained_preset_folder(tmp_path, monkeypatch, capsys):
    """Weights written by train_tiny's savers (untrained values) load and generate through the CLI."""
    from magi_model import config, generate
    from magi_model import train_tiny as TT
    from magi_model.config import MagiConfig
    from magi_model.dit import build_dit

    out = tmp_path / "assets"
    monkeypatch.setattr(config, "TINY_TRAINED_ASSETS", str(out))
    real = config.tiny_trained_dict

    def fewer_steps():
        d = real()
        d["runtime_config"]["num_steps"] = 4
        return d

    monkeypatch.setattr(config, "tiny_trained_dict", fewer_steps)
    cfg = MagiConfig.from_dict(fewer_steps())
    m = cfg.model
    dit = build_dit(cfg, seed=3)
    enc = text_mod.GrammarTextEncoder(P.vocabulary(), m.caption_channels, m.caption_max_length)
    params = list(dit.parameters()) + list(enc.parameters())
    TT.save_dit_and_text(cfg, dit, enc, params, params, str(out))
    TT.save_vae(vae_mod.build_vae(config.TINY_TRAINED_VAE, dtype=torch.float32, seed=4), str(out))
    TT.save_special_tokens(m.caption_channels, str(out))
    png = tmp_path / "strip.png"
    # An unknown word is refused (exit 2, the word named) before any model is built.
    assert generate.main(["--preset", PRESET, "--prompt", "a red fox", "--output_path",
                          str(tmp_path / "x.mp4"), "--no_progress"]) == 2
    assert "unknown ['fox']" in capsys.readouterr().err
    assert generate.main(["--preset", PRESET, "--prompt", "a small blue square moves up slowly on a gray background",
                          "--output_path", str(tmp_path / "o.mp4"), "--frames_png", str(png), "--no_progress"]) == 0
    import av

    with av.open(str(tmp_path / "o.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 48 and frames[0].shape == (32, 32, 3)
    with av.open(str(png)) as c:
        strip = next(c.decode(video=0)).to_ndarray(format="rgb24")
    assert strip.shape == (128, 8 * 128 + 7 * 2, 3)  # 8 frames (every 6th of 48), 4x, 2 px gaps


def test_gated_post_norm_backward_on_batched_rows_matches_float64():
    """Training runs the DiT with batch N > 1, where the post-norm op sees (N, S, H) inputs; its
    backward must treat them as N*S token rows (as the forward does)."""
    import magi_kernels as mk
    from magi_kernels.reference.gated_post_norm_residual import gated_post_norm_residual_ref

    N, S, H, G = 3, 5, 16, 6
    x, residual = torch.randn(N, S, H), torch.randn(N, S, H)
    gate, w, b = torch.randn(G, H), torch.randn(H) * 0.1, torch.randn(H) * 0.1
    gi = torch.randint(0, G, (N * S,), dtype=torch.int32)
    leaves = [t.requires_grad_() for t in (x, gate, residual, w, b)]
    out = mk.gated_post_norm_residual(x, gate, residual, w, b, gate_index=gi, preset="magi1", backend="torch")
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, go)
    d = [t.detach().double().requires_grad_() for t in leaves]
    ref = gated_post_norm_residual_ref(d[0].reshape(-1, H), d[1], d[2].reshape(-1, H), d[3], d[4], gi,
                                       norm="layernorm", weight_offset=1.0, compute_dtype=torch.float64)
    want = torch.autograd.grad(ref, d, go.double().reshape(-1, H))
    for got, ref_grad in zip(grads, want):
        torch.testing.assert_close(got.double(), ref_grad, rtol=1e-4, atol=1e-4)
