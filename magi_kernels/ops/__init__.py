"""Ops: validated public functions, registered as torch custom ops, dispatched through the registry."""

from magi_kernels.utils import import_hooks as _import_hooks

from .flex_attn import flex_attn_func, merge_attn_states
from .flex_attn_fp8 import flex_attn_fp8_func
from .fp8_gemm import fp8_gemm
from .fp8_linear import fp8_linear
from .fp8_quantize import fp8_quantize
from .gated_post_norm_residual import gated_post_norm_residual
from .qk_norm_rope import qk_norm_rope

# FlopCounterMode formulas for the ops above, registered once torch.utils.flop_counter is imported
# (that module imports Triton, which `import magi_kernels` must not).
def _register_flop_formulas() -> None:
    from . import flop_counts  # noqa: F401


_import_hooks.when_imported("torch.utils.flop_counter", _register_flop_formulas)

__all__ = ["qk_norm_rope", "gated_post_norm_residual", "fp8_quantize", "fp8_gemm", "fp8_linear", "flex_attn_func",
           "flex_attn_fp8_func", "merge_attn_states"]
