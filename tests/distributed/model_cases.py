"""MAGI-1 tiny model across ranks (tests/distributed/test_model.py): the latents of a whole generation
under cp / pp layouts equal the single-process run's; stages hold only their layers; start-up checks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from magi_kernels.distributed import even_shard_sizes
from magi_model.config import MagiConfig, preset_dict, tokens_per_chunk
from magi_model.dit import build_dit
from magi_model.parallel import (
    ParallelConfigError,
    ParallelDiT,
    build_stage_dit,
    check_same_on_all_ranks,
    make_layout,
    materialized_parameters,
    stage_layers,
)
from magi_model.pipeline import Captions, generate_latents
from tests.distributed._count import count_collectives

REL_TOL = 1e-5  # fp32 model: relative L2 error of the latents


def tiny_cfg(name="tiny_random", **runtime) -> MagiConfig:
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


def check_generation(rank, world, seed, *, cp, pp, strategy, name="tiny_random"):
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
    caches, forwards = [], []
    inner = pdit.forward_many

    def spy(calls):
        caches.extend(kw["kv_cache"] for _, kw in calls if kw.get("kv_cache") is not None)
        forwards.extend(calls)
        return inner(calls)
    pdit.forward_many = spy
    caps = captions(model, 2, seed)
    check_same_on_all_ranks("config and captions", (cfg.to_dict(), caps))
    with count_collectives() as counts:
        got = generate_latents(pdit, cfg, caps, seed=seed, progress=False)
    _check_cache_is_local(caches[-1], cfg, cp, strategy, own)
    if pp == 1:
        # one all_gather per forward (the tokens before the final layer); none per layer: the ring
        # attention gets every rank's shard lengths from the token layout
        assert counts["all_gather"] == len(forwards), (dict(counts), len(forwards))
    else:
        # the velocity goes point to point from the last stage to the first, once per forward: no broadcast
        assert counts["broadcast"] == 0, dict(counts)
        assert counts["send"] == (len(forwards) if layout.is_last_stage else 0), (dict(counts), len(forwards))
        assert counts["recv"] == len(forwards) * (1 if layout.is_first_stage else 0) + \
            (len(forwards) if layout.stage > 0 else 0), (dict(counts), len(forwards))
    err, frames_off = 0.0, 0.0
    if rank == 0:
        want = _reference(cfg, seed)[0]
        err = _rel(got, want)
        frames_off = _frames_differ(got, want, cfg, seed)
    ref = got.clone()
    dist.broadcast(ref, src=0)
    assert err <= REL_TOL, f"relative error {err:.3g} > {REL_TOL}"
    assert frames_off <= 1e-4, f"{frames_off:.2%} of the decoded uint8 frame values differ"
    if layout.is_first_stage or layout.is_last_stage:  # they hold the video's latents (middle stages need none)
        assert torch.equal(ref, got)


def _check_cache_is_local(cache, cfg, cp, strategy, own):
    """The KV cache holds only this stage's layers and, per layer, this rank's share: its kv heads for
    every token (cp_ulysses) or its piece of every chunk with all kv heads (cp_shuffle_overlap)."""
    m = cfg.model
    n = tokens_per_chunk(cfg)
    for i, buf in enumerate(cache.buffers):
        if i not in own:
            assert buf is None, f"layer {i} of another stage has a cache buffer"
            continue
        _, tokens, heads, width = buf.shape
        assert width == 2 * m.kv_channels
        if strategy == "cp_ulysses":
            assert heads == max(m.num_query_groups, cp) // cp and tokens == cache.capacity, buf.shape
        else:
            assert heads == m.num_query_groups, buf.shape
            assert tokens == cache.capacity // n * max(even_shard_sizes(n, cp)) or \
                tokens == cache.capacity // n * min(even_shard_sizes(n, cp)), buf.shape


def _frames_differ(a, b, cfg, seed) -> float:
    """Fraction of uint8 video values (what goes into the mp4) that differ after decoding both latents;
    values may differ only by one level (rounding of a 1e-6 latent difference)."""
    from magi_model.vae import decode_latents

    vae = _vae(seed)
    fa, fb = (decode_latents(vae, x, cfg.runtime.scale_factor) for x in (a, b))
    diff = (fa.int() - fb.int()).abs()
    assert int(diff.max()) <= 1, int(diff.max())
    return float((diff > 0).float().mean())


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
        c["tile_parallel_vae"] = check_tile_parallel_vae
        c["decode_overlapped_with_denoising"] = check_decode_overlapped_with_denoising
    if world == 4:
        c["cp4_ulysses"] = lambda r, w, s: check_generation(r, w, s, cp=4, pp=1, strategy="cp_ulysses")
        c["pp2_cp2_ulysses"] = lambda r, w, s: check_generation(r, w, s, cp=2, pp=2, strategy="cp_ulysses")
        c["cp4_shuffle_overlap_distill"] = lambda r, w, s: check_generation(
            r, w, s, cp=4, pp=1, strategy="cp_shuffle_overlap", name="tiny_distill")
    if world == 8:
        c["pp2_cp4_ulysses"] = lambda r, w, s: check_generation(r, w, s, cp=4, pp=2, strategy="cp_ulysses")
    return c


def _vae(seed):
    from magi_model.vae import tiny_vae

    return tiny_vae(seed, dtype=torch.float32, tile_sample_min_length=12, tile_sample_min_size=32)


def check_tile_parallel_vae(rank, world, seed):
    """Decode and encode with tiles spread over the group give exactly the one-process frames."""
    from magi_model.parallel.vae import tile_runner

    vae = _vae(seed)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, 16, 6, 8, 8, generator=g)  # 2 x 3 x 3 = 18 tiles
    want = vae.decode(z)
    got = vae.decode(z, run_tiles=tile_runner())
    assert torch.equal(got, want), float((got - want).abs().max())
    x = torch.rand(1, 3, 24, 64, 64, generator=g) * 2 - 1
    assert torch.equal(vae.encode(x, run_tiles=tile_runner()), vae.encode(x))


def check_decode_overlapped_with_denoising(rank, world, seed):
    """cp=world: chunks decode (tile-parallel, on a side thread and group) while the DiT denoises later
    chunks; the frames equal a serial decode of the final latents, and chunk 0 was handed over while
    DiT forwards were still to come."""
    from magi_model.parallel.vae import OverlappedDecoder, tile_runner
    from magi_model.vae import decode_latents

    cfg = tiny_cfg()
    layout = make_layout(world, 1, "cp_ulysses", "cpu")
    pdit = ParallelDiT(build_stage_dit(cfg, layout, seed=seed), layout)
    vae = _vae(seed)
    calls = {"n": 0}
    submitted_at = {}
    inner = pdit.forward_many

    def counting(c):
        calls["n"] += len(c)
        return inner(c)
    pdit.forward_many = counting
    frames = {}
    runner = tile_runner(layout.vae_group)
    dec = OverlappedDecoder(lambda lat: decode_latents(vae, lat, cfg.runtime.scale_factor, runner),
                            lambda i, f: frames.__setitem__(i, f))

    def on_chunk(i, lat):
        submitted_at[i] = calls["n"]
        dec(i, lat)
    lat = generate_latents(pdit, cfg, captions(pdit, 2, seed), seed=seed, on_chunk=on_chunk, progress=False)
    dec.close()
    assert submitted_at[0] < calls["n"], (submitted_at, calls)  # DiT work remained after chunk 0 was final
    serial = decode_latents(vae, lat, cfg.runtime.scale_factor)
    assert torch.equal(torch.cat([frames[i] for i in sorted(frames)]), serial)
    assert [e for e in dec.events if e[0] == "done"] == [("done", 0), ("done", 1)]

