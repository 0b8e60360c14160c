"""AstroM3: trimodal CLIP over light curves, spectra and metadata, and variable-star classifiers."""

from fmb.models import Family

FAMILIES = [
    Family(name="astrom3", summary="trimodal CLIP: light curves, spectra, metadata; variable-star classifiers",
           trainer="fmb.models.astrom3.trainer:AstroM3Trainer", convert="fmb.models.astrom3.convert:convert"),
]
