"""Bandwidth microbenchmark of the fused norm ops: GB/s against the bytes that must move.

    python benchmarks/bench_norm_rope.py [--quick] [--backends cuda,triton,torch] [--csv F] [--json F]

Shapes are MAGI-1's (one 720p chunk = 21,600 tokens for 24B and 4.5B) and Wan-style hidden-scope
QK-norm. On a GPU every available backend is timed with do_bench. On a CPU only the torch path is
timed, at a reduced token count that is printed in each row, and the rows are labelled CPU; the
Triton interpreter and the SIMT emulator are correctness tools, not things worth timing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench, device_label, peak_bandwidth, print_table, write_results  # noqa: E402

import magi_kernels as mk  # noqa: E402
from magi_kernels import registry  # noqa: E402

# name -> (tokens, hq, hk, d, norm, scope, rotary_dim)
QK_SHAPES = {
    "magi1-24B 720p chunk": (21600, 48, 8, 128, "layernorm", "head", 96),
    "magi1-4.5B 720p chunk": (21600, 24, 8, 128, "layernorm", "head", 96),
    "wan-14B hidden rms": (32760, 40, 40, 128, "rmsnorm", "hidden", 128),
}
# name -> (tokens, hidden, gate rows)
GATE_SHAPES = {
    "magi1-24B post-norm": (21600, 6144, 1),
    "magi1-4.5B post-norm": (4 * 21600, 3072, 4),
}


def qk_case(tokens, hq, hk, d, norm, scope, rot, dtype, device):
    q = torch.randn(tokens, hq, d, device=device, dtype=dtype)
    k = torch.randn(tokens, hk, d, device=device, dtype=dtype)
    cos = torch.randn(tokens, rot // 2, device=device)
    sin = torch.randn(tokens, rot // 2, device=device)
    n_q = d if scope == "head" else hq * d
    n_k = d if scope == "head" else hk * d
    w_q, w_k = torch.randn(n_q, device=device), torch.randn(n_k, device=device)
    moved = 2 * (q.numel() + k.numel()) * q.element_size() + 2 * cos.numel() * 4
    kw = dict(q_weight=w_q, k_weight=w_k, norm=norm, norm_scope=scope, weight_offset=1.0, interleaved=False)
    return (lambda backend: mk.qk_norm_rope(q, k, cos, sin, backend=backend, **kw)), moved


def gate_case(tokens, hidden, g, dtype, device):
    x = torch.randn(tokens, hidden, device=device, dtype=torch.float32)  # MAGI-1's fp32 projection output
    res = torch.randn(tokens, hidden, device=device, dtype=dtype)
    gate = torch.randn(g, hidden, device=device, dtype=dtype)
    gi = (torch.arange(tokens, device=device) * g // tokens).to(torch.int32)
    w, b = torch.randn(hidden, device=device), torch.randn(hidden, device=device)
    moved = x.numel() * 4 + 2 * res.numel() * res.element_size() + gi.numel() * 4 + gate.numel() * gate.element_size()
    return (lambda backend: mk.gated_post_norm_residual(x, gate, res, w, b, gate_index=gi, preset="magi1",
                                                        backend=backend)), moved


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer shapes (CPU: 1,024 tokens)")
    ap.add_argument("--backends", default="cuda,triton,torch")
    ap.add_argument("--cpu-tokens", type=int, default=None, help="token count for CPU runs (default 4096, quick 1024)")
    ap.add_argument("--csv")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16
    cpu_tokens = args.cpu_tokens or (1024 if args.quick else 4096)
    peak = peak_bandwidth()
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    rows = []

    cases = []
    for name, (t, hq, hk, d, norm, scope, rot) in QK_SHAPES.items():
        t = t if on_gpu else cpu_tokens
        cases.append(("qk_norm_rope", name, t, qk_case(t, hq, hk, d, norm, scope, rot, dtype, device),
                      {"head_dim": d, "norm_scope": scope, "hq": hq, "hk": hk}))
        if args.quick:
            break
    for name, (t, h, g) in GATE_SHAPES.items():
        t = t if on_gpu else cpu_tokens
        cases.append(("gated_post_norm_residual", name, t, gate_case(t, h, g, dtype, device), {"hidden": h}))
        if args.quick:
            break

    for op, name, tokens, (run, moved), extra in cases:
        for backend in wanted:
            if not on_gpu and backend != "torch":
                continue  # interpreter / emulator timings are meaningless
            if registry.device_reason(backend, device) is not None:
                continue
            try:
                sec = bench(lambda: run(backend), device)
            except registry.BackendUnavailable:  # this backend's rules decline the shape
                continue
            row = {"device": device_label(), "op": op, "shape": name, "tokens": tokens, "backend": backend,
                   "us": sec * 1e6, "GB/s": moved / sec / 1e9}
            if peak:
                row["% peak"] = 100 * moved / sec / peak
            rows.append(row)

    title = f"fused norm ops, bf16, measured on {device_label()}"
    if not on_gpu:
        title += f" (torch path only, {cpu_tokens} tokens; GPU kernels are not timed on a CPU)"
    print_table(title, rows)
    write_results(rows, args.csv, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
