"""Synthetic S-PLUS hypercube fields (`datacube_<FIELD>.parquet`) in the real schema.

One row per source: identity, 12-band PSTOTAL magnitudes, detection morphology, 96 x 96
cutouts in 12 bands (only for some rows, like upstream which kept them for Gaia matches),
Gaia DR3 and Gaia XP columns, DESI b/r/z arms, spec-z and VISTA. Most matched columns are
null for most rows. The latent truth is stored as ordinary columns (`truth_class`,
`truth_redshift`) so that learning can be checked.

The physics is a caricature chosen so that the modalities share information: colours carry
a 4000 Angstrom break that moves with redshift, DESI spectra carry emission lines at the
same redshift, cutouts follow the catalogue shape, Gaia fluxes follow the magnitudes.

`missing={modality: rate}` removes more on top of the survey's own incompleteness: `image`
(the cutouts), `desi`, `gaia_xp`, `gaia` (scalars), `specz`, `vista` for a share of the rows,
and `photometry`: each band's magnitude and error for a share of the rows, band by band.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from fmb.data.surveys.splus import (
    BAND_WAVELENGTHS,
    BANDS,
    CLASSES,
    CUTOUT_BANDS,
    CUTOUT_SIZE,
    DESI_ARMS,
    GAIA_SCALARS,
    MORPHOLOGY,
    VISTA_BANDS,
    XP_COEFFICIENTS,
)
from fmb.data.synth import (
    CHUNK,
    check_missing,
    chunk_bounds,
    drop_modalities,
    missing_rng,
    write_parquet,
)

# Fractions of rows with each match (the real fields have Gaia ~10%, DESI ~3%, spec-z ~6%;
# DESI and cutouts are a little more common here so that a small demo sees enough of them).
FIELDS = 3
P_CUTOUT = 0.3
P_DESI = 0.08
P_EXTRA_SPECZ = 0.04
P_VISTA = 0.3
P_MAG_NULL = 0.03


MISSING = ("image", "desi", "gaia_xp", "gaia", "specz", "vista", "photometry")  # the names `missing` takes


def missing_columns(names: list[str]) -> dict[str, list[str]]:
    """The columns each `missing` modality nulls together (photometry: one group per band)."""
    groups = {"image": [c for c in names if c.startswith("splus_cut_")],
              "desi": [c for c in names if c.startswith("desi_")],
              "gaia_xp": [c for c in names if c.startswith("gaiaxp_")],
              "gaia": [c for c in names if c.startswith("gaia_")],
              "specz": [c for c in names if c.startswith("specz_")],
              "vista": [c for c in names if c.startswith("vista_")]}
    groups.update({f"photometry_{b}": [f"mag_pstotal_{b}", f"err_mag_pstotal_{b}"] for b in BANDS})
    return groups


def _incomplete(table: pa.Table, rates: dict[str, float], rng: np.random.Generator) -> pa.Table:
    if not rates:
        return table
    per_group = {**rates, **{f"photometry_{b}": rates.get("photometry", 0.0) for b in BANDS}}
    return drop_modalities(table, per_group, missing_columns(table.column_names), rng)


def write(out_dir: Path, n: int, seed: int, chunk: int = CHUNK, missing: dict[str, float] | None = None) -> Path:
    """Write `n` sources spread over a few `datacube_<FIELD>.parquet` files, `chunk` rows at a time;
    returns the directory. `missing`: extra shares of absent modalities (see the module docstring)."""
    rates = check_missing(missing, MISSING, "splus")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng, holes = np.random.default_rng(seed), missing_rng(seed)
    bounds = np.linspace(0, n, min(FIELDS, n) + 1).astype(int)
    for k in range(len(bounds) - 1):
        field = f"SYN{seed % 1000:03d}-{k + 1:04d}"
        tables = (_incomplete(field_table(field, end - first, rng, first), rates, holes)
                  for first, end in chunk_bounds(0, bounds[k + 1] - bounds[k], chunk))
        write_parquet(out_dir / f"datacube_{field}.parquet", tables, None, 256)
    return out_dir


def field_table(field: str, n: int, rng: np.random.Generator, first: int = 0) -> pa.Table:
    """`n` rows of one field's hypercube table, from source number `first` on."""
    cls = rng.choice(len(CLASSES), size=n, p=[0.3, 0.6, 0.1])
    z = np.where(cls == 0, 0.0, np.where(cls == 1, rng.gamma(2.0, 0.15, n), rng.uniform(0.5, 3.0, n)))
    z = np.clip(z, 0.0, 4.0)
    # A few bright sources (outside the usual 14 < r < 22 selection) give Gaia fluxes above 65504.
    mag_r = np.where(rng.random(n) < 0.04, rng.uniform(11.0, 14.0, n), rng.uniform(14.0, 22.5, n))
    mags = _magnitudes(cls, z, mag_r, rng)
    errs = np.clip(0.01 * 10 ** (0.4 * (mags - 19.0)), 0.002, 3.0)
    mags_obs = mags + errs * rng.standard_normal(mags.shape)

    cols: dict[str, pa.Array] = {
        "id": pa.array([f"iDR6_{field}_{first + i:06d}" for i in range(n)]),
        "ra": pa.array(rng.uniform(0.0, 360.0, n)),
        "dec": pa.array(rng.uniform(-60.0, 10.0, n)),
    }
    null_mag = rng.random(mags.shape) < P_MAG_NULL
    for j, band in enumerate(BANDS):
        cols[f"mag_pstotal_{band}"] = _f32(mags_obs[:, j], null_mag[:, j])
        cols[f"err_mag_pstotal_{band}"] = _f32(errs[:, j], null_mag[:, j])

    a, b, theta = _shapes(cls, z, mag_r, rng)
    fwhm = np.where(cls == 1, 1.2 + 0.8 * a, 1.0 + 0.05 * rng.standard_normal(n))
    morph = {"ellipticity_det": 1 - b / a, "elongation_det": a / b, "a_pixel_det": a, "b_pixel_det": b,
             "theta_det": theta, "fwhm_n_det": fwhm}
    for name in MORPHOLOGY:
        cols[name] = _f32(morph[name], np.zeros(n, bool))

    # Gaia: bright sources, mostly stars; cutouts for every Gaia match plus some others.
    gaia = (mag_r < 20.5) & (rng.random(n) < np.where(cls == 0, 0.5, 0.08))
    has_cut = gaia | (rng.random(n) < P_CUTOUT)
    cutouts = _cutouts(mags_obs, a, b, theta, has_cut, rng)
    for j, band in enumerate(CUTOUT_BANDS):
        cols[f"splus_cut_{band}"] = _lists(cutouts[j], has_cut, pa.float32())
    cols.update(_gaia(cls, mags, gaia, rng))

    desi = (mag_r < 21.5) & (rng.random(n) < P_DESI / 0.9)
    cols.update(_desi(cls, z, mag_r, desi, rng))
    specz = desi | (rng.random(n) < P_EXTRA_SPECZ)
    e_z = np.where(desi, 1e-4, 3e-3) * (1 + z)
    cols["specz_z"] = _f32(z + e_z * rng.standard_normal(n), ~specz)
    cols["specz_e_z"] = _f32(e_z, ~specz)

    vista = rng.random(n) < P_VISTA
    offsets = {"y": -0.4, "j": -0.7, "h": -1.1, "ks": -1.3}
    for band in VISTA_BANDS:
        vmag = mag_r + offsets[band] * np.where(cls == 1, 1.0 + z, 0.6) + 0.05 * rng.standard_normal(n)
        cols[f"vista_{band}apermag6"] = _f32(vmag, ~vista)
        cols[f"vista_{band}apermag6err"] = _f32(np.clip(0.02 * 10 ** (0.4 * (vmag - 18)), 0.005, 1.0), ~vista)

    cols["truth_class"] = pa.array([CLASSES[c] for c in cls])
    cols["truth_redshift"] = pa.array(z.astype(np.float32))
    return pa.table(cols)


def _f32(values: np.ndarray, null: np.ndarray) -> pa.Array:
    return pa.array(values.astype(np.float32), mask=np.asarray(null, bool))


def _lists(values: np.ndarray, present: np.ndarray, kind: pa.DataType) -> pa.Array:
    """A list column from a dense (n, L) array, null where `present` is False."""
    present = np.asarray(present, bool)
    length = values.shape[1]
    # Null rows take no space in the child array.
    flat = pa.array(values[present].reshape(-1).astype(kind.to_pandas_dtype()), type=kind)
    offsets = pa.array(np.concatenate([[0], np.cumsum(present * length)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, flat, mask=pa.array(~present))


def _magnitudes(cls: np.ndarray, z: np.ndarray, mag_r: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Magnitudes (n, 12): a class-dependent slope plus a 4000 A break (galaxies) or Lyman
    break (quasars) at the source's redshift, anchored at r."""
    wave = np.asarray(BAND_WAVELENGTHS, float)[None, :]
    slope = np.choose(cls, [rng.normal(-0.8, 0.4, len(cls)), rng.normal(-0.5, 0.2, len(cls)),
                            rng.normal(0.3, 0.2, len(cls))])[:, None]
    mags = mag_r[:, None] + slope * (wave - 6258.0) / 1000.0
    gal_break = (cls == 1)[:, None] & (wave < 4000.0 * (1 + z[:, None]))
    qso_break = (cls == 2)[:, None] & (wave < 1216.0 * (1 + z[:, None]))
    return mags + 1.2 * gal_break + 2.0 * qso_break


def _shapes(cls: np.ndarray, z: np.ndarray, mag_r: np.ndarray,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(cls)
    size = np.clip(6.0 * 10 ** (-0.1 * (mag_r - 16)) / (1 + 2 * z), 1.0, 12.0)
    a = np.where(cls == 1, size * rng.uniform(0.8, 1.2, n), rng.uniform(1.0, 1.4, n))
    ratio = np.where(cls == 1, rng.uniform(0.3, 1.0, n), rng.uniform(0.9, 1.0, n))
    return a, a * ratio, rng.uniform(-90.0, 90.0, n)


def _cutouts(mags: np.ndarray, a: np.ndarray, b: np.ndarray, theta: np.ndarray, present: np.ndarray,
             rng: np.random.Generator) -> np.ndarray:
    """Cutouts (12, n, 9216): an elliptical Gaussian of the band's flux plus sky noise; zeros
    for rows without cutouts (stored as null)."""
    n = len(a)
    out = np.zeros((len(BANDS), n, CUTOUT_SIZE * CUTOUT_SIZE), np.float32)
    rows = np.flatnonzero(present)
    if rows.size == 0:
        return out
    grid = np.arange(CUTOUT_SIZE) - (CUTOUT_SIZE - 1) / 2
    dy, dx = np.meshgrid(grid, grid, indexing="ij")
    t = np.deg2rad(theta[rows])[:, None, None]
    u = dx * np.cos(t) + dy * np.sin(t)
    v = -dx * np.sin(t) + dy * np.cos(t)
    profile = np.exp(-0.5 * ((u / a[rows, None, None]) ** 2 + (v / b[rows, None, None]) ** 2))
    profile /= profile.sum(axis=(1, 2), keepdims=True)
    flux = 10 ** (-0.4 * (np.nan_to_num(mags[rows], nan=25.0) - 25.0))  # zero point 25
    for j in range(len(BANDS)):
        image = flux[:, j, None, None] * profile + rng.normal(0.0, 0.1, profile.shape)
        out[j, rows] = image.reshape(len(rows), -1)
    return out


def _gaia(cls: np.ndarray, mags: np.ndarray, match: np.ndarray, rng: np.random.Generator) -> dict[str, pa.Array]:
    n = len(cls)
    g_mag = mags[:, BANDS.index("g")] * 0.4 + mags[:, BANDS.index("r")] * 0.6
    bp_mag = mags[:, BANDS.index("g")] + 0.1
    rp_mag = mags[:, BANDS.index("i")] - 0.1
    star = cls == 0
    values = {
        "parallax": np.where(star, rng.gamma(2.0, 0.5, n), 0.0) + 0.1 * rng.standard_normal(n),
        "pmra": np.where(star, rng.normal(0, 8, n), 0.0) + 0.2 * rng.standard_normal(n),
        "pmdec": np.where(star, rng.normal(-3, 8, n), 0.0) + 0.2 * rng.standard_normal(n),
        # Fluxes in e-/s (zero points 25.69, 25.34, 24.76): bright sources exceed 65504.
        "phot_g_mean_flux": 10 ** (-0.4 * (g_mag - 25.69)),
        "phot_bp_mean_flux": 10 ** (-0.4 * (bp_mag - 25.34)),
        "phot_rp_mean_flux": 10 ** (-0.4 * (rp_mag - 24.76)),
        "teff_gspphot": rng.uniform(3500, 9000, n),
        "logg_gspphot": rng.uniform(3.5, 5.0, n),
        "mh_gspphot": rng.normal(-0.3, 0.4, n),
    }
    for name in ("parallax", "pmra", "pmdec"):
        values[f"{name}_error"] = 0.02 * 10 ** (0.2 * (g_mag - 15)) * rng.uniform(0.8, 1.2, n)
    for band in ("g", "bp", "rp"):
        flux = values[f"phot_{band}_mean_flux"]
        values[f"phot_{band}_mean_flux_error"] = np.sqrt(flux) + 0.001 * flux
    cols = {}
    for name in GAIA_SCALARS:
        null = ~match | (~star & name.endswith("gspphot"))
        cols[f"gaia_{name}"] = _f32(values[name], null)
    cols["gaia_source_id"] = pa.array(rng.integers(1, 2**62, n), mask=~match)
    # XP: smooth coefficient sequences whose shape follows the colour.
    k = np.arange(XP_COEFFICIENTS)[None, :]
    colour = (bp_mag - rp_mag)[:, None]
    for band, flux in (("bp", values["phot_bp_mean_flux"]), ("rp", values["phot_rp_mean_flux"])):
        scale = (flux / 100.0)[:, None]
        coef = scale * np.exp(-k / 12.0) * np.cos(k * (0.4 + 0.2 * colour)) * (1 + 0.02 * rng.standard_normal((n, 55)))
        err = 0.01 * np.abs(coef) + 0.002 * scale
        cols[f"gaiaxp_{band}_coefficients"] = _lists(coef, match, pa.float32())
        cols[f"gaiaxp_{band}_coefficient_errors"] = _lists(err, match, pa.float32())
    return cols


def _desi(cls: np.ndarray, z: np.ndarray, mag_r: np.ndarray, match: np.ndarray,
          rng: np.random.Generator) -> dict[str, pa.Array]:
    """DESI b/r/z arms: continuum + emission lines at (1 + z), ivar from the noise level."""
    lines = {0: (6563.0, 4861.0), 1: (3727.0, 4861.0, 5007.0, 6563.0), 2: (1216.0, 1549.0, 2798.0, 4861.0)}
    cols: dict[str, pa.Array] = {}
    level = 10 ** (-0.4 * (mag_r - 20.0))  # 1e-17 erg/s/cm2/A units, roughly
    for arm, (lo, hi) in DESI_ARMS.items():
        wave = np.arange(lo, hi + 0.4, 0.8)
        n, length = len(cls), len(wave)
        flux = np.zeros((n, length), np.float32)
        for i in np.flatnonzero(match):
            shape = level[i] * (wave / 5500.0) ** (-1.5 if cls[i] == 2 else 0.5 if cls[i] == 1 else -2.0)
            for rest in lines[int(cls[i])]:
                centre = rest * (1 + z[i])
                sign = -0.5 if cls[i] == 0 else 1.0  # absorption in stars
                shape = shape + sign * 3 * level[i] * np.exp(-0.5 * ((wave - centre) / (3.0 * (1 + z[i]))) ** 2)
            flux[i] = shape
        sigma = 0.1 * level[:, None] + 0.02
        noisy = flux + sigma * rng.standard_normal((n, length))
        ivar = np.broadcast_to(1.0 / sigma**2, (n, length)).copy()
        ivar[rng.random((n, length)) < 0.01] = 0.0  # masked pixels
        cols[f"desi_wave_{arm}"] = _lists(np.broadcast_to(wave, (n, length)), match, pa.float64())
        cols[f"desi_flux_{arm}"] = _lists(noisy, match, pa.float32())
        cols[f"desi_ivar_{arm}"] = _lists(ivar, match, pa.float32())
    return cols
