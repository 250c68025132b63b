"""Static resource check of the CUDA kernels via ptxas (no GPU needed, nvcc needed): no register
spills, registers <= 255 and static shared memory within limits on sm_89 and sm_90a."""

import json

import pytest

from magi_kernels.tools import ptxas_check

ARCHS = ("sm_89", "sm_90a")
SAMPLE = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_89'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 128 bytes smem, 360 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barv' for 'sm_89'
ptxas info    : Function properties for _Z3barv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, used 0 barriers, 356 bytes cmem[0]
"""


def test_parser_on_canned_output():
    ks = {k.mangled: k for k in ptxas_check.parse_ptxas(SAMPLE, "x.cu", "sm_89")}
    foo, bar = ks["_Z3fooPf"], ks["_Z3barv"]
    assert (foo.registers, foo.stack, foo.spill_stores, foo.spill_loads, foo.smem, foo.barriers) == (40, 8, 4, 12, 128, 1)
    assert (bar.registers, bar.spill_stores, bar.smem) == (12, 0, 0)
    assert foo.problems() and not bar.problems()


def test_without_nvcc_nothing_is_checked_and_exit_is_zero(monkeypatch, capsys):
    monkeypatch.setattr(ptxas_check, "find_nvcc", lambda: None)
    assert ptxas_check.main(["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checked"] is False and "nvcc" in report["reason"]


@pytest.fixture(scope="module")
def report():
    if ptxas_check.find_nvcc() is None:
        pytest.skip("nvcc not found (set CUDA_HOME or CUDACXX): CUDA resource usage cannot be checked")
    return ptxas_check.run(ARCHS, jobs=2)


def test_every_cuda_source_compiles(report):
    assert report["checked"], report.get("reason")
    assert not report["errors"], "\n".join(report["errors"])


def test_expected_kernels_were_found(report):
    names = {(k["arch"], k["kernel"].split("<")[0].split("::")[-1]) for k in report["kernels"]}
    for arch in ARCHS:
        for fam in ("qk_norm_rope_head_kernel", "qk_norm_rope_hidden_kernel", "gated_post_norm_kernel",
                    "fp8_static_kernel", "fp8_row_kernel", "fp8_block1x128_kernel", "fp8_block128x128_kernel"):
            assert (arch, fam) in names, f"{fam} missing on {arch}: parser or build broke"


def test_no_spills_and_limits(report):
    assert report["kernels"]
    assert not report["problems"], "\n".join(report["problems"])
    for k in report["kernels"]:
        assert k["spill_stores"] == 0 and k["spill_loads"] == 0, k
        assert k["registers"] <= ptxas_check.MAX_REGISTERS, k
        assert k["smem"] <= ptxas_check.MAX_STATIC_SMEM, k


def test_register_arrays_stay_in_registers(report):
    # A non-zero stack frame here would mean the per-thread value cache was demoted to local memory
    # (e.g. a loop over it that the compiler could not fully unroll): a silent bandwidth loss.
    offenders = [f"{k['arch']} {k['kernel']}: {k['stack']} B" for k in report["kernels"] if k["stack"]]
    assert not offenders, "\n".join(offenders)


def test_block_kernels_fit_1024_threads(report):
    # Block-per-row kernels may be launched with 1024 threads: 64K registers / 1024 = 64 per thread.
    for k in report["kernels"]:
        if "hidden_kernel" in k["kernel"] or "gated_post_norm_kernel" in k["kernel"]:
            assert k["registers"] <= 64, k
