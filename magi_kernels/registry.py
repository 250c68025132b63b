"""The one place that decides which implementation of an op runs.

Backends, in the order auto-selection tries them on a CUDA device (each op may narrow the list):

- ``cuda``   hand-written CUDA kernels in ``magi_kernels._C`` (only where CUDA earns its place);
- ``triton`` Triton kernels;
- ``scaled_mm`` a vendor GEMM through ``torch._scaled_mm`` (cuBLASLt on GPUs, oneDNN on CPUs), for the
  fp8 GEMM layouts it supports;
- ``torch``  plain PyTorch, any device, CPU included: the op's definition in ``magi_kernels.reference``
  (or, for flex attention, the tile walk in ``magi_kernels.kernels.torch`` that computes the same).

Selection, per call: an explicit ``backend=`` argument wins, then the environment variable
``MAGI_KERNELS_BACKEND`` (``torch`` for every op, or ``op=backend,op=backend``), then auto-selection:
the first backend in the op's preference list that accepts the call: first its family's device rules
(``device_reason`` next to its kernels), then its ``supports(args)`` on the op's typed arguments.
An explicit request (argument or environment) that cannot run raises with the reason; it never
silently falls back to another backend.

On CPU tensors auto-selection always picks ``torch``. The other two can still be requested
explicitly for testing: ``triton`` runs under the Triton interpreter (``TRITON_INTERPRET=1`` must be
set before ``magi_kernels`` is imported), and ``cuda`` runs the CUDA kernel source under the SIMT
emulator compiled into ``_C.simt``; both are slow and exist to make device code testable on a CPU.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any, Callable

import torch

BACKENDS = ("cuda", "triton", "scaled_mm", "torch")
ENV_VAR = "MAGI_KERNELS_BACKEND"


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run this call (the message says why)."""


# A supports-check receives the op's validated, typed arguments (the ``*Args`` dataclass of its ops/
# file, which has a ``device``) and returns None when the backend can run the call, else a short reason.
SupportsFn = Callable[[Any], "str | None"]

# Where each backend family keeps its device rules (``device_reason(device) -> reason | None``), next to
# its kernels; imported only when that backend is considered, so the torch path never imports Triton.
_DEVICE_RULES = {
    "cuda": "magi_kernels.kernels.cuda",
    "triton": "magi_kernels.kernels.triton",
    "scaled_mm": "magi_kernels.kernels.vendor.scaled_mm",
}


@dataclasses.dataclass
class Impl:
    op: str
    backend: str
    fn: Callable
    supports: SupportsFn


_OPS: dict[str, dict[str, Impl]] = {}
_PREFERENCE: dict[str, tuple[str, ...]] = {}


def register_op(op: str, preference: tuple[str, ...] = BACKENDS) -> None:
    """Declare an op and the order auto-selection tries its backends on CUDA devices."""
    bad = [b for b in preference if b not in BACKENDS]
    if bad:
        raise ValueError(f"register_op({op!r}): unknown backends {bad}; known: {BACKENDS}")
    _OPS.setdefault(op, {})
    _PREFERENCE[op] = tuple(preference)


def register_impl(op: str, backend: str, supports: SupportsFn | None = None):
    """Decorator: register ``fn`` as ``op``'s implementation on ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"register_impl({op!r}): unknown backend {backend!r}; known: {BACKENDS}")

    def deco(fn: Callable) -> Callable:
        if op not in _OPS:
            register_op(op)
        _OPS[op][backend] = Impl(op, backend, fn, supports or (lambda args: None))
        return fn

    return deco


def register_module_impl(op: str, backend: str, module: str, launch: str = "launch",
                         supports: str = "supports") -> None:
    """Register ``module.launch`` as ``op``'s ``backend`` implementation, checked by ``module.supports``.

    The module is imported on first use, so importing magi_kernels never imports Triton or loads _C.
    """

    def _mod():
        return importlib.import_module(module)

    def _supports(args) -> str | None:
        return getattr(_mod(), supports)(args)

    def _launch(*args) -> None:
        getattr(_mod(), launch)(*args)

    _launch.__qualname__ = f"{module}.{launch}"
    register_impl(op, backend, supports=_supports)(_launch)


def ops() -> list[str]:
    return sorted(_OPS)


def implementations(op: str) -> dict[str, Impl]:
    _load_impls()
    if op not in _OPS:
        raise KeyError(f"unknown op {op!r}; registered ops: {ops()}")
    return dict(_OPS[op])


def _env_request(op: str) -> str | None:
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        return None
    if "=" not in raw:
        req = raw
    else:
        req = None
        for part in raw.split(","):
            name, _, b = part.partition("=")
            if name.strip() == op:
                req = b.strip()
        if req is None:
            return None
    if req not in BACKENDS and req != "auto":
        raise ValueError(f"{ENV_VAR}={raw!r}: backend {req!r} is not one of {BACKENDS} or 'auto'")
    return None if req == "auto" else req


def device_reason(backend: str, device: torch.device) -> str | None:
    """None if ``backend``'s kernels can run on ``device`` at all, else why not (op rules come on top)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    rule = _DEVICE_RULES.get(backend)
    return None if rule is None else importlib.import_module(rule).device_reason(torch.device(device))


def why_not(op: str, backend: str, args) -> str | None:
    """None if ``backend`` can run this call of ``op``, else the reason it cannot.

    ``args`` is the op's validated argument dataclass (e.g. ``magi_kernels.ops.qk_norm_rope.make_args(...)``).
    """
    impls = implementations(op)
    if backend not in impls:
        return f"op {op!r} has no {backend!r} implementation (it has {sorted(impls)})"
    reason = device_reason(backend, args.device)
    if reason is None:
        reason = impls[backend].supports(args)
    return reason


def select(op: str, args, requested: str | None = None) -> Impl:
    """Pick the implementation of ``op`` for this call (see module docstring for the rules)."""
    impls = implementations(op)
    source = "backend"
    if requested is None:
        requested, source = _env_request(op), f"{ENV_VAR}"
    if requested is not None and requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"backend={requested!r} is not one of {BACKENDS} (or None/'auto')")
        reason = why_not(op, requested, args)
        if reason is not None:
            raise BackendUnavailable(f"{op}: {source}={requested!r} cannot run this call: {reason}")
        return impls[requested]
    if args.device.type != "cuda":
        return impls["torch"]
    reasons = []
    for b in _PREFERENCE[op]:
        reason = why_not(op, b, args)
        if reason is None:
            return impls[b]
        reasons.append(f"{b}: {reason}")
    raise BackendUnavailable(f"{op}: no backend can run this call ({'; '.join(reasons)})")


_LOADED = False


def _load_impls() -> None:
    """Import every module that registers implementations (idempotent)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import magi_kernels.ops  # noqa: F401  (registers everything)
