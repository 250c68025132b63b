"""launch() of every Triton kernel only ever picks a config registered with the AOT checker, with
runtime arguments whose Triton types match the signature derived from the kernel (so the JIT compiles
exactly the kernel the checker inspected). No kernel runs here: make_launch() is pure host logic."""

from __future__ import annotations

import itertools

import pytest
import torch

from magi_kernels.kernels.triton import gated_post_norm_residual as gpnr_kern
from magi_kernels.kernels.triton import qk_norm_rope as qk_kern
from magi_kernels.kernels.triton.aot import KernelLaunch, registered_configs
from magi_kernels.ops.gated_post_norm_residual import make_args as gpnr_args
from magi_kernels.ops.qk_norm_rope import make_args as qk_args

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PTR = {torch.uint8: "*u8", torch.float32: "*fp32", torch.int32: "*i32"}


def _triton_type(v) -> str:
    """The type Triton's JIT gives a runtime argument (bools would become i1: not allowed here)."""
    if isinstance(v, torch.Tensor):
        return _PTR.get(v.dtype, f"*{v.dtype}")
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2**31 <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    return type(v).__name__


def _assert_registered(launch: KernelLaunch) -> None:
    registered = {c.key: c for c in registered_configs()}
    cfg = launch.config
    assert cfg.key in registered, f"launch picked unregistered config {cfg.key}"
    assert registered[cfg.key] == cfg
    runtime = [k for k, v in cfg.signature.items() if v != "constexpr"]
    assert sorted(runtime) == sorted(launch.args)
    for name in runtime:
        v = launch.args[name]
        assert _triton_type(v) == cfg.signature[name], f"{cfg.key}: arg {name} is {_triton_type(v)}"
    assert all(g > 0 for g in launch.grid)


def test_shipped_configs_are_registered():
    keys = {c.key for c in registered_configs()}
    for mod in (qk_kern, gpnr_kern):
        shipped = mod.shipped_configs()
        assert shipped and all(c.key in keys for c in shipped)
        assert all(c.mma is None for c in shipped)  # norm kernels have no tl.dot


# --------------------------------------------------------------------------------------------------
# qk_norm_rope


QK_SHAPES = [  # (T, Hq, Hk, D)
    (1, 1, 1, 1), (5, 3, 1, 40), (7, 24, 8, 64), (3, 12, 12, 72), (2, 5, 2, 96), (9, 16, 16, 128),
    (4, 2, 2, 200), (3, 4, 1, 256), (2, 2, 2, 500), (1, 1, 1, 512), (3, 40, 40, 128), (2, 64, 8, 128),
    (2, 16, 16, 512),
]


@pytest.mark.parametrize("shape", QK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_qk_norm_rope_picks_registered_configs(shape):
    T, hq, hk, d = shape
    for scope, dt, out_dt, rot, inter, strided in itertools.product(
            ("head", "hidden"), DTYPES, DTYPES, (0, 2 * (d // 4)), (False, True), (False, True)):
        if rot == 0 and inter:
            continue
        if strided:
            buf = torch.empty(T, hq + 2 * hk, d, dtype=dt)
            q, k = buf[:, :hq], buf[:, hq:hq + hk]
        else:
            q, k = torch.empty(T, hq, d, dtype=dt), torch.empty(T, hk, d, dtype=dt)
        cos = sin = torch.zeros(T, rot // 2) if rot else None
        nq, nk = (d, d) if scope == "head" else (hq * d, hk * d)
        a = qk_args(q, k, cos, sin, torch.ones(nq), None, None, torch.zeros(nk), "rmsnorm", scope, 1.0, 1e-6,
                    rot, inter)
        reason = qk_kern.supports(a)
        if reason is not None:
            # Only a hidden row too long for registers is declined, and the reason says so.
            assert scope == "hidden" and max(hq, hk) * d > qk_kern.HIDDEN_MAX_TILE and "head_dim" in reason
            with pytest.raises(ValueError, match="norm_scope='hidden'"):
                qk_kern.select_config(d, hq, hk, scope)
            continue
        launch = qk_kern.make_launch(a, torch.empty(T, hq, d, dtype=out_dt), torch.empty(T, hk, d, dtype=out_dt))
        _assert_registered(launch)
        assert launch.config.constexprs["HIDDEN"] == (scope == "hidden")
        if scope == "head":
            assert launch.config.constexprs["BLOCK_D"] >= d
        else:
            assert launch.config.constexprs["BLOCK_D"] >= max(hq, hk) * d


def test_qk_norm_rope_launch_goes_through_a_registered_config(monkeypatch):
    seen = []
    monkeypatch.setattr(KernelLaunch, "run", lambda launch: seen.append(launch))
    q, k = torch.randn(6, 3, 72), torch.randn(6, 1, 72)
    a = qk_args(q, k, None, None, None, None, None, None, "layernorm", "head", 0.0, 1e-6, 0, False)
    qk_kern.launch(a, torch.empty(6, 3, 72), torch.empty(6, 1, 72))
    (launch,) = seen
    _assert_registered(launch)
    # No tokens: nothing to launch.
    seen.clear()
    a = qk_args(q[:0], k[:0], None, None, None, None, None, None, "layernorm", "head", 0.0, 1e-6, 0, False)
    qk_kern.launch(a, torch.empty(0, 3, 72), torch.empty(0, 1, 72))
    assert not seen


# --------------------------------------------------------------------------------------------------
# gated_post_norm_residual


@pytest.mark.parametrize("hidden", [1, 7, 32, 33, 77, 128, 200, 1000, 1024, 1025, 3072, 5000, 6144, 8192, 8193])
def test_gated_post_norm_residual_picks_registered_configs(hidden):
    T = 5
    if hidden > gpnr_kern.MAX_HIDDEN:
        x = torch.zeros(T, hidden)
        a = gpnr_args(x, torch.zeros(T, hidden), x, None, None, None, "layernorm", 1.0, 1e-6)
        assert "hidden size" in gpnr_kern.supports(a)
        return
    for xd, gd, rd, od in itertools.product(DTYPES, repeat=4):
        for with_index, pad in ((False, 0), (True, 3)):
            x = torch.empty(T, hidden + pad, dtype=xd)[:, :hidden]
            residual = torch.empty(T, hidden + pad, dtype=rd)[:, :hidden]
            gate = torch.zeros(2 if with_index else T, hidden, dtype=gd)
            gi = torch.tensor([0, 1, 1, 0, 1], dtype=torch.int64) if with_index else None
            a = gpnr_args(x, gate, residual, torch.zeros(hidden), None, gi, "layernorm", 1.0, 1e-6)
            assert gpnr_kern.supports(a) is None
            launch = gpnr_kern.make_launch(a, torch.empty(T, hidden, dtype=od))
            _assert_registered(launch)
            assert launch.config.constexprs["BLOCK_N"] >= hidden


def test_gated_launch_goes_through_a_registered_config(monkeypatch):
    seen = []
    monkeypatch.setattr(KernelLaunch, "run", lambda launch: seen.append(launch))
    x = torch.randn(4, 300, dtype=torch.bfloat16)
    a = gpnr_args(x, torch.randn(4, 300), x.clone(), None, None, None, "rmsnorm", 0.0, 1e-6)
    gpnr_kern.launch(a, torch.empty(4, 300))
    (launch,) = seen
    _assert_registered(launch)
