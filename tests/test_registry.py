"""Backend selection rules: explicit argument > MAGI_KERNELS_BACKEND > auto; explicit never falls back."""

import pytest
import torch

import magi_kernels as mk
from magi_kernels import registry

CPU = registry.CallInfo(torch.device("cpu"), torch.float32, {"head_dim": 64, "norm_scope": "head", "hq": 2,
                                                             "hk": 1, "hidden": 64})


def test_every_op_has_all_three_backends():
    for op in registry.ops():
        assert {"torch", "triton"} <= set(registry.implementations(op)), op


def test_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    for op in registry.ops():
        assert registry.select(op, CPU).backend == "torch"


def test_env_global_and_per_op(monkeypatch):
    monkeypatch.setenv(registry.ENV_VAR, "torch")
    assert registry.select("qk_norm_rope", CPU).backend == "torch"
    monkeypatch.setenv(registry.ENV_VAR, "qk_norm_rope=triton, gated_post_norm_residual=torch")
    assert registry.select("qk_norm_rope", CPU).backend == "triton"  # interpreter is on in the tests
    assert registry.select("gated_post_norm_residual", CPU).backend == "torch"
    monkeypatch.setenv(registry.ENV_VAR, "qk_norm_rope=tpu")
    with pytest.raises(ValueError, match="MAGI_KERNELS_BACKEND"):
        registry.select("qk_norm_rope", CPU)


def test_explicit_argument_beats_env(monkeypatch):
    monkeypatch.setenv(registry.ENV_VAR, "triton")
    assert registry.select("qk_norm_rope", CPU, "torch").backend == "torch"


def test_explicit_request_that_cannot_run_raises_with_reason(monkeypatch):
    import magi_kernels.kernels.triton as tri

    monkeypatch.setattr(tri, "triton_interpreting", lambda: False)
    with pytest.raises(registry.BackendUnavailable, match="TRITON_INTERPRET=1"):
        registry.select("qk_norm_rope", CPU, "triton")
    with pytest.raises(ValueError, match="is not one of"):
        registry.select("qk_norm_rope", CPU, "numpy")


def test_op_backend_argument_reaches_registry(monkeypatch):
    calls = []
    impl = registry.implementations("gated_post_norm_residual")["torch"]
    orig = impl.fn
    monkeypatch.setattr(impl, "fn", lambda *a: (calls.append("torch"), orig(*a)))
    x = torch.randn(4, 8)
    mk.gated_post_norm_residual(x, torch.randn(4, 8), x, backend="torch")
    assert calls == ["torch"]


class _FakeCuda(registry.CallInfo):
    """A CUDA call with a chosen capability, to test auto-selection without a GPU."""

    def __new__(cls, cap):
        obj = object.__new__(cls)
        return obj

    def __init__(self, cap):
        super().__init__(torch.device("cuda", 0), torch.bfloat16, {"head_dim": 128, "norm_scope": "head",
                                                                    "hq": 4, "hk": 1, "hidden": 256})
        object.__setattr__(self, "_cap", cap)

    @property
    def capability(self):
        return self._cap


@pytest.mark.parametrize("cap, built, expect", [
    ((9, 0), "80;89;90a", "cuda"),
    ((8, 9), "80;89;90a", "cuda"),
    ((8, 6), "80;89;90a", "cuda"),  # sm_80 SASS runs on sm_86
    ((8, 9), "90a", "triton"),  # no SASS that runs on sm_89 -> next preference
    ((9, 0), "", "triton"),  # built without nvcc
    ((7, 5), "80;89;90a", "torch"),  # neither kernel family supports Turing
])
def test_auto_on_cuda_follows_preference_and_capability(monkeypatch, cap, built, expect):
    import magi_kernels._ext as ext
    import magi_kernels.kernels.triton as tri

    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    monkeypatch.setattr(ext, "build_info", lambda: {"native": True, "cuda": bool(built), "cuda_archs": built,
                                                    "nvcc_version": "", "simt": True})
    monkeypatch.setattr(tri, "triton_interpreting", lambda: False)
    assert registry.select("qk_norm_rope", _FakeCuda(cap)).backend == expect
