"""Static hot-loop budget of the quantized flex attention forward (flex_attn_fp8_func), read from SASS compiled on
this machine (no GPU).

The FULL-tile loop of the forward kernel (sm_90 and sm_89, D=128, both PV precisions) and of the bf16 flex_attn
forward at the same tile are compiled in a subprocess without TRITON_INTERPRET by the benchmark's
``sass_report`` (benchmarks/bench_fp8_attention.py, which finds the loop with magi_kernels.tools.sass). The loop
must run QK on int8 tensor cores and PV on the declared class, and its issued instructions relative to the
bf16 loop must stay within today's static count plus ~3% slack (a regression fails). The 0.6 target of
docs/fp8_attention.md is not met and not enforced here; the doc explains why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# (arch, pv_precision) -> (int8 QK MMA, PV MMA, max issued-instruction ratio to the bf16 loop). Static counts
# with Triton 3.9 (docs/fp8_attention.md): 1.12, 1.07, 0.96, 1.00.
BUDGETS = {
    (90, "e4m3"): ("IGMMA", "QGMMA", 1.15),
    (90, "fp16"): ("IGMMA", "HGMMA", 1.10),
    (89, "e4m3"): ("IMMA", "QMMA", 0.99),
    (89, "fp16"): ("IMMA", "HMMA", 1.03),
}


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sass") / "rows.json"
    script = ("import json, sys\nsys.path.insert(0, 'benchmarks')\nimport bench_fp8_attention as b\n"
              "open(sys.argv[1], 'w').write(json.dumps(b.sass_report(head_dims=(128,))))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", script, str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900, check=False)
    assert proc.returncode == 0 and out.exists(), proc.stderr[-3000:]
    return {(r["arch"], r["pv"]): r for r in json.loads(out.read_text())}


def test_hot_loop_mma_classes_and_instruction_ratio(rows):
    assert set(rows) == set(BUDGETS)
    over = []
    for key, (qk_mma, pv_mma, budget) in BUDGETS.items():
        row = rows[key]
        kinds = row["fp8"]["mma_kind"]
        assert qk_mma in kinds and pv_mma in kinds, f"{key}: loop tensor-core instructions {kinds}"
        if row["ratio"] > budget:
            over.append(f"sm_{key[0]} pv={key[1]}: {row['fp8']['instructions']} instructions vs bf16 "
                        f"{row['bf16']['instructions']}: ratio {row['ratio']:.3f} > budget {budget}")
    assert not over, "\n".join(over)
