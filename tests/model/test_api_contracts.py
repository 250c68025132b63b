"""Public contracts of magi_model's building blocks: seeding KV cache rows (KVCache.fill_rows) and
the model interface ChunkSampler drives (SamplerModel)."""

import pytest
import torch

from magi_model import KVCache, build_dit
from magi_model.config import MagiConfig, preset_dict
from magi_model.pipeline import Captions, ChunkSampler, generate_latents

from ._reference import reference_forward


def _tiny(layers=1):
    d = preset_dict("tiny_random")
    d["model_config"].update(params_dtype="torch.float32", num_layers=layers, caption_max_length=16,
                             caption_channels=32, ffn_hidden_size=128)
    return MagiConfig.from_dict(d)


def test_fill_rows_seeds_what_a_forward_reads():
    """K|V rows computed elsewhere (here: by the float64 reference) seeded into an empty cache give the
    same forward as the reference reading its own cache."""
    cfg = _tiny()
    model = build_dit(cfg, seed=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 16, 18, 4, 4, generator=g)
    t = torch.rand(1, 3, generator=g)
    cap = torch.randn(1, 3, 16, 32, generator=g) * 0.5
    mask = torch.zeros(1, 3, 16)
    mask[..., :6] = 1
    n = 6 * 2 * 2  # tokens per chunk: 6 latent frames of 2 x 2 patches
    _, kv_ref = reference_forward(model, x[:, :, :12], torch.full((1, 2), 0.9999), cap[:, :2], mask[:, :2],
                                  dropped=[False], key_windows=[1, 1])
    want, _ = reference_forward(model, x[:, :, 12:], t[:, 2:], cap[:, 2:], mask[:, 2:], dropped=[False],
                                slice_point=2, key_windows=[3], cache=kv_ref)
    cache = KVCache.for_model(model, 3 * n)
    for layer in range(cfg.model.num_layers):
        rows = torch.cat([torch.cat(kv_ref[0][layer][c], dim=-1) for c in (0, 1)])  # (2n, ng, 2d)
        cache.fill_rows(layer, rows[None].float())
    assert cache.filled == 2 * n
    got = model(x[:, :, 12:], t[:, 2:], cap[:, 2:], mask[:, 2:], kv_cache=cache, slice_point=2, key_windows=[3])
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err < 1e-5
    # The seeded rows are what is read: zeroing them changes the result.
    empty = KVCache.for_model(model, 3 * n)
    for layer in range(cfg.model.num_layers):
        empty.fill_rows(layer, torch.zeros(1, 2 * n, 2, 128))
    other = model(x[:, :, 12:], t[:, 2:], cap[:, 2:], mask[:, 2:], kv_cache=empty, slice_point=2, key_windows=[3])
    assert ((other.double() - want).norm() / want.norm()).item() > 1e-3


@pytest.mark.parametrize("call, message", [
    (lambda c: c.fill_rows(5, torch.zeros(1, 4, 2, 8)), "argument 'layer' must be in"),
    (lambda c: c.fill_rows(0, torch.zeros(2, 4, 2, 8)), "argument 'kv' must be"),
    (lambda c: c.fill_rows(0, torch.zeros(1, 4, 2, 8), start=30), "do not fit the capacity 32"),
    (lambda c: c.fill_rows(0, torch.zeros(1, 4, 2, 8), start=-1), "do not fit"),
    (lambda c: (c.fill_rows(0, torch.zeros(1, 4, 2, 8)), c.fill_rows(0, torch.zeros(1, 4, 3, 8))),
     "argument 'kv' has \\(ng, 2d\\) = \\[3, 8\\]"),
])
def test_fill_rows_bad_input(call, message):
    cache = KVCache(2, 32, dtype=torch.float32)
    with pytest.raises(ValueError, match=message):
        call(cache)


def _captions(chunks):
    return Captions(torch.zeros(chunks, 4, 8), torch.ones(chunks, 4), torch.zeros(chunks, 4, 8), torch.ones(chunks, 4))


def _cfg():
    d = preset_dict("tiny_distill")
    d["runtime_config"].update(video_size_h=32, video_size_w=32, num_frames=24, num_steps=4)
    return MagiConfig.from_dict(d)


class _Velocity:
    """The smallest SamplerModel: a constant velocity; records how it was called."""

    def __init__(self):
        self.device, self.act_dtype = torch.device("cpu"), torch.float32
        self.videodit_blocks = type("Blocks", (), {"layers": [None, None]})()
        self.kwargs = set()

    def __call__(self, x, t, caption, caption_mask, **kwargs):
        self.kwargs |= set(kwargs)
        return torch.ones_like(x)


def test_sampler_model_interface_is_sufficient():
    model = _Velocity()
    out = generate_latents(model, _cfg(), _captions(1), seed=0, progress=False)
    assert out.shape == (1, 16, 6, 4, 4) and torch.isfinite(out).all()
    # The documented keyword arguments are the ones the sampler passes.
    assert model.kwargs <= {"caption_dropout", "distill_dt", "kv_cache", "slice_point", "key_windows",
                            "update_kv_cache", "write_chunks"}


@pytest.mark.parametrize("model, message", [
    (lambda x, t, c, m, **k: x, "lacks \\['device', 'act_dtype', 'videodit_blocks'\\]"),
    (type("NoCall", (), {"device": torch.device("cpu"), "act_dtype": torch.float32,
                         "videodit_blocks": type("B", (), {"layers": []})()})(), "is not callable"),
])
def test_sampler_rejects_incomplete_models(model, message):
    with pytest.raises(ValueError, match="argument 'model' must provide the SamplerModel interface.*" + message):
        ChunkSampler(model, _cfg(), _captions(1))
