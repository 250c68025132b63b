"""gated_post_norm_residual on every backend against a float64 evaluation of the reference."""

import pytest
import torch

import magi_kernels as mk
from magi_kernels import registry
from magi_kernels.ops.gated_post_norm_residual import make_args
from magi_kernels.reference.gated_post_norm_residual import gated_post_norm_residual_ref
from magi_kernels.utils.checks import MagiArgumentError

from ._backends import ALL_BACKENDS, assert_matches_ref, backend_param
from ..conftest import poison_like

# (tokens, hidden, gate rows or None for per-token gates, x / gate / residual dtypes, norm, weight, bias)
CASES = {
    # MAGI-1: fp32 attention projection, bf16 gate and residual, 1p LayerNorm, 3 chunks' gates.
    "magi1_attn": dict(t=45, h=192, g=3, xd=torch.float32, gd=torch.bfloat16, rd=torch.bfloat16,
                       norm="layernorm", w=True, b=True, off=1.0),
    # MAGI-1's MLP branch: bf16 everywhere, odd hidden size.
    "magi1_mlp": dict(t=19, h=200, g=2, xd=torch.bfloat16, gd=torch.bfloat16, rd=torch.bfloat16,
                      norm="layernorm", w=True, b=True, off=1.0),
    # Per-token gates, RMSNorm without affine, fp16.
    "rms_per_token": dict(t=9, h=77, g=None, xd=torch.float16, gd=torch.float16, rd=torch.float16,
                          norm="rmsnorm", w=False, b=False, off=0.0),
    # fp32 throughout, hidden size past one 4096-wide block.
    "fp32_wide": dict(t=3, h=5000, g=1, xd=torch.float32, gd=torch.float32, rd=torch.float32,
                      norm="layernorm", w=True, b=False, off=0.0),
}


def make_inputs(c, row_stride_pad=0):
    t, h = c["t"], c["h"]
    x = (torch.randn(t, h + row_stride_pad) * 2 + 0.3).to(c["xd"])[:, :h]
    residual = torch.randn(t, h + row_stride_pad).to(c["rd"])[:, :h]
    g_rows = t if c["g"] is None else c["g"]
    gate = (torch.rand(g_rows, h) * 2 - 1).to(c["gd"])
    gate_index = None if c["g"] is None else torch.sort(torch.randint(0, c["g"], (t,), dtype=torch.int32))[0]
    w = torch.randn(h) * 0.2 if c["w"] else None
    b = torch.randn(h) * 0.1 if c["b"] else None
    return x, gate, residual, w, b, gate_index


def run_backend(c, backend, x, gate, residual, w, b, gate_index, out_dtype):
    args = make_args(x, gate, residual, w, b, gate_index, c["norm"], c["off"], 1e-6)
    backend_param("gated_post_norm_residual", backend, args)
    out = poison_like(torch.empty(args.x.shape, dtype=out_dtype))
    registry.implementations("gated_post_norm_residual")[backend].fn(args, out)
    return out


def ref64(c, x, gate, residual, w, b, gate_index):
    return gated_post_norm_residual_ref(x.double(), gate.double(), residual.double(), w, b, gate_index,
                                       norm=c["norm"], weight_offset=c["off"], eps=1e-6, out_dtype=torch.float64,
                                       compute_dtype=torch.float64)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_float64_reference(backend, case):
    c = CASES[case]
    inputs = make_inputs(c)
    out = run_backend(c, backend, *inputs, c["rd"])
    assert_matches_ref(out, ref64(c, *inputs))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_strided_rows_and_fp32_out(backend):
    c = CASES["magi1_mlp"]
    inputs = make_inputs(c, row_stride_pad=13)
    assert inputs[0].stride(0) == c["h"] + 13
    out = run_backend(c, backend, *inputs, torch.float32)
    assert_matches_ref(out, ref64(c, *inputs))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_out_of_range_gate_index_never_reads_out_of_bounds(backend, monkeypatch):
    """With the host-side check disabled, a bad index must poison its row (NaN), not read memory."""
    monkeypatch.setenv("MAGI_KERNELS_CHECK_INDICES", "0")
    c = CASES["magi1_mlp"]
    x, gate, residual, w, b, gi = make_inputs(c)
    gi = gi.clone()
    gi[4] = 1000
    gi[7] = -3
    out = run_backend(c, backend, x, gate, residual, w, b, gi, torch.float32)
    assert torch.isnan(out[4]).all() and torch.isnan(out[7]).all()
    good = torch.ones(c["t"], dtype=torch.bool)
    good[[4, 7]] = False
    ref = ref64(c, x[good], gate, residual[good], w, b, gi[good])
    assert_matches_ref(out[good], ref)


def test_public_api_and_magi1_semantics():
    """Spelled out as MAGI-1 writes it: (post_norm(o.float() * g[cmap].float()) + residual.float()).to(bf16)."""
    t, h, chunks = 24, 64, 3
    o = torch.randn(t, h)
    g = torch.randn(chunks, h).bfloat16()
    cmap = torch.arange(t) // (t // chunks)
    residual = torch.randn(t, h).bfloat16()
    w, b = torch.randn(h) * 0.1, torch.randn(h) * 0.1
    expect = (torch.nn.functional.layer_norm(o.float() * g[cmap].float(), (h,), w + 1, b, 1e-6)
              + residual.float()).to(torch.bfloat16)
    got = mk.gated_post_norm_residual(o, g, residual, w, b, gate_index=cmap, preset="magi1")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expect.float(), rtol=2**-7, atol=1e-2)


def test_autograd_matches_float64():
    c = CASES["magi1_attn"] | {"xd": torch.float32, "gd": torch.float32, "rd": torch.float32}
    x, gate, residual, w, b, gi = make_inputs(c)
    leaves = [t.requires_grad_() for t in (x, gate, residual, w, b)]
    out = mk.gated_post_norm_residual(x, gate, residual, w, b, gate_index=gi, preset="magi1", backend="torch")
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, go)
    dl = [t.detach().double().requires_grad_() for t in leaves]
    ref = gated_post_norm_residual_ref(*dl, gi, norm="layernorm", weight_offset=1.0, compute_dtype=torch.float64)
    rgrads = torch.autograd.grad(ref, dl, go.double())
    for a, r in zip(grads, rgrads):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.zeros(6, 8, dtype=torch.int64)), "'x' must have dtype"),
    (dict(residual=torch.zeros(6, 9)), "'residual' must have x's shape"),
    (dict(gate=torch.zeros(2, 9)), "'gate' must have shape"),
    (dict(gate_index=None), "'gate_index' is required"),
    (dict(gate_index=torch.zeros(5, dtype=torch.int32)), "'gate_index' must have one entry per token"),
    (dict(gate_index=torch.zeros(6)), "'gate_index' must have dtype"),
    (dict(gate_index=torch.tensor([0, 1, 2, 0, 1, 0], dtype=torch.int32)), "'gate_index' must index gate rows"),
    (dict(weight=torch.zeros(9)), "'weight' must have shape"),
    (dict(norm="groupnorm"), "'norm' must be one of"),
    (dict(x=torch.zeros(8, 6).t()), "'x' must have a contiguous last dim"),
])
def test_bad_input_names_the_argument(bad, match):
    kw = dict(x=torch.zeros(6, 8), gate=torch.zeros(2, 8), residual=torch.zeros(6, 8),
              gate_index=torch.tensor([0, 0, 0, 1, 1, 1], dtype=torch.int32))
    kw.update(bad)
    if kw["x"].shape != (6, 8) and "residual" not in bad:
        kw["residual"] = torch.zeros(kw["x"].shape)
    x, gate, residual = kw.pop("x"), kw.pop("gate"), kw.pop("residual")
    with pytest.raises(MagiArgumentError, match=match):
        mk.gated_post_norm_residual(x, gate, residual, preset="magi1", **kw)


def test_gate_index_values_are_checked_once_per_call(monkeypatch):
    """The range check reads device values (a sync on GPUs): exactly once per call, inside the op."""
    import importlib

    op_file = importlib.import_module("magi_kernels.ops.gated_post_norm_residual")  # the module, not the function

    calls = []
    orig = op_file.check_gate_index_values
    monkeypatch.setattr(op_file, "check_gate_index_values", lambda *a: (calls.append(1), orig(*a)))
    x = torch.randn(6, 8, requires_grad=True)
    out = mk.gated_post_norm_residual(x, torch.randn(2, 8), torch.randn(6, 8), preset="magi1",
                                      gate_index=torch.tensor([0, 0, 0, 1, 1, 1], dtype=torch.int32))
    out.sum().backward()
    assert calls == [1]
