"""End-to-end MAGI-1 generation: seconds per chunk-forward and per video, peak memory, GPU description,
printed next to the planner's prediction for the same layout (labelled as a prediction).

    python benchmarks/bench_e2e.py --preset tiny_distill [--json out.json]            # CPU or GPU, random weights
    python benchmarks/bench_e2e.py --config_file 24B_distill_quant.json --random_weights --frames 24
    torchrun --nproc_per_node 8 benchmarks/bench_e2e.py --config_file ... --cp_size 4 --pp_size 2

What is measured:
- time: every DiT forward (the sampler's calls, device-synchronized), the VAE decode of every finished
  chunk, and the whole video (denoising + decoding; T5 is not run: text embeddings are random);
- peak memory per rank: on CUDA ``torch.cuda.max_memory_allocated`` over the run (weights included);
- the activation peak of the first call of every distinct forward: on CUDA the rise of
  ``max_memory_allocated`` during the call, on CPU the PyTorch profiler's allocation records
  (allocations minus frees of every tensor storage; ``magi_model/plan/measure.py``), next to the
  planner's prediction for that forward;
- the GPU: name, clocks, memory, power limit via NVML (skipped without an NVIDIA driver).
The planner's predicted seconds are GPU predictions: a CPU run prints its measured times only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import gpu_description, print_table  # noqa: E402
from magi_model import schedule, vae as vae_mod  # noqa: E402
from magi_model.config import PRESETS  # noqa: E402
from magi_model.hardware import Cluster, GIB, parse_gpus, preset_for_device  # noqa: E402
from magi_model.pipeline import Captions, ChunkSampler, initial_noise  # noqa: E402
from magi_model.plan import Layout, Planner, resolve_config  # noqa: E402
from magi_model.plan.measure import peak_memory  # noqa: E402
from magi_model.plan.memory import activation_peak, kv_cache_bytes, weight_bytes  # noqa: E402
from magi_model.config import tokens_per_chunk  # noqa: E402
from magi_model.plan.workload import Forward, forward_of_call  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=PRESETS, default=None, help="(default tiny_distill)")
    src.add_argument("--config_file")
    p.add_argument("--random_weights", action="store_true", help="seeded random DiT/VAE weights (no checkpoints)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--height", type=int), p.add_argument("--width", type=int)
    p.add_argument("--frames", type=int), p.add_argument("--steps", type=int), p.add_argument("--window", type=int)
    p.add_argument("--cp_size", type=int), p.add_argument("--pp_size", type=int)
    p.add_argument("--text_tokens", type=int, default=32, help="valid caption tokens of the random prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpus", help="planner hardware for the prediction (default: this GPU's preset)")
    p.add_argument("--no_vae", action="store_true", help="skip VAE decoding")
    p.add_argument("--no_memory_profile", action="store_true",
                   help="skip the per-forward activation-peak measurement (on CPU the profiler slows those calls)")
    p.add_argument("--json", help="write the measurement (and the labelled prediction) here")
    a = p.parse_args(argv)
    if a.preset is None and a.config_file is None:
        a.preset = "tiny_distill"
    return a


class TimedModel:
    """The DiT behind ChunkSampler's model interface: times every call on the device and measures the
    activation peak of the first call of each distinct forward (on CPU with the profiler's allocation records, whose
    calls are then left out of the timing medians when other calls of that forward exist)."""

    def __init__(self, model, chunk_tokens: int, device, sync, measure_memory: bool):
        self.model, self.n, self.device_, self.sync = model, chunk_tokens, device, sync
        self.measure_memory = measure_memory
        self.videodit_blocks = model.videodit_blocks
        self.act_dtype = model.act_dtype
        self.calls: list[dict] = []
        self.seen: set = set()
        self.cuda_peak = 0  # per-call measurements reset CUDA's peak counter: keep the running maximum here

    def _note_cuda_peak(self):
        if self.device_.type == "cuda":
            self.cuda_peak = max(self.cuda_peak, torch.cuda.max_memory_allocated(self.device_))

    @property
    def device(self):
        return self.model.device

    def __call__(self, x, t, caption, caption_mask, **kw):
        fwd = forward_of_call(self.n, t, caption_mask, **kw)
        profile = self.measure_memory and fwd not in self.seen
        self.seen.add(fwd)
        call = lambda: self.model(x, t, caption, caption_mask, **kw)  # noqa: E731
        self.sync()
        self._note_cuda_peak()
        t0 = time.perf_counter()
        if profile:
            out, peak = peak_memory(call, self.device_)
        else:
            out, peak = call(), None
        self.sync()
        self._note_cuda_peak()
        self.calls.append({"forward": fwd, "seconds": time.perf_counter() - t0, "activation_peak_bytes": peak,
                           "profiled": profile and self.device_.type == "cpu"})
        return out


def build(cfg, a, device):
    """(DiT or ParallelDiT, VAE or None, layout or None)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    random = a.random_weights or a.preset is not None
    layout = None
    if world > 1 or (a.cp_size or 1) * (a.pp_size or 1) > 1:
        from magi_model.parallel.layout import init_parallel
        from magi_model.parallel.model import ParallelDiT, build_stage_dit

        layout = init_parallel(cfg, cp_size=a.cp_size, pp_size=a.pp_size)
        device = layout.device
        stage = build_stage_dit(cfg, layout, seed=a.seed if random else None,
                                checkpoint_dir=None if random else cfg.checkpoint_dir)
        model = ParallelDiT(stage, layout)
    elif random:
        from magi_model.dit import build_dit

        model = build_dit(cfg, device=device, seed=a.seed)
    else:
        from magi_model.loading import load_dit

        model = load_dit(cfg, device=device, progress=False)
    vae = None
    if not a.no_vae:
        r = cfg.runtime
        tile = r.fps // 2
        if cfg.model.num_layers <= 8 and random:  # the tiny presets' demo VAE
            vae = vae_mod.tiny_vae(a.seed, dtype=torch.float32, tile_sample_min_length=tile).to(device)
        elif random:
            vae = vae_mod.build_vae(device=device, seed=a.seed, tile_sample_min_length=tile)
        else:
            vae = vae_mod.load_vae(r.vae_pretrained, device=device, tile_sample_min_length=tile)
    return model, vae, layout


def run(cfg, model, vae, device, a) -> dict:
    r = cfg.runtime
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    base = model.model if hasattr(model, "layout") else model
    timed = TimedModel(model, tokens_per_chunk(cfg), device, sync, measure_memory=not a.no_memory_profile)
    chunks = schedule.chunk_layout(r.num_frames, chunk_width=r.chunk_width,
                                   temporal_downsample_factor=r.temporal_downsample_factor).infer_chunk_num
    captions = _captions(cfg, base, chunks, a)
    sampler = ChunkSampler(timed, cfg, captions)
    x = initial_noise(cfg, sampler.chunk_layout.latent_frames, a.seed, device)
    decode_s = []

    def on_chunk(_i, lat):
        if vae is None:
            return
        sync()
        t0 = time.perf_counter()
        vae_mod.decode_latents(vae, lat, r.scale_factor)
        sync()
        decode_s.append(time.perf_counter() - t0)

    def generate():
        sync()
        t0 = time.perf_counter()
        sampler.run(x, on_chunk=on_chunk, progress=False)
        sync()
        return time.perf_counter() - t0

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    total = generate()
    if device.type == "cuda":
        timed._note_cuda_peak()
        peak, method = timed.cuda_peak, "torch.cuda.max_memory_allocated over the run"
    else:
        peak, method = None, "not measured for the whole run on CPU (per-forward peaks: profiler allocation records)"
    kv = sum(b.nbytes for b in sampler.kv_cache.buffers if b is not None)
    params = sum(p.numel() * p.element_size() for p in base.parameters() if p.device.type != "meta")
    return {"seconds_per_video": total, "seconds_vae_decode": sum(decode_s), "vae_decode_per_chunk_s": decode_s,
            "forwards": timed.calls, "peak_memory_bytes": peak, "memory_method": method,
            "kv_cache_bytes": kv, "weight_bytes": params, "chunks": chunks}


def _captions(cfg, model, chunks: int, a) -> Captions:
    m = cfg.model
    g = torch.Generator().manual_seed(a.seed + 1)
    cond = torch.randn(chunks, m.caption_max_length, m.caption_channels, generator=g) * 0.1
    mask = torch.zeros(chunks, m.caption_max_length)
    mask[:, :a.text_tokens] = 1
    null, null_mask = model.null_caption(chunks)
    dev = model.device
    return Captions(cond.to(dev), mask.to(dev), null[0].to(dev), null_mask[0].to(dev))


def predict(cfg, a, device, layout_obj, meas) -> dict:
    """The planner on the same config and layout: memory always, times only for a GPU it knows."""
    cp = layout_obj.cp_size if layout_obj else 1
    pp = layout_obj.pp_size if layout_obj else 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    cluster = parse_gpus(a.gpus) if a.gpus else None
    if cluster is None and name and preset_for_device(name):
        cluster = Cluster(preset_for_device(name), cp * pp)
    lay = Layout(cp, pp, cfg.runtime.window_size, cfg.engine.kv_offload)
    planner = Planner(cfg, cluster or parse_gpus("1x4090"), implementation="magi_model", text_tokens=a.text_tokens)
    wl = planner.workload(cfg.runtime.window_size)
    ref_ops = device.type == "cpu"  # the ops run their torch reference on CPU
    out = {"kind": "prediction (magi_model.plan, magi_model memory model)", "layout": lay.label,
           "weight_bytes": weight_bytes(cfg, pp), "forwards": len(wl.forwards),
           "kv_cache_bytes": kv_cache_bytes(cfg, wl.chunks * tokens_per_chunk(cfg), cp=cp, pp=pp),
           "activation_peak_bytes": {}, "forward_s": {}}
    timed_gpu = cluster is not None and device.type == "cuda"
    for f in {c["forward"] for c in meas["forwards"]}:
        out["activation_peak_bytes"][_key(f)] = activation_peak(cfg, f, cp=cp, implementation="magi_model",
                                                                 reference_ops=ref_ops).bytes
        if timed_gpu:
            out["forward_s"][_key(f)] = sum(planner.forward_time_s(f, lay).values())
    if timed_gpu:
        res = planner.evaluate(lay)
        out.update(gpus=cluster.label, predicted_s=res.predicted_s, floor_s=res.floor_s, time_s=res.time_s,
                   peak_bytes_per_rank=res.peak_bytes)
    return out


def _key(f: Forward) -> str:
    wins = ",".join("all" if w is None else str(w) for w in f.key_windows)
    return f"N{f.batch} R{f.chunks} sp{f.slice_point} win[{wins}] cache{f.cache_read_tokens}"


def report(meas: dict, pred: dict, device) -> None:
    label = "GPU" if device.type == "cuda" else "CPU"
    groups: dict = {}
    for c in meas["forwards"]:
        groups.setdefault(_key(c["forward"]), []).append(c)
    rows = []
    for k, cs in groups.items():
        plain = [c["seconds"] for c in cs if not c["profiled"]] or [c["seconds"] for c in cs]
        peaks = [c["activation_peak_bytes"] for c in cs if c["activation_peak_bytes"] is not None]
        row = {"forward": k, "calls": len(cs), f"measured {label} s": statistics.median(plain)}
        if pred["forward_s"]:
            row["PREDICTED GPU s"] = pred["forward_s"].get(k)
        row[f"measured act. MiB ({label})"] = peaks[0] / 2**20 if peaks else None
        row["PREDICTED act. MiB"] = pred["activation_peak_bytes"][k] / 2**20
        rows.append(row)
    print_table(f"DiT forwards: {label} measurements next to the planner's predictions", rows)
    print(f"[{label} measured] seconds per video: {meas['seconds_per_video']:.3f} (VAE decode "
          f"{meas['seconds_vae_decode']:.3f}) for {meas['chunks']} chunks, {len(meas['forwards'])} forwards "
          f"(planner counts {pred['forwards']})")
    if "predicted_s" in pred:
        print(f"[PREDICTION, {pred['gpus']}] seconds per video: {pred['predicted_s']:.3f} "
              f"(physical floor {pred['floor_s']:.3f}); per-rank peak {pred['peak_bytes_per_rank'] / GIB:.2f} GiB")
    else:
        print("[PREDICTION] no time prediction: the planner predicts GPUs and this run is not on a known GPU")
    print(f"[{label} measured] weights {meas['weight_bytes'] / GIB:.4f} GiB (PREDICTED {pred['weight_bytes'] / GIB:.4f}), "
          f"KV cache {meas['kv_cache_bytes'] / GIB:.4f} GiB (PREDICTED {pred['kv_cache_bytes'] / GIB:.4f})")
    if meas["peak_memory_bytes"] is not None:
        print(f"[{label} measured] peak memory {meas['peak_memory_bytes'] / GIB:.3f} GiB ({meas['memory_method']})")


def main(argv=None) -> int:
    a = parse_args(argv)
    cfg = resolve_config(a.config_file or a.preset, height=a.height, width=a.width, frames=a.frames, steps=a.steps,
                         window=a.window)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    model, vae, layout = build(cfg, a, device)
    if layout is not None:
        device = layout.device
    meas = run(cfg, model, vae, device, a)
    pred = predict(cfg, a, device, layout, meas)
    rank = layout.rank if layout is not None else 0
    if rank == 0:
        report(meas, pred, device)
    if a.json:
        out = {"kind": "measurement", "device": str(device), "device_name": torch.cuda.get_device_name(device)
               if device.type == "cuda" else "cpu", "gpu": gpu_description(), "torch": torch.__version__,
               "config": cfg.to_dict(), "rank": rank, "prediction": pred,
               "measured": dict(meas, forwards=[dict(c, forward=_key(c["forward"])) for c in meas["forwards"]])}
        path = Path(a.json)
        if layout is not None and layout.world_size > 1:
            path = path.with_name(f"{path.stem}_rank{rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1, default=str))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
