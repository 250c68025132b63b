"""Optimized plain-PyTorch implementations behind the registry's ``torch`` backend (any device).

They compute exactly what ``magi_kernels.reference`` defines, but organized for speed and bounded memory
(e.g. flex attention walks the block-sparse tile plan instead of materializing a dense mask).
"""
