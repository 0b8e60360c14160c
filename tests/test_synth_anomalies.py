"""Planted anomalies of the synthetic Euclid + DESI sample: the rate, every kind, each one visible in
the raw data by a statistic of its own, reproducible, and absent unless asked for."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fmb.data.images import decode_image
from fmb.data.surveys.euclid_desi import DESI_WAVELENGTH
from fmb.data.synth import euclid_desi as synth
from fmb.data.synth import galaxies as gal
from fmb.data.synth.planted import KINDS, QUASAR_LINES, anomaly_rng, plant
from fmb.errors import ConfigError
from fmb.evaluation import views
from fmb.models import write_synthetic
from tests.cli_runner import run_cli
from tests.extras import need

RATE = 0.6


@pytest.fixture(scope="module")
def planted():
    """A 32-px chunk with 60% of its objects planted (about 30 of each kind), and their kinds."""
    chunk = synth.make_chunk(480, seed=11, image_size=32)
    return chunk, plant(chunk, RATE, anomaly_rng(11))


def of_kind(kinds: np.ndarray, name: str | None) -> np.ndarray:
    return np.array([k == name for k in kinds])


def separates(stat: np.ndarray, kinds: np.ndarray, name: str, among: np.ndarray | None = None,
              share: float = 0.9, percentile: float = 99.0) -> float:
    """Share of the objects of kind `name` (`among` a subset) whose statistic is above `percentile`
    of the normal objects' (of the same subset); asserted to be at least `share`."""
    among = np.ones(len(kinds), bool) if among is None else among
    normal, planted = stat[of_kind(kinds, None) & among], stat[of_kind(kinds, name) & among]
    assert len(planted) >= 10 and len(normal) >= 50
    found = np.mean(planted > np.percentile(normal, percentile))
    assert found >= share, (name, found)
    return found


def test_rate_is_honoured_and_every_kind_appears(planted):
    _, kinds = planted
    n, chosen = len(kinds), ~of_kind(kinds, None)
    assert abs(chosen.mean() - RATE) < 4 * np.sqrt(RATE * (1 - RATE) / n)
    counts = {name: int(of_kind(kinds, name).sum()) for name in KINDS}
    expected = n * RATE / len(KINDS)
    assert all(count > expected / 2 for count in counts.values()), counts


def test_the_truth_follows_the_planted_kind(planted):
    chunk, kinds = planted
    g = chunk.galaxies
    quasars, lenses = of_kind(kinds, "quasar"), of_kind(kinds, "lens_arc")
    assert (g.kind[quasars] == gal.QUASAR).all() and (chunk.radius[quasars] == 0).all()
    # lenses are massive early types beyond z 0.2, not nearby dwarfs
    assert (g.kind[lenses] == gal.EARLY).all() and (g.redshift[lenses] >= 0.2).all() and (g.luminosity[lenses] >= 2).all()
    assert (g.kind[of_kind(kinds, "extreme_emission")] == gal.LATE).all()
    assert set(g.kind[of_kind(kinds, None)]) == {gal.EARLY, gal.LATE}


def test_image_artefacts_show_in_the_vis_cutout(planted):
    chunk, kinds = planted
    vis, sky = chunk.bands["VIS"].astype(np.float64), chunk.sky["VIS"]
    # satellite streak: it crosses the whole cutout, so the border has narrow bright crossings
    # (galaxy light there changes slowly along the border)
    ring = np.concatenate([vis[:, 0, :], vis[:, 1:, -1], vis[:, -1, -2::-1], vis[:, -2:0:-1, 0]], axis=1)
    crossing = ring - 0.5 * (np.roll(ring, 4, axis=1) + np.roll(ring, -4, axis=1))
    separates(np.nanmax(crossing, axis=1) / sky, kinds, "satellite_streak")
    # saturated star: a flat plateau of pixels at the maximum (the core and the bleed column)
    at_max = (vis == np.nanmax(vis, axis=(1, 2), keepdims=True)).sum(axis=(1, 2))
    assert (at_max[of_kind(kinds, "bleed_trail")] >= 5).all() and (at_max[of_kind(kinds, None)] == 1).all()
    # cosmic rays: bright pixels sharper than the PSF allows (a pixel far above its four neighbours)
    filled = np.nan_to_num(vis)
    padded = np.pad(filled, ((0, 0), (1, 1), (1, 1)), mode="edge")
    neighbours = (padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]) / 4
    sharpness = np.where(filled > 20 * sky, (filled - neighbours) / np.maximum(filled, 1e-12), 0.0).max(axis=(1, 2))
    separates(sharpness, kinds, "cosmic_rays")
    # masked patch: NaN pixels, and only there
    has_nan = np.isnan(vis).any(axis=(1, 2))
    assert has_nan[of_kind(kinds, "masked_patch")].all() and not has_nan[~of_kind(kinds, "masked_patch")].any()


def test_a_masked_patch_is_black_in_every_channel_of_the_rgb_image(planted):
    chunk, kinds = planted
    rows = np.flatnonzero(of_kind(kinds, "masked_patch"))
    table = synth.chunk_table(chunk, anomalies=kinds).take(pa.array(rows))
    rgb = np.stack([decode_image(cell["bytes"]) for cell in table.column("RGB_image").to_pylist()])
    hole = np.isnan(chunk.bands["VIS"][rows])
    assert (rgb[hole] == 0).all()
    # around the patch, the galaxy and the sky keep their colour
    assert (rgb[~hole].max(axis=-1) > 0).mean() > 0.3


def test_a_brighter_saturated_star_bleeds_a_longer_trail(planted):
    chunk, kinds = planted
    vis = chunk.bands["VIS"][of_kind(kinds, "bleed_trail")]
    plateau = vis == vis.max(axis=(1, 2), keepdims=True)
    column = plateau.sum(axis=1).argmax(axis=1)  # the trail's
    trail = plateau[np.arange(len(vis)), :, column].sum(axis=1)
    core = plateau.sum(axis=(1, 2)) - trail  # the saturated disc beside the column grows with the star
    assert len(vis) >= 20 and np.corrcoef(np.argsort(np.argsort(core)), np.argsort(np.argsort(trail)))[0, 1] > 0.6
    assert trail.max() >= 3 * trail.min()


def test_rare_objects_show_in_images_and_spectra(planted):
    chunk, kinds = planted
    size = chunk.bands["VIS"].shape[-1]
    coords = np.arange(size) - (size - 1) / 2.0
    radius = np.hypot(*np.meshgrid(coords, coords, indexing="ij"))
    vis, sky = np.nan_to_num(chunk.bands["VIS"].astype(np.float64)), chunk.sky["VIS"]
    aperture = radius < 12
    light = (vis * aperture).sum(axis=(1, 2))
    bright = light / (sky * np.sqrt(aperture.sum())) > 50  # where a shape can be measured above the noise
    # lens arc and merger: light that breaks the half-turn symmetry of a galaxy (Sersic profiles and
    # two-armed spirals have it): the CAS asymmetry, less what the sky noise alone gives
    residual = (np.abs(vis - vis[:, ::-1, ::-1]) * aperture).sum(axis=(1, 2))
    asymmetry = (residual - aperture.sum() * sky * 2 / np.sqrt(np.pi)) / light
    separates(asymmetry, kinds, "lens_arc", bright)
    separates(asymmetry, kinds, "merger", bright)
    # quasar: a point source, more of its light in the central 3 x 3 pixels than any galaxy
    centre = slice(size // 2 - 2, size // 2 + 1)
    core = vis[:, centre, centre].sum(axis=(1, 2)) / (vis * (radius < 8)).sum(axis=(1, 2))
    separates(core, kinds, "quasar")
    # extreme emission-line galaxy: the equivalent width of the lines (Angstrom, observed)
    level = continuum(chunk.flux)
    above = (chunk.flux - level) / chunk.error > 5
    typical = np.median(level, axis=1)
    measurable = chunk.has_spectrum & (typical / np.median(chunk.error, axis=1) > 0.3)
    width = np.where(above, chunk.flux - level, 0.0).sum(axis=1) * 0.8 / np.maximum(typical, 1e-9)
    # (0.89-1.0 over seeds 11-16: at z > 0.5 on a faint continuum the weakest lines fall under 5 sigma)
    separates(width, kinds, "extreme_emission", measurable, share=0.85)


def test_a_mismatched_spectrum_shows_another_redshift(planted):
    chunk, kinds = planted
    z_spec = line_redshift(chunk.flux, chunk.error)
    offset = np.abs(z_spec - chunk.galaxies.redshift)
    swapped = of_kind(kinds, "spectrum_mismatch")
    assert swapped.sum() >= 15 and chunk.has_spectrum[swapped].all()
    assert np.mean(offset[swapped] > 0.05) >= 0.8
    # the same estimate finds the catalogue redshift of normal galaxies with lines above the noise
    lines = ((chunk.flux - continuum(chunk.flux)) / chunk.error).max(axis=1) > 10
    normal = of_kind(kinds, None) & chunk.has_spectrum & (chunk.galaxies.kind == gal.LATE) & lines
    assert normal.sum() >= 10 and np.mean(offset[normal] < 0.01) >= 0.8


def test_synthetic_lines_sit_where_the_views_mark_them():
    # DESI spectra and the markers are in vacuum; air wavelengths would sit ~1.8 (1 + z) A blue of them
    g = gal.sample_galaxies(1, np.random.default_rng(0))
    g.kind[:], g.line_strength[:], g.redshift[:] = gal.LATE, 300.0, 0.2
    flux = gal.observed_sed(g, DESI_WAVELENGTH)[0]
    marked = views.observed_lines(0.2, DESI_WAVELENGTH[0], DESI_WAVELENGTH[-1])
    for name, where, _ in marked:
        if name in ("Hα", "Hβ", "[OII]"):
            near = np.abs(DESI_WAVELENGTH - where) < 10
            assert abs(DESI_WAVELENGTH[near][flux[near].argmax()] - where) <= 0.5, name
    assert set(QUASAR_LINES) <= {rest for _, rest, _ in views.SPECTRAL_LINES}


def continuum(flux: np.ndarray, width: int = 151) -> np.ndarray:
    """Running mean over `width` pixels: the continuum under lines of a few pixels."""
    padded = np.pad(flux.astype(np.float64), ((0, 0), (width // 2, width // 2)), mode="edge")
    total = np.cumsum(padded, axis=1)
    total = np.concatenate([np.zeros((len(flux), 1)), total], axis=1)
    return (total[:, width:] - total[:, :-width]) / width


def line_redshift(flux: np.ndarray, error: np.ndarray) -> np.ndarray:
    """Redshift whose emission-line comb best matches the spectrum's positive excess."""
    excess = np.clip((flux - continuum(flux)) / error, 0.0, 50.0)
    grid = np.arange(0.0, 1.9, 0.0005)
    position = np.rint((gal.EMISSION_LINES[None, :] * (1 + grid[:, None]) - DESI_WAVELENGTH[0]) / 0.8).astype(int)
    inside = (position >= 0) & (position < excess.shape[1])
    score = (excess[:, np.where(inside, position, 0)] * (inside * gal.EMISSION_RATIOS)).sum(axis=2)
    return grid[score.argmax(axis=1)]


# ----------------------------------------------------------------------------- files


def digest(root) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.parquet"))}


def test_files_reproducible_and_anomaly_free_unless_asked(tmp_path):
    synth.write(tmp_path / "default", 40, seed=2, image_size=16)
    synth.write(tmp_path / "zero", 40, seed=2, image_size=16, anomalies=0.0)
    assert digest(tmp_path / "default") == digest(tmp_path / "zero")
    assert "truth_anomaly" not in pq.read_schema(next((tmp_path / "default").rglob("train-*.parquet"))).names
    for name in ("a", "b"):
        synth.write(tmp_path / name, 40, seed=2, image_size=16, anomalies=0.5, chunk=16)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    synth.write(tmp_path / "c", 40, seed=3, image_size=16, anomalies=0.5, chunk=16)
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_only_the_planted_objects_change(tmp_path):
    synth.write(tmp_path / "clean", 60, seed=4, image_size=16, chunk=16)
    synth.write(tmp_path / "planted", 60, seed=4, image_size=16, chunk=16, anomalies=0.3)
    for split in ("train", "test"):
        clean = pq.read_table(next((tmp_path / "clean").rglob(f"{split}-*.parquet"))).to_pylist()
        planted = pq.read_table(next((tmp_path / "planted").rglob(f"{split}-*.parquet"))).to_pylist()
        for before, after in zip(clean, planted, strict=True):
            kind = after.pop("truth_anomaly")
            if kind is None:
                assert before == after
            else:
                assert kind in KINDS and before["object_id"] == after["object_id"] and before != after


def test_missing_modalities_keep_every_planted_anomaly_visible(tmp_path):
    missing = {"spectrum": 0.5, "image": 0.3}
    synth.write(tmp_path / "holes", 300, seed=6, image_size=16, missing=missing)
    synth.write(tmp_path / "planted", 300, seed=6, image_size=16, missing=missing, anomalies=RATE)
    holes = pq.read_table(tmp_path / "holes" / "data", columns=["object_id", "VIS_image", "spectrum"]).sort_by("object_id")
    rows = pq.read_table(tmp_path / "planted" / "data", columns=["object_id", "VIS_image", "spectrum", "truth_anomaly"])
    rows = rows.sort_by("object_id")
    image, spectrum = (rows.column(c).is_valid().to_numpy(zero_copy_only=False) for c in ("VIS_image", "spectrum"))
    kinds = np.array(rows.column("truth_anomaly").to_pylist(), dtype=object)
    # the holes fall on the same objects with and without anomalies
    kept = {c: holes.column(c).is_valid().to_numpy(zero_copy_only=False) for c in ("VIS_image", "spectrum")}
    assert (kept["VIS_image"] == image).all()
    assert spectrum[kept["spectrum"]].all()  # (planting gives spectra to some of the 8% born without)
    # every planted object keeps what its kind is seen in
    needs_image = ["spectrum_mismatch", "satellite_streak", "bleed_trail", "cosmic_rays", "masked_patch", "lens_arc", "merger"]
    for name in needs_image:
        assert image[of_kind(kinds, name)].all(), name
    assert spectrum[of_kind(kinds, "spectrum_mismatch")].all()
    for name in ("quasar", "extreme_emission"):
        assert (image | spectrum)[of_kind(kinds, name)].all(), name
    assert of_kind(kinds, None)[~image & ~spectrum].all()
    # and the rate holds among the objects that can show something
    shown = ~of_kind(kinds, None)[image]
    assert abs(shown.mean() - RATE) < 4 * np.sqrt(RATE * (1 - RATE) / len(shown))
    assert set(kinds[~of_kind(kinds, None)]) == set(KINDS)


def test_bad_rates_and_other_generators_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="between 0 and 1"):
        synth.write(tmp_path, 4, 0, image_size=16, anomalies=1.5)
    with pytest.raises(ConfigError, match="no option anomalies"):
        write_synthetic("astrom3", tmp_path, 4, 0, anomalies=0.1)


def test_truth_anomaly_travels_into_embedding_files(monkeypatch, capsys, tmp_path):
    data = tmp_path / "planted"
    code, _, err = run_cli(monkeypatch, capsys, "data", "synth", "euclid-desi", "-o", str(data), "-n", "24",
                           "--anomalies", "0.5")
    assert code == 0, err
    run = tmp_path / "run"
    code, _, err = run_cli(monkeypatch, capsys, "retrain", "astropt", "--demo", "--out", str(run), "--max-steps", "1",
                           "--no-progress", "--set", "data.synthetic=16", "--set", "data.image_size=32", "--set", "train.batch_size=4",
                           "--set", "train.num_workers=0", "--set", "model.n_layer=1")
    assert code == 0, err
    out = tmp_path / "emb.parquet"
    code, _, err = run_cli(monkeypatch, capsys, "embed", "astropt", "--checkpoint", str(run), "--out", str(out),
                           "--data", str(data), "--batch-size", "5")  # batches of only normal objects too
    assert code == 0, err
    embedded = pq.read_table(out).sort_by("object_id")
    truth = pq.read_table(data / "data", columns=["object_id", "truth_anomaly"]).sort_by("object_id")
    assert embedded.schema.field("truth_anomaly").type == pa.string()
    assert embedded.column("truth_anomaly").to_pylist() == truth.column("truth_anomaly").to_pylist()
    assert embedded.column("truth_anomaly").null_count > 0
    # a text truth column does not disturb the probes of other targets, and is classes when named
    need("sklearn")  # the probes
    code, out, err = run_cli(monkeypatch, capsys, "evaluate", str(out), "--target", "redshift", "--target",
                             "truth_anomaly", "--probes", "knn", "--fractions", "1.0", "--folds", "2", "--k", "3",
                             "--out", str(tmp_path / "evaluation"))
    assert code == 0, err
    rows = (tmp_path / "evaluation" / "results.csv").read_text()
    assert ",redshift,knn," in rows and ",truth_anomaly,knn,1.0,accuracy," in rows
