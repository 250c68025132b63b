"""A torchrun-style rank (env:// init) of the tiny model under cp (ring layout) where one rank raises mid-forward."""

from __future__ import annotations

import os

import torch

from magi_model.parallel import ParallelDiT, build_stage_dit, init_parallel
from magi_model.parallel.faults import run_guarded
from magi_model.pipeline import generate_latents
from tests.distributed.model_cases import captions, tiny_cfg

FAIL_RANK = int(os.environ["FAULT_RANK"])


def main():
    torch.set_num_threads(1)
    cfg = tiny_cfg()
    layout = init_parallel(cfg, cp_size=int(os.environ["WORLD_SIZE"]), pp_size=1, cp_strategy="cp_shuffle_overlap",
                           timeout_minutes=5)  # far longer than the test's bound: no rank may rely on it
    model = build_stage_dit(cfg, layout, seed=0)
    if layout.rank == FAIL_RANK:
        layer = model.videodit_blocks.layers[2]
        calls = {"n": 0}
        orig = layer.forward

        def failing(*a, **k):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("injected failure in layer 2")
            return orig(*a, **k)
        layer.forward = failing
    generate_latents(ParallelDiT(model, layout), cfg, captions(model, 2, 0), seed=0, progress=False)


if __name__ == "__main__":
    run_guarded(main)
