"""Static hot-loop budget of the quantized flex attention forward (flex_attn_fp8_func), read from SASS compiled on
this machine (no GPU).

The FULL-tile loop of the shipped forward configs (sm_90 and sm_89, D=128, both PV precisions) is compiled in a
subprocess without TRITON_INTERPRET by the benchmark's ``fp8_loop`` (benchmarks/bench_fp8_attention.py, which
finds the loop with magi_kernels.tools.sass). The loop must run QK on int8 tensor cores and PV on the declared
class, and its issued instructions must stay within today's static count plus ~3% slack (a regression fails).
The budget is on our own count, not on the ratio to the bf16 kernel, so work on the bf16 kernel cannot fail
this test; ``python benchmarks/bench_fp8_attention.py --sass`` prints the ratio, and docs/fp8_attention.md
records it and why the 0.6 target is not met.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# (arch, pv_precision) -> (int8 QK MMA, PV MMA, max issued instructions per loop iteration). Static counts with
# Triton 3.9 (docs/fp8_attention.md): 451, 430, 298, 313.
BUDGETS = {
    (90, "e4m3"): ("IGMMA", "QGMMA", 464),
    (90, "fp16"): ("IGMMA", "HGMMA", 443),
    (89, "e4m3"): ("IMMA", "QMMA", 307),
    (89, "fp16"): ("IMMA", "HMMA", 322),
}


@pytest.fixture(scope="module")
def loops(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sass") / "loops.json"
    script = ("import json, sys\nsys.path.insert(0, 'benchmarks')\nimport bench_fp8_attention as b\n"
              "keys = json.loads(sys.argv[1])\n"
              "open(sys.argv[2], 'w').write(json.dumps([b.fp8_loop(arch, 128, pv) for arch, pv in keys]))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    keys = list(BUDGETS)
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(keys), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0 and out.exists(), proc.stderr[-3000:]
    return dict(zip(keys, json.loads(out.read_text())))


def test_hot_loop_mma_classes_and_issued_instructions(loops):
    over = []
    for key, (qk_mma, pv_mma, budget) in BUDGETS.items():
        loop = loops[key]
        assert qk_mma in loop["mma_kind"] and pv_mma in loop["mma_kind"], f"{key}: loop MMAs {loop['mma_kind']}"
        if loop["instructions"] > budget:
            over.append(f"sm_{key[0]} pv={key[1]}: {loop['instructions']} issued instructions > budget {budget}")
    assert not over, "\n".join(over)
