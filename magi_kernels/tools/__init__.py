"""Developer tools run as modules, e.g. ``python -m magi_kernels.tools.aot_check``."""
