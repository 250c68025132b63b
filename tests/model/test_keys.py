"""Exact official state-dict key sets, checked on the meta device (nothing allocated); see
docs/magi1.md#checkpoint-layout-and-keys.

The expected keys and shapes below are transcribed from MAGI-1's module definitions, not derived from the
model, so a renamed or reshaped parameter fails here.
"""

import pytest
import torch

from magi_model import build_dit, preset
from magi_model.dit import is_fp32_param
from magi_model.loading import CheckpointError, check_state_dict, load_state_dict_into, meta_keys

BF16, F32, FP8 = torch.bfloat16, torch.float32, torch.float8_e4m3fn

# Top level: 14 keys; (24B shape, 4.5B shape).
TOP = {
    "x_embedder.weight": ([6144, 32, 1, 2, 2], [3072, 16, 1, 2, 2]),
    "t_embedder.mlp.0.weight": ([1536, 256], [768, 256]),
    "t_embedder.mlp.0.bias": ([1536], [768]),
    "t_embedder.mlp.2.weight": ([1536, 1536], [768, 768]),
    "t_embedder.mlp.2.bias": ([1536], [768]),
    "y_embedder.null_caption_embedding": ([800, 4096], [800, 4096]),
    "y_embedder.y_proj_xattn.0.weight": ([6144, 4096], [3072, 4096]),
    "y_embedder.y_proj_xattn.0.bias": ([6144], [3072]),
    "y_embedder.y_proj_adaln.0.weight": ([1536, 4096], [768, 4096]),
    "y_embedder.y_proj_adaln.0.bias": ([1536], [768]),
    "rope.bands": ([16], [16]),
    "videodit_blocks.final_layernorm.weight": ([6144], [3072]),
    "videodit_blocks.final_layernorm.bias": ([6144], [3072]),
    "final_linear.linear.weight": ([128, 6144], [64, 3072]),
}

# 26 keys per layer (prefix videodit_blocks.layers.{i}.).
LAYER = {
    "ada_modulate_layer.proj.0.weight": ([12288, 1536], [6144, 768]),
    "ada_modulate_layer.proj.0.bias": ([12288], [6144]),
    "self_attention.linear_qkv.layer_norm.weight": ([6144], [3072]),
    "self_attention.linear_qkv.layer_norm.bias": ([6144], [3072]),
    "self_attention.linear_qkv.q.weight": ([6144, 6144], [3072, 3072]),
    "self_attention.linear_qkv.qx.weight": ([6144, 6144], [3072, 3072]),
    "self_attention.linear_qkv.k.weight": ([1024, 6144], [1024, 3072]),
    "self_attention.linear_qkv.v.weight": ([1024, 6144], [1024, 3072]),
    "self_attention.linear_kv_xattn.weight": ([2048, 6144], [2048, 3072]),
    "self_attention.linear_proj.weight": ([6144, 12288], [3072, 6144]),
    "self_attention.q_layernorm.weight": ([128], [128]),
    "self_attention.q_layernorm.bias": ([128], [128]),
    "self_attention.q_layernorm_xattn.weight": ([128], [128]),
    "self_attention.q_layernorm_xattn.bias": ([128], [128]),
    "self_attention.k_layernorm.weight": ([128], [128]),
    "self_attention.k_layernorm.bias": ([128], [128]),
    "self_attention.k_layernorm_xattn.weight": ([128], [128]),
    "self_attention.k_layernorm_xattn.bias": ([128], [128]),
    "self_attn_post_norm.weight": ([6144], [3072]),
    "self_attn_post_norm.bias": ([6144], [3072]),
    "mlp.layer_norm.weight": ([6144], [3072]),
    "mlp.layer_norm.bias": ([6144], [3072]),
    "mlp.linear_fc1.weight": ([32768, 6144], [12288, 3072]),
    "mlp.linear_fc2.weight": ([6144, 16384], [3072, 12288]),
    "mlp_post_norm.weight": ([6144], [3072]),
    "mlp_post_norm.bias": ([6144], [3072]),
}

# fp8 checkpoints: in layers 1..L-2 these 7 plain weights become fp8 modules: (in, out) per model, kind.
FP8_LINEARS = {
    "self_attention.linear_qkv.q": ("tensor", (6144, 6144), (3072, 3072)),
    "self_attention.linear_qkv.qx": ("tensor", (6144, 6144), (3072, 3072)),
    "self_attention.linear_qkv.k": ("tensor", (6144, 1024), (3072, 1024)),
    "self_attention.linear_qkv.v": ("tensor", (6144, 1024), (3072, 1024)),
    "mlp.linear_fc1": ("tensor", (6144, 32768), (3072, 12288)),
    "self_attention.linear_proj": ("channel", (12288, 6144), (6144, 3072)),
    "mlp.linear_fc2": ("channel", (16384, 6144), (12288, 3072)),
}

VARIANTS = ["4.5B_base", "4.5B_distill", "4.5B_distill_quant", "24B_base", "24B_distill", "24B_distill_quant"]
KEY_COUNTS = {"4.5B": (898, 1410), "24B": (1262, 1998)}  # key totals: (non-quant, fp8)


def official_meta_state_dict(variant: str) -> dict[str, torch.Tensor]:
    """Synthetic checkpoint on meta: the official keys, shapes and stored dtypes (bf16 / fp8 + fp32 scales)."""
    size = variant.split("_")[0]
    col = 0 if size == "24B" else 1
    layers = 48 if size == "24B" else 34
    quant = variant.endswith("quant")
    sd = {k: torch.empty(v[col], dtype=BF16, device="meta") for k, v in TOP.items()}
    for i in range(layers):
        pre = f"videodit_blocks.layers.{i}."
        q = quant and 0 < i < layers - 1
        for k, v in LAYER.items():
            mod = k.rsplit(".", 1)[0]
            if q and mod in FP8_LINEARS:
                continue
            sd[pre + k] = torch.empty(v[col], dtype=BF16, device="meta")
        if q:
            for mod, (kind, s24, s45) in FP8_LINEARS.items():
                fin, fout = s24 if col == 0 else s45
                sd[pre + mod + ".weight"] = torch.empty(1, fout, fin, dtype=FP8, device="meta")
                sd[pre + mod + ".weight_scale"] = torch.empty(1, dtype=F32, device="meta")
                if kind == "tensor":
                    sd[pre + mod + ".input_scale"] = torch.empty(fin, dtype=F32, device="meta")
                else:
                    sd[pre + mod + ".input_scale"] = torch.empty(1, dtype=F32, device="meta")
                    sd[pre + mod + ".smooth_scale"] = torch.empty(1, fin, dtype=F32, device="meta")
    return sd


def test_transcribed_tables_have_the_spec_counts():
    assert len(TOP) == 14 and len(LAYER) == 26
    for variant in VARIANTS:
        size = variant.split("_")[0]
        want = KEY_COUNTS[size][1 if variant.endswith("quant") else 0]
        assert len(official_meta_state_dict(variant)) == want


@pytest.mark.parametrize("variant", VARIANTS)
def test_official_keys_load_strictly_on_meta(variant):
    model = build_dit(preset(variant), device="meta")
    params = list(model.parameters())
    assert all(p.is_meta for p in params)  # nothing allocated
    sd = official_meta_state_dict(variant)
    got = model.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert tuple(got[k].shape) == tuple(v.shape), k
    load_state_dict_into(model, sd, strict=True)
    assert set(meta_keys(model)) == set(sd)  # assigned meta tensors: still no memory
    # dtypes after assignment follow MAGI-1: fp32 promotion set, fp8 weights / fp32 scales kept, rest as stored.
    for k, p in model.state_dict().items():
        if sd[k].dtype == FP8:
            assert p.dtype == FP8, k
        elif k.endswith("_scale"):
            assert p.dtype == F32, k
        else:
            assert p.dtype == (F32 if is_fp32_param(k) else BF16), k


def test_promotion_set():
    promoted = {k for k in official_meta_state_dict("4.5B_base") if is_fp32_param(k)}
    top = {k for k in TOP}
    per_layer = {k.split(".", 3)[3] for k in promoted if k.startswith("videodit_blocks.layers.0.")}
    assert top <= promoted  # every top-level key (embedders, rope, final norm / linear)
    assert per_layer == {"self_attention.q_layernorm.weight", "self_attention.q_layernorm.bias",
                         "self_attention.k_layernorm.weight", "self_attention.k_layernorm.bias",
                         "self_attn_post_norm.weight", "self_attn_post_norm.bias",
                         "mlp_post_norm.weight", "mlp_post_norm.bias"}


def test_parameter_counts():
    # Sum of the key table's shapes (docs/magi1.md#checkpoint-layout-and-keys); the embedding part is
    # 39,082,512 parameters for 24B.
    for variant, total, per_layer, layers in (("24B_base", 23_899_281_936, 497_087_488, 48),
                                              ("4.5B_base", 4_459_898_128, 130_579_456, 34)):
        model = build_dit(preset(variant), device="meta")
        n = sum(p.numel() for p in model.parameters())
        layer = sum(p.numel() for p in model.videodit_blocks.layers[0].parameters())
        assert (n, layer) == (total, per_layer)
        assert n - layers * per_layer == (39_082_512 if variant.startswith("24B") else 20_196_624)


def test_build_from_dict_and_path(tmp_path):
    import json

    from magi_model.config import preset_dict

    d = preset_dict("4.5B_distill")
    p = tmp_path / "c.json"
    p.write_text(json.dumps(d))
    for cfg in (d, str(p), p):
        m = build_dit(cfg, device="meta")
        assert len(m.state_dict()) == 898


@pytest.mark.parametrize("variant", ["4.5B_base", "24B_distill_quant"])
def test_readable_diff_on_meta(variant):
    model = build_dit(preset(variant), device="meta")
    sd = official_meta_state_dict(variant)
    sd.pop("rope.bands")
    for i in range(1, 5):
        sd.pop(f"videodit_blocks.layers.{i}.mlp_post_norm.bias")
    sd["videodit_blocks.layers.3.self_attention.extra.weight"] = torch.empty(3, device="meta")
    sd["x_embedder.weight"] = torch.empty(1, 2, 3, device="meta")
    with pytest.raises(CheckpointError) as ei:
        load_state_dict_into(model, sd, strict=True)
    msg = str(ei.value)
    assert "missing from the checkpoint (5)" in msg
    assert "videodit_blocks.layers.{1-4}.mlp_post_norm.bias   (4 layers)" in msg
    assert "rope.bands" in msg
    assert "unexpected in the checkpoint (1)" in msg and "layers.{3}.self_attention.extra.weight" in msg
    assert "x_embedder.weight: shape [1, 2, 3] in checkpoint, model needs" in msg
    assert len(ei.value.missing) == 5 and len(ei.value.unexpected) == 1 and len(ei.value.mismatched) == 1


def test_fp8_checkpoint_into_bf16_model_hints():
    model = build_dit(preset("24B_distill"), device="meta")
    header = {k: (tuple(v.shape), v.dtype) for k, v in official_meta_state_dict("24B_distill_quant").items()}
    with pytest.raises(CheckpointError, match="set engine_config.fp8_quant=true"):
        check_state_dict(model, header)
    # A bf16 weight where the model needs fp8 is a dtype error even in non-strict mode.
    model = build_dit(preset("4.5B_distill_quant"), device="meta")
    header = {k: (tuple(v.shape), v.dtype) for k, v in official_meta_state_dict("4.5B_distill_quant").items()}
    header["videodit_blocks.layers.1.mlp.linear_fc1.weight"] = ((1, 12288, 3072), BF16)
    with pytest.raises(CheckpointError, match=r"linear_fc1.weight: dtype bfloat16, model needs float8_e4m3fn"):
        check_state_dict(model, header, strict=False)
