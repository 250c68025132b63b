"""Several requests through one pipeline at once (pp > 1 keeps every stage busy).

Each request runs its own chunk sampler in a thread; the samplers' DiT calls meet at a rendezvous
(every request has the same schedule, so the k-th call of each lines up), and one
:meth:`ParallelDiT.forward_many` runs them interleaved: while stage 1 works on request 0, stage 0
already runs request 1. This is MAGI-1's work-queue idea for pipeline parallelism, in lockstep.

Finished chunks are not handed to ``on_chunk`` from the request threads (their order would differ
from rank to rank, and the tile-parallel decode behind ``on_chunk`` runs collectives that must be
issued in the same order everywhere): they are queued and delivered at the next rendezvous, request
by request, and the rest after the last step.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

from magi_model.pipeline import Captions, generate_latents


class _Rendezvous:
    """Looks like the model to each sampler; the last arriving call runs everyone's forward."""

    def __init__(self, pdit, n: int, on_chunk: Callable[[int, int, torch.Tensor], None] | None = None):
        self.pdit, self.n, self.on_chunk = pdit, n, on_chunk
        self.finished: dict[int, list[tuple[int, torch.Tensor]]] = {slot: [] for slot in range(n)}
        self.cond = threading.Condition()
        self.calls: dict[int, tuple] = {}
        self.results: dict[int, torch.Tensor] = {}
        self.error: BaseException | None = None
        self.generation = 0

    def proxy(self, slot: int):
        outer = self

        class _Proxy:
            config, videodit_blocks, act_dtype = outer.pdit.config, outer.pdit.videodit_blocks, outer.pdit.act_dtype
            device = outer.pdit.device

            def null_caption(self, *a, **k):
                return outer.pdit.null_caption(*a, **k)

            def __call__(self, x, t, caption, caption_mask, **kwargs):
                return outer.call(slot, ((x, t, caption, caption_mask), kwargs))

        return _Proxy()

    def chunk_done(self, slot: int):
        """The sampler's ``on_chunk`` for request ``slot``: queue the chunk for :meth:`deliver_chunks`."""
        def queue(index: int, latents: torch.Tensor) -> None:
            with self.cond:
                self.finished[slot].append((index, latents))
        return queue

    def deliver_chunks(self) -> None:
        """Hand the queued chunks to ``on_chunk`` in request order (called where every thread waits or is done)."""
        for slot in range(self.n):
            pending, self.finished[slot] = self.finished[slot], []
            for index, latents in pending:
                self.on_chunk(slot, index, latents)

    def call(self, slot: int, call) -> torch.Tensor:
        with self.cond:
            gen = self.generation
            self.calls[slot] = call
            if len(self.calls) == self.n:
                order = sorted(self.calls)
                try:
                    if self.on_chunk is not None:
                        self.deliver_chunks()
                    outs = self.pdit.forward_many([self.calls[s] for s in order])
                    self.results = dict(zip(order, outs))
                except BaseException as e:  # noqa: BLE001 - re-raised in every request thread
                    self.error = e
                self.calls = {}
                self.generation += 1
                self.cond.notify_all()
            else:
                self.cond.wait_for(lambda: self.generation != gen)
            if self.error is not None:
                raise self.error
            return self.results.pop(slot)


def generate_latents_interleaved(pdit, config, captions: Sequence[Captions], *, seeds: Sequence[int],
                                 mode: str = "t2v", prefix_latent: torch.Tensor | None = None,
                                 on_chunk: Callable[[int, int, torch.Tensor], None] | None = None
                                 ) -> list[torch.Tensor]:
    """:func:`magi_model.pipeline.generate_latents` for several prompts at once; one latent per request.

    ``on_chunk(request, chunk_index, latents)``: called for every finished chunk, in the same
    order on every rank, from whichever request thread completes a rendezvous (see the module docstring)."""
    if len(seeds) != len(captions):
        raise ValueError(f"generate_latents_interleaved: argument 'seeds' must have one seed per request "
                         f"({len(captions)}), got {len(seeds)}")
    rv = _Rendezvous(pdit, len(captions), on_chunk)
    out: list = [None] * len(captions)
    errors: list = []

    def run(i):
        try:
            out[i] = generate_latents(rv.proxy(i), config, captions[i], mode=mode, prefix_latent=prefix_latent,
                                      seed=seeds[i], progress=False,
                                      on_chunk=None if on_chunk is None else rv.chunk_done(i))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(captions))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    if on_chunk is not None:
        rv.deliver_chunks()  # the chunks finished by the last step
    return out
