"""Check a requested torch device up front, so a typo or a missing GPU is one clear error before any
model is built or any weight is read (rather than an AssertionError deep inside ``.to(...)``)."""

from __future__ import annotations

import torch


class DeviceError(ValueError):
    """A device that cannot be used here; the message names the argument and the reason."""


def _available_cuda() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(device: "str | torch.device | None", *, argument: str = "device",
                   allow_meta: bool = False) -> torch.device:
    """``device`` as a :class:`torch.device` that exists on this machine.

    ``None`` means "cuda if available, else cpu". ``cpu`` always exists; ``cuda`` / ``cuda:N`` need a
    CUDA build of torch and a visible GPU N; ``mps`` needs Apple's backend; ``meta`` (no memory) only
    where ``allow_meta``. Anything else raises :class:`DeviceError` naming ``argument``.
    """
    if device is None:
        return torch.device("cuda" if _available_cuda() else "cpu")
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise DeviceError(f"{argument}: {device!r} is not a torch device (use cpu, cuda or cuda:N)") from None
    else:
        raise DeviceError(f"{argument}: must be a device name such as 'cpu' or 'cuda:0', got {type(device).__name__}")
    if dev.type == "cpu":
        return dev
    if dev.type == "meta":
        if allow_meta:
            return dev
        raise DeviceError(f"{argument}: 'meta' holds no data; use cpu or cuda")
    if dev.type == "cuda":
        n = _available_cuda()
        if n == 0:
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA GPU is visible (driver missing or CUDA_VISIBLE_DEVICES empty)")
            raise DeviceError(f"{argument}: {str(device)!r} requested but {why}; use --device cpu / device='cpu'")
        if dev.index is not None and dev.index >= n:
            raise DeviceError(f"{argument}: {str(device)!r} requested but only {n} CUDA device(s) are visible "
                              f"(cuda:0 .. cuda:{n - 1})")
        return dev
    if dev.type == "mps":
        if torch.backends.mps.is_available():
            return dev
        raise DeviceError(f"{argument}: 'mps' requested but Apple's MPS backend is not available here")
    raise DeviceError(f"{argument}: device type {dev.type!r} is not supported by magi_model (use cpu or cuda)")


__all__ = ["DeviceError", "resolve_device"]
