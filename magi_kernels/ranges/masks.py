"""Attention masks as small typed values (xformers style) that produce validated slices.

Each mask is a frozen dataclass with ``total_q``, ``total_k``, ``slices()`` (a list of
``(qs, qe, ks, ke, type)`` python ints) and ``to_ranges(device)`` returning the validated
``(q_ranges int32 [n, 2], k_ranges int32 [n, 2], attn_type_map int32 [n])`` that
``flex_attn_func`` takes. Building slices is pure host arithmetic (no tensors until ``to_ranges``).

- :class:`VarlenFull` / :class:`VarlenCausal`: one slice per packed document (``cu_seqlens``).
- :class:`BlockCausal`: chunk-causal attention with an optional per-chunk key window (in chunks,
  MAGI-1's ``noise2clean_kvrange``) and a KV-cache prefix in front of the keys.
- :class:`SlidingWindow`: FlashAttention's ``window_size=(left, right)`` per document, exactly,
  as at most three slices per document, each cell covered once.
- :class:`Magi1WindowMask`: MAGI-1's mask for one denoising forward (docs/magi1.md#attention-windows).
"""

from __future__ import annotations

import abc
import itertools
import dataclasses
import operator
from typing import Optional, Sequence

import torch

from magi_kernels.ranges.types import AttnMaskType
from magi_kernels.ranges.validate import validate_ranges
from magi_kernels.utils.checks import fail

Slice = tuple[int, int, int, int, int]


def _int_list(op: str, name: str, value, *, allow_none_items: bool = False) -> tuple:
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.is_floating_point():
            fail(op, name, f"must be a 1-D integer tensor or sequence, got {value.dtype} shape {list(value.shape)}")
        return tuple(int(x) for x in value.tolist())
    try:
        items = list(value)
    except TypeError:
        fail(op, name, f"must be a sequence of ints, got {type(value).__name__}")
    out = []
    for x in items:
        if x is None and allow_none_items:
            out.append(None)
            continue
        if isinstance(x, bool) or not isinstance(x, (int,)) and not (hasattr(x, "__index__")):
            fail(op, name, f"must contain ints, got {x!r}")
        out.append(int(x))
    return tuple(out)


def _check_int(op: str, name: str, value, *, minimum: int) -> None:
    """A whole-number argument (int or any integer with ``__index__``, not bool; 4.5 or "4" would otherwise be
    truncated or parsed) >= minimum."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        fail(op, name, f"must be an int, got {type(value).__name__} {value!r}")
    if operator.index(value) < minimum:
        fail(op, name, f"must be >= {minimum}, got {value}")


def _cu_seqlens(op: str, name: str, value) -> tuple[int, ...]:
    cu = _int_list(op, name, value)
    if len(cu) < 1:
        fail(op, name, "must have at least one entry (cu_seqlens[0] == 0)")
    if cu[0] != 0:
        fail(op, name, f"must start at 0, got {cu[0]}")
    for i in range(1, len(cu)):
        if cu[i] < cu[i - 1]:
            fail(op, name, f"must be non-decreasing; entry {i} ({cu[i]}) < entry {i - 1} ({cu[i - 1]})")
    return cu


class _MaskBase(abc.ABC):
    """Shared behaviour: slices -> validated tensors. Subclasses say what their slices are."""

    @property
    @abc.abstractmethod
    def total_q(self) -> int: ...

    @property
    @abc.abstractmethod
    def total_k(self) -> int: ...

    @abc.abstractmethod
    def slices(self) -> list[Slice]: ...

    def to_ranges(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, t = self.range_tensors("cpu")
        # The builders are exact by construction; validating anyway keeps the contract in one place.
        validate_ranges(q, k, t, total_q=self.total_q, total_k=self.total_k, op=type(self).__name__)
        return q.to(device), k.to(device), t.to(device)

    def area(self) -> int:
        """Visible cells of the union mask (the FLOP-relevant area)."""
        from magi_kernels.plan.stats import union_area

        q, k, t = self.to_ranges("cpu")
        return union_area(q, k, t)

    def range_tensors(self, device: torch.device | str = "cpu", *, total_q: Optional[int] = None,
                      total_k: Optional[int] = None, op: Optional[str] = None):
        """``(q_ranges, k_ranges, attn_type_map)`` int32 tensors on ``device``, for passing straight to an op.

        Unlike :meth:`to_ranges` this reads no tensor values, so ``torch.compile`` traces it without a graph
        break (the op validates range values itself at run time). ``total_q`` / ``total_k``: the token counts
        of the q and k the ranges will index; a mask of other sizes raises (``op`` names the caller).
        """
        name = op or type(self).__name__
        for arg, want, have in (("total_q", total_q, self.total_q), ("total_k", total_k, self.total_k)):
            if want is not None and want != have:
                fail(name, "mask", f"covers {arg}={have} tokens but the {arg[-1]} tensor has {want}")
        sl = self.slices()
        q = torch.tensor([[s[0], s[1]] for s in sl], dtype=torch.int32, device=device).reshape(-1, 2)
        k = torch.tensor([[s[2], s[3]] for s in sl], dtype=torch.int32, device=device).reshape(-1, 2)
        t = torch.tensor([s[4] for s in sl], dtype=torch.int32, device=device).reshape(-1)
        return q, k, t

    def repeat(self, batch: int) -> "PackedMask":
        """This mask once per sample of a batch packed end to end (offsets computed here)."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            fail(type(self).__name__, "batch", f"must be an int >= 1, got {batch!r}")
        return PackedMask((self,) * batch)


@dataclasses.dataclass(frozen=True)
class VarlenFull(_MaskBase):
    """Packed documents, each query attends to every key of its document (cu_seqlens_k defaults to cu_seqlens_q)."""

    cu_seqlens_q: Sequence[int]
    cu_seqlens_k: Optional[Sequence[int]] = None
    _type = AttnMaskType.FULL

    def __post_init__(self):
        name = type(self).__name__
        cq = _cu_seqlens(name, "cu_seqlens_q", self.cu_seqlens_q)
        ck = cq if self.cu_seqlens_k is None else _cu_seqlens(name, "cu_seqlens_k", self.cu_seqlens_k)
        if len(ck) != len(cq):
            fail(name, "cu_seqlens_k", f"must have as many entries as cu_seqlens_q ({len(cq)}), got {len(ck)}")
        object.__setattr__(self, "cu_seqlens_q", cq)
        object.__setattr__(self, "cu_seqlens_k", ck)

    @property
    def total_q(self) -> int:
        return self.cu_seqlens_q[-1]

    @property
    def total_k(self) -> int:
        return self.cu_seqlens_k[-1]

    def slices(self) -> list[Slice]:
        cq, ck = self.cu_seqlens_q, self.cu_seqlens_k
        return [(cq[i], cq[i + 1], ck[i], ck[i + 1], int(self._type)) for i in range(len(cq) - 1)]


@dataclasses.dataclass(frozen=True)
class VarlenCausal(VarlenFull):
    """Packed documents, causal inside each, bottom-right aligned when a document has sq != sk."""

    _type = AttnMaskType.CAUSAL


@dataclasses.dataclass(frozen=True)
class BlockCausal(_MaskBase):
    """Chunk-causal attention over one sequence, with an optional per-chunk key window and KV-cache prefix.

    Queries are the current chunks (``chunk_lens``, or ``num_chunks`` chunks of ``chunk_size``), so
    ``total_q = sum(chunk_lens)``. Keys are ``prefix_len`` cached tokens followed by the current chunks'
    tokens (``total_k = prefix_len + total_q``, MAGI-1's ``cat([cache, current])``). Chunk ``j`` attends
    with full attention to its own keys and to earlier keys:

    - ``window_chunks=None``: every earlier key (prefix included): plain block-causal;
    - ``window_chunks=w`` (int, or one value per chunk, ``None`` items meaning unlimited): itself plus
      the ``w - 1`` chunks before it. Chunks before the first current chunk are prefix chunks of
      ``prefix_chunk_size`` tokens (default: the chunk size when all chunks are equal), counted back from
      the end of the prefix; a window that reaches past the start of the prefix is clipped at key 0.
    """

    chunk_lens: Optional[Sequence[int]] = None
    chunk_size: Optional[int] = None
    num_chunks: Optional[int] = None
    window_chunks: object = None
    prefix_len: int = 0
    prefix_chunk_size: Optional[int] = None

    def __post_init__(self):
        name = type(self).__name__
        if self.chunk_lens is not None:
            if self.chunk_size is not None or self.num_chunks is not None:
                fail(name, "chunk_lens", "must not be combined with chunk_size/num_chunks")
            lens = _int_list(name, "chunk_lens", self.chunk_lens)
        else:
            if self.chunk_size is None or self.num_chunks is None:
                fail(name, "chunk_size", "and num_chunks must both be given when chunk_lens is None")
            _check_int(name, "chunk_size", self.chunk_size, minimum=1)
            _check_int(name, "num_chunks", self.num_chunks, minimum=0)
            lens = (int(self.chunk_size),) * int(self.num_chunks)
        for i, n in enumerate(lens):
            if n < 0:
                fail(name, "chunk_lens", f"must be >= 0; chunk {i} has {n}")
        _check_int(name, "prefix_len", self.prefix_len, minimum=0)
        w = self.window_chunks
        if isinstance(w, (bool, float, str)):
            fail(name, "window_chunks", f"must be an int, a sequence of ints/None, or None; got {w!r}")
        if w is None or isinstance(w, int):
            wins = (w,) * len(lens)
        else:
            wins = _int_list(name, "window_chunks", w, allow_none_items=True)
            if len(wins) != len(lens):
                fail(name, "window_chunks", f"must have one entry per chunk ({len(lens)}), got {len(wins)}")
        for i, x in enumerate(wins):
            if x is not None and x < 1:
                fail(name, "window_chunks", f"must be >= 1 (the chunk itself) or None; chunk {i} has {x}")
        pcs = self.prefix_chunk_size
        if pcs is None and self.prefix_len and any(x is not None for x in wins):
            if len(set(lens)) == 1 and lens[0] > 0:
                pcs = lens[0]
            else:
                fail(name, "prefix_chunk_size", "must be given when chunks have unequal sizes and windows reach a prefix")
        if pcs is not None:
            _check_int(name, "prefix_chunk_size", pcs, minimum=1)
        object.__setattr__(self, "_lens", lens)
        object.__setattr__(self, "_wins", wins)
        object.__setattr__(self, "_pcs", None if pcs is None else int(pcs))

    @property
    def total_q(self) -> int:
        return sum(self._lens)

    @property
    def total_k(self) -> int:
        return int(self.prefix_len) + self.total_q

    def slices(self) -> list[Slice]:
        p = int(self.prefix_len)
        starts = [0]
        for n in self._lens:
            starts.append(starts[-1] + n)

        def key_start(c: int) -> int:
            # key index where chunk c starts; c < 0 are prefix chunks counted back from the prefix end
            if c >= 0:
                return p + starts[c]
            return max(0, p + c * self._pcs) if self._pcs else 0

        out = []
        for j, n in enumerate(self._lens):
            w = self._wins[j]
            ks = 0 if w is None else key_start(j - w + 1)
            out.append((starts[j], starts[j + 1], ks, p + starts[j + 1], int(AttnMaskType.FULL)))
        return out


@dataclasses.dataclass(frozen=True)
class SlidingWindow(_MaskBase):
    """FlashAttention-style local attention per document: query i sees keys j with i-left <= j <= i+right.

    ``left``/``right`` = -1 means unbounded on that side; (-1, 0) is causal. Self-attention: q and k share
    ``cu_seqlens``. Each document becomes at most three slices whose rows are disjoint: rows where neither
    window edge is clipped by the document use BI_CAUSAL; rows clipped on the left use CAUSAL (or FULL when
    also clipped on the right); rows clipped on the right use INV_CAUSAL.
    """

    cu_seqlens: Sequence[int]
    left: int = -1
    right: int = -1

    def __post_init__(self):
        name = type(self).__name__
        object.__setattr__(self, "cu_seqlens", _cu_seqlens(name, "cu_seqlens", self.cu_seqlens))
        for arg in ("left", "right"):
            v = getattr(self, arg)
            if isinstance(v, bool) or not isinstance(v, int) or v < -1:
                fail(name, arg, f"must be an int >= 0, or -1 for unbounded; got {v!r}")

    @property
    def total_q(self) -> int:
        return self.cu_seqlens[-1]

    @property
    def total_k(self) -> int:
        return self.cu_seqlens[-1]

    def slices(self) -> list[Slice]:
        out = []
        cu = self.cu_seqlens
        for d in range(len(cu) - 1):
            s, n = cu[d], cu[d + 1] - cu[d]
            if n == 0:
                continue
            # local row i: lo(i) = max(0, i-left)  (slope 0 for i < b1, slope 1 from b1 on)
            #              hi(i) = min(n, i+right+1) (slope 1 for i < b2, slope 0 from b2 on)
            b1 = n if self.left < 0 else min(n, self.left + 1)
            b2 = 0 if self.right < 0 else max(0, min(n, n - self.right))
            cuts = sorted({0, b1, b2, n})
            for r0, r1 in zip(cuts[:-1], cuts[1:]):
                if r0 >= r1:
                    continue
                lo_slope = r0 >= b1
                hi_slope = r0 < b2
                # Endpoint values chosen so the type's per-row formula reproduces lo(i), hi(i) exactly:
                # lo slope 1 -> ks = lo(r0) = r0-left ; hi slope 1 -> ke = hi(r1-1) = r1+right.
                ks = r0 - self.left if lo_slope else 0
                ke = r1 + self.right if hi_slope else n
                t = (AttnMaskType.INV_CAUSAL if lo_slope else 0) | (AttnMaskType.CAUSAL if hi_slope else 0)
                out.append((s + r0, s + r1, s + ks, s + ke, int(t)))
        return out


@dataclasses.dataclass(frozen=True)
class Magi1WindowMask(_MaskBase):
    """MAGI-1's self-attention mask for one denoising forward (docs/magi1.md#attention-windows).

    The forward holds ``len(kv_windows)`` chunks of ``chunk_tokens`` (n) query tokens each; the key buffer
    is ``cat(KVcache[0 : slice_point*n], current)``, so key indices are absolute. Query chunk j (absolute
    chunk a = slice_point + j) attends, FULL, to keys ``[max(0, a+1-r_j)*n, (a+1)*n)``: itself and up to
    ``r_j - 1`` previous chunks. ``r_j=None`` means unlimited (``[0, (a+1)*n)``, MAGI-1's behaviour with an
    empty ``noise2clean_kvrange``). Use :meth:`for_step` / :meth:`from_schedule` to derive ``r_j``.
    """

    chunk_tokens: int
    kv_windows: Sequence[Optional[int]]
    slice_point: int = 0

    def __post_init__(self):
        name = type(self).__name__
        if isinstance(self.chunk_tokens, bool) or not isinstance(self.chunk_tokens, int) or self.chunk_tokens <= 0:
            fail(name, "chunk_tokens", f"must be an int > 0, got {self.chunk_tokens!r}")
        if not isinstance(self.slice_point, int) or self.slice_point < 0:
            fail(name, "slice_point", f"must be an int >= 0, got {self.slice_point!r}")
        wins = _int_list(name, "kv_windows", self.kv_windows, allow_none_items=True)
        for i, r in enumerate(wins):
            if r is not None and r < 1:
                fail(name, "kv_windows", f"must be >= 1 (r_j counts the chunk itself) or None; chunk {i} has {r}")
        object.__setattr__(self, "kv_windows", wins)

    @property
    def num_chunks(self) -> int:
        return len(self.kv_windows)

    @property
    def total_q(self) -> int:
        return self.num_chunks * self.chunk_tokens

    @property
    def total_k(self) -> int:
        return (self.slice_point + self.num_chunks) * self.chunk_tokens

    def slices(self) -> list[Slice]:
        n, out = self.chunk_tokens, []
        for j, r in enumerate(self.kv_windows):
            a = self.slice_point + j
            ks = 0 if r is None else max(0, a + 1 - r) * n
            out.append((j * n, (j + 1) * n, ks, (a + 1) * n, int(AttnMaskType.FULL)))
        return out

    @classmethod
    def for_step(cls, chunk_tokens: int, slice_point: int, steps: Sequence[int], num_steps: int,
                 noise2clean_kvrange: Sequence[int] = (5, 4, 3, 2), clean_chunk_kvrange: int = 1) -> "Magi1WindowMask":
        """r_j from each chunk's timestep index ``steps[j]`` (``num_steps`` marks the clean chunk).

        Exactly MAGI-1's rule (docs/magi1.md#attention-windows): clean chunk (step == num_steps) -> clean_chunk_kvrange; otherwise
        ``noise2clean_kvrange[step // (num_steps / 4)]``; an empty list means unlimited (full causal).
        """
        name = cls.__name__
        if num_steps <= 0:
            fail(name, "num_steps", f"must be > 0, got {num_steps}")
        wins = []
        for j, st in enumerate(steps):
            if st < 0 or st > num_steps:
                fail(name, "steps", f"must lie in [0, num_steps={num_steps}]; chunk {j} has {st}")
            if st == num_steps:
                wins.append(clean_chunk_kvrange)
            elif len(noise2clean_kvrange) == 0:
                wins.append(None)
            else:
                stage = int(st // (num_steps / 4))
                if stage >= len(noise2clean_kvrange):
                    fail(name, "noise2clean_kvrange", f"has {len(noise2clean_kvrange)} entries but step {st} is in stage {stage}")
                wins.append(int(noise2clean_kvrange[stage]))
        return cls(chunk_tokens, tuple(wins), slice_point)

    @staticmethod
    def schedule(chunk_num: int, num_steps: int, step: int, window: int = 4, chunk_offset: int = 0) -> dict:
        """MAGI-1's window schedule (docs/magi1.md#window-stages) at global DiT step ``step``.

        Returns dict(slice_point, steps) where ``steps[j]`` is the timestep index of the j-th chunk of the
        forward (oldest first; ``num_steps`` for the prepended clean chunk).
        """
        per_stage = num_steps // window
        if per_stage <= 0:
            fail("Magi1WindowMask", "num_steps", f"must be >= window ({window}), got {num_steps}")
        total = per_stage * (chunk_num + window - 1 - chunk_offset)
        if not 0 <= step < total:
            fail("Magi1WindowMask", "step", f"must lie in [0, {total}) for this schedule, got {step}")
        i, d = chunk_offset + step // per_stage, step % per_stage
        clip_start, clip_end = max(chunk_offset, i - window + 1), min(chunk_num, i + 1)
        t_start, t_end = max(0, i - chunk_num + 1), min(window, i - chunk_offset + 1)
        steps = list(reversed([j * per_stage + d for j in range(t_start, t_end)]))
        assert len(steps) == clip_end - clip_start
        slice_point = clip_start
        if clip_start > chunk_offset and d == 0:  # clean re-forward of the chunk that just finished
            steps = [num_steps] + steps
            slice_point = clip_start - 1
        return {"slice_point": slice_point, "steps": steps}

    @classmethod
    def from_schedule(cls, chunk_tokens: int, chunk_num: int, num_steps: int, step: int, window: int = 4,
                      chunk_offset: int = 0, noise2clean_kvrange: Sequence[int] = (5, 4, 3, 2),
                      clean_chunk_kvrange: int = 1) -> "Magi1WindowMask":
        s = cls.schedule(chunk_num, num_steps, step, window, chunk_offset)
        return cls.for_step(chunk_tokens, s["slice_point"], s["steps"], num_steps, noise2clean_kvrange,
                            clean_chunk_kvrange)


@dataclasses.dataclass(frozen=True)
class PackedMask(_MaskBase):
    """Per-sample masks laid end to end, as a varlen batch: sample i's queries start at ``cu_seqlens_q[i]``
    and its keys at ``cu_seqlens_k[i]`` (the totals of the samples before it).

    ``PackedMask([m0, m1, ...])`` composes different masks (one per sample, any sizes);
    ``mask.repeat(batch)`` is the same mask for every sample. No sample sees another sample's keys.
    """

    masks: Sequence[_MaskBase]

    def __post_init__(self):
        name = type(self).__name__
        try:
            masks = tuple(self.masks)
        except TypeError:
            fail(name, "masks", f"must be a sequence of masks, got {type(self.masks).__name__}")
        if not masks:
            fail(name, "masks", "must hold at least one mask")
        for i, m in enumerate(masks):
            if not isinstance(m, _MaskBase):
                fail(name, "masks", f"must hold mask objects (VarlenFull, BlockCausal, ...); entry {i} is {type(m).__name__}")
        object.__setattr__(self, "masks", masks)

    @property
    def cu_seqlens_q(self) -> tuple[int, ...]:
        """Where each sample's queries start (and the total at the end)."""
        return tuple(itertools.accumulate((m.total_q for m in self.masks), initial=0))

    @property
    def cu_seqlens_k(self) -> tuple[int, ...]:
        """Where each sample's keys start (and the total at the end)."""
        return tuple(itertools.accumulate((m.total_k for m in self.masks), initial=0))

    @property
    def total_q(self) -> int:
        return self.cu_seqlens_q[-1]

    @property
    def total_k(self) -> int:
        return self.cu_seqlens_k[-1]

    def slices(self) -> list[Slice]:
        out = []
        for m, oq, ok in zip(self.masks, self.cu_seqlens_q, self.cu_seqlens_k):
            out.extend((qs + oq, qe + oq, ks + ok, ke + ok, t) for qs, qe, ks, ke, t in m.slices())
        return out
