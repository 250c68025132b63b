"""Compile-only scripts for the tests: the AOT checker needs real ``@triton.jit`` functions, so it runs in a
subprocess without TRITON_INTERPRET (which conftest sets for the test process itself)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def compile_env(interpret: bool = False) -> dict[str, str]:
    """The test process's environment without TRITON_INTERPRET (or with it, for the CLI's re-exec test), the
    repository importable, and Triton's default fp fusion (what the JIT applies at run time)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def run_json_script(script: str, *args: str, out: Path, timeout: int = 600):
    """Run ``python -c script *args out`` in the repository without the interpreter. The script writes JSON to
    its last argument; returns it parsed (a failing script fails the caller with the script's stderr)."""
    proc = subprocess.run([sys.executable, "-c", script, *args, str(out)], cwd=REPO, env=compile_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0 and out.exists(), proc.stderr[-3000:]
    return json.loads(out.read_text())
