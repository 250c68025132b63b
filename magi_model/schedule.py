"""MAGI-1 sampling schedule (docs/magi1.md#sampling-schedule): time grid, sliding-window stages, staggered per-chunk t,
per-chunk key windows, CFG scales, distill step size, chunk and frame counts.

Conventions: t = 0 is pure noise, t = 1 is clean; a chunk is ``chunk_width`` (6) latent frames;
``chunk_offset`` = number of clean prefix chunks (V2V), whose steps are skipped.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Sequence

import torch

SHIFT = 3.0  # sd3 shift; MAGI-1's t_schedule_config is always empty, so always 3


def _bad(arg: str, rule: str):
    raise ValueError(f"schedule: argument '{arg}' {rule}")


def _shortcut_quarter_points(shortcut_mode: str) -> list[float]:
    # Step sizes within each quarter: 1/8, 1/16, 1/16 ("8,16,16") or 1/16, 1/16, 1/8 ("16,16,8"),
    # expressed as fractions of the whole [0, 1] grid: offsets of the 3 points inside a quarter.
    if shortcut_mode == "8,16,16":
        return [0.0, 1 / 8, 3 / 16]
    if shortcut_mode == "16,16,8":
        return [0.0, 1 / 16, 1 / 8]
    _bad("shortcut_mode", f"must be '8,16,16' or '16,16,8', got {shortcut_mode!r}")


def time_grid(num_steps: int, *, shortcut_mode: str = "8,16,16", shift: float = SHIFT) -> torch.Tensor:
    """The ``num_steps + 1`` time points, fp32 (docs/magi1.md#time-grid): ``s = u^2``, then ``s / (shift - (shift-1) s)``.

    ``num_steps == 12`` is the distill shortcut grid (3 uneven steps per quarter, docs/magi1.md#distilled-models).
    Bit-identical to MAGI-1's ``init_t`` (``inference/pipeline/video_generate.py``): fp32 throughout, in
    its order of operations, ``(inv * s) / (1 + (inv - 1) * s)`` with ``inv = 1 / shift`` rounded to fp32.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        _bad("num_steps", f"must be an integer >= 1, got {num_steps!r}")
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift >= 1.0):
        _bad("shift", f"must be a finite number >= 1 (MAGI-1's rule), got {shift!r}")
    if num_steps == 12:
        pts = _shortcut_quarter_points(shortcut_mode)
        u = torch.tensor([q / 4 + o for q in range(4) for o in pts] + [1.0], dtype=torch.float32)
    else:
        u = torch.linspace(0, 1, num_steps + 1, dtype=torch.float32)
    s = u ** 2
    inv = 1.0 / shift  # a Python float: PyTorch casts it to fp32 when it meets the fp32 tensor
    return inv * s / (1 + (inv - 1) * s)


def distill_step_size(num_steps: int, sub_step: int = 0, shortcut_mode: str = "8,16,16") -> float:
    """Input of the step-size embedding of distilled models (docs/magi1.md#distilled-models): ``num_steps/4*2``, or for the
    12-step shortcut grid ``4/interval*2`` with interval ``[2,1,1]`` ("8,16,16") / ``[1,1,2]``."""
    if num_steps == 12:
        intervals = [2, 1, 1] if shortcut_mode == "8,16,16" else [1, 1, 2]
        return 4 / intervals[sub_step % 3] * 2
    return num_steps / 4 * 2


@dataclasses.dataclass(frozen=True)
class Stage:
    """One window position: chunks ``[clip_start, clip_end)`` are denoised together; they use the
    schedule segments ``t_start..t_end-1`` (newest chunk on segment ``t_start``)."""

    index: int
    clip_start: int
    clip_end: int
    t_start: int
    t_end: int


def window_stages(chunk_num: int, window_size: int, chunk_offset: int = 0) -> list[Stage]:
    """MAGI-1's ``generate_sequences`` (docs/magi1.md#window-stages)."""
    if chunk_num < 1:
        _bad("chunk_num", f"must be >= 1, got {chunk_num}")
    if window_size < 1:
        _bad("window_size", f"must be >= 1, got {window_size}")
    if not 0 <= chunk_offset < chunk_num:
        _bad("chunk_offset", f"must be in [0, chunk_num={chunk_num}), got {chunk_offset}")
    out = []
    for k, i in enumerate(range(chunk_offset, chunk_num + window_size - 1)):
        out.append(Stage(k, max(chunk_offset, i - window_size + 1), min(chunk_num, i + 1),
                         max(0, i - chunk_num + 1), min(window_size, i - chunk_offset + 1)))
    return out


@dataclasses.dataclass(frozen=True)
class Step:
    """One global denoising step: which chunks, at which grid index each (oldest first)."""

    step: int  # global step k
    stage: Stage
    sub_step: int  # d = k % steps_per_stage
    chunks: tuple[int, ...]  # absolute chunk ids clip_start..clip_end-1
    t_index: tuple[int, ...]  # grid index per chunk (oldest = highest = cleanest)
    fwd_extra_clean_chunk: bool  # re-forward chunk clip_start-1 at clean_t to fill the KV cache


def steps(chunk_num: int, num_steps: int, window_size: int, chunk_offset: int = 0) -> Iterator[Step]:
    """All global steps in order (docs/magi1.md#window-stages)."""
    if num_steps % window_size:
        _bad("num_steps", f"must be a multiple of window_size={window_size}, got {num_steps}")
    per = num_steps // window_size
    k = 0
    for st in window_stages(chunk_num, window_size, chunk_offset):
        for d in range(per):
            idx = tuple(reversed([j * per + d for j in range(st.t_start, st.t_end)]))
            yield Step(k, st, d, tuple(range(st.clip_start, st.clip_end)), idx,
                       st.clip_start > chunk_offset and d == 0)
            k += 1


def total_steps(chunk_num: int, num_steps: int, window_size: int, chunk_offset: int = 0) -> int:
    return (num_steps // window_size) * (chunk_num + window_size - 1 - chunk_offset)


def staggered_t(grid: torch.Tensor, t_index: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-chunk current t and next t (for the Euler update ``x += v * (t_next - t)``)."""
    idx = torch.tensor(list(t_index), dtype=torch.long)
    return grid[idx], grid[idx + 1]


def key_window(t_index: int, num_steps: int, noise2clean_kvrange: Sequence[int], clean_chunk_kvrange: int) -> int:
    """Chunks a chunk at grid index ``t_index`` sees, itself included (docs/magi1.md#attention-windows); 0 = all previous.

    Clean chunks (``t_index == num_steps``: the re-forwarded / prefix chunk) use ``clean_chunk_kvrange``;
    others ``noise2clean_kvrange[t_index // (num_steps/4)]`` (5, 4, 3, 2 in the shipped configs)."""
    if t_index >= num_steps:
        return clean_chunk_kvrange if clean_chunk_kvrange > 0 else 0
    if not noise2clean_kvrange:
        return 0
    return int(noise2clean_kvrange[int(t_index // (num_steps / 4))])


def cfg_scales(t: float | torch.Tensor, cfg_t_range: Sequence[float], prev_chunk_scales: Sequence[float],
               text_scales: Sequence[float]) -> tuple[float, float]:
    """``(s_prev, s_text)`` for a chunk at time t (docs/magi1.md#classifier-free-guidance): ``searchsorted(range - 1e-7, t) - 1``."""
    rng = torch.tensor(list(cfg_t_range), dtype=torch.float32) - 1e-7
    tt = torch.as_tensor(t, dtype=torch.float32).reshape(1)
    i = int(torch.searchsorted(rng, tt)[0]) - 1
    i = min(max(i, 0), len(cfg_t_range) - 1)
    return float(prev_chunk_scales[i]), float(text_scales[i])


def combine_cfg(uncond: torch.Tensor, cond_pre: torch.Tensor, cond_pre_and_text: torch.Tensor, s_prev: float,
                s_text: float) -> torch.Tensor:
    """``uncond + s_prev (cond_pre - uncond) + s_text (cond_pre_and_text - cond_pre)``, in fp32."""
    u, c, ct = uncond.float(), cond_pre.float(), cond_pre_and_text.float()
    return (1 - s_prev) * u + (s_prev - s_text) * c + s_text * ct


# --------------------------------------------------------------------------------------------------
# Sizes (docs/magi1.md#sizes, docs/magi1.md#i2v-and-v2v)


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    infer_chunk_num: int  # chunks in the latent
    chunk_offset: int  # clean prefix chunks skipped by denoising (V2V)
    latent_frames: int  # infer_chunk_num * chunk_width
    prefix_latent_frames: int
    output_latent_frames: int
    output_frames: int


def chunk_layout(num_frames: int, *, mode: str = "t2v", prefix_latent_frames: int = 0, chunk_width: int = 6,
                 temporal_downsample_factor: int = 4) -> ChunkLayout:
    """Chunk counts and output length for T2V / I2V / V2V.

    I2V: P = 1 image latent; the output keeps it (num_frames 96 -> 5 chunks -> 120 frames).
    V2V: P prefix latents (8 for the 32-frame prefix); chunks inside the prefix are skipped and the
    prefix frames are not output (96 -> 6 chunks, offset 1 -> 112 frames).
    """
    if mode not in ("t2v", "i2v", "v2v"):
        _bad("mode", f"must be t2v, i2v or v2v, got {mode!r}")
    if num_frames < 1:
        _bad("num_frames", f"must be >= 1, got {num_frames}")
    p = {"t2v": 0, "i2v": 1}.get(mode, prefix_latent_frames)
    if mode == "i2v" and prefix_latent_frames not in (0, 1):
        _bad("prefix_latent_frames", f"is 1 for i2v (one image latent), got {prefix_latent_frames}")
    if mode == "v2v" and p < 1:
        _bad("prefix_latent_frames", f"must be >= 1 for v2v, got {p}")
    chunks = math.ceil((num_frames // temporal_downsample_factor + p) / chunk_width)
    offset = p // chunk_width
    latent = chunks * chunk_width
    out_latent = latent - p if mode == "v2v" else latent
    return ChunkLayout(chunks, offset, latent, p, out_latent, out_latent * temporal_downsample_factor)


def prefix_latent_frames(video_frames: int, *, tile_frames: int = 12, temporal_downsample_factor: int = 4) -> int:
    """Latent frames of a prefix video encoded in temporal tiles (12 frames -> 3 latents each).

    V2V uses the first 32 frames: tiles 12 + 12 + 8 -> 3 + 3 + 2 = 8 latent frames."""
    full, rest = divmod(video_frames, tile_frames)
    return full * (tile_frames // temporal_downsample_factor) + math.ceil(rest / temporal_downsample_factor)


__all__ = ["time_grid", "distill_step_size", "Stage", "window_stages", "Step", "steps", "total_steps",
           "staggered_t", "key_window", "cfg_scales", "combine_cfg", "ChunkLayout", "chunk_layout",
           "prefix_latent_frames", "SHIFT"]
