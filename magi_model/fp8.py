"""FP8 linears of the distill+quant checkpoints (docs/magi1.md#fp8-checkpoints): the parameter layout the DiT registers.

The modules are ``magi_kernels.modules.fp8_linear``'s ``PerTensorQuantizedFp8Linear`` (q, qx, k, v,
linear_fc1) and ``PerChannelQuantizedFp8Linear`` (linear_proj, linear_fc2); their math (double
rounding fp32 -> bf16 -> fp8, dequantization with ``input_scale[0] * weight_scale[0]``) lives there.
They run the GEMM with ``fast_accum=True``: MAGI-1 runs these layers through flashinfer's ``bmm_fp8``,
i.e. cuBLASLt with fast (unpromoted) accumulation, so that is the numerics the released checkpoints
were produced with.
This module only picks the class and checks it exposes exactly MAGI-1's checkpoint keys, which
are the contract for strict loading.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from magi_kernels.modules.fp8_linear import PerChannelQuantizedFp8Linear, PerTensorQuantizedFp8Linear

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
PER_TENSOR = "per_tensor"
PER_CHANNEL = "per_channel"

# Parameter layout per kind: name -> (shape as a function of (in, out), dtype).
LAYOUT = {
    PER_TENSOR: {"weight": (lambda i, o: (1, o, i), FP8), "weight_scale": (lambda i, o: (1,), torch.float32),
                 "input_scale": (lambda i, o: (i,), torch.float32)},
    PER_CHANNEL: {"weight": (lambda i, o: (1, o, i), FP8), "weight_scale": (lambda i, o: (1,), torch.float32),
                  "input_scale": (lambda i, o: (1,), torch.float32),
                  "smooth_scale": (lambda i, o: (1, i), torch.float32)},
}
_CLASSES = {PER_TENSOR: PerTensorQuantizedFp8Linear, PER_CHANNEL: PerChannelQuantizedFp8Linear}


def make_fp8_linear(kind: str, in_features: int, out_features: int) -> nn.Module:
    """An fp8 linear with MAGI-1's parameters (see LAYOUT), from magi_kernels."""
    if kind not in LAYOUT:
        raise ValueError(f"make_fp8_linear: argument 'kind' must be one of {list(LAYOUT)}, got {kind!r}")
    mod = _CLASSES[kind](in_features, out_features, fast_accum=True)
    _check_layout(mod, kind, in_features, out_features)
    return mod


def _check_layout(mod: nn.Module, kind: str, i: int, o: int) -> None:
    # A drift in the kernel module's parameter names / shapes would break strict checkpoint loading:
    # fail at build time with the difference rather than at load time with a key diff.
    params = dict(mod.named_parameters(recurse=False)) | dict(mod.named_buffers(recurse=False))
    want = {n: (shape(i, o), dt) for n, (shape, dt) in LAYOUT[kind].items()}
    got = {n: (tuple(p.shape), p.dtype) for n, p in params.items()}
    if got != want:
        raise TypeError(f"make_fp8_linear: {type(mod).__name__} exposes {got}, MAGI-1's {kind} checkpoint layout "
                        f"is {want}")
