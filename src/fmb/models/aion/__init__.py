"""AION: Euclid <-> HSC U-Net adapters through the (frozen or fine-tuned) AION image codec."""

from fmb.models import Family

FAMILIES = [
    Family(name="aion", summary="Euclid <-> HSC adapters through the AION image codec",
           trainer="fmb.models.aion.trainer:AionTrainer"),
]
