"""What ``python -m magi_model.generate`` does differently under torchrun (see docs/distributed.md).

    torchrun --nproc_per_node 4 -m magi_model.generate --config_file X.json --cp_size 4 ...
    torchrun --nproc_per_node 8 -m magi_model.generate --preset tiny_random --pp_size 2 --cp_size 4 ...

The layout comes from ``engine_config`` (``cp_size``, ``pp_size``, ``cp_strategy``), overridden by
``--cp_size`` / ``--pp_size`` / ``--cp_strategy``; ``cp_size * pp_size`` must equal torchrun's world
size. Every rank runs the same sampler on the same seed; rank 0 alone encodes text (T5) and
broadcasts the features, shows progress and writes the mp4. All ranks first agree on a hash of the
config and inputs. Each pipeline stage builds and loads only its layers; the first stage decodes
finished chunks tile-parallel on a side thread while the DiT keeps denoising.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist

from magi_model.parallel.layout import check_same_on_all_ranks, init_parallel
from magi_model.parallel.model import ParallelDiT, build_stage_dit
from magi_model.parallel.vae import OverlappedDecoder, tile_runner


def distributed_requested(args) -> bool:
    """torchrun started us with several ranks, or the command line asks for a parallel layout."""
    return (int(os.environ.get("WORLD_SIZE", "1")) > 1 or (getattr(args, "cp_size", None) or 1) > 1
            or (getattr(args, "pp_size", None) or 1) > 1)


class DistributedRun:
    """The parallel parts of one generate job on this rank."""

    def __init__(self, cfg, args):
        self.layout = init_parallel(cfg, cp_size=getattr(args, "cp_size", None), pp_size=getattr(args, "pp_size", None),
                                    cp_strategy=getattr(args, "cp_strategy", None))
        self.decoder: OverlappedDecoder | None = None

    @property
    def is_rank0(self) -> bool:
        return self.layout.rank == 0

    @property
    def device(self) -> torch.device:
        return self.layout.device

    def check_inputs(self, *inputs) -> None:
        check_same_on_all_ranks("config and command-line inputs", inputs)

    def share(self, obj):
        """Rank 0's object (e.g. the prompts' text features) on every rank."""
        if not dist.is_initialized():
            return obj
        buf = [obj if self.is_rank0 else None]
        dist.broadcast_object_list(buf, src=0)
        return buf[0]

    def build_dit(self, cfg, *, seed: int | None, checkpoint_dir: str | None = None) -> ParallelDiT:
        return ParallelDiT(build_stage_dit(cfg, self.layout, seed=seed, checkpoint_dir=checkpoint_dir), self.layout)

    def run_tiles(self):
        """``run_tiles`` for the VAE on the calling thread: tiles over this stage's cp group (None: one rank)."""
        return tile_runner(self.layout.vae_group) if self.layout.cp_size > 1 else None

    def on_chunk(self, decode: Callable[[torch.Tensor, object], torch.Tensor],
                 write: Callable[[object, torch.Tensor], None]):
        """The sampler's ``on_chunk``: first-stage ranks decode (tiles over the cp group) in the background;
        rank 0 writes. ``decode(latents, run_tiles)`` -> uint8 frames; ``write(index, frames)`` gets the
        index the chunk was submitted with (a chunk number, or ``(request, chunk)`` for several requests)."""
        if not self.layout.is_first_stage:
            return None
        runner = self.run_tiles()

        def sink(index, frames):
            if self.is_rank0:
                write(index, frames)
        self.decoder = OverlappedDecoder(lambda lat: decode(lat, runner), sink, self.device)
        return self.decoder

    def finish(self) -> None:
        if self.decoder is not None:
            self.decoder.close()
