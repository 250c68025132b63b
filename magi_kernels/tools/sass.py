"""Hot-loop structure of a compiled Triton kernel, read from its SASS and TTGIR (no GPU needed).

The hot loop is the innermost loop that issues tensor-core instructions: among the backward branches of the
SASS (a ``BRA`` whose target lies before it), the shortest ``[target, branch]`` span that contains an MMA.
For that span :func:`hot_loop_stats` reports what bounds a tensor-core loop's issue rate:

* ``mma_per_iter`` tensor-core instructions and ``issued`` instructions per iteration (``NOP`` excluded);
* ``issued_per_kflop``: issued instructions per 1000 MMA FLOPs of one warp (a ``HGMMA``/``QGMMA`` is a
  warpgroup instruction: each of its four warps issues it and owns a quarter of its FLOPs; ``HMMA``/``QMMA``
  are per warp). Comparing two kernels by this number compares how many instructions each spends to keep the
  tensor cores fed, independently of tile size;
* ``loads``: global-load kinds in the loop: ``TMA`` (``UTMALDG``, ``UBLKCP``), ``cp.async`` (``LDGSTS``),
  ``LDG`` (plain loads through registers);
* ``cta_barriers``: ``BAR.SYNC``/``BAR.RED`` on barrier 0 without a thread count (the whole CTA waits);
* ``wgmma_wait``: the smallest ``N`` of ``WARPGROUP.DEPBAR.LE gsb0, N`` in the loop (0 = the loop waits for
  its latest wgmma group before going on; None on archs without wgmma);
* ``warp_specialized``: the TTGIR has a ``ttg.warp_specialize`` region (producer and consumer partitions);
* ``pipeline_buffers``: the largest leading dimension of a multi-buffered shared-memory allocation
  (``ttg.local_alloc`` of rank >= 3), i.e. how many K/V (or A/B) tiles are in flight.
"""

from __future__ import annotations

import dataclasses
import re

# 16-bit, e4m3/e5m2 and int8 tensor-core instructions: warpgroup MMAs (sm_90) and warp MMAs (sm_80-89).
MMA_OPS = ("HGMMA", "QGMMA", "IGMMA", "HMMA", "QMMA", "IMMA")
WARPGROUP_MMA = ("HGMMA", "QGMMA", "IGMMA")

# "/*0a30*/  @!P0 HGMMA.64x64x16.F32.BF16 R88, gdesc[UR28], R88 ;"
_LINE = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P[0-9T]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Za-z0-9_]+)*)\s*([^;]*);")
_LABEL = re.compile(r"^(\.L_x_\d+|\.L_\w+):")
_TARGET = re.compile(r"`\((\.L_\w+)\)")
_GMMA_SHAPE = re.compile(r"\.(\d+)x(\d+)x(\d+)")
_MMA_SYNC_SHAPE = re.compile(r"\.(\d\d)(\d)(\d+)")  # HMMA.16816 -> m16 n8 k16, QMMA.16832 -> m16 n8 k32
_DEPBAR = re.compile(r"gsb0,\s*0x([0-9a-f]+)")
_BUFFERED_ALLOC = re.compile(r"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x\d+x\d+")
LOAD_KINDS = (("TMA", ("UTMALDG", "UBLKCP")), ("cp.async", ("LDGSTS",)), ("LDG", ("LDG",)))


@dataclasses.dataclass(frozen=True)
class Instr:
    addr: int
    op: str  # opcode without modifiers: "HGMMA"
    mods: str  # ".64x64x16.F32.BF16"
    operands: str
    label: str | None  # the label naming this address, if any


def parse_sass(text: str) -> list[Instr]:
    """Instructions of ``nvdisasm -c`` output, in address order, with the labels that name them."""
    out, pending = [], None
    for line in text.splitlines():
        lab = _LABEL.match(line.strip())
        if lab:
            pending = lab.group(1)
            continue
        m = _LINE.match(line)
        if m:
            out.append(Instr(int(m.group(1), 16), m.group(2), m.group(3), m.group(4).strip(), pending))
            pending = None
    return out


def mma_flops_per_warp(ins: Instr) -> int:
    """FLOPs one warp's issue of a tensor-core instruction accounts for (2*M*N*K, a quarter for wgmma)."""
    if ins.op in WARPGROUP_MMA:
        m = _GMMA_SHAPE.search(ins.mods)
        if m is None:
            raise ValueError(f"cannot read the shape of {ins.op}{ins.mods}")
        a, b, c = map(int, m.groups())
        return 2 * a * b * c // 4
    m = _MMA_SYNC_SHAPE.match(ins.mods)
    if m is None:
        raise ValueError(f"cannot read the shape of {ins.op}{ins.mods}")
    a, b, c = map(int, m.groups())
    return 2 * a * b * c


def hot_loop(instrs: list[Instr]) -> tuple[int, int] | None:
    """(first, last) instruction indices of the innermost backward-branch loop containing an MMA, or None."""
    index_of_label = {ins.label: i for i, ins in enumerate(instrs) if ins.label}
    best = None
    for j, ins in enumerate(instrs):
        if ins.op != "BRA":
            continue
        m = _TARGET.search(ins.operands)
        if m is None or m.group(1) not in index_of_label:
            continue
        i = index_of_label[m.group(1)]
        if i > j or not any(x.op in MMA_OPS for x in instrs[i:j + 1]):
            continue
        if best is None or j - i < best[1] - best[0]:
            best = (i, j)
    return best


@dataclasses.dataclass
class LoopStats:
    mma_per_iter: int
    issued: int
    mma_flops: int  # per warp per iteration
    loads: tuple[str, ...]
    cta_barriers: int
    wgmma_wait: int | None
    warp_specialized: bool
    pipeline_buffers: int
    mma_kind: str

    @property
    def issued_per_kflop(self) -> float:
        return 1000.0 * self.issued / self.mma_flops


def _is_cta_barrier(ins: Instr) -> bool:
    # "BAR.SYNC.DEFER_BLOCKING 0x0": barrier 0, no thread count -> every thread of the CTA.
    return ins.op == "BAR" and (".SYNC" in ins.mods or ".RED" in ins.mods) and ins.operands.strip() == "0x0"


def hot_loop_stats(sass: str, ttgir: str) -> LoopStats | None:
    instrs = parse_sass(sass)
    span = hot_loop(instrs)
    if span is None:
        return None
    body = [x for x in instrs[span[0]:span[1] + 1] if x.op != "NOP"]
    mmas = [x for x in body if x.op in MMA_OPS]
    ops = {x.op for x in body}
    waits = [int(m.group(1), 16) for x in body if x.op == "WARPGROUP" and (m := _DEPBAR.search(x.operands))]
    bufs = [int(n) for n in _BUFFERED_ALLOC.findall(ttgir)]
    return LoopStats(
        mma_per_iter=len(mmas), issued=len(body), mma_flops=sum(mma_flops_per_warp(x) for x in mmas),
        loads=tuple(kind for kind, names in LOAD_KINDS if ops & set(names)),
        cta_barriers=sum(_is_cta_barrier(x) for x in body), wgmma_wait=min(waits) if waits else None,
        warp_specialized="ttg.warp_specialize" in ttgir, pipeline_buffers=max(bufs, default=1),
        mma_kind="+".join(sorted({x.op + x.mods.split(".F32")[0] for x in mmas})) or "-")
