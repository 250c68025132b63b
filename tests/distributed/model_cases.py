"""MAGI-1 tiny model across ranks (tests/distributed/test_model.py): the latents of a whole generation
under cp / pp layouts equal the single-process run's; stages hold only their layers; start-up checks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from magi_model.config import MagiConfig, preset_dict
from magi_model.dit import build_dit
from magi_model.parallel import (ParallelConfigError, ParallelDiT, build_stage_dit, check_same_on_all_ranks,
                                 make_layout, materialized_parameters, stage_layers)
from magi_model.pipeline import Captions, generate_latents

REL_TOL = 1e-5  # fp32 model: relative L2 error of the latents


def tiny_cfg(name="tiny", **runtime) -> MagiConfig:
    d = preset_dict(name)
    d["model_config"]["params_dtype"] = "torch.float32"
    # 64x64 video, 48 frames -> 2 latent chunks of 6 frames x 16 tokens; 4 steps (window 4): 5 DiT steps
    d["runtime_config"].update(dict(video_size_h=64, video_size_w=64, num_frames=48, num_steps=4), **runtime)
    return MagiConfig.from_dict(d)


def captions(model, n_chunks: int, seed: int) -> Captions:
    null, null_mask = model.null_caption(n_chunks)
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(null.shape[1:], generator=g) * 0.2
    mask = torch.zeros(null_mask.shape[1:])
    mask[:, :7] = 1
    mask[1:, 7:11] = 1  # a different caption length per chunk
    return Captions(cond, mask, null[0], null_mask[0])


def _reference(cfg, seed):
    model = build_dit(cfg, seed=seed)
    caps = captions(model, 2, seed)
    return generate_latents(model, cfg, caps, seed=seed, progress=False), caps


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def check_generation(rank, world, seed, *, cp, pp, strategy, name="tiny"):
    cfg = tiny_cfg(name)
    layout = make_layout(cp, pp, strategy, "cpu")
    model = build_stage_dit(cfg, layout, seed=seed)
    # A stage materializes only its own layers.
    own = stage_layers(cfg.model.num_layers, pp, layout.stage)
    for i, layer in enumerate(model.videodit_blocks.layers):
        assert all(p.is_meta != (i in own) for p in layer.parameters()), f"layer {i} on stage {layout.stage}"
    full = build_dit(cfg, device="meta")
    per_layer = sum(p.numel() for p in full.videodit_blocks.layers[0].parameters())
    top = sum(p.numel() for n, p in full.named_parameters() if not n.startswith("videodit_blocks.layers."))
    assert materialized_parameters(model) == top + len(own) * per_layer
    pdit = ParallelDiT(model, layout)
    caps = captions(model, 2, seed)
    check_same_on_all_ranks("config and captions", (cfg.to_dict(), caps))
    got = generate_latents(pdit, cfg, caps, seed=seed, progress=False)
    err = _rel(got, _reference(cfg, seed)[0]) if rank == 0 else 0.0
    ref = got.clone()
    dist.broadcast(ref, src=0)  # every rank must hold the same latents (any rank can write the video)
    assert err <= REL_TOL, f"relative error {err:.3g} > {REL_TOL}"
    assert torch.equal(ref, got)


def check_interleaved_requests(rank, world, seed):
    """pp = world: two requests pipelined through forward_many give each request's own result."""
    from magi_model.parallel.interleave import generate_latents_interleaved

    cfg = tiny_cfg("tiny_distill")
    layout = make_layout(1, world, "none", "cpu")
    pdit = ParallelDiT(build_stage_dit(cfg, layout, seed=seed), layout)
    caps = [captions(pdit, 2, seed), captions(pdit, 2, seed + 1)]
    got = generate_latents_interleaved(pdit, cfg, caps, seeds=[seed, seed + 5])
    if rank == 0:
        model = build_dit(cfg, seed=seed)
        for c, s, g in zip(caps, [seed, seed + 5], got):
            want = generate_latents(model, cfg, c, seed=s, progress=False)
            assert _rel(g, want) <= REL_TOL


def check_mismatch_detected(rank, world, seed):
    try:
        check_same_on_all_ranks("prompt", {"prompt": "a fox" if rank else "a cat"})
    except ParallelConfigError as e:
        assert "prompt" in str(e) and "rank" in str(e)
        return
    raise AssertionError("a differing prompt was not detected")


def check_bad_layout(rank, world, seed):
    from magi_model.parallel import check_layout

    cfg = tiny_cfg()
    for kw, words in (({"cp_size": 3, "pp_size": 1}, "must equal the world size"),
                      ({"cp_size": world, "pp_size": 1, "cp_strategy": "bogus"}, "cp_strategy"),
                      ({"cp_size": 1, "pp_size": world * 8}, "pp_size")):
        try:
            check_layout(cfg, world if "pp_size" not in kw or kw["pp_size"] < 8 else world * 8, **kw)
        except ParallelConfigError as e:
            assert words in str(e), str(e)
        else:
            raise AssertionError(f"{kw} accepted")


def cases(world: int) -> dict:
    c = {}
    if world == 2:
        c["start_up_mismatch"] = check_mismatch_detected
        c["bad_layout"] = check_bad_layout
        c["cp2_shuffle_overlap"] = lambda r, w, s: check_generation(r, w, s, cp=2, pp=1,
                                                                    strategy="cp_shuffle_overlap")
        c["pp2_interleaved_requests"] = check_interleaved_requests
    if world == 4:
        c["cp4_ulysses"] = lambda r, w, s: check_generation(r, w, s, cp=4, pp=1, strategy="cp_ulysses")
        c["pp2_cp2_ulysses"] = lambda r, w, s: check_generation(r, w, s, cp=2, pp=2, strategy="cp_ulysses")
        c["cp4_shuffle_overlap_distill"] = lambda r, w, s: check_generation(
            r, w, s, cp=4, pp=1, strategy="cp_shuffle_overlap", name="tiny_distill")
    if world == 8:
        c["pp2_cp4_ulysses"] = lambda r, w, s: check_generation(r, w, s, cp=4, pp=2, strategy="cp_ulysses")
    return c
