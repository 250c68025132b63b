"""MAGI-1 VAE (docs/magi1.md#vae): checkpoint key set, tiling (vs untiled and vs hand-computed blends),
pixel conversions, strict loading."""

import json

import pytest
import torch

from magi_model import vae as V


def test_magi1_vae_keys_and_shapes_on_meta():
    with torch.device("meta"):
        model = V.ViTVAE(V.MAGI1_DDCONFIG)
    sd = {k: tuple(p.shape) for k, p in model.state_dict().items()}
    assert len(sd) == 2 * 24 * 10 + 2 * 6 + 2 + 2  # blocks; cls/pos/norm/last_layer; patch_embed; proj_in
    want = {
        "encoder.cls_token": (1, 1, 1024), "encoder.pos_embed": (1, 4097, 1024),
        "encoder.patch_embed.proj.weight": (1024, 3, 4, 8, 8), "encoder.patch_embed.proj.bias": (1024,),
        "encoder.blocks.23.attn.qkv.weight": (3072, 1024), "encoder.blocks.0.attn.qkv.bias": (3072,),
        "encoder.blocks.0.attn.proj.weight": (1024, 1024), "encoder.blocks.0.norm2.weight": (1024,),
        "encoder.blocks.0.mlp.fc1.weight": (4096, 1024), "encoder.blocks.0.mlp.fc2.weight": (1024, 4096),
        "encoder.norm.weight": (1024,), "encoder.last_layer.weight": (32, 1024),
        "decoder.proj_in.weight": (1024, 16), "decoder.cls_token": (1, 1, 1024), "decoder.pos_embed": (1, 4097, 1024),
        "decoder.blocks.23.mlp.fc2.bias": (1024,), "decoder.norm.bias": (1024,),
        "decoder.last_layer.weight": (3, 4, 3, 3, 3), "decoder.last_layer.bias": (3,),
    }
    for k, shape in want.items():
        assert sd[k] == shape, k
    assert not any("norm1" in k for k in sd)  # ln_in_attn: no pre-attention norm


def test_single_tile_equals_untiled():
    vae = V.tiny_vae(0)  # 64 px reference tiles: 8x8 latents, stride 6
    z = torch.randn(1, 16, 3, 6, 6)
    torch.testing.assert_close(vae.decode(z), vae.decode_tile(z), rtol=0, atol=0)
    x = torch.rand(1, 3, 12, 48, 48) * 2 - 1
    torch.testing.assert_close(vae.encode(x), vae.encode_tile(x), rtol=0, atol=0)


def _patch_local(vae):
    """A VAE whose output at a patch depends only on that patch: no blocks, no position table and a
    centre-tap decoder conv. Tiling must then reproduce the untiled result exactly."""
    with torch.no_grad():
        for part in (vae.encoder, vae.decoder):
            part.blocks = torch.nn.ModuleList()
            part.pos_embed.zero_()
        w = vae.decoder.last_layer.weight
        centre = w[:, :, 1, 1, 1].clone()
        w.zero_()
        w[:, :, 1, 1, 1] = centre
    return vae


def test_multi_tile_equals_untiled_for_a_patch_local_vae():
    vae = _patch_local(V.tiny_vae(1))
    z = torch.randn(1, 16, 6, 16, 20)  # 2 temporal x 3 x 4 spatial tiles
    torch.testing.assert_close(vae.decode(z), vae.decode_tile(z), rtol=1e-5, atol=1e-5)
    x = torch.rand(1, 3, 32, 128, 144) * 2 - 1  # 12 + 12 + 8 frames
    lat = vae.encode(x)
    assert lat.shape == (1, 16, 8, 16, 18)
    torch.testing.assert_close(lat, vae.encode_tile(x), rtol=1e-5, atol=1e-5)


def test_tile_blend_weights_by_hand():
    """Tiles of width 8, stride 6, blend 2, crop 6 over W=16; tile i returns the constant i."""
    calls = []

    def fn(tile):
        calls.append(tile.shape[-1])
        return torch.full_like(tile, float(len(calls) - 1))

    out = V.tiled(fn, torch.zeros(1, 1, 1, 1, 16), tile=(1, 1, 8), stride=(1, 1, 6), blend=(0, 0, 2), crop=(1, 1, 6),
                  blend_against="decoded")
    assert calls == [8, 8, 4]
    want = [0] * 6 + [0, 0.5, 1, 1, 1, 1] + [1, 1.5, 2, 2]
    assert out.flatten().tolist() == want


def test_pixel_conversions():
    u8 = torch.tensor([0, 255, 128], dtype=torch.uint8).view(1, 1, 1, 3)
    x = V.pixels_to_input(u8, torch.float32)
    assert x.shape == (1, 3, 1, 1, 1)
    torch.testing.assert_close(x.flatten(), torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]))
    # bf16 arithmetic and a truncating cast: -0.2119140625 * 127.5 + 127.5 = 100.48... -> bf16 100.5 -> 100.
    y = torch.tensor([-1.0, 1.0, 2.0, -0.2119140625, 0.0]).view(1, 1, 5, 1, 1).expand(1, 3, 5, 1, 1)
    px = V.output_to_pixels(y)
    assert px.shape == (5, 1, 1, 3) and px.dtype == torch.uint8
    assert px[:, 0, 0, 0].tolist() == [0, 255, 255, 100, 127]
    with pytest.raises(V.VAEError, match="argument 'frames' must be uint8"):
        V.pixels_to_input(torch.zeros(1, 4, 4, 3))


def test_prefix_encoders_and_decode_shapes():
    vae = V.tiny_vae(2)
    img = torch.randint(0, 256, (32, 48, 3), dtype=torch.uint8)
    assert V.encode_image(vae, img, 0.18215).shape == (1, 16, 1, 4, 6)
    vid = torch.randint(0, 256, (32, 32, 48, 3), dtype=torch.uint8)
    assert V.encode_video(vae, vid, 0.18215).shape == (1, 16, 8, 4, 6)  # 12 + 12 + 8 frames -> 3 + 3 + 2
    frames = V.decode_latents(vae, torch.randn(1, 16, 6, 4, 6), 0.18215)
    assert frames.shape == (24, 32, 48, 3) and frames.dtype == torch.uint8


def test_load_vae_strict(tmp_path):
    from safetensors.torch import save_file

    vae = V.tiny_vae(3)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "ViTVAE", "ddconfig": V.TINY_DDCONFIG}))
    sd = {k: v.contiguous() for k, v in vae.state_dict().items()}
    save_file(sd, str(tmp_path / V.WEIGHTS_FILE))
    loaded = V.load_vae(str(tmp_path), dtype=torch.float32)
    z = torch.randn(1, 16, 3, 4, 4)
    torch.testing.assert_close(loaded.decode(z), vae.decode(z))
    sd.pop("decoder.norm.bias")
    save_file(sd, str(tmp_path / V.WEIGHTS_FILE))
    with pytest.raises(V.VAEError, match=r"missing \['decoder.norm.bias'\]"):
        V.load_vae(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "ddconfig": {}}))
    with pytest.raises(V.VAEError, match="expected 'ViTVAE'"):
        V.load_vae(str(tmp_path))


# --------------------------------------------------------------------------------------------------
# MAGI-1's TileProcessor (inference/infra/parallelism/tile_parallel.py), restated plainly as the
# reference: tiles start every `stride`, the tile grid is scanned in (t, h, w) order, each tile is
# blended with its t-, h- and w-predecessor by a linear ramp over min(extent, both sizes) slices, then
# cropped and concatenated. tiled_decode blends a COPY of each tile against the predecessors' raw
# outputs, with the ramp computed in fp32 and rounded once (its blends are torch.compile'd);
# tiled_encode blends in place (predecessors already blended), eagerly in the tile's dtype.


def _reference_tiling(fn, x, tile, stride, extent, crop, decode):
    starts = [list(range(0, n, s)) for n, s in zip(x.shape[2:], stride)]
    grid = [len(s) for s in starts]
    raw = {}
    for i, t0 in enumerate(starts[0]):
        for j, h0 in enumerate(starts[1]):
            for k, w0 in enumerate(starts[2]):
                raw[i, j, k] = fn(x[:, :, t0:t0 + tile[0], h0:h0 + tile[1], w0:w0 + tile[2]])
    done = {}
    for i in range(grid[0]):
        for j in range(grid[1]):
            for k in range(grid[2]):
                b = raw[i, j, k].clone() if decode else raw[i, j, k]
                for dim, prev in ((2, (i - 1, j, k)), (3, (i, j - 1, k)), (4, (i, j, k - 1))):
                    if min(prev) < 0:
                        continue
                    a = raw[prev]  # decode: the unblended neighbour; encode: blended in place already
                    e = min(a.shape[dim], b.shape[dim], extent[dim - 2])
                    for n in range(e):
                        an, bn = a.narrow(dim, a.shape[dim] - e + n, 1), b.narrow(dim, n, 1)
                        if decode:
                            v = (an.float() * (1 - n / e) + bn.float() * (n / e)).to(b.dtype)
                        else:
                            v = an * (1 - n / e) + bn * (n / e)
                        bn.copy_(v)
                done[i, j, k] = b[:, :, :crop[0], :crop[1], :crop[2]]
    return torch.cat([torch.cat([torch.cat([done[i, j, k] for k in range(grid[2])], 4)
                                 for j in range(grid[1])], 3) for i in range(grid[0])], 2)


def _tile_dependent_decoder(dtype):
    """Upsample x8 (space) / x4 (time) plus a per-tile offset, so overlapping tiles disagree."""
    def fn(z):
        y = z.repeat_interleave(4, 2).repeat_interleave(8, 3).repeat_interleave(8, 4)[:, :3]
        return (y + z.float().mean() * 3 + z.shape[3] * 0.01).to(dtype)
    return fn


# latent (t, h, w) with the tiny VAE's 64 px tiles: 3 x 8 x 8 latent tiles, stride 3 / 6 / 6
DECODE_LAYOUTS = {"1x2": (3, 8, 12), "2x2": (3, 12, 12), "3x2": (3, 18, 12), "odd 3x3": (3, 13, 17),
                  "2 temporal x 2x2": (6, 12, 9), "odd temporal": (5, 7, 14)}


@pytest.mark.parametrize("layout", list(DECODE_LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiled_decode_matches_magi1_rule(layout, dtype):
    t, h, w = DECODE_LAYOUTS[layout]
    z = torch.randn(1, 3, t, h, w, generator=torch.Generator().manual_seed(t * 100 + h * 10 + w))
    fn = _tile_dependent_decoder(dtype)
    got = V.tiled(fn, z, tile=(3, 8, 8), stride=(3, 6, 6), blend=(0, 16, 16), crop=(12, 48, 48),
                  blend_against="decoded")
    want = _reference_tiling(fn, z, (3, 8, 8), (3, 6, 6), (0, 16, 16), (12, 48, 48), decode=True)
    assert got.shape == (1, 3, 4 * t, 8 * h, 8 * w) and got.dtype == dtype
    assert torch.equal(got, want)
    if h > 8 and w > 8:  # >= 2 x 2 tiles: blending against already-blended tiles gives another picture
        other = _reference_tiling(fn, z, (3, 8, 8), (3, 6, 6), (0, 16, 16), (12, 48, 48), decode=False)
        assert (other.float() - want.float()).abs().max() > 1e-3


@pytest.mark.parametrize("layout", ["2x2", "odd 3x3", "odd temporal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiled_encode_matches_magi1_rule(layout, dtype):
    t, h, w = DECODE_LAYOUTS[layout]  # the same tile grids, in pixels: 12 x 64 x 64 tiles, stride 12 / 48
    x = torch.rand(1, 3, 4 * t, 8 * h, 8 * w, generator=torch.Generator().manual_seed(7)) * 2 - 1

    def fn(tile):  # "encoder": 4 x 8 x 8 average pooling plus a per-tile offset
        y = torch.nn.functional.avg_pool3d(tile.float(), (4, 8, 8), ceil_mode=True)
        return (y + tile.float().mean() * 2).to(dtype)

    got = V.tiled(fn, x, tile=(12, 64, 64), stride=(12, 48, 48), blend=(0, 2, 2), crop=(3, 6, 6),
                  blend_against="blended")
    want = _reference_tiling(fn, x, (12, 64, 64), (12, 48, 48), (0, 2, 2), (3, 6, 6), decode=False)
    assert torch.equal(got, want)


def test_vae_decode_uses_magi1_rule_end_to_end():
    vae = V.tiny_vae(4)  # fp32, 64 px tiles
    z = torch.randn(1, 16, 3, 12, 9, generator=torch.Generator().manual_seed(1))  # 2 x 2 tiles
    want = _reference_tiling(vae.decode_tile, z, (3, 8, 8), (3, 6, 6), (0, 16, 16), (12, 48, 48), decode=True)
    assert torch.equal(vae.decode(z), want)


def test_tile_sizes_default_to_magi1_and_are_overridable():
    with torch.device("meta"):
        big = V.ViTVAE(V.MAGI1_DDCONFIG)
        other_ref = V.ViTVAE(dict(V.MAGI1_DDCONFIG, video_size=128))
    assert (big.tile_frames, big.tile_px) == (12, 256) == (other_ref.tile_frames, other_ref.tile_px)
    vae = V.tiny_vae(5)
    assert (vae.tile_frames, vae.tile_px) == (12, 64)
    z = torch.randn(1, 16, 3, 9, 9)
    # 96 px tiles (12 latents, stride 9) cover 9 x 9 latents in one tile: the untiled decoder's result;
    # the default 64 px tiles (8 latents, stride 6) need 2 x 2.
    untiled = vae.decode_tile(z)
    torch.testing.assert_close(vae.decode(z, tile_sample_min_size=96), untiled, rtol=0, atol=0)
    assert not torch.equal(vae.decode(z), untiled)
    with pytest.raises(V.VAEError, match="'tile_sample_min_size' must be a multiple of 32"):
        vae.decode(z, tile_sample_min_size=40)
    with pytest.raises(V.VAEError, match="'tile_sample_min_length' must be a multiple of the temporal factor"):
        V.tiny_vae(0, tile_sample_min_length=10)


def test_pixels_to_input_rounds_once_like_magi1():
    u8 = torch.arange(256, dtype=torch.uint8).view(1, 16, 16, 1).expand(1, 16, 16, 3)
    got = V.pixels_to_input(u8)  # bf16
    # MAGI-1 on a GPU: fp32 x * (1/127.5 rounded to fp32) - 1, then one rounding to bf16.
    import numpy as np
    v = np.arange(256, dtype=np.float32).reshape(16, 16)
    want32 = v * (np.float32(1) / np.float32(127.5)) - np.float32(1)
    want = torch.from_numpy(want32).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == (1, 3, 1, 16, 16)
    for c in range(3):
        assert torch.equal(got[0, c, 0].view(torch.int16), want.view(torch.int16))
    # Rounding to bf16 before the arithmetic (three roundings) changes half of the levels.
    triple = (u8.permute(3, 0, 1, 2)[None].to(torch.bfloat16) / 127.5 - 1)
    assert (triple != got).float().mean() > 0.25


def test_qkv_norm_runs_in_the_input_dtype():
    """MAGI-1's ManualLayerNorm on bf16: mean and std rounded to bf16, then x - mean, std + eps and the
    quotient each rounded to bf16 (not one fp32 computation rounded at the end)."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(64, 5, 64, generator=g) * 3 + torch.randn(64, 5, 1, generator=g) * 4).to(torch.bfloat16)
    got = V._qkv_norm(x)
    x64 = x.double()
    mean = x64.mean(-1, keepdim=True).to(torch.bfloat16)
    std = x64.std(-1, keepdim=True, unbiased=False).to(torch.bfloat16)
    d = (x.double() - mean.double()).to(torch.bfloat16)
    s = (std.double() + V.QKV_NORM_EPS).to(torch.bfloat16)
    want = (d.double() / s.double()).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    # mean / std are reduced in fp32 by torch and in fp64 here: allow their last-bit rounding to differ
    # on a handful of rows; everything downstream is exact.
    rows_equal = (got == want).all(-1).float().mean()
    assert rows_equal > 0.97
    fp32_once = ((x.float() - x.float().mean(-1, keepdim=True)) /
                 (x.float().std(-1, keepdim=True, unbiased=False) + V.QKV_NORM_EPS)).to(torch.bfloat16)
    assert (fp32_once != got).any()
