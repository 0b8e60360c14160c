"""Benchmark metrics against hand-computed values and scikit-learn; bootstrap intervals; CKA and mutual kNN."""

from __future__ import annotations

import numpy as np
import pytest

from fmb.evaluation.metrics import (
    class_samples,
    confusion_matrices,
    mean_interval,
    regression_scores,
)
from tests.extras import need


def test_photo_z_figures_by_hand():
    z = np.array([0.0, 0.5, 1.0, 2.0, 1.0])
    pred = np.array([0.0, 0.65, 1.0, 3.5, 0.8])
    # dz = (pred - z) / (1 + z) = 0, 0.1, 0, 0.5, -0.1
    scores = regression_scores(z, pred, redshift=True, replicates=0)
    assert scores["bias"].value == pytest.approx(0.0)  # median dz
    # |dz - median| = 0, .1, 0, .5, .1 -> median 0.1
    assert scores["nmad"].value == pytest.approx(0.14826)
    assert scores["outlier_frac"].value == pytest.approx(0.2)  # only 0.5 > 0.15
    assert regression_scores(z, pred, True, threshold=0.05, replicates=0)["outlier_frac"].value == pytest.approx(0.6)
    # percentiles 15.865 / 84.135 of (-0.1, 0, 0, 0.1, 0.5), linear interpolation between order statistics
    low = -0.1 + (0.15865 * 4 - 0) * 0.1
    high = 0.1 + (0.84135 * 4 - 3) * 0.4
    assert scores["sigma_68"].value == pytest.approx((high - low) / 2)
    assert scores["mae"].value == pytest.approx((0 + 0.15 + 0 + 1.5 + 0.2) / 5)
    assert scores["rmse"].value == pytest.approx(np.sqrt((0.15**2 + 1.5**2 + 0.2**2) / 5))
    # R^2: 1 - SSres / SStot with mean z = 0.9
    ss_tot = 0.81 + 0.16 + 0.01 + 1.21 + 0.01
    assert scores["r2"].value == pytest.approx(1 - (0.15**2 + 1.5**2 + 0.2**2) / ss_tot)
    plain = regression_scores(z, pred, redshift=False, replicates=0)
    assert set(plain) == {"r2", "rmse", "mae", "bias"} and plain["bias"].value == pytest.approx(0.29)  # mean residual


def test_class_figures_by_hand_and_against_sklearn():
    y, p = np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0])
    scores, confusion, classes = class_samples(y, p, replicates=0)
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp2 fp1 fn0 -> 0.8; class 2: 0
    assert scores["macro_f1"][0] == pytest.approx((0.5 + 0.8 + 0.0) / 3)  # (figure, its bootstrap replicates)
    assert scores["accuracy"][0] == pytest.approx(0.6)
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]] and classes.tolist() == [0, 1, 2]
    need("sklearn")
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        mean_absolute_error,
        r2_score,
    )

    rng = np.random.default_rng(0)
    y = rng.choice(np.array(["E", "S", "Irr", "star"], dtype=object), 300)
    p = np.where(rng.random(300) < 0.7, y, rng.choice(np.array(["E", "S", "Irr", "QSO"], dtype=object), 300))
    scores, confusion, classes = class_samples(y, p, replicates=0)
    assert scores["macro_f1"][0] == pytest.approx(f1_score(y, p, average="macro"))
    assert scores["accuracy"][0] == pytest.approx(accuracy_score(y, p))
    assert (confusion == confusion_matrix(y, p, labels=classes)).all()
    t, q = rng.random(200), rng.random(200)
    scores = regression_scores(t, q, redshift=False, replicates=0)
    assert scores["r2"].value == pytest.approx(r2_score(t, q))
    assert scores["mae"].value == pytest.approx(mean_absolute_error(t, q))


def test_batched_confusion_matrices_equal_one_at_a_time():
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 3, (4, 50)), rng.integers(0, 3, (4, 50))
    batched = confusion_matrices(y, p, 3)
    for b in range(4):
        assert (batched[b] == confusion_matrices(y[b], p[b], 3)).all()


def test_bootstrap_interval_covers_the_truth_and_narrows_with_more_objects():
    rng = np.random.default_rng(2)
    widths = []
    for n in (100, 1600):
        z = rng.uniform(0, 2, n)
        pred = z + 0.05 * (1 + z) * rng.standard_normal(n)
        nmad = regression_scores(z, pred, True, replicates=500, seed=0)["nmad"]
        assert nmad.low < 0.05 < nmad.high  # the true scatter
        widths.append(nmad.high - nmad.low)
    assert widths[1] < widths[0] / 2.5  # ~ 1 / sqrt(n): a factor 4 expected
    hits = mean_interval(np.arange(1000) < 300, replicates=500)
    assert hits.value == pytest.approx(0.3) and 0.26 < hits.low < 0.3 < hits.high < 0.34
    # same seed, same interval
    assert regression_scores(z, pred, True, seed=3) == regression_scores(z, pred, True, seed=3)


def test_cka_and_mutual_knn():
    need("sklearn")
    from fmb.evaluation.similarity import linear_cka, similarity

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 8))
    rotation = np.linalg.qr(rng.standard_normal((8, 8)))[0]
    assert linear_cka(x, 3.0 * x @ rotation) == pytest.approx(1.0)  # rotation and scale invariant
    # independent noise: CKA about d / n (small), by hand: a rank-one case
    a = np.array([[1.0], [2.0], [3.0], [4.0]])
    b = np.array([[1.0], [3.0], [2.0], [4.0]])
    # centred: a (-1.5, -.5, .5, 1.5), b (-1.5, .5, -.5, 1.5); <a,b>^2 / (|a|^2 |b|^2) = (4)^2 / 5^2
    assert linear_cka(a, b) == pytest.approx(16 / 25)
    noise = rng.standard_normal((300, 8))
    wide = np.concatenate([x, rng.standard_normal((300, 24)) * 0.01], axis=1)  # another width
    missing = x.copy()
    missing[:10] = np.nan
    matrix = similarity({"x": x, "rotated": x @ rotation, "wide": wide, "noise": noise, "holes": missing}, k=10)
    i = {name: n for n, name in enumerate(matrix.names)}
    assert matrix.mutual_knn[i["x"], i["rotated"]] == pytest.approx(1.0)  # cosine neighbours survive a rotation
    assert matrix.mutual_knn[i["x"], i["wide"]] > 0.9 and matrix.cka[i["x"], i["wide"]] > 0.99
    assert matrix.mutual_knn[i["x"], i["noise"]] < 0.15 and matrix.cka[i["x"], i["noise"]] < 0.1
    assert matrix.objects[i["x"], i["holes"]] == 290 and matrix.cka[i["x"], i["holes"]] == pytest.approx(1.0)
    assert (matrix.cka == matrix.cka.T).all() and np.allclose(np.diag(matrix.cka), 1.0)
