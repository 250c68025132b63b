"""Autoregressive pipeline (docs/magi1.md#sampling-schedule): which forwards run with what, CFG mixing, cache writes,
stagger, distill blend, prefixes -- against hand-derived references from the time grid."""

import pytest
import torch

from magi_model import build_dit
from magi_model import schedule as S
from magi_model.config import MagiConfig, preset_dict
from magi_model.pipeline import Captions, ChunkSampler, generate_latents, initial_noise

L, CC = 16, 8  # small caption tensors for the fake model


def small_cfg(name="tiny_random", num_frames=48, num_steps=8, **model):
    d = preset_dict(name)
    d["runtime_config"].update(video_size_h=32, video_size_w=32, num_frames=num_frames, num_steps=num_steps)
    d["model_config"].update(model)
    return MagiConfig.from_dict(d)


def captions(n_chunks, L=L, Cc=CC, offset=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(n_chunks, L, Cc, generator=g)
    cmask = torch.zeros(n_chunks, L)
    cmask[offset:, :5] = 1
    null = torch.zeros(n_chunks, L, Cc)
    nmask = torch.zeros(n_chunks, L)
    nmask[:, :3] = 1
    return Captions(cond, cmask, null, nmask)


class FakeDiT:
    """Records every forward; velocity = a constant chosen by ``value(call)``."""

    def __init__(self, config, value):
        self.config, self.value, self.calls = config, value, []
        self.videodit_blocks = type("B", (), {"layers": [None]})()
        self.device, self.act_dtype = torch.device("cpu"), torch.float32

    def __call__(self, x, t, cap, mask, *, caption_dropout=False, distill_dt=None, kv_cache=None, slice_point=0,
                 key_windows=None, update_kv_cache=False, write_chunks=None):
        call = dict(x=x.clone(), t=t.clone(), mask_sum=mask.sum(-1).clone(), dropout=caption_dropout, dt=distill_dt,
                    cache=kv_cache is not None, slice_point=slice_point, key_windows=list(key_windows),
                    update=update_kv_cache, write_chunks=write_chunks, N=x.shape[0], R=t.shape[1])
        self.calls.append(call)
        v = torch.zeros_like(x)
        cw = x.shape[2] // t.shape[1]
        for j in range(t.shape[1]):
            v[:, :, j * cw:(j + 1) * cw] = self.value(call, j)
        return v


def test_cfg3_passes_cache_writer_stagger_and_mixing():
    cfg = small_cfg("tiny_random")  # 48 frames -> 2 chunks; 8 steps, window 4 -> 2 steps per stage, 5 stages
    c1, c2, c3 = 3.0, 2.0, 0.5  # velocities of: text+context, context (null text), unconditional

    def value(call, j):
        return c3 if not call["cache"] else (c2 if call["dropout"] is True else c1)

    fake = FakeDiT(cfg, value)
    out = generate_latents(fake, cfg, captions(2), progress=False)
    n_steps = S.total_steps(2, 8, 4)
    assert n_steps == 10 and len(fake.calls) == 3 * n_steps
    grid = S.time_grid(8)
    for k in range(n_steps):
        p1, p2, p3 = fake.calls[3 * k: 3 * k + 3]
        assert p1["dropout"] is False and not p1["update"] and p1["cache"]
        assert p2["dropout"] is True and p2["update"] and p2["cache"]  # only the null-text pass writes
        assert not p3["cache"] and p3["slice_point"] == 0 and p3["key_windows"] == [1] and p3["R"] == 1
        assert all(p3["dropout"])
        stage, d = divmod(k, 2)
        # T2V, 2 chunks, W=4: clip_start = [0,0,0,0,1], clip_end = [1,2,2,2,2]; the window slides once, so
        # the clean re-forward of chunk 0 happens once, at stage 4, d = 0.
        extra = stage == 4 and d == 0
        want = {0: (0, 1), 1: (0, 2), 2: (0, 2), 3: (0, 2), 4: (0, 2) if d == 0 else (1, 1)}[stage]
        assert (p1["slice_point"], p1["R"]) == want == (p2["slice_point"], p2["R"])
        if extra:
            assert p1["t"][0, 0].item() == pytest.approx(0.9999)
            assert p1["key_windows"][0] == 1  # clean chunk sees only itself
            assert p1["mask_sum"][0].tolist() == [3, 5]  # clean chunk gets the null caption in every pass
            assert p3["N"] == 1  # the extra chunk is not part of the unconditional batch
        # Stagger: in stages 1..3 both chunks denoise, one quarter (2 grid indices) apart.
        if 1 <= stage <= 3:
            torch.testing.assert_close(p1["t"][0], grid[[2 * stage + d, 2 * (stage - 1) + d]])
            assert p3["N"] == 2
    # Independent reference: every chunk visits grid points 0..7 once; v = uncond + s_p (pre - uncond)
    # + s_t (text - pre) with (1.5, 7.5) below t = 0.3 and (1, 0) from 0.3 on (docs/magi1.md#classifier-free-guidance).
    x0 = initial_noise(cfg, 12, cfg.runtime.seed)
    inc = 0.0
    for i in range(8):
        s_p, s_t = (1.5, 7.5) if grid[i] < 0.3 - 1e-6 else (1.0, 0.0)
        inc += (c3 + s_p * (c2 - c3) + s_t * (c1 - c2)) * float(grid[i + 1] - grid[i])
    torch.testing.assert_close(out, x0 + inc, rtol=0, atol=1e-5)


def test_distill_single_pass_step_embedding_and_nearly_clean_blend():
    cfg = small_cfg("tiny_distill")

    def value(call, j):  # 2.0 on the appended self-only copy, 1.0 elsewhere
        appended = call["write_chunks"] is not None and call["write_chunks"] < call["R"] and j == call["R"] - 1
        return 2.0 if appended else 1.0

    fake = FakeDiT(cfg, value)
    out = generate_latents(fake, cfg, captions(2), progress=False, prev_chunks_scale=0.7)
    grid = S.time_grid(8)
    assert len(fake.calls) == S.total_steps(2, 8, 4)
    for c in fake.calls:
        assert c["dropout"] is False and c["update"] and c["dt"] == 8 / 4 * 2
        oldest = 1 if c["t"][0, 0].item() == pytest.approx(0.9999) else 0
        blended = c["t"][0, oldest].item() > 0.3
        assert (c["write_chunks"] < c["R"]) == blended
        if blended:  # the copy sees only itself and repeats the oldest chunk's t and caption
            assert c["key_windows"][-1] == 1 and c["t"][0, -1] == c["t"][0, oldest]
            assert c["mask_sum"][0, -1] == c["mask_sum"][0, oldest] == 5
    x0 = initial_noise(cfg, 12, cfg.runtime.seed)
    inc = sum((0.7 * 1 + 0.3 * 2 if float(grid[i]) > 0.3 else 1.0) * float(grid[i + 1] - grid[i]) for i in range(8))
    torch.testing.assert_close(out, x0 + inc, rtol=0, atol=1e-5)


def test_i2v_and_v2v_prefixes():
    zero = lambda call, j: 0.0  # noqa: E731 - velocity 0: the latents only change by the prefix writes
    cfg = small_cfg("tiny_distill", num_frames=40)
    img = torch.full((1, 16, 1, 4, 4), 7.0)
    fake = FakeDiT(cfg, zero)
    out = generate_latents(fake, cfg, captions(2), mode="i2v", prefix_latent=img, progress=False)
    x0 = initial_noise(cfg, 12, cfg.runtime.seed)
    assert out.shape[2] == S.chunk_layout(40, mode="i2v").output_latent_frames == 12
    assert (out[:, :, :1] == 7).all() and torch.equal(out[:, :, 1:], x0[:, :, 1:])  # frame 0 kept (docs/magi1.md#i2v-and-v2v)
    assert all((c["x"][:, :, 0] == 7).all() for c in fake.calls if c["slice_point"] == 0)

    pre = torch.full((1, 16, 8, 4, 4), 5.0)
    fake = FakeDiT(cfg, zero)
    out = generate_latents(fake, cfg, captions(3, offset=1), mode="v2v", prefix_latent=pre, progress=False)
    plan = S.chunk_layout(40, mode="v2v", prefix_latent_frames=8)
    assert (plan.infer_chunk_num, plan.chunk_offset, out.shape[2]) == (3, 1, plan.output_latent_frames)
    x0 = initial_noise(cfg, 18, cfg.runtime.seed)
    torch.testing.assert_close(out, x0[:, :, 8:])  # the prefix is not output
    first = fake.calls[0]  # prefix chunk 0 fills the cache first: clean, self-only, null text
    assert first["slice_point"] == 0 and first["update"] and first["key_windows"] == [1] and first["R"] == 1
    assert first["t"].tolist() == [[pytest.approx(0.9999)]] and first["mask_sum"].tolist() == [[3]]
    assert (first["x"] == 5).all()
    # Prefix frames 6-7 are written into chunk 1 before every forward that contains it.
    for c in fake.calls[1:]:
        if c["slice_point"] == 1:
            assert (c["x"][:, :, :2] == 5).all()


def test_sampler_argument_errors():
    cfg = small_cfg("tiny_distill")
    fake = FakeDiT(cfg, lambda c, j: 0.0)
    with pytest.raises(ValueError, match="argument 'prefix_latent' is required for mode 'i2v'"):
        ChunkSampler(fake, cfg, captions(2), mode="i2v")
    with pytest.raises(ValueError, match=r"argument 'prefix_latent' must be \(1, C, P, 4, 4\)"):
        ChunkSampler(fake, cfg, captions(2), mode="i2v", prefix_latent=torch.zeros(1, 16, 1, 8, 8))
    with pytest.raises(ValueError, match="argument 'captions' must hold one caption per latent chunk \\(2\\)"):
        ChunkSampler(fake, cfg, captions(3))


def test_real_tiny_dit_chunkwise_prompts_are_causal_and_deterministic():
    """Chunk 1's prompt must not change chunk 0 (block-causal attention, per-chunk cross-attention)."""
    cfg = small_cfg("tiny_random", num_steps=4, num_layers=2, caption_max_length=L, caption_channels=CC)
    model = build_dit(cfg, seed=3)
    a = captions(2, seed=1)
    null, nmask = model.null_caption(2)
    a = Captions(a.cond, a.cond_mask, null[0], nmask[0])
    b = Captions(a.cond.clone(), a.cond_mask, a.null, a.null_mask)
    b.cond[1] = torch.randn(L, CC)
    va = generate_latents(model, cfg, a, progress=False)
    vb = generate_latents(model, cfg, b, progress=False)
    assert torch.equal(va, generate_latents(model, cfg, a, progress=False))  # seeded, deterministic
    assert torch.equal(va[:, :, :6], vb[:, :, :6])
    assert (va[:, :, 6:] - vb[:, :, 6:]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["tiny_random", "tiny_distill"])
def test_cached_kv_of_a_finished_chunk_is_its_clean_self_only_forward(name):
    """Chunk 0's cache entry = a standalone forward of its final latents at clean_t, null caption, seeing
    only itself -- with the null-text adaLN row for base models (the 2nd CFG pass writes), the
    conditional row for distilled ones (the single pass writes)."""
    from magi_model import KVCache

    cfg = small_cfg(name, num_steps=4, num_layers=2, caption_max_length=L, caption_channels=CC,
                    params_dtype="torch.float32")
    model = build_dit(cfg, seed=4)
    null, nmask = model.null_caption(2)
    caps = captions(2, seed=2)
    caps = Captions(caps.cond, caps.cond_mask, null[0], nmask[0])
    sampler = ChunkSampler(model, cfg, caps)
    out = sampler.run(initial_noise(cfg, 12, 0), progress=False)
    ref = KVCache.for_model(model, sampler.n_tok)
    model(out[:, :, :6], torch.full((1, 1), cfg.runtime.clean_t), null[:, :1], nmask[:, :1],
          caption_dropout=name == "tiny_random", distill_dt=cfg.distill_dt, kv_cache=ref, key_windows=[1],
          update_kv_cache=True)
    n = sampler.n_tok
    for got, want in zip(sampler.kv_cache.buffers, ref.buffers):
        torch.testing.assert_close(got[:, :n], want[:, :n], rtol=1e-4, atol=1e-5)
    # The other adaLN row gives a different cache: the check above does tell the passes apart.
    other = KVCache.for_model(model, sampler.n_tok)
    model(out[:, :, :6], torch.full((1, 1), cfg.runtime.clean_t), null[:, :1], nmask[:, :1],
          caption_dropout=name != "tiny_random", distill_dt=cfg.distill_dt, kv_cache=other, key_windows=[1],
          update_kv_cache=True)
    assert (other.buffers[1][:, :n] - ref.buffers[1][:, :n]).abs().max() > 1e-3
