"""Time and memory of one layout (cp x pp x window x KV offload) on a cluster, and the layout search.

Time model (all terms per video; every assumption is a field of :class:`Efficiency` or a constant
documented in ``docs/planner.md``):

- compute: FLOPs on one rank / (datasheet peak of the precision x efficiency), per precision for the
  linears (fp8 / bf16 / fp32) and bf16 for attention, whose self-attention part is scaled by the tile
  efficiency of the block-sparse plan (128 x 128 tiles: boundary tiles are computed whole); Ulysses CP
  splits tokens (linears) and heads (attention) ``cp`` ways;
- memory-bound kernels (norms, rope, activations, casts): bytes they move / (HBM x efficiency);
- Ulysses all-to-all (q, kv, out per layer) and the pipeline sends: not overlapped with compute
  (MAGI-1 waits on each all-to-all; ``ulysses_overlap_degree`` 1);
- pipeline parallelism with one video: the stages run one after the other (MAGI-1 overlaps stages only
  across several prompts), so pp saves memory, not time;
- KV offload: the cache slice each layer reads is copied host -> device on the critical path;
- VAE decode of each finished chunk: not overlapped with denoising, tiles spread over the cp ranks;
- T5 once, fp32, on a GPU when it fits next to the DiT, otherwise on the CPU.

The physical floor: every FLOP of the video (DiT, VAE, T5) at the datasheet peak of its precision on
all GPUs of the cluster at once, no communication, no memory-bound time.
"""

from __future__ import annotations

import dataclasses
import math

from magi_model.config import MagiConfig, tokens_per_chunk
from magi_model.hardware import GIB, Cluster, read_json_object
from magi_model.plan import memory as mem
from magi_model.plan.workload import (PRECISIONS, Forward, Workload, build_workload, cross_attention_cells,
                                      forward_flops, self_attention_cells, self_attention_tile_efficiency)


@dataclasses.dataclass(frozen=True)
class Efficiency:
    """Fractions of datasheet peaks the prediction assumes (replaced by a GPU calibration file)."""

    gemm_bf16: float = 0.70
    gemm_fp8: float = 0.60
    gemm_fp32: float = 0.80
    attention: float = 0.50
    hbm: float = 0.70
    link: float = 0.70  # NCCL all-to-all / send over NVLink or peer-to-peer PCIe
    host_staged: float = 0.35  # collectives without peer-to-peer: fraction of the per-direction PCIe rate
    host_copy: float = 0.80  # pinned host <-> device copies (KV offload)
    cpu_tflops: float = 1.0  # fp32 TFLOPS of the host CPU (T5 on the CPU)
    source: str = "default assumptions (docs/planner.md)"

    def gemm(self, precision: str) -> float:
        return {"fp8": self.gemm_fp8, "bf16": self.gemm_bf16, "fp32": self.gemm_fp32}[precision]


# Defaults per GPU family, from public measurements of the best kernels (docs/planner.md gives the
# sources): Hopper attention ~55% (MagiAttention's block-causal kernel; FlashAttention-3 dense ~65%),
# fp8 GEMM ~65% (DeepGEMM); Ada attention ~85-90% (FlashAttention-2 via SDPA), bf16 GEMM ~85%.
FAMILY_EFFICIENCY = {
    "hopper": {"gemm_bf16": 0.72, "gemm_fp8": 0.65, "attention": 0.55},
    "ada": {"gemm_bf16": 0.85, "gemm_fp8": 0.75, "attention": 0.85},
    "ampere": {"gemm_bf16": 0.75, "attention": 0.60},
}


def default_efficiency(gpu) -> Efficiency:
    fam = FAMILY_EFFICIENCY.get(getattr(gpu, "family", ""), {})
    return dataclasses.replace(Efficiency(), **fam,
                               source=f"default assumptions for {gpu.family or 'an unknown'} GPUs (docs/planner.md)")


CALIBRATION_KEYS = ("gemm_bf16", "gemm_fp8", "gemm_fp32", "attention", "hbm", "link")


def load_calibration(paths, gpu_name: str, base: Efficiency | None = None) -> Efficiency:
    """Efficiencies measured by our benchmarks on a GPU (``bench_gemm.py --json``, ``bench_attention.py
    --json``): each file's ``calibration`` block. Files from a CPU run carry none and are rejected."""
    base = Efficiency() if base is None else base
    values, sources = {}, []
    for path in paths or ():
        cal = read_json_object(path, "calibration", ValueError).get("calibration")
        if not cal:
            raise ValueError(f"plan: calibration file {path!r} has no 'calibration' block (only benchmark runs "
                             f"on a GPU write one; CPU runs never do)")
        if not isinstance(cal.get("gpu"), str) or not cal["gpu"]:
            raise ValueError(f"plan: calibration file {path!r}: 'calibration.gpu' must name the GPU it was measured on")
        for k in CALIBRATION_KEYS:
            if k in cal:
                v = cal[k]
                if not isinstance(v, (int, float)) or not 0 < v <= 1.2:
                    raise ValueError(f"plan: calibration file {path!r}: {k} must be a fraction of peak in (0, 1.2], "
                                     f"got {v!r}")
                values[k] = float(v)
        sources.append(f"{path} (measured on {cal['gpu']})")
    if not values:
        return base
    return dataclasses.replace(base, **values, source="calibration: " + "; ".join(sources) + f"; target {gpu_name}")


@dataclasses.dataclass(frozen=True)
class Layout:
    cp: int
    pp: int
    window: int
    kv_offload: bool

    @property
    def ranks(self) -> int:
        return self.cp * self.pp

    @property
    def label(self) -> str:
        return f"cp{self.cp} pp{self.pp} w{self.window}{' offload' if self.kv_offload else ''}"


@dataclasses.dataclass
class LayoutResult:
    layout: Layout
    fits: bool
    predicted_s: float
    floor_s: float
    time_s: dict  # term -> seconds per video
    memory: dict  # term -> bytes per rank (the largest stage)
    peak_bytes: int
    capacity_bytes: int
    peak_phase: str
    activation_phase: str
    t5_on_gpu: bool
    comm_bytes_per_layer: dict  # for the largest forward: ulysses / ring / pp bytes per rank
    forwards: int
    why_not: str = ""
    attention_tile_efficiency: float = 1.0  # visited-tile cells / visible cells, largest forward

    @property
    def ratio(self) -> float:
        return self.predicted_s / self.floor_s if self.floor_s else math.inf

    def to_json(self) -> dict:
        return {"layout": dataclasses.asdict(self.layout), "label": self.layout.label, "fits": self.fits,
                "why_not": self.why_not, "predicted_s": self.predicted_s, "floor_s": self.floor_s,
                "ratio_to_floor": self.ratio, "time_s": self.time_s, "memory_bytes": self.memory,
                "peak_bytes": self.peak_bytes, "capacity_bytes": self.capacity_bytes, "peak_phase": self.peak_phase,
                "activation_phase": self.activation_phase, "t5_on_gpu": self.t5_on_gpu,
                "comm_bytes_per_layer": self.comm_bytes_per_layer, "forwards": self.forwards,
                "attention_tile_efficiency": self.attention_tile_efficiency}


def valid_cp(cfg: MagiConfig, cp: int) -> str:
    """Why Ulysses cannot use ``cp`` ranks ('' if it can)."""
    m = cfg.model
    if m.num_attention_heads % cp:
        return f"cp {cp} must divide the {m.num_attention_heads} attention heads"
    if not (m.num_query_groups % cp == 0 or cp % m.num_query_groups == 0):
        return f"cp {cp} must divide or be a multiple of the {m.num_query_groups} KV groups"
    return ""


def valid_pp(cfg: MagiConfig, pp: int) -> str:
    L = cfg.model.num_layers
    return "" if 1 <= pp <= L else f"pp {pp} must be between 1 and the {L} layers"


def _mem_bound_bytes_per_token_layer(cfg: MagiConfig) -> int:
    """Bytes per token per layer moved by the non-GEMM kernels (read + write): two pre-norms, q/k norm + rope,
    the KV concat, the cross-attention q norm, the [core, cross] interleave, two gated post-norms and the MLP
    activation."""
    m = cfg.model
    a = m.params_dtype.itemsize
    H, nh, ng, d, Fh = m.hidden_size, m.num_attention_heads, m.num_query_groups, m.kv_channels, m.ffn_hidden_size
    act = (2 * Fh + Fh) if m.gated_linear_unit else 2 * Fh
    return a * (2 * 2 * H + 2 * (nh + ng) * d + 2 * 2 * ng * d + 2 * nh * d + 2 * 2 * nh * d + 2 * 3 * H + act)


class Planner:
    """Evaluates layouts of one config on one cluster."""

    def __init__(self, cfg: MagiConfig, cluster: Cluster, *, efficiency: Efficiency | None = None,
                 implementation: str = "magi1", mode: str = "t2v", text_tokens: int = 64, tf32: bool = False):
        if implementation not in mem.IMPLEMENTATIONS:
            raise ValueError(f"plan: argument 'implementation' must be one of {mem.IMPLEMENTATIONS}, "
                             f"got {implementation!r}")
        if cfg.runtime.video_size_h is None or cfg.runtime.video_size_w is None:
            raise ValueError("plan: the config needs runtime_config.video_size_h / video_size_w")
        self.cfg, self.cluster = cfg, cluster
        self.eff = default_efficiency(cluster.gpu) if efficiency is None else efficiency
        self.implementation, self.mode, self.text_tokens = implementation, mode, text_tokens
        self.tf32 = tf32  # fp32 GEMMs on TF32 tensor cores (torch.backends.cuda.matmul.allow_tf32 = True)
        self._workloads: dict[int, Workload] = {}
        self._tile_eff: dict[Forward, float] = {}

    # -------------------------------------------------------------------------------------------
    def config_for_window(self, window: int) -> MagiConfig:
        r = self.cfg.runtime
        return MagiConfig(self.cfg.model, dataclasses.replace(r, window_size=window), self.cfg.engine, self.cfg.source)

    def workload(self, window: int) -> Workload:
        if window not in self._workloads:
            cfg = self.config_for_window(window)
            cfg.validate()
            self._workloads[window] = build_workload(cfg, mode=self.mode, text_tokens=self.text_tokens)
        return self._workloads[window]

    def windows(self) -> list[int]:
        """Windows the search tries: divisors of num_steps up to the config's window."""
        r = self.cfg.runtime
        return [w for w in range(1, r.window_size + 1) if r.num_steps % w == 0]

    def gemm_rate(self, precision: str) -> tuple[float, float]:
        """(datasheet peak FLOP/s, assumed efficiency) of GEMMs in ``precision`` (fp32 may run as TF32)."""
        g, eff = self.cluster.gpu, self.eff
        if precision == "fp32" and self.tf32:
            return g.peak_tflops("tf32") * 1e12, eff.gemm_bf16
        return g.peak_tflops(precision) * 1e12, eff.gemm(precision)

    def floor_s(self, wl: Workload) -> float:
        g, n = self.cluster.gpu, self.cluster.count
        s = sum((wl.flops.linear[p] + wl.flops.attention[p]) / self.gemm_rate(p)[0] for p in PRECISIONS
                if wl.flops.linear[p] + wl.flops.attention[p])
        s += wl.vae_flops / (g.bf16_tflops * 1e12) + wl.t5_flops / self.gemm_rate("fp32")[0]
        return s / n

    # -------------------------------------------------------------------------------------------
    def evaluate(self, layout: Layout) -> LayoutResult:
        cfg, g, eff = self.cfg, self.cluster.gpu, self.eff
        m = cfg.model
        cp, pp = layout.cp, layout.pp
        wl = self.workload(layout.window)
        why = valid_cp(cfg, cp) or valid_pp(cfg, pp)
        if layout.ranks > self.cluster.count:
            why = why or f"cp x pp = {layout.ranks} > {self.cluster.count} GPUs"
        if cfg.engine.fp8_quant and g.fp8_tflops is None:
            why = why or f"{g.name} has no fp8 tensor cores"
        a = m.params_dtype.itemsize
        n = tokens_per_chunk(cfg)
        H = m.hidden_size
        ngr = mem.kv_heads_per_rank(cfg, cp)

        # --- time
        t = dict.fromkeys(("linear", "attention", "memory_bound", "communication", "kv_offload", "vae", "t5"), 0.0)
        comm_largest, tile_eff = {}, 1.0
        if not why:
            for fwd, count in wl.distinct_forwards.items():
                for k, v in self.forward_time_s(fwd, layout).items():
                    t[k] += count * v
                if fwd.tokens == wl.max_tokens:
                    comm_largest = self.comm_bytes_per_layer(fwd, cp, pp)
                    tile_eff = self.tile_efficiency(fwd)
        vae_ranks = cp
        t["vae"] = wl.vae_flops / vae_ranks / (g.bf16_tflops * 1e12 * eff.gemm_bf16)

        # --- memory per rank (largest stage)
        W = mem.weight_bytes(cfg, pp)
        capacity = wl.chunks * n
        kv_gpu = 0 if layout.kv_offload else mem.kv_cache_bytes(cfg, capacity, cp=cp, pp=pp)
        peaks = [(mem.activation_peak(cfg, fwd, cp=cp, implementation=self.implementation), fwd)
                 for fwd in wl.distinct_forwards]
        act_phase, act_fwd = max(peaks, key=lambda pf: pf[0].bytes)
        act = act_phase.bytes
        if layout.kv_offload:  # the host copy of the slice a layer reads sits next to the concatenated K/V
            act += max(f.cache_read_tokens * f.batch for f in wl.distinct_forwards) * ngr * 2 * m.kv_channels * a
        r = cfg.runtime
        h8, w8 = r.video_size_h // 8, r.video_size_w // 8
        state = (wl.latent_frames * m.latent_channels * h8 * w8 * 4 * 3  # latent, velocity, guidance mix (fp32)
                 + 2 * wl.chunks * m.caption_max_length * m.caption_channels * 4)  # captions, both branches
        buffers = (mem.NCCL_BUFFER_BYTES if layout.ranks > 1 else 0) + (
            2 * math.ceil(wl.max_tokens / cp) * H * a if pp > 1 else 0)
        vae_w = mem.vae_weight_bytes()
        vae_t = mem.vae_decode_transient_bytes(r.chunk_width, h8, w8)
        frag = int(mem.FRAGMENTATION * act)
        memory = {"weights": W, "kv_cache": kv_gpu, "activations": act, "allocator_slack": frag,
                  "collective_buffers": buffers, "pipeline_state": state, "vae_weights": vae_w,
                  "vae_decode": vae_t, "cuda_context": mem.CUDA_CONTEXT_BYTES, "t5_weights": 0,
                  "kv_cache_host": mem.kv_cache_bytes(cfg, capacity, cp=cp, pp=pp) if layout.kv_offload else 0}
        denoise = W + kv_gpu + act + frag + buffers + state + vae_w + mem.CUDA_CONTEXT_BYTES
        decode = W + kv_gpu + buffers + state + vae_w + vae_t + mem.CUDA_CONTEXT_BYTES
        t5_w = mem.t5_weight_bytes()
        t5_phase = W + vae_w + t5_w + mem.CUDA_CONTEXT_BYTES + buffers
        t5_on_gpu = r.t5_device != "cpu" and t5_phase <= g.memory_bytes
        if t5_on_gpu:
            memory["t5_weights"] = t5_w
            peak, e = self.gemm_rate("fp32")
            t["t5"] = wl.t5_flops / (peak * e)
        else:
            t["t5"] = wl.t5_flops / (eff.cpu_tflops * 1e12)
        phases = {"denoise": denoise, "vae decode": decode}
        if t5_on_gpu:
            phases["t5"] = t5_phase
        peak_phase = max(phases, key=phases.get)
        peak = phases[peak_phase]
        fits = not why and peak <= g.memory_bytes
        if not why and not fits:
            why = (f"needs {peak / GIB:.1f} GiB per rank ({peak_phase}), {g.name} has {g.memory_gib:.1f} GiB")
        predicted = sum(t.values())
        return LayoutResult(layout, fits, predicted, self.floor_s(wl), t, memory, int(peak), g.memory_bytes,
                            peak_phase, f"{act_phase.name} (forward of {act_fwd.tokens} tokens)", t5_on_gpu,
                            comm_largest, len(wl.forwards), why, tile_eff)

    def forward_time_s(self, fwd: Forward, layout: Layout) -> dict:
        """Predicted seconds of one DiT forward by term (all pipeline stages, one after the other)."""
        cfg, g, eff = self.cfg, self.cluster.gpu, self.eff
        m = cfg.model
        cp = layout.cp
        t = dict.fromkeys(("linear", "attention", "memory_bound", "communication", "kv_offload"), 0.0)
        f = forward_flops(cfg, fwd)
        for p in PRECISIONS:
            if f.linear[p]:
                peak, e = self.gemm_rate(p)
                t["linear"] += f.linear[p] / cp / (peak * e)
        # Attention kernels also compute the masked part of boundary tiles (the planner's tile efficiency).
        per_cell = 4 * m.num_attention_heads * m.kv_channels * m.num_layers
        cells = self_attention_cells(fwd) * self.tile_efficiency(fwd) + cross_attention_cells(fwd)
        t["attention"] = per_cell * cells / cp / (g.bf16_tflops * 1e12 * eff.attention)
        tl = math.ceil(fwd.tokens / cp)
        t["memory_bound"] = tl * m.num_layers * _mem_bound_bytes_per_token_layer(cfg) / (g.hbm_gbps * 1e9 * eff.hbm)
        comm = self.comm_bytes_per_layer(fwd, cp, layout.pp)
        link = g.link_gbps * 1e9 * (eff.link if g.p2p else eff.host_staged)
        t["communication"] = (comm["ulysses"] * m.num_layers + comm["pp_per_forward"]) / link
        if layout.kv_offload:
            moved = ((fwd.cache_read_tokens + fwd.cache_write_tokens) * fwd.batch * mem.kv_heads_per_rank(cfg, cp)
                     * 2 * m.kv_channels * m.params_dtype.itemsize)
            t["kv_offload"] = moved * m.num_layers / (g.host_gbps * 1e9 * eff.host_copy)
        return t

    def tile_efficiency(self, fwd: Forward) -> float:
        if fwd not in self._tile_eff:
            self._tile_eff[fwd] = self_attention_tile_efficiency(fwd)
        return self._tile_eff[fwd]

    def comm_bytes_per_layer(self, fwd: Forward, cp: int, pp: int) -> dict:
        """Bytes one rank sends per layer (Ulysses all-to-all, or a ring CP alternative) and per forward (pp)."""
        m = self.cfg.model
        a = m.params_dtype.itemsize
        nh, ng, d = m.num_attention_heads, m.num_query_groups, m.kv_channels
        tl = math.ceil(fwd.tokens / cp)
        ng_sent = max(ng, cp)  # KV heads are repeated up to cp before the all-to-all when cp > ng
        frac = (cp - 1) / cp
        ulysses = frac * tl * (nh * d + ng_sent * 2 * d + nh * d) * a if cp > 1 else 0
        keys_local = math.ceil(fwd.batch * (fwd.cache_read_tokens + fwd.chunks * fwd.chunk_tokens) / cp)
        ring = (cp - 1) * keys_local * ng * 2 * d * a if cp > 1 else 0
        pp_bytes = (pp - 1) * tl * m.hidden_size * a + (tl * m.latent_channels * m.patch_size ** 2 * 4 if pp > 1 else 0)
        return {"ulysses": int(ulysses), "ring_alternative": int(ring), "pp_per_forward": int(pp_bytes)}

    # -------------------------------------------------------------------------------------------
    def layouts(self, *, cp: int | None = None, pp: int | None = None, window: int | None = None,
                kv_offload: bool | None = None) -> list[Layout]:
        n = self.cluster.count
        cps = [cp] if cp else [c for c in range(1, n + 1) if n % c == 0 and not valid_cp(self.cfg, c)]
        pps = [pp] if pp else [p for p in range(1, n + 1) if n % p == 0 and not valid_pp(self.cfg, p)]
        wins = [window] if window else self.windows()
        offs = [kv_offload] if kv_offload is not None else [False, True]
        return [Layout(c, p, w, o) for c in cps for p in pps for w in wins for o in offs if c * p <= n]

    def search(self, **fixed) -> list[LayoutResult]:
        """Every layout evaluated; fitting ones first, each group by predicted time."""
        res = [self.evaluate(lay) for lay in self.layouts(**fixed)]
        return sorted(res, key=lambda r: (not r.fits, r.predicted_s))


__all__ = ["Efficiency", "default_efficiency", "FAMILY_EFFICIENCY", "load_calibration", "Layout", "LayoutResult", "Planner", "valid_cp", "valid_pp",
           "CALIBRATION_KEYS"]
