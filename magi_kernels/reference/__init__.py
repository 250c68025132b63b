"""The plain, readable definition of every op (torch, any device): one file per op.

The functions take ``compute_dtype`` where the math has a precision choice, so tests can evaluate the
same definition in float64. Backends (``magi_kernels.kernels``) must agree with these.
"""

from .flex_attn import flex_attn_ref
from .fp8 import fp8_gemm_ref, quantize_ref
from .gated_post_norm_residual import gated_post_norm_residual_ref
from .norm import norm_ref
from .qk_norm_rope import apply_rotary_ref, qk_norm_rope_ref
from .rope3d import magi_rope_table

__all__ = ["qk_norm_rope_ref", "gated_post_norm_residual_ref", "apply_rotary_ref", "norm_ref", "flex_attn_ref",
           "fp8_gemm_ref", "quantize_ref", "magi_rope_table"]
