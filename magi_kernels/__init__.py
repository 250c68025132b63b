"""magi-kernels: Triton and CUDA kernels for video diffusion transformers.

Layering (each layer uses only the ones before it):
    reference (torch math) -> kernels {triton, cuda} -> registry -> ops -> modules -> magi_model
"""

from magi_kernels import registry
from magi_kernels.modules import Fp8Linear, quantize_linear_weights
from magi_kernels.ops import (flex_attn_fp8_func, flex_attn_func, fp8_gemm, fp8_linear, fp8_quantize,
                              gated_post_norm_residual, merge_attn_states, qk_norm_rope)
from magi_kernels.ranges import AttnMaskType, BlockCausal, Magi1WindowMask, SlidingWindow, VarlenCausal, VarlenFull
from magi_kernels.reference.rope3d import magi_rope_bands_init, magi_rope_table
from magi_kernels.ops.attention import attention
from magi_kernels.ranges import PackedMask

# One place: [project] version in pyproject.toml (via the installed metadata).
from magi_kernels._version import version as __version__  # noqa: E402

__all__ = ["qk_norm_rope", "gated_post_norm_residual", "fp8_quantize", "fp8_gemm", "fp8_linear", "flex_attn_func",
           "flex_attn_fp8_func", "merge_attn_states", "AttnMaskType", "VarlenFull", "VarlenCausal", "BlockCausal",
           "SlidingWindow", "Magi1WindowMask", "PackedMask", "attention", "magi_rope_table", "magi_rope_bands_init",
           "registry", "Fp8Linear", "quantize_linear_weights"]
