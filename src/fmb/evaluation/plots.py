"""Figures of `fmb evaluate --plots` and `fmb benchmark` (matplotlib: the `plots` extra; UMAP: umap-learn, `eval`).

Per model, embedding and target: PCA and UMAP projections coloured by the target; the best
probe's out-of-fold predictions against the truth with the 1:1 line (and, for redshift, the
catastrophic-outlier bounds); for classes the confusion matrix. Per target: few-shot curves of
every probe with their 95% intervals and the random-init baseline dashed. Per modality pair:
retrieval top-k against chance. Per embedding with images: a thumbnail grid at UMAP positions.
Every function writes one PNG and returns its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fmb.errors import ConfigError
from fmb.evaluation.metrics import is_zero_shot

MAX_POINTS = 5000  # a projection of more objects draws a random subset of this size


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or an error naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("figures need matplotlib: pip install 'fmb[plots]'") from None
    return plt


def pca_2d(x: np.ndarray) -> np.ndarray:
    from sklearn.decomposition import PCA

    return PCA(n_components=2, svd_solver="full").fit_transform(np.asarray(x, np.float64))


def umap_2d(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """UMAP in cosine geometry (the geometry of the kNN probe)."""
    try:
        import umap
    except ImportError:
        raise ConfigError("UMAP projections need umap-learn: pip install 'fmb[eval]'") from None
    neighbours = min(15, len(x) - 1)
    reducer = umap.UMAP(n_neighbors=neighbours, min_dist=0.1, metric="cosine", random_state=seed, n_jobs=1)
    return reducer.fit_transform(np.asarray(x, np.float32))


def _subset(n: int, seed: int = 0) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n, MAX_POINTS, replace=False)) if n > MAX_POINTS else np.arange(n)


def project(x: np.ndarray, method: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(rows drawn, their 2-d positions) by PCA or UMAP; at most MAX_POINTS rows."""
    rows = _subset(len(x), seed)
    return rows, pca_2d(x[rows]) if method == "pca" else umap_2d(x[rows], seed)


def projection(x: np.ndarray, y: np.ndarray, title: str, path: Path, method: str = "pca", seed: int = 0) -> Path:
    """The rows of x in 2-d (PCA or UMAP), coloured by y."""
    rows, xy = project(x, method, seed)
    return coloured_panels(xy, {title: y[rows]}, path, "PC" if method == "pca" else "UMAP")


def coloured_panels(xy: np.ndarray, colours: dict[str, np.ndarray], path: Path, axis: str) -> Path:
    """One scatter of the same 2-d positions per entry of `colours` (title -> values; a colour bar for
    numbers, a legend for classes; missing values grey)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(colours), figsize=(4.6 * len(colours), 4.2), squeeze=False)
    for ax, (title, y) in zip(axes[0], colours.items(), strict=True):
        if y.dtype.kind in "fiu":
            values = y.astype(float)
            finite = np.isfinite(values)
            ax.scatter(xy[~finite, 0], xy[~finite, 1], s=4, color="lightgrey")
            points = ax.scatter(xy[finite, 0], xy[finite, 1], c=values[finite], s=6, cmap="viridis")
            fig.colorbar(points, ax=ax)
        else:
            labels = np.array(["missing" if v is None else str(v) for v in y])
            for label in np.unique(labels):
                keep = labels == label
                ax.scatter(xy[keep, 0], xy[keep, 1], s=6, label=label)
            ax.legend(fontsize=6, markerscale=2)
        ax.set(title=title, xlabel=f"{axis} 1", ylabel=f"{axis} 2")
    return save_figure(fig, plt, path)


def grid_cells(xy: np.ndarray, cells: int = 16) -> dict[tuple[int, int], int]:
    """The plane cut into cells x cells: per occupied cell, the row nearest its centre."""
    low, high = xy.min(0), xy.max(0)
    span = np.where(high > low, high - low, 1.0)
    cell = np.minimum(((xy - low) / span * cells).astype(int), cells - 1)
    centre = (cell + 0.5) / cells * span + low
    distance = np.linalg.norm((xy - centre) / span, axis=1)
    shown: dict[tuple[int, int], int] = {}
    for row in np.argsort(distance):
        shown.setdefault((int(cell[row, 0]), int(cell[row, 1])), int(row))
    return shown


def thumbnail_grid(shown: dict[tuple[int, int], np.ndarray], title: str, path: Path, cells: int = 16) -> Path:
    """Images at their 2-d positions: `shown` maps a cell of `grid_cells` to an (h, w, 3) uint8 image."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 7))
    for (i, j), image in shown.items():
        ax.imshow(image, extent=(i, i + 1, j, j + 1), origin="upper", interpolation="nearest")
    ax.set(xlim=(0, cells), ylim=(0, cells), title=title, xticks=[], yticks=[])
    ax.set_aspect("equal")
    return save_figure(fig, plt, path)


def prediction_scatter(y: np.ndarray, pred: np.ndarray, title: str, path: Path, outlier: float | None = None) -> Path:
    """Out-of-fold predictions against the truth, the 1:1 line, and for redshift the |dz|/(1+z) bounds."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(y, pred, s=5, alpha=0.6)
    low, high = float(min(y.min(), pred.min())), float(max(y.max(), pred.max()))
    margin = 0.03 * (high - low)  # the extreme points whole, not cut by the frame
    low, high = low - margin, high + margin
    line = np.linspace(low, high, 50)
    ax.plot(line, line, color="black", linewidth=0.8, label="1:1")
    if outlier is not None:
        for sign in (1, -1):
            ax.plot(line, line + sign * outlier * (1 + line), color="red", linestyle="--", linewidth=0.7,
                    label=f"|dz|/(1+z) = {outlier:g}" if sign == 1 else None)
        ax.legend(fontsize=7)
    ax.set(title=title, xlabel="true", ylabel="predicted (out of fold)", xlim=(low, high), ylim=(low, high))
    return save_figure(fig, plt, path)


def few_shot(rows: list[dict], metric: str, title: str, path: Path, key: str = "probe", group: str | None = None) -> Path:
    """Metric against the fraction of labels, one line per value of `key` (probe, or model), with its
    95% interval; the random-init baseline dashed; zero-shot figures (no labels) dotted across, in
    the colour of the curve of their `group` (e.g. the same model), else grey."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    lines = {name: sorted((r for r in rows if r[key] == name and r["metric"] == metric), key=lambda r: r["labels"])
             for name in sorted({r[key] for r in rows})}
    colours: dict[Any, str] = {}  # group -> colour of its curve
    for name, mine in lines.items():
        mine = [r for r in mine if not is_zero_shot(r)]
        if not mine:  # zero-shot: drawn after the curves, whose colours it takes
            continue
        fractions = [r["labels"] for r in mine]
        line = ax.plot(fractions, [r["value"] for r in mine], marker="o", label=name)[0]
        if group:
            colours.setdefault(mine[0][group], line.get_color())
        ax.fill_between(fractions, [r["low"] for r in mine], [r["high"] for r in mine], color=line.get_color(), alpha=0.2)
        if all(r["baseline"] is not None for r in mine):
            ax.plot(fractions, [r["baseline"] for r in mine], linestyle="--", color=line.get_color(),
                    label=f"{name} (random init)")
    for name, mine in lines.items():
        if mine and all(is_zero_shot(r) for r in mine):
            colour = colours.get(mine[0][group], "grey") if group else "grey"
            ax.axhline(mine[0]["value"], linestyle=":", color=colour, label=f"{name} (zero-shot)")
    ax.set(title=title, xlabel="fraction of labels", ylabel=metric, xscale="log")
    ax.legend(fontsize=7)
    return save_figure(fig, plt, path)


def confusion(matrix: np.ndarray, classes: np.ndarray, title: str, path: Path) -> Path:
    """Row-normalised confusion matrix (truth along rows), counts written in the cells."""
    plt = pyplot()
    size = max(3.5, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    share = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black")
    names = [str(c) for c in classes]
    ax.set(title=title, xlabel="predicted", ylabel="true", xticks=range(len(names)), yticks=range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
    ax.set_yticklabels(names, fontsize=7)
    return save_figure(fig, plt, path)


def retrieval_curve(ranks: np.ndarray, title: str, path: Path) -> Path:
    """Top-k retrieval accuracy against k (from each query's rank, 0 = first), with chance dotted."""
    plt = pyplot()
    ks = [k for k in (1, 2, 5, 10, 20, 50, 100) if k <= len(ranks)]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(ks, [float(np.mean(ranks < k)) for k in ks], marker="o", label="retrieval")
    ax.plot(ks, [k / len(ranks) for k in ks], linestyle=":", color="grey", label="chance")
    ax.set(title=title, xlabel="k", ylabel="top-k accuracy", xscale="log")
    ax.legend(fontsize=7)
    return save_figure(fig, plt, path)


def similarity_matrices(names: list[str], cka: np.ndarray, mutual_knn: np.ndarray, path: Path) -> Path:
    """CKA and mutual-kNN side by side."""
    plt = pyplot()
    size = max(4.0, 0.45 * len(names) + 2.5)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size, size))
    for ax, matrix, label in zip(axes, (cka, mutual_knn), ("linear CKA", "mutual kNN"), strict=True):
        ax.imshow(matrix, cmap="magma", vmin=0, vmax=1)
        for i in range(len(names)):
            for j in range(len(names)):
                if np.isfinite(matrix[i, j]):
                    ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="black" if matrix[i, j] > 0.6 else "white")
        ax.set(title=label, xticks=range(len(names)), yticks=range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=6)
        ax.set_yticklabels(names, fontsize=6)
    return save_figure(fig, plt, path)


def save_figure(fig: Any, plt: Any, path: str | Path, dpi: int = 100, crop: bool = False) -> Path:
    """Writes and closes the figure; returns the path written (a name without suffix gets .png, as
    savefig does). `crop`: the canvas cut to what is drawn (bbox_inches="tight"), for figures laid
    out on a gridspec of their own, which tight_layout would rearrange."""
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    if crop:
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
    else:
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
