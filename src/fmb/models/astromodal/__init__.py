"""astromodal: S-PLUS tokenisers + causal token transformer with reconstruction losses."""

from fmb.models import Family

FAMILIES = [
    Family(name="astromodal", summary="S-PLUS token transformer: images, scalars, spectra",
           trainer="fmb.models.astromodal.trainer:AstromodalTrainer",
           commands=("tokenize", "fmb.models.astromodal.cli:app")),
]
