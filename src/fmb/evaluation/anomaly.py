"""Anomaly scores from embeddings: kNN distance, cross-modal disagreement, isolation forest.

Higher means more anomalous for every score. Scores from several models are fused by
averaging their rank percentiles.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def knn_distance(x: np.ndarray, k: int = 16, chunk: int = 2048) -> np.ndarray:
    """Mean cosine distance to the k nearest other objects."""
    t = F.normalize(torch.from_numpy(x).float(), dim=1)
    k = min(k, len(t) - 1)
    out = []
    for start in range(0, len(t), chunk):
        sims = t[start : start + chunk] @ t.T
        sims[torch.arange(len(sims)), torch.arange(start, start + len(sims))] = -2.0  # not itself
        out.append((1.0 - sims.topk(k, dim=1).values).mean(1).numpy())
    return np.concatenate(out)


def cross_modal_disagreement(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 - cosine similarity between an object's two modality embeddings."""
    return 1.0 - (F.normalize(torch.from_numpy(a).float(), dim=1) * F.normalize(torch.from_numpy(b).float(), dim=1)).sum(1).numpy()


def _average_path(n: np.ndarray | float) -> np.ndarray:
    """Expected path length of an unsuccessful search in a binary search tree of n points."""
    n = np.asarray(n, dtype=np.float64)
    out = np.where(n > 2, 2.0 * (np.log(np.maximum(n - 1, 1)) + np.euler_gamma) - 2.0 * (n - 1) / np.maximum(n, 1), 0.0)
    return np.where(n == 2, 1.0, out)


def isolation_forest(x: np.ndarray, trees: int = 100, sample: int = 256, seed: int = 0) -> np.ndarray:
    """Isolation-forest anomaly score 2^(-E[h(x)] / c(sample)) in (0, 1]."""
    rng = np.random.default_rng(seed)
    n = len(x)
    sample = min(sample, n)
    max_depth = int(np.ceil(np.log2(max(sample, 2))))
    depth_sum = np.zeros(n)
    for _ in range(trees):
        fit = x[rng.choice(n, sample, replace=False)]
        depth_sum += _tree_depths(fit, x, rng, max_depth)
    return 2.0 ** (-(depth_sum / trees) / _average_path(sample))


def _tree_depths(fit: np.ndarray, x: np.ndarray, rng: np.random.Generator, max_depth: int) -> np.ndarray:
    """Grow one random tree on `fit` breadth-first and route every row of `x` through it."""
    depth = np.zeros(len(x))
    # Each frontier entry: (rows of fit in the node, rows of x in the node, depth)
    frontier = [(np.arange(len(fit)), np.arange(len(x)), 0)]
    while frontier:
        fit_rows, x_rows, level = frontier.pop()
        if level >= max_depth or len(fit_rows) <= 1:
            depth[x_rows] = level + _average_path(len(fit_rows))
            continue
        feature = rng.integers(fit.shape[1])
        lo, hi = fit[fit_rows, feature].min(), fit[fit_rows, feature].max()
        if lo == hi:
            depth[x_rows] = level + _average_path(len(fit_rows))
            continue
        cut = rng.uniform(lo, hi)
        left_fit = fit[fit_rows, feature] < cut
        left_x = x[x_rows, feature] < cut
        frontier.append((fit_rows[left_fit], x_rows[left_x], level + 1))
        frontier.append((fit_rows[~left_fit], x_rows[~left_x], level + 1))
    return depth


def rank_percentile(scores: np.ndarray) -> np.ndarray:
    """0 for the least anomalous object, 1 for the most (ties share a rank)."""
    order = scores.argsort(kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(len(scores))
    return ranks / max(1, len(scores) - 1)
