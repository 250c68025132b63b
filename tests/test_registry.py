"""Backend selection rules: explicit argument > MAGI_KERNELS_BACKEND > auto; explicit never falls back."""

import pytest
import torch

import magi_kernels as mk
from magi_kernels import registry
from magi_kernels.ops.gated_post_norm_residual import make_args as gpnr_args
from magi_kernels.ops.qk_norm_rope import make_args as qk_args
from magi_kernels.utils import device as device_facts


def _qk(device="cpu", dtype=torch.float32):
    """Validated qk_norm_rope arguments on ``device`` (meta tensors stand in for CUDA ones: no data is read)."""
    q = torch.empty(3, 4, 128, dtype=dtype, device=device)
    k = torch.empty(3, 1, 128, dtype=dtype, device=device)
    return qk_args(q, k, None, None, None, None, None, None, "layernorm", "head", 1.0, 1e-6, 0, False)


class _OnCuda:
    """The validated args of a call, reported as living on cuda:0 (backend selection reads only metadata)."""

    def __init__(self, args):
        self._args = args
        self.device = torch.device("cuda", 0)

    def __getattr__(self, name):
        return getattr(self._args, name)


def test_every_op_has_torch_and_triton():
    for op in registry.ops():
        assert {"torch", "triton"} <= set(registry.implementations(op)), op


def test_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    assert registry.select("qk_norm_rope", _qk()).backend == "torch"
    x = torch.randn(4, 8)
    assert registry.select("gated_post_norm_residual",
                           gpnr_args(x, x, x, None, None, None, "rmsnorm", 0.0, 1e-6)).backend == "torch"


def test_env_global_and_per_op(monkeypatch):
    x = torch.randn(4, 8)
    gp = gpnr_args(x, x, x, None, None, None, "rmsnorm", 0.0, 1e-6)
    monkeypatch.setenv(registry.ENV_VAR, "torch")
    assert registry.select("qk_norm_rope", _qk()).backend == "torch"
    monkeypatch.setenv(registry.ENV_VAR, "qk_norm_rope=triton, gated_post_norm_residual=torch")
    assert registry.select("qk_norm_rope", _qk()).backend == "triton"  # interpreter is on in the tests
    assert registry.select("gated_post_norm_residual", gp).backend == "torch"
    monkeypatch.setenv(registry.ENV_VAR, "qk_norm_rope=tpu")
    with pytest.raises(ValueError, match="MAGI_KERNELS_BACKEND"):
        registry.select("qk_norm_rope", _qk())


def test_explicit_argument_beats_env(monkeypatch):
    monkeypatch.setenv(registry.ENV_VAR, "triton")
    assert registry.select("qk_norm_rope", _qk(), "torch").backend == "torch"


def test_explicit_request_that_cannot_run_raises_with_reason(monkeypatch):
    import magi_kernels.kernels.triton as tri

    monkeypatch.setattr(tri, "triton_interpreting", lambda: False)
    with pytest.raises(registry.BackendUnavailable, match=r"backend='triton' cannot run.*TRITON_INTERPRET=1"):
        registry.select("qk_norm_rope", _qk(), "triton")
    monkeypatch.setenv(registry.ENV_VAR, "triton")
    with pytest.raises(registry.BackendUnavailable, match=r"MAGI_KERNELS_BACKEND='triton' cannot run"):
        registry.select("qk_norm_rope", _qk())
    with pytest.raises(ValueError, match="is not one of"):
        registry.select("qk_norm_rope", _qk(), "numpy")


def test_supports_reads_the_typed_arguments():
    """Op rules come from the op's Args dataclass: a head_dim the CUDA kernel cannot hold is declined."""
    from magi_kernels.kernels.cuda import qk_norm_rope as cuda_qk

    a = _qk()
    assert cuda_qk.supports(a) is None
    a.q = torch.empty(3, 40, 512)  # hidden scope rows of 40 * 512 exceed the block-per-row kernel
    a.k = torch.empty(3, 1, 512)
    a.norm_scope = "hidden"
    assert "exceed" in cuda_qk.supports(a)


def test_op_backend_argument_reaches_registry(monkeypatch):
    calls = []
    impl = registry.implementations("gated_post_norm_residual")["torch"]
    orig = impl.fn
    monkeypatch.setattr(impl, "fn", lambda *a: (calls.append("torch"), orig(*a)))
    x = torch.randn(4, 8)
    mk.gated_post_norm_residual(x, torch.randn(4, 8), x, preset="magi1", backend="torch")
    assert calls == ["torch"]


@pytest.mark.parametrize("cap, built, expect", [
    ((9, 0), "80;89;90a", "cuda"),
    ((8, 9), "80;89;90a", "cuda"),
    ((8, 6), "80;89;90a", "cuda"),  # sm_80 SASS runs on sm_86
    ((8, 9), "90a", "triton"),  # no SASS that runs on sm_89 -> next preference
    ((9, 0), "", "triton"),  # built without nvcc
    ((7, 5), "80;89;90a", "torch"),  # neither kernel family supports Turing
    ((10, 3), "80-real,90a-real,100-real,120", "cuda"),  # sm_100 SASS runs on sm_103
    ((11, 0), "80-real,90a-real,100-real,120", "triton"),  # compute_120 PTX cannot JIT for an older GPU
    ((13, 0), "80-real,90a-real,100-real,120", "cuda"),  # ... but can for a newer one
])
def test_auto_on_cuda_follows_preference_and_capability(monkeypatch, cap, built, expect):
    import magi_kernels._ext as ext
    import magi_kernels.kernels.triton as tri

    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    monkeypatch.setattr(ext, "build_info", lambda: {"native": True, "cuda": bool(built), "cuda_archs": built,
                                                    "nvcc_version": "", "simt": True})
    monkeypatch.setattr(tri, "triton_interpreting", lambda: False)
    monkeypatch.setattr(device_facts, "capability", lambda device: cap)
    assert registry.select("qk_norm_rope", _OnCuda(_qk(dtype=torch.bfloat16))).backend == expect


def test_device_rules_live_with_each_backend():
    assert registry.device_reason("torch", torch.device("meta")) is None
    assert "not meta" in registry.device_reason("cuda", torch.device("meta"))
    assert "not meta" in registry.device_reason("scaled_mm", torch.device("meta"))
    with pytest.raises(ValueError, match="is not one of"):
        registry.device_reason("tpu", torch.device("cpu"))


def test_import_and_cpu_ops_do_not_import_triton():
    """Triton (about a second to import) loads only when the Triton backend is selected."""
    import subprocess
    import sys

    code = """
import sys, torch
import magi_kernels as mk
assert "triton" not in sys.modules, "import magi_kernels loaded triton"
q, k = torch.randn(5, 2, 16, requires_grad=True), torch.randn(5, 1, 16)
qo, ko = mk.qk_norm_rope(q, k, torch.randn(5, 4), torch.randn(5, 4), preset="magi1")
qo.sum().backward()
x = torch.randn(6, 8)
mk.gated_post_norm_residual(x, torch.randn(6, 8), x, preset="magi1")
r = torch.tensor([[0, 5]], dtype=torch.int32)
mk.flex_attn_func(q, k, k, r, r)
layer = mk.Fp8Linear.from_linear(torch.nn.Linear(16, 8))
layer(torch.randn(3, 16, requires_grad=True)).sum().backward()
assert "triton" not in sys.modules, "a CPU op call loaded triton"
mk.qk_norm_rope(q, k, preset="magi1", backend="triton")
assert "triton" in sys.modules
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != registry.ENV_VAR}
    env["TRITON_INTERPRET"] = "1"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
