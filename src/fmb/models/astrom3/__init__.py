"""AstroM3: trimodal CLIP over light curves, spectra and metadata, and variable-star classifiers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fmb.models import Family
from fmb.models.astrom3.trainer import AstroM3Trainer


def _convert(src: Path, out_dir: Path) -> Path:
    from fmb.models.astrom3.convert import convert

    return convert(src, out_dir)


def _embed(checkpoint: Path, data: str | None, out_file: Path, options: dict[str, Any]) -> Path:
    from fmb.models.astrom3.embed import embed

    return embed(checkpoint, data, out_file, options)


FAMILY = Family(
    name="astrom3",
    summary="trimodal CLIP: light curves, spectra, metadata; variable-star classifiers",
    trainer=AstroM3Trainer,
    convert=_convert,
    embed=_embed,
)
