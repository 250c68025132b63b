"""One command to validate every op on a real GPU at production shapes.

    python benchmarks/gpu_validate.py [--backends cuda,triton] [--json F]

For each op x backend that can run on this GPU: run it, compare with the torch reference backend
(fp32 math) on the same inputs, time both with do_bench, print a pass/fail + timing table, and exit 1
if anything fails. On a machine without a GPU it says so and exits 0 without claiming anything.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench, device_label, print_table, write_results  # noqa: E402


def _qk_cases(device):
    import magi_kernels as mk

    for name, (t, hq, hk, d, norm, scope, rot) in {
        "magi1-24B 720p": (21600, 48, 8, 128, "layernorm", "head", 96),
        "wan hidden rms": (8190, 40, 40, 128, "rmsnorm", "hidden", 128),
        "hd64 interleaved": (4099, 16, 4, 64, "layernorm", "head", 64),
    }.items():
        q = torch.randn(t, hq, d, device=device, dtype=torch.bfloat16) * 2 + 0.5
        k = torch.randn(t, hk, d, device=device, dtype=torch.bfloat16)
        ang = torch.rand(t, rot // 2, device=device) * 6.28
        n_q = d if scope == "head" else hq * d
        n_k = d if scope == "head" else hk * d
        kw = dict(q_weight=torch.randn(n_q, device=device) * 0.2, k_weight=torch.randn(n_k, device=device) * 0.2,
                  norm=norm, norm_scope=scope, weight_offset=1.0, interleaved=name.endswith("interleaved"))
        info = {"head_dim": d, "norm_scope": scope, "hq": hq, "hk": hk}
        yield ("qk_norm_rope", name, info, torch.bfloat16,
               lambda b, q=q, k=k, c=torch.cos(ang), s=torch.sin(ang), kw=kw: mk.qk_norm_rope(q, k, c, s, backend=b, **kw))


def _gate_cases(device):
    import magi_kernels as mk

    for name, (t, h, g) in {"magi1-24B post-norm": (21600, 6144, 1), "magi1-4.5B 4 chunks": (86400, 3072, 4),
                            "odd hidden": (1001, 1000, 3)}.items():
        x = torch.randn(t, h, device=device)
        res = torch.randn(t, h, device=device, dtype=torch.bfloat16)
        gate = torch.randn(g, h, device=device, dtype=torch.bfloat16)
        gi = (torch.arange(t, device=device) * g // t).to(torch.int32)
        w, b = torch.randn(h, device=device) * 0.1, torch.randn(h, device=device) * 0.1
        yield ("gated_post_norm_residual", name, {"hidden": h}, torch.float32,
               lambda be, x=x, gate=gate, res=res, w=w, b=b, gi=gi:
               mk.gated_post_norm_residual(x, gate, res, w, b, gate_index=gi, preset="magi1", backend=be))


def _attn_cases(device):
    import magi_kernels as mk

    # MAGI-1-like windows (4 chunks, key windows 5/4/3/2 chunks, one cached chunk), 24B heads 48:8, hd 128;
    # chunks smaller than 720p so the torch reference (a tile walk) stays quick.
    for name, (n, hq, hk, dtype) in {"magi1 window 4x4096 bf16": (4096, 48, 8, torch.bfloat16),
                                     "magi1 window 4x2048 fp16": (2048, 24, 8, torch.float16)}.items():
        mask = mk.Magi1WindowMask(chunk_tokens=n, kv_windows=[5, 4, 3, 2], slice_point=1)
        qr, kr, types = mask.to_ranges(device)
        q = torch.randn(mask.total_q, hq, 128, device=device, dtype=dtype)
        k = torch.randn(mask.total_k, hk, 128, device=device, dtype=dtype)
        v = torch.randn(mask.total_k, hk, 128, device=device, dtype=dtype)
        yield ("flex_attn", name, {"head_dim": 128, "hq": hq, "hk": hk, "softcap": 0.0, "deterministic": False},
               dtype, lambda b, q=q, k=k, v=v, qr=qr, kr=kr, t=types: mk.flex_attn_func(q, k, v, qr, kr, t, backend=b))


def _fp8_cases(device):
    import magi_kernels as mk

    # MAGI-1 24B layer shapes at one 720p chunk (M = 21,600 tokens): linear_proj, fc1 (SwiGLU), fc2 (K = 16,384).
    for name, (m, n, k, epi, a_gran) in {"24B linear_proj row": (21600, 6144, 12288, None, "row"),
                                        "24B fc1 swiglu row": (21600, 32768, 6144, "swiglu", "row"),
                                        "24B fc2 block": (21600, 6144, 16384, None, "block1x128")}.items():
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        a8, sa = mk.fp8_quantize(x, a_gran)
        b8, sb = mk.fp8_quantize(w, "block128x128" if a_gran.startswith("block") else "row")
        yield ("fp8_gemm", name, {"m": m, "n": n, "k": k}, torch.float8_e4m3fn,
               lambda b, a8=a8, sa=sa, b8=b8, sb=sb, epi=epi: mk.fp8_gemm(a8, b8, sa, sb, epilogue=epi, backend=b))
    # MAGI-1's own fp8 numerics: per-tensor scales, fast accumulation (cuBLASLt FAST_ACCUM), fc1's shape. The
    # torch reference is exact fp32, so the tolerance covers the tensor core's shorter accumulator: the
    # accumulator model in docs/fp8.md puts its relative error near 1% at K = 16,384 (less at 6,144); elementwise
    # maxima run higher, hence 0.1. A GPU run reports the measured error next to it.
    m, n, k = 21600, 32768, 6144
    x8, sx = mk.fp8_quantize(torch.randn(m, k, device=device, dtype=torch.bfloat16), "tensor")
    w8, sw = mk.fp8_quantize(torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02, "tensor")
    yield ("fp8_gemm", "24B fc1 swiglu tensor fast_accum", {"m": m, "n": n, "k": k, "tol": 0.1}, torch.float8_e4m3fn,
           lambda b: mk.fp8_gemm(x8, w8, sx, sw, epilogue="swiglu", backend=b, fast_accum=True))


CASE_SOURCES = [_qk_cases, _gate_cases, _attn_cases, _fp8_cases]


def _max_rel_err(out, ref) -> float:
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    worst = 0.0
    for o, r in zip(outs, refs):
        o, r = o.float(), r.float()
        if torch.isnan(o).any():
            return float("inf")
        worst = max(worst, ((o - r).abs() / (r.abs() + 1e-2)).max().item())
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="cuda,triton")
    ap.add_argument("--tol", type=float, default=2e-2, help="max relative error vs the torch backend (bf16 ulp ~ 8e-3)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_validate: no CUDA GPU on this machine; nothing validated (run it on a GPU host).")
        return 0

    from magi_kernels import registry

    device = torch.device("cuda")
    rows, failed = [], False
    for source in CASE_SOURCES:
        for op, name, extra, dtype, run in source(device):
            ref = run("torch")
            t_ref = bench(lambda: run("torch"), device)
            for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
                reason = registry.device_reason(backend, device)
                if reason is not None:
                    rows.append({"op": op, "case": name, "backend": backend, "result": f"n/a ({reason})",
                                 "max rel err": "", "us": "", "torch us": t_ref * 1e6, "speedup": ""})
                    continue
                try:
                    err = _max_rel_err(run(backend), ref)
                    ok = err <= extra.get("tol", args.tol)
                    sec = bench(lambda: run(backend), device)
                except registry.BackendUnavailable as e:  # declined by the op's own checks: not a failure
                    rows.append({"op": op, "case": name, "backend": backend, "result": f"n/a ({e})",
                                 "max rel err": "", "us": "", "torch us": t_ref * 1e6, "speedup": ""})
                    continue
                except Exception as e:  # report every failure, keep validating the rest
                    ok, err, sec = False, float("nan"), float("nan")
                    print(f"{op}/{name}/{backend}: {type(e).__name__}: {e}")
                failed |= not ok
                rows.append({"op": op, "case": name, "backend": backend, "result": "PASS" if ok else "FAIL",
                             "max rel err": err, "us": sec * 1e6, "torch us": t_ref * 1e6, "speedup": t_ref / sec})
    print_table(f"gpu_validate on {device_label()} (vs the torch backend)", rows)
    write_results(rows, None, args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
