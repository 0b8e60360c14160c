"""AION's redshift codec (upstream `GridScalarCodec` for `Z`): token k <-> the k-th of evenly spaced redshifts
(`codebook_size` of them on [0, 1] in 0.0.2; the values are read from the weights), and the zero-shot
redshift of a predicted token distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

UPSTREAM_KEYS = {"buckets": "_quantizer.buckets"}  # fmb name -> upstream name
OLDER_KEYS = {"quantizer.buckets": "buckets"}  # upstream's own loader accepts this older name too


@dataclass
class RedshiftCodecConfig:
    """`codecs/Z/config.json` (upstream `GridScalarCodec`)."""

    modality: str = "Z"
    codebook_size: int = 1024


class RedshiftCodec(nn.Module):
    def __init__(self, codebook_size: int = 1024, low: float = 0.0, high: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("buckets", torch.linspace(low, high, codebook_size))

    def expectation(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., vocab) decoder logits of tok_z -> (...) float32 expected redshift. The transformer's
        vocabulary has one entry more than the codebook (1025 against 1024), which no redshift decodes
        to: the distribution is taken over the codebook's tokens alone."""
        probabilities = torch.softmax(logits[..., : self.buckets.shape[0]].float(), dim=-1)
        return probabilities @ self.buckets.float()
