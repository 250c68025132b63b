"""MAGI-1's autoregressive chunk pipeline (docs/magi1.md#sampling-schedule): from text embeddings and an optional prefix
latent to denoised latents, chunk by chunk.

What one run does:
- latent ``x ~ N(0, 1)`` of ``infer_chunk_num * chunk_width`` frames (seeded CPU generator, so a
  seed gives the same video on every device);
- a sliding window of up to ``window_size`` chunks denoised together at staggered times
  (:func:`magi_model.schedule.steps`): each global step runs the DiT on the window, mixes the
  guidance passes and takes one Euler step ``x_k += v_k (t_next_k - t_k)`` per chunk;
- when the window slides, the chunk that just finished is re-forwarded at ``clean_t`` attending only
  to itself, and that forward writes its K/V into the cache that later chunks read (docs/magi1.md#kv-cache);
- base models (``cfg_number == 3``): three forwards per step (docs/magi1.md#classifier-free-guidance); distilled models: one
  forward with the step-size embedding plus the nearly-clean self-only blend (docs/magi1.md#distilled-models);
- I2V / V2V: the prefix latents overwrite the leading frames before every forward (docs/magi1.md#i2v-and-v2v);
  V2V first fills the cache from the clean prefix chunks;
- each chunk is handed to ``on_chunk`` as soon as its last step is done (streamed decoding).

Beyond MAGI-1: one caption per chunk (chunk-wise prompting) -- MAGI-1's tensors are already per
chunk, MAGI-1 just repeats a single prompt.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional, Protocol

import torch

from magi_model import schedule
from magi_model.config import MagiConfig, tokens_per_chunk
from magi_model.dit import KVCache

DEFAULT_PREV_CHUNKS_SCALE = 0.7  # MAGI-1's env var ``prev_chunks_scale`` default (distill blend)


def _bad(arg: str, rule: str):
    raise ValueError(f"pipeline: argument '{arg}' {rule}")


@dataclasses.dataclass
class Captions:
    """Per-chunk text for every latent chunk (prefix chunks included).

    cond ``(n_chunks, L, Cc)`` fp32 and cond_mask ``(n_chunks, L)`` are the prompt branch (clean prefix
    chunks carry an all-zero mask, as MAGI-1); null / null_mask the unconditional branch (the DiT's
    learned ``null_caption_embedding`` with its first 50 tokens valid)."""

    cond: torch.Tensor
    cond_mask: torch.Tensor
    null: torch.Tensor
    null_mask: torch.Tensor

    @property
    def num_chunks(self) -> int:
        return self.cond.shape[0]


@dataclasses.dataclass
class Window:
    """The chunks of one DiT forward: ``[slice_point, slice_point + R)`` plus bookkeeping."""

    slice_point: int
    extra_clean: bool  # chunk slice_point is the just-finished chunk re-forwarded at clean_t
    chunks: tuple[int, ...]  # denoised chunks (absolute), oldest first
    t: torch.Tensor  # (R,) time per chunk of the forward (clean_t for the extra chunk)
    key_windows: list[int]


class SamplerModel(Protocol):
    """What :class:`ChunkSampler` and :func:`generate_latents` use of a model. :class:`VideoDiT`
    provides it; a wrapper (``magi_model.parallel.ParallelDiT``, a test double) must provide the same:

    - ``device``: where the noise, the prefix latent and (unless ``kv_offload``) the KV cache live;
    - ``act_dtype``: the KV cache's dtype;
    - ``videodit_blocks.layers``: a sized sequence, one KV cache layer per entry
      (:meth:`KVCache.for_model`);
    - ``__call__(x, t, caption, caption_mask, *, caption_dropout, distill_dt, kv_cache, slice_point,
      key_windows, update_kv_cache, write_chunks=None)``: the velocity, with VideoDiT.forward's contract.
    """

    device: torch.device
    act_dtype: torch.dtype
    videodit_blocks: Any

    def __call__(self, x: torch.Tensor, t: torch.Tensor, caption: torch.Tensor, caption_mask: torch.Tensor,
                 **kwargs: Any) -> torch.Tensor: ...


def _check_model(model) -> None:
    missing = [a for a in ("device", "act_dtype", "videodit_blocks") if not hasattr(model, a)]
    if missing or not callable(model) or not hasattr(getattr(model, "videodit_blocks", None), "layers"):
        what = f"lacks {missing}" if missing else ("is not callable" if not callable(model)
                                                     else "has no videodit_blocks.layers")
        _bad("model", f"must provide the SamplerModel interface (device, act_dtype, videodit_blocks.layers, "
             f"VideoDiT.forward's call); this {type(model).__name__} {what}")


class ChunkSampler:
    """Runs the schedule on a DiT: a :class:`VideoDiT` or anything with the :class:`SamplerModel`
    interface."""

    def __init__(self, model: SamplerModel, config: MagiConfig, captions: Captions, *, mode: str = "t2v",
                 prefix_latent: Optional[torch.Tensor] = None, prev_chunks_scale: Optional[float] = None):
        _check_model(model)
        self.model, self.cfg = model, config
        r, e = config.runtime, config.engine
        if r.video_size_h is None or r.video_size_w is None:
            _bad("config", "needs runtime_config.video_size_h / video_size_w")
        self.h8, self.w8 = r.video_size_h // 8, r.video_size_w // 8
        self.cw = r.chunk_width
        P = 0
        if mode in ("i2v", "v2v"):
            if prefix_latent is None:
                _bad("prefix_latent", f"is required for mode {mode!r} (the encoded image / prefix video)")
            if prefix_latent.dim() != 5 or prefix_latent.shape[0] != 1 or prefix_latent.shape[3:] != (self.h8, self.w8):
                _bad("prefix_latent", f"must be (1, C, P, {self.h8}, {self.w8}) for a {r.video_size_h}x"
                     f"{r.video_size_w} video, got {list(prefix_latent.shape)}")
            P = prefix_latent.shape[2]
        elif prefix_latent is not None:
            _bad("prefix_latent", "must be None for t2v")
        self.mode, self.P = mode, P
        self.prefix = prefix_latent
        self.chunk_layout = schedule.chunk_layout(r.num_frames, mode=mode, prefix_latent_frames=P, chunk_width=self.cw,
                                        temporal_downsample_factor=r.temporal_downsample_factor)
        if captions.num_chunks != self.chunk_layout.infer_chunk_num:
            _bad("captions", f"must hold one caption per latent chunk ({self.chunk_layout.infer_chunk_num}), "
                 f"got {captions.num_chunks}")
        self.captions = captions
        self.grid = schedule.time_grid(r.num_steps, shortcut_mode=e.shortcut_mode)
        self.n_tok = tokens_per_chunk(config)
        self.cfg3 = r.cfg_number == 3
        if prev_chunks_scale is None:
            prev_chunks_scale = float(os.environ.get("prev_chunks_scale", DEFAULT_PREV_CHUNKS_SCALE))
        self.prev_chunks_scale = prev_chunks_scale

    # ------------------------------------------------------------------ pieces
    def key_window(self, t_index: int) -> int:
        r = self.cfg.runtime
        return schedule.key_window(t_index, r.num_steps, r.noise2clean_kvrange, r.clean_chunk_kvrange)

    def window(self, step: schedule.Step) -> Window:
        r = self.cfg.runtime
        t_cur, _ = schedule.staggered_t(self.grid, step.t_index)
        extra = step.fwd_extra_clean_chunk
        t = torch.cat([torch.full((1,), r.clean_t), t_cur]) if extra else t_cur.clone()
        kw = ([self.key_window(r.num_steps)] if extra else []) + [self.key_window(i) for i in step.t_index]
        sp = step.stage.clip_start - 1 if extra else step.stage.clip_start
        # Chunks wholly covered by the prefix are clean (MAGI-1 sets their t to 1.0; the shipped
        # frame counts never put one in a denoising window, kept for other prefix lengths).
        for j in range(len(t)):
            if (sp + j + 1) * self.cw <= self.P:
                t[j] = 1.0
        return Window(sp, extra, step.chunks, t, kw)

    def pad_prefix(self, x: torch.Tensor, slice_point: int) -> None:
        """Overwrite the prefix frames inside the window starting at ``slice_point`` (in place in x,
        as MAGI-1, so the Euler update of those frames is kept for I2V's emitted frame 0)."""
        start = slice_point * self.cw
        if self.P > start:
            x[:, :, start:self.P] = self.prefix[:, :, start:self.P].to(x.dtype)

    def _caption(self, chunks: list[int], null_first: bool, null_all: bool):
        c = self.captions
        caps, masks = [], []
        for j, ch in enumerate(chunks):
            use_null = null_all or (null_first and j == 0)
            caps.append(c.null[ch] if use_null else c.cond[ch])
            masks.append(c.null_mask[ch] if use_null else c.cond_mask[ch])
        return torch.stack(caps)[None], torch.stack(masks)[None]

    def _dit(self, x, t, cap, mask, dropout, **kw):
        e, r = self.cfg.engine, self.cfg.runtime
        dt = schedule.distill_step_size(r.num_steps, kw.pop("sub_step", 0), e.shortcut_mode) if e.distill else None
        # The schedule lives on the CPU; the forward's inputs all go to the latent's device.
        return self.model(x, t.to(x.device), cap.to(x.device), mask.to(x.device), caption_dropout=dropout,
                          distill_dt=dt, **kw).float()

    # ------------------------------------------------------------------ velocity of one step
    def velocity(self, x: torch.Tensor, w: Window, cache: KVCache, sub_step: int) -> torch.Tensor:
        """Guided velocity ``(1, C, len(w.chunks) * cw, h8, w8)`` of the denoised chunks."""
        cw = self.cw
        all_chunks = list(range(w.slice_point, w.slice_point + len(w.t)))
        xin = x[:, :, w.slice_point * cw: all_chunks[-1] * cw + cw]
        t = w.t[None]
        ex = 1 if w.extra_clean else 0
        R = len(all_chunks)
        if not self.cfg3:
            cap, mask = self._caption(all_chunks, null_first=w.extra_clean, null_all=False)
            oldest = ex  # position of the oldest denoised chunk
            blend = float(w.t[oldest]) > self.cfg.engine.distill_nearly_clean_chunk_threshold
            kw = list(w.key_windows)
            if blend:
                # A self-only copy of the nearly clean oldest chunk, appended after the window (not cached).
                xin = torch.cat([xin, xin[:, :, oldest * cw:(oldest + 1) * cw]], dim=2)
                t = torch.cat([t, t[:, oldest:oldest + 1]], dim=1)
                cap = torch.cat([cap, cap[:, oldest:oldest + 1]], dim=1)
                mask = torch.cat([mask, mask[:, oldest:oldest + 1]], dim=1)
                kw.append(1)
            v = self._dit(xin, t, cap, mask, False, kv_cache=cache, slice_point=w.slice_point, key_windows=kw,
                          update_kv_cache=True, write_chunks=R, sub_step=sub_step)
            if blend:
                s = self.prev_chunks_scale
                a, b = oldest * cw, (oldest + 1) * cw
                v[:, :, a:b] = s * v[:, :, a:b] + (1 - s) * v[:, :, R * cw:]
                v = v[:, :, :R * cw]
            return v[:, :, ex * cw:]

        # Base models: 3 passes (docs/magi1.md#classifier-free-guidance).
        cap, mask = self._caption(all_chunks, null_first=w.extra_clean, null_all=False)
        v_text = self._dit(xin, t, cap, mask, False, kv_cache=cache, slice_point=w.slice_point,
                           key_windows=w.key_windows)
        ncap, nmask = self._caption(all_chunks, null_first=False, null_all=True)
        # Only the null-text pass writes the cache: cached K/V carry adaLN row null_caption_embedding[-1].
        v_pre = self._dit(xin, t, ncap, nmask, True, kv_cache=cache, slice_point=w.slice_point,
                          key_windows=w.key_windows, update_kv_cache=True)
        # Unconditional: each denoised chunk alone, one per batch element, no cache, rope from 0.
        nd = len(w.chunks)
        C = xin.shape[1]
        xu = xin[0, :, ex * cw:].reshape(C, nd, cw, self.h8, self.w8).transpose(0, 1)
        v_unc = self._dit(xu, w.t[ex:, None], ncap[0, ex:, None], nmask[0, ex:, None], [True] * nd,
                          key_windows=[1])
        v_unc = v_unc.transpose(0, 1).reshape(1, C, nd * cw, self.h8, self.w8)
        v_text, v_pre = v_text[:, :, ex * cw:], v_pre[:, :, ex * cw:]
        r = self.cfg.runtime
        out = torch.empty_like(v_unc)
        for j in range(nd):
            s_p, s_t = schedule.cfg_scales(w.t[ex + j], r.cfg_t_range, r.prev_chunk_scales, r.text_scales)
            sl = slice(j * cw, (j + 1) * cw)
            out[:, :, sl] = schedule.combine_cfg(v_unc[:, :, sl], v_pre[:, :, sl], v_text[:, :, sl], s_p, s_t)
        return out

    def fill_prefix_cache(self, x: torch.Tensor, cache: KVCache) -> None:
        """V2V: K/V of the clean prefix chunks (each attending only to itself) into the cache.

        Only the cache-writing pass runs (the null-text pass for base models, the single pass for
        distilled ones): MAGI-1 runs all passes here but discards their velocities."""
        off = self.chunk_layout.chunk_offset
        if off == 0:
            return
        r = self.cfg.runtime
        chunks = list(range(off))
        cap, mask = self._caption(chunks, null_first=False, null_all=True)
        t = torch.full((1, off), r.clean_t)
        self._dit(x[:, :, :off * self.cw], t, cap, mask, self.cfg3, kv_cache=cache, slice_point=0,
                  key_windows=[self.key_window(r.num_steps)] * off, update_kv_cache=True)

    # ------------------------------------------------------------------ the loop
    def run(self, x: torch.Tensor, *, on_chunk: Optional[Callable[[int, torch.Tensor], None]] = None,
            progress: bool = True) -> torch.Tensor:
        """Denoise ``x`` (1, C, T, h8, w8) in place; returns the output latents (prefix cut for V2V)."""
        r = self.cfg.runtime
        layout = self.chunk_layout
        # kv_offload (MAGI-1's pinned host cache) keeps the whole-video cache in CPU memory.
        cache = KVCache.for_model(self.model, layout.infer_chunk_num * self.n_tok,
                                  device="cpu" if self.cfg.engine.kv_offload else None)
        self.kv_cache = cache  # kept for inspection (tests, debugging)
        self.pad_prefix(x, 0)
        self.fill_prefix_cache(x, cache)
        total = schedule.total_steps(layout.infer_chunk_num, r.num_steps, r.window_size, layout.chunk_offset)
        bar = _progress(total, progress)
        outs = []
        for step in schedule.steps(layout.infer_chunk_num, r.num_steps, r.window_size, layout.chunk_offset):
            w = self.window(step)
            self.pad_prefix(x, w.slice_point)
            v = self.velocity(x, w, cache, step.sub_step)
            # Euler steps follow the grid (w.t is the model's input, where prefix chunks may read 1.0).
            t_cur, t_next = schedule.staggered_t(self.grid, step.t_index)
            for j, ch in enumerate(w.chunks):
                sl = slice(ch * self.cw, (ch + 1) * self.cw)
                x[:, :, sl] = x[:, :, sl] + v[:, :, j * self.cw:(j + 1) * self.cw] * float(t_next[j] - t_cur[j])
            bar.update(1)
            # The oldest chunk of the window is finished once it has taken the grid's last step.
            if step.t_index[0] == r.num_steps - 1:
                ch = step.chunks[0]
                lo = max(ch * self.cw, self.P if self.mode == "v2v" else 0)
                out = x[:, :, lo:(ch + 1) * self.cw].clone()
                outs.append(out)
                if on_chunk is not None:
                    on_chunk(ch, out)
        bar.close()
        return torch.cat(outs, dim=2)


def _progress(total: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a declared dependency; without it just run quietly
        enabled = False
    if not enabled:
        class _Null:
            def update(self, n=1):
                pass

            def close(self):
                pass
        return _Null()
    return tqdm(total=total, desc="denoising", unit="step")


def initial_noise(config: MagiConfig, num_latent_frames: int, seed: int, device="cpu") -> torch.Tensor:
    """``randn(1, 16, T, h8, w8)`` fp32 from a seeded CPU generator (device independent)."""
    r = config.runtime
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    x = torch.randn(1, config.model.latent_channels, num_latent_frames, r.video_size_h // 8, r.video_size_w // 8,
                    generator=g, dtype=torch.float32)
    return x.to(device)


def generate_latents(model: SamplerModel, config: MagiConfig, captions: Captions, *, mode: str = "t2v",
                     prefix_latent: Optional[torch.Tensor] = None, seed: Optional[int] = None,
                     on_chunk: Optional[Callable[[int, torch.Tensor], None]] = None, progress: bool = True,
                     prev_chunks_scale: Optional[float] = None) -> torch.Tensor:
    """Run the whole schedule; returns the output latents ``(1, C, T_out, h8, w8)`` fp32 (scaled by
    ``scale_factor``, i.e. the DiT's space). ``on_chunk(chunk_index, latents)`` is called as each
    chunk finishes, in order. ``seed`` defaults to ``runtime_config.seed``."""
    sampler = ChunkSampler(model, config, captions, mode=mode, prefix_latent=prefix_latent,
                           prev_chunks_scale=prev_chunks_scale)
    dev = model.device
    x = initial_noise(config, sampler.chunk_layout.latent_frames, config.runtime.seed if seed is None else seed, dev)
    if sampler.prefix is not None:
        sampler.prefix = sampler.prefix.to(dev)
    return sampler.run(x, on_chunk=on_chunk, progress=progress)


__all__ = ["Captions", "ChunkSampler", "SamplerModel", "Window", "generate_latents", "initial_noise", "DEFAULT_PREV_CHUNKS_SCALE"]
