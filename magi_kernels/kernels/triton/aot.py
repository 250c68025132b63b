"""Registry of shipped Triton kernel configurations for the ahead-of-time (AOT) static check.

Every Triton kernel module registers each config it can launch with :func:`register_aot` at import.
``python -m magi_kernels.tools.aot_check`` compiles every (kernel, config, arch) with
``triton.compile(..., target=GPUTarget("cuda", arch, 32))`` on this machine (no GPU needed), reads
the cubin with the ``cuobjdump`` / ``nvdisasm`` that ship in the Triton wheel, and checks: it compiles,
no register spills (no STL/LDL, no stack), shared memory fits the arch, and the tensor-core instruction
class matches ``mma`` (HGMMA/QGMMA on sm_90, HMMA/QMMA on sm_89 and sm_80).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any

# mma classes: None = the kernel has no tl.dot; "f16" = fp16/bf16 operands; "fp8" = e4m3/e5m2 operands.
MMA_CLASSES = (None, "f16", "fp8")


@dataclasses.dataclass(frozen=True)
class AotConfig:
    kernel: str  # "package.module:attr" of the @triton.jit function; resolved lazily
    name: str  # short kernel name for the report
    config: str  # human-readable config label, e.g. "D=128 BLOCK_H=4 w4"
    signature: dict[str, str]  # arg -> Triton type: "*bf16", "*fp32", "*fp8e4nv", "i32", "fp32", "constexpr"
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2
    archs: tuple[int, ...] = (80, 89, 90)
    mma: str | None = None
    # Arguments compiled as divisible by 16 (tt.divisibility): pointers the launcher guarantees 16-byte
    # aligned and ints it guarantees multiples of 16. Triton's JIT applies the same specialization at
    # run time when the actual arguments qualify, so this makes the check see the binary that runs.
    divisible_by_16: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mma not in MMA_CLASSES:
            raise ValueError(f"AotConfig {self.name}: mma must be one of {MMA_CLASSES}, got {self.mma!r}")
        if self.mma == "fp8" and 80 in self.archs:
            raise ValueError(f"AotConfig {self.name}: fp8 tensor cores need sm_89+, drop 80 from archs")
        unknown = [k for k in self.divisible_by_16 if self.signature.get(k, "constexpr") == "constexpr"]
        if unknown:
            raise ValueError(f"AotConfig {self.name}: divisible_by_16 names non-runtime args {unknown}")
        missing = [k for k, v in self.signature.items() if v == "constexpr" and k not in self.constexprs]
        if missing:
            raise ValueError(f"AotConfig {self.name}: constexpr args without values: {missing}")

    def attrs(self) -> dict:
        """ASTSource attrs for the divisibility hints, keyed by argument position."""
        names = list(self.signature)
        return {(names.index(k),): [["tt.divisibility", 16]] for k in self.divisible_by_16}

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
