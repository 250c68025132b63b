"""magi-kernels: Triton and CUDA kernels for video diffusion transformers.

Layering (each layer uses only the ones before it):
    reference (torch math) -> kernels {triton, cuda} -> registry -> ops -> modules -> magi_model
"""

from magi_kernels import registry
from magi_kernels.ops import fp8_gemm, fp8_quantize, gated_post_norm_residual, qk_norm_rope
from magi_kernels.reference.rope3d import magi_rope_bands_init, magi_rope_table

__version__ = "0.1.0"

__all__ = ["qk_norm_rope", "gated_post_norm_residual", "fp8_quantize", "fp8_gemm", "magi_rope_table", "magi_rope_bands_init", "registry"]
