"""MAGI-1's DiT across ranks: pipeline stages x context-parallel groups, with VideoDiT.forward's interface.

:class:`ParallelDiT` is a drop-in for :class:`magi_model.dit.VideoDiT` in the chunk sampler: every
rank runs the same sampler (same seeds, same schedule), and each DiT forward is split:

- stage 0 embeds, keeps its cp rank's tokens and runs its layers; stage s > 0 receives the hidden
  states from stage s - 1 (same cp rank), runs its layers, and sends them on;
- the last stage gathers the tokens across its cp group, applies the final norm / linear /
  unpatchify, and sends the velocity point to point to the first stage (same cp rank), which
  integrates it and decodes / writes the video. Stages in between get a zero velocity: they never
  read the latents (their input is the received hidden states), so their copy of ``x`` just stays
  put; only first-stage ranks (and the last stage, which has the real velocity) hold the video's
  latents;
- :meth:`ParallelDiT.forward_many` pipelines several requests: a stage sends request i's hidden
  states asynchronously and starts request i + 1 while the next stage works on i (MAGI-1's idea of
  keeping stages busy with a queue of prompts; see :mod:`magi_model.parallel.interleave`).

:func:`build_stage_dit` builds the model on the meta device and materializes only this stage's
transformer layers (plus the small embedders / final layer), with seeded random weights identical
to the single-process model's or with this stage's keys read from memory-mapped safetensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from magi_model.config import MagiConfig
from magi_model.dit import VideoDiT, build_dit, init_random_weights
from magi_model.parallel.context import (
    TokenLayout,
    gather_tokens,
    localize,
    ring_attention_fn,
    ulysses_attention_fn,
)
from magi_model.parallel.layout import ParallelLayout, stage_layers

_LAYER_PREFIX = "videodit_blocks.layers."


def owns_key(key: str, layers: range) -> bool:
    """True for a state-dict key this stage loads: its layers' keys and every non-layer key."""
    if not key.startswith(_LAYER_PREFIX):
        return True
    return int(key[len(_LAYER_PREFIX):].split(".", 1)[0]) in layers


def build_stage_dit(config: MagiConfig, layout: ParallelLayout, *, seed: int | None = 0,
                    checkpoint_dir: str | None = None) -> VideoDiT:
    """This stage's DiT: other stages' layers stay on the meta device (no memory, never run).

    ``checkpoint_dir``: load this stage's keys from the checkpoint (memory-mapped safetensors; all keys
    are checked against the headers first). Otherwise seeded random weights, the same tensors
    :func:`magi_model.dit.build_dit` gives for ``seed``."""
    layers = stage_layers(config.model.num_layers, layout.pp_size, layout.stage)
    model = build_dit(config, device="meta")
    device = layout.device
    for name, child in model.named_children():
        if name != "videodit_blocks":
            child.to_empty(device=device)
    model.videodit_blocks.final_layernorm.to_empty(device=device)
    for i in layers:
        model.videodit_blocks.layers[i].to_empty(device=device)
    if checkpoint_dir is None:
        if seed is not None:
            init_random_weights(model, seed)  # draws every tensor in order; meta ones are skipped writes
        return model.eval()
    _load_stage(model, config, checkpoint_dir, layers, device)
    return model.eval()


def _load_stage(model: VideoDiT, config: MagiConfig, ckpt: str, layers: range, device) -> None:
    from magi_model.loading import (
        _get_tensor,
        _safe_open,
        check_state_dict,
        checkpoint_files,
        load_state_dict_into,
        read_header,
    )

    files = checkpoint_files(ckpt)
    header = read_header(files)
    check_state_dict(build_dit(config, device="meta"), header, strict=True, source=f"checkpoint {ckpt!r}")
    mine = {k: v for k, v in header.items() if owns_key(k, layers)}
    handles = {}

    def getter(k):
        path = files[k]
        if path not in handles:
            handles[path] = _safe_open(path).__enter__()
        return _get_tensor(handles[path], path, k)

    try:
        load_state_dict_into(model, getter=getter, header=mine, strict=False, device=device,
                             source=f"checkpoint {ckpt!r} (pipeline stage layers {layers.start}..{layers.stop - 1})")
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)


def materialized_parameters(model: torch.nn.Module) -> int:
    """Parameter elements that hold memory on this rank (meta tensors excluded)."""
    return sum(p.numel() for p in model.parameters() if not p.is_meta)


class ParallelDiT:
    """VideoDiT.forward across the (pp, cp) grid; see the module docstring."""

    def __init__(self, model: VideoDiT, layout: ParallelLayout):
        self.model, self.layout = model, layout
        self.config = model.config
        self.videodit_blocks = model.videodit_blocks  # KVCache.for_model counts layers here
        self.act_dtype = model.act_dtype
        self.layers = stage_layers(self.config.model.num_layers, layout.pp_size, layout.stage)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def null_caption(self, num_chunks: int, batch: int = 1):
        return self.model.null_caption(num_chunks, batch)

    def __call__(self, x, t, caption, caption_mask, **kwargs) -> torch.Tensor:
        return self.forward_many([((x, t, caption, caption_mask), kwargs)])[0]

    forward = __call__

    def _token_layout(self, geom: dict) -> TokenLayout:
        L = self.layout
        if L.cp_strategy == "cp_shuffle_overlap":
            return TokenLayout.per_chunk(geom["S"], geom["n"], L.cp_size)
        return TokenLayout.contiguous(geom["S"], L.cp_size)

    @torch.no_grad()
    def forward_many(self, calls: Sequence[tuple[tuple, dict]]) -> list[torch.Tensor]:
        """Run several independent forwards ``(args, kwargs)`` through the pipeline, interleaved."""
        L, m = self.layout, self.model
        sends, results, geoms = [], [], []
        for args, kwargs in calls:
            h, ctx, geom = m.prepare(*args, **kwargs)
            geoms.append(geom)
            tl = self._token_layout(geom)
            if L.cp_size > 1:
                ctx = localize(ctx, tl, L.cp_rank, geom)
                if L.cp_strategy == "cp_shuffle_overlap":
                    ctx.self_attention = ring_attention_fn(tl, L.cp_rank, L.cp_size, L.cp_group, geom, ctx)
                else:
                    ctx.self_attention = ulysses_attention_fn(tl, L.cp_rank, L.cp_group)
                h = h[:, tl.index[L.cp_rank].to(h.device)].contiguous()
            if not L.is_first_stage:
                h = torch.empty_like(h)
                dist.recv(h, src=L.global_rank(L.stage - 1, L.cp_rank))
            for i in self.layers:
                h = m.videodit_blocks.layers[i](h, ctx)
            if not L.is_last_stage:
                # asynchronous: this stage starts the next request while the next stage runs this one
                sends.append((dist.isend(h.contiguous(), dst=L.global_rank(L.stage + 1, L.cp_rank)), h))
                results.append(None)
                continue
            if L.cp_size > 1:
                h = gather_tokens(h, tl, L.cp_group)
            results.append(m.finish(h, geom))
        for work, _ in sends:
            work.wait()
        if L.pp_size > 1:
            results = [self._from_last_stage(v, geom, args) for v, geom, (args, _) in zip(results, geoms, calls)]
        return results

    def _from_last_stage(self, v, geom, args) -> torch.Tensor:
        """The velocity where it is used: sent last stage -> first stage (same cp rank), point to point."""
        L = self.layout
        x = args[0]
        if L.is_last_stage:
            dist.send(v.contiguous(), dst=L.global_rank(0, L.cp_rank))
            return v
        v = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        if L.is_first_stage:
            dist.recv(v, src=L.global_rank(L.pp_size - 1, L.cp_rank))
        else:
            v.zero_()  # a middle stage never reads the latents
        return v


__all__ = ["ParallelDiT", "build_stage_dit", "materialized_parameters", "owns_key"]
