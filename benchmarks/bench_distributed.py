"""Distributed attention: bytes per collective per layer (counted), time per collective, ring overlap.

    python benchmarks/bench_distributed.py [--world 2] [--chunk_tokens 256] [--reps 3] [--json F] [--csv F]

Spawns ``--world`` local processes (NCCL on GPUs when there are enough of them, gloo on CPUs) and runs
one MAGI-1 24B attention layer shape (48 q heads, 8 kv heads, head_dim 128, bf16 on GPU / fp32 on
CPU) over a MAGI-1 window (4 chunks of ``--chunk_tokens`` tokens behind a 2-chunk KV-cache prefix,
key windows 5/4/3/2 chunks) with ``ulysses_attention``, ``ring_attention`` and (world >= 4)
``usp_attention``.

- bytes: every torch.distributed call the layer makes is intercepted and its payload counted (bytes
  this rank hands to the collective, its own all-to-all split excluded); forward and backward.
  The "per 720p window" column scales the counted bytes/token to MAGI-1's 720p window (4 x 21,600
  tokens; both strategies move bytes in proportion to tokens) and says so.
- time: wall-clock per collective call (waiting for peers included), median over ``--reps``.
- overlap (ring): forward wall time vs its compute alone and its transfers alone;
  overlap = (compute + transfers - together) / min(compute, transfers), 1 = fully hidden.

Everything printed is measured or counted in this run; on a CPU every row says CPU/gloo (shared
cores make gloo timings pessimistic and noisy). No GPU figure is printed unless measured on GPUs.
"""

from __future__ import annotations

import argparse
import collections
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import print_table, write_results

HQ, HK, D = 48, 8, 128
WINDOW_720P_TOKENS = 4 * 21600


class Counter:
    """Wraps torch.distributed calls: bytes handed over and wall time, per collective kind."""

    def __init__(self):
        self.bytes = collections.Counter()
        self.calls = collections.Counter()
        self.secs = collections.defaultdict(list)
        self._orig = {}

    def install(self):
        for name in ("all_to_all_single", "all_gather", "broadcast", "all_reduce", "batch_isend_irecv"):
            self._orig[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(name, self._orig[name]))

    def uninstall(self):
        for name, fn in self._orig.items():
            setattr(dist, name, fn)

    def reset(self):
        self.bytes.clear(), self.calls.clear(), self.secs.clear()

    def _wrap(self, name, fn):
        def run(*a, **k):
            self.calls[name] += 1
            self.bytes[name] += self._payload(name, a, k)
            t0 = time.perf_counter()
            out = fn(*a, **k)
            if name == "batch_isend_irecv":  # asynchronous: time the exposed part at wait()
                return [_TimedWork(w, self.secs["batch_isend_irecv (wait)"]) for w in out]
            self.secs[name].append(time.perf_counter() - t0)
            return out
        return run

    @staticmethod
    def _payload(name, a, k):
        if name == "all_to_all_single":
            inp = a[1]
            splits = a[3] if len(a) > 3 else k.get("input_split_sizes")
            group = k.get("group")
            row = inp[0].numel() * inp.element_size() if inp.shape[0] else 0
            own = splits[dist.get_rank(group)] if splits else inp.shape[0] // dist.get_world_size(group)
            return (inp.shape[0] - own) * row
        if name == "all_gather":
            t = a[1]
            return t.numel() * t.element_size()
        if name in ("broadcast", "all_reduce"):
            t = a[0]
            return t.numel() * t.element_size()
        if name == "batch_isend_irecv":
            return sum(op.tensor.numel() * op.tensor.element_size() for op in a[0] if op.op is dist.isend)
        return 0


class _TimedWork:
    def __init__(self, work, sink):
        self.work, self.sink = work, sink

    def wait(self):
        t0 = time.perf_counter()
        r = self.work.wait()
        self.sink.append(time.perf_counter() - t0)
        return r


def _problem(chunk_tokens, device, dtype):
    from magi_kernels import Magi1WindowMask

    mask = Magi1WindowMask(chunk_tokens, (5, 4, 3, 2), slice_point=2)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(mask.total_q, HQ, D, generator=g).to(device, dtype)
    k = torch.randn(mask.total_k, HK, D, generator=g).to(device, dtype)
    v = torch.randn(mask.total_k, HK, D, generator=g).to(device, dtype)
    return mask, q, k, v


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(rank, world, port, args, out_q):
    from magi_kernels.distributed import (
        _comm,
        even_shard_sizes,
        ring_attention,
        ulysses_attention,
        usp_attention,
    )
    from magi_kernels.distributed._args import check_call
    from magi_kernels.distributed.ring import ring_step_ranges

    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(1)
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    label = f"GPU/NCCL ({torch.cuda.get_device_name(device)})" if use_cuda else "CPU/gloo"
    dtype = torch.bfloat16 if use_cuda else torch.float32
    mask, q, k, v = _problem(args.chunk_tokens, device, dtype)
    qr, kr, ty = mask.to_ranges()
    qs, ks = even_shard_sizes(mask.total_q, world), even_shard_sizes(mask.total_k, world)
    qa, ka = sum(qs[:rank]), sum(ks[:rank])
    ql, kl, vl = (t.contiguous().requires_grad_() for t in (q[qa:qa + qs[rank]], k[ka:ka + ks[rank]],
                                                             v[ka:ka + ks[rank]]))
    fns = {"ulysses": lambda: ulysses_attention(ql, kl, vl, qr, kr, ty),
           "ring": lambda: ring_attention(ql, kl, vl, qr, kr, ty)}
    if world >= 4 and world % 2 == 0:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (2, world // 2), mesh_dim_names=("ring", "ulysses"))
        fns["usp (ring 2 x ulysses %d)" % (world // 2)] = lambda: usp_attention(
            ql, kl, vl, qr, kr, ty, ulysses_group=mesh["ulysses"], ring_group=mesh["ring"])
    counter = Counter()
    counter.install()
    rows = []
    tokens = mask.total_q
    for name, fn in fns.items():
        for phase in ("forward", "backward"):
            counter.reset()
            walls = []
            for _ in range(args.reps):
                counter.reset()
                _sync(device)
                t0 = time.perf_counter()
                out, lse = fn()
                if phase == "backward":
                    _sync(device)
                    t0 = time.perf_counter()
                    counter.reset()
                    out.float().sum().backward()
                _sync(device)
                walls.append(time.perf_counter() - t0)
            for kind in sorted(set(counter.bytes) | set(counter.secs)):
                if kind.endswith("(wait)"):
                    b, n = counter.bytes.get("batch_isend_irecv", 0), counter.calls.get("batch_isend_irecv", 0)
                else:
                    b, n = counter.bytes.get(kind, 0), counter.calls.get(kind, 0)
                    if kind == "batch_isend_irecv":
                        continue
                secs = counter.secs.get(kind, [])
                rows.append({"where": label, "world": world, "strategy": name, "phase": phase, "collective": kind,
                             "calls/layer": n, "MB sent/layer (counted)": b / 2**20,
                             "MB per 720p window (scaled)": b / tokens * WINDOW_720P_TOKENS / 2**20,
                             "ms/call (median)": 1e3 * statistics.median(secs) if secs else None,
                             "layer ms": 1e3 * statistics.median(walls)})
    counter.uninstall()
    # Ring overlap: the forward vs its compute alone and its transfers alone.
    from magi_kernels import flex_attn_func

    call = check_call("ring_attention", ql.detach(), kl.detach(), vl.detach(), qr, kr, ty, None, 0.0, None)
    steps = ring_step_ranges(call)
    kv = torch.cat([kl.detach(), vl.detach()], -1).contiguous()

    def compute_only():
        for s in steps:
            if s is not None:
                flex_attn_func(ql.detach(), kv[..., :D], kv[..., D:], *s)

    def comm_only():
        cur = kv
        for s in range(world - 1):
            src = (rank - s - 1) % world
            cur = _comm.RingShift(cur, (ks[src],) + kv.shape[1:], dist.group.WORLD).wait()

    def together():
        with torch.no_grad():
            ring_attention(ql.detach(), kl.detach(), vl.detach(), qr, kr, ty)

    times = {}
    for nm, f in (("compute", compute_only), ("transfers", comm_only), ("together", together)):
        ws = []
        for _ in range(args.reps):
            dist.barrier()
            _sync(device)
            t0 = time.perf_counter()
            f()
            _sync(device)
            ws.append(time.perf_counter() - t0)
        times[nm] = statistics.median(ws)
    hidden = (times["compute"] + times["transfers"] - times["together"]) / max(1e-9, min(times["compute"],
                                                                                          times["transfers"]))
    overlap = [{"where": label, "world": world, "rank": rank, "ring compute ms": 1e3 * times["compute"],
                "ring transfers ms": 1e3 * times["transfers"], "ring forward ms": 1e3 * times["together"],
                "overlap (1 = hidden)": max(0.0, min(1.0, hidden))}]
    out_q.put((rank, rows, overlap))
    dist.barrier()
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--chunk_tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--csv")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    procs = [ctx.Process(target=worker, args=(r, args.world, port, args, q)) for r in range(args.world)]
    for p in procs:
        p.start()
    results = [q.get() for _ in procs]
    for p in procs:
        p.join()
    results.sort(key=lambda r: r[0])
    rows = results[0][1]  # rank 0's view (ranks send the same amounts up to one token of uneven split)
    overlap = [o for _, _, ov in results for o in ov]
    print_table(f"Distributed attention collectives per layer (rank 0; MAGI-1 24B heads 48/8, d {D}; "
                f"{args.chunk_tokens}-token chunks)", rows)
    print_table("Ring attention: compute / transfer overlap per rank", overlap)
    write_results(rows + overlap, args.csv, args.json)


if __name__ == "__main__":
    main()
