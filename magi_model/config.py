"""MAGI-1 configuration: parse the official ``config.json`` files unchanged (docs/magi1.md#configuration).

A MAGI-1 config is a dict with three sections::

    {"model_config": {...}, "runtime_config": {...}, "engine_config": {...}}

Fields and defaults are those of MAGI-1's ``inference/common/config.py``. MAGI-1 itself
insists on every field being present; we accept omitted fields that have a real default (so small
hand-written configs work) but reject omitted fields whose default is ``None`` and that something
downstream needs (sizes, dtype, ``cfg_number``, video size), and reject unknown fields (a typo in
a config key would otherwise be silently ignored). ``strict=True`` restores MAGI-1's every-field rule.

Presets: the six official example configs (MAGI-1's ``example/{24B,4.5B}/*_config.json``), ``tiny`` (the
small model trained on procedural videos, its weights shipped in the package: docs/tiny_model.md) and
``tiny_random`` / ``tiny_distill`` / ``tiny_distill_quant`` (random-weight demo sizes, same structure) via
:func:`preset` / :func:`preset_dict`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from typing import Any, Mapping

import torch


class ConfigError(ValueError):
    """A MAGI-1 config that cannot be used; the message names the field and the rule."""


_DTYPES = {"torch.bfloat16": torch.bfloat16, "torch.float16": torch.float16, "torch.float32": torch.float32}
_REQUIRED = object()  # sentinel: field has no usable default
SEED_MIN, SEED_END = -(2 ** 63), 2 ** 64  # torch.manual_seed's range: [SEED_MIN, SEED_END)


@dataclasses.dataclass
class ModelConfig:
    model_name: str = _REQUIRED  # type: ignore[assignment]
    num_layers: int = _REQUIRED  # type: ignore[assignment]
    hidden_size: int = _REQUIRED  # type: ignore[assignment]
    ffn_hidden_size: int = _REQUIRED  # type: ignore[assignment]
    num_attention_heads: int = _REQUIRED  # type: ignore[assignment]
    num_query_groups: int = 1
    kv_channels: int = _REQUIRED  # type: ignore[assignment]
    layernorm_epsilon: float = 1e-6
    apply_layernorm_1p: bool = False
    x_rescale_factor: float = 1.0
    half_channel_vae: bool = False
    params_dtype: torch.dtype = _REQUIRED  # type: ignore[assignment]
    patch_size: int = 2
    t_patch_size: int = 1
    in_channels: int = 4
    out_channels: int = 4
    cond_hidden_ratio: float = 0.25
    caption_channels: int = 4096
    caption_max_length: int = 800
    xattn_cond_hidden_ratio: float = 1.0
    cond_gating_ratio: float = 1.0
    gated_linear_unit: bool = False

    # Derived sizes (notation of docs/magi1.md).
    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def cond_hidden(self) -> int:  # Hc
        return int(self.hidden_size * self.cond_hidden_ratio)

    @property
    def xattn_hidden(self) -> int:  # Hx
        return int(self.hidden_size * self.xattn_cond_hidden_ratio)

    @property
    def gating_hidden(self) -> int:  # Hg
        return int(self.hidden_size * self.cond_gating_ratio)

    @property
    def rope_bands(self) -> int:
        # LearnableRotaryEmbeddingCat(dim = H // nh): dim // 8 bands per axis, 3 axes, sin+cos halves.
        return (self.hidden_size // self.num_attention_heads) // 8

    @property
    def rotary_dim(self) -> int:
        return 6 * self.rope_bands

    @property
    def latent_channels(self) -> int:
        """Channels of the VAE latent the DiT consumes (16 for both released models)."""
        return self.in_channels // 2 if self.half_channel_vae else self.in_channels


@dataclasses.dataclass
class RuntimeConfig:
    cfg_number: int = _REQUIRED  # type: ignore[assignment]
    cfg_t_range: list = dataclasses.field(default_factory=lambda: [0, 0.0217, 0.1, 0.3, 0.999])
    prev_chunk_scales: list = dataclasses.field(default_factory=lambda: [1.5] * 5)
    text_scales: list = dataclasses.field(default_factory=lambda: [7.5] * 5)
    noise2clean_kvrange: list = dataclasses.field(default_factory=list)
    clean_chunk_kvrange: int = -1
    clean_t: float = 1.0
    seed: int = 1234
    num_frames: int = 128
    video_size_h: int = _REQUIRED  # type: ignore[assignment]
    video_size_w: int = _REQUIRED  # type: ignore[assignment]
    num_steps: int = 64
    window_size: int = 4
    fps: int = 24
    chunk_width: int = 6
    t5_pretrained: str | None = None
    t5_device: str = "cuda"
    vae_pretrained: str | None = None
    scale_factor: float = 0.18215
    temporal_downsample_factor: int = 4
    load: str | None = None


@dataclasses.dataclass
class EngineConfig:
    distributed_backend: str = "nccl"
    distributed_timeout_minutes: int = 10
    pp_size: int = 1
    cp_size: int = 1
    cp_strategy: str = "none"
    ulysses_overlap_degree: int = 1
    fp8_quant: bool = False
    distill_nearly_clean_chunk_threshold: float = 0.3
    shortcut_mode: str = "8,16,16"
    distill: bool = False
    kv_offload: bool = False
    enable_cuda_graph: bool = False


_SECTIONS = (("model_config", ModelConfig), ("runtime_config", RuntimeConfig), ("engine_config", EngineConfig))
# Fields that may be null although their type says otherwise: an unset video size (only the DiT is
# being configured; generation checks it is set).
_NULLABLE = {"video_size_h", "video_size_w"}
# Element types of the list fields (the dataclass annotations say only "list").
_LIST_ITEMS = {"cfg_t_range": "float", "prev_chunk_scales": "float", "text_scales": "float",
               "noise2clean_kvrange": "int"}


@dataclasses.dataclass
class MagiConfig:
    model: ModelConfig
    runtime: RuntimeConfig
    engine: EngineConfig
    source: str | None = None  # path the config was read from, for messages

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, strict: bool = False, source: str | None = None) -> "MagiConfig":
        """Parse a MAGI-1 config dict. ``runtime_config`` / ``engine_config`` may be absent (defaults;
        ``cfg_number`` then follows the distill/fp8 rule and the video size is unset), which is enough
        to build the DiT. ``strict``: MAGI-1's rule, every field of every section must be present."""
        where = f" in {source}" if source else ""
        if not isinstance(d, Mapping):
            raise ConfigError(f"config{where}: must be a dict with 'model_config', 'runtime_config', "
                              f"'engine_config'; got {type(d).__name__}")
        unknown_sections = sorted(set(d) - {name for name, _ in _SECTIONS})
        if unknown_sections:
            raise ConfigError(f"config{where}: unknown top-level sections {unknown_sections}; expected "
                              f"'model_config', 'runtime_config', 'engine_config'")
        if "model_config" not in d:
            raise ConfigError(f"config{where}: missing section 'model_config'")
        parsed = {}
        for name, klass in _SECTIONS:
            if name not in d:
                if strict:
                    raise ConfigError(f"config{where}: missing section '{name}' (strict: MAGI-1 requires all three)")
                section: dict = {}
                if name == "runtime_config":
                    # Only the DiT is being configured: let cfg_number follow the rule and leave the video unset.
                    eng = d.get("engine_config", {}) or {}
                    section = {"cfg_number": 1 if (eng.get("distill") or eng.get("fp8_quant")) else 3,
                               "video_size_h": None, "video_size_w": None}
                parsed[name] = _parse_section(name, klass, section, strict=False, where=where, allow_none=True)
            else:
                parsed[name] = _parse_section(name, klass, d[name], strict=strict, where=where)
        cfg = cls(parsed["model_config"], parsed["runtime_config"], parsed["engine_config"], source=source)
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, path: str | os.PathLike, *, strict: bool = False) -> "MagiConfig":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ConfigError(f"config_file: {path!r} does not exist or is not a file")
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"config_file {path!r}: not valid JSON ({e})") from None
        return cls.from_dict(d, strict=strict, source=path)

    def to_dict(self) -> dict:
        out = {}
        for (name, _), sec in zip(_SECTIONS, (self.model, self.runtime, self.engine)):
            dd = dataclasses.asdict(sec)
            for k, v in dd.items():
                if isinstance(v, torch.dtype):
                    dd[k] = str(v)
            out[name] = dd
        return out

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        m, r, e = self.model, self.runtime, self.engine
        where = f" in {self.source}" if self.source else ""

        def bad(field: str, rule: str):
            raise ConfigError(f"config{where}: {field} {rule}")

        for f in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                  "kv_channels", "patch_size", "t_patch_size", "in_channels", "out_channels", "caption_channels",
                  "caption_max_length"):
            if getattr(m, f) < 1:
                bad(f"model_config.{f}", f"must be >= 1, got {getattr(m, f)}")
        if m.hidden_size % m.num_attention_heads:
            bad("model_config.hidden_size", f"must be divisible by num_attention_heads ({m.num_attention_heads}), "
                f"got {m.hidden_size}")
        if m.hidden_size // m.num_attention_heads != m.kv_channels:
            # The rope table is built for dim = H // nh while the QK norms act on kv_channels; the
            # architecture only makes sense when they agree (128 for both released models).
            bad("model_config.kv_channels", f"must equal hidden_size / num_attention_heads = "
                f"{m.hidden_size // m.num_attention_heads}, got {m.kv_channels}")
        if m.num_attention_heads % m.num_query_groups:
            bad("model_config.num_attention_heads", f"must be a multiple of num_query_groups ({m.num_query_groups}) "
                f"for GQA, got {m.num_attention_heads}")
        if (m.num_attention_heads * m.kv_channels) % 8:
            # linear_proj's input is interleaved in 8 groups (TP8 training layout, docs/magi1.md#transformer-layer).
            bad("model_config.num_attention_heads * kv_channels", f"must be a multiple of 8 (TP8-interleaved "
                f"linear_proj input), got {m.num_attention_heads * m.kv_channels}")
        if m.rope_bands < 1 or m.rotary_dim > m.kv_channels:
            bad("model_config.kv_channels", f"must be >= 8 so the 3D rope has at least one band per axis, "
                f"got {m.kv_channels}")
        if m.gating_hidden != m.hidden_size:
            bad("model_config.cond_gating_ratio", f"must give gates of hidden_size ({m.hidden_size}) channels "
                f"(the gate multiplies the sublayer output), got int(H*ratio) = {m.gating_hidden}")
        for f in ("cond_hidden_ratio", "xattn_cond_hidden_ratio", "cond_gating_ratio"):
            if not getattr(m, f) > 0:
                bad(f"model_config.{f}", f"must be > 0, got {getattr(m, f)}")
        if m.cond_hidden < 1 or m.xattn_hidden < 1:
            bad("model_config.cond_hidden_ratio / xattn_cond_hidden_ratio", "must give at least 1 channel")
        if m.half_channel_vae and m.in_channels % 2:
            bad("model_config.in_channels", f"must be even with half_channel_vae (latents are duplicated), "
                f"got {m.in_channels}")
        if m.half_channel_vae and m.out_channels < m.latent_channels:
            bad("model_config.out_channels", f"must be >= {m.latent_channels} with half_channel_vae, "
                f"got {m.out_channels}")
        if m.x_rescale_factor == 0:
            bad("model_config.x_rescale_factor", "must be non-zero (the output is divided by it)")
        if not m.layernorm_epsilon > 0:
            bad("model_config.layernorm_epsilon", f"must be > 0, got {m.layernorm_epsilon}")

        # MAGI-1's post-validation rule (docs/magi1.md#configuration).
        want = 1 if (e.fp8_quant or e.distill) else 3
        if r.cfg_number != want:
            why = ("distill/fp8_quant models run one guidance-free pass" if want == 1
                   else "base models run 3-pass CFG (text and previous-chunk guidance)")
            bad("runtime_config.cfg_number", f"must be {want} when distill={e.distill} and fp8_quant={e.fp8_quant} "
                f"({why}), got {r.cfg_number}")
        for f in ("video_size_h", "video_size_w"):
            v = getattr(r, f)
            if v is None:
                continue
            if v < 16 or v % 16:
                # VAE 8x spatial x patch 2: anything else silently drops a latent row/column in MAGI-1.
                bad(f"runtime_config.{f}", f"must be a positive multiple of 16 (VAE 8 x patch 2), got {v}")
        if r.num_frames < 1:
            bad("runtime_config.num_frames", f"must be >= 1, got {r.num_frames}")
        if r.window_size < 1:
            bad("runtime_config.window_size", f"must be >= 1, got {r.window_size}")
        if r.chunk_width < 1:
            bad("runtime_config.chunk_width", f"must be >= 1, got {r.chunk_width}")
        if r.chunk_width % m.t_patch_size:
            bad("runtime_config.chunk_width", f"must be a multiple of t_patch_size ({m.t_patch_size}), "
                f"got {r.chunk_width}")
        if r.num_steps < 1 or r.num_steps % r.window_size:
            # Each chunk passes num_steps // window_size steps per stage; a remainder would leave chunks
            # short of the clean end of the grid.
            bad("runtime_config.num_steps", f"must be a positive multiple of window_size ({r.window_size}), "
                f"got {r.num_steps}")
        if r.num_steps % 4 and r.noise2clean_kvrange:
            bad("runtime_config.num_steps", f"must be a multiple of 4 when noise2clean_kvrange is set (kv windows "
                f"change every quarter of the schedule), got {r.num_steps}")
        if len(r.noise2clean_kvrange) not in (0, 4):
            bad("runtime_config.noise2clean_kvrange", f"must be empty or have 4 entries (one per quarter), "
                f"got {r.noise2clean_kvrange}")
        n = len(r.cfg_t_range)
        if len(r.prev_chunk_scales) != n or len(r.text_scales) != n:
            bad("runtime_config.prev_chunk_scales / text_scales", f"must have len(cfg_t_range) = {n} entries, got "
                f"{len(r.prev_chunk_scales)} and {len(r.text_scales)}")
        if list(r.cfg_t_range) != sorted(r.cfg_t_range):
            bad("runtime_config.cfg_t_range", f"must be ascending, got {r.cfg_t_range}")
        if r.temporal_downsample_factor < 1:
            bad("runtime_config.temporal_downsample_factor", f"must be >= 1, got {r.temporal_downsample_factor}")
        if r.fps < 1:
            bad("runtime_config.fps", f"must be >= 1 (frames per second of the output), got {r.fps}")
        if not r.scale_factor > 0:
            bad("runtime_config.scale_factor", f"must be > 0 (latents are divided by it), got {r.scale_factor}")
        if not 0 <= r.clean_t <= 1:
            bad("runtime_config.clean_t", f"must be in [0, 1] (t = 1 is clean), got {r.clean_t}")
        if any(not 0 <= t <= 1 for t in r.cfg_t_range):
            bad("runtime_config.cfg_t_range", f"entries must be in [0, 1], got {r.cfg_t_range}")
        if any(k < 0 for k in r.noise2clean_kvrange):
            bad("runtime_config.noise2clean_kvrange", f"entries must be >= 0 chunks, got {r.noise2clean_kvrange}")
        if not SEED_MIN <= r.seed < SEED_END:
            bad("runtime_config.seed", f"must be in [-2^63, 2^64) (torch.manual_seed's range), got {r.seed}")
        try:
            torch.device(r.t5_device)
        except RuntimeError:
            bad("runtime_config.t5_device", f"must be a torch device such as 'cpu' or 'cuda', got {r.t5_device!r}")
        for f in ("pp_size", "cp_size", "ulysses_overlap_degree", "distributed_timeout_minutes"):
            if getattr(e, f) < 1:
                bad(f"engine_config.{f}", f"must be >= 1, got {getattr(e, f)}")
        if not 0 <= e.distill_nearly_clean_chunk_threshold <= 1:
            bad("engine_config.distill_nearly_clean_chunk_threshold", f"must be in [0, 1] (a time t), got "
                f"{e.distill_nearly_clean_chunk_threshold}")
        if e.shortcut_mode not in ("8,16,16", "16,16,8"):
            bad("engine_config.shortcut_mode", f"must be '8,16,16' or '16,16,8', got {e.shortcut_mode!r}")
        if e.cp_strategy not in ("none", "cp_ulysses", "cp_shuffle_overlap"):
            bad("engine_config.cp_strategy", f"must be one of none/cp_ulysses/cp_shuffle_overlap, "
                f"got {e.cp_strategy!r}")

    # ------------------------------------------------------------------ derived
    @property
    def weight_subdir(self) -> str:
        """DiT weight folder inside ``runtime_config.load`` (docs/magi1.md#checkpoint-layout-and-keys)."""
        return "inference_weight" + (".fp8" if self.engine.fp8_quant else "") + (".distill" if self.engine.distill else "")

    @property
    def checkpoint_dir(self) -> str | None:
        if self.runtime.load is None:
            return None
        return os.path.join(self.runtime.load, self.weight_subdir)

    @property
    def distill_dt(self) -> float | None:
        """Step-size embedding input for distilled models with the standard grid (docs/magi1.md#distilled-models)."""
        if not self.engine.distill:
            return None
        return self.runtime.num_steps / 4 * 2


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _coerce(what: str, kind: str, v, item_kind: str | None = None):
    """Check one JSON value against its field's annotation ("int", "float", "bool", "str", "str | None",
    "list"); integral floats are accepted for ints (JSON writers emit 4.0), numbers must be finite."""
    base = kind.replace(" | None", "")
    if base == "int":
        if not (_is_number(v) and math.isfinite(v) and float(v).is_integer()):
            raise ConfigError(f"{what} must be an integer, got {v!r} ({type(v).__name__})")
        return int(v)
    if base == "float":
        if not _is_number(v):
            raise ConfigError(f"{what} must be a number, got {v!r} ({type(v).__name__})")
        if not math.isfinite(v):
            raise ConfigError(f"{what} must be finite, got {v!r}")
        return float(v)
    if base == "bool":
        if not isinstance(v, bool):
            raise ConfigError(f"{what} must be true or false, got {v!r} ({type(v).__name__})")
        return v
    if base == "str":
        if not isinstance(v, str):
            raise ConfigError(f"{what} must be a string, got {v!r} ({type(v).__name__})")
        return v
    if base == "list":
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{what} must be a list, got {v!r} ({type(v).__name__})")
        return [_coerce(f"{what}[{i}]", item_kind or "float", x) for i, x in enumerate(v)]
    return v


def _parse_section(name: str, klass, raw, *, strict: bool, where: str, allow_none: bool = False):
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config{where}: section '{name}' must be a dict, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(klass)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"config{where}: unknown fields in '{name}': {unknown} (known: {sorted(fields)})")
    kwargs = {}
    missing, missing_optional = [], []
    for fname, f in fields.items():
        if fname in raw:
            kwargs[fname] = raw[fname]
            continue
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if f.default is _REQUIRED:
            if allow_none:
                kwargs[fname] = None
            else:
                missing.append(fname)
        elif strict and has_default:
            missing_optional.append(fname)
    if missing or missing_optional:
        msg = f"config{where}: section '{name}' is missing fields {missing + missing_optional}"
        if missing:
            msg += f" ({missing} have no default)"
        if missing_optional:
            msg += " (strict mode, as MAGI-1's from_json, requires every field)"
        raise ConfigError(msg)
    for fname, v in list(kwargs.items()):
        if v is None:
            if "None" in str(fields[fname].type) or fname in _NULLABLE:
                continue
            raise ConfigError(f"config{where}: {name}.{fname} must be set, got null")
        if fname == "params_dtype":
            if isinstance(v, torch.dtype):
                continue
            if v not in _DTYPES:
                raise ConfigError(f"config{where}: {name}.params_dtype must be one of {sorted(_DTYPES)}, got {v!r}")
            kwargs[fname] = _DTYPES[v]
            continue
        kwargs[fname] = _coerce(f"config{where}: {name}.{fname}", str(fields[fname].type), v,
                                _LIST_ITEMS.get(fname))
    return klass(**kwargs)


def load_config(config: "str | os.PathLike | Mapping | MagiConfig", *, strict: bool = False) -> MagiConfig:
    """A path to config.json, a parsed dict, a preset name (``preset:tiny``) or a MagiConfig."""
    if isinstance(config, MagiConfig):
        return config
    if isinstance(config, Mapping):
        return MagiConfig.from_dict(config, strict=strict)
    if isinstance(config, (str, os.PathLike)):
        s = os.fspath(config)
        if s.startswith("preset:"):
            return preset(s[len("preset:"):])
        return MagiConfig.from_json(s, strict=strict)
    raise ConfigError(f"config: must be a path, a dict or a MagiConfig, got {type(config).__name__}")


# ---------------------------------------------------------------------------------------------------
# Presets. The official ones transcribe example/{24B,4.5B}/*_config.json.

_MODEL_24B = {
    "model_name": "videodit_ardf", "num_layers": 48, "hidden_size": 6144, "ffn_hidden_size": 16384,
    "num_attention_heads": 48, "num_query_groups": 8, "kv_channels": 128, "layernorm_epsilon": 1e-06,
    "apply_layernorm_1p": True, "x_rescale_factor": 0.1, "half_channel_vae": True, "params_dtype": "torch.bfloat16",
    "patch_size": 2, "t_patch_size": 1, "in_channels": 32, "out_channels": 32, "cond_hidden_ratio": 0.25,
    "caption_channels": 4096, "caption_max_length": 800, "xattn_cond_hidden_ratio": 1.0, "cond_gating_ratio": 1.0,
    "gated_linear_unit": True,
}
_MODEL_4_5B = dict(_MODEL_24B, num_layers=34, hidden_size=3072, ffn_hidden_size=12288, num_attention_heads=24,
                   x_rescale_factor=1, half_channel_vae=False, in_channels=16, out_channels=16,
                   gated_linear_unit=False)
_RUNTIME = {
    "cfg_number": 3, "cfg_t_range": [0.0, 0.0217, 0.1, 0.3, 0.999], "prev_chunk_scales": [1.5, 1.5, 1.5, 1.0, 1.0],
    "text_scales": [7.5, 7.5, 7.5, 0.0, 0.0], "noise2clean_kvrange": [5, 4, 3, 2], "clean_chunk_kvrange": 1,
    "clean_t": 0.9999, "seed": 1234, "num_frames": 96, "video_size_h": 720, "video_size_w": 720, "num_steps": 64,
    "window_size": 4, "fps": 24, "chunk_width": 6, "t5_pretrained": "./downloads/t5_pretrained", "t5_device": "cpu",
    "vae_pretrained": "./downloads/vae", "scale_factor": 0.18215, "temporal_downsample_factor": 4,
    "load": "./downloads/4.5B_base",
}
_ENGINE = {
    "distributed_backend": "nccl", "distributed_timeout_minutes": 15, "pp_size": 1, "cp_size": 1,
    "cp_strategy": "cp_ulysses", "ulysses_overlap_degree": 1, "fp8_quant": False,
    "distill_nearly_clean_chunk_threshold": 0.3, "shortcut_mode": "8,16,16", "distill": False, "kv_offload": True,
    "enable_cuda_graph": False,
}

# Random-weight demo model: same structure as 4.5B (GELU, 16 latent channels, 8-group TP interleave, GQA,
# real T5 width so real text embeddings / special tokens still fit) at a size a 2-core CPU runs in seconds.
_MODEL_TINY = dict(_MODEL_4_5B, num_layers=4, hidden_size=256, ffn_hidden_size=1024, num_attention_heads=4,
                   num_query_groups=2, kv_channels=64)
_RUNTIME_TINY = dict(_RUNTIME, num_frames=48, video_size_h=128, video_size_w=128, num_steps=8, t5_device="cpu",
                     load=None, t5_pretrained=None, vae_pretrained=None)

# The trained tiny demo model (docs/tiny_model.md; weights in magi_model/assets/tiny, made by
# ``python -m magi_model.train_tiny``): 4.5B's structure in fp32 at 32 x 32 px, patch 1 (4 x 4 latent
# tokens per frame), a 64-wide grammar text encoder in place of T5.
TINY_TRAINED_ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny")
_MODEL_TINY_TRAINED = dict(_MODEL_4_5B, num_layers=4, hidden_size=128, ffn_hidden_size=512, num_attention_heads=4,
                           num_query_groups=2, kv_channels=32, params_dtype="torch.float32", patch_size=1,
                           caption_channels=64, caption_max_length=64)
# VAE ddconfig: MAGI-1-VAE's structure, one block, 32 px x 12 frame reference tiles. Width 768 so the
# decoder unpatchifies to 768 / (4*8*8) = 3 channels before its last conv (with 1, colour is lost).
TINY_TRAINED_VAE = {"video_size": 32, "video_length": 12, "patch_size": 8, "patch_length": 4, "in_chans": 3,
                    "z_chans": 16, "double_z": True, "embed_dim": 768, "depth": 1, "num_heads": 4, "mlp_ratio": 1,
                    "qkv_bias": True, "with_cls_token": True, "ln_in_attn": True, "conv_last_layer": True,
                    "use_rope": False}


def tiny_trained_dict() -> dict:
    """Config dict of the trained tiny model, its asset paths filled in."""
    runtime = dict(_RUNTIME, num_frames=48, video_size_h=32, video_size_w=32, num_steps=16, t5_device="cpu",
                   text_scales=[4.0, 4.0, 4.0, 0.0, 0.0], load=TINY_TRAINED_ASSETS,
                   t5_pretrained=os.path.join(TINY_TRAINED_ASSETS, "text"),
                   vae_pretrained=os.path.join(TINY_TRAINED_ASSETS, "vae"))
    return copy.deepcopy({"model_config": dict(_MODEL_TINY_TRAINED), "runtime_config": runtime,
                          "engine_config": dict(_ENGINE, kv_offload=False, cp_strategy="none")})


def _official(size: str, variant: str) -> dict:
    model = _MODEL_24B if size == "24B" else _MODEL_4_5B
    distill = variant in ("distill", "distill_quant")
    quant = variant == "distill_quant"
    steps = {("24B", "base"): 32, ("24B", "distill"): 16, ("24B", "distill_quant"): 16}.get((size, variant), 64)
    hw = (720, 1280) if size == "24B" else (720, 720)
    runtime = dict(_RUNTIME, cfg_number=1 if distill else 3, num_steps=steps, video_size_h=hw[0],
                   video_size_w=hw[1], t5_device="cuda" if size == "24B" else "cpu",
                   load=f"./downloads/{size}_{variant}")
    engine = dict(_ENGINE, cp_size=8 if size == "24B" else 1, fp8_quant=quant, distill=distill)
    return {"model_config": dict(model), "runtime_config": runtime, "engine_config": engine}


# Presets with trained weights shipped in the package (the others named tiny* are random-weight demos;
# tiny_random is the random-weight configuration tiny had before, kept for the tests).
TRAINED_PRESETS = ("tiny",)
PRESETS = ("4.5B_base", "4.5B_distill", "4.5B_distill_quant", "24B_base", "24B_distill", "24B_distill_quant",
           *dict.fromkeys(TRAINED_PRESETS + ("tiny", "tiny_random", "tiny_distill", "tiny_distill_quant")))


def preset_dict(name: str) -> dict:
    """The config dict (official JSON layout) of a preset; a fresh copy each call."""
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown name {name!r}; known: {list(PRESETS)}")
    if name in TRAINED_PRESETS:
        return tiny_trained_dict()
    size, _, variant = name.partition("_")
    if size in ("4.5B", "24B"):
        return _official(size, variant)
    variant = variant.removeprefix("random").lstrip("_") or "base"
    distill = variant in ("distill", "distill_quant")
    return copy.deepcopy({
        "model_config": dict(_MODEL_TINY),
        "runtime_config": dict(_RUNTIME_TINY, cfg_number=1 if distill else 3),
        "engine_config": dict(_ENGINE, kv_offload=False, cp_strategy="none", distill=distill,
                              fp8_quant=variant == "distill_quant"),
    })


def preset(name: str) -> MagiConfig:
    return MagiConfig.from_dict(preset_dict(name), strict=True, source=f"preset:{name}")


def tokens_per_chunk(cfg: MagiConfig) -> int:
    """Self-attention tokens per chunk: (chunk_width / pt) * (h8 / p) * (w8 / p) (docs/magi1.md#sizes)."""
    m, r = cfg.model, cfg.runtime
    if r.video_size_h is None or r.video_size_w is None:
        raise ConfigError("runtime_config.video_size_h/w: must be set to count tokens")
    return (r.chunk_width // m.t_patch_size) * (r.video_size_h // 8 // m.patch_size) * (r.video_size_w // 8 // m.patch_size)


__all__ = ["ConfigError", "ModelConfig", "RuntimeConfig", "EngineConfig", "MagiConfig", "load_config", "preset",
           "preset_dict", "PRESETS", "TRAINED_PRESETS", "tiny_trained_dict", "tokens_per_chunk"]
