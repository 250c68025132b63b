"""8-bit flex attention (flex_attn_fp8_func): accuracy against bf16 and fp32 attention, error budget, static
SASS cost, and GPU timing.

    python benchmarks/bench_fp8_attention.py                  # accuracy (CPU: torch emulation of the kernel)
    python benchmarks/bench_fp8_attention.py --sass           # hot-loop SASS, vs the bf16 kernel (no GPU needed)

Accuracy cases: (a) random normal q/k/v; (b) DiT-like: outlier channels in q and k and a large per-channel
mean offset in k; (c) q/k/v captured from the tiny MAGI-1 DiT (random weights); plus the tiny DiT's end-to-end
velocity error. Both PV precisions are reported: "fp8" (int8 QK, e4m3 P/V, the default) and "fp8/pv16"
(``pv_precision="fp16"``). Metrics against float64 attention: cosine similarity and relative L2 of the output,
with the targets (cosine >= 0.999, rel L2 <= 3%); the bf16 and fp32 paths' numbers are printed alongside. The
error budget line of each case reruns the emulation with a single operand rounded (``exact=`` everything
else), so each term is that quantization's error alone; the line after it is the emulation with one K scale per
k tile instead of per key (``k_scale="block"``, the alternative docs/fp8_attention.md weighs). On a CPU the
quantized numbers come from the torch
emulation (magi_kernels/reference/flex_attn_fp8.py), which the test suite checks equals the Triton kernels run
in the interpreter; timings are taken only on a CUDA device (otherwise none are printed).

``--sass`` compiles the shipped forward (each PV precision; on sm_90 its warp-specialized FULL pass) and the
shipped bf16 flex_attn forward (on sm_90 its warp-specialized FULL pass, on sm_89 its single pass; each at its own
tile) for sm_89 and sm_90, finds the FULL-tile loop (the innermost loop holding tensor-core instructions) in the
SASS and prints its issued instructions per 1000 MMA FLOPs of one warp (magi_kernels.tools.sass), and their
ratio (ours / bf16; the target is <= 0.6, docs/fp8_attention.md). These are static counts, not timings.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import tempfile

import torch

MMA_OPS = ("HGMMA", "QGMMA", "IGMMA", "HMMA", "QMMA", "IMMA")
TARGET_COS, TARGET_REL_L2 = 0.999, 0.03


def _last_mma_loop(instrs) -> tuple[int, int] | None:
    """(first, last) instruction indices of the last innermost loop holding tensor-core instructions: the
    PARTIAL-tile loop of a single-pass forward (it follows the FULL one), the only one of a PARTIAL pass."""
    from magi_kernels.tools.sass import hot_loop as innermost

    found, start = None, 0
    while (span := innermost(instrs[start:])) is not None:  # no loop with an MMA ends after the last one found
        found = (start + span[0], start + span[1])
        start = found[1] + 1
    return found


def hot_loop(sass: str, last: bool = False) -> dict:
    """The innermost loop holding tensor-core instructions (magi_kernels.tools.sass), or with ``last`` the last
    such loop (``_last_mma_loop``): issued instructions (NOP excluded), tensor-core instructions by kind (int8
    ones, IMMA / IGMMA, included), and issued instructions per 1000 MMA FLOPs of one warp (a wgmma's FLOPs are
    shared by the four warps of its warpgroup)."""
    from magi_kernels.tools.sass import hot_loop as loop_span
    from magi_kernels.tools.sass import mma_flops_per_warp, parse_sass

    instrs = parse_sass(sass)
    span = _last_mma_loop(instrs) if last else loop_span(instrs)
    if span is None:
        raise RuntimeError("no loop with tensor-core instructions found")
    body = [x for x in instrs[span[0]:span[1] + 1] if x.op != "NOP"]
    ops = [x.op for x in body]
    kinds = {k: ops.count(k) for k in MMA_OPS if k in ops}
    flops = sum(mma_flops_per_warp(x) for x in body if x.op in MMA_OPS)
    return {"instructions": len(body), "mma": sum(kinds.values()),
            "mma_kind": " + ".join(f"{n} {k}" for k, n in kinds.items()),
            "per_kflop": 1000.0 * len(body) / flops,
            "loads": sorted({x.op for x in body if x.op in ("UTMALDG", "LDGSTS", "LDG")})}


def _compile(cfg, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from magi_kernels.kernels.triton.aot import resolve_kernel
    from magi_kernels.tools.aot_check import _tool

    k = triton.compile(ASTSource(fn=resolve_kernel(cfg), signature=dict(cfg.signature),
                                 constexprs=dict(cfg.constexprs), attrs=cfg.attrs()),
                       target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        sass = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
    return sass, k.asm["ttgir"]


def _loop_of(cfg, arch: int, last: bool = False) -> dict:
    """hot_loop of a compiled config, plus its label, whether the kernel is warp-specialized (a
    ttg.warp_specialize region in its TTGIR) and whether it spills (STL / LDL anywhere)."""
    from magi_kernels.tools.sass import parse_sass

    sass, ttgir = _compile(cfg, arch)
    spills = sum(x.op in ("STL", "LDL") for x in parse_sass(sass))
    return dict(hot_loop(sass, last), config=cfg.config, warp_specialized="ttg.warp_specialize" in ttgir,
                spills=spills)


def fp8_loop(arch: int, d: int, pv: str) -> dict:
    """hot_loop of the shipped forward's FULL-tile pass (bf16 inputs, no softcap) for (arch, head_dim,
    pv_precision): the single pass on sm_89, the warp-specialized FULL pass (PASS 1) on sm_90."""
    from magi_kernels.kernels.triton import flex_attn_fp8 as fp8

    full = next(c for c in fp8.select_configs(torch.bfloat16, d, False, arch, pv) if c.constexprs.get("PASS") in (0, 1))
    return _loop_of(full, arch)


def partial_loop(arch: int, d: int, pv: str, softcap: bool = False) -> dict:
    """The shipped forward's PARTIAL-tile loop (bf16 inputs) for (arch, head_dim, pv_precision): the loop of the
    PARTIAL pass (PASS 2) on sm_90, the single pass's second loop on sm_89. One iteration is one bound entry
    (a 128-key step on sm_90)."""
    from magi_kernels.kernels.triton import flex_attn_fp8 as fp8

    cfg = [c for c in fp8.select_configs(torch.bfloat16, d, softcap, arch, pv) if c.constexprs.get("PASS") is not None]
    return _loop_of(cfg[-1], arch, last=True)


def bf16_loop(arch: int, d: int) -> dict:
    """hot_loop of the shipped bf16 flex_attn forward's FULL-tile pass (its first launch: the single pass on sm_89,
    the warp-specialized FULL pass on sm_90), at that kernel's own tile."""
    from magi_kernels.kernels.triton import flex_attn as bf16

    return _loop_of(bf16.forward_configs(torch.bfloat16, d, False, arch)[0], arch)


def sass_report(head_dims: tuple[int, ...] = (64, 128)) -> list[dict]:
    from magi_kernels.kernels.triton import flex_attn_fp8 as fp8

    rows, bf16_loops = [], {}
    for (arch, d, pv) in sorted(fp8.TILES):
        if d not in head_dims:
            continue
        f8 = fp8_loop(arch, d, pv)
        if (arch, d) not in bf16_loops:  # both PV precisions compare against the same bf16 loop
            bf16_loops[(arch, d)] = bf16_loop(arch, d)
        b16 = bf16_loops[(arch, d)]
        ratio = f8["per_kflop"] / b16["per_kflop"]
        rows.append({"arch": arch, "d": d, "pv": pv, "fp8": f8, "bf16": b16, "ratio": ratio})
        print(f"sm_{arch} D={d} pv={pv} [{f8['config']}]: loop {f8['instructions']} instr ({f8['mma_kind']}), "
              f"{f8['per_kflop']:.3f} instr/kFLOP; bf16 [{b16['config']}]: loop {b16['instructions']} instr "
              f"({b16['mma_kind']}), {b16['per_kflop']:.3f} instr/kFLOP; ratio {ratio:.2f} (target 0.60)", flush=True)
        part = partial_loop(arch, d, pv)
        rows[-1]["partial"] = part
        print(f"    PARTIAL loop [{part['config']}]: {part['instructions']} instr per bound entry, "
              f"{part['per_kflop']:.3f} instr/kFLOP, spilled instructions {part['spills']}", flush=True)
    return rows


# --------------------------------------------------------------------------------------------------
# Accuracy


def _metrics(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    got, want = got.double().flatten(), want.double().flatten()
    cos = float(torch.nn.functional.cosine_similarity(got, want, 0))
    return cos, float((got - want).norm() / want.norm())


# error budget: each quantization alone (the emulation with every other operand left unrounded)
BUDGET_TERMS = {"Q": ("q",), "K": ("k",), "QK": ("q", "k"), "P": ("p",), "V": ("v",), "PV": ("p", "v"),
                "all": ("q", "k", "p", "v")}


def _verdict(cos: float, rel: float) -> str:
    return "ok" if cos >= TARGET_COS and rel <= TARGET_REL_L2 else "MISSED"


def _compare(name: str, q, k, v, qr, kr, ty=None) -> dict:
    from magi_kernels.ops.flex_attn import flex_attn_func
    from magi_kernels.ops.flex_attn_fp8 import TORCH_TILE, flex_attn_fp8_func
    from magi_kernels.reference.flex_attn import flex_attn_ref
    from magi_kernels.reference.flex_attn_fp8 import OPERANDS, flex_attn_fp8_ref

    o64, _ = flex_attn_ref(q, k, v, qr, kr, ty)
    bf = [x.to(torch.bfloat16) for x in (q, k, v)]
    with torch.no_grad():
        outs = {"fp8": flex_attn_fp8_func(*bf, qr, kr, ty)[0],
                "fp8/pv16": flex_attn_fp8_func(*bf, qr, kr, ty, pv_precision="fp16")[0],
                "bf16": flex_attn_func(*bf, qr, kr, ty)[0],
                "fp32": flex_attn_func(q.float(), k.float(), v.float(), qr, kr, ty)[0]}
    res = {"case": name}
    for label, o in outs.items():
        res[label] = _metrics(o.cpu(), o64.cpu())
    print(f"{name:34s} " + "  ".join(f"{lbl}: cos {c:.6f} relL2 {e * 100:6.3f}%"
                                        + (f" [{_verdict(c, e)}]" if lbl.startswith("fp8") else "")
                                        for lbl, (c, e) in ((lbl, res[lbl]) for lbl in outs)), flush=True)
    # The budget is taken against float64 attention of the same bf16 inputs, so it leaves out their rounding.
    o64_bf, _ = flex_attn_ref(*bf, qr, kr, ty)
    budget = {}
    for term, rounded in BUDGET_TERMS.items():
        exact = tuple(x for x in OPERANDS if x not in rounded)
        o, _ = flex_attn_fp8_ref(*bf, qr, kr, ty, block_m=TORCH_TILE[0], block_n=TORCH_TILE[1], exact=exact)
        budget[term] = _metrics(o, o64_bf.cpu())[1]
    res["budget"] = budget
    print(f"{'':34s} error budget (rel L2, one quantization alone, vs float64 on the bf16 inputs): "
          + ", ".join(f"{t} {e * 100:.2f}%" for t, e in budget.items()), flush=True)
    # The alternative K granularity (one scale per k tile, folded into the row factor), output rounded to the
    # input dtype like the op's, against the same float64 reference as the shipped rows above.
    res["k_block"] = {pv: _metrics(flex_attn_fp8_ref(*bf, qr, kr, ty, block_m=TORCH_TILE[0], block_n=TORCH_TILE[1],
                                                     pv_precision=pv, k_scale="block")[0].to(torch.bfloat16),
                                   o64.cpu())
                      for pv in ("e4m3", "fp16")}
    print(f"{'':34s} per-k-tile K scale (not shipped): "
          + "  ".join(f"{lbl}: cos {c:.6f} relL2 {e * 100:6.3f}%"
                      for lbl, (c, e) in zip(("fp8", "fp8/pv16"), res["k_block"].values())), flush=True)
    return res


def _block_causal(t: int, chunk: int, device):
    n = -(-t // chunk)
    qr = torch.tensor([[i * chunk, min((i + 1) * chunk, t)] for i in range(n)], dtype=torch.int32, device=device)
    kr = torch.tensor([[0, min((i + 1) * chunk, t)] for i in range(n)], dtype=torch.int32, device=device)
    return qr, kr


def accuracy(device: str, tokens: int, heads: int, d: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    qr, kr = _block_causal(tokens, tokens // 4, device)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    q, k, v = rnd(tokens, heads, d), rnd(tokens, heads, d), rnd(tokens, heads, d)
    out.append(_compare("(a) random normal, block-causal", q, k, v, qr, kr))
    # (b) outlier channels in q and k (x10 on 4 channels) and a per-channel k offset of ~5 sigma
    q, k = q.clone(), k.clone()
    q[..., :4] *= 10.0
    k[..., :4] *= 10.0
    k += 5.0 * rnd(1, heads, d)
    out.append(_compare("(b) DiT-like outliers + k offset", q, k, v, qr, kr))
    out.extend(_captured(device))
    return out


def _captured(device: str) -> list[dict]:
    """(c): q/k/v of every self-attention call of the tiny MAGI-1 DiT (random weights), via a capture hook."""
    try:
        captured = _capture_tiny_dit(device)
    except Exception as e:  # keep (a)/(b) usable if the model side moves
        print(f"(c) skipped: could not run the tiny DiT ({type(e).__name__}: {e})")
        return []
    return [_compare(f"(c) tiny DiT call {i}", *c) for i, c in enumerate(captured[:4])]


def _tiny_models(device: str):
    """The tiny MAGI-1 DiT (random weights, seed 1) in fp32 and the same weights in bf16, plus one input."""
    from magi_model import build_dit
    from magi_model.config import MagiConfig, preset_dict

    def cfg(dtype):
        d = preset_dict("tiny_random")
        d["model_config"].update(params_dtype=dtype, caption_max_length=64, caption_channels=96)
        return MagiConfig.from_dict(d)

    fp32 = build_dit(cfg("torch.float32"), device=device, seed=1)
    bf16 = build_dit(cfg("torch.bfloat16"), device=device, seed=1)
    bf16.load_state_dict(fp32.state_dict())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 18, 16, 16, generator=g)
    t = torch.rand(1, 3, generator=g)
    cap = torch.randn(1, 3, 64, 96, generator=g) * 0.5
    mask = torch.zeros(1, 3, 64)
    mask[..., :20] = 1
    return fp32, bf16, tuple(a.to(device) for a in (x, t, cap, mask))


def run_tiny_dit(model, inputs, precision: str, pv_precision: str = "e4m3") -> torch.Tensor:
    """The DiT's velocity; precision "fp8" routes its attention through flex_attn_fp8_func with pv_precision."""
    import magi_model.attention as attn

    model.attention_precision = precision
    orig = attn.flex_attn_fp8_func
    attn.flex_attn_fp8_func = functools.partial(orig, pv_precision=pv_precision)  # the model has no such knob
    try:
        with torch.no_grad():
            return model(*inputs, caption_dropout=False, key_windows=[0, 1, 2]).float().cpu()
    finally:
        attn.flex_attn_fp8_func = orig


def _capture_tiny_dit(device: str):
    import magi_model.attention as attn

    calls = []
    orig = attn.flex_attn_func

    def spy(q, k, v, q_ranges, k_ranges, *a, **kw):
        calls.append(tuple(x.detach().float().clone() for x in (q, k, v)) + (q_ranges.clone(), k_ranges.clone()))
        return orig(q, k, v, q_ranges, k_ranges, *a, **kw)

    _, bf16, inputs = _tiny_models(device)
    attn.flex_attn_func = spy
    try:
        run_tiny_dit(bf16, inputs, "default")
    finally:
        attn.flex_attn_func = orig
    return [c for c in calls if c[0].shape[-1] in (64, 128)]  # head dims the fp8 kernels serve


def end_to_end(device: str) -> dict:
    """Velocity error of the tiny DiT (bf16 weights) against the same weights in fp32: default vs fp8 attention."""
    fp32, bf16, inputs = _tiny_models(device)
    ref = run_tiny_dit(fp32, inputs, "default").double()
    runs = {"default": ("default", "e4m3"), "fp8": ("fp8", "e4m3"), "fp8/pv16": ("fp8", "fp16")}
    err = {name: float((run_tiny_dit(bf16, inputs, *how).double() - ref).norm() / ref.norm())
           for name, how in runs.items()}
    budget = 2 * err["default"] + 0.01
    print(f"tiny DiT velocity rel L2 vs fp32 model: bf16 attention {err['default'] * 100:.3f}%, "
          + ", ".join(f"{name} attention {err[name] * 100:.3f}% [{'ok' if err[name] <= budget else 'MISSED'}]"
                      for name in ("fp8", "fp8/pv16"))
          + f" (budget 2x + 1% = {budget * 100:.3f}%)")
    return err


def timing(tokens: int, heads: int, d: int) -> None:
    """GPU only: fp8 vs bf16 forward time on a block-causal mask (CUDA events, median of 20)."""
    from magi_kernels.ops.flex_attn import flex_attn_func
    from magi_kernels.ops.flex_attn_fp8 import flex_attn_fp8_func

    q, k, v = (torch.randn(tokens, heads, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qr, kr = _block_causal(tokens, tokens // 4, "cuda")
    fns = (("bf16", flex_attn_func), ("fp8", flex_attn_fp8_func),
           ("fp8/pv16", functools.partial(flex_attn_fp8_func, pv_precision="fp16")))
    for name, fn in fns:
        times = []
        for i in range(25):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn(q, k, v, qr, kr)
            b.record()
            torch.cuda.synchronize()
            if i >= 5:
                times.append(a.elapsed_time(b))
        print(f"GPU {torch.cuda.get_device_name()}: {name} forward {sorted(times)[len(times) // 2]:.3f} ms "
              f"(T={tokens}, H={heads}, D={d}, block-causal 4 chunks)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sass", action="store_true", help="static hot-loop SASS comparison (compiles; no GPU needed)")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    args = p.parse_args(argv)
    if args.sass:
        os.environ.pop("TRITON_INTERPRET", None)
        sass_report()
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        print("No GPU: accuracy only (fp8 via the torch emulation of the kernel's rounding); no timings.")
    accuracy(device, args.tokens, args.heads, args.head_dim)
    end_to_end(device)
    if device == "cuda":
        timing(args.tokens * 16, args.heads * 8, args.head_dim)
    return 0


if __name__ == "__main__":
    sys.exit(main())
