"""Device facts the backends' rules read (one place, so tests can pretend to have a given GPU)."""

from __future__ import annotations

import torch


def capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) compute capability of a CUDA device; None for any other device."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)
