"""Throughput and memory planner for MAGI-1: will a config fit on these GPUs, with which layout, and
how many seconds per video will it take (a prediction, labelled as such).

    from magi_model.plan import plan
    p = plan("24B_distill_quant", "8x4090")           # layout search
    p = plan("24B_distill_quant", "8x4090", cp=4, pp=2)  # one layout
    p.best.fits, p.best.predicted_s, p.best.memory

Command line: ``python -m magi_model.plan --model 24B_distill_quant --gpus 8x4090`` (see ``--help``
and ``docs/planner.md`` for the model and its assumptions).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from magi_model.config import MagiConfig, load_config, preset, PRESETS
from magi_model.hardware import Cluster, parse_gpus
from magi_model.plan.layout import Efficiency, Layout, LayoutResult, Planner, default_efficiency, load_calibration
from magi_model.plan.workload import Workload


@dataclasses.dataclass
class Plan:
    """The planner's answer: every evaluated layout (fitting ones first, fastest first)."""

    model: str
    cluster: Cluster
    efficiency: Efficiency
    implementation: str
    tf32: bool
    results: list
    workload: Workload  # at the config's own window

    @property
    def fitting(self) -> list:
        return [r for r in self.results if r.fits]

    @property
    def best(self) -> LayoutResult | None:
        return self.fitting[0] if self.fitting else None

    def to_json(self) -> dict:
        wl = self.workload
        r = wl.config.runtime
        return {
            "kind": "prediction (magi_model.plan), not a measurement",
            "model": self.model, "gpus": self.cluster.label, "gpu": dataclasses.asdict(self.cluster.gpu),
            "gpu_count": self.cluster.count, "implementation": self.implementation, "tf32": self.tf32,
            "efficiency": dataclasses.asdict(self.efficiency),
            "video": {"height": r.video_size_h, "width": r.video_size_w, "frames": r.num_frames,
                      "steps": r.num_steps, "window": r.window_size, "cfg_number": r.cfg_number,
                      "distill": wl.config.engine.distill, "fp8_quant": wl.config.engine.fp8_quant, "mode": wl.mode},
            "workload": {"forwards": len(wl.forwards), "max_tokens_per_forward": wl.max_tokens,
                         "dit_linear_flops": wl.flops.linear, "dit_attention_flops": wl.flops.attention,
                         "vae_decode_flops": wl.vae_flops, "t5_flops": wl.t5_flops},
            "layouts": [res.to_json() for res in self.results],
        }


def resolve_config(model: "str | os.PathLike | MagiConfig", *, height: int | None = None, width: int | None = None,
                   frames: int | None = None, steps: int | None = None, window: int | None = None) -> MagiConfig:
    """A preset name (``24B_distill_quant``; ``4.5B`` / ``24B`` mean the base model) or a config path, with
    the video overrides applied and validated."""
    if isinstance(model, MagiConfig):
        cfg = model
    else:
        s = os.fspath(model)
        name = s + "_base" if s in ("4.5B", "24B") else s
        cfg = preset(name) if name in PRESETS else load_config(s)
    over = {k: v for k, v in (("video_size_h", height), ("video_size_w", width), ("num_frames", frames),
                               ("num_steps", steps), ("window_size", window)) if v is not None}
    if over:
        cfg = MagiConfig(cfg.model, dataclasses.replace(cfg.runtime, **over), cfg.engine, cfg.source)
        cfg.validate()
    return cfg


def plan(model, gpus: "str | Cluster", *, cp: int | None = None, pp: int | None = None, window: int | None = None,
         kv_offload: bool | None = None, height: int | None = None, width: int | None = None,
         frames: int | None = None, steps: int | None = None, hardware_file: str | None = None,
         calibration: Sequence[str] = (), implementation: str = "magi1", mode: str = "t2v",
         text_tokens: int = 64, tf32: bool = False) -> Plan:
    """Search layouts (or evaluate the one given by ``cp``/``pp``/``window``/``kv_offload``)."""
    cfg = resolve_config(model, height=height, width=width, frames=frames, steps=steps)
    cluster = gpus if isinstance(gpus, Cluster) else parse_gpus(gpus, hardware_file)
    eff = load_calibration(calibration, cluster.gpu.name, default_efficiency(cluster.gpu))
    planner = Planner(cfg, cluster, efficiency=eff, implementation=implementation, mode=mode, text_tokens=text_tokens,
                      tf32=tf32)
    if window is not None and window not in planner.windows():
        raise ValueError(f"plan: argument 'window' must divide num_steps ({cfg.runtime.num_steps}) and be <= the "
                         f"config's window_size ({cfg.runtime.window_size}), got {window}")
    results = planner.search(cp=cp, pp=pp, window=window, kv_offload=kv_offload)
    name = cfg.source or str(model)
    return Plan(name.removeprefix("preset:"), cluster, eff, implementation, tf32, results,
                planner.workload(cfg.runtime.window_size))


__all__ = ["plan", "Plan", "Planner", "Layout", "LayoutResult", "Efficiency", "resolve_config", "load_calibration"]
