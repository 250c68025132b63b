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
    r = _run("-m", "magi_kernels.tools.selfcheck", "--info")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all checks passed" in r.stdout
    # --info puts the environment report (tools/info.py) first
    assert r.stdout.startswith("magi-kernels "), r.stdout[:500]
    assert "backends on " in r.stdout
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


# --- version and the environment report (tools/info.py) ---------------------------------------------------


def _pyproject_version() -> str:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_version_comes_from_pyproject_via_metadata():
    from importlib import metadata

    import magi_kernels
    from magi_kernels import _version

    assert magi_kernels.__version__ == metadata.version("magi-kernels") == _pyproject_version()
    # an uninstalled source tree reads the same field and says it is a source tree
    assert _version._from_pyproject() == _pyproject_version() + "+source"


def test_info_report_lists_versions_build_and_backends():
    import triton

    import magi_kernels
    from magi_kernels import _ext, registry
    from magi_kernels.tools import info

    r = info.collect()
    assert r["magi_kernels"] == magi_kernels.__version__
    assert r["torch"] == torch.__version__ and r["triton"] == triton.__version__
    bi = _ext.build_info()
    assert r["_C"]["native"] and r["_C"]["cuda_archs"] == bi["cuda_archs"]
    # compiler facts are recorded at build time, not guessed at run time
    assert r["_C"]["cxx_compiler"].split()[0] in ("GNU", "Clang", "AppleClang", "IntelLLVM")
    assert r["_C"]["python_version"].startswith(f"{sys.version_info.major}.{sys.version_info.minor}")
    assert set(r["backends"]) == set(registry.ops())
    for op, row in r["backends"].items():
        assert row.keys() == registry.implementations(op).keys()
        assert row["torch"] == "ok"
    if bi["cuda"] and r["_C_device_code"] is not None:
        code = r["_C_device_code"]
        assert code["matches_build"], code
        assert code["sass"] and set(code["sass"]) == {f"sm_{t}" for t, sass, _ in _ext.arch_targets() if sass}
    text = info.render(r)
    assert text.startswith(f"magi-kernels {magi_kernels.__version__}\n")
    assert f"torch        {torch.__version__}" in text and "backends on " in text
    assert json.loads(json.dumps(r)) == r  # --json output is plain JSON


def test_arch_records_map_to_runnable_gpus(monkeypatch):
    from magi_kernels import _ext

    monkeypatch.setattr(_ext, "build_info", lambda: {"cuda_archs": "80-real,86-real,89-real,90a-real,100-real,120"})
    assert _ext.cuda_archs() == (80, 86, 89, 90, 100, 120)
    assert _ext.ptx_archs() == (120,)
    assert _ext.kernel_image_for(86) == "SASS sm_86"
    assert _ext.kernel_image_for(87) == "SASS sm_86"  # same major, newer minor
    assert _ext.kernel_image_for(103) == "SASS sm_100"
    assert _ext.kernel_image_for(121) == "SASS sm_120"
    assert _ext.kernel_image_for(75) is None
    assert _ext.kernel_image_for(110) is None  # compute_120 PTX cannot be JIT-compiled for an older GPU
    assert _ext.kernel_image_for(130).startswith("PTX compute_120")
    # arch-specific PTX ("90a") is not forward compatible
    monkeypatch.setattr(_ext, "build_info", lambda: {"cuda_archs": "80,90a"})
    assert _ext.ptx_archs() == (80,) and _ext.kernel_image_for(100).startswith("PTX compute_80")


def _load_setup_py():
    import importlib.util

    spec = importlib.util.spec_from_file_location("magi_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # setup() itself only runs as __main__
    return mod


def test_setup_cuda_arch_defaults_and_override(monkeypatch):
    setup_py = _load_setup_py()
    monkeypatch.delenv("MAGI_CUDA_ARCHS", raising=False)
    release = setup_py.cuda_archs_for(editable=False)
    assert release == "80-real;86-real;89-real;90a-real;100-real;120"
    assert setup_py.cuda_archs_for(editable=True) == "80;89;90a"
    monkeypatch.setenv("MAGI_CUDA_ARCHS", "release")
    assert setup_py.cuda_archs_for(editable=True) == release
    monkeypatch.setenv("MAGI_CUDA_ARCHS", " 89, 90a-real ;120-virtual")
    assert setup_py.cuda_archs_for(editable=False) == "89;90a-real;120-virtual"
    for bad in ("sm_90", "90a-fast", ";"):
        monkeypatch.setenv("MAGI_CUDA_ARCHS", bad)
        with pytest.raises(ValueError, match="MAGI_CUDA_ARCHS"):
            setup_py.cuda_archs_for(editable=False)


def test_info_names_the_code_a_gpu_would_run(monkeypatch):
    from types import SimpleNamespace

    from magi_kernels import _ext
    from magi_kernels.tools import info

    monkeypatch.setattr(_ext, "build_info", lambda: {"cuda": True, "cuda_archs": "80-real,90a-real,120"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for (major, minor), runs in {(9, 0): "SASS sm_90", (8, 6): "SASS sm_80", (7, 5): "nothing"}.items():
        props = SimpleNamespace(name="GPU", major=major, minor=minor, total_memory=80 * 2**30)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i, p=props: p)
        gpu = info._gpu()
        assert gpu["capability"] == f"sm_{major}{minor}" and gpu["runs_from_C"].startswith(runs), gpu


@pytest.mark.parametrize("line, flops", [
    # warpgroup MMAs: each of the four warps issues it and owns a quarter of 2*M*N*K
    ("HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0", 2 * 64 * 128 * 16 // 4),
    ("QGMMA.64x64x32.F32.E4M3.E4M3 R24, gdesc[UR8], R24", 2 * 64 * 64 * 32 // 4),
    ("IGMMA.64x128x32.S32.S8.S8 R24, gdesc[UR8], R24, gsb0", 2 * 64 * 128 * 32 // 4),
    # warp MMAs: m16 n8 k{16,32}
    ("HMMA.16816.F32.BF16 R8, R12, R16, R8", 2 * 16 * 8 * 16),
    ("QMMA.16832.F32.E4M3.E4M3 R8, R12, R16, R8", 2 * 16 * 8 * 32),
    ("IMMA.16832.S8.S8 R8, R12, R16, R8", 2 * 16 * 8 * 32),
])
def test_sass_counts_every_tensor_core_kind(line, flops):
    from magi_kernels.tools.sass import MMA_OPS, mma_flops_per_warp, parse_sass

    (ins,) = parse_sass(f"        /*0010*/                   {line} ;\n")
    assert ins.op in MMA_OPS
    assert mma_flops_per_warp(ins) == flops


# --- the hot-loop finder on a warp-specialized kernel (magi_kernels/tools/sass.py) --------------------------


def _listing(rows: list[str]) -> tuple[str, dict[str, str]]:
    """``nvdisasm -c`` text of ``rows`` and its labels by name: "name:" rows become labels (.L_x_<n>, numbered in
    order of first use), the others instructions at addresses 0x10 apart; "`(name)" in an operand refers to the
    label."""
    names: dict[str, str] = {}

    def label(name: str) -> str:
        return names.setdefault(name, f".L_x_{len(names)}")

    out, addr = [], 0
    for row in rows:
        if row.endswith(":"):
            out.append(label(row[:-1]) + ":")
            continue
        text = row
        for name in [w[2:-1] for w in row.split() if w.startswith("`(")]:
            text = text.replace(f"`({name})", f"`({label(name)})")
        out.append(f"        /*{addr:04x}*/                   {text} ;")
        addr += 0x10
    return "\n".join(out) + "\n", names


def _consumer_loop(p: int) -> list[str]:
    """One consumer partition's loop: wait for K, int8 QK wgmma, a tanh with a branch on the argument's size
    (both sides in the body), the softmax, wait for V, e4m3 PV wgmma. Both waits retry out of line."""
    return [f"loop{p}:", "SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR4+0x20], R3", f"@!P1 BRA `(wait_k{p})",
            f"k_ready{p}:", "WARPGROUP.ARRIVE", "IGMMA.64x128x32.S32.S8.S8 R24, gdesc[UR12], RZ, gsb0",
            "WARPGROUP.DEPBAR.LE gsb0, 0x0", "I2FP.F32.S32 R24, R24", "FSETP.GEU.AND P3, PT, |R24|, 9, PT",
            f"@P3 BRA `(large{p})", "FMUL R25, R24, R24", "FFMA R25, R25, -0.33, R26", "FMUL R24, R24, R25",
            f"BRA `(tanh_done{p})", f"large{p}:", "MUFU.EX2 R25, R24", "MUFU.RCP R24, R25", f"tanh_done{p}:",
            "FMNMX R27, R24, R28, !PT", "FFMA R24, R24, R29, -R27", "MUFU.EX2 R24, R24", "FADD R30, R30, R24",
            "F2FP.SATFINITE.E4M3.F32.PACK_AB_MERGE_C R88, R24, R24, RZ",
            "SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR4+0x30], R3", f"@!P1 BRA `(wait_v{p})", f"v_ready{p}:",
            "WARPGROUP.ARRIVE", "QGMMA.64x128x32.F32.E4M3.E4M3 R56, R88, gdesc[UR16], R56, gsb0",
            "WARPGROUP.DEPBAR.LE gsb0, 0x0", "SYNCS.ARRIVE.TRANS64.ART0 RZ, [UR4+0x40], R5", f"@P4 BRA `(loop{p})"]


def _retry(wait: str, back: str) -> list[str]:
    """An out-of-line mbarrier wait: retries until the phase flips, then jumps back into the loop it left."""
    return [f"{wait}:", "SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR4+0x20], R3", f"@!P1 BRA `({wait})", f"BRA `({back})"]


# A warp-specialized kernel as ptxas lays it out: the producer's TMA loop, two consumer partitions' loops, the
# epilogue, and after the last EXIT the out-of-line wait retries, whose BRA jumps back into a loop.
_WS_KERNEL = ([
    "S2R R0, SR_TID.X", "ISETP.GE.AND P0, PT, R0, 0x80, PT", "@P0 BRA `(consumers)",
    "producer:", "SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR4+0x10], R2", "@!P1 BRA `(wait_free)", "slot_free:",
    "UTMALDG.2D [UR8], [UR10]", "UTMALDG.2D [UR9], [UR10]", "@P2 BRA `(producer)", "EXIT",
    "consumers:", "ISETP.GE.AND P5, PT, R0, 0x100, PT", "@P5 BRA `(partition2)"]
    + _consumer_loop(1) + ["BRA `(epilogue)", "partition2:"] + _consumer_loop(2)
    + ["epilogue:", "LDG.E R4, desc[UR4][R6.64]", "STG.E desc[UR4][R8.64], R56", "EXIT"]
    + _retry("wait_free", "slot_free") + _retry("wait_k1", "k_ready1") + _retry("wait_v1", "v_ready1")
    + _retry("wait_k2", "k_ready2") + _retry("wait_v2", "v_ready2") + ["pad:", "BRA `(pad)"])


def test_hot_loop_is_the_consumer_loop_not_a_retry_jumping_back():
    from magi_kernels.tools.sass import hot_loop, hot_loop_stats, parse_sass

    sass, names = _listing(_WS_KERNEL)
    instrs = parse_sass(sass)
    first = next(i for i, ins in enumerate(instrs) if ins.label == names["loop1"])
    last = first + sum(not row.endswith(":") for row in _consumer_loop(1)) - 1
    assert instrs[last].op == "BRA" and instrs[last].operands.endswith(f"({names['loop1']})")
    # Not the span from where the second partition's V retry jumps back to its own BRA (23 instructions: its PV
    # wgmma, the epilogue's LDG, the retries), though that span is shorter; of the two partitions, the first.
    assert hot_loop(instrs) == (first, last)
    st = hot_loop_stats(sass, "ttg.warp_specialize")
    # one iteration: every instruction of the body, both sides of the tanh's branch
    assert st.issued == last - first + 1 == 26 and st.mma_per_iter == 2
    assert st.mma_kind == "IGMMA.64x128x32.S32.S8.S8+QGMMA.64x128x32" and st.loads == () and st.wgmma_wait == 0
    assert (st.first_addr, st.last_addr) == (instrs[first].addr, instrs[last].addr)

    from magi_kernels.tools.sass import loops

    # The retries' "BRA back" lands inside a loop from outside it: not a loop. Their own retry is one, and so is
    # the padding's branch to itself.
    spans = loops(instrs)
    heads = ["producer", "loop1", "loop2", "wait_free", "wait_k1", "wait_v1", "wait_k2", "wait_v2", "pad"]
    assert sorted(instrs[i].label for i, _ in spans) == sorted(names[h] for h in heads)
    assert all(instrs[j].op == "BRA" and instrs[j].operands.endswith(f"({instrs[i].label})") for i, j in spans)
    with_mma = [(i, j) for i, j in spans if any(x.op.endswith("MMA") for x in instrs[i:j + 1])]
    assert len(with_mma) == 2 and with_mma[0] == (first, last)
    # A listing sliced after the first partition's loop (how the last such loop is found) still has the second.
    i2, j2 = with_mma[1]
    assert hot_loop(instrs[last + 1:]) == (i2 - last - 1, j2 - last - 1) and j2 - i2 == last - first


def test_loops_that_exit_through_a_call():
    """sm_80/89 form: ptxas leaves a loop through a guarded CALL.REL.NOINC to the code after it, just before the
    unguarded backward BRA; the single-pass forward's FULL loop comes first, then its PARTIAL loop."""
    from magi_kernels.tools.sass import hot_loop, loops, parse_sass

    sass, names = _listing([
        "S2R R0, SR_TID.X", "full:", "LDGSTS.E.BYPASS.128 [R37], [R22.64]", "HMMA.16816.F32.BF16 R8, R12, R16, R8",
        "@!P0 CALL.REL.NOINC `(full_done)", "BRA `(full)", "full_done:", "ISETP.GE.AND P1, PT, R0, R2, PT",
        "partial:", "LDGSTS.E.BYPASS.128 [R37], [R22.64]", "VIMNMX R3, R3, R4, PT",
        "HMMA.16816.F32.BF16 R8, R12, R16, R8", "@!P1 CALL.REL.NOINC `(partial_done)", "BRA `(partial)",
        "partial_done:", "EXIT"])
    instrs = parse_sass(sass)
    assert instrs[3].op == "CALL" and instrs[3].guard == "@!P0"
    assert loops(instrs) == [(1, 4), (6, 10)] and hot_loop(instrs) == (1, 4)
    assert hot_loop(instrs[5:]) == (1, 5)  # the PARTIAL loop, the last one
