"""CUDA backend of gated_post_norm_residual: fills ``_C.GatedPostNormParams`` from a ``GatedPostNormArgs``
and launches ``_C.cuda.gated_post_norm_residual`` (CUDA tensors, current stream) or the SIMT-emulated
``_C.simt.gated_post_norm_residual`` (CPU tensors). Kernel: csrc/kernels/gated_post_norm_residual.cuh.
"""

from __future__ import annotations

import torch

from magi_kernels._ext import require_native

from . import DTYPE_CODES, MAX_HIDDEN_ROW


def supports(a) -> str | None:
    """None if the CUDA kernel handles this ``GatedPostNormArgs`` call, else why not (device rules: ``device_reason``)."""
    for what, dt in (("x", a.x.dtype), ("gate", a.gate.dtype), ("residual", a.residual.dtype)):
        if dt not in DTYPE_CODES:
            return f"{what} dtype {dt} is not supported (fp32, fp16, bf16)"
    if a.hidden > MAX_HIDDEN_ROW:
        return f"hidden size {a.hidden} exceeds the kernel's {MAX_HIDDEN_ROW}"
    return None


def make_params(a, out: torch.Tensor):
    """The kernel's parameter block for args ``a`` (a GatedPostNormArgs)."""
    if out.shape != a.x.shape or out.stride(-1) != 1 or out.dtype not in DTYPE_CODES or out.device != a.x.device:
        raise ValueError(f"gated_post_norm_residual (cuda): argument 'out' must be a {list(a.x.shape)} fp32/fp16/bf16 "
                         f"tensor on {a.x.device} with stride(-1) == 1, got {list(out.shape)} {out.dtype} "
                         f"strides {list(out.stride())} on {out.device}")
    if a.gate_index is not None and (a.gate_index.dtype != torch.int32 or not a.gate_index.is_contiguous()):
        raise ValueError("gated_post_norm_residual (cuda): argument 'gate_index' must be contiguous int32")
    C = require_native("gated_post_norm_residual(backend='cuda')")
    p = C.GatedPostNormParams()
    p.x, p.gate, p.residual, p.out = a.x.data_ptr(), a.gate.data_ptr(), a.residual.data_ptr(), out.data_ptr()
    p.gate_index = 0 if a.gate_index is None else a.gate_index.data_ptr()
    p.weight = 0 if a.weight is None else a.weight.data_ptr()
    p.bias = 0 if a.bias is None else a.bias.data_ptr()
    p.tokens, p.hidden, p.gate_rows = a.tokens, a.hidden, a.gate.shape[0]
    p.x_stride, p.gate_stride = a.x.stride(0), a.gate.stride(0)
    p.residual_stride, p.out_stride = a.residual.stride(0), out.stride(0)
    p.norm = 0 if a.norm == "layernorm" else 1
    p.weight_offset, p.eps = a.weight_offset, a.eps
    p.x_dtype, p.gate_dtype = DTYPE_CODES[a.x.dtype], DTYPE_CODES[a.gate.dtype]
    p.residual_dtype, p.out_dtype = DTYPE_CODES[a.residual.dtype], DTYPE_CODES[out.dtype]
    return p


def launch(a, out: torch.Tensor) -> None:
    if a.tokens == 0:
        return
    p = make_params(a, out)
    C = require_native("gated_post_norm_residual(backend='cuda')")
    if a.x.is_cuda:
        with torch.cuda.device(a.x.device):
            C.cuda.gated_post_norm_residual(p, torch.cuda.current_stream().cuda_stream)
    else:
        C.simt.gated_post_norm_residual(p)
