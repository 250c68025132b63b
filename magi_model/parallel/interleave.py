"""Several requests through one pipeline at once (pp > 1 keeps every stage busy).

Each request runs its own chunk sampler in a thread; the samplers' DiT calls meet at a rendezvous
(every request has the same schedule, so the k-th call of each lines up), and one
:meth:`ParallelDiT.forward_many` runs them interleaved: while stage 1 works on request 0, stage 0
already runs request 1. This is MAGI-1's work-queue idea for pipeline parallelism, in lockstep.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from magi_model.pipeline import Captions, generate_latents


class _Rendezvous:
    """Looks like the model to each sampler; the last arriving call runs everyone's forward."""

    def __init__(self, pdit, n: int):
        self.pdit, self.n = pdit, n
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

    def call(self, slot: int, call) -> torch.Tensor:
        with self.cond:
            gen = self.generation
            self.calls[slot] = call
            if len(self.calls) == self.n:
                order = sorted(self.calls)
                try:
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
                                 mode: str = "t2v") -> list[torch.Tensor]:
    """:func:`magi_model.pipeline.generate_latents` for several prompts at once; one latent per request."""
    if len(seeds) != len(captions):
        raise ValueError(f"generate_latents_interleaved: argument 'seeds' must have one seed per request "
                         f"({len(captions)}), got {len(seeds)}")
    rv = _Rendezvous(pdit, len(captions))
    out: list = [None] * len(captions)
    errors: list = []

    def run(i):
        try:
            out[i] = generate_latents(rv.proxy(i), config, captions[i], mode=mode, seed=seeds[i], progress=False)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(captions))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return out
