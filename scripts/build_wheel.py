"""Build the release wheel, repair it to a manylinux tag, and prove it installs and works without a compiler.

    python scripts/build_wheel.py [--out DIR] [--wheel WHEEL] [--extra-torch VERSION] [--no-sdist-check]

Steps (each logged under DIR/logs, the facts collected in DIR/summary.json):

1. ``python -m build``: the sdist, then the wheel built *from that sdist* (so the sdist is known to be
   complete), with nvcc for the release architectures (setup.py's "release" preset unless
   MAGI_CUDA_ARCHS says otherwise).
2. ``auditwheel repair`` to the oldest manylinux tag the binary allows; ``auditwheel show`` must list
   no libcudart (the CUDA runtime is linked statically).
3. A fresh ``python -m venv``; ``pip install torch==2.13.0`` (our CI's CPU build) and the wheel with
   PATH reduced to the venv (no cc, c++, nvcc) and ``--only-binary :all:``, so nothing can compile.
4. ``python -m magi_kernels.tools.selfcheck --info`` in that venv, outside the source tree.
5. The SASS and PTX in the installed ``_C``, read with the cuobjdump shipped in the Triton wheel, must be
   exactly what the build recorded.
6. (--extra-torch) the same wheel in a second venv with another torch version (--extra-req adds pins there).
7. (unless --no-sdist-check) the sdist built into a wheel with nvcc hidden (PATH without it, CUDA_HOME
   pointing nowhere): it must build host C++ only, say so exactly once, and pass the self-check.

Needs ``pip install build auditwheel`` (the ``release`` extra). Exits non-zero on the first failed step.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CI_TORCH = "torch==2.13.0"
NO_CUDA_NOTICE = "magi-kernels: nvcc not found"


class StepFailed(RuntimeError):
    pass


def run(cmd: list[str], log: Path, *, env: dict | None = None, cwd: Path | None = None,
        timeout: float = 3600) -> str:
    """Run ``cmd``, tee its output to ``log``; raise StepFailed with the log's tail on a non-zero exit."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    print(f"$ {' '.join(cmd)}   (log: {log})", flush=True)
    with log.open("w") as f:  # streamed, so a long step can be watched with tail -f
        r = subprocess.run(cmd, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    output = log.read_text()
    print(f"  -> exit {r.returncode} in {time.monotonic() - t0:.0f} s", flush=True)
    if r.returncode != 0:
        raise StepFailed(f"{cmd[:4]} failed (exit {r.returncode}); last lines of {log}:\n"
                         + "\n".join(output.splitlines()[-40:]))
    return output


def path_without(*tools: str) -> str:
    """The current PATH minus every directory that holds one of ``tools``."""
    keep = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and not any((Path(d) / t).exists() for t in tools)]
    return os.pathsep.join(keep)


def no_compiler_env(venv: Path) -> dict:
    """An environment in which nothing can be compiled: PATH is only the venv, CC/CXX/nvcc point nowhere."""
    env = {k: v for k, v in os.environ.items() if k not in ("CUDACXX", "TRITON_INTERPRET", "PYTHONPATH")}
    env.update(PATH=str(venv / "bin"), CC="/nonexistent/cc", CXX="/nonexistent/c++", CUDA_HOME="/nonexistent",
               CUDA_PATH="/nonexistent")
    return env


def make_venv(venv: Path, torch_spec: str, wheel: Path, logs: Path, tag: str, extra: tuple = ()) -> dict:
    """Fresh venv with ``torch_spec`` and ``wheel`` installed without any compiler; returns the env to run in."""
    if venv.exists():
        shutil.rmtree(venv)
    run([sys.executable, "-m", "venv", str(venv)], logs / f"{tag}-venv.log")
    env = no_compiler_env(venv)
    for tool in ("cc", "c++", "gcc", "g++", "nvcc"):
        found = shutil.which(tool, path=env["PATH"])
        if found:
            raise StepFailed(f"the no-compiler PATH still reaches {found}")
    py = str(venv / "bin" / "python")
    # --only-binary: a dependency without a wheel would need a compiler, which is exactly what must not happen.
    run([py, "-m", "pip", "install", "--only-binary", ":all:", torch_spec, str(wheel), *extra],
        logs / f"{tag}-pip.log", env=env)
    return env


def selfcheck(venv: Path, env: dict, logs: Path, tag: str, workdir: Path) -> dict:
    """Self-check + info in the venv, from a directory outside the source tree."""
    py = str(venv / "bin" / "python")
    out = run([py, "-m", "magi_kernels.tools.selfcheck", "--info"], logs / f"{tag}-selfcheck.log", env=env,
              cwd=workdir)
    if "all checks passed" not in out:
        raise StepFailed(f"selfcheck in {venv} did not report 'all checks passed' (see {logs}/{tag}-selfcheck.log)")
    info = json.loads(run([py, "-m", "magi_kernels.tools.info", "--json"], logs / f"{tag}-info.log", env=env,
                          cwd=workdir))
    if not str(info["_C"]["path"]).startswith(str(venv)):
        raise StepFailed(f"{tag}: imported _C from {info['_C']['path']}, not from the venv {venv}")
    return info


def wheel_so(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        return [n for n in z.namelist() if n.endswith(".so") or ".so." in n]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "dist-release", help="work directory (default: dist-release)")
    ap.add_argument("--wheel", type=Path, help="skip the build: verify this already-built (unrepaired) wheel")
    ap.add_argument("--extra-torch", action="append", default=[],
                    help="also install the wheel next to this torch version (e.g. 2.9.1) in a second venv")
    ap.add_argument("--extra-req", action="append", default=[],
                    help="extra requirement for the --extra-torch venvs, e.g. 'numpy<2.4' (Triton 3.5's "
                         "interpreter, which torch 2.9 pins, fails with numpy 2.4)")
    ap.add_argument("--no-sdist-check", action="store_true", help="skip building the sdist with nvcc hidden")
    args = ap.parse_args(argv)
    out: Path = args.out.resolve()
    logs = out / "logs"
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"steps_s": {}}
    t_all = time.monotonic()

    def timed(name, fn, *a, **kw):
        t0 = time.monotonic()
        res = fn(*a, **kw)
        summary["steps_s"][name] = round(time.monotonic() - t0, 1)
        return res

    try:
        for mod in ("build", "auditwheel"):
            if importlib.util.find_spec(mod) is None:
                raise StepFailed(f"python -m {mod} is not installed here: pip install build auditwheel "
                                 "(or pip install -e '.[release]')")
        dist = out / "dist"
        if args.wheel is None:
            if dist.exists():
                shutil.rmtree(dist)
            build_log = timed("build", run, [sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)],
                              logs / "build.log", cwd=ROOT)
            m = re.search(r"magi-kernels: building CUDA kernels with (\S+) for (\S+)", build_log)
            if m is None:
                raise StepFailed("the wheel was built without nvcc: a release wheel needs the CUDA kernels "
                                 "(put nvcc on PATH or set CUDA_HOME)")
            raw_wheel = next(dist.glob("*.whl"))
            summary["sdist"] = str(next(dist.glob("*.tar.gz")))
        else:
            raw_wheel = args.wheel.resolve()
        summary["raw_wheel"] = {"path": str(raw_wheel), "bytes": raw_wheel.stat().st_size}

        # 2. manylinux repair; the static cudart means nothing CUDA-related may be grafted or required.
        house = out / "wheelhouse"
        if house.exists():
            shutil.rmtree(house)
        timed("auditwheel", run, [sys.executable, "-m", "auditwheel", "repair", "-w", str(house), str(raw_wheel)],
              logs / "auditwheel-repair.log")
        wheel = next(house.glob("*.whl"))
        show = run([sys.executable, "-m", "auditwheel", "show", str(wheel)], logs / "auditwheel-show.log")
        sos = wheel_so(wheel)
        if "libcudart" in show or any("cudart" in s for s in sos):
            raise StepFailed(f"the wheel depends on or bundles libcudart:\n{show}")
        summary["wheel"] = {"path": str(wheel), "name": wheel.name, "bytes": wheel.stat().st_size,
                            "mib": round(wheel.stat().st_size / 2**20, 2), "shared_objects": sos,
                            "auditwheel_show": show.strip()}

        # 3-5. fresh venv, no compiler, CI's torch; selfcheck; device code read back from the installed _C.
        work = out / "run"
        work.mkdir(exist_ok=True)
        venv = out / "venv-ci-torch"
        env = timed("install_ci_torch", make_venv, venv, CI_TORCH, wheel, logs, "ci-torch")
        info = timed("selfcheck_ci_torch", selfcheck, venv, env, logs, "ci-torch", work)
        c = info["_C"]
        if not c["cuda"]:
            raise StepFailed("the installed _C has no CUDA kernels")
        code = info["_C_device_code"]
        if not code or "error" in code:
            raise StepFailed(f"could not read the device code in {c['path']}: {code}")
        if not code["matches_build"]:
            raise StepFailed(f"_C holds SASS {code['sass']} / PTX {code['ptx']}, but the build recorded "
                             f"{c['cuda_archs']} (SASS {code['recorded_sass']} / PTX {code['recorded_ptx']})")
        summary["ci_torch"] = {"torch": info["torch"], "triton": info["triton"], "magi_kernels": info["magi_kernels"],
                               "sass": code["sass"], "ptx": code["ptx"], "cuobjdump": code["cuobjdump"],
                               "recorded_archs": c["cuda_archs"], "nvcc": c["nvcc_version"], "cudart": c.get("cudart"),
                               "ldd": run(["ldd", c["path"]], logs / "ldd.log").strip().splitlines()}
        if any("libcudart" in ln for ln in summary["ci_torch"]["ldd"]):
            raise StepFailed("the installed _C links libcudart.so dynamically")

        # 6. the same wheel with other torch versions
        for ver in args.extra_torch:
            tag = f"torch-{ver}"
            try:
                env_x = timed(f"install_{tag}", make_venv, out / f"venv-{tag}", f"torch=={ver}", wheel, logs, tag,
                              tuple(args.extra_req))
                info_x = timed(f"selfcheck_{tag}", selfcheck, out / f"venv-{tag}", env_x, logs, tag, work)
                summary[tag] = {"torch": info_x["torch"], "result": "selfcheck passed"}
            except (StepFailed, subprocess.TimeoutExpired) as e:
                summary[tag] = {"result": f"failed: {str(e).splitlines()[0]}"}
                raise

        # 7. the sdist on a machine without nvcc
        if not args.no_sdist_check and args.wheel is None:
            nocuda = out / "nocuda"
            if nocuda.exists():
                shutil.rmtree(nocuda)
            env_nc = {k: v for k, v in os.environ.items()
                      if k not in ("CUDACXX", "MAGI_WITH_CUDA", "MAGI_CUDA_ARCHS", "TRITON_INTERPRET")}
            env_nc.update(PATH=path_without("nvcc"), CUDA_HOME="/nonexistent", CUDA_PATH="/nonexistent")
            if shutil.which("nvcc", path=env_nc["PATH"]):
                raise StepFailed("could not hide nvcc from PATH")
            log = timed("build_sdist_without_nvcc", run,
                        [sys.executable, "-m", "build", "--wheel", "--outdir", str(nocuda), summary["sdist"]],
                        logs / "build-without-nvcc.log", env=env_nc, cwd=out)
            notices = log.count(NO_CUDA_NOTICE)
            if notices != 1:
                raise StepFailed(f"building without nvcc printed {NO_CUDA_NOTICE!r} {notices} times, not once")
            nc_wheel = next(nocuda.glob("*.whl"))
            py = str(venv / "bin" / "python")
            run([py, "-m", "pip", "install", "--no-deps", "--force-reinstall", str(nc_wheel)],
                logs / "nocuda-pip.log", env=env)
            info_nc = selfcheck(venv, env, logs, "nocuda", work)
            if info_nc["_C"]["cuda"]:
                raise StepFailed("the wheel built with nvcc hidden still has CUDA kernels")
            summary["sdist_without_nvcc"] = {"wheel": nc_wheel.name, "bytes": nc_wheel.stat().st_size,
                                             "notice_count": notices,
                                             "notice": next(ln for ln in log.splitlines() if NO_CUDA_NOTICE in ln),
                                             "selfcheck": "passed", "cuda": info_nc["_C"]["cuda"]}
        summary["ok"] = True
    except StepFailed as e:
        summary["ok"] = False
        summary["error"] = str(e)
        print(f"FAILED: {e}", file=sys.stderr)
    summary["total_s"] = round(time.monotonic() - t_all, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "wheel"}, indent=2))
    if "wheel" in summary:
        print(f"wheel: {summary['wheel']['name']} ({summary['wheel']['mib']} MiB)")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
