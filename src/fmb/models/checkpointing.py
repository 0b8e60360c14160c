"""Activation checkpointing of transformer blocks (`train.activation_checkpointing`).

A model that supports it has an `activation_checkpointing` attribute and runs its blocks through
`run_blocks`: with the flag on and a graph being built, each block keeps only its input and
recomputes its activations in backward (torch.utils.checkpoint, non-reentrant), so memory for
activations grows with the number of blocks by one residual stream each instead of all of a
block's intermediates, for about one more forward pass of compute.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fmb.errors import ConfigError


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """x through each block in turn, checkpointed when `checkpointing` and autograd is recording."""
    recompute = checkpointing and torch.is_grad_enabled()
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
    return x


def set_activation_checkpointing(model: nn.Module, enabled: bool, family: str) -> None:
    """With `enabled`, switch checkpointing on in every part of `model` that supports it (off is the
    models' default, and a family's own setting, such as the AION codec's, is left alone)."""
    if not enabled:
        return
    parts = [m for m in model.modules() if hasattr(m, "activation_checkpointing")]
    if not parts:
        raise ConfigError(f"train.activation_checkpointing=true: the {family} model has no blocks to checkpoint")
    for part in parts:
        part.activation_checkpointing = True
