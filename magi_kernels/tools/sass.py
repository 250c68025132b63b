"""Hot-loop structure of a compiled Triton kernel, read from its SASS and TTGIR (no GPU needed).

The hot loop is the innermost loop that issues tensor-core instructions. A loop is a back edge of the SASS
control-flow graph: a ``BRA`` to a label at or before it whose block dominates the branch (every path from
the kernel's entry to the branch passes through the label). Its body is the address range from the label to
the branch, inner forward branches included; among the loops whose body holds an MMA the shortest one is the
hot loop (a loop nested in another is shorter than it; of the copies of a loop body, one per consumer
partition in a warp-specialized kernel, the leanest). Dominance is what keeps out the out-of-line blocks
``ptxas`` places after the kernel's last ``EXIT`` (an mbarrier wait that retries, say): they are entered by
a forward branch from inside a loop and jump back into it, so their backward ``BRA`` spans the end of the
kernel without being a loop.

Counting: each instruction of the body counts once per iteration, on both sides of an inner branch (what a
warp issues when the branch diverges; an upper bound when it does not), and out-of-line blocks entered from
the body do not count (they run when a wait is not satisfied at once).

For that body :func:`hot_loop_stats` reports what bounds a tensor-core loop's issue rate:

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
  (``ttg.local_alloc`` of rank >= 3), i.e. how many K/V (or A/B) tiles are in flight;
* ``first_addr``, ``last_addr``: the SASS addresses of the loop's label and of its backward branch.
"""

from __future__ import annotations

import dataclasses
import re

# 16-bit, e4m3/e5m2 and int8 tensor-core instructions: warpgroup MMAs (sm_90) and warp MMAs (sm_80-89).
MMA_OPS = ("HGMMA", "QGMMA", "IGMMA", "HMMA", "QMMA", "IMMA")
WARPGROUP_MMA = ("HGMMA", "QGMMA", "IGMMA")

# "/*0a30*/  @!P0 HGMMA.64x64x16.F32.BF16 R88, gdesc[UR28], R88 ;"
_LINE = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P[0-9T]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Za-z0-9_]+)*)\s*([^;]*);")
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
    guard: str = ""  # the predicate the instruction is issued under: "@!P0", "@PT"; "" when it has none

    @property
    def conditional(self) -> bool:
        """Whether the guard can be false (``@PT`` is always true; ``@!PT``, never issued, counts as conditional)."""
        return self.guard not in ("", "@PT")


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
            out.append(Instr(int(m.group(1), 16), m.group(3), m.group(4), m.group(5).strip(), pending,
                             (m.group(2) or "").strip()))
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


# Instructions after which control does not fall through to the next address (unless their guard is false).
_NO_FALLTHROUGH = ("BRA", "EXIT", "RET", "BRX", "JMP", "JMX", "KILL")


def _control_flow(instrs: list[Instr]) -> tuple[list[int], list[list[int]]]:
    """Basic blocks of a listing: the index of each block's first instruction, and each block's successor blocks.

    A block starts at the first instruction, at every label and after every branch, call or exit. A ``BRA`` goes
    to its label's block, and also falls through when its guard can be false; a ``CALL`` goes to its label's block
    and falls through (ptxas writes a loop's exit as a guarded ``CALL.REL.NOINC`` to the code after the loop just
    before the backward ``BRA``; a subroutine returns after the call); an unguarded exit, return or indirect
    branch ends the block without successors (return addresses and indirect targets are not resolved)."""
    index_of_label = {ins.label: i for i, ins in enumerate(instrs) if ins.label}
    starts = sorted({0} | {i for i, ins in enumerate(instrs) if ins.label}
                    | {i + 1 for i, ins in enumerate(instrs[:-1]) if ins.op in _NO_FALLTHROUGH + ("CALL",)})
    ends = starts[1:] + [len(instrs)]
    block_of = {i: b for b, (start, end) in enumerate(zip(starts, ends)) for i in range(start, end)}
    succs: list[list[int]] = []
    for b, end in enumerate(ends):
        last = instrs[end - 1]
        out = []
        if last.op in ("BRA", "CALL") and last.guard != "@!PT":
            m = _TARGET.search(last.operands)
            if m and m.group(1) in index_of_label:
                out.append(block_of[index_of_label[m.group(1)]])
        if (last.op not in _NO_FALLTHROUGH or last.conditional) and b + 1 < len(starts):
            out.append(b + 1)
        succs.append(out)
    return starts, succs


def _dominators(succs: list[list[int]]) -> list[int]:
    """For each block, the set of blocks that dominate it, as a bit mask (bit d set: block d dominates).

    The entries are block 0 and, in address order, every block not reachable from an earlier entry (an
    out-of-line block whose caller is not in the listing, as when the listing is a slice of a kernel)."""
    n = len(succs)
    preds: list[list[int]] = [[] for _ in range(n)]
    for b, out in enumerate(succs):
        for s in out:
            preds[s].append(b)
    entries, seen = [], set()
    for b in range(n):
        if b in seen:
            continue
        entries.append(b)
        stack = [b]
        seen.add(b)
        while stack:
            for s in succs[stack.pop()]:
                if s not in seen:
                    seen.add(s)
                    stack.append(s)
    everything = (1 << n) - 1
    dom = [everything] * n
    for e in entries:
        dom[e] = 1 << e
    is_entry = set(entries)
    changed = True
    while changed:  # iterate to the fixed point; blocks in address order converge in a few passes
        changed = False
        for b in range(n):
            if b in is_entry:
                continue
            meet = everything
            for p in preds[b]:
                meet &= dom[p]
            new = meet | (1 << b)
            if new != dom[b]:
                dom[b], changed = new, True
    return dom


def loops(instrs: list[Instr]) -> list[tuple[int, int]]:
    """(first, last) instruction indices of every loop: a ``BRA`` back to a label at or before it whose block
    dominates the branch. The body is the address range from the label to the branch."""
    if not instrs:
        return []
    starts, succs = _control_flow(instrs)
    dom = _dominators(succs)
    out = []
    for b, end in enumerate(starts[1:] + [len(instrs)]):
        j = end - 1
        if instrs[j].op != "BRA":
            continue
        for head in succs[b]:
            if starts[head] <= j and dom[b] >> head & 1:
                out.append((starts[head], j))
    return out


def hot_loop(instrs: list[Instr]) -> tuple[int, int] | None:
    """(first, last) instruction indices of the shortest loop (:func:`loops`) whose body holds an MMA, or None."""
    best = None
    for i, j in loops(instrs):
        if any(x.op in MMA_OPS for x in instrs[i:j + 1]) and (best is None or j - i < best[1] - best[0]):
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
    first_addr: int  # SASS address of the loop's label
    last_addr: int  # SASS address of its backward branch

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
        mma_kind="+".join(sorted({x.op + x.mods.split(".F32")[0] for x in mmas})) or "-",
        first_addr=instrs[span[0]].addr, last_addr=instrs[span[1]].addr)
