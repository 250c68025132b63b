"""FLOP formulas of our custom ops for ``torch.utils.flop_counter.FlopCounterMode``.

The counter only sees ATen matmuls / convolutions; our ops are opaque ``torch.library`` custom ops,
so without these formulas a count over a model silently drops attention and every fp8 GEMM.
Importing this module (``magi_kernels.ops`` does) registers:

- ``magi_kernels::flex_attn``: ``4 * area * heads_q * head_dim`` -- two matmuls (``q k^T`` and
  ``p v``) over the *visible* cells of the union mask only (FlashAttention's convention; the area
  comes from :func:`magi_kernels.plan.union_area`, so a cell two slices cover counts once);
- ``magi_kernels::flex_attn_bwd``: ``2.5x`` the forward (recomputed ``q k^T``, ``dv``, ``dp``,
  ``dq``, ``dk``: five matmuls over the same area);
- ``magi_kernels::fp8_gemm``: ``2 * M * N * K`` (epilogues are not counted, as for ``addmm``);
- ``magi_kernels::fp8_linear`` (quantize + fp8 GEMM in one op): ``2 * tokens * out * in``.

Under fake / meta tensors (``torch.compile`` tracing) the range values are unknown; the attention
formulas then return the dense bound ``total_q * total_k`` cells, an upper bound.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import flop_registry, register_flop_formula

from magi_kernels.plan.stats import union_area

# Matmuls per visible (q, k) cell and head dim unit: forward q k^T + p v; backward 5 matmuls.
_FWD_MATMULS = 2
_BWD_MATMULS = 5


def _has_values(t: torch.Tensor) -> bool:
    return t.device.type != "meta" and not isinstance(t, torch._subclasses.FakeTensor)


def attention_area(q_ranges, k_ranges, attn_type_map, total_q: int, total_k: int) -> int:
    """Visible cells of the mask, or the dense bound when the range values are not readable."""
    if all(t is None or _has_values(t) for t in (q_ranges, k_ranges, attn_type_map)):
        return union_area(q_ranges, k_ranges, attn_type_map)
    return total_q * total_k


def flex_attn_flops(q: torch.Tensor, k: torch.Tensor, q_ranges, k_ranges, attn_type_map, *, backward: bool = False) -> int:
    area = attention_area(q_ranges, k_ranges, attn_type_map, q.shape[0], k.shape[0])
    return 2 * (_BWD_MATMULS if backward else _FWD_MATMULS) * area * q.shape[1] * q.shape[2]


def fp8_gemm_flops(a: torch.Tensor, b: torch.Tensor) -> int:
    k = a.shape[-1]
    m = a.numel() // k if k else 0
    return 2 * m * b.shape[0] * k


def _register(name: str, formula) -> None:
    try:
        packet = getattr(torch.ops.magi_kernels, name)
    except (AttributeError, RuntimeError):  # an op this build does not define
        return
    if packet not in flop_registry:  # importing twice (reload) must not raise "duplicate registrations"
        register_flop_formula(packet, get_raw=True)(formula)


def _flex_attn(q, k, v, q_ranges, k_ranges, attn_type_map=None, *args, out_val=None, **kwargs) -> int:
    return flex_attn_flops(q, k, q_ranges, k_ranges, attn_type_map)


def _flex_attn_bwd(dout, q, k, v, out, lse, dlse, q_ranges, k_ranges, attn_type_map=None, *args, out_val=None,
                   **kwargs) -> int:
    return flex_attn_flops(q, k, q_ranges, k_ranges, attn_type_map, backward=True)


def _fp8_gemm(a, b, *args, out_val=None, **kwargs) -> int:
    return fp8_gemm_flops(a, b)


def _fp8_linear(x, weight, *args, out_val=None, **kwargs) -> int:
    return fp8_gemm_flops(x, weight)  # weight [out, in]: the same count as the GEMM it runs


def register_all() -> None:
    """Register every formula (idempotent). The op modules must be imported first."""
    import magi_kernels.ops  # noqa: F401  (defines the custom ops)

    _register("flex_attn", _flex_attn)
    _register("flex_attn_bwd", _flex_attn_bwd)
    _register("fp8_gemm", _fp8_gemm)
    _register("fp8_linear", _fp8_linear)


register_all()

__all__ = ["attention_area", "flex_attn_flops", "fp8_gemm_flops", "register_all"]
