"""How the ranks of a torchrun job are arranged for MAGI-1, configured as MAGI-1 does it.

``engine_config.cp_size`` x ``engine_config.pp_size`` must equal the world size. The ranks form a
(pp, cp) DeviceMesh: global rank = stage * cp_size + cp_rank, so the context-parallel group of a
stage is consecutive ranks (one node's NVLink domain when cp <= GPUs per node) and pipeline
neighbours are cp_size apart. ``engine_config.cp_strategy`` picks the attention layout inside a
context-parallel group:

- ``cp_ulysses`` (MAGI-1's default): contiguous token shards, all-to-all heads <-> sequence;
- ``cp_shuffle_overlap``: every chunk's tokens spread over the ranks (which balances the
  block-causal work), ring attention with point-to-point K/V transfers overlapped with compute --
  MAGI-1's choice for PCIe cards without fast all-to-all;
- ``none``: only valid with cp_size == 1.

Launch environment MAGI-1 sets on GPUs (``example/*/run.sh``; applied here with setdefault by
:func:`init_parallel` on CUDA): ``CUDA_DEVICE_MAX_CONNECTIONS=1`` (keeps compute and communication
kernels in issue order), ``NCCL_ALGO=^NVLS`` (avoids NVLink-SHARP algorithms),
``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` (less fragmentation with the KV cache).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import pickle

import torch
import torch.distributed as dist

from magi_kernels.distributed import scalar_device
from magi_model.config import ConfigError, MagiConfig

STRATEGIES = ("none", "cp_ulysses", "cp_shuffle_overlap")
GPU_LAUNCH_ENV = {"CUDA_DEVICE_MAX_CONNECTIONS": "1", "NCCL_ALGO": "^NVLS",
                  "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


class ParallelConfigError(ConfigError):
    """The parallel layout does not fit the job (message names the setting and the rule)."""


@dataclasses.dataclass
class ParallelLayout:
    """This rank's place in the (pp, cp) grid and the process groups it uses."""

    cp_size: int
    pp_size: int
    cp_strategy: str
    rank: int
    device: torch.device
    cp_group: object = None  # ProcessGroup of this stage's context-parallel ranks
    pp_group: object = None  # ProcessGroup of the ranks with this cp_rank, one per stage
    vae_group: object = None  # this stage's cp ranks again: tile exchange on a decode thread, beside the DiT's

    @property
    def world_size(self) -> int:
        return self.cp_size * self.pp_size

    @property
    def stage(self) -> int:
        return self.rank // self.cp_size

    @property
    def cp_rank(self) -> int:
        return self.rank % self.cp_size

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.pp_size - 1

    def global_rank(self, stage: int, cp_rank: int) -> int:
        return stage * self.cp_size + cp_rank


def stage_layers(num_layers: int, pp_size: int, stage: int) -> range:
    """Contiguous layers of a pipeline stage; the first ``num_layers % pp`` stages take one more."""
    if pp_size > num_layers:
        raise ParallelConfigError(f"engine_config.pp_size: must be <= num_layers ({num_layers}), got {pp_size}")
    base, extra = divmod(num_layers, pp_size)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))


def check_layout(cfg: MagiConfig, world_size: int, cp_size: int | None = None,
                 pp_size: int | None = None, cp_strategy: str | None = None) -> tuple[int, int, str]:
    """(cp, pp, strategy) from the config with CLI overrides, validated against the world size and model."""
    e, m = cfg.engine, cfg.model
    cp = e.cp_size if cp_size is None else cp_size
    pp = e.pp_size if pp_size is None else pp_size
    strategy = e.cp_strategy if cp_strategy is None else cp_strategy
    for name, v in (("cp_size", cp), ("pp_size", pp)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ParallelConfigError(f"engine_config.{name}: must be an int >= 1, got {v!r}")
    if cp * pp != world_size:
        raise ParallelConfigError(f"engine_config.cp_size * pp_size: must equal the world size {world_size} "
                                  f"(torchrun --nproc_per_node x --nnodes), got cp_size={cp} x pp_size={pp} = {cp * pp}")
    if strategy not in STRATEGIES:
        raise ParallelConfigError(f"engine_config.cp_strategy: must be one of {list(STRATEGIES)}, got {strategy!r}")
    if cp > 1 and strategy == "none":
        strategy = "cp_ulysses"  # MAGI-1's default whenever cp_size > 1
    if strategy == "cp_ulysses" and cp > 1:
        if m.num_attention_heads % cp:
            raise ParallelConfigError(f"engine_config.cp_size: cp_ulysses splits the {m.num_attention_heads} "
                                      f"attention heads, so cp_size must divide them; got {cp} "
                                      f"(use cp_strategy=cp_shuffle_overlap)")
        g = m.num_query_groups
        if g % cp and cp % g:
            raise ParallelConfigError(f"engine_config.cp_size: must divide or be a multiple of num_query_groups "
                                      f"({g}) for cp_ulysses, got {cp}")
    stage_layers(m.num_layers, pp, 0)
    return cp, pp, strategy


def init_parallel(cfg: MagiConfig, *, cp_size: int | None = None, pp_size: int | None = None,
                  cp_strategy: str | None = None, timeout_minutes: float | None = None) -> ParallelLayout:
    """Initialise torch.distributed from torchrun's environment and build the (pp, cp) groups.

    Device ``cuda:LOCAL_RANK`` with NCCL when CUDA is available, CPU with gloo otherwise. A single
    process without torchrun's variables gets a world of one (no process group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cp, pp, strategy = check_layout(cfg, world, cp_size, pp_size, cp_strategy)
    if torch.cuda.is_available():
        for k, v in GPU_LAUNCH_ENV.items():
            os.environ.setdefault(k, v)
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if world == 1:
        return ParallelLayout(cp, pp, strategy, 0, device)
    if not dist.is_initialized():
        minutes = cfg.engine.distributed_timeout_minutes if timeout_minutes is None else timeout_minutes
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=float(minutes)))
    return make_layout(cp, pp, strategy, device)


def make_layout(cp: int, pp: int, strategy: str, device) -> ParallelLayout:
    """Groups for an already initialised default process group of size cp * pp."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(torch.device(device).type, (pp, cp), mesh_dim_names=("pp", "cp"))
    rank = dist.get_rank()
    vae_group = None
    for stage in range(pp):  # every rank takes part in creating every group, in the same order
        g = dist.new_group(list(range(stage * cp, (stage + 1) * cp)))
        if stage == rank // cp:
            vae_group = g
    return ParallelLayout(cp, pp, strategy, rank, torch.device(device), mesh["cp"].get_group(),
                          mesh["pp"].get_group(), vae_group)


def fingerprint(obj) -> str:
    """A stable hash of configs / inputs (tensors by dtype, shape and bytes)."""
    h = hashlib.sha256()

    def feed(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=str):
                feed(str(k))
                feed(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for y in x:
                feed(y)
            h.update(b"]")
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            feed(dataclasses.asdict(x))
        else:
            h.update(pickle.dumps(x if isinstance(x, (int, float, str, bool, type(None))) else repr(x)))
    feed(obj)
    return h.hexdigest()


def check_same_on_all_ranks(what: str, obj, group=None) -> None:
    """Start-up check: every rank must hold the same ``obj`` (config, prompts, seeds, ...).

    Rank 0's hash is broadcast; a rank that differs raises, naming ``what``, before any work starts
    (ranks whose inputs disagree would otherwise produce garbage or hang)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    mine = fingerprint(obj)
    buf = [mine if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(buf, src=0, group=group)
    ok = torch.tensor([int(buf[0] == mine)], device=scalar_device(group))
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    if buf[0] != mine:
        raise ParallelConfigError(f"{what}: rank {dist.get_rank()} differs from rank 0 (hash {mine[:12]} vs "
                                  f"{buf[0][:12]}); every rank must be launched with the same config and inputs")
    if int(ok) == 0:
        raise ParallelConfigError(f"{what}: another rank's copy differs from rank 0's; every rank must be launched "
                                  f"with the same config and inputs")
