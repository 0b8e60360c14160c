"""Model families, one sub-package each, found through one registry.

Every family package (`fmb/models/<family>/__init__.py`) declares its `FAMILIES`: `Family` records
that name their trainer, converter and CLI commands as "module:attribute" strings, so importing the
package is cheap and `fmb --help` stays fast; the classes are imported when first used. The CLI's
family list and summaries, `fmb data kinds`, `fmb slurm` and family-specific commands (astromodal's
`fmb tokenize`) all come from here. Other packages (and tests) add families at run time with
`register_family`: a new family needs its own folder, its recipe/demo configs and docs, nothing else.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fmb.errors import ConfigError

if TYPE_CHECKING:
    from fmb.train.trainer import BaseTrainer

# The built-in family packages, each exposing FAMILIES.
BUILTIN_PACKAGES = ("fmb.models.astropt", "fmb.models.aion", "fmb.models.astroclip", "fmb.models.astrom3",
                    "fmb.models.astromodal")

# Synthetic data kinds of the survey formats: kind -> ("module:function", summary). A generator is
# `write(out_dir, n, seed, **options) -> Path` (the path a run's data.path points at).
SURVEY_KINDS: dict[str, tuple[str, str]] = {
    "euclid-desi": ("fmb.data.synth.euclid_desi:write", "Euclid VIS/NISP cutouts + RGB + DESI spectra (parquet)"),
    "astrom3": ("fmb.data.synth.astrom3:write", "AstroM3 variable stars: light curves, LAMOST-like spectra, metadata, 10 classes"),
    "splus": ("fmb.data.synth.splus:write", "S-PLUS hypercube fields (datacube_<FIELD>.parquet) for astromodal"),
    "astroclip": ("fmb.data.synth.astroclip:write", "Legacy Survey g,r,z images + DESI spectra (AstroCLIP HDF5)"),
}


def resolve(target: str | Any) -> Any:
    """A "module:attribute" string imported, or the object itself."""
    if not isinstance(target, str):
        return target
    module_name, attribute = target.split(":")
    return getattr(importlib.import_module(module_name), attribute)


@dataclass(frozen=True)
class Family:
    """What `fmb retrain / embed / convert / slurm / config show <name>` need from a family."""

    name: str
    summary: str
    trainer: str | type  # "module:Class" of its BaseTrainer subclass (or the class)
    # convert(src, out_dir) -> checkpoint directory written from an upstream checkpoint
    convert: str | Callable[[Path, Path], Path] | None = None
    commands: tuple[str, str] | None = None  # (`fmb <name>` group, "module:typer_app") of its own commands
    synthetic: dict[str, tuple[str, str]] = field(default_factory=dict)  # data kinds it brings, as SURVEY_KINDS

    def trainer_class(self) -> type[BaseTrainer]:
        return resolve(self.trainer)

    def converter(self) -> Callable[[Path, Path], Path] | None:
        return resolve(self.convert) if self.convert is not None else None


_registered: dict[str, Family] = {}
_builtin: dict[str, Family] | None = None


def _families() -> dict[str, Family]:
    global _builtin
    if _builtin is None:
        _builtin = {}
        for package in BUILTIN_PACKAGES:
            for family in importlib.import_module(package).FAMILIES:
                _builtin[family.name] = family
    return {**_builtin, **_registered}


def register_family(family: Family) -> None:
    _registered[family.name] = family


def family_names() -> list[str]:
    return sorted(_families())


def family_summaries() -> dict[str, str]:
    return {name: family.summary for name, family in sorted(_families().items())}


def get_family(name: str) -> Family:
    families = _families()
    if name not in families:
        raise ConfigError(f"unknown model '{name}'. Valid models: {', '.join(sorted(families)) or '(none installed)'}")
    return families[name]


def family_commands() -> list[tuple[str, Any]]:
    """(group name, typer app) of every family's own CLI commands."""
    return [(f.commands[0], resolve(f.commands[1])) for f in _families().values() if f.commands]


def synthetic_kinds() -> dict[str, tuple[str, str]]:
    """Every synthetic data kind: the survey formats' and those families bring."""
    kinds = dict(SURVEY_KINDS)
    for family in _families().values():
        kinds.update(family.synthetic)
    return dict(sorted(kinds.items()))


def write_synthetic(kind: str, out: Path, n: int, seed: int, **options: Any) -> Path:
    """Write `n` synthetic objects of `kind` under `out`; the path to read them from."""
    kinds = synthetic_kinds()
    if kind not in kinds:
        raise ConfigError(f"unknown synthetic data kind '{kind}'. Valid kinds: {', '.join(kinds)}")
    if n <= 0:
        raise ConfigError(f"-n must be positive, got {n}")
    generator = resolve(kinds[kind][0])
    accepted = inspect.signature(generator).parameters
    refused = [name for name in options if name not in accepted]
    if refused:
        raise ConfigError(f"synthetic '{kind}' data takes no option {', '.join(refused)}")
    return Path(generator(Path(out), n, seed, **options))
