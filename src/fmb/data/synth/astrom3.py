"""Synthetic AstroM3 variable stars in the AstroM3Processed parquet schema.

Ten classes with the real sample's imbalance, each with its own light-curve shape, period and
amplitude range (ASAS-SN-like V-band fluxes in mJy, seasonal gaps, duplicated epochs), a LAMOST-
like spectrum from its temperature (black body, Balmer and metal lines, TiO bands in cool
giants) and catalogue metadata consistent with its luminosity, colour and distance. Latent
truth (class, period, amplitude, temperature, distance) is stored as ordinary columns.
Writes `<out>/{train,validation,test}-00000-of-00001.parquet` (80/10/10).

`missing={"photometry": r, "spectra": r, "metadata": r}`: the light curve or spectrum is null for
a share r of the objects; for metadata, a share r of the 34 catalogue values is NaN (a real
sample misses Gaia, 2MASS and WISE values; the photometric features come from the light curve).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from fmb.data.surveys.astrom3 import METADATA_NAMES, N_CATALOGUE
from fmb.data.synth import (
    CHUNK,
    blank_values,
    check_missing,
    chunk_bounds,
    drop_modalities,
    missing_rng,
    write_parquet,
)

# name: (share of the real train split, period range [d], amplitude range [mag], light-curve
# shape, Teff range [K], absolute V magnitude range)
CLASS_TABLE = {
    "EW": (4969, (0.25, 0.5), (0.2, 0.6), "ew", (5200, 6800), (3.0, 5.0)),
    "SR": (3652, (30.0, 300.0), (0.3, 1.5), "sr", (3200, 3900), (-1.5, 0.5)),
    "EA": (2367, (1.0, 10.0), (0.3, 1.2), "ea", (6000, 10000), (0.5, 3.0)),
    "RRAB": (1947, (0.45, 0.8), (0.6, 1.2), "rrab", (6000, 7000), (0.4, 0.9)),
    "EB": (1585, (0.5, 3.0), (0.3, 0.9), "eb", (6000, 9000), (1.0, 3.0)),
    "ROT": (1464, (1.0, 30.0), (0.05, 0.25), "rot", (4000, 5500), (4.0, 6.5)),
    "RRC": (640, (0.25, 0.4), (0.3, 0.5), "rrc", (7000, 7600), (0.4, 0.8)),
    "HADS": (229, (0.05, 0.2), (0.3, 0.8), "hads", (7000, 8200), (1.5, 2.5)),
    "M": (216, (150.0, 500.0), (2.5, 5.0), "mira", (2800, 3300), (-2.0, 0.0)),
    "DSCT": (206, (0.02, 0.2), (0.03, 0.12), "dsct", (7000, 8500), (1.5, 3.0)),
}
SPLITS = (("train", 0.8), ("validation", 0.1), ("test", 0.1))
ROW_GROUP = 32  # small groups: random access decodes little
MISSING = ("photometry", "spectra", "metadata")  # the names `missing` takes


def brightness(shape: str, phase: np.ndarray, t: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    """Relative brightness in [0, 1] (1 at maximum) of a class's light curve."""
    two_pi = 2 * np.pi
    if shape == "ew":
        return 1 - 0.5 * (1 - np.cos(2 * two_pi * phase)) * (1 + 0.08 * np.cos(two_pi * phase))
    if shape == "eb":
        return 1 - 0.35 * (1 - np.cos(2 * two_pi * phase)) - 0.3 * (1 - np.cos(two_pi * phase)) / 2
    if shape == "ea":
        width = rng.uniform(0.03, 0.08)
        d1 = np.minimum(phase, 1 - phase)
        d2 = np.abs(phase - 0.5)
        return 1 - np.exp(-0.5 * (d1 / width) ** 2) - rng.uniform(0.1, 0.5) * np.exp(-0.5 * (d2 / width) ** 2)
    if shape in ("rrab", "hads"):
        rise = 0.15 if shape == "rrab" else 0.3
        saw = np.where(phase < rise, phase / rise, (1 - phase) / (1 - rise))
        return saw ** 1.5
    if shape == "rrc":
        return 0.5 * (1 + np.sin(two_pi * phase)) + 0.1 * np.sin(2 * two_pi * phase)
    if shape == "dsct":
        second = 0.5 * np.sin(two_pi * t / (period * 0.773) + rng.uniform(0, two_pi))
        return 0.5 * (1 + (np.sin(two_pi * phase) + second) / 1.5)
    if shape == "sr":  # quasi-periodic: the phase wanders
        jitter = np.cumsum(rng.normal(0, 0.05, len(t)))
        second = 0.3 * np.sin(two_pi * t / (period * rng.uniform(5, 10)))
        return 0.5 * (1 + (np.sin(two_pi * phase + jitter) + second) / 1.3)
    if shape == "mira":
        return 0.5 * (1 + np.sin(two_pi * phase + 0.3 * np.sin(two_pi * phase)))
    if shape == "rot":  # spots evolve: slowly changing amplitude
        envelope = 0.7 + 0.3 * np.sin(two_pi * t / rng.uniform(200, 600))
        return 0.5 * (1 + envelope * (np.sin(two_pi * phase) + 0.2 * np.sin(2 * two_pi * phase)) / 1.2)
    raise ValueError(shape)


def light_curve(shape: str, period: float, amplitude: float, vmag: float, rng: np.random.Generator) -> np.ndarray:
    """(N, 3) HJD, flux [mJy], flux error: seasonal sampling over ~5 years, some repeated epochs."""
    n = int(np.clip(rng.lognormal(np.log(300), 0.4), 60, 900))
    start = 2456000.0 + rng.uniform(0, 300)
    t = start + rng.uniform(0, 1800, n)
    season = ((t - start) % 365.25) < 240  # the field is observable 8 months a year
    t = np.sort(t[season] if season.sum() >= 20 else t)
    repeat = rng.random(len(t)) < 0.02
    t = np.sort(np.concatenate([t, t[repeat]]))
    phase = ((t - start) / period + rng.uniform()) % 1.0
    mag = vmag + amplitude * (0.5 - brightness(shape, phase, t, period, rng))
    sigma_mag = 0.01 + 0.03 * 10 ** (0.4 * (mag - 15.0))
    flux = 10 ** (-0.4 * (mag - 16.4))
    err = flux * sigma_mag / 1.0857
    return np.stack([t, flux + rng.normal(0, 1, len(t)) * err, err], axis=1)


def spectrum(teff: float, vmag: float, rng: np.random.Generator) -> np.ndarray:
    """(M, 3) wavelength [A], flux, flux error of a LAMOST-like low-resolution spectrum."""
    wave = np.geomspace(3690.0, 9100.0, int(rng.integers(3700, 3910)))
    x = 1.4388e8 / (wave * teff)  # hc / (lambda k T) with lambda in Angstrom
    flux = wave ** -5 / np.expm1(x)
    flux /= np.interp(5500.0, wave, flux)
    balmer = 0.6 * np.exp(-(((teff - 9500.0) / 3000.0) ** 2))
    metals = 0.4 * np.clip((7500.0 - teff) / 3500.0, 0, 1)
    lines = {6563: balmer, 4861: balmer, 4340: 0.9 * balmer, 4102: 0.8 * balmer, 3934: metals, 3968: metals,
             5175: 0.6 * metals, 5893: 0.6 * metals, 8542: 0.4 * metals, 8662: 0.3 * metals}
    profile = np.ones_like(wave)
    for centre, depth in lines.items():
        profile -= depth * np.exp(-0.5 * ((wave - centre) / 8.0) ** 2)
    tio = np.clip((4000.0 - teff) / 1000.0, 0, 1)
    for head in (4955, 5167, 5448, 6159, 6651, 7054, 7589, 8432):
        redward = wave >= head
        profile[redward] *= 1 - 0.5 * tio * np.exp(-(wave[redward] - head) / 120.0)
    flux = np.clip(profile, 0.02, None) * flux * 100 * 10 ** (-0.4 * (vmag - 12.0))
    snr = rng.uniform(10, 80)
    err = np.abs(flux) / snr + 1e-3 * flux.mean()
    return np.stack([wave, flux + rng.normal(0, 1, len(wave)) * err, err], axis=1)


def metadata(name: str, teff: float, vmag: float, distance: float, period: float, amplitude: float,
             rng: np.random.Generator) -> np.ndarray:
    """The 34 catalogue values and 4 photometric features, in METADATA_NAMES order."""
    bp_rp = -0.4 + 3.1 * (5040.0 / teff - 0.5) + rng.normal(0, 0.05)
    g = vmag - 0.1 - 0.25 * bp_rp + rng.normal(0, 0.02)
    rp = g - 0.55 * bp_rp - 0.1
    bp = rp + bp_rp
    k = vmag - 2.2 * bp_rp + rng.normal(0, 0.05)
    j_k = 0.2 * bp_rp + 0.1 + rng.normal(0, 0.03)
    dust = {"M": 0.8, "SR": 0.3}.get(name, 0.0) * rng.uniform(0.5, 1.5)
    w1 = k - 0.05 - 0.3 * dust
    w1_w2 = 0.02 + 0.3 * dust + rng.normal(0, 0.02)
    w2 = w1 - w1_w2
    w3 = w2 - 0.1 - dust
    w4 = w3 - 0.1 - 0.8 * dust
    parallax_error = rng.uniform(0.015, 0.1) * 10 ** (0.2 * (g - 13))
    parallax = 1000.0 / distance + rng.normal(0, parallax_error)
    speed = rng.uniform(20, 120)  # km/s, tangential
    pm = speed / (4.74 * distance / 1000.0)
    angle = rng.uniform(0, 2 * np.pi)
    pmra, pmdec = pm * np.cos(angle), pm * np.sin(angle)
    errors = rng.uniform(0.002, 0.03, 12)
    ruwe = 1.0 + rng.lognormal(np.log(0.08 if name not in ("EW", "EB", "EA") else 0.2), 0.5)
    catalogue = {
        "mean_vmag": vmag, "phot_g_mean_mag": g, "e_phot_g_mean_mag": errors[0] / 10,
        "phot_bp_mean_mag": bp, "e_phot_bp_mean_mag": errors[1] / 5, "phot_rp_mean_mag": rp,
        "e_phot_rp_mean_mag": errors[2] / 5, "bp_rp": bp_rp, "parallax": parallax, "parallax_error": parallax_error,
        "parallax_over_error": parallax / parallax_error, "pmra": pmra, "pmra_error": parallax_error * 1.2,
        "pmdec": pmdec, "pmdec_error": parallax_error * 1.1, "j_mag": k + j_k, "e_j_mag": errors[3],
        "h_mag": k + 0.7 * j_k, "e_h_mag": errors[4], "k_mag": k, "e_k_mag": errors[5], "w1_mag": w1,
        "e_w1_mag": errors[6], "w2_mag": w2, "e_w2_mag": errors[7], "w3_mag": w3, "w4_mag": w4, "j_k": j_k,
        "w1_w2": w1_w2, "w3_w4": w3 - w4, "pm": pm, "ruwe": ruwe,
        "l": rng.uniform(0, 360), "b": float(np.clip(rng.laplace(0, 20), -89, 89)),
        "amplitude": amplitude * rng.uniform(0.85, 1.1),
        "period": period * (1 + rng.normal(0, 0.002)),
        "lksl_statistic": float(np.clip(rng.normal(0.3 if name not in ("SR", "ROT") else 0.6, 0.1), 0.02, 1.5)),
        "rfr_score": float(np.clip(rng.normal(0.85, 0.1), 0.3, 1.0)),
    }
    return np.array([catalogue[key] for key in METADATA_NAMES], dtype=np.float32)


def nested(rows: list[np.ndarray]) -> pa.Array:
    """list<list<float32>> of (n_i, 3) arrays."""
    flat = np.concatenate([r.reshape(-1) for r in rows]).astype(np.float32)
    points = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int32)
    inner = pa.ListArray.from_arrays(np.arange(0, len(flat) + 1, 3, dtype=np.int32), pa.array(flat))
    return pa.ListArray.from_arrays(points, inner)


SCHEMA = pa.schema([
    ("object_id", pa.int64()), ("photometry", pa.list_(pa.list_(pa.float32()))),
    ("spectra", pa.list_(pa.list_(pa.float32()))), ("metadata", pa.list_(pa.float32())), ("label", pa.string()),
    *[(key, pa.float64()) for key in ("true_period", "true_amplitude", "teff", "distance_pc")],
])


def write(out_dir: Path, n: int, seed: int, chunk: int = CHUNK, missing: dict[str, float] | None = None) -> Path:
    """Write `n` objects (80/10/10 train/validation/test), `chunk` at a time; `missing`: shares of
    absent light curves / spectra and of missing catalogue values (see the module docstring)."""
    rates = check_missing(missing, MISSING, "astrom3")
    rng, holes = np.random.default_rng(seed), missing_rng(seed)
    names = list(CLASS_TABLE)
    shares = np.array([CLASS_TABLE[c][0] for c in names], dtype=np.float64)
    labels = rng.choice(len(names), size=n, p=shares / shares.sum())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bounds = np.cumsum([0] + [int(round(f * n)) for _, f in SPLITS[:-1]] + [n])
    bounds[-1] = n
    for (split, _), lo, hi in zip(SPLITS, bounds[:-1], bounds[1:], strict=True):
        tables = (_incomplete(_objects([names[i] for i in labels[a:b]], a, rng), rates, holes)
                  for a, b in chunk_bounds(int(lo), int(max(lo, hi)), chunk))
        write_parquet(out_dir / f"{split}-00000-of-00001.parquet", tables, SCHEMA, ROW_GROUP)
    return out_dir


def _incomplete(table: pa.Table, rates: dict[str, float], rng: np.random.Generator) -> pa.Table:
    if not rates:
        return table
    table = drop_modalities(table, rates, {"photometry": ["photometry"], "spectra": ["spectra"]}, rng)
    return blank_values(table, "metadata", rates.get("metadata", 0.0), rng, positions=slice(0, N_CATALOGUE))


def _objects(classes: list[str], first: int, rng: np.random.Generator) -> pa.Table:
    """The rows of objects `first`, `first + 1`, ... of the given classes."""
    columns: dict[str, list] = {field.name: [] for field in SCHEMA}
    for i, name in enumerate(classes):
        _, periods, amplitudes, shape, teffs, abs_mags = CLASS_TABLE[name]
        period = float(np.exp(rng.uniform(*np.log(periods))))
        amplitude = float(rng.uniform(*amplitudes))
        teff = float(rng.uniform(*teffs))
        vmag = float(rng.uniform(10.0, 16.0))
        extinction = float(rng.uniform(0.0, 1.0))
        distance = float(10 ** ((vmag - rng.uniform(*abs_mags) - extinction) / 5 + 1))
        columns["object_id"].append(100000 + first + i)
        columns["photometry"].append(light_curve(shape, period, amplitude, vmag, rng))
        columns["spectra"].append(spectrum(teff, vmag, rng))
        columns["metadata"].append(metadata(name, teff, vmag, distance, period, amplitude, rng))
        columns["label"].append(name)
        columns["true_period"].append(period)
        columns["true_amplitude"].append(amplitude)
        columns["teff"].append(teff)
        columns["distance_pc"].append(distance)
    return pa.table({
        "object_id": pa.array(columns["object_id"], pa.int64()),
        "photometry": nested(columns["photometry"]),
        "spectra": nested(columns["spectra"]),
        "metadata": pa.array([m.tolist() for m in columns["metadata"]], pa.list_(pa.float32())),
        "label": pa.array(columns["label"], pa.string()),
        **{key: pa.array(columns[key], pa.float64()) for key in ("true_period", "true_amplitude", "teff", "distance_pc")},
    })
