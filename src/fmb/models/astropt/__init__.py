"""AstroPT: multimodal patch-GPT over Euclid image patches and DESI spectrum patches."""

from fmb.models import Family

FAMILIES = [
    Family(name="astropt", summary="multimodal patch-GPT on Euclid images + DESI spectra",
           trainer="fmb.models.astropt.trainer:AstroPTTrainer", convert="fmb.models.astropt.convert:convert"),
]
