"""Static hot-loop budget of the quantized flex attention forward (flex_attn_fp8_func), read from SASS compiled on
this machine (no GPU).

The FULL-tile loop of the shipped forward configs (sm_90 and sm_89, D=128, both PV precisions) is compiled in a
subprocess without TRITON_INTERPRET by the benchmark's ``fp8_loop`` (benchmarks/bench_fp8_attention.py, which
finds the loop with magi_kernels.tools.sass). The loop must run QK on int8 tensor cores and PV on the declared
class, and its issued instructions per 1000 MMA FLOPs of one warp must stay within today's static value plus ~3%
slack (a regression fails). On sm_90 the structure of the FULL pass is asserted too: warp-specialized, and no
global load left in the consumer loop (the K, V and key-scale boxes go to the producer warp). The budget is on
our own loop, not on the ratio to the bf16 kernel, so work on the bf16 kernel cannot fail this test;
``python benchmarks/bench_fp8_attention.py --sass`` prints the ratio, and docs/fp8_attention.md
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

# (arch, pv_precision) -> (int8 QK MMA, PV MMA, max issued instructions per kFLOP). Static values with Triton 3.9
# (docs/fp8_attention.md): sm_90 0.625 and 0.610 (warp-specialized FULL pass at 128x128; the one-pass loop at
# 128x64 it replaced was 0.860 and 0.820), sm_89 1.137 and 1.194.
BUDGETS = {
    (90, "e4m3"): ("IGMMA", "QGMMA", 0.645),
    (90, "fp16"): ("IGMMA", "HGMMA", 0.630),
    (89, "e4m3"): ("IMMA", "QMMA", 1.17),
    (89, "fp16"): ("IMMA", "HMMA", 1.23),
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
        if loop["per_kflop"] > budget:
            over.append(f"sm_{key[0]} pv={key[1]}: {loop['per_kflop']:.3f} issued instructions per kFLOP > budget "
                        f"{budget}")
    assert not over, "\n".join(over)


def test_sm90_full_pass_is_warp_specialized_without_loads(loops):
    for (arch, pv), loop in loops.items():
        if arch == 90:
            assert loop["warp_specialized"] and not loop["loads"], (pv, loop)
