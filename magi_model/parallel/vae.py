"""VAE decode across the context-parallel group, and decode overlapped with denoising.

Tile-parallel: the tiled VAE's tiles are independent until blending, so
:func:`tile_runner` hands rank r the tiles ``r, r + cp, ...``, runs them, and broadcasts every
tile's output from its owner; each rank then blends all tiles in the usual scan order, so the
frames are exactly those of the one-device decode (MAGI-1 spreads tiles the same way,
``inference/infra/parallelism/tile_parallel.py``).

Overlap: :class:`OverlappedDecoder` takes each finished chunk's latents from the sampler's
``on_chunk`` and decodes them on a background thread (its own CUDA stream on a GPU, its own process
group for the tile exchange) while the sampler goes on denoising the next chunks; frames come out in
chunk order. A finished chunk's latents never change again (the window has moved past them), which is
what makes the overlap legal; ``tests/distributed`` checks the frames equal the serial decode's.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import torch
import torch.distributed as dist

from magi_kernels.distributed import scalar_device


def tile_runner(group=None) -> Callable:
    """A ``run_tiles(fn, tiles)`` for :meth:`ViTVAE.decode` / ``encode`` spreading tiles over ``group``."""

    def run_tiles(fn, tiles):
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        outs = [fn(t) if i % world == rank else None for i, t in enumerate(tiles)]
        for i in range(len(tiles)):
            owner = dist.get_global_rank(group, i % world) if group is not None else i % world
            meta = torch.zeros(8, dtype=torch.int64, device=scalar_device(group))
            if outs[i] is not None:
                meta[:outs[i].dim()] = torch.tensor(outs[i].shape)
            dist.broadcast(meta, src=owner, group=group)  # the output's shape, then its data
            if outs[i] is None:
                shape = [int(s) for s in meta.tolist() if s > 0]
                outs[i] = torch.empty(shape, dtype=tiles[i].dtype, device=tiles[i].device)
            outs[i] = outs[i].contiguous()
            dist.broadcast(outs[i], src=owner, group=group)
        return outs

    return run_tiles


class OverlappedDecoder:
    """``on_chunk`` callback that decodes finished chunks in the background, delivering frames in order.

    ``decode(latents) -> frames`` runs on a worker thread (inside a side CUDA stream on GPUs);
    ``sink(index, frames)`` receives them in chunk order on that thread. :meth:`close` waits for the
    queue to drain and re-raises a worker error."""

    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor],
                 sink: Callable[[int, torch.Tensor], None], device: torch.device | None = None):
        self.decode, self.sink = decode, sink
        self.q: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.events: list[tuple[str, int]] = []  # ("submit" | "done", chunk) in real order, for inspection
        self._lock = threading.Lock()
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    def _log(self, what: str, index: int) -> None:
        with self._lock:
            self.events.append((what, index))

    def __call__(self, index: int, latents: torch.Tensor) -> None:
        if self.error is not None:
            raise self.error
        if self.stream is not None:  # the side stream must see the denoiser's finished writes
            self.stream.wait_stream(torch.cuda.current_stream(latents.device))
        self._log("submit", index)
        self.q.put((index, latents))

    def _work(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            index, latents = item
            try:
                if self.stream is not None:
                    with torch.cuda.stream(self.stream):
                        frames = self.decode(latents)
                    self.stream.synchronize()
                else:
                    frames = self.decode(latents)
                self.sink(index, frames)
                self._log("done", index)
            except BaseException as e:  # noqa: BLE001 - reported by __call__ / close
                self.error = e
                return

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
