"""The scratch allocator that device-side tensor descriptors need: installed when missing, never replacing the caller's."""

import pytest

triton = pytest.importorskip("triton")  # a dependency only on Linux x86-64

# Private Triton API the allocator check reads. Imported plainly: if a Triton upgrade moves it, these tests fail
# (the check would silently fall back to installing ours once per process, which can replace a caller's allocator).
from triton.runtime import _allocation  # noqa: E402

from magi_kernels.kernels.triton import _io  # noqa: E402


@pytest.fixture
def restore_allocator():
    saved = _allocation._allocator.get()
    yield
    triton.set_allocator(saved)


def test_installs_ours_when_none_is_set(restore_allocator):
    triton.set_allocator(_allocation.NullAllocator())
    _io.ensure_descriptor_allocator()
    assert _allocation._allocator.get() is _io._descriptor_scratch


def test_keeps_the_callers_allocator(restore_allocator):
    def callers(size, alignment, stream):
        raise AssertionError("not called here")

    triton.set_allocator(callers)
    _io.ensure_descriptor_allocator()
    assert _allocation._allocator.get() is callers


def test_falls_back_to_installing_once_without_the_private_api(restore_allocator, monkeypatch):
    """Where triton.runtime._allocation is gone: ours is installed on the first call, and never again."""
    import sys

    installed = []
    monkeypatch.setitem(sys.modules, "triton.runtime._allocation", None)  # makes the import raise ImportError
    monkeypatch.setattr(_io, "_installed_allocator", False)
    monkeypatch.setattr(_io.triton, "set_allocator", installed.append)
    _io.ensure_descriptor_allocator()
    _io.ensure_descriptor_allocator()
    assert installed == [_io._descriptor_scratch]
