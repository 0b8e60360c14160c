"""`fmb detect`: scorers, fusion, selection, truth metrics and agreement on small planted samples."""

from __future__ import annotations

import logging
import sys
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from fmb import cli
from fmb.errors import ConfigError, DataError
from fmb.evaluation import anomaly
from fmb.evaluation.anomaly import FlowOptions
from fmb.evaluation.detect import DetectOptions, detect
from tests.extras import need

QUICK_FLOW = FlowOptions(components=4, transforms=2, hidden=16, epochs=5)


def write_file(path, ids, columns, **targets):
    table = {"object_id": pa.array(ids, pa.int64())}
    for name, matrix in columns.items():
        rows = [None if np.isnan(r).all() else r.tolist() for r in matrix]
        table[f"embedding_{name}"] = pa.array(rows, pa.list_(pa.float32(), matrix.shape[1]))
    table.update({k: pa.array(v) for k, v in targets.items()})
    pq.write_table(pa.table(table), path)
    return path


def cluster_and_outlier(n=300, d=8, seed=0):
    """Inliers around one direction, and object n (the last) far away, in another direction, on every axis."""
    rng = np.random.default_rng(seed)
    centre = np.zeros(d)
    centre[0] = 4.0
    x = centre + rng.standard_normal((n + 1, d))
    x[n] = -5.0
    return x.astype(np.float32)


@pytest.mark.parametrize("scorer", ["knn", "lof", "iforest", "flow"])
def test_each_scorer_ranks_an_obvious_outlier_first(scorer):
    need("sklearn")
    if scorer == "flow":
        need("zuko")
    x = cluster_and_outlier()
    nb = anomaly.exact_neighbours(x, 8)
    scores = {"knn": lambda: anomaly.knn_distance(nb), "lof": lambda: anomaly.local_outlier_factor(nb),
              "iforest": lambda: anomaly.isolation_forest(x, 100, seed=0),
              "flow": lambda: anomaly.flow_nll(x, FlowOptions(components=4, transforms=2, hidden=16, epochs=20))}[scorer]()
    assert np.argmax(scores) == len(x) - 1
    assert np.isfinite(scores).all()
    if scorer == "iforest":
        assert (scores > 0).all() and (scores <= 1).all()  # 2^(-E[h] / c(n))


def test_lof_on_the_neighbour_graph_is_scikit_learns_lof_on_unit_vectors():
    neighbors = need("sklearn.neighbors")
    x = cluster_and_outlier(n=200)
    ours = anomaly.local_outlier_factor(anomaly.exact_neighbours(x, 10))
    theirs = -neighbors.LocalOutlierFactor(n_neighbors=10).fit(anomaly.unit_rows(x)).negative_outlier_factor_
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)


def test_faiss_neighbours_agree_with_exact_search():
    need("faiss")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, 32)) * 3
    x = (centres[rng.integers(0, 20, 4000)] + rng.standard_normal((4000, 32))).astype(np.float32)
    exact = anomaly.exact_neighbours(x, 10)
    approximate = anomaly.neighbours(x, 10, "faiss", nprobe=8)
    assert (approximate.index != np.arange(len(x))[:, None]).all()  # never itself
    assert anomaly.recall_at_k(approximate.index, exact.index) > 0.9
    assert np.corrcoef(anomaly.knn_distance(approximate), anomaly.knn_distance(exact))[0, 1] > 0.99


def test_flow_scores_are_seeded():
    need("zuko")
    need("sklearn")
    x = cluster_and_outlier(n=200)
    a, b = anomaly.flow_nll(x, QUICK_FLOW, seed=3), anomaly.flow_nll(x, QUICK_FLOW, seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, anomaly.flow_nll(x, QUICK_FLOW, seed=4))


def test_percentiles_share_ties_and_fusion_modes():
    np.testing.assert_allclose(anomaly.percentile(np.array([3.0, 1.0, 3.0, np.nan, 2.0])), [0.875, 0.25, 0.875, np.nan, 0.5])
    a, b = np.array([0.25, 0.5, np.nan, np.nan]), np.array([1.0, 0.5, 0.8, np.nan])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(anomaly.fuse([a, b], "gmean"), [0.5, 0.5, 0.8, np.nan])
        np.testing.assert_allclose(anomaly.fuse([a, b], "min"), [0.25, 0.5, 0.8, np.nan])
        np.testing.assert_allclose(anomaly.fuse([a, b], "mean"), [0.625, 0.5, 0.8, np.nan])
        np.testing.assert_allclose(anomaly.fuse([a, b], "max"), [1.0, 0.5, 0.8, np.nan])
    # +inf is the most anomalous score there is, not a missing one
    np.testing.assert_allclose(anomaly.percentile(np.array([1.0, np.inf, 2.0, np.nan])), [1 / 3, 1.0, 2 / 3, np.nan])
    with pytest.raises(ConfigError, match="choose gmean, min, mean, max"):
        anomaly.fuse([a], "median")


def aligned_pair(n=200, d=16, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n, d)).astype(np.float32)
    spectra = images + 0.1 * rng.standard_normal((n, d)).astype(np.float32)
    return images, spectra


def test_a_swapped_pair_scores_the_highest_mismatch_and_tops_the_list(tmp_path):
    images, spectra = aligned_pair()
    spectra[[3, 7]] = spectra[[7, 3]]  # two objects' spectra exchanged
    path = write_file(tmp_path / "clip.parquet", np.arange(200), {"image": images, "spectrum": spectra})
    result = detect([str(path)], tmp_path / "out", DetectOptions(scorers=("mismatch",), top_k=2))
    table = pq.read_table(tmp_path / "out" / "anomalies.parquet").to_pydict()
    assert set(table["object_id"][:2]) == {3, 7}
    assert table["clip/image+spectrum/mismatch"][0] > 0.5 > table["clip/image+spectrum/mismatch"][2]
    assert [result.ids[r] for r in result.top] == table["object_id"][:2]
    assert (tmp_path / "out" / "top_k.csv").read_text().count("\n") == 3  # header + K rows


def test_mapped_mismatch_finds_a_swap_in_embeddings_that_are_not_aligned(tmp_path):
    need("sklearn")
    images, _ = aligned_pair(n=300)
    rotation = np.linalg.qr(np.random.default_rng(1).standard_normal((16, 24)).T)[0]  # another space, another width
    spectra = (images @ rotation.T + 0.05 * np.random.default_rng(2).standard_normal((300, 24))).astype(np.float32)
    spectra[[3, 7]] = spectra[[7, 3]]
    path = write_file(tmp_path / "pt.parquet", np.arange(300), {"image": images, "spectrum": spectra})
    with pytest.raises(DataError, match=r"mismatch needs two modality embeddings of one width.*\(16\).*\(24\)"):
        detect([str(path)], tmp_path / "out", DetectOptions(scorers=("mismatch",)))  # no cosine across spaces
    result = detect([str(path)], tmp_path / "out", DetectOptions(scorers=("mapped_mismatch",)))
    scores = {s.name: s.values for s in result.scores}
    assert set(np.argsort(scores["pt/image+spectrum/mapped_mismatch"])[-2:]) == {3, 7}


def test_missing_nan_and_zero_norm_rows_are_excluded_counted_and_still_ranked(tmp_path):
    need("sklearn")
    images, spectra = aligned_pair(n=120)
    spectra[:10] = np.nan  # no spectrum (null in the file)
    images[10:13] = 0.0  # zero norm
    images[13, 2] = np.inf  # non-finite
    path = write_file(tmp_path / "m.parquet", np.arange(120), {"image": images, "spectrum": spectra})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = detect([str(path)], tmp_path / "out", DetectOptions(scorers=("knn", "iforest", "mismatch"), k=5))
    counts = {e["column"]: e for e in result.exclusions}
    assert (counts["image"]["zero_norm"], counts["image"]["missing_or_nonfinite"], counts["image"]["scored"]) == (3, 1, 116)
    assert (counts["spectrum"]["missing_or_nonfinite"], counts["spectrum"]["scored"]) == (10, 110)
    knn = {s.name: s.values for s in result.scores}["m/image/knn"]
    assert np.isnan(knn[10:14]).all() and np.isfinite(knn[14:]).sum() == 106
    assert np.isnan({s.name: s.values for s in result.scores}["m/image+spectrum/mismatch"][:14]).all()
    assert np.isfinite(result.anomaly_score).all()  # every object ranked by the scores it has
    assert "| m | image | 120 | 116 | 1 | 3 |" in (tmp_path / "out" / "summary.md").read_text()


def test_truth_table_on_a_hand_made_case(tmp_path):
    need("sklearn")
    theta = np.linspace(0.1, 1.5, 10)  # mismatch 1 - cos(theta) rises with the object index
    images = np.tile([[1.0, 0.0]], (10, 1)).astype(np.float32)
    spectra = np.stack([np.cos(theta), np.sin(theta)], 1).astype(np.float32)
    kinds = [None] * 10
    kinds[9], kinds[0], kinds[5] = "swap", "streak", "streak"
    path = write_file(tmp_path / "h.parquet", np.arange(10), {"image": images, "spectrum": spectra},
                      truth_anomaly=pa.array(kinds, pa.string()))
    result = detect([str(path)], tmp_path / "out", DetectOptions(scorers=("mismatch",), top_k=3))
    assert f"AUROC of the fused scores over every planted kind: h {11 / 21:.3f}" in result.summary()
    rows = {(r["score"], r["kind"]): r for r in
            pa_csv.read_csv(tmp_path / "out" / "truth.csv").to_pylist()}
    swap, streak, every = (rows["h/image+spectrum/mismatch", k] for k in ("swap", "streak", "any"))
    assert (swap["auroc"], swap["average_precision"], swap["recall_top1"], swap["recall_top5"]) == (1.0, 1.0, 1.0, 1.0)
    # streaks at ranks 1 and 6 of 9 (the swap left out): AUROC (0 + 4) / (2 x 7), AP (1/4 + 2/9) / 2
    assert streak["auroc"] == pytest.approx(4 / 14) and streak["average_precision"] == pytest.approx((1 / 4 + 2 / 9) / 2)
    assert streak["recall_top1"] == 0.0 and (streak["positives"], streak["scored"]) == (2, 2)
    assert every["positives"] == 3 and every["auroc"] == pytest.approx((7 + 0 + 4) / 21)
    assert "| h | h/image+spectrum/mismatch | swap | 1 | 1 | 0.125 | 1.000 |" in (tmp_path / "out" / "truth.md").read_text()


def test_truth_from_a_joined_data_file_and_anomaly_neighbourhoods(tmp_path):
    need("sklearn")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    x[:12] = 5.0 + 0.1 * rng.standard_normal((12, 8))  # a small rare class, far from the rest
    path = write_file(tmp_path / "e.parquet", np.arange(300), {"joint": x})
    truth = pa.table({"object_id": np.arange(300), "truth_anomaly": ["lens"] * 12 + [None] * 288})
    pq.write_table(truth, tmp_path / "data.parquet")
    result = detect([str(path)], tmp_path / "out", DetectOptions(scorers=("knn", "lof"), k=8),
                    truth_file=str(tmp_path / "data.parquet"))
    assert result.truth[0] == "lens" and result.truth[20] is None
    rows = {(r["score"], r["kind"]): r for r in pa_csv.read_csv(tmp_path / "out" / "truth.csv").to_pylist()}
    assert rows["e/joint/knn", "lens"]["auroc"] < 0.1  # with k < 12 each lens's neighbours are the other lenses
    neighbours = pa_csv.read_csv(tmp_path / "out" / "neighbours.csv").to_pylist()
    own = next(r for r in neighbours if r["what"].startswith("share of a lens"))
    assert own["value"] == 1.0  # ...which the neighbour table shows, against the chance that another object is a lens:
    assert own["baseline"] == pytest.approx(11 / 299)  # 11 other lenses among the 299 other objects, not 12 / 300


def test_objects_the_truth_table_lacks_are_left_out_not_counted_normal(tmp_path, caplog):
    need("sklearn")
    x = cluster_and_outlier(n=99)  # the outlier is object 99
    path = write_file(tmp_path / "e.parquet", np.arange(100), {"joint": x})
    # the table knows 40 objects: the outlier (planted) and 39 normal ones
    truth = pa.table({"object_id": np.arange(60, 100), "truth_anomaly": [None] * 39 + ["odd"]})
    pq.write_table(truth, tmp_path / "truth.parquet")
    with caplog.at_level(logging.WARNING, logger="fmb"):
        result = detect([str(path)], tmp_path / "out", DetectOptions(scorers=("knn",), k=8),
                        truth_file=str(tmp_path / "truth.parquet"))
    assert "60 of 100 objects have no row" in caplog.text
    row = next(r for r in pa_csv.read_csv(tmp_path / "out" / "truth.csv").to_pylist()
               if r["score"] == "e/joint/knn" and r["kind"] == "any")
    assert row["positives"] == 1 and row["prevalence"] == pytest.approx(1 / 40) and row["auroc"] == 1.0
    written = pq.read_table(tmp_path / "out" / "anomalies.parquet").to_pydict()
    by_id = dict(zip(written["object_id"], written["truth_anomaly"], strict=True))
    assert by_id[99] == "odd" and by_id[60] is None and by_id[0] is None
    assert result.truth[99] == "odd"


def test_a_modality_no_object_has_is_left_out_not_an_error(tmp_path, caplog):
    x = cluster_and_outlier(n=59)
    path = tmp_path / "e.parquet"
    pq.write_table(pa.table({"object_id": np.arange(60), "embedding_image": list(x),
                             "embedding_spectrum": pa.nulls(60, pa.list_(pa.float32()))}), path)
    with caplog.at_level(logging.WARNING, logger="fmb"):
        result = detect([str(path)], tmp_path / "out", DetectOptions(scorers=("knn",), k=8))
    assert "embedding_spectrum is null for every object; left out" in caplog.text
    assert [s.name for s in result.scores] == ["e/image/knn"] and result.ids[np.argmax(result.anomaly_score)] == 59
    pq.write_table(pa.table({"object_id": np.arange(3), "embedding_image": pa.nulls(3, pa.list_(pa.float32()))}), path)
    with pytest.raises(DataError, match="every embedding column is null for every object"):
        detect([str(path)], tmp_path / "out2", DetectOptions(scorers=("knn",)))


def test_a_threshold_on_anomaly_score_is_the_overall_score_alone(tmp_path):
    images, spectra = aligned_pair(n=100)
    a = write_file(tmp_path / "a.parquet", np.arange(100), {"image": images, "spectrum": spectra})
    b = write_file(tmp_path / "b.parquet", np.arange(100), {"image": images[::-1].copy(), "spectrum": spectra})
    result = detect([str(a), str(b)], tmp_path / "out",
                    DetectOptions(scorers=("mismatch",), thresholds={"anomaly_score": 0.8}))
    overall = anomaly.percentile(result.anomaly_score)
    np.testing.assert_array_equal(result.selected, ~(overall < 0.8))


def test_two_models_fused_and_compared(tmp_path):
    need("sklearn")
    images, spectra = aligned_pair(n=150)
    a = write_file(tmp_path / "a.parquet", np.arange(150), {"image": images, "spectrum": spectra})
    b = write_file(tmp_path / "b.parquet", np.arange(150), {"image": images * 2})  # the same geometry
    options = DetectOptions(scorers=("knn", "lof"), k=8, top_k=10, fusion="min")
    result = detect([str(a), str(b)], tmp_path / "out", options)
    assert set(result.model_scores) == {"a", "b"}
    table = pq.read_table(tmp_path / "out" / "anomalies.parquet")
    assert {"a/anomaly_score", "b/image/knn", "b/image/knn_pct", "a/spectrum/lof"} <= set(table.column_names)
    scores = table.column("anomaly_score").to_pylist()
    assert scores == sorted(scores, reverse=True)
    rows = pa_csv.read_csv(tmp_path / "out" / "agreement.csv").to_pylist()
    same = next(r for r in rows if r["a"] == "a/image/knn" and r["b"] == "b/image/knn")
    assert same["spearman"] == pytest.approx(1.0) and same["jaccard_top10"] == 1.0 and same["top1_in_top1"] == 1.0
    assert "| a/anomaly_score | b/anomaly_score |" in (tmp_path / "out" / "agreement.md").read_text()


def test_thresholds_select_before_the_top_k(tmp_path):
    images, spectra = aligned_pair(n=100)
    spectra[:3] = -spectra[:3]
    path = write_file(tmp_path / "t.parquet", np.arange(100), {"image": images, "spectrum": spectra})
    result = detect([str(path)], tmp_path / "out", DetectOptions(scorers=("mismatch",), thresholds={"mismatch": 0.98}))
    assert sorted(result.ids[result.selected]) == [0, 1, 2]
    stages = []
    with pytest.raises(ConfigError, match="threshold nosuch: no score of that name; scores are anomaly_score, "
                                          "t/anomaly_score, t/image[+]spectrum/mismatch"):
        detect([str(path)], tmp_path / "out", DetectOptions(scorers=("mismatch",), thresholds={"nosuch": 0.5}),
               stage=stages.append)
    assert stages == ["load"]  # refused before any scoring


def test_bad_inputs(tmp_path, caplog):
    images, spectra = aligned_pair(n=60)
    both = write_file(tmp_path / "both.parquet", np.arange(60), {"image": images, "spectrum": spectra})
    fewer = write_file(tmp_path / "fewer.parquet", np.arange(20, 60), {"image": images[20:]})
    with caplog.at_level(logging.WARNING, logger="fmb"):
        result = detect([str(both), str(fewer)], tmp_path / "out", DetectOptions(scorers=("knn",), k=4, top_k=1000))
    assert f"{both}: 60 objects, 40 in every file (20 unused)" in result.overlap
    assert len(result.top) == 40 and "--top-k 1000 is more than the 40 objects selected" in caplog.text
    with pytest.raises(DataError, match=r"fewer.parquet: mismatch needs two modality embeddings of one width.*embedding_image \(16\)"):
        detect([str(fewer)], tmp_path / "out", DetectOptions(scorers=("mismatch",)))
    narrow = write_file(tmp_path / "narrow.parquet", np.arange(60), {"image": images, "spectrum": spectra[:, :8]})
    with pytest.raises(DataError, match="--pair image:spectrum: widths 16 and 8 differ"):
        detect([str(narrow)], tmp_path / "out", DetectOptions(scorers=("mismatch",), pairs=(("image", "spectrum"),)))
    with pytest.raises(ConfigError, match="unknown scorer"):
        DetectOptions(scorers=("svm",))


def test_cli_detect_writes_the_results_directory(tmp_path, monkeypatch, capsys):
    need("sklearn")
    need("zuko")
    images, spectra = aligned_pair(n=80)
    path = write_file(tmp_path / "a.parquet", np.arange(80), {"image": images, "spectrum": spectra})
    monkeypatch.setattr(sys, "argv", ["fmb", "detect", str(path), "--out", str(tmp_path / "det"), "--top-k", "5",
                                      "--fusion", "mean", "--k", "5", "--flow-epochs", "2", "--flow-components", "4",
                                      "--threshold", "a/*/knn=0.5"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 0
    shown = capsys.readouterr().out
    assert f"{tmp_path / 'det' / 'anomalies.parquet'}" in shown and "most anomalous" in shown
    names = pq.read_schema(tmp_path / "det" / "anomalies.parquet").names
    assert {f"a/{c}/{s}" for c in ("image", "spectrum") for s in ("knn", "lof", "iforest", "flow")} <= set(names)
    assert "a/image+spectrum/mismatch" in names
    assert (tmp_path / "det" / "top_k.csv").read_text().count("\n") == 6


def test_plots_are_agreement_heatmaps(tmp_path):
    need("matplotlib")
    images, spectra = aligned_pair(n=60)
    a = write_file(tmp_path / "a.parquet", np.arange(60), {"image": images, "spectrum": spectra})
    b = write_file(tmp_path / "b.parquet", np.arange(60), {"image": images, "spectrum": -spectra})
    result = detect([str(a), str(b)], tmp_path / "out", DetectOptions(scorers=("mismatch",), top_k=5, plots=True))
    assert result.files["plots"] == tmp_path / "out" / "plots"
    assert {p.name for p in (tmp_path / "out" / "plots").iterdir()} == {"spearman.png", "jaccard_top5.png", "top1_in_top10.png"}
    detect([str(a), str(b)], tmp_path / "all", DetectOptions(scorers=("mismatch",), top_k=60, plots=True))
    # the top 60 of 60 objects: every Jaccard empty, so no heatmap of them
    assert {p.name for p in (tmp_path / "all" / "plots").iterdir()} == {"spearman.png", "top1_in_top10.png"}


def test_string_object_ids_pass_through(tmp_path):
    images, spectra = aligned_pair(n=40)
    spectra[5] = -spectra[5]
    ids = [f"SPLUS-{i:03d}" for i in range(40)]
    table = {"object_id": pa.array(ids)}
    for name, matrix in {"image": images, "spectrum": spectra}.items():
        table[f"embedding_{name}"] = pa.array(matrix.tolist(), pa.list_(pa.float32(), 16))
    pq.write_table(pa.table(table), tmp_path / "s.parquet")
    detect([str(tmp_path / "s.parquet")], tmp_path / "out", DetectOptions(scorers=("mismatch",), top_k=3))
    assert pq.read_table(tmp_path / "out" / "anomalies.parquet").column("object_id")[0].as_py() == "SPLUS-005"
    assert pa_csv.read_csv(tmp_path / "out" / "top_k.csv").column("object_id").to_pylist()[0] == "SPLUS-005"


def test_truth_directory_errors_read_as_the_catalogues(tmp_path):
    from fmb.evaluation.agreement import read_truth

    root = tmp_path / "data"
    root.mkdir()
    pq.write_table(pa.table({"object_id": [1, 2], "truth_anomaly": ["lens", None]}), root / "train-0.parquet")
    pq.write_table(pa.table({"object_id": [3, 4], "truth_anomaly": [None, None]}), root / "test-0.parquet")
    truth = read_truth(str(root), "object_id")
    assert sorted(truth.ids.tolist()) == [1, 2, 3, 4] and truth.missing["truth_anomaly"] == 3
    with pytest.raises(DataError, match=r"test-0.parquet: no column 'objid' \(closest: object_id\)"):
        read_truth(str(root), "objid")
    pq.write_table(pa.table({"object_id": [3, None], "truth_anomaly": [None, None]}), root / "test-0.parquet")
    with pytest.raises(DataError, match="test-0.parquet: id column 'object_id' has missing or non-integer values"):
        read_truth(str(root), "object_id")
    pq.write_table(pa.table({"object_id": [2, 5], "truth_anomaly": [None, None]}), root / "test-0.parquet")
    with pytest.raises(DataError, match=r"data: 1 duplicate values in id column 'object_id' \(1 ids repeated, e.g. 2; "
                                         r"2 is in test-0.parquet, train-0.parquet\)"):
        read_truth(str(root), "object_id")
    pq.write_table(pa.table({"object_id": ["3", "x"], "truth_anomaly": [None, None]}), root / "test-0.parquet")
    with pytest.raises(DataError, match=r"train-0.parquet: id column .object_id. holds integer ids where .*test-0.parquet holds text ids"):
        read_truth(str(root), "object_id")


def test_a_top_k_of_every_object_leaves_its_jaccard_empty(tmp_path, caplog):
    import csv

    images, spectra = aligned_pair(n=30)
    a = write_file(tmp_path / "a.parquet", np.arange(30), {"image": images, "spectrum": spectra})
    b = write_file(tmp_path / "b.parquet", np.arange(30), {"image": images, "spectrum": -spectra})

    def jaccards(top_k: int, out: str) -> dict[tuple[str, str], float]:
        detect([str(a), str(b)], tmp_path / out, DetectOptions(scorers=("mismatch",), top_k=top_k))
        with open(tmp_path / out / "agreement.csv") as handle:
            return {(r["a"], r["b"]): float(r[f"jaccard_top{top_k}"]) for r in csv.DictReader(handle)}

    with caplog.at_level(logging.WARNING, logger="fmb"):
        every = jaccards(30, "every")  # the top 30 of 30 objects: the same set for any two scores, whatever they rank
    assert all(np.isnan(v) for v in every.values())
    assert "--top-k 30: 5 score(s)" in caplog.text and "its Jaccard overlap is left empty (NaN)" in caplog.text
    assert "Jaccard of the top 30: 2 score(s) (a/anomaly_score, b/anomaly_score) have 30 objects or fewer" in (
        tmp_path / "every" / "agreement.md").read_text()
    fewer = jaccards(29, "fewer")
    assert fewer["a/anomaly_score", "a/anomaly_score"] == 1.0 and 0.0 < fewer["a/anomaly_score", "b/anomaly_score"] <= 1.0


def test_ties_at_the_top_k_cut_go_to_the_lower_object_ids(tmp_path):
    images = np.tile(np.eye(4, dtype=np.float32)[:1], (12, 1))  # every pair the same: one tied mismatch...
    spectra = images.copy()
    spectra[[3, 7]] = np.eye(4, dtype=np.float32)[1]  # ...but rows 3 and 7, orthogonal: the two highest
    ids = np.array([50, 40, 90, 10, 30, 70, 20, 60, 80, 15, 35, 55])  # not in order in the file
    path = write_file(tmp_path / "t.parquet", ids, {"image": images, "spectrum": spectra})
    result = detect([str(path)], tmp_path / "out", DetectOptions(scorers=("mismatch",), top_k=5))
    assert [int(result.ids[r]) for r in result.top] == [10, 60, 15, 20, 30]
    top = pa_csv.read_csv(tmp_path / "out" / "top_k.csv").column("object_id").to_pylist()
    assert top == [10, 60, 15, 20, 30]
