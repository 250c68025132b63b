"""Kernel signatures come from the kernels themselves (argument names + the naming rule in
magi_kernels/kernels/triton/aot.py), and launches pass arguments by name, so a swapped, missing or
misspelt argument is an error instead of a silently wrong launch."""

from __future__ import annotations

import inspect

import pytest
import torch
import triton
import triton.language as tl

from magi_kernels.kernels.triton.aot import AotConfig, KernelLaunch, kernel_signature, registered_configs


@triton.jit
def _good_kernel(x_ptr, out_ptr, n_rows, stride_x, scale: tl.float32, wide: tl.int64, BLOCK: tl.constexpr):
    pass


@triton.jit
def _upper_runtime_kernel(x_ptr, N, BLOCK: tl.constexpr):  # N is UPPER_CASE but a runtime integer
    pass


@triton.jit
def _lower_constexpr_kernel(x_ptr, block: tl.constexpr):
    pass


@triton.jit
def _odd_annotation_kernel(x_ptr, flag: tl.int1):
    pass


@triton.jit
def _annotated_pointer_kernel(x_ptr: tl.float32):
    pass


def _config(kernel: str, pointers: dict, constexprs: dict | None = None, **kw) -> AotConfig:
    return AotConfig(kernel=f"{__name__}:{kernel}", name="fixture", config="test", pointer_dtypes=pointers,
                     constexprs={"BLOCK": 16} if constexprs is None else constexprs, archs=(90,), **kw)


def test_signature_follows_the_naming_rule():
    cfg = _config("_good_kernel", {"x_ptr": "bf16", "out_ptr": "fp32"}, divisible_by_16=("*_ptr", "stride_*"))
    assert cfg.signature == {"x_ptr": "*bf16", "out_ptr": "*fp32", "n_rows": "i32", "stride_x": "i32",
                             "scale": "fp32", "wide": "i64", "BLOCK": "constexpr"}
    assert cfg.runtime_args == ("x_ptr", "out_ptr", "n_rows", "stride_x", "scale", "wide")
    assert cfg.divisible_args == ("x_ptr", "out_ptr", "stride_x")
    # Hints are keyed by the argument's position in the kernel, not in a hand-kept list.
    assert cfg.attrs() == {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]],
                           (3,): [["tt.divisibility", 16]]}


@pytest.mark.parametrize("kernel, pointers, constexprs, match", [
    ("_upper_runtime_kernel", {"x_ptr": "fp16"}, None, "'N' is UPPER_CASE"),
    ("_lower_constexpr_kernel", {"x_ptr": "fp16"}, {"block": 16}, "'block' must be UPPER_CASE"),
    ("_odd_annotation_kernel", {"x_ptr": "fp16"}, {}, "annotation 'u1'"),
    ("_annotated_pointer_kernel", {"x_ptr": "fp16"}, {}, "must not be annotated"),
    ("_good_kernel", {"x_ptr": "bf16"}, None, r"without a dtype in the config: \['out_ptr'\]"),
    ("_good_kernel", {"x_ptr": "bf16", "out_ptr": "fp32", "n_rows": "i32"}, None, r"not pointer parameters"),
    ("_good_kernel", {"x_ptr": "bf16", "out_ptr": "float"}, None, "pointer dtypes must be among"),
    ("_good_kernel", {"x_ptr": "bf16", "out_ptr": "fp32"}, {}, r"constexpr values missing for \['BLOCK'\]"),
    ("_good_kernel", {"x_ptr": "bf16", "out_ptr": "fp32"}, {"BLOCK": 16, "n_rows": 3}, r"non-constexpr or unknown"),
])
def test_arguments_the_rule_does_not_cover_are_rejected(kernel, pointers, constexprs, match):
    with pytest.raises(ValueError, match=match):
        _config(kernel, pointers, constexprs)


def test_divisibility_pattern_must_match_an_argument():
    with pytest.raises(ValueError, match="'K' matches no runtime parameter"):
        _config("_good_kernel", {"x_ptr": "bf16", "out_ptr": "fp32"}, divisible_by_16=("*_ptr", "K"))


def test_every_shipped_signature_is_the_kernels_parameter_list():
    for cfg in registered_configs():
        from magi_kernels.kernels.triton.aot import resolve_kernel

        params = list(inspect.signature(resolve_kernel(cfg).fn).parameters)
        assert list(cfg.signature) == params, cfg.key
        assert cfg.signature == kernel_signature(resolve_kernel(cfg), cfg.pointer_dtypes)


def _launch_args(**changes):
    args = dict(x_ptr=torch.zeros(4), out_ptr=torch.zeros(4), n_rows=4, stride_x=1, scale=0.5, wide=2**40)
    args.update(changes)
    return {k: v for k, v in args.items() if v is not None}


def test_launch_checks_argument_names_and_kinds():
    cfg = _config("_good_kernel", {"x_ptr": "fp32", "out_ptr": "fp32"})
    KernelLaunch(cfg, (1,), _launch_args())  # well-formed
    with pytest.raises(TypeError, match=r"missing arguments \['stride_x'\]"):
        KernelLaunch(cfg, (1,), _launch_args(stride_x=None))
    # A misspelt name (or one borrowed from another kernel) is caught: missing + unknown.
    bad = _launch_args(stride_x=None, stride_xm=1)
    with pytest.raises(TypeError, match=r"missing arguments \['stride_x'\], unknown arguments \['stride_xm'\]"):
        KernelLaunch(cfg, (1,), bad)
    # Swapping a size and a pointer, or passing a float where the kernel takes an integer, is caught.
    with pytest.raises(TypeError, match="x_ptr is a pointer"):
        KernelLaunch(cfg, (1,), _launch_args(x_ptr=4, n_rows=torch.zeros(4)))
    with pytest.raises(TypeError, match="n_rows is i32 but got a float"):
        KernelLaunch(cfg, (1,), _launch_args(n_rows=4.0))
    with pytest.raises(TypeError, match="stride_x must be a Python int, got bool"):
        KernelLaunch(cfg, (1,), _launch_args(stride_x=True))
