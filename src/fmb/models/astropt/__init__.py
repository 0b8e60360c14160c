"""AstroPT: multimodal patch-GPT over Euclid image patches and DESI spectrum patches."""

from fmb.models import Family
from fmb.models.astropt.convert import convert
from fmb.models.astropt.embed import embed
from fmb.models.astropt.trainer import AstroPTTrainer

FAMILY = Family(
    name="astropt",
    summary="multimodal patch-GPT on Euclid images + DESI spectra",
    trainer=AstroPTTrainer,
    convert=convert,
    embed=embed,
)
