"""AION: Euclid <-> HSC U-Net adapters through the (frozen or fine-tuned) AION image codec."""

from fmb.models import Family
from fmb.models.aion.embed import embed
from fmb.models.aion.trainer import AionTrainer

FAMILY = Family(
    name="aion",
    summary="Euclid <-> HSC adapters through the AION image codec",
    trainer=AionTrainer,
    embed=embed,
)
