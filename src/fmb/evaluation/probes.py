"""What embeddings know: probes with k-fold cross-validation, retrieval, and the metrics reported.

Probes: distance-weighted kNN (k=64, zero-shot: no training beyond storing the train fold),
ridge regression / logistic regression (linear), and a one-hidden-layer MLP. Every probe is
fit on the train folds only (standardisation included) and scored on the held-out fold.
All array work is NumPy / torch on the CPU, chunked so memory stays bounded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

CATASTROPHIC = 0.15  # |dz| / (1 + z) above this is a catastrophic redshift outlier


# ----------------------------------------------------------------------------- metrics


def r2_score(y: np.ndarray, pred: np.ndarray) -> float:
    total = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - pred) ** 2).sum()) / total if total > 0 else float("nan")


def redshift_scores(z: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    dz = (pred - z) / (1.0 + z)
    return {"nmad": float(1.4826 * np.median(np.abs(dz - np.median(dz)))),
            "outlier_frac": float(np.mean(np.abs(dz) > CATASTROPHIC))}


def accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean(y == pred))


def macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    scores = []
    for label in np.unique(y):
        tp = np.sum((pred == label) & (y == label))
        fp = np.sum((pred == label) & (y != label))
        fn = np.sum((pred != label) & (y == label))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores))


# ----------------------------------------------------------------------------- folds


def kfold(n: int, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    order = np.random.default_rng(seed).permutation(n)
    parts = np.array_split(order, folds)
    return [(np.concatenate(parts[:i] + parts[i + 1 :]), parts[i]) for i in range(folds)]


def label_subset(train: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A `fraction` of the training indices (at least 2), for few-shot curves."""
    if fraction >= 1.0:
        return train
    count = max(2, int(round(len(train) * fraction)))
    return np.random.default_rng(seed).choice(train, size=min(count, len(train)), replace=False)


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 0, std, 1.0)
    return [(a - mean) / std for a in (train, *others)]


# ----------------------------------------------------------------------------- probes


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, k: int = 64,
                classify: bool = False, chunk: int = 2048) -> np.ndarray:
    """Distance-weighted kNN (weights 1 / distance) in cosine geometry (rows L2-normalised)."""
    train_t = F.normalize(torch.from_numpy(train_x).float(), dim=1)
    test_t = F.normalize(torch.from_numpy(test_x).float(), dim=1)
    k = min(k, len(train_t))
    if classify:  # labels may be strings: vote over their codes
        labels, codes = np.unique(train_y, return_inverse=True)
        y_t = torch.from_numpy(codes)
    else:
        y_t = torch.from_numpy(np.asarray(train_y, dtype=np.float64))
    out = []
    for start in range(0, len(test_t), chunk):
        sims = test_t[start : start + chunk] @ train_t.T
        top, idx = sims.topk(k, dim=1)
        weights = 1.0 / (1.0 - top).clamp(min=1e-6)  # cosine distance
        if classify:
            votes = torch.zeros(len(idx), len(labels)).scatter_add_(1, y_t[idx], weights)
            out.append(labels[votes.argmax(1).numpy()])
        else:
            out.append(((weights * y_t[idx].float()).sum(1) / weights.sum(1)).numpy())
    return np.concatenate(out)


def ridge_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, seed: int = 0) -> np.ndarray:
    """Ridge regression; the penalty is chosen on an inner 20% split of the training rows."""
    alphas = np.logspace(-3, 3, 7)
    order = np.random.default_rng(seed).permutation(len(train_x))
    inner_val, inner_fit = order[: max(1, len(order) // 5)], order[max(1, len(order) // 5) :]
    errors = [np.mean((_ridge(train_x[inner_fit], train_y[inner_fit], train_x[inner_val], a) - train_y[inner_val]) ** 2)
              for a in alphas]
    return _ridge(train_x, train_y, test_x, alphas[int(np.argmin(errors))])


def _ridge(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, alpha: float) -> np.ndarray:
    x, t = _standardise(train_x.astype(np.float64), test_x.astype(np.float64))
    mean = train_y.mean()
    gram = x.T @ x + alpha * len(x) * np.eye(x.shape[1])
    weights = np.linalg.solve(gram, x.T @ (train_y - mean))
    return t @ weights + mean


def mlp_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, classify: bool = False,
                hidden: int = 256, linear: bool = False, epochs: int = 200, seed: int = 0) -> np.ndarray:
    """A one-hidden-layer MLP (or a linear/logistic model), full-batch Adam with weight decay,
    stopped at the best epoch on an inner 20% split of the training rows."""
    torch.manual_seed(seed)
    x, t = (torch.from_numpy(a).float() for a in _standardise(train_x.astype(np.float64), test_x.astype(np.float64)))
    if classify:
        labels, codes = np.unique(train_y, return_inverse=True)
        y = torch.from_numpy(codes)
        outputs = len(labels)
    else:
        mean, std = float(train_y.mean()), float(train_y.std()) or 1.0
        y = torch.from_numpy((train_y - mean) / std).float()
        outputs = 1
    order = torch.randperm(len(x))
    val, fit = order[: max(1, len(x) // 5)], order[max(1, len(x) // 5) :]
    layers = [torch.nn.Linear(x.shape[1], outputs)] if linear else [
        torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, outputs)]
    model = torch.nn.Sequential(*layers)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)

    def loss_of(rows):
        out = model(x[rows])
        return F.cross_entropy(out, y[rows]) if classify else F.mse_loss(out[:, 0], y[rows])

    best, best_state = float("inf"), None
    for _ in range(epochs):
        optimizer.zero_grad()
        loss_of(fit).backward()
        optimizer.step()
        with torch.no_grad():
            val_loss = loss_of(val).item()
        if val_loss < best:
            best, best_state = val_loss, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    with torch.no_grad():
        out = model(t)
    if classify:
        return labels[out.argmax(1).numpy()]
    return out[:, 0].numpy() * std + mean


# ----------------------------------------------------------------------------- evaluation


@dataclass
class ProbeResult:
    probe: str
    fraction: float
    metrics: dict[str, float]
    predictions: np.ndarray  # out-of-fold, one per row


def cross_validate(x: np.ndarray, y: np.ndarray, classify: bool, target: str, folds: int = 5,
                   fractions: tuple[float, ...] = (0.01, 0.1, 1.0), k: int = 64, seed: int = 0,
                   probes: tuple[str, ...] = ("knn", "linear", "mlp")) -> list[ProbeResult]:
    """Out-of-fold predictions of every probe at every label fraction, scored once over all rows."""
    results = []
    splits = kfold(len(x), folds, seed)
    for fraction in fractions:
        for probe in probes:
            pred = np.empty(len(y), dtype=y.dtype if classify else np.float64)
            for fold, (train, test) in enumerate(splits):
                train = label_subset(train, fraction, seed + fold)
                if classify and len(np.unique(y[train])) < 2:
                    pred[test] = y[train][0]
                    continue
                if probe == "knn":
                    pred[test] = knn_predict(x[train], y[train], x[test], k=k, classify=classify)
                elif probe == "linear" and not classify:
                    pred[test] = ridge_predict(x[train], y[train], x[test], seed=seed)
                else:
                    pred[test] = mlp_predict(x[train], y[train], x[test], classify=classify,
                                             linear=probe == "linear", seed=seed)
            results.append(ProbeResult(probe, fraction, score(y, pred, classify, target), pred))
    return results


def score(y: np.ndarray, pred: np.ndarray, classify: bool, target: str) -> dict[str, float]:
    if classify:
        return {"accuracy": accuracy(y, pred), "macro_f1": macro_f1(y, pred)}
    metrics = {"r2": r2_score(y, pred)}
    if "redshift" in target.lower() or target.lower() in ("z", "specz_z"):
        metrics.update(redshift_scores(y, pred))
    return metrics


def retrieval_topk(a: np.ndarray, b: np.ndarray, ks: tuple[int, ...] = (1, 5), chunk: int = 2048) -> dict[str, float]:
    """Fraction of rows of `a` whose own row of `b` is among the k most cosine-similar rows of `b`."""
    a_t = F.normalize(torch.from_numpy(a).float(), dim=1)
    b_t = F.normalize(torch.from_numpy(b).float(), dim=1)
    hits = {k: 0 for k in ks}
    for start in range(0, len(a_t), chunk):
        sims = a_t[start : start + chunk] @ b_t.T
        own = sims[torch.arange(len(sims)), torch.arange(start, start + len(sims))]
        rank = (sims > own[:, None]).sum(1)  # rows strictly more similar than the true partner
        for k in ks:
            hits[k] += int((rank < k).sum())
    return {f"top{k}": hits[k] / len(a_t) for k in ks}


def pca_2d(x: np.ndarray) -> np.ndarray:
    """The first two principal components of the rows of x (centred; SVD)."""
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T
