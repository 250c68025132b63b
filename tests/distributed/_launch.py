"""Run a suite of distributed cases in ``world`` local processes (gloo on 127.0.0.1), once per world size.

Process start-up (importing torch) dominates on small CPUs, so one launch runs every case of a suite
inside one process group and reports each case; tests then assert on the collected results.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).absolute().parents[2]  # not resolve(): keep the checkout the tests run from


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TRITON_INTERPRET": "1",
                "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", "")})
    env.update(extra or {})
    return env


def launch(argv_for_rank, world: int, timeout: float, env=None) -> list[tuple[int, str, float]]:
    """Start ``world`` processes, wait up to ``timeout`` s; returns (returncode, output tail, seconds) per rank.

    ``env``: one environment for all ranks, a list with one per rank, or None (:func:`worker_env`).

    Stragglers are killed (returncode -9) so a hang fails the test instead of blocking CI."""
    t0 = time.monotonic()
    logs = [tempfile.TemporaryFile() for _ in range(world)]
    envs = env if isinstance(env, list) else [env or worker_env()] * world
    procs = [subprocess.Popen(argv_for_rank(r), cwd=REPO, env=envs[r], stdout=logs[r],
                              stderr=subprocess.STDOUT) for r in range(world)]
    ended = [None] * world
    while time.monotonic() - t0 < timeout and any(p.poll() is None for p in procs):
        for r, p in enumerate(procs):
            if ended[r] is None and p.poll() is not None:
                ended[r] = time.monotonic() - t0
        time.sleep(0.05)
    for r, p in enumerate(procs):
        if p.poll() is None:
            p.kill()
            p.wait()
        if ended[r] is None:
            ended[r] = time.monotonic() - t0
    out = []
    for r, p in enumerate(procs):
        logs[r].seek(0)
        text = logs[r].read().decode(errors="replace")
        logs[r].close()
        out.append((p.returncode, text[-4000:], ended[r]))
    return out


def run_suite(suite: str, world: int, seed: int, timeout: float = 420.0) -> dict:
    """Run ``tests.distributed.<suite>.cases(world)`` on ``world`` ranks; returns {case: (ok, message)}."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        def argv(rank):
            return [sys.executable, "-m", "tests.distributed._worker", "--suite", suite, "--world", str(world),
                    "--rank", str(rank), "--port", str(port), "--seed", str(seed), "--out", tmp]

        procs = launch(argv, world, timeout)
        per_rank = []
        for r in range(world):
            f = Path(tmp) / f"rank{r}.json"
            per_rank.append(json.loads(f.read_text()) if f.exists() else {})
    names = list(dict.fromkeys(n for res in per_rank for n in res))
    results = {}
    for n in names:
        msgs = [f"rank {r}: {res[n]['msg']}" for r, res in enumerate(per_rank) if n in res and not res[n]["ok"]]
        missing = [r for r, res in enumerate(per_rank) if n not in res]
        if missing:
            msgs.append(f"ranks {missing} did not report")
        results[n] = (not msgs, "\n".join(msgs))
    for r, (rc, tail, _) in enumerate(procs):
        if rc != 0:
            results[f"<rank {r} exit>"] = (False, f"exit code {rc}\n{tail}")
    if not names:
        results["<no results>"] = (False, "\n".join(t for _, t, _ in procs))
    return results


def assert_all_passed(results: dict) -> None:
    failed = {n: m for n, (ok, m) in results.items() if not ok}
    assert not failed, "\n\n".join(f"{n}:\n{m}" for n, m in failed.items())
