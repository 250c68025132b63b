"""The AOT static checker: every shipped Triton config compiles for sm_80/89/90 without spills and with
the declared tensor-core class, and the checker itself fails kernels that break those rules.

The checker needs real @triton.jit functions, so it always runs in a subprocess without
TRITON_INTERPRET (this test process has it set by conftest).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from magi_kernels.kernels.triton.aot import registered_configs

from .compiled import REPO, compile_env

EXPECTED_MMA = {("f16", 90): "HGMMA", ("f16", 89): "HMMA", ("f16", 80): "HMMA", ("fp8", 90): "QGMMA",
                ("fp8", 89): "QMMA"}
TENSOR_CORE_OPS = {"HGMMA", "QGMMA", "IGMMA", "HMMA", "QMMA", "IMMA"}


def _run(args: list[str], interpret: bool = False, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=compile_env(interpret), capture_output=True,
                          text=True, timeout=timeout)


# --------------------------------------------------------------------------------------------------
# Shipped configs


@pytest.fixture(scope="module")
def shipped_report(tmp_path_factory) -> dict:
    """One checker run over every registered config x arch (the expensive part, shared by the tests)."""
    out = tmp_path_factory.mktemp("aot") / "report.json"
    proc = _run(["-m", "magi_kernels.tools.aot_check", "--json", str(out), "--jobs", "2"])
    assert out.exists(), f"checker wrote no report (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = json.loads(out.read_text())
    report["returncode"], report["stdout"] = proc.returncode, proc.stdout
    return report


_KERNEL_NAMES = sorted({c.name for c in registered_configs()})


def test_every_registered_config_and_arch_is_checked(shipped_report):
    want = {(c.name, c.config, a) for c in registered_configs() for a in c.archs}
    got = {(r["kernel"], r["config"], r["arch"]) for r in shipped_report["results"]}
    assert want == got, f"missing: {sorted(want - got)[:5]} extra: {sorted(got - want)[:5]}"
    assert "Triton AOT static check" in shipped_report["stdout"]  # the rich table was printed


@pytest.mark.parametrize("kernel", _KERNEL_NAMES)
def test_shipped_configs_pass(shipped_report, kernel):
    rows = [r for r in shipped_report["results"] if r["kernel"] == kernel]
    assert rows
    bad = [f"{r['config']} sm_{r['arch']}: {r['verdict']}" for r in rows if not r["ok"]]
    assert not bad, "AOT check failed:\n" + "\n".join(bad)
    for r in rows:
        assert r["stl"] == 0 and r["ldl"] == 0 and r["stack"] == 0, r
        found = set(r["mma_ops"])
        if r["mma"] is None:
            assert not found & TENSOR_CORE_OPS, r
        else:
            assert r["mma_ops"].get(EXPECTED_MMA[(r["mma"], r["arch"])], 0) > 0, r


def test_checker_exit_code_matches_results(shipped_report):
    assert shipped_report["returncode"] == (0 if shipped_report["ok"] else 1)


def test_cli_reexecs_without_interpreter():
    # With TRITON_INTERPRET=1 the jit functions would be interpreter objects; the CLI restarts itself.
    proc = _run(["-m", "magi_kernels.tools.aot_check", "--kernel", "qk_norm_rope[head BLOCK_H=8 ", "--arch", "80"],
                interpret=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "re-running without it" in proc.stderr
    assert "1 checks, 0 failed" in proc.stdout


def test_cli_rejects_bad_arguments():
    proc = _run(["-m", "magi_kernels.tools.aot_check", "--arch", "75"])
    assert proc.returncode == 2 and "--arch" in proc.stderr
    proc = _run(["-m", "magi_kernels.tools.aot_check", "--kernel", "no_such_kernel_anywhere"])
    assert proc.returncode == 1 and "no registered config matches" in proc.stderr


def test_python_api_refuses_interpreted_kernels():
    from magi_kernels.tools.aot_check import run_checks

    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        run_checks(registered_configs()[:1], jobs=1)


# --------------------------------------------------------------------------------------------------
# The checker can fail


_FIXTURE_SCRIPT = textwrap.dedent("""
    import json, sys
    from magi_kernels.tools import aot_check
    from tests.harness.aot_fixtures import FIXTURES

    names = list(FIXTURES)
    results = aot_check.run_checks([FIXTURES[n][0] for n in names], jobs=2)
    rows = [dict(r.to_json(), fixture=next(n for n in names if FIXTURES[n][0].name == r.kernel)) for r in results]
    # The shared-memory rule, with sm_90's limit lowered below the fp16 matmul's 16 KB of operand tiles.
    aot_check.SMEM_LIMIT[90] = 1024
    r = aot_check.check_config(FIXTURES["f16_matmul"][0], 90)
    rows.append(dict(r.to_json(), fixture="smem_limit_lowered"))
    json.dump(rows, sys.stdout)
""")


@pytest.fixture(scope="module")
def fixture_rows() -> list[dict]:
    proc = _run(["-c", _FIXTURE_SCRIPT])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _rows(rows, fixture):
    got = [r for r in rows if r["fixture"] == fixture]
    assert got, f"no rows for {fixture}"
    return got


def test_detects_f16_tensor_cores(fixture_rows):
    rows = {r["arch"]: r for r in _rows(fixture_rows, "f16_matmul")}
    assert set(rows) == {80, 89, 90}
    assert all(r["ok"] for r in rows.values()), [r["verdict"] for r in rows.values()]
    assert rows[90]["mma_ops"].get("HGMMA", 0) > 0  # wgmma on Hopper
    assert rows[89]["mma_ops"].get("HMMA", 0) > 0 and rows[80]["mma_ops"].get("HMMA", 0) > 0


def test_detects_fp8_tensor_cores(fixture_rows):
    rows = {r["arch"]: r for r in _rows(fixture_rows, "fp8_matmul")}
    assert set(rows) == {89, 90}
    assert all(r["ok"] for r in rows.values()), [r["verdict"] for r in rows.values()]
    assert rows[90]["mma_ops"].get("QGMMA", 0) > 0
    assert rows[89]["mma_ops"].get("QMMA", 0) > 0


@pytest.mark.parametrize("fixture", ["f16_matmul_declared_none", "spills", "no_dot_declared_f16"])
def test_flags_bad_kernels(fixture_rows, fixture):
    from tests.harness.aot_fixtures import FIXTURES

    reason = FIXTURES[fixture][1]
    for r in _rows(fixture_rows, fixture):
        assert not r["ok"], f"{fixture} sm_{r['arch']} passed but should fail with {reason!r}"
        assert reason in r["verdict"], r["verdict"]
        if fixture == "spills":
            assert r["stl"] > 0 and r["ldl"] > 0 and r["stack"] > 0, r


def test_flags_shared_memory_over_limit(fixture_rows):
    (r,) = _rows(fixture_rows, "smem_limit_lowered")
    assert not r["ok"] and "shared memory" in r["verdict"] and r["smem"] > 1024, r
