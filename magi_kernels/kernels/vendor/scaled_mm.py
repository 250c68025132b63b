"""fp8_gemm through ``torch._scaled_mm``: cuBLASLt on CUDA devices, oneDNN on CPUs.

Supported subset (everything else is declined with the reason, so the registry picks another backend):

- per-tensor x per-tensor scales: ``_scaled_mm`` returns fp32, then bias / activation / gate run in fp32
  with the reference's epilogue (the same code the torch backend uses), then one cast to out_dtype;
- row-wise x column-wise scales (a per-tensor side is expanded to a vector): the library scales and
  rounds straight to bf16, so only out_dtype=bfloat16 with no bias and no epilogue, where that is exact;
- 128-block scales: not supported here (use the Triton backend).

``use_fast_accum=False`` keeps the accumulation promoted to fp32 (the same contract as our kernel).
On CUDA, cuBLASLt also needs K and N to be multiples of 16.
"""

from __future__ import annotations

import torch

from magi_kernels import registry
from magi_kernels.reference.fp8 import apply_epilogue_ref


def supports(info: registry.CallInfo) -> str | None:
    x = info.extra
    a_mode, b_mode = x.get("a_mode"), x.get("b_mode")
    if a_mode == "block" or b_mode == "block":
        return "torch._scaled_mm here supports per-tensor and row/column scales, not 128-blocks"
    if info.device.type == "cuda" and (x.get("k", 0) % 16 or x.get("n", 0) % 16):
        return f"cuBLASLt fp8 GEMMs need K and N divisible by 16, got K={x.get('k')} N={x.get('n')}"
    if a_mode == "tensor" and b_mode == "tensor":
        return None
    if x.get("act") or x.get("has_gate") or x.get("has_bias"):
        return "row-wise torch._scaled_mm rounds to bf16 before an epilogue could run; use triton or torch"
    if x.get("out_dtype", torch.bfloat16) != torch.bfloat16:
        return "row-wise torch._scaled_mm produces bfloat16 only"
    return None


def launch(a, out: torch.Tensor) -> None:
    m, n = a.a.shape[0], a.b.shape[0]
    b_t = a.b.t()  # [K, N] column-major view of the nn.Linear-layout weight: what _scaled_mm wants
    if a.a_mode == "tensor" and a.b_mode == "tensor":
        y = torch._scaled_mm(a.a, b_t, scale_a=a.a_scale.reshape(()), scale_b=a.b_scale.reshape(()),
                             out_dtype=torch.float32, use_fast_accum=False)
        out.copy_(apply_epilogue_ref(y, a.bias, a.act, a.gate))
        return
    sa = a.a_scale.reshape(-1, 1).expand(m, 1).contiguous()
    sb = a.b_scale.reshape(1, -1).expand(1, n).contiguous()
    out.copy_(torch._scaled_mm(a.a, b_t, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=False))
