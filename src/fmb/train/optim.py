"""AdamW with parameter groups: weight decay on >= 2-D weights only, per-parameter learning rates.

Frozen parameters (requires_grad=False) never reach the optimizer. The fused kernel is used
(CPU and CUDA): it can skip a step on the device from a `found_inf` flag, so non-finite steps
are skipped without waiting for the GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fmb.train.config import OptimConfig


def parameter_groups(
    model: nn.Module,
    cfg: OptimConfig,
    lr_for: Callable[[str], float | None] | None = None,
) -> list[dict]:
    """Group trainable parameters by (learning rate, decayed or not).

    `lr_for(name)` may return a learning rate for a parameter (by its qualified name); None
    means `cfg.lr`. Each group records `base_lr` for the schedule and a readable `name`.
    """
    no_decay: set[int] = set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.ndim < 2 or (isinstance(module, nn.Embedding) and not cfg.decay_embeddings):
                no_decay.add(id(param))

    groups: dict[tuple[float, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr = cfg.lr
        if lr_for is not None:
            override = lr_for(name)
            if override is not None:
                lr = override
        decay = id(param) not in no_decay
        key = (lr, decay)
        if key not in groups:
            groups[key] = {
                "name": f"{'decay' if decay else 'no_decay'}@lr={lr:g}",
                "params": [],
                "param_names": [],
                "lr": lr,
                "base_lr": lr,
                "weight_decay": cfg.weight_decay if decay else 0.0,
            }
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return list(groups.values())


def build_adamw(groups: list[dict], cfg: OptimConfig) -> torch.optim.AdamW:
    if not groups:
        raise ValueError("no trainable parameters: everything is frozen")
    clean = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
    params = [p for g in groups for p in g["params"]]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(clean, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)
