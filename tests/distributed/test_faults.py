"""A rank that raises mid-forward makes every rank exit non-zero, quickly, with the original error shown."""

import sys

from tests.distributed._launch import free_port, launch, worker_env

BOUND_S = 120  # generous for a loaded 2-core machine; the process-group timeout is 5 minutes


def test_one_rank_raising_ends_every_rank():
    world, port = 3, free_port()

    def argv(rank):
        return [sys.executable, "-m", "tests.distributed.fault_worker"]

    def env_for(rank):
        return worker_env({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                           "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "FAULT_RANK": "1"})

    procs = launch(argv, world, timeout=BOUND_S, env=[env_for(r) for r in range(world)])
    codes = [rc for rc, _, _ in procs]
    assert all(rc not in (0, None, -9) for rc in codes), (codes, [t for _, t, _ in procs])
    assert all(secs < BOUND_S for _, _, secs in procs)
    assert "injected failure in layer 2" in procs[1][1]
    assert "[rank 1] failed" in procs[1][1]
    for r in (0, 2):
        assert f"[rank {r}] failed" in procs[r][1], procs[r][1]
