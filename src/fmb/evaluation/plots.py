"""Figures for `fmb evaluate --plots` (the optional `plots` extra: matplotlib, imported here only).

Per model, embedding and target: a PCA projection coloured by the target and, for regression
targets, the kNN probe's out-of-fold predictions against the truth; per target: few-shot
curves of every probe with the random-init baseline dashed; per modality pair: retrieval
top-k curves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fmb.errors import ConfigError
from fmb.evaluation.probes import pca_2d, retrieval_topk


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plots needs matplotlib: pip install 'fmb[plots]'") from None
    return plt


def projection(x: np.ndarray, y: np.ndarray, title: str, path: Path) -> Path:
    plt = _pyplot()
    xy = pca_2d(x.astype(np.float64))
    fig, ax = plt.subplots(figsize=(5, 4.5))
    if y.dtype.kind in "fiu":
        points = ax.scatter(xy[:, 0], xy[:, 1], c=y.astype(float), s=6, cmap="viridis")
        fig.colorbar(points, ax=ax)
    else:
        for label in np.unique(y.astype(str)):
            keep = y.astype(str) == label
            ax.scatter(xy[keep, 0], xy[keep, 1], s=6, label=label)
        ax.legend(fontsize=6, markerscale=2)
    ax.set(title=title, xlabel="PC 1", ylabel="PC 2")
    return _save(fig, plt, path)


def prediction_scatter(y: np.ndarray, pred: np.ndarray, title: str, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(y, pred, s=5, alpha=0.6)
    low, high = float(min(y.min(), pred.min())), float(max(y.max(), pred.max()))
    ax.plot([low, high], [low, high], color="black", linewidth=0.8)
    ax.set(title=title, xlabel="true", ylabel="predicted (out of fold)")
    return _save(fig, plt, path)


def few_shot(rows: list[dict], metric: str, title: str, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for probe in sorted({r["probe"] for r in rows}):
        mine = sorted((r for r in rows if r["probe"] == probe and r["metric"] == metric), key=lambda r: r["labels"])
        fractions = [r["labels"] for r in mine]
        line = ax.plot(fractions, [r["value"] for r in mine], marker="o", label=probe)[0]
        if all(r["baseline"] is not None for r in mine):
            ax.plot(fractions, [r["baseline"] for r in mine], linestyle="--", color=line.get_color(),
                    label=f"{probe} (random init)")
    ax.set(title=title, xlabel="fraction of labels", ylabel=metric, xscale="log")
    ax.legend(fontsize=7)
    return _save(fig, plt, path)


def retrieval_curve(a: np.ndarray, b: np.ndarray, title: str, path: Path) -> Path:
    plt = _pyplot()
    ks = tuple(k for k in (1, 2, 5, 10, 20, 50, 100) if k <= len(a))
    scores = retrieval_topk(a, b, ks)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(ks, [scores[f"top{k}"] for k in ks], marker="o", label="retrieval")
    ax.plot(ks, [k / len(a) for k in ks], linestyle=":", color="grey", label="chance")
    ax.set(title=title, xlabel="k", ylabel="top-k accuracy", xscale="log")
    ax.legend(fontsize=7)
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
