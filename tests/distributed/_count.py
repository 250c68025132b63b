"""Count torch.distributed calls made inside a block (the library looks them up on the module at call time)."""

from __future__ import annotations

import collections
import contextlib

import torch.distributed as dist

COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_gather_object", "all_reduce", "all_to_all_single",
               "broadcast", "broadcast_object_list", "batch_isend_irecv", "send", "recv")
# isend / irecv are not wrapped: P2POp accepts only the original functions (batch_isend_irecv is counted)


@contextlib.contextmanager
def count_collectives():
    """Yields a Counter {function name: calls} filled while the block runs."""
    counts = collections.Counter()
    saved = {name: getattr(dist, name) for name in COLLECTIVES}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name, fn in saved.items():
        setattr(dist, name, counting(name, fn))
    try:
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
