"""Data parallelism: DDP (replicated weights) or FSDP (`fully_shard`: sharded weights, gradients and
optimizer state) behind one small interface used by the trainer.

- `wrap`: the module the training loop calls.
- `gradient_sync`: skip the gradient all-reduce on non-final accumulation micro-steps.
- `full_model_state`: the whole, unsharded state dict (on rank 0 under FSDP) for model.safetensors.
- `load_model_state`: load a full state dict into a plain or sharded model.
- `save_optimizer` / `load_optimizer`: the optimizer state, in trainer_state.pt (DDP) or as a
  sharded torch.distributed.checkpoint directory `optimizer/` (FSDP: no rank holds it all).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fmb.errors import CheckpointError
from fmb.train.distributed import DistInfo

OPTIMIZER_DIR = "optimizer"


def is_sharded(kind: str, dist: DistInfo) -> bool:
    return kind == "fsdp" and dist.enabled


def default_shard_units(model: nn.Module) -> list[nn.Module]:
    """Every element of every nn.ModuleList (transformer blocks, encoder layers): each is one FSDP
    unit, so only one block's full weights exist at a time."""
    return [child for module in model.modules() if isinstance(module, nn.ModuleList) for child in module]


def wrap(model: nn.Module, kind: str, dist: DistInfo, device: torch.device, compile_model: bool,
         find_unused_parameters: bool, units: list[nn.Module]) -> nn.Module:
    if is_sharded(kind, dist):
        from torch.distributed.fsdp import fully_shard

        for unit in units:
            fully_shard(unit)
        fully_shard(model)  # in place: `model` now holds DTensor shards
        return torch.compile(model) if compile_model else model
    wrapped = torch.compile(model) if compile_model else model
    if dist.enabled:
        wrapped = DistributedDataParallel(wrapped, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=find_unused_parameters)
    return wrapped


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, model: nn.Module, kind: str, dist: DistInfo, enabled: bool) -> Iterator[None]:
    if enabled or not dist.enabled:
        yield
    elif is_sharded(kind, dist):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with wrapped.no_sync():
            yield


def local_norm(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor (FSDP returns a replicated DTensor)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def full_model_state(model: nn.Module, kind: str, dist: DistInfo) -> dict[str, torch.Tensor]:
    """The unsharded state dict; under FSDP a collective that leaves it on rank 0 only (CPU)."""
    if is_sharded(kind, dist):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict()


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], kind: str, dist: DistInfo) -> None:
    """Load a full (already checked) state dict; every rank passes the same full dict."""
    if is_sharded(kind, dist):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state, strict=True)


def save_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, kind: str, dist: DistInfo,
                   directory: Path) -> dict[str, Any] | None:
    """FSDP: every rank writes its shard under `directory/optimizer/` and None is returned.
    DDP: the state dict to store in trainer_state.pt."""
    if not is_sharded(kind, dist):
        return optimizer.state_dict()
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(directory / OPTIMIZER_DIR))
    return None


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, kind: str, dist: DistInfo,
                   directory: Path, saved: dict[str, Any] | None) -> None:
    sharded_dir = directory / OPTIMIZER_DIR
    if is_sharded(kind, dist):
        if not sharded_dir.is_dir():
            raise CheckpointError(f"{directory} holds a replicated (DDP) optimizer state; resume it with train.parallel=ddp")
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=str(sharded_dir))
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    else:
        if saved is None:
            raise CheckpointError(f"{directory} holds a sharded (FSDP) optimizer state; resume it with train.parallel=fsdp "
                                  "and the same number of processes")
        optimizer.load_state_dict(saved)
