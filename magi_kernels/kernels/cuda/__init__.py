"""Python wrappers over the CUDA launchers in ``magi_kernels._C``.

Each module exposes ``supports(info) -> reason | None`` and ``launch(args, *outs)``. On CUDA tensors
``launch`` calls ``_C.cuda.<kernel>`` on the current stream; on CPU tensors it calls ``_C.simt.<kernel>``,
the same kernel source compiled for the host and run by the SIMT emulator (tests only).
"""
