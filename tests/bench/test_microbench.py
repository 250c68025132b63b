"""CPU-measurable microbenchmarks as pytest-benchmark tests: the planner, the CPU attention path and
fp8 quantization. Each one also checks its result (against float64 math where there is math), so
the README's test command, which runs them once with timing disabled (``--benchmark-disable``),
keeps them correct. Time them with ``python -m pytest tests/bench --benchmark-enable``."""

from __future__ import annotations

import json
import math

import pytest
import torch

from magi_kernels.ops.flex_attn import flex_attn_func
from magi_kernels.ops.fp8_quantize import fp8_quantize
from magi_kernels.ranges import Magi1WindowMask
from magi_model.plan import plan

pytest.importorskip("pytest_benchmark")


def test_planner_layout_search(benchmark):
    p = benchmark(lambda: plan("24B_distill_quant", "8x4090", window=4, kv_offload=False))
    assert p.best is not None and p.best.layout.cp * p.best.layout.pp <= 8
    assert p.best.predicted_s > p.best.floor_s > 0


def _dense_ref(q, k, v, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over the visible cells, in float64, GQA by head mapping."""
    q64, k64, v64 = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k64, v64 = k64.repeat_interleave(g, dim=1), v64.repeat_interleave(g, dim=1)
    s = torch.einsum("qhd,khd->hqk", q64, k64) / math.sqrt(q.shape[2])
    s = s.masked_fill(~mask[None], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", p, v64)


def test_flex_attn_cpu_magi1_window(benchmark):
    # A MAGI-1 forward in miniature: 3 chunks of 67 tokens after 2 cached chunks, windows 4/3/2, GQA 4:2.
    n, hq, hk, d = 67, 4, 2, 64
    mask = Magi1WindowMask(n, (4, 3, 2), slice_point=2)
    qr, kr, ty = mask.to_ranges()
    g = torch.Generator().manual_seed(1)
    q = torch.randn(mask.total_q, hq, d, generator=g)
    k = torch.randn(mask.total_k, hk, d, generator=g)
    v = torch.randn(mask.total_k, hk, d, generator=g)
    out, lse = benchmark(lambda: flex_attn_func(q, k, v, qr, kr, ty, backend="torch"))
    dense = torch.zeros(mask.total_q, mask.total_k, dtype=torch.bool)
    for qs, qe, ks, ke, _ in mask.slices():
        dense[qs:qe, ks:ke] = True
    torch.testing.assert_close(out.double(), _dense_ref(q, k, v, dense), atol=2e-5, rtol=2e-5)
    assert torch.isfinite(lse).all()


def test_fp8_quantize_per_token(benchmark):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(257, 384, generator=g) * torch.logspace(-3, 2, 257)[:, None]).to(torch.bfloat16)
    q, scale = benchmark(lambda: fp8_quantize(x, "row", backend="torch"))
    amax = x.double().abs().amax(dim=1)
    torch.testing.assert_close(scale.reshape(-1).double(), amax / 448.0, rtol=1e-6, atol=0)
    want = (x.double() / scale.reshape(-1, 1).double()).clamp(-448, 448).to(torch.float8_e4m3fn)
    # fp32 division vs float64 division may differ by one e4m3 step on exact rounding ties only.
    diff = (q.double() - want.double()).abs() / want.double().abs().clamp(min=2 ** -6)
    assert (diff <= 0.125).all() and (q.double() == want.double()).float().mean() > 0.999


def test_bench_e2e_tiny_runs_and_matches_planner_counts(tmp_path, benchmark):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import bench_e2e

    out = tmp_path / "e2e.json"
    # Memory profiling of each forward is left out to keep this fast (tests/model/test_plan.py checks it).
    args = ["--preset", "tiny_distill", "--height", "32", "--width", "32", "--steps", "4", "--no_vae",
            "--no_memory_profile", "--json", str(out)]
    rc = benchmark.pedantic(lambda: bench_e2e.main(args), rounds=1, iterations=1)
    assert rc == 0
    d = json.loads(out.read_text())
    meas, pred = d["measured"], d["prediction"]
    assert d["kind"] == "measurement" and pred["kind"].startswith("prediction")
    assert len(meas["forwards"]) == pred["forwards"] == 5
    assert meas["weight_bytes"] == pred["weight_bytes"] and meas["kv_cache_bytes"] == pred["kv_cache_bytes"] > 0
    assert "nvml" in d["gpu"]
    assert set(c["forward"] for c in meas["forwards"]) == set(pred["activation_peak_bytes"])
    assert all(c["seconds"] > 0 for c in meas["forwards"]) and "predicted_s" not in pred  # no GPU: no time prediction
