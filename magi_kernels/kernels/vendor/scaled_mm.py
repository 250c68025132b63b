"""fp8_gemm through ``torch._scaled_mm``: cuBLASLt on CUDA devices, oneDNN on CPUs.

Supported subset (everything else is declined with the reason, so the registry picks another backend):

- per-tensor x per-tensor scales: ``_scaled_mm`` returns fp32, then bias / activation / gate run in fp32
  with the reference's epilogue (the same code the torch backend uses), then one cast to out_dtype;
- row-wise x column-wise scales (a per-tensor side is expanded to a vector): the library scales and
  rounds straight to bf16, so only out_dtype=bfloat16 with no bias and no epilogue, where that is exact;
- 128-block scales: not supported here (use the Triton backend).

``use_fast_accum`` is the call's ``fast_accum``: False keeps the accumulation promoted to fp32 (the same
contract as our kernel's default), True is cuBLASLt's unpromoted fast accumulation (oneDNN on a CPU computes
the same exact fp32 result either way).
On CUDA, cuBLASLt also needs K and N to be multiples of 16.
"""

from __future__ import annotations

import torch

from magi_kernels.reference.fp8 import apply_epilogue_ref
from magi_kernels.utils import device as _device


def device_reason(device: torch.device) -> str | None:
    """None if ``torch._scaled_mm`` can run fp8 GEMMs on ``device``."""
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no torch._scaled_mm"
    if device.type not in ("cpu", "cuda"):
        return f"torch._scaled_mm runs on CPU and CUDA devices, not {device.type}"
    cap = _device.capability(device)
    if cap is not None and cap < (8, 9):
        return f"fp8 tensor-core GEMMs need sm_89 or newer, device is sm_{cap[0]}{cap[1]}"
    return None


def supports(a) -> str | None:
    """None if this layout of an ``Fp8GemmArgs`` call is one torch._scaled_mm computes exactly, else why not."""
    if a.a_mode == "block" or a.b_mode == "block":
        return "torch._scaled_mm here supports per-tensor and row/column scales, not 128-blocks"
    n, k = a.b.shape
    if a.device.type == "cuda" and (k % 16 or n % 16):
        return f"cuBLASLt fp8 GEMMs need K and N divisible by 16, got K={k} N={n}"
    if a.a_mode == "tensor" and a.b_mode == "tensor":
        return None
    if a.act or a.gate is not None or a.bias is not None:
        return "row-wise torch._scaled_mm rounds to bf16 before an epilogue could run; use triton or torch"
    if a.out_dtype != torch.bfloat16:
        return "row-wise torch._scaled_mm produces bfloat16 only"
    return None


def launch(a, out: torch.Tensor) -> None:
    m, n = a.a.shape[0], a.b.shape[0]
    b_t = a.b.t()  # [K, N] column-major view of the nn.Linear-layout weight: what _scaled_mm wants
    if a.a_mode == "tensor" and a.b_mode == "tensor":
        y = torch._scaled_mm(a.a, b_t, scale_a=a.a_scale.reshape(()), scale_b=a.b_scale.reshape(()),
                             out_dtype=torch.float32, use_fast_accum=a.fast_accum)
        out.copy_(apply_epilogue_ref(y, a.bias, a.act, a.gate))
        return
    sa = a.a_scale.reshape(-1, 1).expand(m, 1).contiguous()
    sb = a.b_scale.reshape(1, -1).expand(1, n).contiguous()
    out.copy_(torch._scaled_mm(a.a, b_t, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16,
                               use_fast_accum=a.fast_accum))
