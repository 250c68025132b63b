"""Helpers shared by the Triton kernels: dtype-erased loads/stores, launch-argument checks, and the
scratch allocator that device-side tensor descriptors need.

The fused norm kernels take every tensor as a uint8 pointer plus a runtime dtype code (0 fp32,
1 fp16, 2 bf16) and reinterpret it in the kernel. That keeps the compiled-config set to tile shapes
only (the AOT check compiles every shipped config for three architectures), at the cost of one
uniform branch per load, which the compiler hoists.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


# Runtime dtype codes understood by load_f32 / store_f32.
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
INT32_MAX = 2**31 - 1


def row_warps(tile_elems: int) -> int:
    """Warps for a row-statistics kernel: keep <= 16 fp32 values of the row per thread in registers."""
    if tile_elems <= 2048:
        return 4
    if tile_elems <= 4096:
        return 8
    return 16


@triton.jit
def load_f32(base, offs, mask, kind):
    """Load base[offs] (a uint8 pointer reinterpreted as fp32/fp16/bf16 per `kind`) as fp32; 0 where masked.

    Upcasting right at the load also keeps the Triton interpreter exact: it cannot do bf16 arithmetic.
    """
    if kind == 0:
        v = tl.load(base.to(tl.pointer_type(tl.float32), bitcast=True) + offs, mask=mask, other=0.0)
    elif kind == 1:
        v = tl.load(base.to(tl.pointer_type(tl.float16), bitcast=True) + offs, mask=mask, other=0.0)
        v = v.to(tl.float32)
    else:
        v = tl.load(base.to(tl.pointer_type(tl.bfloat16), bitcast=True) + offs, mask=mask, other=0.0)
        v = v.to(tl.float32)
    return v


@triton.jit
def store_f32(base, offs, val, mask, kind):
    """Round the fp32 `val` to the dtype coded by `kind` (round-to-nearest-even) and store it."""
    if kind == 0:
        tl.store(base.to(tl.pointer_type(tl.float32), bitcast=True) + offs, val, mask=mask)
    elif kind == 1:
        tl.store(base.to(tl.pointer_type(tl.float16), bitcast=True) + offs, val.to(tl.float16), mask=mask)
    else:
        tl.store(base.to(tl.pointer_type(tl.bfloat16), bitcast=True) + offs, val.to(tl.bfloat16), mask=mask)


@triton.jit
def round_to_bf16_grid(x):
    """fp32 -> the nearest-even bf16 value, kept in fp32; NaN stays NaN.

    A later ``.to(bf16)`` is then exact on every backend (the interpreter's own fp32 -> bf16 cast truncates).
    """
    bits = x.to(tl.int32, bitcast=True)
    r = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return tl.where(x != x, x, r.to(tl.float32, bitcast=True))


@functools.lru_cache(maxsize=None)
def dummy(device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A valid pointer for absent optional tensors; the kernel never dereferences it (masked loads)."""
    return torch.zeros(1, dtype=dtype, device=device)


def erase(t: torch.Tensor) -> torch.Tensor:
    """The same bytes as uint8, so the kernel's pointer type does not depend on the tensor dtype."""
    return t.view(torch.uint8)


def check_i32(op: str, **vals: int) -> None:
    for name, v in vals.items():
        if not -INT32_MAX - 1 <= v <= INT32_MAX:
            raise ValueError(f"{op}: {name} = {v} does not fit in int32, which the Triton kernel's shipped "
                             f"signature uses")


def _descriptor_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory for the tensor descriptors a kernel builds on the device (128 B per descriptor)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


_installed_allocator = False


def ensure_descriptor_allocator() -> None:
    """Install a scratch allocator for ``tl.make_tensor_descriptor`` unless the caller already set one.

    Triton keeps the allocator in a context variable and offers no public getter; when its private
    home moves, we fall back to installing ours once per process.
    """
    global _installed_allocator
    try:
        from triton.runtime._allocation import NullAllocator, _allocator
    except ImportError:
        if not _installed_allocator:
            triton.set_allocator(_descriptor_scratch)
            _installed_allocator = True
        return
    if isinstance(_allocator.get(), NullAllocator):
        triton.set_allocator(_descriptor_scratch)
