"""fp8 (e4m3fn) quantization and scaled GEMM: the torch definition of the semantics.

Quantization (``quantize_ref``), x: [M, K] float (any leading dims are flattened by the ops):

==============  ==================  ==========================  ===========================================
granularity     scale               scale shape                 q
==============  ==================  ==========================  ===========================================
"tensor"        static or dynamic   (1,)                        e4m3(clamp(x / s, +-448))
"channel"       static divisor      (K,)  (MAGI-1 input_scale   e4m3(bf16(clamp(x / s[k], +-448)))  MAGI-1's
                                    / smooth_scale)             exact order: fp32 divide, clamp, bf16, e4m3
"row"           dynamic per row     (M, 1)                      s = amax(|x[m, :]|) / 448
"block1x128"    dynamic             (M, ceil(K/128))            s = amax over x[m, 128g : 128g+128] / 448
"block128x128"  dynamic             (ceil(M/128), ceil(K/128))  s = amax over a 128x128 tile / 448
==============  ==================  ==========================  ===========================================

Rules shared by every backend:
- The divide is an IEEE fp32 division ``x / s`` (not a multiply by 1/s): MAGI-1 divides.
- ``bf16_round`` rounds the clamped fp32 value to bf16 (nearest-even) before e4m3 (double rounding, as
  MAGI-1 does); it defaults to True for "channel" (MAGI-1's path) and False otherwise.
- Saturation: e4m3fn has no infinity; |x / s| > 448 (including +-inf) clamps to +-448.
- NaN in x stays NaN (e4m3fn has a NaN code, 0x7F / 0xFF).
- Dynamic scales: amax is floored at ``AMAX_FLOOR`` so an all-zero row/block gets a finite scale
  (AMAX_FLOOR / 448) and quantizes to zeros, never NaN. A row/block holding NaN or +-inf gets a NaN scale
  (its values are unknowable; the dequantized result is NaN rather than silently wrong).
- A ragged last block (K or M not a multiple of 128) takes its amax over the elements that exist.

GEMM (``fp8_gemm_ref``): ``out = epilogue(sum_k dq(a)[m, k] * dq(b)[n, k] + bias[n])`` with a [M, K] and b
[N, K] (nn.Linear weight layout, "NT"), each dequantized with its scale: a_scale "tensor" (1 value), "row"
(M,) or "block" (M, ceil(K/128)); b_scale "tensor", "col" (N,) or "block" (ceil(N/128), ceil(K/128)).
Epilogues after bias: "gelu" (exact erf), "swiglu" (out[:, j] = silu(y[:, j]) * y[:, j + N/2], so out has
N/2 columns), then an optional elementwise ``gate`` multiply. Compute is fp32 (or ``compute_dtype``).
"""

from __future__ import annotations

import math

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
BLOCK = 128
AMAX_FLOOR = 1e-12  # smallest amax a dynamic scale is computed from (all-zero rows -> finite scale)

GRANULARITIES = ("tensor", "channel", "row", "block1x128", "block128x128")
A_MODES = ("tensor", "row", "block")
B_MODES = ("tensor", "col", "block")
ACTIVATIONS = (None, "gelu", "swiglu")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> nearest-even bf16 value, returned in fp32."""
    return x.to(torch.bfloat16).to(x.dtype)


def amax_to_scale(amax: torch.Tensor, nonfinite: torch.Tensor) -> torch.Tensor:
    """Dynamic scale from an amax (fp32); NaN where the group held NaN/inf."""
    s = amax.float().clamp_min(AMAX_FLOOR) / E4M3_MAX
    return torch.where(nonfinite, torch.full_like(s, float("nan")), s)


def _group_amax(x: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """amax and "has non-finite" over (rows x cols) tiles of a 2-D x, ragged edges included."""
    m, k = x.shape
    pm, pk = cdiv(m, rows) * rows, cdiv(k, cols) * cols
    xp = torch.zeros(pm, pk, dtype=torch.float32, device=x.device)
    xp[:m, :k] = x.float()
    t = xp.view(pm // rows, rows, pk // cols, cols)
    amax = t.abs().amax(dim=(1, 3))
    nonfinite = (~torch.isfinite(t)).any(dim=3).any(dim=1)
    return amax, nonfinite


def dynamic_scale_ref(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """The fp32 scale a dynamic quantization of 2-D ``x`` uses (shape per the table above)."""
    m, k = x.shape
    if granularity == "tensor":
        amax, bad = _group_amax(x.reshape(1, -1), 1, max(1, m * k))
        return amax_to_scale(amax, bad).reshape(1)
    if granularity == "row":
        amax, bad = _group_amax(x, 1, max(1, k))
        return amax_to_scale(amax, bad).reshape(m, 1)
    if granularity == "block1x128":
        return amax_to_scale(*_group_amax(x, 1, BLOCK))
    if granularity == "block128x128":
        return amax_to_scale(*_group_amax(x, BLOCK, BLOCK))
    raise ValueError(f"no dynamic scale for granularity {granularity!r}")


def expand_scale(scale: torch.Tensor, granularity: str, m: int, k: int) -> torch.Tensor:
    """Broadcast a scale of any granularity to x's [M, K] shape."""
    s = scale.float()
    if granularity == "tensor":
        return s.reshape(-1)[:1].reshape(1, 1).expand(m, k)
    if granularity == "channel":
        return s.reshape(1, k).expand(m, k)
    if granularity == "row":
        return s.reshape(m, 1).expand(m, k)
    if granularity == "block1x128":
        return s.repeat_interleave(BLOCK, dim=1)[:, :k]
    if granularity == "block128x128":
        return s.repeat_interleave(BLOCK, dim=0).repeat_interleave(BLOCK, dim=1)[:m, :k]
    raise ValueError(f"unknown granularity {granularity!r}")


def quantize_ref(x: torch.Tensor, granularity: str, scale: torch.Tensor | None = None,
                 bf16_round: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q e4m3 [M, K], fp32 scale). ``scale`` given = static; None = dynamic (not "channel")."""
    if bf16_round is None:
        bf16_round = granularity == "channel"
    m, k = x.shape
    if scale is None:
        scale = dynamic_scale_ref(x, granularity)
    else:
        scale = scale.float().reshape(1) if granularity == "tensor" else scale.float().reshape(k)
    y = x.float() / expand_scale(scale, granularity, m, k)
    # torch.clamp keeps NaN and maps +-inf to +-448 (no e4m3 infinity).
    y = y.clamp(-E4M3_MAX, E4M3_MAX)
    if bf16_round:
        y = round_to_bf16(y)
    return y.to(E4M3), scale


def dequantize_ref(q: torch.Tensor, scale: torch.Tensor, granularity: str,
                   compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    m, k = q.shape
    return q.to(compute_dtype) * expand_scale(scale, granularity, m, k).to(compute_dtype)


A_MODE_TO_GRANULARITY = {"tensor": "tensor", "row": "row", "block": "block1x128"}
B_MODE_TO_GRANULARITY = {"tensor": "tensor", "col": "row", "block": "block128x128"}


def apply_epilogue_ref(y: torch.Tensor, bias: torch.Tensor | None, act: str | None,
                       gate: torch.Tensor | None) -> torch.Tensor:
    """fp32 (or wider) GEMM result [M, N] -> + bias -> activation -> * gate."""
    if bias is not None:
        y = y + bias.to(y.dtype)
    if act == "gelu":
        y = 0.5 * y * (1.0 + torch.erf(y * (1.0 / math.sqrt(2.0))))
    elif act == "swiglu":
        h = y.shape[-1] // 2
        g, u = y[..., :h], y[..., h:]
        y = g * torch.sigmoid(g) * u
    elif act is not None:
        raise ValueError(f"unknown activation {act!r}")
    if gate is not None:
        y = y * gate.to(y.dtype)
    return y


def fp8_gemm_ref(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor, a_mode: str,
                 b_mode: str, *, bias: torch.Tensor | None = None, act: str | None = None,
                 gate: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                 compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """a [M, K] e4m3, b [N, K] e4m3 -> out [M, N or N/2]: dequantize, matmul in compute_dtype, epilogue."""
    da = dequantize_ref(a, a_scale, A_MODE_TO_GRANULARITY[a_mode], compute_dtype)
    db = dequantize_ref(b, b_scale, B_MODE_TO_GRANULARITY[b_mode], compute_dtype)
    y = da @ db.t()
    return apply_epilogue_ref(y, bias, act, gate).to(out_dtype)


def emulate_limited_accumulation(a: torch.Tensor, b: torch.Tensor, *, mma_k: int = 32, mantissa_bits: int = 13,
                                 promote_every: int | None = 128) -> torch.Tensor:
    """Model of tensor-core fp8 accumulation: exact products summed per ``mma_k`` slice, each added into an
    accumulator that keeps only ``mantissa_bits`` (round toward zero); with ``promote_every`` the accumulator
    is flushed into an exact (float64) sum every that many K. a [M, K], b [N, K] (any float); returns float64.
    """
    a64, b64 = a.double(), b.double()
    m, k = a64.shape
    total = torch.zeros(m, b64.shape[0], dtype=torch.float64)
    acc = torch.zeros_like(total, dtype=torch.float32)
    for k0 in range(0, k, mma_k):
        part = (a64[:, k0:k0 + mma_k] @ b64[:, k0:k0 + mma_k].t()).float()
        acc = truncate_mantissa(acc + part, mantissa_bits)
        if promote_every is not None and (k0 + mma_k) % promote_every == 0:
            total += acc.double()
            acc = torch.zeros_like(acc)
    return total + acc.double()


def truncate_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 -> fp32 with only ``bits`` mantissa bits (round toward zero)."""
    i = x.float().view(torch.int32) & -(1 << (23 - bits))
    return i.view(torch.float32)
