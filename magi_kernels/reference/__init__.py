"""Torch reference math: the definition of every op's semantics, runnable on any device.

Each function takes ``compute_dtype`` so tests can evaluate the same math in float64.
"""

from .norm_rope import gated_post_norm_residual_ref, qk_norm_rope_ref, apply_rotary_ref, norm_ref
from .rope3d import magi_rope_table

__all__ = ["qk_norm_rope_ref", "gated_post_norm_residual_ref", "apply_rotary_ref", "norm_ref", "magi_rope_table"]
