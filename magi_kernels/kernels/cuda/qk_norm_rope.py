"""CUDA backend of qk_norm_rope: fills ``_C.QkNormRopeParams`` from a ``QkNormRopeArgs`` and launches
``_C.cuda.qk_norm_rope`` (CUDA tensors, current stream) or ``_C.simt.qk_norm_rope`` (CPU tensors: the same
kernel source run by the SIMT emulator). Kernel: csrc/kernels/qk_norm_rope.cuh.
"""

from __future__ import annotations

import torch

from magi_kernels._ext import require_native

from . import DTYPE_CODES, MAX_HIDDEN_ROW

MAX_HEAD_DIM = 512        # warp-per-head kernel: 32 lanes x 16 cached values


def supports(a) -> str | None:
    """None if the CUDA kernel handles this ``QkNormRopeArgs`` call, else why not (device rules: ``device_reason``)."""
    if a.q.dtype not in DTYPE_CODES:
        return f"dtype {a.q.dtype} is not supported (fp32, fp16, bf16)"
    d = a.head_dim
    if d > MAX_HEAD_DIM:
        return f"head_dim {d} > {MAX_HEAD_DIM}"
    if a.norm_scope == "hidden":
        row = max(a.q.shape[1], a.k.shape[1]) * d
        if row > MAX_HIDDEN_ROW:
            return f"hidden-scope rows of H*head_dim = {row} elements exceed the kernel's {MAX_HIDDEN_ROW}"
    return None


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _check_out(name: str, out: torch.Tensor, like: torch.Tensor) -> None:
    # Outputs are allocated by the op; this guards direct callers of launch().
    h, d = like.shape[1], like.shape[2]
    if out.shape != like.shape or out.dtype not in DTYPE_CODES or out.stride(-1) != 1 or (h > 1 and out.stride(-2) != d):
        raise ValueError(f"qk_norm_rope (cuda): argument '{name}' must be a [T, H, D] fp32/fp16/bf16 tensor with "
                         f"packed heads and shape {list(like.shape)}, got {list(out.shape)} {out.dtype} "
                         f"strides {list(out.stride())}")
    if out.device != like.device:
        raise ValueError(f"qk_norm_rope (cuda): argument '{name}' must be on {like.device}, got {out.device}")


def make_params(a, q_out: torch.Tensor, k_out: torch.Tensor):
    """The kernel's parameter block for args ``a`` (a QkNormRopeArgs); pointers stay valid while a, outs live."""
    _check_out("q_out", q_out, a.q)
    _check_out("k_out", k_out, a.k)
    if q_out.dtype != k_out.dtype:
        raise ValueError(f"qk_norm_rope (cuda): q_out and k_out must share a dtype, got {q_out.dtype} and {k_out.dtype}")
    C = require_native("qk_norm_rope(backend='cuda')")
    p = C.QkNormRopeParams()
    p.q, p.k, p.q_out, p.k_out = a.q.data_ptr(), a.k.data_ptr(), q_out.data_ptr(), k_out.data_ptr()
    p.tokens, p.hq, p.hk, p.head_dim = a.tokens, a.q.shape[1], a.k.shape[1], a.head_dim
    # Strides in elements; a token dim of size 1 may report any stride, which is harmless (row 0 only).
    p.q_stride, p.k_stride = a.q.stride(0), a.k.stride(0)
    p.q_out_stride, p.k_out_stride = q_out.stride(0), k_out.stride(0)
    p.q_weight, p.q_bias, p.k_weight, p.k_bias = map(_ptr, (a.q_weight, a.q_bias, a.k_weight, a.k_bias))
    if a.rotary_dim:
        p.cos, p.sin, p.rope_rows, p.rotary_dim = a.cos.data_ptr(), a.sin.data_ptr(), a.cos.shape[0], a.rotary_dim
    p.interleaved = int(a.interleaved)
    p.norm = 0 if a.norm == "layernorm" else 1
    p.hidden_scope = int(a.norm_scope == "hidden")
    p.weight_offset, p.eps = a.weight_offset, a.eps
    p.in_dtype, p.out_dtype = DTYPE_CODES[a.q.dtype], DTYPE_CODES[q_out.dtype]
    return p


def launch(a, q_out: torch.Tensor, k_out: torch.Tensor) -> None:
    if a.tokens == 0:
        return
    p = make_params(a, q_out, k_out)
    C = require_native("qk_norm_rope(backend='cuda')")
    if a.q.is_cuda:
        with torch.cuda.device(a.q.device):
            C.cuda.qk_norm_rope(p, torch.cuda.current_stream().cuda_stream)
    else:
        C.simt.qk_norm_rope(p)
