"""Backends that call a vendor library through torch (no kernel code of ours)."""
