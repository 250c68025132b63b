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

    out = V.tiled(fn, torch.zeros(1, 1, 1, 1, 16), tile=(1, 1, 8), stride=(1, 1, 6), blend=(0, 0, 2), crop=(1, 1, 6))
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
