"""Kernel launchers: ``triton/`` (Triton JIT kernels) and ``cuda/`` (wrappers over magi_kernels._C)."""
