"""One rank's failure ends the whole job instead of leaving the others blocked in a collective.

:func:`run_guarded` runs the rank's work; on an exception it prints the original traceback (with
the rank) and leaves with ``os._exit(1)`` without waiting on the process group. Its sockets close,
so peers blocked in a gloo collective fail at once with a connection error and exit the same way;
NCCL peers fail when the process-group timeout (``engine_config.distributed_timeout_minutes``)
expires. torchrun additionally stops the remaining workers when one exits non-zero.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

import torch.distributed as dist


def run_guarded(fn: Callable[[], object], *, exit_code: int = 1):
    """``fn()``; on any exception: report it with this rank's id and exit the process immediately."""
    try:
        return fn()
    except SystemExit:
        raise
    except BaseException:  # noqa: BLE001 - every failure must end this rank
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))
        sys.stderr.write(f"[rank {rank}] failed:\n{traceback.format_exc()}")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(exit_code)
