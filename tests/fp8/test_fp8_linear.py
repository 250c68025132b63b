"""fp8 modules: MAGI-1's quantized linears reproduce its forward on checkpoint-shaped tensors; Fp8Linear and
quantize_linear_weights on a toy DiT block."""

import pytest
import torch
from torch import nn

from magi_kernels.modules import (Fp8Linear, PerChannelQuantizedFp8Linear, PerTensorQuantizedFp8Linear,
                                  quantize_linear_weights)

from ._util import E4M3, need

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _magi_forward_f64(x, weight, weight_scale, divisor, input_scale):
    """MAGI-1's fp8 linear (docs/fp8.md#magi-1-static-quantization) written out: xq = fp8(bf16(clamp(x.float() / divisor, ±448))); y = (xq @ W^T) *
    input_scale.flatten()[0] * weight_scale[0], evaluated in float64 (bf16 output)."""
    xq = (x.float() / divisor).clamp(-448, 448).to(torch.bfloat16).to(E4M3)
    y = xq.double().reshape(-1, x.shape[-1]) @ weight[0].double().t()
    y = y * input_scale.flatten()[0].double() * weight_scale[0].double()
    return y.reshape(*x.shape[:-1], -1)


def _checkpoint(in_f, out_f, per_channel):
    sd = {"weight": (torch.randn(1, out_f, in_f) * 40).clamp(-448, 448).to(E4M3),
          "weight_scale": torch.rand(1) * 0.01 + 1e-3}
    if per_channel:
        sd["input_scale"] = torch.rand(1) * 0.05 + 1e-2
        sd["smooth_scale"] = torch.rand(1, in_f) * 2 + 0.1
    else:
        sd["input_scale"] = torch.rand(in_f) * 0.05 + 1e-2
    return sd


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("cls", [PerTensorQuantizedFp8Linear, PerChannelQuantizedFp8Linear])
def test_magi1_modules_reproduce_forward(cls, backend):
    need("fp8_gemm", backend)
    per_channel = cls is PerChannelQuantizedFp8Linear
    in_f, out_f = 192, 72  # checkpoint-shaped (1, out, in) at a CPU-friendly size; K not a multiple of 128
    mod = cls(in_f, out_f, backend=backend)
    sd = _checkpoint(in_f, out_f, per_channel)
    mod.load_state_dict(sd, strict=True)  # exact key names and shapes of MAGI-1's checkpoints
    assert set(mod.state_dict()) == set(sd)
    x = (torch.randn(3, 11, in_f) * 2).bfloat16()  # (S, N, H) bf16 activations
    y = mod(x)
    divisor = sd["smooth_scale"][0] if per_channel else sd["input_scale"]
    ref = _magi_forward_f64(x, sd["weight"], sd["weight_scale"], divisor, sd["input_scale"])
    assert y.dtype == torch.bfloat16 and y.shape == (3, 11, out_f)
    # Only difference allowed: the final bf16 rounding (1 ulp; fp32 accumulation order below that).
    err = (y.double() - ref).abs()
    assert (err <= ref.abs() * 2.0 ** -7 + 1e-6).all(), err.max()


def test_per_tensor_dequantizes_with_first_input_scale_only():
    mod = PerTensorQuantizedFp8Linear(64, 16)
    sd = _checkpoint(64, 16, False)
    mod.load_state_dict(sd)
    x = torch.randn(5, 64).bfloat16()
    y1 = mod(x)
    # Changing input_scale[1:] changes the quantized x but not the dequant factor; doubling input_scale[0]
    # alone doubles only channel 0's divisor and the whole output's factor.
    mod.input_scale.data[0] *= 2
    ref = _magi_forward_f64(x, sd["weight"], sd["weight_scale"], mod.input_scale, mod.input_scale)
    torch.testing.assert_close(mod(x).double(), ref, rtol=2.0 ** -7, atol=1e-6)
    assert not torch.allclose(mod(x), y1)


@pytest.mark.parametrize("recipe", ["tensor", "channel", "block"])
def test_fp8_linear_close_to_float_linear(recipe):
    lin = nn.Linear(256, 96)
    x = torch.randn(4, 7, 256)
    f8 = Fp8Linear.from_linear(lin, recipe)
    y = f8(x)
    ref = lin(x)
    rel = (y - ref).norm() / ref.norm()
    assert y.dtype == x.dtype and y.shape == ref.shape and rel < 0.06, rel
    need("fp8_gemm", "triton")
    f8.backend = "triton"
    torch.testing.assert_close(f8(x), y, rtol=1e-4, atol=1e-4)


class _ToyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ada_modulate_layer = nn.Sequential(nn.SiLU(), nn.Linear(32, 128))
        self.qkv = nn.Linear(64, 192, bias=False)
        self.proj = nn.Linear(64, 64)
        self.mlp = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
        self.tiny = nn.Linear(64, 8)

    def forward(self, x):
        return self.mlp(self.proj(self.qkv(x)[..., :64])) + self.tiny(x).sum(-1, keepdim=True)


def test_quantize_linear_weights_converts_and_reports():
    model = _ToyBlock()
    x = torch.randn(10, 64)
    ref = model(x)
    report = quantize_linear_weights(model, "block", skip=("ada_modulate_layer.*",))
    assert [n for n, _, _ in report.converted] == ["qkv", "proj", "mlp.0", "mlp.2"]
    assert dict(report.skipped) == {"ada_modulate_layer.1": "matches the skip list",
                                    "tiny": "smaller than min_features=16"}
    assert isinstance(model.mlp[0], Fp8Linear) and isinstance(model.ada_modulate_layer[1], nn.Linear)
    assert "converted 4 linears" in str(report)
    y = model(x)
    assert ((y - ref).norm() / ref.norm()) < 0.1
    with pytest.raises(ValueError, match="recipe"):
        quantize_linear_weights(model, "int4")


# --------------------------------------------------------------------------------------------------
# Autograd: the gradient reaches the float input through the dequantized weight (straight through the
# activation rounding) and a trainable bias; fp8 weights stay frozen.


def _dequant_weight_f64(layer: Fp8Linear) -> torch.Tensor:
    """The layer's weight in float64, from its e4m3 values and scales written out per recipe."""
    w = layer.weight.double()
    s = layer.weight_scale.double()
    if layer.recipe == "tensor":
        return w * s.reshape(())
    if layer.recipe == "channel":
        return w * s.reshape(-1, 1)
    n, k = w.shape
    return w * s.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]


@pytest.mark.parametrize("recipe", ["tensor", "channel", "block"])
def test_fp8_linear_gradients_match_float64_dequantized_math(recipe):
    torch.manual_seed(7)
    lin = nn.Linear(200, 136)  # odd sizes: a ragged 128-block on both axes
    layer = Fp8Linear.from_linear(lin, recipe=recipe)
    x = (torch.randn(2, 5, 200) * 3).requires_grad_()
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    dx64 = g.double() @ _dequant_weight_f64(layer)
    torch.testing.assert_close(x.grad.double(), dx64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad.double(), g.double().sum((0, 1)), rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_fp8_linear_bias_frozen_unless_the_source_bias_was_trainable():
    lin = nn.Linear(32, 16)
    lin.bias.requires_grad_(False)
    layer = Fp8Linear.from_linear(lin)
    x = torch.randn(3, 32, requires_grad=True)
    layer(x).sum().backward()
    assert layer.bias.grad is None and x.grad is not None


@pytest.mark.parametrize("cls", [PerTensorQuantizedFp8Linear, PerChannelQuantizedFp8Linear])
def test_magi1_modules_backward_through_dequantized_weight(cls):
    """d/dx of MAGI-1's fp8 linear, straight through the rounding: (g @ dq(W)) * s_dq / divisor."""
    per_channel = cls is PerChannelQuantizedFp8Linear
    sd = _checkpoint(72, 40, per_channel)
    m = cls(72, 40)
    m.load_state_dict(sd)
    x = (torch.randn(9, 72) * 0.3).requires_grad_()
    y = m(x)
    g = torch.randn_like(y)
    y.backward(g)
    w64 = sd["weight"][0].double() * sd["weight_scale"].double()
    divisor = sd["smooth_scale"][0] if per_channel else sd["input_scale"]
    s_dq = sd["input_scale"].flatten()[0]
    dx64 = (g.double() @ w64) * (s_dq.double() / divisor.double())
    torch.testing.assert_close(x.grad.double(), dx64, rtol=1e-5, atol=1e-6)


def test_fp8_gemm_differentiates_bias_and_gate_through_its_epilogue():
    from magi_kernels import fp8_gemm, fp8_quantize

    a, sa = fp8_quantize(torch.randn(6, 96), "row")
    b, sb = fp8_quantize(torch.randn(40, 96), "row")
    bias = torch.randn(40, requires_grad=True)
    gate = torch.randn(6, 20, requires_grad=True)
    out = fp8_gemm(a, b, sa, sb.reshape(-1), bias=bias, epilogue="swiglu+gate", gate=gate, out_dtype=torch.float32)
    g = torch.randn_like(out)
    gb, gg = torch.autograd.grad(out, (bias, gate), g)
    b64, g64 = bias.detach().double().requires_grad_(), gate.detach().double().requires_grad_()
    y = (a.double() * sa.double()) @ (b.double() * sb.double()).t() + b64
    h = y[:, :20] * torch.sigmoid(y[:, :20]) * y[:, 20:] * g64
    rb, rg = torch.autograd.grad(h, (b64, g64), g.double())
    torch.testing.assert_close(gb.double(), rb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gg.double(), rg, rtol=1e-5, atol=1e-5)


def test_quantized_model_trains_its_biases_and_inputs():
    """quantize_linear_weights (exported at the package root) keeps a model differentiable end to end."""
    import magi_kernels as mk

    model = nn.Sequential(nn.Linear(48, 64), nn.GELU(), nn.Linear(64, 32))
    report = mk.quantize_linear_weights(model, "channel")
    assert len(report.converted) == 2 and all(isinstance(m, mk.Fp8Linear) for m in (model[0], model[2]))
    x = torch.randn(5, 48, requires_grad=True)
    model(x).square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert model[0].bias.grad is not None and model[2].bias.grad is not None
