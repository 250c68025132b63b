"""nn.Modules built on the ops."""

from .fp8_linear import (Fp8Linear, PerChannelQuantizedFp8Linear, PerTensorQuantizedFp8Linear, QuantizationReport,
                         quantize_linear_weights)

__all__ = ["Fp8Linear", "PerTensorQuantizedFp8Linear", "PerChannelQuantizedFp8Linear", "QuantizationReport",
           "quantize_linear_weights"]
