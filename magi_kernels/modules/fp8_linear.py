"""fp8 linear layers: MAGI-1's quantized checkpoints, a generic dynamic-activation fp8 linear, and a converter.

All math goes through the ops ``fp8_quantize`` and ``fp8_gemm`` (registry-dispatched); no copy here.

MAGI-1 (docs/fp8.md#magi-1-static-quantization), parameters exactly as in its checkpoints (``inference_weight.fp8.distill``):
- ``PerTensorQuantizedFp8Linear``: weight e4m3 (1, out, in), weight_scale fp32 (1,), input_scale fp32 (in,).
  y = (xq @ W^T) * input_scale[0] * weight_scale[0], xq = e4m3(bf16(clamp(x.float() / input_scale, +-448))):
  the activation is divided by the whole vector but dequantized with its first element only (as MAGI-1).
- ``PerChannelQuantizedFp8Linear``: same, plus smooth_scale fp32 (1, in); input_scale is (1,). The activation
  is divided by smooth_scale; dequantization uses input_scale[0] * weight_scale[0].
Output is bf16 (MAGI-1's bmm_fp8 dtype). MAGI-1's layers have no bias; ``bias=True`` adds an optional one.
Both run the GEMM with ``fast_accum=True`` by default: MAGI-1 runs them through flashinfer's ``bmm_fp8``, i.e.
cuBLASLt with fast (unpromoted) accumulation, so that is the numerics the checkpoints were calibrated with.
"""

from __future__ import annotations

import dataclasses
import fnmatch

import torch
from torch import nn

from magi_kernels.ops.fp8_linear import fp8_linear
from magi_kernels.ops.fp8_quantize import fp8_quantize, scale_shape
from magi_kernels.reference.fp8 import E4M3
from magi_kernels.utils.checks import MagiArgumentError

RECIPES = ("tensor", "channel", "block")


def check_input(layer: nn.Module, x) -> None:
    """The module input's last dim must be the layer's in_features (named in the error, not a GEMM operand)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != layer.in_features:
        got = f"shape {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise MagiArgumentError(f"{type(layer).__name__}(in_features={layer.in_features}, "
                                f"out_features={layer.out_features}): input must have last dim in_features="
                                f"{layer.in_features}, got {got}")


class _MagiQuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None,
                 out_dtype: torch.dtype = torch.bfloat16, backend: str | None = None, fast_accum: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.out_dtype, self.backend, self.fast_accum = out_dtype, backend, fast_accum
        self.weight = nn.Parameter(torch.zeros(1, out_features, in_features, dtype=E4M3, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(1, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    def _forward(self, x: torch.Tensor, divisor: torch.Tensor, input_scale0: torch.Tensor) -> torch.Tensor:
        check_input(self, x)
        return fp8_linear(x, self.weight[0], self.weight_scale, self.bias, x_granularity="channel", x_scale=divisor,
                          x_dequant_scale=input_scale0, bf16_round=True, out_dtype=self.out_dtype,
                          backend=self.backend, fast_accum=self.fast_accum)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"fast_accum={self.fast_accum}")


class PerTensorQuantizedFp8Linear(_MagiQuantLinear):
    """MAGI-1's ``PerTensorQuantizedFp8Linear`` (q, qx, k, v, fc1 of layers 1..L-2)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, **kw):
        super().__init__(in_features, out_features, bias, device, **kw)
        self.input_scale = nn.Parameter(torch.ones(in_features, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x, self.input_scale, self.input_scale[:1])


class PerChannelQuantizedFp8Linear(_MagiQuantLinear):
    """MAGI-1's ``PerChannelQuantizedFp8Linear`` (linear_proj, fc2 of layers 1..L-2)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, **kw):
        super().__init__(in_features, out_features, bias, device, **kw)
        self.input_scale = nn.Parameter(torch.ones(1, device=device), requires_grad=False)
        self.smooth_scale = nn.Parameter(torch.ones(1, in_features, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x, self.smooth_scale[0], self.input_scale)


class Fp8Linear(nn.Module):
    """fp8 weights (quantized once) x dynamically quantized activations, fp32 accumulation.

    recipe "tensor": weight per-tensor, activations per-token; "channel": weight per-output-channel,
    activations per-token; "block": weight 128x128 blocks, activations 1x128 blocks (DeepSeek-style).
    Output dtype = input dtype (fp32/fp16/bf16). Bias (if any) is kept in float and fused in the epilogue.
    ``fast_accum=True`` runs the GEMM with unpromoted tensor-core accumulation (fp8_gemm's ``fast_accum``);
    the "block" recipe's scales need the promoted loop.
    """

    _WEIGHT_GRAN = {"tensor": "tensor", "channel": "row", "block": "block128x128"}
    _ACT_GRAN = {"tensor": "row", "channel": "row", "block": "block1x128"}

    def __init__(self, in_features: int, out_features: int, bias: bool = True, recipe: str = "channel",
                 device=None, backend: str | None = None, fast_accum: bool = False):
        super().__init__()
        if recipe not in RECIPES:
            raise ValueError(f"Fp8Linear: argument 'recipe' must be one of {list(RECIPES)}, got {recipe!r}")
        if fast_accum and recipe == "block":
            raise MagiArgumentError("Fp8Linear: argument 'fast_accum' must be False with recipe 'block': block scales "
                             "change every 128 of K, so each 128-wide partial sum is promoted on its own")
        self.in_features, self.out_features, self.recipe, self.backend = in_features, out_features, recipe, backend
        self.fast_accum = fast_accum
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=E4M3, device=device),
                                   requires_grad=False)
        shape = scale_shape(self._WEIGHT_GRAN[recipe], out_features, in_features)
        self.weight_scale = nn.Parameter(torch.ones(shape, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: str = "channel", backend: str | None = None,
                    fast_accum: bool = False) -> "Fp8Linear":
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, recipe, linear.weight.device,
                backend, fast_accum)
        w = linear.weight.detach()
        q, s = fp8_quantize(w.contiguous(), cls._WEIGHT_GRAN[recipe], backend=backend)
        m.weight.data.copy_(q)
        m.weight_scale.data = s.reshape(m.weight_scale.shape).clone()
        if linear.bias is not None:
            m.bias.data = linear.bias.detach().float().clone()
            m.bias.requires_grad_(linear.bias.requires_grad)  # trainable if it was; the fp8 weight stays frozen
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x)
        return fp8_linear(x, self.weight, self.weight_scale, self.bias, x_granularity=self._ACT_GRAN[self.recipe],
                          backend=self.backend, fast_accum=self.fast_accum)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, recipe={self.recipe!r}, "
                f"fast_accum={self.fast_accum}")


@dataclasses.dataclass
class QuantizationReport:
    recipe: str
    converted: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)  # (name, in, out)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (name, reason)

    @property
    def converted_params(self) -> int:
        return sum(i * o for _, i, o in self.converted)

    def __str__(self) -> str:
        lines = [f"fp8 recipe {self.recipe!r}: converted {len(self.converted)} linears "
                 f"({self.converted_params / 1e6:.1f}M weights), skipped {len(self.skipped)}"]
        lines += [f"  skip {n}: {r}" for n, r in self.skipped]
        return "\n".join(lines)


def quantize_linear_weights(model: nn.Module, recipe: str = "channel", *, skip: tuple[str, ...] = (),
                            min_features: int = 16, backend: str | None = None) -> QuantizationReport:
    """Replace every ``nn.Linear`` in ``model`` (in place) by an ``Fp8Linear`` with ``recipe``.

    skip: fnmatch patterns on qualified module names (e.g. ``"*.ada_modulate_layer.*"``, ``"final_linear"``).
    Linears with in or out features < ``min_features`` are skipped (too small to gain from fp8). Returns a
    report of what was converted and why the rest was skipped.
    """
    if recipe not in RECIPES:
        raise ValueError(f"quantize_linear_weights: argument 'recipe' must be one of {list(RECIPES)}, got {recipe!r}")
    report = QuantizationReport(recipe)
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear) or isinstance(mod, Fp8Linear):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in skip):
            report.skipped.append((name, "matches the skip list"))
            continue
        if min(mod.in_features, mod.out_features) < min_features:
            report.skipped.append((name, f"smaller than min_features={min_features}"))
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Fp8Linear.from_linear(mod, recipe, backend))
        report.converted.append((name, mod.in_features, mod.out_features))
    return report
