"""Losses shared by families: the contrastive loss over the objects that have both modalities."""

from __future__ import annotations

import torch
import torch.nn.functional as F

EXCLUDED = -1e4  # the logit of a pair left out: exp(-1e4) is 0 next to any real logit (|scale x cosine| <= 100)


def masked_clip_loss(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy over the valid pairs of a batch (pairs missing a modality drop out
    of both the rows and the columns; fewer than two valid pairs give 0), without any host
    synchronisation."""
    pair_ok = valid[:, None] & valid[None, :]
    logits = logits.masked_fill(~pair_ok, EXCLUDED)
    labels = torch.arange(len(logits), device=logits.device)
    per_row = F.cross_entropy(logits, labels, reduction="none") + F.cross_entropy(logits.T, labels, reduction="none")
    weight = valid.float()
    return 0.5 * (per_row * weight).sum() / weight.sum().clamp(min=1.0)
