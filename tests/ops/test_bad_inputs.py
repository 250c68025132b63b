"""Bad input to the ops, masks and fp8 modules: a clear error naming the argument, raised before any work.

One row per case: (id, call, the text the error must contain). Inputs are tiny CPU tensors.
"""

import re

import pytest
import torch

import magi_kernels as mk
from magi_kernels import registry
from magi_kernels.utils.checks import MagiArgumentError


def _qkv(d=16):
    return torch.randn(6, 2, d), torch.randn(6, 1, d), torch.randn(6, 1, d)


def _ranges():
    return torch.tensor([[0, 6]], dtype=torch.int32), torch.tensor([[0, 6]], dtype=torch.int32)


def _qk(**kw):
    q, k = torch.randn(5, 2, 16), torch.randn(5, 1, 16)
    cos, sin = torch.randn(5, 4), torch.randn(5, 4)
    return mk.qk_norm_rope(q, k, cos, sin, **kw)


def _gpnr(**kw):
    x = torch.randn(6, 8)
    return mk.gated_post_norm_residual(x, torch.randn(2, 8), torch.randn(6, 8),
                                       gate_index=torch.tensor([0, 0, 0, 1, 1, 1]), **kw)


def _fp8_linear_module_on_narrow_input():
    layer = mk.Fp8Linear.from_linear(torch.nn.Linear(64, 32))
    return layer(torch.randn(3, 48))


def _fp8_linear_op_on_narrow_input():
    w, ws = mk.fp8_quantize(torch.randn(32, 64), "row")
    return mk.fp8_linear(torch.randn(3, 48), w, ws)


def _fp8_gemm_grad_for_e4m3_operand():
    a = torch.randn(4, 32).to(torch.float8_e4m3fn).requires_grad_()
    b = torch.randn(8, 32).to(torch.float8_e4m3fn)
    out = mk.fp8_gemm(a, b, torch.ones(1), torch.ones(1), out_dtype=torch.float32)
    out.sum().backward()


def _env_backend_that_cannot_run(monkeypatch):
    monkeypatch.setenv(registry.ENV_VAR, "scaled_mm")  # qk_norm_rope has no scaled_mm implementation
    return _qk(preset="magi1")


CASES = [
    # flex_attn
    ("flex head_dim 0", lambda: mk.flex_attn_func(*_qkv(0), *_ranges()), MagiArgumentError,
     "flex_attn: argument 'q' must have head_dim >= 1"),
    ("flex softmax_scale=True", lambda: mk.flex_attn_func(*_qkv(), *_ranges(), softmax_scale=True),
     MagiArgumentError, "argument 'softmax_scale' must be a finite float or None, got True"),
    ("flex softcap=True", lambda: mk.flex_attn_func(*_qkv(), *_ranges(), softcap=True), MagiArgumentError,
     "argument 'softcap' must be a finite float >= 0"),
    # qk_norm_rope
    ("qk out_dtype='bf16'", lambda: _qk(preset="magi1", out_dtype="bf16"), MagiArgumentError,
     "qk_norm_rope: argument 'out_dtype' must be a torch.dtype"),
    ("qk integer out_dtype", lambda: _qk(preset="magi1", out_dtype=torch.int32), MagiArgumentError,
     "qk_norm_rope: argument 'out_dtype' must be a torch.dtype"),
    ("qk no style", lambda: _qk(), MagiArgumentError,
     "qk_norm_rope: argument 'norm' must be given explicitly (no model's choice is assumed), or pass preset="),
    ("qk partial style", lambda: _qk(norm="rmsnorm", norm_scope="head", weight_offset=0.0), MagiArgumentError,
     "argument 'interleaved' must be given explicitly"),
    ("qk unknown preset", lambda: _qk(preset="sd3"), MagiArgumentError,
     "qk_norm_rope: argument 'preset' must be one of ['hunyuan', 'magi1', 'wan']"),
    ("qk weight_offset str", lambda: _qk(preset="magi1", weight_offset="1"), MagiArgumentError,
     "argument 'weight_offset' must be a number, got str"),
    ("qk interleaved str", lambda: _qk(preset="magi1", interleaved="yes"), MagiArgumentError,
     "argument 'interleaved' must be a bool"),
    ("qk rotary_dim float", lambda: _qk(preset="magi1", rotary_dim=8.0), MagiArgumentError,
     "argument 'rotary_dim' must be an int"),
    # gated_post_norm_residual
    ("gpnr integer out_dtype", lambda: _gpnr(preset="magi1", out_dtype=torch.int64), MagiArgumentError,
     "gated_post_norm_residual: argument 'out_dtype' must be a torch.dtype"),
    ("gpnr no style", lambda: _gpnr(), MagiArgumentError,
     "gated_post_norm_residual: argument 'norm' must be given explicitly"),
    ("gpnr eps=True", lambda: _gpnr(preset="magi1", eps=True), MagiArgumentError,
     "argument 'eps' must be a number, got bool"),
    # fp8 linears
    ("Fp8Linear narrow input", _fp8_linear_module_on_narrow_input, MagiArgumentError,
     "Fp8Linear(in_features=64, out_features=32): input must have last dim in_features=64, got shape [3, 48]"),
    ("fp8_linear narrow input", _fp8_linear_op_on_narrow_input, MagiArgumentError,
     "fp8_linear: argument 'x' must have in_features=64"),
    ("fp8_gemm grad for e4m3 a", _fp8_gemm_grad_for_e4m3_operand, MagiArgumentError,
     "fp8_gemm: argument 'a' is an e4m3 operand and gets no gradient"),
    ("fp8_gemm out_dtype str", lambda: mk.fp8_gemm(torch.zeros(2, 16, dtype=torch.float8_e4m3fn),
                                                  torch.zeros(4, 16, dtype=torch.float8_e4m3fn), torch.ones(1),
                                                  torch.ones(1), out_dtype="bf16"),
     MagiArgumentError, "fp8_gemm: argument 'out_dtype' must be a torch.dtype"),
    ("fp8_gemm fast_accum with block scales", lambda: mk.fp8_gemm(
        torch.zeros(2, 200, dtype=torch.float8_e4m3fn), torch.zeros(4, 200, dtype=torch.float8_e4m3fn),
        torch.ones(2, 2), torch.ones(1), fast_accum=True),
     MagiArgumentError, "fp8_gemm: argument 'fast_accum' must be False with block scales"),
    # masks
    ("BlockCausal chunk_size=4.5", lambda: mk.BlockCausal(chunk_size=4.5, num_chunks=2), MagiArgumentError,
     "BlockCausal: argument 'chunk_size' must be an int, got float 4.5"),
    ("BlockCausal chunk_size='4'", lambda: mk.BlockCausal(chunk_size="4", num_chunks=2), MagiArgumentError,
     "BlockCausal: argument 'chunk_size' must be an int, got str '4'"),
    ("BlockCausal num_chunks=2.7", lambda: mk.BlockCausal(chunk_size=4, num_chunks=2.7), MagiArgumentError,
     "BlockCausal: argument 'num_chunks' must be an int, got float 2.7"),
    ("BlockCausal prefix_len=1.5", lambda: mk.BlockCausal(chunk_size=4, num_chunks=2, prefix_len=1.5),
     MagiArgumentError, "BlockCausal: argument 'prefix_len' must be an int"),
    ("BlockCausal window_chunks=1.5", lambda: mk.BlockCausal(chunk_size=4, num_chunks=2, window_chunks=1.5),
     MagiArgumentError, "BlockCausal: argument 'window_chunks' must be an int"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_a_clear_error(case):
    _, call, exc, text = case
    with pytest.raises(exc, match=re.escape(text)):
        call()


def test_registry_message_names_the_environment_variable_with_its_value(monkeypatch):
    with pytest.raises(registry.BackendUnavailable,
                       match=re.escape("qk_norm_rope: MAGI_KERNELS_BACKEND='scaled_mm' cannot run this call: "
                                       "op 'qk_norm_rope' has no 'scaled_mm' implementation")):
        _env_backend_that_cannot_run(monkeypatch)


def test_numpy_integers_still_count_as_ints():
    import numpy as np

    assert mk.BlockCausal(chunk_size=np.int64(4), num_chunks=np.int32(2)).total_q == 8
