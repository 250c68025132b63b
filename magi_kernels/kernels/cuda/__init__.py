"""Python wrappers over the CUDA launchers in ``magi_kernels._C``.

Each module exposes ``supports(args) -> reason | None`` (``args``: the op's validated argument dataclass)
and ``launch(args, *outs)``. On CUDA tensors ``launch`` calls ``_C.cuda.<kernel>`` on the current stream;
on CPU tensors it calls ``_C.simt.<kernel>``, the same kernel source compiled for the host and run by the
SIMT emulator (tests only). ``device_reason`` below holds the device rules every CUDA kernel shares.
"""

from __future__ import annotations

import torch

from magi_kernels.utils import device as _device

# Input/output dtype codes the kernels take (csrc/kernels/fused_norm_params.h, DTypeCode).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# Rows the block-per-row kernels hold in registers (1024 threads x 16 values): qk_norm_rope's hidden
# scope and gated_post_norm_residual.
MAX_HIDDEN_ROW = 16384


def device_reason(device: torch.device) -> str | None:
    """None if ``_C``'s CUDA kernels (or, for CPU tensors, the SIMT emulator) can run on ``device``."""
    from magi_kernels._ext import build_info, cuda_archs, kernel_image_for, ptx_archs

    bi = build_info()
    if device.type == "cpu":
        return None if bi["simt"] else "the SIMT emulator needs magi_kernels._C, which is not built"
    if device.type != "cuda":
        return f"CUDA kernels run on CUDA devices, not {device.type}"
    if not bi["cuda"]:
        return "magi_kernels._C was built without nvcc, so it has no CUDA kernels"
    cap = _device.capability(device)
    cc = cap[0] * 10 + cap[1]
    # SASS of the same major and an older-or-equal minor, or portable PTX the driver can JIT (_ext explains)
    if kernel_image_for(cc) is None:
        return (f"_C has SASS for sm {cuda_archs()} and PTX for compute {ptx_archs()}, none of which runs on "
                f"sm_{cc}; rebuild with MAGI_CUDA_ARCHS")
    return None
