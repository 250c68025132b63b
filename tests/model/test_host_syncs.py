"""Host reads per attention call in magi_model's steady state: there must be none.

On a GPU a host read of a device tensor (``.item()``, ``.tolist()``, ``.numpy()``, ``.cpu()``, ``bool(t)``,
a device-to-host copy) is a stream sync. This box has no GPU, so every tensor is a host tensor and nothing
syncs; instead the test counts every host read of *any* tensor on flex_attn's path, which is stricter: a
steady-state call must not read tensor values at all. Counted by two hooks that see different things:

* a ``TorchDispatchMode`` records ``aten._local_scalar_dense`` (``.item()``, ``bool``, ``int``, ``float``)
  and copies whose source and destination devices differ;
* patched ``Tensor.numpy`` / ``tolist`` / ``item`` / ``cpu`` (``numpy`` and ``tolist`` never reach the
  dispatcher).

Reads of the planner's own host tensors (``AttnPlan.tensors``: CPU by construction, built from numpy on
every device) are not counted: they never touch a device.

Steady state = the second forward with the same window layout (the first builds the host ranges, checks
them and plans). Each test also shows the hooks can fail: fresh range tensors are read once.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import magi_model.attention as model_attention
import magi_model.dit as dit_module
from magi_kernels.ops.flex_attn import checked_ranges, flex_attn_func
from magi_kernels.plan import planner
from magi_model import KVCache, build_dit

from .test_forward import inputs, tiny

HOST_READ_METHODS = ("numpy", "tolist", "item", "cpu")


def _plan_host_storages() -> set[int]:
    """Storages of the cached plans' host tensors (planner output, never on a device)."""
    return {t.untyped_storage().data_ptr() for plan in list(planner._CACHE.values()) for t in plan.tensors.values()}


def _is_plan_host_tensor(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "cpu" and \
        t.untyped_storage().data_ptr() in _plan_host_storages()


class _HostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.active = False
        self.events: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.active:
            if func is torch.ops.aten._local_scalar_dense.default and not _is_plan_host_tensor(args[0]):
                self.events.append("aten._local_scalar_dense")
            elif func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
                src = args[1] if func is torch.ops.aten.copy_.default else args[0]
                dst = out
                if isinstance(src, torch.Tensor) and src.device != dst.device:
                    self.events.append(f"{func}: {src.device} -> {dst.device}")
        return out


@contextlib.contextmanager
def count_host_reads(monkeypatch):
    """Yield a recorder; ``recorder.active`` scopes what counts (set it around the calls under test)."""
    rec = _HostReads()
    for name in HOST_READ_METHODS:
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *a, _orig=orig, _name=name, **k):
            if rec.active and not _is_plan_host_tensor(self):
                rec.events.append(f"Tensor.{_name} of shape {list(self.shape)}")
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    with rec:
        yield rec


def _scope_attention_calls(monkeypatch, rec) -> list:
    """Count only inside the flex_attn calls the DiT makes; return the list of calls made."""
    calls = []

    def scoped(*a, _orig=model_attention.flex_attn_func, **k):
        calls.append(1)
        rec.active = True
        try:
            return _orig(*a, **k)
        finally:
            rec.active = False

    monkeypatch.setattr(model_attention, "flex_attn_func", scoped)
    return calls


@pytest.fixture(autouse=True)
def _cold_range_caches():
    """Start every test with cold caches: the DiT's host ranges and flex_attn's checked ranges are
    process-wide, so another test in the same worker with the same window layout would otherwise have
    done this test's "first forward" already."""
    dit_module._host_ranges.cache_clear()
    checked_ranges.clear()
    yield


def test_steady_state_chunk_forward_reads_nothing_on_the_host(monkeypatch):
    model = build_dit(tiny(layers=2), seed=11)
    x, t, cap, mask = inputs(1, 2, seed=12)
    n = 6 * 4 * 4
    cache = KVCache.for_model(model, 4 * n)
    model(x, t, cap, mask, kv_cache=cache, update_kv_cache=True, key_windows=[1, 2])  # fills chunks 0-1
    kw = dict(kv_cache=cache, slice_point=2, key_windows=[3, 2])
    with count_host_reads(monkeypatch) as rec:
        calls = _scope_attention_calls(monkeypatch, rec)
        model(x, t, cap, mask, **kw)  # first forward of this window: ranges built, checked and planned
        first = list(rec.events)
        rec.events.clear()
        n_first = len(calls)
        calls.clear()
        steady = model(x, t * 0.5, cap, mask, **kw)  # next denoising step, same window
    assert len(calls) == n_first == 2 * 2  # self + cross attention per layer
    assert first, "the hooks must see the first forward's range checks (else they prove nothing)"
    assert rec.events == [], f"host reads in steady-state attention calls: {rec.events}"
    assert torch.isfinite(steady).all()


def test_backward_reuses_the_forwards_checked_ranges(monkeypatch):
    g = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(37, 4, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    qr = torch.tensor([[0, 20], [20, 37]], dtype=torch.int32)
    kr = torch.tensor([[0, 20], [0, 37]], dtype=torch.int32)
    types = torch.tensor([1, 0], dtype=torch.int32)
    with count_host_reads(monkeypatch) as rec:
        rec.active = True
        out, _ = flex_attn_func(q, k, v, qr, kr, types, backend="torch")
        assert rec.events, "a first call with new range tensors reads them once"
        rec.events.clear()
        out, _ = flex_attn_func(q, k, v, qr, kr, types, backend="torch")
        out.backward(torch.randn(out.shape, generator=g, dtype=out.dtype))
        assert rec.events == [], f"host reads in a repeated forward + backward: {rec.events}"
        # An in-place edit of a range tensor must be seen (the cache keys on identity and version).
        kr[1, 1] = 38
        with pytest.raises(ValueError, match="k_ranges"):
            flex_attn_func(q, k, v, qr, kr, types, backend="torch")
    assert q.grad is not None and torch.isfinite(q.grad).all()
