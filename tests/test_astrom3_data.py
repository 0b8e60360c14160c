"""AstroM3 data: preprocessing against hand-computed values, bad input, the dataset over files
in the real schema, the synthetic generator, and the classification metrics."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fmb.data.missing import ColumnStatistics
from fmb.data.surveys.astrom3 import CLASSES, METADATA_NAMES
from fmb.errors import DataError
from fmb.models import write_synthetic
from fmb.models.astrom3.data import (
    WAVELENGTH_GRID,
    AstroM3Dataset,
    BadRow,
    clean_light_curve,
    crop_light_curve,
    prepare_metadata,
    preprocess_spectrum,
)
from fmb.models.astrom3.trainer import classification_metrics


def good_spectrum() -> np.ndarray:
    wave = np.linspace(3800.0, 9100.0, 400)
    return np.stack([wave, 1.0 + wave / 1000.0, np.full_like(wave, 0.1)], axis=1)


def good_metadata(period: float = 10.0) -> np.ndarray:
    meta = np.arange(1.0, 39.0)
    meta[METADATA_NAMES.index("period")] = period
    return meta


def write_rows(path, rows: list[dict]) -> None:
    nested = pa.list_(pa.list_(pa.float32()))
    table = pa.table({
        "object_id": pa.array([r.get("object_id", 7 + i) for i, r in enumerate(rows)], pa.int64()),
        "photometry": pa.array([None if r["photometry"] is None else np.asarray(r["photometry"]).tolist() for r in rows], nested),
        "spectra": pa.array([None if r.get("spectra", 0) is None else np.asarray(r.get("spectra", good_spectrum())).tolist()
                             for r in rows], nested),
        "metadata": pa.array([None if r.get("metadata", 0) is None else np.asarray(r.get("metadata", good_metadata())).tolist()
                              for r in rows], pa.list_(pa.float32())),
        "label": pa.array([r.get("label", "EW") for r in rows], pa.string()),
    })
    pq.write_table(table, path)


# ----------------------------------------------------------------------------- preprocessing


def test_schema_constants():
    assert len(METADATA_NAMES) == 38 and METADATA_NAMES[34:] == ["amplitude", "period", "lksl_statistic", "rfr_score"]
    assert len(WAVELENGTH_GRID) == 2575 and WAVELENGTH_GRID[0] == 3850 and WAVELENGTH_GRID[-1] == 8998
    assert CLASSES == sorted(CLASSES) and len(CLASSES) == 10


def test_light_curve_hand_computed():
    # Unsorted, one duplicated epoch (the first copy is kept), one NaN flux, one zero error.
    lc = np.array([
        [30.0, 4.0, 0.2],
        [10.0, 2.0, 0.1],
        [20.0, 3.0, 0.1],
        [10.0, 9.0, 0.1],
        [25.0, np.nan, 0.1],
        [26.0, 5.0, 0.0],
        [50.0, 11.0, 0.4],
    ])
    out = clean_light_curve(lc)
    # Kept: t = 10, 20, 30, 50; of the two rows at t = 10 the first in the file (flux 2) wins.
    flux = np.array([2.0, 3.0, 4.0, 11.0])
    mad = np.median(np.abs(flux - np.median(flux)))  # median 3.5 -> |dev| 1.5 0.5 0.5 7.5 -> 1.0
    assert mad == 1.0
    np.testing.assert_allclose(out[:, 0], [0.0, 0.25, 0.5, 1.0])
    np.testing.assert_allclose(out[:, 1], (flux - 5.0) / 1.0)
    np.testing.assert_allclose(out[:, 2], [0.1, 0.1, 0.2, 0.4])
    np.testing.assert_allclose(out[:, 3], 0.0)  # log10(MAD = 1)
    np.testing.assert_allclose(out[:, 4], np.log10(40.0), rtol=1e-6)


def test_zero_mad_falls_back_to_std_and_constant_is_bad():
    lc = np.array([[1.0, 5.0, 0.1], [2.0, 5.0, 0.1], [3.0, 5.0, 0.1], [4.0, 9.0, 0.1]])
    out = clean_light_curve(lc)
    std = np.array([5.0, 5.0, 5.0, 9.0]).std()
    np.testing.assert_allclose(out[:, 1], (np.array([5.0, 5, 5, 9]) - 6.0) / std, rtol=1e-6)
    lc[3, 1] = 5.0
    with pytest.raises(BadRow, match="constant"):
        clean_light_curve(lc)


@pytest.mark.parametrize("lc,match", [
    (np.zeros((0, 3)), "0 usable"),
    (np.array([[1.0, 2.0, 0.1]]), "1 usable"),
    (np.array([[1.0, np.nan, 0.1], [2.0, 3.0, np.nan]]), "0 usable"),
    (np.ones((4, 2)), "shape"),
])
def test_bad_light_curves(lc, match):
    with pytest.raises(BadRow, match=match):
        clean_light_curve(lc)


def test_crops_and_padding():
    lc = np.arange(10, dtype=np.float32)[:, None].repeat(5, 1)
    steps, mask = crop_light_curve(lc, 4, None)
    np.testing.assert_array_equal(steps[:, 0], [3, 4, 5, 6])  # centre: (10 - 4) // 2 = 3
    assert mask.all()
    steps, _ = crop_light_curve(lc, 4, 6)
    np.testing.assert_array_equal(steps[:, 0], [6, 7, 8, 9])
    steps, mask = crop_light_curve(lc[:3], 5, None)
    np.testing.assert_array_equal(mask, [True, True, True, False, False])
    np.testing.assert_array_equal(steps[3:], 0)


def test_spectrum_hand_computed():
    # Linear flux f = 1 + w / 1000 sampled coarsely: interpolation is exact on the grid.
    out = preprocess_spectrum(good_spectrum())
    flux = 1.0 + WAVELENGTH_GRID / 1000.0
    mad = np.median(np.abs(flux - np.median(flux)))
    assert out.shape == (3, 2575)
    np.testing.assert_allclose(out[0], (flux - flux.mean()) / mad, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1], 0.1 / mad, rtol=1e-5)
    np.testing.assert_allclose(out[2], np.log10(mad), rtol=1e-5)


def test_spectrum_nan_points_dropped_and_outside_grid_rejected():
    sp = good_spectrum()
    sp[10, 1] = np.nan
    assert np.isfinite(preprocess_spectrum(sp)).all()
    outside = good_spectrum()
    outside[:, 0] = np.linspace(9100.0, 10000.0, len(outside))
    with pytest.raises(BadRow, match="cover less than half"):
        preprocess_spectrum(outside)


def test_metadata_log_period_missing_values_and_sentinels():
    meta = prepare_metadata(good_metadata(period=100.0))
    assert meta[METADATA_NAMES.index("period")] == pytest.approx(2.0)
    assert meta[0] == 1.0
    raw = good_metadata(period=-1.0)
    raw[METADATA_NAMES.index("parallax")] = np.nan
    raw[METADATA_NAMES.index("j_mag")] = -99.99
    meta = prepare_metadata(raw.astype(np.float32), sentinels=[-99.99])
    missing = {METADATA_NAMES[i] for i in np.flatnonzero(np.isnan(meta))}
    assert missing == {"parallax", "j_mag", "period"}  # a non-positive period has no log: missing
    assert np.isfinite(prepare_metadata(raw)[METADATA_NAMES.index("j_mag")])  # no sentinel configured: a value
    with pytest.raises(BadRow, match="expected 38"):
        prepare_metadata(np.ones(34))


def test_column_statistics_over_finite_values_and_dropped_columns(caplog):
    matrix = np.array([[1.0, np.nan, 5.0], [3.0, np.nan, np.nan], [np.nan, np.nan, 7.0]], dtype=np.float32)
    with caplog.at_level("WARNING", logger="fmb"):
        stats = ColumnStatistics.of(matrix, ["a", "b", "c"], "training metadata")
    np.testing.assert_allclose(stats.mean, [2.0, 0.0, 6.0])
    np.testing.assert_allclose(stats.std, [1.0, 1e-6, 1.0], rtol=1e-5)
    assert stats.used.tolist() == [True, False, True]
    assert "training metadata: no finite value in 1 column(s) (b)" in caplog.text


# ----------------------------------------------------------------------------- dataset


def test_dataset_reads_schema_and_names_bad_objects(tmp_path, caplog):
    good = {"photometry": np.array([[1.0, 2.0, 0.1], [2.0, 4.0, 0.1], [3.0, 3.0, 0.1]])}
    rows = [good, {**good, "label": "XYZ", "object_id": 42}, {"photometry": np.array([[1.0, 2.0, 0.1]]), "object_id": 43},
            {"photometry": None, "spectra": None, "object_id": 44}]
    path = tmp_path / "train.parquet"
    write_rows(path, rows)
    with caplog.at_level("WARNING", logger="fmb"):
        ds = AstroM3Dataset(path, None, CLASSES, seq_len=8, train=True, labels_needed=True)
    assert "1 of 4 objects have a label outside data.classes (XYZ 1)" in caplog.text
    sample = ds[0]
    assert sample["photometry"].shape == (8, 5) and sample["photometry_mask"].sum() == 3
    assert sample["label"].item() == CLASSES.index("EW") and sample["valid"] and sample["present"].all()
    assert ds[1]["label"].item() == -1 and ds[1]["present"].all()  # counted above, not an error
    with pytest.raises(DataError, match=r"object 43: photometry: 1 usable point"):
        ds[2]
    absent = ds[3]  # null photometry and spectra: absent, not an error
    assert absent["present"].tolist() == [False, False, True] and not absent["masked"]
    assert absent["photometry_mask"].sum() == 1  # one zero step keeps attention finite
    masked = AstroM3Dataset(path, None, CLASSES, seq_len=8, train=True, bad_rows="mask")
    assert masked[2]["present"].tolist() == [False, True, True] and masked[2]["masked"]
    assert [bool(masked[i]["masked"]) for i in range(4)] == [False, False, True, False]


def test_modes_read_only_their_columns_and_need_their_modality(tmp_path):
    lc = np.array([[1.0, 2.0, 0.1], [2.0, 4.0, 0.1], [3.0, 3.0, 0.1]])
    path = tmp_path / "train.parquet"
    write_rows(path, [{"photometry": lc, "spectra": None, "metadata": None}, {"photometry": lc, "spectra": None}])
    photo = AstroM3Dataset(path, None, CLASSES, seq_len=8, train=False, modalities=("photometry",),
                           required=("photometry",))
    item = photo[0]
    assert "spectra" not in item and item["present"].tolist() == [True, False, False]
    assert np.isnan(item["metadata"].numpy()).all()  # no metadata: the photometric features are missing
    with pytest.raises(DataError, match=r"no object has a 'spectra' value, and model.mode needs spectra"):
        AstroM3Dataset(path, None, CLASSES, seq_len=8, train=False, modalities=("spectra",), required=("spectra",))
    pq.write_table(pq.read_table(path).drop(["spectra", "metadata"]), tmp_path / "lc_only.parquet")
    only = AstroM3Dataset(tmp_path / "lc_only.parquet", None, CLASSES, seq_len=8, train=False, modalities=("photometry",))
    assert only[1]["present"].tolist() == [True, False, False]


def test_phased_light_curve_folds_by_period():
    t = np.linspace(0.0, 10.0, 41)
    lc = np.stack([t, np.sin(2 * np.pi * t / 2.5) + 2.0, np.full_like(t, 0.1)], axis=1)
    folded = clean_light_curve(lc, period=2.5)
    phase = folded[:, 0]
    assert (np.diff(phase) >= 0).all() and phase.min() >= 0 and phase.max() < 1
    # Points at the same phase have the same flux once folded.
    same = np.isclose(phase[:, None], phase[None, :], atol=1e-9)
    assert np.allclose(np.where(same, folded[:, 1][:, None] - folded[:, 1][None, :], 0.0), 0.0, atol=1e-5)
    unfolded = clean_light_curve(lc, period=float("nan"))  # unknown period: time order
    np.testing.assert_allclose(unfolded[:, 0], t / 10.0, rtol=1e-6)


def test_missing_column_is_named(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"photometry": pa.array([[[1.0, 2.0, 3.0]]]), "label": ["EW"]}), path)
    with pytest.raises(DataError, match="missing column.*spectra"):
        AstroM3Dataset(path, None, CLASSES, seq_len=8, train=False)  # every modality of clip / all


def test_synthetic_generator_schema_and_imbalance(tmp_path):
    out = write_synthetic("astrom3", tmp_path / "s", n=300, seed=1)
    files = sorted(p.name for p in out.glob("*.parquet"))
    assert files == ["test-00000-of-00001.parquet", "train-00000-of-00001.parquet", "validation-00000-of-00001.parquet"]
    table = pq.read_table(out / "train-00000-of-00001.parquet")
    assert table.num_rows == 240
    assert {"photometry", "spectra", "metadata", "label", "object_id", "true_period", "teff"} <= set(table.column_names)
    labels = table.column("label").to_pylist()
    assert set(labels) <= set(CLASSES)
    assert labels.count("EW") > labels.count("RRC") > 0 and labels.count("EW") > 3 * labels.count("DSCT")
    ds = AstroM3Dataset(out, "train", CLASSES, seq_len=200, train=True)
    for i in range(0, 240, 40):
        sample = ds[i]
        assert sample["present"].all() and all(np.isfinite(sample[k].numpy()).all() for k in ("photometry", "spectra", "metadata"))
    # Random crops are reproducible per (seed, epoch, index) and change with the epoch.
    long = max(range(240), key=lambda i: len(table.column("photometry")[i]))
    ds.set_epoch(0)
    a = ds[long]["photometry"]
    assert np.array_equal(a, ds[long]["photometry"])
    ds.set_epoch(1)
    assert not np.array_equal(a, ds[long]["photometry"])
    # Periods in the metadata follow the true periods.
    period = np.array([m[METADATA_NAMES.index("period")] for m in table.column("metadata").to_pylist()])
    np.testing.assert_allclose(period, table.column("true_period").to_numpy(), rtol=0.02)


def test_label_fraction_keeps_a_stable_subset(tmp_path):
    out = write_synthetic("astrom3", tmp_path / "s", n=200, seed=2)
    full = AstroM3Dataset(out, "train", CLASSES, seq_len=32, train=True)
    part = AstroM3Dataset(out, "train", CLASSES, seq_len=32, train=True, label_fraction=0.1)
    assert 5 <= len(part) <= 30 and len(full) == 160
    again = AstroM3Dataset(out, "train", CLASSES, seq_len=32, train=True, label_fraction=0.1)
    assert np.array_equal(part.rows, again.rows)


# ----------------------------------------------------------------------------- metrics


def test_classification_metrics_hand_computed():
    # rows: true A, B, C; columns: predicted
    cm = np.array([[3, 1, 0],
                   [0, 2, 2],
                   [0, 0, 0]])
    m = classification_metrics(cm, ["A", "B", "C"])
    assert m["accuracy"] == pytest.approx(5 / 8)
    f1_a = 2 * 3 / (4 + 3)  # tp 3, true 4, predicted 3
    f1_b = 2 * 2 / (4 + 3)  # tp 2, true 4, predicted 3
    f1_c = 0.0  # predicted twice, never true
    assert m["macro_f1"] == pytest.approx((f1_a + f1_b + f1_c) / 3)
    assert m["recall_A"] == pytest.approx(0.75) and m["recall_B"] == pytest.approx(0.5)
    assert "recall_C" not in m


def test_phased_dataset_keeps_points_over_the_whole_cycle(tmp_path):
    t = np.sort(np.random.default_rng(0).uniform(0.0, 300.0, 500))
    lc = np.stack([t, np.sin(2 * np.pi * t / 3.7) + 2.0, np.full_like(t, 0.1)], axis=1)
    path = tmp_path / "train.parquet"
    write_rows(path, [{"photometry": lc, "metadata": good_metadata(period=3.7)}])
    for train in (True, False):
        ds = AstroM3Dataset(path, None, CLASSES, seq_len=32, train=train, phased=True)
        phase = ds[0]["photometry"][:, 0].numpy()
        assert (np.diff(phase) >= 0).all() and phase.min() < 0.1 and phase.max() > 0.9
    unfolded = AstroM3Dataset(path, None, CLASSES, seq_len=32, train=False)[0]["photometry"][:, 0].numpy()
    assert unfolded.max() - unfolded.min() < 0.2  # a contiguous crop of the time series
