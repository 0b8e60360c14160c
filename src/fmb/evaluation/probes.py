"""Probes on frozen embeddings (scikit-learn, the `eval` extra), k-fold out-of-fold predictions.

Probes: distance-weighted kNN (cosine, k = 64 by default: zero-shot, nothing trained beyond the
stored train fold), linear (ridge with its penalty chosen by efficient leave-one-out; logistic
regression for classes) and an MLP (one hidden layer of 256, early stopping on 20% of the train
fold). Every probe is a pipeline fit on the train rows only (standardisation included) and
scores the held-out fold. Folds are a per-row fold number (`Folds`), so `fmb benchmark` can
freeze them on disk and every model is scored on the same rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from fmb.data.splits import mix64
from fmb.errors import ConfigError
from fmb.evaluation.metrics import (
    OUTLIER_THRESHOLD,
    Estimate,
    class_samples,
    estimates,
    regression_samples,
)

log = logging.getLogger("fmb")

PROBES = ("knn", "linear", "mlp")
FEW_SHOT_DRAWS = 5  # label subsets drawn per fraction below 1: few labels make one draw a lottery
SINGLE_THREAD_BELOW = 20_000_000  # embedding values (objects x width)


def sklearn() -> Any:
    """The scikit-learn module, or a clear error naming the extra."""
    try:
        import sklearn as module
    except ImportError:
        raise ConfigError("probes need scikit-learn: pip install 'fmb[eval]'") from None
    return module


@dataclass
class Folds:
    """Fold of every row, and a random rank used to pick few-shot label subsets (draw 0 takes the
    lowest ranks; draw d > 0 orders the rows by a hash of (rank, d), so a draw is a property of the
    objects and every model of a benchmark gets the same labelled rows)."""

    fold: np.ndarray  # (n,) int in [0, folds)
    rank: np.ndarray  # (n,) a permutation of 0..n-1

    def take(self, rows: np.ndarray) -> Folds:
        return Folds(self.fold[rows], self.rank[rows])

    @property
    def count(self) -> int:
        return int(self.fold.max()) + 1

    def train_rows(self, fold: int, fraction: float, draw: int = 0) -> np.ndarray:
        """The rows outside `fold`, or the `fraction` of them (at least 2) first in the order of `draw`."""
        train = np.flatnonzero(self.fold != fold)
        if fraction >= 1.0:
            return train
        count = min(len(train), max(2, int(round(len(train) * fraction))))
        order = self.rank[train] if draw == 0 else mix64(self.rank[train].astype(np.uint64) + (np.uint64(draw) << np.uint64(32)))
        return train[np.argsort(order, kind="stable")[:count]]


def make_folds(n: int, folds: int, seed: int, classes: np.ndarray | None = None) -> Folds:
    """k folds over n rows: stratified by `classes` when every class has at least `folds` members."""
    sklearn()
    from sklearn.model_selection import KFold, StratifiedKFold

    if n < folds:
        raise ConfigError(f"{folds} folds need at least {folds} objects; there are {n}")
    fold = np.empty(n, np.int64)
    splitter: Any = KFold(folds, shuffle=True, random_state=seed)
    if classes is not None:
        _, counts = np.unique(classes, return_counts=True)
        if counts.min() >= folds:
            splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
        else:
            log.info(f"a class has {counts.min()} member(s), fewer than {folds} folds: folds are not stratified")
    for index, (_, test) in enumerate(splitter.split(np.zeros(n), classes)):
        fold[test] = index
    return Folds(fold, np.random.default_rng(seed).permutation(n))


def build_probe(probe: str, classify: bool, k: int, seed: int, train_rows: int) -> Any:
    """An unfitted scikit-learn estimator for `probe`."""
    from sklearn.compose import TransformedTargetRegressor
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if probe == "knn":  # cosine distance, neighbours weighted by 1 / distance
        knn = KNeighborsClassifier if classify else KNeighborsRegressor
        return knn(n_neighbors=min(k, train_rows), weights="distance", metric="cosine", algorithm="brute")
    if probe == "linear":
        model = (LogisticRegression(C=1.0, max_iter=2000) if classify
                 else RidgeCV(alphas=np.logspace(-2, 5, 15)))
        return make_pipeline(StandardScaler(), model)
    if probe == "mlp":
        # early stopping needs a validation share of at least one row per class
        stop = train_rows >= 50
        options = dict(hidden_layer_sizes=(256,), alpha=1e-4, learning_rate_init=1e-3, max_iter=500,
                       early_stopping=stop, validation_fraction=0.2, n_iter_no_change=20, random_state=seed)
        if classify:
            return make_pipeline(StandardScaler(), MLPClassifier(**options))
        return make_pipeline(StandardScaler(), TransformedTargetRegressor(MLPRegressor(**options),
                                                                           transformer=StandardScaler()))
    raise ConfigError(f"unknown probe '{probe}': choose from {', '.join(PROBES)}")


def fit_predict(probe: str, classify: bool, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                k: int = 64, seed: int = 0) -> np.ndarray:
    """Fit `probe` on the train rows and predict the test rows. A train set with one class predicts it
    (a fold or a few-shot subset can hold a single class)."""
    import warnings

    from sklearn.dummy import DummyClassifier
    from sklearn.exceptions import ConvergenceWarning

    if classify and len(np.unique(train_y)) < 2:
        model: Any = DummyClassifier(strategy="most_frequent")
    else:
        model = build_probe(probe, classify, k, seed, len(train_x))
    with warnings.catch_warnings():  # a capped iteration count is a choice here, not a fault
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(train_x, train_y)
    return model.predict(test_x)


@dataclass
class ProbeResult:
    probe: str
    fraction: float
    metrics: dict[str, Estimate]
    predictions: np.ndarray  # out-of-fold, one per row
    confusion: np.ndarray | None = None  # classes: truth along rows
    classes: np.ndarray | None = None


def cross_validate(x: np.ndarray, y: np.ndarray, kind: str, folds: Folds,
                   fractions: tuple[float, ...] = (0.01, 0.1, 1.0), k: int = 64, seed: int = 0,
                   probes: tuple[str, ...] = PROBES, threshold: float = OUTLIER_THRESHOLD,
                   replicates: int = 1000, progress: Any = None, draws: int = FEW_SHOT_DRAWS) -> list[ProbeResult]:
    """Out-of-fold predictions of every probe at every label fraction, scored over all rows.
    `kind`: redshift (photo-z figures), regression or classification. A fraction below 1 is run for
    `draws` label subsets: its figures are their mean, its intervals pool their bootstrap replicates
    (`replicates` in all, so scoring costs the same), its predictions are draw 0's."""
    sklearn()
    from threadpoolctl import threadpool_limits

    if draws < 1:
        raise ConfigError(f"draws = {draws}: a few-shot fraction needs at least one label draw")
    classify = kind == "classification"
    x = np.asarray(x, np.float32)
    results = []
    # BLAS threads cost more than they bring on probe-sized matrices (measured: 128x128 eigh 3x slower
    # with 2 threads on 2 busy cores); large samples keep every thread
    with threadpool_limits(1 if x.size < SINGLE_THREAD_BELOW else None):
        for fraction in fractions:
            for probe in probes:
                predictions = []
                for draw in range(1 if fraction >= 1.0 else draws):
                    pred = np.empty(len(y), dtype=y.dtype if classify else np.float64)
                    for fold in range(folds.count):
                        test = np.flatnonzero(folds.fold == fold)
                        if len(test):
                            train = folds.train_rows(fold, fraction, draw)
                            pred[test] = fit_predict(probe, classify, x[train], y[train], x[test], k, seed)
                    predictions.append(pred)
                results.append(score(y, predictions, kind, probe, fraction, threshold, replicates, seed))
                if progress is not None:
                    progress.update(1)
    return results


def score(y: np.ndarray, predictions: list[np.ndarray], kind: str, probe: str, fraction: float,
          threshold: float = OUTLIER_THRESHOLD, replicates: int = 1000, seed: int = 0) -> ProbeResult:
    """The figures of one or several draws' predictions (draw d bootstrapped with seed + d)."""
    share = -(-replicates // len(predictions))
    if kind == "classification":
        draws = [class_samples(y, pred, share, seed + d) for d, pred in enumerate(predictions)]
        _, confusion, classes = draws[0]
        return ProbeResult(probe, fraction, estimates([d[0] for d in draws]), predictions[0], confusion, classes)
    draws = [regression_samples(y, pred, kind == "redshift", threshold, share, seed + d) for d, pred in enumerate(predictions)]
    return ProbeResult(probe, fraction, estimates(draws), predictions[0])


def retrieval_ranks(a: np.ndarray, b: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """For each row of `a`, how many rows of `b` are more cosine-similar to it than its own row of `b`
    (0: retrieved first)."""
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    ranks = np.empty(len(a), np.int64)
    for start in range(0, len(a), chunk):
        sims = a[start : start + chunk] @ b.T
        own = sims[np.arange(len(sims)), np.arange(start, start + len(sims))]
        ranks[start : start + len(sims)] = (sims > own[:, None]).sum(1)
    return ranks
