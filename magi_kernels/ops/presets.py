"""Named model styles for the fused norm ops, so no op silently assumes one model's choices.

``qk_norm_rope`` needs the norm kind, its scope, the weight offset and the rotary pair layout;
``gated_post_norm_residual`` needs the norm kind and the weight offset. Pass them explicitly or name
a preset; an argument given explicitly overrides the preset's value.

What each model does (checked against the models' public code):

- ``magi1``: MAGI-1 (``inference/model/dit/dit_module.py``): per-head LayerNorm whose stored weight is
  zero-centred (gamma = weight + 1), rotary in the NeoX half-split layout on the first dims; the sandwich
  post-norm is the same "1p" LayerNorm.
- ``wan``: Wan 2.x (``wan/modules/model.py``; diffusers ``transformer_wan.py``): RMSNorm over the whole
  hidden size (all heads together), complex-pair rotary, i.e. interleaved (2i, 2i+1) pairs.
- ``hunyuan``: HunyuanVideo (diffusers ``transformer_hunyuan_video.py``): per-head RMSNorm, rotary on
  interleaved pairs (``apply_rotary_emb(use_real=True, use_real_unbind_dim=-1)``).
"""

from __future__ import annotations

import dataclasses

from magi_kernels.utils.checks import fail


@dataclasses.dataclass(frozen=True)
class QkNormStyle:
    norm: str  # "layernorm" | "rmsnorm"
    norm_scope: str  # "head" (per head over head_dim) | "hidden" (over all heads, H * head_dim)
    weight_offset: float  # gamma = weight + weight_offset
    interleaved: bool  # rotary pairs (2i, 2i+1) instead of NeoX (i, i + r/2)


@dataclasses.dataclass(frozen=True)
class PostNormStyle:
    norm: str
    weight_offset: float


QK_NORM_PRESETS = {
    "magi1": QkNormStyle(norm="layernorm", norm_scope="head", weight_offset=1.0, interleaved=False),
    "wan": QkNormStyle(norm="rmsnorm", norm_scope="hidden", weight_offset=0.0, interleaved=True),
    "hunyuan": QkNormStyle(norm="rmsnorm", norm_scope="head", weight_offset=0.0, interleaved=True),
}

POST_NORM_PRESETS = {
    "magi1": PostNormStyle(norm="layernorm", weight_offset=1.0),
}


def resolve(op: str, preset: str | None, table: dict, given: dict, required: tuple[str, ...]) -> dict:
    """Fill ``given``'s None entries from ``table[preset]``; every name in ``required`` must end up set."""
    if preset is not None:
        if preset not in table:
            fail(op, "preset", f"must be one of {sorted(table)} (or None with every style argument given), "
                               f"got {preset!r}")
        style = dataclasses.asdict(table[preset])
        given = {n: (style[n] if v is None and n in style else v) for n, v in given.items()}
    missing = [n for n in required if given[n] is None]
    if missing:
        fail(op, missing[0], f"must be given explicitly (no model's choice is assumed), or pass preset= one of "
                             f"{sorted(table)}; missing: {missing}")
    return given
