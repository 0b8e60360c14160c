"""Process-group set-up from torchrun or SLURM variables, and small collective helpers.

torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; `srun` sets SLURM_PROCID / SLURM_LOCALID /
SLURM_NTASKS. Both need MASTER_ADDR / MASTER_PORT (the sbatch scripts export them). NCCL on CUDA,
gloo on CPU. A second, gloo group carries host-side control flags (stop requests) so that
agreeing on them never waits for the GPU.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from fmb.errors import ConfigError

_JOINED = False  # whether this process ever joined a process group (init_distributed; see exit_process)


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    control_group: Any = None  # gloo group for host-side flags

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_ranks(environ: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun or SLURM variables; (0, 0, 1) if neither."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return int(env["RANK"]), int(env.get("LOCAL_RANK", env["RANK"])), int(env["WORLD_SIZE"])
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env and int(env["SLURM_NTASKS"]) > 1:
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"])
    return 0, 0, 1


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={name!r} but CUDA is not available here; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def init_distributed(device: torch.device, timeout_s: float = 1800.0) -> DistInfo:
    rank, local_rank, world_size = env_ranks()
    if world_size == 1:
        return DistInfo()
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(
            f"{world_size} processes requested but {', '.join(missing)} not set; "
            "launch with torchrun, or export them in the sbatch script before srun"
        )
    global _JOINED
    _JOINED = True
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, control_group=control)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()



def exit_process(code: int | str | None) -> NoReturn:
    """End the process as `sys.exit(code)` would. After a multi-process run it ends it at once, once
    stdout, stderr and the logs are flushed, without the interpreter's shutdown (as multiprocessing
    ends its children): gloo's worker threads may still be letting go of a last collective's tensors,
    which takes the GIL, and once the interpreter is shutting down that aborts the process
    ("terminate called without an active exception", exit -6: about 1 in 12 two-rank CPU runs here
    that exit right after their last collective; torch keeps the process group alive past
    destroy_process_group while a DDP model has existed)."""
    if not _JOINED:
        sys.exit(code)
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True if the flag is set on any rank (a CPU collective; no device synchronisation)."""
    if not info.enabled:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=info.control_group)
    return bool(value.item())


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's object, on every rank (small host objects only)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj, group=info.control_group)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier(group=info.control_group)
