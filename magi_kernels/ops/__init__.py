"""Ops: validated public functions, registered as torch custom ops, dispatched through the registry."""

from .gated_post_norm_residual import gated_post_norm_residual
from .qk_norm_rope import qk_norm_rope

__all__ = ["qk_norm_rope", "gated_post_norm_residual"]
