"""`fmb evaluate` / `fmb detect` on small synthetic embeddings with known structure."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fmb import cli
from fmb.embeddings import load_embeddings
from fmb.errors import DataError
from fmb.evaluation import anomaly
from fmb.evaluation.run import detect, evaluate
from tests.extras import need

need("sklearn")
from fmb.evaluation.probes import cross_validate, fit_predict, make_folds, retrieval_ranks  # noqa: E402


def planted(n=300, d=12, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    z = 0.5 + 0.2 * (x @ rng.standard_normal(d)) / np.sqrt(d)
    z = np.abs(z) + 0.01
    labels = (x[:, 0] > 0).astype(np.int64) + 2 * (x[:, 1] > 0).astype(np.int64)
    return x, z, labels


def write_file(path, ids, columns, **targets):
    table = {"object_id": pa.array(ids, pa.int64())}
    for name, matrix in columns.items():
        rows = [None if not np.isfinite(r).all() else r.tolist() for r in matrix]
        table[f"embedding_{name}"] = pa.array(rows, pa.list_(pa.float32(), matrix.shape[1]))
    table.update({k: pa.array(v) for k, v in targets.items()})
    pq.write_table(pa.table(table), path)
    return path


def test_probes_recover_a_planted_linear_target():
    x, z, _ = planted()
    train, test = np.arange(240), np.arange(240, 300)
    pred = fit_predict("linear", False, x[train], z[train], x[test])
    assert np.corrcoef(pred, z[test])[0, 1] > 0.99
    folds = make_folds(len(x), 4, seed=0)
    results = {r.probe: r.metrics["r2"] for r in cross_validate(x, z, "redshift", folds, fractions=(1.0,), k=16)}
    assert results["linear"].value > 0.98 and results["mlp"].value > 0.8 and results["knn"].value > 0.5
    assert all(r.low < r.value < r.high for r in results.values())  # a 95% interval around each figure
    noise = np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)
    baseline = {r.probe: r.metrics["r2"].value for r in cross_validate(noise, z, "redshift", folds, fractions=(1.0,), k=16)}
    assert all(v < 0.2 for v in baseline.values())


def test_classification_and_few_shot_curve():
    x, _, labels = planted(n=400)
    folds = make_folds(len(x), 4, seed=0, classes=labels)
    results = cross_validate(x, labels, "classification", folds, fractions=(0.05, 1.0), k=16, probes=("knn", "linear"))
    by = {(r.probe, r.fraction): r.metrics["accuracy"].value for r in results}
    assert by[("linear", 1.0)] > 0.8 and by[("knn", 1.0)] > 0.6  # chance is 0.25
    assert by[("linear", 0.05)] < by[("linear", 1.0)]
    assert fit_predict("knn", True, x[:200], labels[:200], x[200:], k=5).dtype == labels.dtype
    names = np.array(["EW", "SR", "EA", "RRAB"], dtype=object)[labels]  # string classes, as AstroM3 writes them
    results = cross_validate(x, names, "classification", folds, fractions=(1.0,), k=16, probes=("knn", "linear"))
    assert all(r.metrics["accuracy"].value > 0.6 for r in results)
    assert results[0].confusion.sum() == len(x) and list(results[0].classes) == ["EA", "EW", "RRAB", "SR"]


def test_few_shot_fractions_average_several_label_draws():
    from fmb.evaluation.metrics import regression_scores

    x, z, _ = planted(n=200)
    folds = make_folds(len(x), 4, seed=0)
    subsets = [folds.train_rows(0, 0.1, draw) for draw in range(3)]
    assert [len(s) for s in subsets] == [15, 15, 15] and len({tuple(sorted(s)) for s in subsets}) == 3
    # a draw is a property of the objects: on a subset of rows, the kept objects come in the same order
    kept = np.flatnonzero(np.arange(200) % 5 != 0)
    first = kept[folds.take(kept).train_rows(0, 0.1, 2)]
    assert set(first) <= set(folds.train_rows(0, 0.2, 2))
    per_draw = []
    for draw in range(3):
        pred = np.empty(len(z))
        for fold in range(4):
            test, train = np.flatnonzero(folds.fold == fold), folds.train_rows(fold, 0.1, draw)
            pred[test] = fit_predict("linear", False, x[train], z[train], x[test])
        per_draw.append(regression_scores(z, pred, True, replicates=0)["r2"].value)
    (three,) = cross_validate(x, z, "redshift", folds, fractions=(0.1,), probes=("linear",), replicates=300, draws=3)
    (one,) = cross_validate(x, z, "redshift", folds, fractions=(0.1,), probes=("linear",), replicates=300, draws=1)
    assert three.metrics["r2"].value == pytest.approx(np.mean(per_draw)) and one.metrics["r2"].value == pytest.approx(per_draw[0])
    assert three.metrics["r2"].low < np.mean(per_draw) < three.metrics["r2"].high


def test_a_class_with_one_member_and_single_class_folds_are_handled(caplog):
    x, _, labels = planted(n=120)
    labels = labels.copy()
    labels[0] = 9  # one object of its own class: folds cannot be stratified
    with caplog.at_level("INFO", logger="fmb"):
        folds = make_folds(len(x), 5, seed=0, classes=labels)
    assert "has 1 member(s), fewer than 5 folds" in caplog.text
    results = cross_validate(x, labels, "classification", folds, fractions=(0.02, 1.0), k=8, probes=("linear", "mlp"))
    assert all(0 <= r.metrics["accuracy"].value <= 1 for r in results)
    # 2 training labels of one class (a 2% subset): the probe predicts that class
    assert len(np.unique(fit_predict("linear", True, x[:2], np.array([1, 1]), x[2:10]))) == 1


def test_retrieval_is_perfect_on_identical_and_chance_on_shuffled():
    x, _, _ = planted(n=500)
    assert (retrieval_ranks(x, x) == 0).all()
    shuffled = x[np.random.default_rng(1).permutation(len(x))]
    ranks = retrieval_ranks(x, shuffled)
    assert np.mean(ranks < 1) < 0.02 and np.mean(ranks < 5) < 0.04


def test_evaluate_joins_on_object_id_and_counts_exclusions(tmp_path, caplog):
    x, z, labels = planted(n=200)
    ids = np.arange(1000, 1200)
    x_nan = x.copy()
    x_nan[:10] = np.nan  # absent embeddings are excluded, not imputed
    a = write_file(tmp_path / "a.parquet", ids, {"image": x_nan, "joint": x}, redshift=z, klass=labels)
    b = write_file(tmp_path / "b.parquet", ids[50:], {"image": x[50:] + 0.01}, redshift=z[50:], klass=labels[50:])
    noise = np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)
    base_a = write_file(tmp_path / "ra.parquet", ids, {"image": noise, "joint": noise}, redshift=z, klass=labels)
    base_b = write_file(tmp_path / "rb.parquet", ids, {"image": noise}, redshift=z, klass=labels)
    with caplog.at_level("INFO", logger="fmb"):
        rows = evaluate([str(a), str(b)], ["redshift", "klass"], [str(base_a), str(base_b)], folds=3,
                        fractions=(1.0,), k=16, probes=("linear",))
    assert "150 of 200 objects are in every file" in caplog.text
    images_a = [r for r in rows if r["model"] == "a" and r["embedding"] == "image" and r["metric"] == "r2"][0]
    assert images_a["n"] == 150 - 0 and images_a["excluded"] == 0  # the NaN rows are outside the overlap
    joint = [r for r in rows if r["model"] == "a" and r["embedding"] == "joint" and r["metric"] == "r2"][0]
    assert joint["value"] > 0.95 and joint["baseline"] < 0.2
    acc = [r for r in rows if r["target"] == "klass" and r["metric"] == "accuracy"]
    assert all(r["value"] > r["baseline"] for r in acc)


def test_nan_embeddings_are_counted(tmp_path):
    x, z, _ = planted(n=120)
    x[:7] = np.nan
    path = write_file(tmp_path / "a.parquet", np.arange(120), {"image": x}, redshift=z)
    rows = evaluate([str(path)], ["redshift"], folds=3, fractions=(1.0,), k=8, probes=("knn",))
    assert rows[0]["excluded"] == 7 and rows[0]["n"] == 113


def test_bad_inputs_name_file_and_column(tmp_path):
    x, z, _ = planted(n=40)
    path = write_file(tmp_path / "a.parquet", np.arange(40), {"image": x}, redshift=z)
    with pytest.raises(DataError, match=r"a\.parquet: no target column 'mass'; it has redshift"):
        evaluate([str(path)], ["mass"])
    other = write_file(tmp_path / "b.parquet", np.arange(100, 140), {"image": x}, redshift=z)
    with pytest.raises(DataError, match="share no object_id"):
        evaluate([str(path), str(other)], ["redshift"])
    pq.write_table(pa.table({"object_id": [1, 2], "feature": [0.1, 0.2]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"no 'embedding_\*' columns"):
        load_embeddings(tmp_path / "c.parquet")
    pq.write_table(pa.table({"object_id": [1, 1], "embedding_x": [[0.1], [0.2]]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match="not unique"):
        load_embeddings(tmp_path / "d.parquet")


def test_isolation_forest_and_knn_rank_planted_outliers_first():
    rng = np.random.default_rng(0)
    inliers = rng.standard_normal((300, 4))
    outliers = rng.standard_normal((5, 4)) * 0.3 + 6.0
    x = np.concatenate([inliers, outliers]).astype(np.float32)
    iso = anomaly.isolation_forest(x, trees=50, seed=0)
    assert set(np.argsort(iso)[-5:]) == set(range(300, 305))
    assert (iso > 0).all() and (iso <= 1).all()
    knn = anomaly.knn_distance(np.concatenate([rng.standard_normal((300, 8)) + 5, rng.standard_normal((3, 8)) - 5]).astype(np.float32), k=8)
    assert set(np.argsort(knn)[-3:]) == {300, 301, 302}


def test_detect_fuses_models_and_flags_cross_modal_mismatch(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.standard_normal((200, 8)).astype(np.float32)
    spectra = images + 0.05 * rng.standard_normal((200, 8)).astype(np.float32)
    spectra[:4] = rng.standard_normal((4, 8))  # four objects whose modalities disagree
    a = write_file(tmp_path / "a.parquet", np.arange(200), {"image": images, "spectrum": spectra})
    b = write_file(tmp_path / "b.parquet", np.arange(200), {"image": images * 2})
    out = detect([str(a), str(b)], tmp_path / "anomalies.parquet", k=8)
    table = pq.read_table(out).to_pydict()
    assert {"object_id", "a/cross_modal", "a/knn_image", "b/iforest_image", "fused_rank"} <= set(table)
    cross = dict(zip(table["object_id"], table["a/cross_modal"], strict=True))
    top = sorted(cross, key=cross.get)[-4:]
    assert set(top) == {0, 1, 2, 3}
    assert table["fused_rank"] == sorted(table["fused_rank"], reverse=True)


def test_detect_objects_without_a_modality_give_nan_scores_without_numpy_warnings(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.standard_normal((60, 4)).astype(np.float32)
    spectra = images.copy()
    spectra[:10] = np.nan  # ten objects have no spectrum: no cross-modal score, fused from the rest
    path = write_file(tmp_path / "a.parquet", np.arange(60), {"image": images, "spectrum": spectra})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = pq.read_table(detect([str(path)], tmp_path / "anomalies.parquet", k=4)).to_pydict()
    cross = dict(zip(table["object_id"], table["a/cross_modal"], strict=True))
    assert all(np.isnan(cross[i]) for i in range(10)) and all(np.isfinite(cross[i]) for i in range(10, 60))
    assert np.isfinite(table["fused_rank"]).all()


def test_cli_evaluate_and_detect(tmp_path, monkeypatch, capsys):
    x, z, _ = planted(n=120)
    path = write_file(tmp_path / "a.parquet", np.arange(120), {"image": x, "spectrum": x + 0.01}, redshift=z)
    monkeypatch.setattr(sys, "argv", ["fmb", "evaluate", str(path), "--target", "redshift", "--out", str(tmp_path / "ev"),
                                      "--folds", "3", "--fractions", "1.0", "--probes", "knn,linear"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 0
    assert (tmp_path / "ev" / "results.csv").is_file()
    shown = capsys.readouterr().out
    assert "| a | image | redshift | linear |" in shown and "image->spectrum" in shown
    monkeypatch.setattr(sys, "argv", ["fmb", "detect", str(path), "--out", str(tmp_path / "an.csv")])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 0 and (tmp_path / "an.csv").read_text().startswith('"object_id"')


def test_evaluate_writes_plots(tmp_path, monkeypatch, capsys):
    need("matplotlib")
    x, z, labels = planted(n=120)
    path = write_file(tmp_path / "m.parquet", np.arange(120), {"image": x, "spectrum": x + 0.01}, redshift=z,
                      klass=labels.astype(str))
    monkeypatch.setattr(sys, "argv", ["fmb", "evaluate", str(path), "--target", "redshift", "--target", "klass",
                                      "--out", str(tmp_path / "ev"), "--folds", "3", "--fractions", "0.1,1.0",
                                      "--probes", "knn,linear", "--plots"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 0, capsys.readouterr().err
    written = {p.name for p in (tmp_path / "ev" / "plots").glob("*.png")}
    assert {"m__image__redshift__pca.png", "m__image__redshift__umap.png", "m__image__redshift__few_shot.png",
            "m__image__klass__pca.png", "m__image__to__spectrum__retrieval.png"} <= written
    assert any(name.startswith("m__image__klass__") and name.endswith("_confusion.png") for name in written)
    assert any(name.startswith("m__image__redshift__") and name.endswith("_scatter.png") for name in written)
    assert all((tmp_path / "ev" / "plots" / n).read_bytes().startswith(b"\x89PNG") for n in written)


def test_a_models_own_prediction_column_is_scored_zero_shot(tmp_path):
    x, z, _ = planted(n=60)
    good = z + 0.01 * np.random.default_rng(1).standard_normal(len(z))
    bad = np.full_like(z, z.mean())
    good[:4] = np.nan  # no prediction for these objects
    a = write_file(tmp_path / "a.parquet", np.arange(60), {"image": x}, redshift=z, aion_redshift=good)
    base = write_file(tmp_path / "ra.parquet", np.arange(60), {"image": x}, redshift=z, aion_redshift=bad)
    rows = evaluate([str(a)], ["redshift"], [str(base)], folds=3, fractions=(1.0,), k=8, probes=("knn",))
    zero_shot = {r["metric"]: r for r in rows if r["probe"] == "zero-shot"}
    assert set(zero_shot) == {"r2", "rmse", "mae", "bias", "nmad", "sigma_68", "outlier_frac"}
    assert zero_shot["r2"]["embedding"] == "aion_redshift"
    assert zero_shot["r2"]["value"] > 0.9 and abs(zero_shot["r2"]["baseline"]) < 0.1
    assert zero_shot["r2"]["n"] == 56 and zero_shot["r2"]["excluded"] == 4 and zero_shot["r2"]["labels"] == 0.0
