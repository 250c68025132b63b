"""Test-suite setup: Triton kernels run under the interpreter (numpy) so they execute on this CPU.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, i.e. before magi_kernels is
imported, hence here at the top of conftest. The AOT static check needs real (non-interpreted)
JIT functions, so tests run it in a subprocess with the variable removed.
"""

import os
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs per test (vary across runs with MAGI_TEST_SEED), reproducible from the test id.
    seed = zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("MAGI_TEST_SEED", "0"))
    torch.manual_seed(seed)
    yield


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor like t filled with NaN (float) so a kernel that skips a write is caught."""
    out = torch.empty_like(t)
    out.fill_(float("nan") if t.is_floating_point() else -1)
    return out
