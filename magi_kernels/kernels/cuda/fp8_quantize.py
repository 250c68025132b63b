"""CUDA backend of fp8_quantize: fills ``_C.Fp8QuantParams`` from an ``Fp8QuantizeArgs`` and launches
``_C.cuda.fp8_quant`` (CUDA tensors, current stream) or ``_C.simt.fp8_quant`` (CPU tensors: the same kernel
source run by the SIMT emulator). Kernel: csrc/kernels/fp8_quantize.cuh; semantics: magi_kernels.reference.fp8.

A dynamic per-tensor scale needs a grid-wide amax; it is computed with one torch reduction
(``dynamic_scale_ref``, as the Triton backend does) and then applied by the static kernel.
"""

from __future__ import annotations

import torch

from magi_kernels._ext import require_native

from . import DTYPE_CODES

# Codes of csrc/kernels/fp8_quantize_params.h (Fp8Mode).
MODES = {"tensor": 0, "channel": 1, "row": 2, "block1x128": 3, "block128x128": 4}
MAX_COLS = 65535 * 128  # grid-y limit of the block kernels (column groups of 128)


def supports(a) -> str | None:
    """None if the CUDA kernels handle this ``Fp8QuantizeArgs`` call, else why not (device rules: ``device_reason``)."""
    if a.x.dtype not in DTYPE_CODES:
        return f"dtype {a.x.dtype} is not supported (fp32, fp16, bf16)"
    if a.granularity not in MODES:
        return f"granularity {a.granularity!r} is not one of {tuple(MODES)}"
    return None


def _check_out(name: str, t: torch.Tensor, shape, dtype, device) -> None:
    # Outputs are allocated by the op; this guards direct callers of launch().
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or not t.is_contiguous() or t.device != device:
        raise ValueError(f"fp8_quantize (cuda): argument '{name}' must be a contiguous {dtype} tensor of shape "
                         f"{list(shape)} on {device}, got {t.dtype} {list(t.shape)} strides {list(t.stride())} "
                         f"on {t.device}")


def make_params(a, q: torch.Tensor, scale_out: torch.Tensor, scale_in: torch.Tensor | None):
    """The kernel's parameter block; pointers stay valid while a, q, scale_out and scale_in live."""
    x = a.x
    m, k = x.shape
    _check_out("q", q, (m, k), torch.float8_e4m3fn, x.device)
    _check_out("scale_out", scale_out, scale_out.shape, torch.float32, x.device)
    if x.dtype not in DTYPE_CODES:
        raise ValueError(f"fp8_quantize (cuda): argument 'x' must be fp32/fp16/bf16, got {x.dtype}")
    if k > MAX_COLS:
        raise ValueError(f"fp8_quantize (cuda): argument 'x' has {k} columns, more than the kernels' {MAX_COLS}")
    C = require_native("fp8_quantize(backend='cuda')")
    p = C.Fp8QuantParams()
    p.x, p.q, p.scale_out = x.data_ptr(), q.data_ptr(), scale_out.data_ptr()
    if scale_in is not None:
        if scale_in.dtype != torch.float32 or not scale_in.is_contiguous() or scale_in.device != x.device:
            raise ValueError("fp8_quantize (cuda): argument 'scale' must be a contiguous fp32 tensor on x's device")
        p.scale_in = scale_in.data_ptr()
    p.rows, p.cols = m, k
    # A row dim of size 1 may report any stride; only row 0 is touched then.
    p.x_stride, p.q_stride = x.stride(0), q.stride(0)
    p.scale_out_stride = scale_out.stride(0) if scale_out.dim() == 2 else 0
    p.mode = MODES[a.granularity]
    p.bf16_round = int(a.bf16_round)
    p.in_dtype = DTYPE_CODES[x.dtype]
    return p


def launch(a, q: torch.Tensor, scale_out: torch.Tensor) -> None:
    """Quantize ``a.x`` [M, K] into q (e4m3 [M, K]) and write the fp32 scale into ``scale_out``."""
    m, k = a.x.shape
    scale_in = a.scale
    if a.granularity == "tensor" and scale_in is None:
        from magi_kernels.reference.fp8 import dynamic_scale_ref

        scale_in = dynamic_scale_ref(a.x, "tensor")
    p = make_params(a, q, scale_out, scale_in)
    C = require_native("fp8_quantize(backend='cuda')")
    if m and k:
        if a.x.is_cuda:
            with torch.cuda.device(a.x.device):
                C.cuda.fp8_quant(p, torch.cuda.current_stream().cuda_stream)
        else:
            C.simt.fp8_quant(p)
    if scale_in is not None:  # static modes return their (fp32) scale
        scale_out.copy_(scale_in.reshape(scale_out.shape))
