"""Ops: validated public functions, registered as torch custom ops, dispatched through the registry."""

from .flex_attn import flex_attn_func, merge_attn_states
from .fp8_gemm import fp8_gemm
from .fp8_linear import fp8_linear
from .fp8_quantize import fp8_quantize
from .gated_post_norm_residual import gated_post_norm_residual
from .qk_norm_rope import qk_norm_rope
from . import flop_counts  # noqa: F401,E402  (FlopCounterMode formulas for the custom ops above)

__all__ = ["qk_norm_rope", "gated_post_norm_residual", "fp8_quantize", "fp8_gemm", "fp8_linear", "flex_attn_func",
           "merge_attn_states"]
