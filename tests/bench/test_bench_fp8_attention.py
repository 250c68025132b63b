"""benchmarks/bench_fp8_attention.py runs end to end on CPU (accuracy report only) and reports every case.

Case (c) captures q/k/v from the tiny MAGI-1 DiT and prints "(c) skipped" if that side breaks; this test
makes such a break a failure instead of a silently shorter report."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_accuracy_report_covers_every_case():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_fp8_attention.py"), "--tokens", "128",
                           "--head-dim", "64"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "skipped" not in out, out
    for label in ("(a) random normal", "(b) DiT-like outliers", "(c) tiny DiT call 0", "tiny DiT velocity rel L2",
                  "fp8/pv16 attention", "per-k-tile K scale (not shipped)"):
        assert label in out, out
    # every accuracy row carries finite numbers
    rows = [l for l in out.splitlines() if l.startswith("(")]
    assert len(rows) >= 3
    for row in rows:
        cos = [float(x) for x in re.findall(r"cos ([0-9.]+)", row)]
        assert len(cos) == 4 and all(0.9 < c <= 1.0 + 1e-6 for c in cos), row  # fp8, fp8/pv16, bf16, fp32
    # each case's error budget line: every term present, a finite percentage
    budgets = [l for l in out.splitlines() if "error budget" in l]
    assert len(budgets) == len(rows)
    for line in budgets:
        terms = {t: float(x) for t, x in re.findall(r"(\w+) ([0-9.]+)%", line)}
        assert set(terms) == {"Q", "K", "QK", "P", "V", "PV", "all"}, line
        assert all(0.0 < x < 50.0 for x in terms.values()), line
