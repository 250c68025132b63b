"""The README's main-job tools run end to end on this machine (CPU): self-check, benchmark, GPU validation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, env_drop=("TRITON_INTERPRET",), timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_selfcheck_runs_every_backend_and_passes():
    r = _run("-m", "magi_kernels.tools.selfcheck")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all checks passed" in r.stdout
    if not torch.cuda.is_available():
        # On CPU it must still have exercised the interpreter and the SIMT emulator, not skipped them.
        rows = [ln for ln in r.stdout.splitlines() if "qk_norm_rope" in ln]
        assert any("triton" in ln and " ok" in ln for ln in rows), r.stdout
        assert any("cuda" in ln and " ok" in ln for ln in rows), r.stdout


def test_bench_norm_rope_quick_writes_measured_rows(tmp_path):
    out = tmp_path / "bench.json"
    r = _run("benchmarks/bench_norm_rope.py", "--quick", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(out.read_text())
    assert data["rows"], data
    for row in data["rows"]:
        assert row["us"] > 0 and row["GB/s"] > 0
        if not torch.cuda.is_available():
            assert row["device"] == "CPU" and row["backend"] == "torch"


def test_gpu_validate_without_gpu_says_so_and_exits_cleanly():
    if torch.cuda.is_available():
        pytest.skip("GPU host: gpu_validate validates for real there (minutes); run it by hand")
    r = _run("benchmarks/gpu_validate.py")
    assert r.returncode == 0 and "no CUDA GPU" in r.stdout, r.stdout + r.stderr
