"""MAGI-1 video generation CLI (docs/magi1.md#command-line), accepting MAGI-1's config.json files unchanged.

    python -m magi_model.generate --config_file example/4.5B/4.5B_base_config.json --mode t2v \
        --prompt "Good Boy" --output_path out.mp4
    python -m magi_model.generate --preset tiny --mode t2v \
        --prompt "a big red circle moves right quickly on a black background" --output_path tiny.mp4

``--preset tiny`` runs a small model trained on procedural videos of one moving object, its weights
shipped in the package (docs/tiny_model.md); its prompts use the procedural captions' words only.
``tiny_random`` (also ``tiny_distill``, ``tiny_distill_quant``) runs the whole pipeline on seeded
RANDOM weights (DiT, VAE and a hashing stand-in for T5): no downloads, any prompt, and a video of
structured noise -- it demonstrates the machinery, not the model.

Repeat ``--prompt`` for chunk-wise prompting (prompt i conditions chunk i of 24 frames; the last
one continues). ``--text_embeddings FILE`` replaces T5 with precomputed features.
``--prompts_file FILE`` generates several videos (requests), one per line, each as a separate run
with the same seed would, written to ``<output>_<i>.mp4``. Under torchrun with ``pp_size > 1`` the
requests go through the pipeline stages interleaved so that no stage idles
(docs/distributed.md#several-requests).
Environment variables as MAGI-1: SPECIAL_TOKEN_PATH, PAD_* / NEG_PROMPT (special tokens; PAD_HQ and
PAD_DURATION default to on as in MAGI-1's run.sh), prev_chunks_scale (distill blend, 0.7).
Chunks are decoded and appended to the mp4 (H.264, yuv420p, fps from the config) as they finish.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Optional, Sequence

import torch

from magi_model import schedule
from magi_model.config import PRESETS, SEED_END, SEED_MIN, TRAINED_PRESETS, ConfigError, MagiConfig, load_config, preset
from magi_model.device import DeviceError, resolve_device

PREFIX_VIDEO_FRAMES = 32  # V2V uses the first 32 frames of the prefix video (docs/magi1.md#i2v-and-v2v)


class CLIError(ValueError):
    """Bad command-line input; the message names the argument and the rule."""


# --------------------------------------------------------------------------------------------------
# Video I/O (PyAV: pip-installable, bundles FFmpeg with libx264)


def _av():
    try:
        import av
    except ImportError:
        raise CLIError("output_path: writing mp4 needs PyAV ('pip install av')") from None
    return av


class Mp4Writer:
    """Appends uint8 (T, H, W, 3) frames to an H.264 / yuv420p mp4 as they arrive."""

    def __init__(self, path: str, width: int, height: int, fps: int):
        av = _av()
        self.container = av.open(path, mode="w")
        self.stream = self.container.add_stream("libx264", rate=int(fps))
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        self.frames = 0

    def write(self, frames: torch.Tensor) -> None:
        av = _av()
        for f in frames.cpu().numpy():
            for packet in self.stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                self.container.mux(packet)
            self.frames += 1

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


def _scaled_rgb(frame, width: int, height: int) -> torch.Tensor:
    # ffmpeg's "scale=WxH" (stretch, bicubic by default) as MAGI-1's loaders use it.
    return torch.from_numpy(frame.reformat(width=width, height=height, format="rgb24",
                                           interpolation="BICUBIC").to_ndarray())


def read_image(path: str, width: int, height: int) -> torch.Tensor:
    """uint8 (H, W, 3): the first frame of an image file, stretched to W x H."""
    av = _av()
    try:
        with av.open(path) as c:
            for frame in c.decode(video=0):
                return _scaled_rgb(frame, width, height)
    except av.error.FFmpegError as e:
        raise CLIError(f"image_path: cannot decode {path!r} as an image ({e})") from None
    raise CLIError(f"image_path: {path!r} holds no image")


def read_video(path: str, width: int, height: int, fps: int, max_frames: int) -> torch.Tensor:
    """uint8 (T, H, W, 3): the first ``max_frames`` frames resampled to ``fps`` (for each output tick
    the decoded frame nearest in time, as ffmpeg's fps filter) and stretched to W x H."""
    av = _av()
    times: list[float] = []
    frames: list[torch.Tensor] = []
    try:
        with av.open(path) as c:
            stream = c.streams.video[0]
            for frame in c.decode(stream):
                ts = float(frame.time) if frame.time is not None else len(frames) / fps
                times.append(ts)
                frames.append(_scaled_rgb(frame, width, height))
                if ts - times[0] > (max_frames + 1) / fps:  # enough to cover every tick
                    break
    except av.error.FFmpegError as e:
        raise CLIError(f"prefix_video_path: cannot decode {path!r} as a video ({e})") from None
    if not frames:
        raise CLIError(f"prefix_video_path: {path!r} holds no video frames")
    rel = torch.tensor(times, dtype=torch.float64) - times[0]
    n_out = min(max_frames, int(float(rel[-1]) * fps + 0.5) + 1)
    picks = [int(torch.argmin((rel - i / fps).abs())) for i in range(n_out)]
    return torch.stack([frames[i] for i in picks])


def write_frame_strip(path: str, frames: torch.Tensor, *, every: int = 6, scale: int = 4) -> None:
    """A PNG of every ``every``-th frame of uint8 (T, H, W, 3) side by side, each upscaled ``scale`` x
    (nearest), with a 2 px gap -- the README's picture of a demo video."""
    av = _av()
    picked = frames[::every]
    big = picked.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)  # (n, sH, sW, 3)
    n, H, W, _ = big.shape
    gap = 2
    canvas = torch.full((H, n * W + (n - 1) * gap, 3), 255, dtype=torch.uint8)
    for i in range(n):
        canvas[:, i * (W + gap):i * (W + gap) + W] = big[i]
    with av.open(path, mode="w", format="image2") as c:
        stream = c.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = canvas.shape[1], canvas.shape[0], "rgb24"
        for packet in stream.encode(av.VideoFrame.from_ndarray(canvas.numpy(), format="rgb24")):
            c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)


# --------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m magi_model.generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config_file", help="MAGI-1 config.json (used unchanged)")
    src.add_argument("--preset", choices=[n for n in PRESETS if n.startswith("tiny")],
                     help="demo configuration, no downloads: " + ", ".join(TRAINED_PRESETS) + " is the small "
                     "trained model (docs/tiny_model.md; needs its weights), the others use random weights")
    p.add_argument("--mode", choices=("t2v", "i2v", "v2v"), default="t2v")
    p.add_argument("--prompt", action="append", help="text prompt; repeat for chunk-wise prompts (one per 24 frames)")
    p.add_argument("--prompts_file", help="several requests, one per line: a prompt, or a JSON list of chunk-wise "
                   "prompts; each gives the video a run with those --prompt values would (same seed), written to "
                   "OUTPUT_<i>.mp4 (blank lines and lines starting with # are skipped)")
    p.add_argument("--text_embeddings", help="precomputed prompt features (.safetensors/.pt/.npz: 'embeddings' "
                   "(P, L, 4096), optional 'mask' (P, L)) instead of T5 and --prompt")
    p.add_argument("--image_path", help="i2v: the first frame")
    p.add_argument("--prefix_video_path", help="v2v: the video to continue (its first 32 frames)")
    p.add_argument("--output_path", required=True, help="output .mp4")
    p.add_argument("--seed", type=int, default=None, help="override runtime_config.seed")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--check_weights", action="store_true",
                   help="scan every DiT and VAE weight for NaN/inf before generating (names the tensor and file)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    p.add_argument("--frames_png", default=None, help="also write a PNG strip of every 6th frame (upscaled 4x)")
    p.add_argument("--cp_size", type=int, default=None, help="context-parallel ranks (default: engine_config.cp_size)")
    p.add_argument("--pp_size", type=int, default=None, help="pipeline stages (default: engine_config.pp_size)")
    p.add_argument("--cp_strategy", choices=("cp_ulysses", "cp_shuffle_overlap"), default=None,
                   help="context-parallel attention layout (default: engine_config.cp_strategy)")
    p.add_argument("--attention_precision", choices=("default", "fp8"), default=None,
                   help="DiT attention: fp8 = 8-bit attention forward (int8 Q/K, e4m3 P/V), inference only "
                        "(default: default)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Validation: everything a user can get wrong is checked here, before any weight is read.


@dataclasses.dataclass
class Job:
    """A checked request: what :func:`run_job` needs, built by :func:`validate` in seconds."""

    args: argparse.Namespace
    cfg: MagiConfig
    device: torch.device
    seed: int
    random_weights: bool
    chunks: schedule.ChunkLayout
    image: Optional[torch.Tensor] = None  # i2v: uint8 (H, W, 3) at the video size
    frames: Optional[torch.Tensor] = None  # v2v: uint8 (T, H, W, 3), T a multiple of the VAE's time factor
    text_embeddings: Optional[list] = None  # --text_embeddings, loaded: [(emb (L, C), mask (L,))] per prompt
    special_tokens_path: Optional[str] = None  # None: random stand-ins (presets without a tokens file)
    requests: list = dataclasses.field(default_factory=list)  # [[prompt, ...] per request]; [] with embeddings

    @property
    def output_paths(self) -> list:
        return request_output_paths(self.args.output_path, len(self.requests))


def request_output_paths(output_path: str, n_requests: int) -> list:
    """One mp4 per request: ``--output_path`` itself for one request, else ``<stem>_<i>.mp4``."""
    if n_requests <= 1:
        return [output_path]
    stem = output_path[:-len(".mp4")]
    return [f"{stem}_{i}.mp4" for i in range(n_requests)]


def read_prompts_file(path: str) -> list:
    """Requests from ``--prompts_file``: per line, one prompt or a JSON list of chunk-wise prompts."""
    import json

    _check_readable_file("prompts_file", path)
    requests = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("["):
                try:
                    prompts = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CLIError(f"prompts_file: line {n} starts with '[' but is not a JSON list ({e.msg})") from None
                if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
                    raise CLIError(f"prompts_file: line {n} must be a non-empty JSON list of non-empty strings")
                requests.append(prompts)
            else:
                requests.append([line])
    if not requests:
        raise CLIError(f"prompts_file: {path!r} holds no prompt (one request per line)")
    return requests


def _check_readable_file(argument: str, path: str) -> None:
    if not os.path.exists(path):
        raise CLIError(f"{argument}: {path!r} does not exist")
    if os.path.isdir(path):
        raise CLIError(f"{argument}: {path!r} is a directory, expected a file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise CLIError(f"{argument}: cannot read {path!r} ({e.strerror or e})") from None


def _check_writable_output(path: str) -> None:
    """The mp4 can be created: its folder exists (created if needed), it is not a directory, and a file
    can really be opened there (permission bits alone say nothing for root or for /proc)."""
    if not path.lower().endswith(".mp4"):
        raise CLIError(f"output_path: must end in .mp4 (H.264 mp4 is written), got {path!r}")
    if os.path.isdir(path):
        raise CLIError(f"output_path: {path!r} is an existing directory, expected a file name")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)  # like most video tools: create the output folder
    except OSError as e:
        raise CLIError(f"output_path: cannot create folder {parent!r} ({e.strerror or e})") from None
    existed = os.path.exists(path)
    try:
        with open(path, "ab"):
            pass
    except OSError as e:
        raise CLIError(f"output_path: cannot write {path!r} ({e.strerror or e})") from None
    if not existed:
        os.remove(path)


def _check_seed(seed: int) -> None:
    # torch.manual_seed's range; anything else fails only when the noise is drawn.
    if not SEED_MIN <= seed < SEED_END:
        raise CLIError(f"seed: must be in [-2^63, 2^64), got {seed}")


def _check_config_for_generation(cfg: MagiConfig) -> None:
    r = cfg.runtime
    if r.video_size_h is None or r.video_size_w is None:
        raise CLIError("config_file: runtime_config.video_size_h / video_size_w must be set")
    f = r.temporal_downsample_factor
    if (r.fps // 2) % f or r.fps // 2 < f:
        # The VAE works in temporal tiles of fps // 2 frames, each a whole number of latent frames.
        raise CLIError(f"config_file: runtime_config.fps // 2 (the VAE's temporal tile) must be a positive multiple "
                       f"of temporal_downsample_factor ({f}), got fps={r.fps}")


def _check_weight_files(cfg: MagiConfig) -> None:
    """Folders and safetensors headers of the DiT and VAE (a few KB read, no weights)."""
    from magi_model import loading
    from magi_model import vae as vae_mod

    r = cfg.runtime
    if r.load is None:
        raise CLIError("config_file: runtime_config.load must name the checkpoint root (the folder holding "
                       f"'{cfg.weight_subdir}/')")
    loading.read_header(loading.checkpoint_files(loading.weight_dir(cfg)))
    if r.vae_pretrained is None:
        raise CLIError("config_file: runtime_config.vae_pretrained must name MAGI-1-VAE's folder")
    vae_mod.check_vae_folder(r.vae_pretrained)


def validate(a: argparse.Namespace) -> Job:
    """Check every argument, path, device and config field; read the small inputs (image, prefix video,
    text embeddings, safetensors headers). Raises one of :func:`input_errors` on the first problem."""
    from magi_model import text as text_mod

    cfg = preset(a.preset) if a.preset else load_config(a.config_file)
    _check_config_for_generation(cfg)
    r, m = cfg.runtime, cfg.model
    trained_tiny = a.preset in TRAINED_PRESETS
    random_weights = a.preset is not None and not trained_tiny
    device = resolve_device(a.device, argument="device")
    seed = r.seed if a.seed is None else a.seed
    _check_seed(seed)

    prompts_file = getattr(a, "prompts_file", None)
    if a.prompt and a.text_embeddings:
        raise CLIError("prompt: give --prompt or --text_embeddings, not both (the embeddings replace the prompts)")
    if prompts_file and (a.prompt or a.text_embeddings):
        raise CLIError("prompts_file: give --prompts_file or --prompt / --text_embeddings, not both")
    if not (a.prompt or a.text_embeddings or prompts_file):
        raise CLIError("prompt: give --prompt (repeat for chunk-wise prompts), --prompts_file or --text_embeddings")
    requests = read_prompts_file(prompts_file) if prompts_file else [list(a.prompt)] if a.prompt else []
    for name, needed_by in (("image_path", "i2v"), ("prefix_video_path", "v2v")):
        value = getattr(a, name)
        if a.mode == needed_by:
            if not value:
                raise CLIError(f"{name}: --mode {needed_by} needs --{name}")
            _check_readable_file(name, value)
        elif value:
            raise CLIError(f"{name}: only used with --mode {needed_by}, got --mode {a.mode}")
    if a.text_embeddings:
        _check_readable_file("text_embeddings", a.text_embeddings)
    _check_writable_output(a.output_path)
    for path in request_output_paths(a.output_path, len(requests))[1:]:
        _check_writable_output(path)

    if trained_tiny and not os.path.isdir(r.load or ""):
        raise CLIError(f"preset: '{a.preset}' needs its trained weights in {r.load}; they are not in this "
                       f"package: make them with 'python -m magi_model.train_tiny' (docs/tiny_model.md)")
    default_tokens = (text_mod.grammar_special_tokens_path(r.t5_pretrained or "") if trained_tiny
                      else text_mod.DEFAULT_SPECIAL_TOKEN_PATH)
    tok_path = os.environ.get("SPECIAL_TOKEN_PATH", default_tokens)
    special_tokens_path: Optional[str] = tok_path
    if random_weights and "SPECIAL_TOKEN_PATH" not in os.environ and not os.path.isfile(tok_path):
        special_tokens_path = None  # presets fall back to random tokens unless a file was asked for
    else:
        text_mod.load_special_tokens(tok_path)  # small; fails here rather than after the models load
    if a.frames_png is not None and not a.frames_png.lower().endswith(".png"):
        raise CLIError(f"frames_png: must end in .png, got {a.frames_png!r}")
    if not random_weights:
        _check_weight_files(cfg)
        if requests and trained_tiny:
            enc = text_mod.load_grammar_encoder(r.t5_pretrained or "")
            for prompt in (p for req in requests for p in req):
                enc.tokenize(prompt)  # an unknown word fails here, naming it
        elif a.prompt:
            text_mod.t5_folder(r.t5_pretrained or "")

    # Inputs that can be wrong are read now, before any large model is loaded.
    w, h = r.video_size_w, r.video_size_h
    image = frames = None
    if a.mode == "i2v":
        image = read_image(a.image_path, w, h)
    elif a.mode == "v2v":
        frames = read_video(a.prefix_video_path, w, h, r.fps, PREFIX_VIDEO_FRAMES)
        # The VAE's temporal patchify drops a trailing partial group of frames; drop it up front so the
        # latent count is known before encoding.
        keep = frames.shape[0] - frames.shape[0] % r.temporal_downsample_factor
        if keep == 0:
            raise CLIError(f"prefix_video_path: needs at least {r.temporal_downsample_factor} frames at {r.fps} fps, "
                           f"got {frames.shape[0]}")
        frames = frames[:keep]
    P = {"t2v": 0, "i2v": 1}.get(a.mode) if frames is None else schedule.prefix_latent_frames(
        frames.shape[0], tile_frames=r.fps // 2, temporal_downsample_factor=r.temporal_downsample_factor)
    chunks = schedule.chunk_layout(r.num_frames, mode=a.mode, prefix_latent_frames=P, chunk_width=r.chunk_width,
                                   temporal_downsample_factor=r.temporal_downsample_factor)

    embeddings = None
    if a.text_embeddings:
        embeddings = text_mod.load_text_embeddings(a.text_embeddings, dim=m.caption_channels,
                                                   max_length=m.caption_max_length)
    n_prompts = len(embeddings) if embeddings is not None else max(len(req) for req in requests)
    n_noisy = chunks.infer_chunk_num - chunks.chunk_offset
    if n_prompts > n_noisy:
        what = "--text_embeddings holds" if embeddings is not None else "got"
        raise CLIError(f"prompt: {what} {n_prompts} chunk-wise prompts but the video has only {n_noisy} generated "
                       f"chunk(s) (num_frames / 24, rounded up); pass at most {n_noisy}")
    return Job(a, cfg, device, seed, random_weights, chunks, image=image, frames=frames,
               text_embeddings=embeddings, special_tokens_path=special_tokens_path, requests=requests)


# --------------------------------------------------------------------------------------------------
# Running a checked job


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_job(job: Job) -> dict:
    from magi_model import text as text_mod
    from magi_model import vae as vae_mod
    from magi_model.dit import build_dit
    from magi_model.loading import assert_finite, load_dit
    from magi_model.pipeline import generate_latents

    from magi_model.parallel.launch import DistributedRun, distributed_requested

    t_start = time.time()
    a, cfg, device, seed = job.args, job.cfg, job.device, job.seed
    par = DistributedRun(cfg, a) if distributed_requested(a) else None  # torchrun: see docs/distributed.md
    if par is not None:
        device = par.device
        par.check_inputs(cfg.to_dict(), vars(a), seed, job.text_embeddings, job.image, job.frames)
    r, m = cfg.runtime, cfg.model
    chunks = job.chunks
    if job.random_weights:
        _say(f"NOTE: preset '{a.preset}' uses RANDOM weights (DiT, VAE and text encoder): the video shows "
             f"structured noise, not the prompt. It demonstrates the pipeline; no downloads happen.")

    # --- text (T5 runs first and is released before the DiT loads, as MAGI-1 offloads it)
    L, Cc = m.caption_max_length, m.caption_channels
    if job.special_tokens_path is None:
        special = text_mod.random_special_tokens(Cc, seed)
    else:
        special = text_mod.load_special_tokens(job.special_tokens_path)
    if job.text_embeddings is not None:
        prompts = [job.text_embeddings]
    elif par is not None and not par.is_rank0:
        prompts = None  # the text encoder runs on rank 0 only; its features are broadcast below
    else:
        if job.random_weights:
            enc = text_mod.RandomTextEncoder(Cc, L, seed=seed)
        elif a.preset in TRAINED_PRESETS:
            enc = text_mod.load_grammar_encoder(r.t5_pretrained or "")
        else:
            enc = text_mod.T5TextEncoder(r.t5_pretrained or "", device=r.t5_device if torch.cuda.is_available()
                                         else "cpu", max_length=L)
        prompts = [[enc(p) for p in request] for request in job.requests]  # per request, per chunk
        del enc
    if par is not None:
        prompts = par.share(prompts)

    # --- models
    tile_frames = r.fps // 2
    if job.random_weights:
        model = build_dit(cfg, device=device, seed=seed) if par is None else par.build_dit(cfg, seed=seed)
        vae = vae_mod.tiny_vae(seed, dtype=torch.float32, tile_sample_min_length=tile_frames).to(device)
        if a.check_weights:
            assert_finite(model.state_dict().items(), source=f"preset '{a.preset}' DiT")
            assert_finite(vae.state_dict().items(), source=f"preset '{a.preset}' VAE")
    else:
        # The trained tiny VAE runs in fp32 on its own 32 px reference tiles; MAGI-1-VAE in bf16.
        small = a.preset in TRAINED_PRESETS
        vae = vae_mod.load_vae(r.vae_pretrained, device=device, tile_sample_min_length=tile_frames,
                               check_finite=a.check_weights, dtype=torch.float32 if small else torch.bfloat16,
                               tile_sample_min_size=min(r.video_size_h, r.video_size_w) if small else vae_mod.TILE_PX)
        if par is None:
            model = load_dit(cfg, device=device, progress=not a.no_progress, check_finite=a.check_weights)
        else:
            from magi_model.loading import weight_dir
            model = par.build_dit(cfg, seed=None, checkpoint_dir=weight_dir(cfg))
    if getattr(a, "attention_precision", None):
        model.attention_precision = a.attention_precision  # the single-device DiT's forward reads it

    # --- prefix latents
    prefix = None
    if job.image is not None:
        prefix = vae_mod.encode_image(vae, job.image.to(device), r.scale_factor, par and par.run_tiles())
    elif job.frames is not None:
        prefix = vae_mod.encode_video(vae, job.frames.to(device), r.scale_factor, par and par.run_tiles())
    if prefix is not None and prefix.shape[2] != chunks.prefix_latent_frames:
        raise RuntimeError(f"prefix encoded to {prefix.shape[2]} latent frames, planned "
                           f"{chunks.prefix_latent_frames}")  # internal check

    null, null_mask = model.null_caption(chunks.infer_chunk_num)

    def request_captions(request_prompts):
        caps = text_mod.build_captions(request_prompts, num_chunks=chunks.infer_chunk_num,
                                       chunk_offset=chunks.chunk_offset, null=null[0, 0].cpu(),
                                       null_mask=null_mask[0, 0].cpu(), special_tokens=special)
        return type(caps)(*(t.to(device) for t in (caps.cond, caps.cond_mask, caps.null, caps.null_mask)))
    captions = [request_captions(p) for p in prompts]
    seeds = [seed] * len(captions)  # each request is what a run of its own would give

    # --- denoise, decoding and writing each chunk as soon as it is done
    w, h = r.video_size_w, r.video_size_h
    paths = job.output_paths
    writers = [Mp4Writer(path, w, h, r.fps) for path in paths] if par is None or par.is_rank0 else None

    def decode(latents: torch.Tensor, run_tiles=None) -> torch.Tensor:
        return vae_mod.decode_latents(vae, latents, r.scale_factor, run_tiles)

    show = not a.no_progress and (par is None or par.is_rank0)
    strip: list[torch.Tensor] = []  # --frames_png: the first request's frames
    try:
        if par is not None and par.layout.pp_size > 1 and len(captions) > 1:
            # Requests interleaved through the pipeline stages; one decoder for all, keyed (request, chunk).
            from magi_model.parallel.interleave import generate_latents_interleaved
            if par.is_rank0:
                _say(f"{len(captions)} requests interleaved through {par.layout.pp_size} pipeline stages")
            decoder = par.on_chunk(decode, lambda key, frames: writers[key[0]].write(frames))
            generate_latents_interleaved(model, cfg, captions, seeds=seeds, mode=a.mode, prefix_latent=prefix,
                                         on_chunk=None if decoder is None else
                                         lambda req, ch, lat: decoder((req, ch), lat))
            par.finish()
        else:
            for i, caps in enumerate(captions):
                if par is None:
                    def on_chunk(_index, latents, out=writers[i], keep=i == 0 and a.frames_png):
                        frames = decode(latents)
                        out.write(frames)
                        if keep:
                            strip.append(frames)
                else:  # decode overlapped with denoising, tiles over the cp group; rank 0 writes
                    on_chunk = par.on_chunk(decode, lambda _index, frames, i=i: writers[i].write(frames))
                generate_latents(model, cfg, caps, mode=a.mode, prefix_latent=prefix, seed=seeds[i],
                                 on_chunk=on_chunk, progress=show)
                if par is not None:
                    par.finish()
    finally:
        for writer in writers or []:
            writer.close()
    if writers is None:
        return {"frames": 0, "path": None, "rank": par.layout.rank, "seconds": time.time() - t_start}
    if strip:
        write_frame_strip(a.frames_png, torch.cat(strip))
    info = {"frames": writers[0].frames, "expected_frames": chunks.output_frames, "path": paths[0],
            "seconds": time.time() - t_start, "random_weights": job.random_weights}
    if len(paths) > 1:
        info.update(paths=paths, frames_per_request=[wr.frames for wr in writers])
    for path, writer in zip(paths, writers):
        _say(f"wrote {writer.frames} frames ({w}x{h} @ {r.fps} fps) to {path} in {info['seconds']:.1f} s"
             + (" [RANDOM weights]" if job.random_weights else ""))
    return info


def run(a: argparse.Namespace) -> dict:
    """Validate, then generate (see :func:`validate` and :func:`run_job`)."""
    return run_job(validate(a))


def input_errors() -> tuple:
    """Exception types that mean "bad input": the CLI prints their one-line message, no traceback."""
    from magi_model.loading import CheckpointError
    from magi_model.text import TextError
    from magi_model.vae import VAEError
    return (CLIError, ConfigError, CheckpointError, TextError, VAEError, DeviceError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)
    from magi_model.parallel.launch import distributed_requested
    if distributed_requested(a):  # one failing rank must end every rank (no hang in a collective)
        from magi_model.parallel.faults import run_guarded
        return run_guarded(lambda: _main(a))
    return _main(a)


def _main(a: argparse.Namespace) -> int:
    try:
        run(a)
    except input_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
