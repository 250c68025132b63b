"""Pieces every op file shares: backend dispatch and backward-through-the-reference."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from magi_kernels import registry


def dispatch(op: str, args, requested: str | None, outs: Sequence[torch.Tensor]) -> str:
    """Run the selected implementation of ``op`` on its kernel-ready ``args``; it writes into ``outs``.
    Returns the backend used."""
    impl = registry.select(op, args, requested)
    impl.fn(args, *outs)
    return impl.backend


def reference_vjp(ref_fn: Callable[..., torch.Tensor | tuple], inputs: Sequence[torch.Tensor | None],
                  grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Gradients of ``ref_fn(*inputs)`` w.r.t. its tensor inputs, by autograd through the reference.

    The fused norm ops are inference kernels; their backward recomputes the fp32 reference and
    differentiates it, so there is no second hand-written copy of the math.
    """
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
        outs = ref_fn(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
        wrt = [t for t in leaves if t is not None and t.requires_grad]
        got = torch.autograd.grad([o for o, _ in pairs], wrt, [g.to(o.dtype) for o, g in pairs], allow_unused=True)
    it = iter(got)
    return [None if (t is None or not t.requires_grad) else next(it) for t in leaves]
