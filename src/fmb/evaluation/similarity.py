"""How alike two embeddings of the same objects are, whatever their widths.

Linear CKA (centred kernel alignment, Kornblith et al. 2019): ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F),
1 for embeddings equal up to rotation and isotropic scaling. Mutual kNN (Huh et al. 2024): the
mean share of each object's k nearest neighbours (cosine) that both embeddings agree on; chance
is about k / n. Each pair is scored on the objects both columns have.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SimilarityMatrix:
    names: list[str]
    cka: np.ndarray  # (m, m)
    mutual_knn: np.ndarray  # (m, m)
    objects: np.ndarray  # (m, m) objects each pair was scored on
    k: int


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    x = np.asarray(x, np.float64) - np.mean(x, axis=0)
    y = np.asarray(y, np.float64) - np.mean(y, axis=0)
    cross = np.linalg.norm(y.T @ x) ** 2
    norm = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(cross / norm) if norm > 0 else float("nan")


def neighbours(x: np.ndarray, k: int) -> np.ndarray:
    """(n, k) indices of each row's k nearest other rows by cosine distance."""
    from sklearn.neighbors import NearestNeighbors

    k = min(k, len(x) - 1)
    index = NearestNeighbors(n_neighbors=k + 1, metric="cosine", algorithm="brute").fit(x)
    found = index.kneighbors(x, return_distance=False)
    # drop each row itself (usually first; with duplicates anywhere in the list)
    own = found == np.arange(len(x))[:, None]
    own[~own.any(1), -1] = True  # a row not found among its own neighbours loses its farthest one
    return found[~own].reshape(len(x), k)


def mutual_knn(a: np.ndarray, b: np.ndarray) -> float:
    """Mean overlap share of two (n, k) neighbour index sets."""
    shared = (a[:, :, None] == b[:, None, :]).any(2).sum(1)
    return float(np.mean(shared / a.shape[1]))


def similarity(columns: dict[str, np.ndarray], k: int = 10) -> SimilarityMatrix:
    """CKA and mutual-kNN between every pair of `columns` (name -> (n, d), NaN rows where absent, same objects)."""
    names = list(columns)
    m = len(names)
    cka, mknn, objects = np.eye(m), np.eye(m), np.zeros((m, m), np.int64)
    finite = {name: np.isfinite(x).all(1) for name, x in columns.items()}
    shared_rows = np.logical_and.reduce(list(finite.values()))
    cache = {}  # neighbours of a column over the rows all columns share: the common case, computed once
    for i, a in enumerate(names):
        objects[i, i] = int(finite[a].sum())
        for j in range(i + 1, m):
            b = names[j]
            rows = finite[a] & finite[b]
            objects[i, j] = objects[j, i] = int(rows.sum())
            if rows.sum() < 3:
                cka[i, j] = cka[j, i] = mknn[i, j] = mknn[j, i] = np.nan
                continue
            cka[i, j] = cka[j, i] = linear_cka(columns[a][rows], columns[b][rows])
            if np.array_equal(rows, shared_rows):
                for name in (a, b):
                    if name not in cache:
                        cache[name] = neighbours(columns[name][rows], k)
                na, nb = cache[a], cache[b]
            else:
                na, nb = neighbours(columns[a][rows], k), neighbours(columns[b][rows], k)
            mknn[i, j] = mknn[j, i] = mutual_knn(na, nb)
    return SimilarityMatrix(names, cka, mknn, objects, k)


def markdown(matrix: SimilarityMatrix) -> str:
    """Both matrices as one markdown table: CKA above the diagonal, mutual kNN below."""
    lines = [f"CKA (upper right) and mutual-kNN with k = {matrix.k} (lower left):", "",
             "| | " + " | ".join(matrix.names) + " |", "|---" * (len(matrix.names) + 1) + "|"]
    for i, name in enumerate(matrix.names):
        cells = []
        for j in range(len(matrix.names)):
            value = matrix.cka[i, j] if j > i else matrix.mutual_knn[i, j] if j < i else None
            cells.append("-" if value is None else f"{value:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
