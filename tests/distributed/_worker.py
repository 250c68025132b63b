"""One rank of a distributed test suite: init gloo, run every case, agree on each outcome, write results."""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

PG_TIMEOUT_S = 240  # a case that desynchronises the ranks fails after this instead of hanging (generous: loaded CI)


def main() -> None:
    ap = argparse.ArgumentParser()
    for a in ("--suite", "--out"):
        ap.add_argument(a, required=True)
    for a in ("--world", "--rank", "--port", "--seed"):
        ap.add_argument(a, type=int, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                            world_size=args.world, timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    cases = importlib.import_module(f"tests.distributed.{args.suite}").cases(args.world)
    out = Path(args.out) / f"rank{args.rank}.json"
    results, broken = {}, False
    for name, fn in cases.items():
        if broken:
            results[name] = {"ok": False, "msg": "not run: an earlier case desynchronised the ranks", "secs": 0}
            continue
        t0 = time.perf_counter()
        try:
            torch.manual_seed(args.seed)
            fn(args.rank, args.world, args.seed)
            ok, msg = True, ""
        except Exception:  # noqa: BLE001 - reported to the parent test
            ok, msg = False, traceback.format_exc()[-3000:]
        flag = torch.tensor([int(ok)])
        try:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        except Exception:  # noqa: BLE001
            broken = True
        if ok and int(flag) == 0:
            msg = "failed on another rank"
        results[name] = {"ok": ok and int(flag) == 1, "msg": msg, "secs": round(time.perf_counter() - t0, 3)}
        out.write_text(json.dumps(results))
    out.write_text(json.dumps(results))
    if not broken:
        dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
