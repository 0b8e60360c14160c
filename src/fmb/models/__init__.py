"""Model families, one sub-package each (model, data, trainer), found through one registry.

The table names each family's module without importing it, so `fmb --help` stays fast; a
family module exposes a `Family` record under the attribute named here. Other packages (and
tests) can add families at run time with `register_family`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fmb.errors import ConfigError

if TYPE_CHECKING:
    from fmb.train.trainer import BaseTrainer


@dataclass(frozen=True)
class Family:
    """What `fmb retrain/convert/embed <name>` needs from a family."""

    name: str
    summary: str
    trainer: type[BaseTrainer]
    # convert(src, out_dir) -> checkpoint directory written from an upstream checkpoint
    convert: Callable[[Path, Path], Path] | None = None
    # embed(checkpoint_dir, data_path or None, out_file, options) -> out_file
    embed: Callable[[Path, str | None, Path, dict[str, Any]], Path] | None = None


# name -> ("module:attribute", one-line summary)
BUILTIN_FAMILIES: dict[str, tuple[str, str]] = {
    "astropt": ("fmb.models.astropt:FAMILY", "multimodal patch-GPT on Euclid images + DESI spectra"),
    "astrom3": ("fmb.models.astrom3:FAMILY", "trimodal CLIP: light curves, spectra, metadata; variable-star classifiers"),
    "astromodal": ("fmb.models.astromodal:FAMILY", "S-PLUS token transformer: images, scalars, spectra"),
    "aion": ("fmb.models.aion:FAMILY", "Euclid <-> HSC adapters through the AION image codec"),
    "astroclip": ("fmb.models.astroclip:FAMILY", "contrastive image (ViT) / spectrum (SpecFormer) alignment, AstroCLIP"),
    "specformer": ("fmb.models.astroclip:SPECFORMER", "SpecFormer masked-modelling pre-training on DESI spectra"),
}

_registered: dict[str, Family] = {}


def family_names() -> list[str]:
    return sorted(set(BUILTIN_FAMILIES) | set(_registered))


def family_summaries() -> dict[str, str]:
    out = {name: summary for name, (_, summary) in BUILTIN_FAMILIES.items()}
    out.update({name: fam.summary for name, fam in _registered.items()})
    return dict(sorted(out.items()))


def register_family(family: Family) -> None:
    _registered[family.name] = family


def get_family(name: str) -> Family:
    if name in _registered:
        return _registered[name]
    if name not in BUILTIN_FAMILIES:
        valid = ", ".join(family_names()) or "(none installed)"
        raise ConfigError(f"unknown model '{name}'. Valid models: {valid}")
    target, _ = BUILTIN_FAMILIES[name]
    module_name, attribute = target.split(":")
    family = getattr(importlib.import_module(module_name), attribute)
    _registered[name] = family
    return family
