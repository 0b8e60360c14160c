"""AstroCLIP: contrastive alignment of galaxy images (DINOv2 ViT) and DESI spectra (SpecFormer),
plus SpecFormer's masked-modelling pre-training as its own entry (`fmb retrain specformer`)."""

from fmb.models import Family
from fmb.models.astroclip.convert import convert
from fmb.models.astroclip.embed import embed
from fmb.models.astroclip.trainer import AstroCLIPTrainer, SpecFormerTrainer

FAMILY = Family(
    name="astroclip",
    summary="contrastive image (ViT) / spectrum (SpecFormer) alignment, AstroCLIP",
    trainer=AstroCLIPTrainer,
    convert=convert,
    embed=embed,
)

SPECFORMER = Family(
    name="specformer",
    summary="SpecFormer masked-modelling pre-training on DESI spectra (AstroCLIP's spectrum encoder)",
    trainer=SpecFormerTrainer,
    convert=convert,
)
