"""astromodal: S-PLUS tokenisers + causal token transformer with reconstruction losses."""

from fmb.models import Family
from fmb.models.astromodal.embed import embed
from fmb.models.astromodal.trainer import AstromodalTrainer

FAMILY = Family(
    name="astromodal",
    summary="S-PLUS token transformer: images, scalars, spectra",
    trainer=AstromodalTrainer,
    embed=embed,
)
