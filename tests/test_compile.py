"""torch.compile(fullgraph=True) traces every op as one opaque custom-op node (no graph breaks), on CPU."""

import torch

import magi_kernels as mk


def test_fullgraph_compile_over_every_op_matches_eager():
    torch._dynamo.reset()

    def block(q, k, cos, sin, w, x, gate, residual, gi):
        qo, ko = mk.qk_norm_rope(q, k, cos, sin, q_weight=w, k_weight=w, preset="magi1")
        y = mk.gated_post_norm_residual(x, gate, residual, gate_index=gi, preset="magi1")
        return qo.sum(-1) + ko.sum(-1), y

    q, k = torch.randn(12, 3, 32), torch.randn(12, 1, 32)
    cos, sin = torch.randn(12, 8), torch.randn(12, 8)
    w = torch.randn(32)
    x, gate, residual = torch.randn(12, 40), torch.randn(2, 40), torch.randn(12, 40)
    gi = torch.arange(12, dtype=torch.int32) // 6
    eager = block(q, k, cos, sin, w, x, gate, residual, gi)
    compiled = torch.compile(block, fullgraph=True)(q, k, cos, sin, w, x, gate, residual, gi)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e)


def test_custom_ops_pass_opcheck():
    """torch.library.opcheck: schema, fake (meta) kernel, and autograd registration are consistent."""
    q, k = torch.randn(5, 2, 16), torch.randn(5, 1, 16)
    cos, sin = torch.randn(5, 4), torch.randn(5, 4)
    torch.library.opcheck(torch.ops.magi_kernels.qk_norm_rope.default,
                          (q, k, cos, sin, torch.randn(16), None, None, None, "layernorm", "head", 1.0, 1e-6, 8,
                           False, None, None))
    x = torch.randn(6, 24)
    torch.library.opcheck(torch.ops.magi_kernels.gated_post_norm_residual.default,
                          (x, torch.randn(2, 24), torch.randn(6, 24), torch.randn(24), None,
                           torch.tensor([0, 0, 0, 1, 1, 1], dtype=torch.int32), "layernorm", 1.0, 1e-6, None, None))


def test_fullgraph_compile_of_fp8_linear_forward_and_backward():
    """The differentiable fp8 linear compiles as one node with its backward; gradients equal eager ones."""
    torch._dynamo.reset()
    layer = mk.Fp8Linear.from_linear(torch.nn.Linear(40, 24), recipe="channel")
    x = torch.randn(7, 40, requires_grad=True)
    eager = layer(x)
    (gx_eager,) = torch.autograd.grad(eager.sum(), x)
    compiled = torch.compile(layer, fullgraph=True)(x)
    (gx_compiled,) = torch.autograd.grad(compiled.sum(), x)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(gx_compiled, gx_eager)


def test_fp8_linear_passes_opcheck():
    w, ws = mk.fp8_quantize(torch.randn(24, 40), "row")
    x = torch.randn(5, 40, requires_grad=True)
    torch.library.opcheck(torch.ops.magi_kernels.fp8_linear.default,
                          (x, w, ws, torch.randn(24), "row", None, None, None, None, None),
                          # test_schema perturbs every input with float math, which e4m3 tensors do not support
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))
