"""Rest-frame wavelengths of the spectral lines the project uses, in vacuum (Angstrom) as DESI spectra
are: the synthetic spectra (fmb.data.synth.galaxies, the planted quasars) put their lines here and the
object views (fmb.evaluation.views) mark them here, so a marker sits on its line."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Line:
    label: str  # as marked on a spectrum
    vacuum: float  # rest wavelength in vacuum, Angstrom
    kind: str  # "emission" or "absorption"


LINES: dict[str, Line] = {
    "Lya": Line("Lyα", 1215.67, "emission"),
    "CIV": Line("CIV", 1549.06, "emission"),
    "CIII]": Line("CIII]", 1908.73, "emission"),
    "MgII": Line("MgII", 2799.12, "emission"),
    "[OII]": Line("[OII]", 3728.48, "emission"),  # the 3727/3729 doublet, blended at DESI resolution in a plot
    "CaK": Line("Ca K", 3934.78, "absorption"),
    "CaH": Line("Ca H", 3969.59, "absorption"),
    "Gband": Line("G band", 4305.61, "absorption"),
    "Hgamma": Line("Hγ", 4341.68, "emission"),
    "Hbeta": Line("Hβ", 4862.68, "emission"),
    "[OIII]4960": Line("[OIII]", 4960.30, "emission"),
    "[OIII]5008": Line("[OIII]", 5008.24, "emission"),
    "Mgb": Line("Mg b", 5176.70, "absorption"),
    "NaD": Line("Na D", 5894.60, "absorption"),
    "[NII]6550": Line("[NII]", 6549.86, "emission"),
    "Halpha": Line("Hα", 6564.61, "emission"),
    "[NII]6585": Line("[NII]", 6585.27, "emission"),
    "[SII]6718": Line("[SII]", 6718.29, "emission"),
    "[SII]6733": Line("[SII]", 6732.67, "emission"),
}


def rest_wavelengths(names: Sequence[str]) -> np.ndarray:
    """The vacuum rest wavelengths (Angstrom) of the lines `names` (keys of LINES), in that order."""
    return np.array([LINES[name].vacuum for name in names])
