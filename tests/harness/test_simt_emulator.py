"""The SIMT emulator (csrc/include/magi/simt.h) that runs CUDA kernel source on the CPU: shuffles,
block reductions, builtin indices, fp16/bf16 rounding, and deadlock / misuse detection."""

import numpy as np
import pytest
import torch

from magi_kernels._ext import native

C = native()
pytestmark = pytest.mark.skipif(C is None, reason="magi_kernels._C is not built (pip install -e .)")


def shfl_model(kind, vals, arg, width, mask):
    """PTX shfl semantics: lanes split into segments of `width`; an out-of-segment source yields the
    caller's own value; lanes outside `mask` do not take part (the test kernel passes their value)."""
    out = np.array(vals, dtype=np.float32)
    for t in range(len(vals)):
        lane, base = t % 32, t - t % 32
        if not (mask >> lane) & 1:
            continue
        seg = lane & ~(width - 1)
        if kind == "idx":
            src = seg + (arg & (width - 1))
        elif kind == "up":
            src = lane - arg if lane - arg >= seg else lane
        elif kind == "down":
            src = lane + arg if lane + arg < seg + width else lane
        else:
            src = lane ^ arg if seg <= (lane ^ arg) < seg + width else lane
        out[t] = vals[base + src]
    return out


@pytest.mark.parametrize("kind", ["idx", "up", "down", "xor"])
@pytest.mark.parametrize("width", [32, 16, 8, 2])
@pytest.mark.parametrize("arg", [0, 1, 3, 5, 16])
def test_shuffles_match_ptx_semantics(kind, width, arg):
    vals = [float(v) for v in np.random.default_rng(arg * 7 + width).normal(size=96)]  # three warps
    got = np.array(C.simt.selftest_shfl(kind, vals, arg, width))
    np.testing.assert_array_equal(got, shfl_model(kind, vals, arg, width, 0xFFFFFFFF))


def test_shuffle_concrete_cases():
    vals = [float(i) for i in range(64)]
    assert C.simt.selftest_shfl("idx", vals, 0) == [0.0] * 32 + [32.0] * 32  # broadcast lane 0 per warp
    down = C.simt.selftest_shfl("down", vals, 1)
    assert down[30] == 31.0 and down[31] == 31.0 and down[63] == 63.0  # last lane keeps its own value
    up = C.simt.selftest_shfl("up", vals, 2, 8)
    assert up[8:10] == [8.0, 9.0] and up[10] == 8.0  # per 8-lane segment


def test_partial_mask_shuffle():
    # Only lanes 0..15 take part; xor 1 stays inside them.
    vals = [float(i) for i in range(32)]
    got = C.simt.selftest_shfl("xor", vals, 1, 32, 0x0000FFFF)
    np.testing.assert_array_equal(got, shfl_model("xor", vals, 1, 32, 0x0000FFFF))
    assert got[0] == 1.0 and got[20] == 20.0


@pytest.mark.parametrize("threads", [32, 96, 256, 1024])
def test_block_allreduce_matches_numpy(threads):
    rng = np.random.default_rng(threads)
    rows, cols = 5, 1000
    x = rng.normal(size=(rows, cols)).astype(np.float32)
    got = np.array(C.simt.selftest_block_sum(x.ravel().tolist(), rows, threads))
    np.testing.assert_allclose(got, x.astype(np.float64).sum(1), rtol=1e-5, atol=1e-4)


def test_builtin_indices_3d():
    grid, block = [3, 2, 2], [4, 3, 2]
    got = np.array(C.simt.selftest_indices(grid, block)).reshape(-1, 6)
    want = [(bx, by, bz, tx, ty, tz)
            for bz in range(2) for by in range(2) for bx in range(3)
            for tz in range(2) for ty in range(3) for tx in range(4)]
    np.testing.assert_array_equal(got, np.array(want))


@pytest.mark.parametrize("dtype_code,torch_dtype", [(1, torch.float16), (2, torch.bfloat16)])
def test_fp16_bf16_rounding_is_bit_exact_with_torch(dtype_code, torch_dtype):
    rng = np.random.default_rng(dtype_code)
    special = [0.0, -0.0, 1.0, 65504.0, 65519.99, 65520.0, 1e6, -1e6, 6.1e-5, 5.96e-8, 2.98e-8, 2.99e-8, 1e-8,
               3e-5, -3e-5, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 3.0e38,
               float("inf"), float("-inf")]
    bits = rng.integers(0, 2**32, size=4000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    vals = np.concatenate([np.array(special, dtype=np.float32), bits, rng.normal(size=2000).astype(np.float32)])
    vals = vals[~np.isnan(vals)]
    got = torch.tensor(C.simt.selftest_round_trip(vals.tolist(), dtype_code), dtype=torch.float32)
    want = torch.from_numpy(vals).to(torch_dtype).to(torch.float32)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    nan = C.simt.selftest_round_trip([float("nan")], dtype_code)[0]
    assert nan != nan


@pytest.mark.parametrize("which,threads,match", [
    (0, 64, r"__syncthreads.*exited"),
    (1, 64, r"divergent barrier"),
    (2, 64, r"__shfl_xor_sync.*exited"),
    (3, 48, r"only 48 threads"),
    (4, 32, r"does not include the calling lane"),
    (5, 32, r"not in mask"),
    (6, 32, r"device code threw"),
])
def test_misuse_raises(which, threads, match):
    with pytest.raises(RuntimeError, match=match):
        C.simt.selftest_broken(which, threads)
    # The emulator recovers: the next launch runs normally.
    assert C.simt.selftest_block_sum([1.0] * 64, 1, 32) == [64.0]


def test_deadlock_message_names_sites_and_threads():
    with pytest.raises(RuntimeError) as ei:
        C.simt.selftest_broken(0, 64)
    msg = str(ei.value)
    assert "block (0,0,0)" in msg and "[0..31]" in msg and "[32..63] exited" in msg and "fused_norm_simt.cpp:" in msg


def test_kernel_output_rounding_matches_torch_cast():
    """qk_norm_rope through the emulator: bf16/fp16 outputs are exactly the RNE cast of the fp32 outputs."""
    from magi_kernels import registry
    from magi_kernels.ops.qk_norm_rope import make_args

    q, k = torch.randn(7, 3, 72) * 2, torch.randn(7, 1, 72)
    ang = torch.rand(7, 20) * 6
    args = make_args(q, k, ang.cos(), ang.sin(), torch.randn(72), None, None, None, "layernorm", "head", 1.0, 1e-6,
                     40, True)
    fn = registry.implementations("qk_norm_rope")["cuda"].fn
    outs = {}
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        outs[dt] = (torch.empty(7, 3, 72, dtype=dt), torch.empty(7, 1, 72, dtype=dt))
        fn(args, *outs[dt])
    for dt in (torch.bfloat16, torch.float16):
        for o32, o in zip(outs[torch.float32], outs[dt]):
            assert torch.equal(o32.to(dt), o)


def test_params_check_names_the_field():
    p = C.QkNormRopeParams()
    p.tokens, p.q, p.k, p.q_out, p.k_out, p.hq, p.hk, p.head_dim = 1, 8, 8, 8, 8, 1, 1, 600
    assert "head_dim" in p.check()
    with pytest.raises(ValueError, match="head_dim"):
        C.simt.qk_norm_rope(p)
