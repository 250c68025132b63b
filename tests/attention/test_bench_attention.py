"""benchmarks/bench_attention.py runs end to end on CPU (smallest configuration); structure only, no timing asserts."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import torch

from magi_kernels.plan import get_plan
from magi_kernels.ranges import Magi1WindowMask
from magi_kernels.kernels.torch.flex_attn import flex_attn_fwd, fused_cpu_available
from magi_kernels.reference.flex_attn import default_scale

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_attention.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_attention", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_cpu_run_writes_ratios_and_tile_efficiency(tmp_path):
    bench = _load()
    js, cs = tmp_path / "r.json", tmp_path / "r.csv"
    res = bench.main(["--quick", "--no-compile", "--cpu-only", "--reps", "1", "--json", str(js), "--csv", str(cs)])
    assert res["gpu"] == []
    cpu = res["cpu"]
    impls = [r["impl"] for r in cpu]
    assert impls[0] == "magi_kernels torch path"
    assert "SDPA dense bool mask" in impls and "flex_attention eager" in impls
    for r in cpu:
        assert r["device"] == "CPU"
        if r["ms"] is None:  # a baseline that could not run says why
            assert r["note"].startswith("skipped")
            continue
        assert r["ms"] > 0 and r["gflops"] > 0 and r["torch_path_speedup"] > 0
        assert r["max_abs_diff"] < 1e-4  # every implementation computes the same attention
    assert cpu[0]["ms"] is not None and cpu[0]["torch_path_speedup"] == 1.0
    eff = res["tile_efficiency"]
    assert {r["tile"] for r in eff} == {"128x128", "128x64", "64x64"}
    assert len({r["schedule"] for r in eff}) == 2
    for r in eff:
        assert 1.0 <= r["steady_4chunk_eff"] <= r["worst_window_eff"]
        assert 1.0 <= r["step_weighted_eff"] <= r["worst_window_eff"]
    data = json.loads(js.read_text())
    assert data["device"] and len(data["rows"]) == len(cpu) + len(eff)
    with open(tmp_path / "r_cpu.csv") as f:
        assert len(list(csv.DictReader(f))) == len(cpu)
    assert (tmp_path / "r_tile_efficiency.csv").exists()


def test_flops_count_only_the_unmasked_area():
    bench = _load()
    case = bench.magi1_window(128, 2)
    m = Magi1WindowMask(128, (2, 3, 4, 5), 2)
    assert case.area() == m.area() == 14 * 128 * 128
    assert bench.attn_flops(case.area(), 8, 128) == 4 * 14 * 128 * 128 * 8 * 128
    assert bench.attn_flops(10, 1, 1, bwd=True) == 100.0
    assert int(case.dense_mask("cpu").sum()) == case.area()


def test_fused_cpu_forward_matches_the_generic_walk():
    """The fused CPU forward (one kernel call per merged step) equals the generic loop, partial tiles included."""
    if not fused_cpu_available(torch.zeros(1)):
        return
    # unaligned chunks (partial tiles), an uncovered row block and overlapping q ranges
    qr = torch.tensor([[0, 100], [100, 230], [230, 300], [250, 300]], dtype=torch.int32)
    kr = torch.tensor([[0, 150], [40, 260], [300, 360], [0, 10]], dtype=torch.int32)
    ty = torch.tensor([0, 1, 0, 3], dtype=torch.int32)
    tq, tk, hk, g, d = 340, 360, 2, 3, 64
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(tq, hk * g, d, generator=gen, dtype=torch.float64)
    k = torch.randn(tk, hk, d, generator=gen, dtype=torch.float64)
    v = torch.randn(tk, hk, d, generator=gen, dtype=torch.float64)
    plan = get_plan(qr.numpy(), kr.numpy(), ty.numpy(), tq, tk, 64, 32)
    s = default_scale(d)
    for step in (1 << 22, 2048):
        o1, l1 = flex_attn_fwd(q, k, v, plan, s, max_step_elems=step, fused=True)
        o2, l2 = flex_attn_fwd(q, k, v, plan, s, max_step_elems=step, fused=False)
        torch.testing.assert_close(o1, o2, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(l1, l2, atol=1e-6, rtol=1e-6)
    assert torch.isneginf(l1[300:]).all() and (o1[300:] == 0).all()
    assert math.isfinite(float(l1[:300].sum()))
