"""Run a callback when a module is imported (or now, if it already is), without importing it ourselves.

Used to register our FLOP formulas with ``torch.utils.flop_counter`` only once a user imports it: that
module imports Triton at import time, and ``import magi_kernels`` must not (Triton is loaded only when
the Triton backend is selected).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import threading
from typing import Callable

_PENDING: dict[str, list[Callable[[], None]]] = {}
_LOCK = threading.Lock()


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself; for a watched name it wraps the real loader so callbacks run after it."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _PENDING:
            return None
        for finder in sys.meta_path:  # the real spec, from the finders after us
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_then_notify(module, _exec=exec_module, _name=fullname):
            _exec(module)
            _run(_name)

        spec.loader.exec_module = exec_then_notify
        return spec


_FINDER = _PostImportFinder()


def _run(name: str) -> None:
    with _LOCK:
        callbacks = _PENDING.pop(name, [])
    for cb in callbacks:
        cb()


def when_imported(name: str, callback: Callable[[], None]) -> None:
    """Call ``callback()`` right after ``name`` is first imported, or immediately if it already is."""
    if name in sys.modules:
        callback()
        return
    with _LOCK:
        _PENDING.setdefault(name, []).append(callback)
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
