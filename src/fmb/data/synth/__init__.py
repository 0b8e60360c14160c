"""Synthetic datasets written in the exact schemas of the real ones (latent truth as columns).

Each kind is a function `write(out_dir, n, seed) -> Path` in its own module, listed here
without importing it.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from fmb.errors import ConfigError

# kind -> ("module:function", summary)
SYNTH_KINDS: dict[str, tuple[str, str]] = {
    "euclid-desi": ("fmb.data.synth.euclid_desi:write", "Euclid VIS/NISP cutouts + RGB + DESI spectra (parquet)"),
    "astrom3": ("fmb.data.synth.astrom3:write", "AstroM3 variable stars: light curves, LAMOST-like spectra, metadata, 10 classes"),
    "splus": ("fmb.data.synth.splus:write", "S-PLUS hypercube fields (datacube_<FIELD>.parquet) for astromodal"),
    "astroclip": ("fmb.data.synth.astroclip:write", "Legacy Survey g,r,z images + DESI spectra (AstroCLIP HDF5)"),
}


def write_synthetic(kind: str, out: Path, n: int, seed: int) -> Path:
    if kind not in SYNTH_KINDS:
        valid = ", ".join(sorted(SYNTH_KINDS)) or "(none yet)"
        raise ConfigError(f"unknown synthetic data kind '{kind}'. Valid kinds: {valid}")
    if n <= 0:
        raise ConfigError(f"-n must be positive, got {n}")
    target, _ = SYNTH_KINDS[kind]
    module_name, function = target.split(":")
    writer = getattr(importlib.import_module(module_name), function)
    return writer(Path(out), n, seed)
