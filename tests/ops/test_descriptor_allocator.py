"""The scratch allocator that device-side tensor descriptors need: installed when missing, never replacing the caller's."""

import pytest

triton = pytest.importorskip("triton")
_allocation = pytest.importorskip("triton.runtime._allocation")

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
