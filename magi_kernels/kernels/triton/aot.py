"""Shipped Triton kernel configurations, the argument-naming rule they obey, and launches built from them.

Every Triton kernel module registers each config it can launch with :func:`register_aot` at import.
``python -m magi_kernels.tools.aot_check`` compiles every (kernel, config, arch) with
``triton.compile(..., target=GPUTarget("cuda", arch, 32))`` on this machine (no GPU needed), reads
the cubin with the ``cuobjdump`` / ``nvdisasm`` that ship in the Triton wheel, and checks: it compiles,
no register spills (no STL/LDL, no stack), shared memory fits the arch, and the tensor-core instruction
class matches ``mma`` (HGMMA/QGMMA on sm_90, HMMA/QMMA on sm_89 and sm_80).

**Argument-naming rule.** Nobody writes a kernel's signature by hand: :func:`kernel_signature` reads the
``@triton.jit`` function's parameters and types each one by its name and annotation:

==========================================  =====================================================
parameter                                   Triton type
==========================================  =====================================================
``UPPER_CASE: tl.constexpr``                ``constexpr`` (value from ``AotConfig.constexprs``)
``name_ptr``                                ``*<dtype>``, dtype from ``AotConfig.pointer_dtypes``
``name: tl.float32``                        ``fp32`` scalar
``name: tl.int64``                          ``i64`` scalar
any other ``lower_case`` name               ``i32`` scalar (sizes, strides, counts, flags, codes)
==========================================  =====================================================

A parameter the rule does not cover is an error when the config is built: an UPPER_CASE name that is
not ``tl.constexpr`` (or the reverse), a pointer without a dtype, a dtype for a parameter that is not
a pointer, or another annotation. The divisibility hints (``tt.divisibility`` 16, which Triton's JIT
applies at run time to 16-byte-aligned pointers and integers that are multiples of 16) are given as
name patterns (``"*_ptr"``, ``"stride_*"``) resolved against the same parameter list, so hints follow
the kernel's argument order instead of a second hand-kept list.

**Launches** (:class:`KernelLaunch`) pass every runtime argument by keyword from one dict whose keys must
be exactly the kernel's runtime parameters, so two integers cannot trade places unnoticed.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import importlib
import inspect
import pkgutil
from typing import Any, Mapping

import torch

# mma classes: None = the kernel has no tl.dot; "f16" = fp16/bf16 operands; "fp8" = e4m3/e5m2 operands.
MMA_CLASSES = (None, "f16", "fp8")
POINTER_SUFFIX = "_ptr"
# Element types a pointer may have (Triton's names).
POINTER_DTYPES = ("fp32", "fp16", "bf16", "fp8e4nv", "u8", "i32", "i64")
_SCALAR_ANNOTATIONS = {"fp32": "fp32", "i64": "i64", "i32": "i32"}


def _annotation(param: inspect.Parameter) -> str:
    """The parameter's annotation in Triton's spelling ("constexpr", "fp32", ...), or "" if it has none."""
    from triton.runtime.jit import _normalize_ty

    if param.annotation is inspect.Parameter.empty:
        return ""
    return _normalize_ty(param.annotation)


def _python_function(fn):
    """The Python function behind a @triton.jit object (compiled or interpreted)."""
    inner = getattr(fn, "fn", None)
    if inner is None or not callable(inner):
        raise TypeError(f"{fn!r} is not a @triton.jit function")
    return inner


@functools.cache
def kernel_parameters(fn) -> tuple[tuple[str, str], ...]:
    """((name, Triton type or "ptr"), ...) of a @triton.jit function, in order, by the naming rule.

    Pointers are returned as "ptr": their element type comes from the config. Raises ValueError naming
    the parameter when the rule does not cover it.
    """
    py = _python_function(fn)
    where = f"{py.__module__}.{py.__qualname__}"
    out = []
    for name, param in inspect.signature(py).parameters.items():
        ann = _annotation(param)
        upper = name.isupper()
        if ann == "constexpr":
            if not upper:
                raise ValueError(f"{where}: constexpr parameter {name!r} must be UPPER_CASE (naming rule)")
            out.append((name, "constexpr"))
            continue
        if upper:
            raise ValueError(f"{where}: parameter {name!r} is UPPER_CASE, which the naming rule reserves for "
                             f"tl.constexpr parameters; annotate it or give it a lower_case name")
        if name.endswith(POINTER_SUFFIX):
            if ann:
                raise ValueError(f"{where}: pointer parameter {name!r} must not be annotated ({ann!r}); its dtype "
                                 f"comes from the config")
            out.append((name, "ptr"))
        elif ann in _SCALAR_ANNOTATIONS:
            out.append((name, _SCALAR_ANNOTATIONS[ann]))
        elif not ann:
            out.append((name, "i32"))
        else:
            raise ValueError(f"{where}: parameter {name!r} has annotation {ann!r}, which the naming rule does not "
                             f"cover (tl.constexpr, tl.float32, tl.int64, tl.int32, or a *_ptr name)")
    return tuple(out)


def kernel_signature(fn, pointer_dtypes: Mapping[str, str]) -> dict[str, str]:
    """Argument -> Triton type ("*bf16", "i32", "fp32", "constexpr") in kernel order, by the naming rule."""
    params = kernel_parameters(fn)
    where = _python_function(fn).__qualname__
    pointers = [n for n, t in params if t == "ptr"]
    missing = [n for n in pointers if n not in pointer_dtypes]
    if missing:
        raise ValueError(f"{where}: pointer parameters without a dtype in the config: {missing}")
    extra = sorted(set(pointer_dtypes) - set(pointers))
    if extra:
        raise ValueError(f"{where}: the config gives dtypes for {extra}, which are not pointer parameters "
                         f"(*{POINTER_SUFFIX}) of the kernel")
    bad = {n: d for n, d in pointer_dtypes.items() if d not in POINTER_DTYPES}
    if bad:
        raise ValueError(f"{where}: pointer dtypes must be among {POINTER_DTYPES}, got {bad}")
    return {n: f"*{pointer_dtypes[n]}" if t == "ptr" else t for n, t in params}


@dataclasses.dataclass(frozen=True)
class AotConfig:
    kernel: str  # "package.module:attr" of the @triton.jit function
    name: str  # short kernel name for the report
    config: str  # human-readable config label, e.g. "D=128 BLOCK_H=4 w4"
    pointer_dtypes: Mapping[str, str]  # every *_ptr parameter -> element type ("bf16", "fp32", "u8", ...)
    constexprs: Mapping[str, Any]  # every tl.constexpr parameter -> value
    num_warps: int = 4
    num_stages: int = 2
    archs: tuple[int, ...] = (80, 89, 90)
    mma: str | None = None
    # Runtime parameters compiled as divisible by 16 (tt.divisibility), as name patterns ("*_ptr",
    # "stride_*", "K"): pointers the launcher keeps 16-byte aligned and integers that are multiples of 16
    # on the shapes the config serves. Triton's JIT applies the same specialization at run time when the
    # actual arguments qualify, so this makes the check see the binary that runs.
    divisible_by_16: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mma not in MMA_CLASSES:
            raise ValueError(f"AotConfig {self.name}: mma must be one of {MMA_CLASSES}, got {self.mma!r}")
        if self.mma == "fp8" and 80 in self.archs:
            raise ValueError(f"AotConfig {self.name}: fp8 tensor cores need sm_89+, drop 80 from archs")
        sig = self.signature  # applies the naming rule (raises on a parameter it does not cover)
        consts = [n for n, t in sig.items() if t == "constexpr"]
        missing = [n for n in consts if n not in self.constexprs]
        extra = sorted(set(self.constexprs) - set(consts))
        if missing or extra:
            raise ValueError(f"AotConfig {self.name}: constexpr values missing for {missing}, given for "
                             f"non-constexpr or unknown parameters {extra}")
        self.divisible_args  # noqa: B018 -- resolves the patterns (raises on one that matches nothing)

    @functools.cached_property
    def signature(self) -> dict[str, str]:
        """Argument -> Triton type in kernel order, derived from the kernel by the naming rule."""
        return kernel_signature(resolve_kernel(self), self.pointer_dtypes)

    @functools.cached_property
    def runtime_args(self) -> tuple[str, ...]:
        """The non-constexpr parameters, in kernel order: exactly the keys a launch must pass."""
        return tuple(n for n, t in self.signature.items() if t != "constexpr")

    @functools.cached_property
    def divisible_args(self) -> tuple[str, ...]:
        names = self.runtime_args
        for pat in self.divisible_by_16:
            if not fnmatch.filter(names, pat):
                raise ValueError(f"AotConfig {self.name}: divisible_by_16 pattern {pat!r} matches no runtime "
                                 f"parameter of the kernel")
        return tuple(n for n in names if any(fnmatch.fnmatchcase(n, p) for p in self.divisible_by_16))

    def attrs(self) -> dict:
        """ASTSource attrs for the divisibility hints, keyed by argument position."""
        names = list(self.signature)
        return {(names.index(k),): [["tt.divisibility", 16]] for k in self.divisible_args}

    @property
    def key(self) -> str:
        return f"{self.name}[{self.config}]"


_CONFIGS: dict[str, AotConfig] = {}


def register_aot(cfg: AotConfig) -> AotConfig:
    if cfg.key in _CONFIGS and _CONFIGS[cfg.key] != cfg:
        raise ValueError(f"AOT config {cfg.key} registered twice with different contents")
    _CONFIGS[cfg.key] = cfg
    return cfg


def registered_configs() -> list[AotConfig]:
    """Import every module in magi_kernels.kernels.triton (they register at import) and list configs."""
    import magi_kernels.kernels.triton as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name != "aot":
            importlib.import_module(f"{pkg.__name__}.{mod.name}")
    return sorted(_CONFIGS.values(), key=lambda c: c.key)


def resolve_kernel(cfg: AotConfig):
    mod, _, attr = cfg.kernel.partition(":")
    return getattr(importlib.import_module(mod), attr)


# --------------------------------------------------------------------------------------------------
# Launches


def _arg_kind_error(name: str, ty: str, value) -> str | None:
    if ty.startswith("*"):
        return None if isinstance(value, torch.Tensor) else f"{name} is a pointer ({ty}) but got {type(value).__name__}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name} must be a Python {'float' if ty == 'fp32' else 'int'}, got {type(value).__name__}"
    if ty == "fp32":
        return None
    return None if isinstance(value, int) else f"{name} is {ty} but got a float"


@dataclasses.dataclass(frozen=True)
class KernelLaunch:
    """One launch of a shipped config: the config, the grid, and every runtime argument by name.

    Built only through this constructor, which checks the argument names against the kernel's parameters
    (a missing, extra or misspelt name raises) and their kinds against the derived signature.
    """

    config: AotConfig
    grid: tuple[int, ...]
    args: Mapping[str, Any]

    def __post_init__(self) -> None:
        want = self.config.runtime_args
        missing = [n for n in want if n not in self.args]
        extra = sorted(set(self.args) - set(want))
        if missing or extra:
            raise TypeError(f"launch of {self.config.key}: missing arguments {missing}, unknown arguments {extra} "
                            f"(the kernel takes {list(want)})")
        sig = self.config.signature
        errors = [e for n in want if (e := _arg_kind_error(n, sig[n], self.args[n])) is not None]
        if errors:
            raise TypeError(f"launch of {self.config.key}: " + "; ".join(errors))

    def run(self) -> None:
        """Launch (a grid with a zero extent launches nothing)."""
        if any(g == 0 for g in self.grid):
            return
        cfg = self.config
        resolve_kernel(cfg)[self.grid](**self.args, **cfg.constexprs, num_warps=cfg.num_warps,
                                       num_stages=cfg.num_stages)
