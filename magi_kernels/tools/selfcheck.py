"""Self-check: run every op on every backend this machine can execute and compare with float64.

    python -m magi_kernels.tools.selfcheck [--info]

``--info`` first prints the environment report of ``python -m magi_kernels.tools.info``.

On a CPU-only machine this still exercises all three backends: ``torch`` natively, ``triton`` under
the Triton interpreter (the process re-executes itself with TRITON_INTERPRET=1), and ``cuda`` as the
CUDA kernel source compiled for the host and run by the SIMT emulator in ``magi_kernels._C.simt``.
Exits 1 if any backend disagrees with the reference.
"""

from __future__ import annotations

import os
import sys


def _maybe_reexec_for_interpreter() -> None:
    import torch

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        os.execv(sys.executable, [sys.executable, "-m", "magi_kernels.tools.selfcheck", *sys.argv[1:]])


def _cases(device):
    """(op, label, shape facts for the table, input dtype, run(backend) -> outputs, float64 reference[, bound(out, ref)])."""
    import torch

    import magi_kernels as mk
    from magi_kernels.reference import gated_post_norm_residual_ref, qk_norm_rope_ref

    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device)

    # MAGI-1's QK-norm + rope: per-head LayerNorm-1p, rotary on 96 of 128 dims, from the 3D table.
    t, h, w = 2, 3, 5
    cos, sin = mk.magi_rope_table(mk.magi_rope_bands_init(16).to(device), t, h, w)
    for dtype in (torch.float32, torch.float16):
        q, k = rnd(t * h * w, 3, 128, scale=2, shift=0.5).to(dtype), rnd(t * h * w, 1, 128).to(dtype)
        wq, wk = rnd(128, scale=0.2), rnd(128, scale=0.2)
        ref = qk_norm_rope_ref(q.double(), k.double(), cos, sin, wq, None, wk, None, norm="layernorm", norm_scope="head",
                               weight_offset=1.0, rotary_dim=96, out_dtype=torch.float64, compute_dtype=torch.float64)
        yield ("qk_norm_rope", f"MAGI-1 head LN-1p + rope96, {str(dtype)[6:]}",
               {"head_dim": 128, "norm_scope": "head", "hq": 3, "hk": 1}, dtype,
               lambda b, q=q, k=k, wq=wq, wk=wk: mk.qk_norm_rope(q, k, cos, sin, q_weight=wq, k_weight=wk,
                                                                 preset="magi1", backend=b), ref)
    # Wan-style RMSNorm over the hidden size, full rotary.
    q, k = rnd(9, 4, 64), rnd(9, 4, 64)
    ang = rnd(9, 32)
    wq, wk = rnd(256), rnd(256)
    ref = qk_norm_rope_ref(q.double(), k.double(), ang.cos(), ang.sin(), wq, None, wk, None, norm="rmsnorm",
                           norm_scope="hidden", weight_offset=0.0, rotary_dim=64, out_dtype=torch.float64,
                           compute_dtype=torch.float64)
    yield ("qk_norm_rope", "hidden RMSNorm + rope64, float32", {"head_dim": 64, "norm_scope": "hidden", "hq": 4,
                                                                 "hk": 4}, torch.float32,
           lambda b: mk.qk_norm_rope(q, k, ang.cos(), ang.sin(), q_weight=wq, k_weight=wk, norm="rmsnorm",
                                     norm_scope="hidden", weight_offset=0.0, interleaved=False, backend=b), ref)
    # MAGI-1's gated sandwich post-norm: fp32 x, bf16 gate rows per chunk, bf16 residual.
    x, res = rnd(30, 96), rnd(30, 96).bfloat16()
    gate = rnd(3, 96).bfloat16()
    gi = (torch.arange(30, device=device) // 10).to(torch.int32)
    wn, bn = rnd(96, scale=0.1), rnd(96, scale=0.1)
    ref = gated_post_norm_residual_ref(x.double(), gate.double(), res.double(), wn, bn, gi, norm="layernorm",
                                       weight_offset=1.0, out_dtype=torch.float64, compute_dtype=torch.float64)
    yield ("gated_post_norm_residual", "MAGI-1 post-norm, fp32 x / bf16 out", {"hidden": 96}, torch.float32,
           lambda b: mk.gated_post_norm_residual(x, gate, res, wn, bn, gate_index=gi, preset="magi1", backend=b), ref)

    # fp8: dynamic per-token quantization must land within half an e4m3 ulp (2^-4 relative) of x.
    xq = rnd(37, 200, scale=3.0)
    yield ("fp8_quantize", "per-token e4m3, dequantized", {"granularity": "row"}, torch.float32,
           lambda b: _dequant(*mk.fp8_quantize(xq, "row", backend=b)), xq.double(),
           lambda out, ref: 2.0**-4 * ref.abs().amax(-1, keepdim=True).max().item())
    # fp8 GEMM on e4m3-exact operands with per-row x per-column scales and a bias + GELU epilogue.
    a8, b8 = rnd(33, 160).to(torch.float8_e4m3fn), rnd(72, 160).to(torch.float8_e4m3fn)
    sa, sb = rnd(33).abs() + 0.5, rnd(72).abs() * 0.01 + 0.01
    bias = rnd(72, scale=0.1)
    ref = torch.nn.functional.gelu((a8.double() * sa.double()[:, None]) @ (b8.double() * sb.double()[:, None]).T
                                   + bias.double())
    yield ("fp8_gemm", "row x col scales, bias+GELU, bf16 out", {"m": 33, "n": 72, "k": 160}, torch.float8_e4m3fn,
           lambda b: mk.fp8_gemm(a8, b8, sa, sb, bias=bias, epilogue="gelu", backend=b), ref)
    st_a, st_b = sa[:1], sb[:1]
    ref = torch.nn.functional.gelu((a8.double() * st_a.double()) @ (b8.double() * st_b.double()).T + bias.double())
    yield ("fp8_gemm", "tensor x tensor scales, bias+GELU, fp32 out", {"m": 33, "n": 72, "k": 160},
           torch.float8_e4m3fn,
           lambda b: mk.fp8_gemm(a8, b8, st_a, st_b, bias=bias, epilogue="gelu", out_dtype=torch.float32, backend=b),
           ref)

    # Flexible attention on MAGI-1's window mask: 3 chunks of 37 tokens, windows r = 3, 2, 1, one cached chunk.
    mask = mk.Magi1WindowMask(chunk_tokens=37, kv_windows=[3, 2, 1], slice_point=1)
    qr, kr, types = mask.to_ranges(device)
    for dtype in (torch.float32, torch.float16):
        qa = rnd(mask.total_q, 4, 64).to(dtype)
        ka, va = rnd(mask.total_k, 2, 64).to(dtype), rnd(mask.total_k, 2, 64).to(dtype)
        yield ("flex_attn", f"MAGI-1 window mask, GQA 2:1, hd64, {str(dtype)[6:]}",
               {"head_dim": 64, "hq": 4, "hk": 2, "softcap": 0.0, "deterministic": False}, dtype,
               lambda b, qa=qa, ka=ka, va=va: mk.flex_attn_func(qa, ka, va, qr, kr, types, backend=b)[0],
               _dense_attention64(qa, ka, va, qr, kr))


def _dense_attention64(q, k, v, q_ranges, k_ranges):
    """float64 attention with a dense boolean mask (FULL slices): fine at self-check sizes."""
    import torch

    visible = torch.zeros(q.shape[0], k.shape[0], dtype=torch.bool)
    for (qs, qe), (ks, ke) in zip(q_ranges.tolist(), k_ranges.tolist()):
        visible[qs:qe, ks:ke] = True
    groups = q.shape[1] // k.shape[1]
    qd, kd, vd = q.double().cpu(), k.double().cpu().repeat_interleave(groups, 1), v.double().cpu().repeat_interleave(groups, 1)
    s = torch.einsum("qhd,khd->hqk", qd, kd) / q.shape[-1] ** 0.5
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", p, vd)


def _dequant(q, scale):
    return q.float() * scale


def main() -> int:
    _maybe_reexec_for_interpreter()
    if "--info" in sys.argv[1:]:  # the environment report first (see magi_kernels.tools.info)
        from magi_kernels.tools.info import collect, render

        print(render(collect()), flush=True)
    import torch
    from rich.console import Console
    from rich.table import Table

    import magi_kernels
    from magi_kernels import registry
    from magi_kernels._ext import build_info
    from magi_kernels.kernels.triton import triton_available, triton_interpreting

    console = Console(width=160)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bi = build_info()
    tver = "not installed"
    if triton_available():
        import triton

        tver = triton.__version__ + (" (interpreter)" if triton_interpreting() else "")
    console.print(f"magi-kernels {magi_kernels.__version__} | torch {torch.__version__} | triton {tver} | device: "
                  f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU (no GPU)'}")
    console.print(f"_C: {'built' if bi['native'] else 'NOT built'}; CUDA kernels: "
                  f"{'sm ' + bi['cuda_archs'] + ' (nvcc ' + bi['nvcc_version'] + ')' if bi['cuda'] else 'none'}; "
                  f"SIMT emulator: {'yes' if bi['simt'] else 'no'}")
    if device.type == "cpu":
        console.print("On CPU: 'triton' runs in the Triton interpreter and 'cuda' runs the CUDA source under the "
                      "SIMT emulator; both check correctness, not speed.")

    table = Table(title="self-check vs float64 reference")
    for col in ("op", "case", "backend", "max |err|", "bound", "result"):
        table.add_column(col)
    failures = 0
    for op, label, extra, dtype, run, ref, *custom_bound in _cases(device):
        refs = ref if isinstance(ref, tuple) else (ref,)
        for backend in [b for b in registry.BACKENDS if b in registry.implementations(op)]:
            reason = registry.device_reason(backend, device)
            if reason is not None:
                table.add_row(op, label, backend, "-", "-", f"skipped: {reason}")
                continue
            try:
                outs = run(backend)
            except registry.BackendUnavailable as e:  # declined by the backend's rules for this call
                table.add_row(op, label, backend, "-", "-", f"skipped: {str(e).split('cannot run this call: ')[-1]}")
                continue
            outs = outs if isinstance(outs, tuple) else (outs,)
            err = max((o.double().cpu() - r.cpu()).abs().max().item() for o, r in zip(outs, refs))
            if custom_bound:
                bound = custom_bound[0](outs[0], refs[0])
            else:
                # One ulp of the output dtype relative to the largest value, plus fp32 rounding noise.
                bound = max(torch.finfo(o.dtype).eps * r.abs().max().item() + 1e-5 for o, r in zip(outs, refs))
            ok = err <= bound and all(not torch.isnan(o).any() for o in outs)
            failures += not ok
            table.add_row(op, label, backend, f"{err:.2e}", f"{bound:.2e}", "[green]ok" if ok else "[red]FAIL")
    console.print(table)
    console.print("[green]all checks passed" if not failures else f"[red]{failures} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
