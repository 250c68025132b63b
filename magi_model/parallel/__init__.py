"""MAGI-1 across GPUs: context parallel (cp_ulysses / cp_shuffle_overlap) x pipeline parallel.

See docs/distributed.md. Entry points: :func:`init_parallel` (torchrun environment -> layout and
process groups), :func:`build_stage_dit` + :class:`ParallelDiT` (a VideoDiT.forward-compatible model
for the chunk sampler), :func:`check_same_on_all_ranks` (start-up consistency check).
"""

from magi_model.parallel.layout import (
                                        GPU_LAUNCH_ENV,
                                        ParallelConfigError,
                                        ParallelLayout,
                                        check_layout,
                                        check_same_on_all_ranks,
                                        fingerprint,
                                        init_parallel,
                                        make_layout,
                                        stage_layers,
)
from magi_model.parallel.model import (
                                        ParallelDiT,
                                        build_stage_dit,
                                        materialized_parameters,
                                        owns_key,
)

__all__ = [
                                        "GPU_LAUNCH_ENV",
                                        "ParallelConfigError",
                                        "ParallelDiT",
                                        "ParallelLayout",
                                        "build_stage_dit",
                                        "check_layout",
                                        "check_same_on_all_ranks",
                                        "fingerprint",
                                        "init_parallel",
                                        "make_layout",
                                        "materialized_parameters",
                                        "owns_key",
                                        "stage_layers",
]
