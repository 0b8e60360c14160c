"""AstroCLIP: contrastive alignment of galaxy images (DINOv2 ViT) and DESI spectra (SpecFormer),
plus SpecFormer's masked-modelling pre-training as its own entry (`fmb retrain specformer`)."""

from fmb.models import Family

FAMILIES = [
    Family(name="astroclip", summary="contrastive image (ViT) / spectrum (SpecFormer) alignment, AstroCLIP",
           trainer="fmb.models.astroclip.trainer:AstroCLIPTrainer", convert="fmb.models.astroclip.convert:convert"),
    Family(name="specformer", summary="SpecFormer masked-modelling pre-training on DESI spectra (AstroCLIP's spectrum encoder)",
           trainer="fmb.models.astroclip.trainer:SpecFormerTrainer", convert="fmb.models.astroclip.convert:convert"),
]
