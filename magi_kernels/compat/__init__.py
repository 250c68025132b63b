"""Drop-in replacements for other libraries' call forms, backed by magi_kernels ops."""
