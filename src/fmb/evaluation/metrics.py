"""The figures a benchmark table prints, each with a 95% bootstrap interval.

Regression: R^2, RMSE, MAE and bias for every target; for redshift-like targets the photo-z
figures on dz = (pred - z) / (1 + z): bias (median dz), NMAD (1.4826 median |dz - median dz|),
sigma_68 (half the width of the central 68% of dz) and the catastrophic-outlier fraction
(|dz| > threshold, 0.15 by default). Classes: accuracy, macro-F1 (over the classes present in
the truth or the predictions, as scikit-learn's f1_score) and the confusion matrix.

Every metric is written once, over the last axis of (replicates, objects) arrays, so the point
figure and all bootstrap replicates come from the same code in a few vectorised calls
(scikit-learn's metrics take one sample at a time; tests check these against them).
Intervals resample the objects of the out-of-fold predictions (percentile bootstrap): they
measure how much the figure depends on which objects were scored, not the probe's training noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

ZERO_SHOT = "zero-shot"  # the probe of a model's own prediction column, scored as it is: no labels used

OUTLIER_THRESHOLD = 0.15  # |dz| / (1 + z) above this is a catastrophic redshift outlier
BOOTSTRAP_REPLICATES = 1000
REPLICATES_PER_CHUNK = 100  # bounds memory: (chunk, objects) arrays


def is_zero_shot(row: dict) -> bool:
    """A row (or leaderboard entry) of a model's own prediction column rather than of a trained probe."""
    return row["probe"] == ZERO_SHOT


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float  # 2.5th percentile of the bootstrap replicates
    high: float  # 97.5th percentile

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def is_redshift(target: str) -> bool:
    """Targets scored with the photo-z figures: names containing 'redshift', or z / specz_z / zspec."""
    name = target.lower()
    return "redshift" in name or name in ("z", "specz_z", "zspec", "z_spec", "photoz")


# ----------------------------------------------------------------------------- metrics over the last axis


def _r2(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    total = ((y - y.mean(-1, keepdims=True)) ** 2).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, 1.0 - ((y - pred) ** 2).sum(-1) / total, np.nan)


def _dz(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    return (pred - y) / (1.0 + y)


def _nmad(d: np.ndarray) -> np.ndarray:
    return 1.4826 * np.median(np.abs(d - np.median(d, -1, keepdims=True)), -1)


def _sigma_68(d: np.ndarray) -> np.ndarray:
    low, high = np.percentile(d, [15.865, 84.135], axis=-1)
    return (high - low) / 2.0


def regression_metrics(redshift: bool, threshold: float = OUTLIER_THRESHOLD
                       ) -> dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]]:
    """name -> f(y, pred) over the last axis."""
    metrics: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
        "r2": _r2,
        "rmse": lambda y, p: np.sqrt(((p - y) ** 2).mean(-1)),
        "mae": lambda y, p: np.abs(p - y).mean(-1),
    }
    if redshift:
        metrics.update({
            "bias": lambda y, p: np.median(_dz(y, p), -1),
            "nmad": lambda y, p: _nmad(_dz(y, p)),
            "sigma_68": lambda y, p: _sigma_68(_dz(y, p)),
            "outlier_frac": lambda y, p: (np.abs(_dz(y, p)) > threshold).mean(-1),
        })
    else:
        metrics["bias"] = lambda y, p: (p - y).mean(-1)
    return metrics


def confusion_matrices(y: np.ndarray, pred: np.ndarray, classes: int) -> np.ndarray:
    """(..., classes, classes) counts, truth along rows, from integer codes of shape (..., n)."""
    lead = y.shape[:-1]
    replicate = np.arange(int(np.prod(lead, dtype=np.int64))).reshape(lead + (1,)) if lead else 0
    flat = (replicate * classes + y) * classes + pred
    counts = np.bincount(flat.ravel(), minlength=int(np.prod(lead, dtype=np.int64)) * classes * classes)
    return counts.reshape(lead + (classes, classes))


def _accuracy(conf: np.ndarray) -> np.ndarray:
    return np.trace(conf, axis1=-2, axis2=-1) / conf.sum((-2, -1))


def _macro_f1(conf: np.ndarray) -> np.ndarray:
    tp = np.diagonal(conf, axis1=-2, axis2=-1).astype(np.float64)
    truth, predicted = conf.sum(-1), conf.sum(-2)
    seen = (truth + predicted) > 0  # classes in neither the truth nor the predictions do not count
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(seen, 2 * tp / (truth + predicted), 0.0)
    return f1.sum(-1) / seen.sum(-1)


CLASS_METRICS = {"accuracy": _accuracy, "macro_f1": _macro_f1}


# ----------------------------------------------------------------------------- with intervals


Samples = dict[str, tuple[float, np.ndarray]]  # metric -> (the figure, its bootstrap replicates)


def regression_samples(y: np.ndarray, pred: np.ndarray, redshift: bool, threshold: float = OUTLIER_THRESHOLD,
                       replicates: int = BOOTSTRAP_REPLICATES, seed: int = 0) -> Samples:
    """Every regression figure of `pred` against `y` and its bootstrap replicates."""
    y, pred = np.asarray(y, np.float64), np.asarray(pred, np.float64)
    metrics = regression_metrics(redshift, threshold)
    samples: dict[str, list[np.ndarray]] = {name: [] for name in metrics}
    for rows in _replicate_rows(len(y), replicates, seed):
        y_b, p_b = y[rows], pred[rows]
        for name, fn in metrics.items():
            samples[name].append(fn(y_b, p_b))
    return {name: (float(fn(y, pred)), _joined(samples[name])) for name, fn in metrics.items()}


def regression_scores(y: np.ndarray, pred: np.ndarray, redshift: bool, threshold: float = OUTLIER_THRESHOLD,
                      replicates: int = BOOTSTRAP_REPLICATES, seed: int = 0) -> dict[str, Estimate]:
    """Every regression figure of `pred` against `y` with its 95% bootstrap interval."""
    return estimates([regression_samples(y, pred, redshift, threshold, replicates, seed)])


def class_samples(y: np.ndarray, pred: np.ndarray, replicates: int = BOOTSTRAP_REPLICATES, seed: int = 0
                  ) -> tuple[Samples, np.ndarray, np.ndarray]:
    """(accuracy and macro-F1 with their bootstrap replicates, confusion matrix, its class labels)."""
    labels, codes = np.unique(np.concatenate([np.asarray(y), np.asarray(pred)]), return_inverse=True)
    y_code, p_code = codes[: len(y)], codes[len(y):]
    confusion = confusion_matrices(y_code, p_code, len(labels))
    samples: dict[str, list[np.ndarray]] = {name: [] for name in CLASS_METRICS}
    for rows in _replicate_rows(len(y), replicates, seed):
        conf_b = confusion_matrices(y_code[rows], p_code[rows], len(labels))
        for name, fn in CLASS_METRICS.items():
            samples[name].append(fn(conf_b))
    return {name: (float(fn(confusion)), _joined(samples[name])) for name, fn in CLASS_METRICS.items()}, confusion, labels


def estimates(draws: list[Samples]) -> dict[str, Estimate]:
    """Per metric, the mean of the draws' figures with the 95% percentile interval of their bootstrap
    replicates pooled: with several label draws (few-shot) the interval covers both which objects
    were scored and which were labelled."""
    # an interval for one draw's figure, not for the mean over draws: wider, so conservative for the leaderboard's ties
    return {name: _estimate(float(np.mean([d[name][0] for d in draws])), [d[name][1] for d in draws]) for name in draws[0]}


def mean_interval(values: np.ndarray, replicates: int = BOOTSTRAP_REPLICATES, seed: int = 0) -> Estimate:
    """The mean of per-object values (e.g. retrieval hits) with its 95% bootstrap interval."""
    values = np.asarray(values, np.float64)
    samples = [values[rows].mean(-1) for rows in _replicate_rows(len(values), replicates, seed)]
    return _estimate(float(values.mean()), samples)


def _replicate_rows(n: int, replicates: int, seed: int):
    """Bootstrap row indices, (chunk, n) at a time."""
    rng = np.random.default_rng(seed)
    for start in range(0, replicates, REPLICATES_PER_CHUNK):
        yield rng.integers(0, n, size=(min(REPLICATES_PER_CHUNK, replicates - start), n))


def _joined(samples: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(samples) if samples else np.empty(0)


def _estimate(value: float, samples: list[np.ndarray]) -> Estimate:
    values = _joined(samples)
    values = values if len(values) else np.array([value])  # no replicates asked for
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return Estimate(value, float("nan"), float("nan"))
    low, high = np.percentile(values, [2.5, 97.5])
    return Estimate(value, float(low), float(high))
