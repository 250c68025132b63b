"""Config parsing (docs/magi1.md#configuration): official presets, defaults, and readable errors for bad configs."""

import json

import pytest
import torch

from magi_model.config import PRESETS, ConfigError, MagiConfig, load_config, preset, preset_dict


@pytest.mark.parametrize("name", PRESETS)
def test_presets_parse_strictly_and_round_trip(name, tmp_path):
    cfg = preset(name)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(preset_dict(name)))
    again = MagiConfig.from_json(path, strict=True)
    assert again.to_dict() == cfg.to_dict()


def test_official_values():
    c = preset("24B_distill_quant")
    m = c.model
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups) == (48, 6144, 16384, 48, 8)
    assert (m.cond_hidden, m.xattn_hidden, m.rope_bands, m.rotary_dim, m.latent_channels) == (1536, 6144, 16, 96, 16)
    assert m.params_dtype == torch.bfloat16 and m.gated_linear_unit and m.half_channel_vae and m.x_rescale_factor == 0.1
    assert c.runtime.cfg_number == 1 and c.runtime.num_steps == 16 and c.engine.fp8_quant and c.engine.distill
    assert c.weight_subdir == "inference_weight.fp8.distill" and c.distill_dt == 8
    c = preset("4.5B_distill")
    assert c.model.cond_hidden == 768 and c.weight_subdir == "inference_weight.distill" and c.distill_dt == 32
    assert preset("4.5B_base").weight_subdir == "inference_weight"
    assert preset("4.5B_base").runtime.cfg_number == 3


def test_defaults_fill_omitted_fields_and_strict_mode_requires_them():
    d = preset_dict("4.5B_base")
    del d["model_config"]["patch_size"], d["runtime_config"]["seed"], d["engine_config"]["shortcut_mode"]
    c = MagiConfig.from_dict(d)
    assert c.model.patch_size == 2 and c.runtime.seed == 1234 and c.engine.shortcut_mode == "8,16,16"
    with pytest.raises(ConfigError, match=r"missing fields \['patch_size'\].*strict"):
        MagiConfig.from_dict(d, strict=True)


def test_dit_only_dict_is_enough():
    d = preset_dict("24B_distill")
    c = load_config({"model_config": d["model_config"], "engine_config": d["engine_config"]})
    assert c.runtime.cfg_number == 1 and c.runtime.video_size_h is None


@pytest.mark.parametrize("section,field", [("model_config", "hidden_size"), ("model_config", "params_dtype"),
                                           ("runtime_config", "cfg_number"), ("runtime_config", "video_size_w")])
def test_missing_required_field(section, field):
    d = preset_dict("4.5B_base")
    del d[section][field]
    with pytest.raises(ConfigError, match=rf"'{section}' is missing fields \['{field}'\]"):
        MagiConfig.from_dict(d)


def test_missing_section_and_unknown_field():
    with pytest.raises(ConfigError, match="missing section 'model_config'"):
        MagiConfig.from_dict({"runtime_config": {}})
    d = preset_dict("4.5B_base")
    d["model_config"]["hiden_size"] = 3
    with pytest.raises(ConfigError, match=r"unknown fields in 'model_config': \['hiden_size'\]"):
        MagiConfig.from_dict(d)


@pytest.mark.parametrize("field,value", [("video_size_h", 720 + 8), ("video_size_w", 100), ("video_size_h", 0)])
def test_video_size_multiple_of_16(field, value):
    d = preset_dict("4.5B_base")
    d["runtime_config"][field] = value
    with pytest.raises(ConfigError, match=rf"runtime_config.{field} must be a positive multiple of 16"):
        MagiConfig.from_dict(d)


@pytest.mark.parametrize("name,cfg_number", [("4.5B_base", 1), ("24B_distill", 3), ("4.5B_distill_quant", 3)])
def test_cfg_number_rule(name, cfg_number):
    d = preset_dict(name)
    d["runtime_config"]["cfg_number"] = cfg_number
    with pytest.raises(ConfigError, match=r"runtime_config.cfg_number must be [13] when distill="):
        MagiConfig.from_dict(d)


@pytest.mark.parametrize("section,field,value,pattern", [
    ("model_config", "params_dtype", "bf16", "params_dtype must be one of"),
    ("model_config", "kv_channels", 64, "kv_channels must equal hidden_size / num_attention_heads = 128"),
    ("model_config", "num_query_groups", 5, "must be a multiple of num_query_groups"),
    ("model_config", "num_layers", "34", "num_layers must be an integer"),
    ("model_config", "gated_linear_unit", 1, "gated_linear_unit must be true or false"),
    ("runtime_config", "num_steps", 30, "num_steps must be a positive multiple of window_size"),
    ("engine_config", "shortcut_mode", "8,8,8", "shortcut_mode must be"),
])
def test_bad_values(section, field, value, pattern):
    d = preset_dict("4.5B_base")
    d[section][field] = value
    with pytest.raises(ConfigError, match=pattern):
        MagiConfig.from_dict(d)


def test_bad_path_and_json(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        MagiConfig.from_json(tmp_path / "nope.json")
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        MagiConfig.from_json(p)
