"""Anomaly scorers over one embedding column (or two, for the cross-modal mismatch).

Every score is higher for a more anomalous object, and is computed on the rows given: the caller
(`fmb.evaluation.detect`) passes only usable rows (finite, non-zero norm) and puts NaN for the rest.

- `knn`: mean cosine distance to the k nearest other objects (`neighbours`: exact torch search in
  chunks, or a faiss IVF index when exact search is too slow at survey scale).
- `lof`: scikit-learn's local outlier factor on the same neighbour graph (chordal distance on the
  unit sphere, so it agrees with the kNN score's geometry).
- `iforest`: scikit-learn's isolation forest, 2^(-E[h(x)] / c(n)) in (0, 1].
- `flow`: negative log-density under a zuko masked autoregressive flow fitted after PCA,
  standardisation and clipping (`FlowOptions`).
- `mismatch`: 1 - cosine between an object's two modality embeddings; meaningful only where the
  model aligns its modalities (contrastive models such as AstroCLIP).
- `mapped_mismatch`: 1 - cosine between an object's second embedding and a ridge map of its first
  into that space, fitted on the other objects (5 folds): a mismatch for models whose modality
  embeddings are not aligned, or not of one width.

scikit-learn, zuko and faiss are the `discovery` extra, imported inside the functions that use them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fmb.errors import ConfigError

SCORERS = ("knn", "lof", "iforest", "flow", "mismatch", "mapped_mismatch")
NEIGHBOUR_METHODS = ("auto", "exact", "faiss")
EXACT_UP_TO = 30_000  # `auto` searches exactly up to this many objects (about 20 s per column on 2 busy cores)


def discovery_import(module: str):
    """Import an extra of `fmb detect`, or a ConfigError naming the install command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"this scorer needs {module.split('.')[0]}: pip install -e '.[discovery]'") from None


def unit_rows(x: np.ndarray) -> np.ndarray:
    return F.normalize(torch.from_numpy(np.ascontiguousarray(x, np.float32)), dim=1).numpy()


@dataclass
class Neighbours:
    """The k nearest other objects of every row, nearest first."""

    index: np.ndarray  # (n, k) int64
    distance: np.ndarray  # (n, k) float32 cosine distance, 1 - cos

    @property
    def k(self) -> int:
        return self.index.shape[1]


def neighbours(x: np.ndarray, k: int, method: str, nprobe: int, seed: int = 0) -> Neighbours:
    """k nearest neighbours by cosine; `auto` is exact up to EXACT_UP_TO rows, faiss above."""
    if method not in NEIGHBOUR_METHODS:
        raise ConfigError(f"neighbour search '{method}': choose {', '.join(NEIGHBOUR_METHODS)}")
    if len(x) < 2:
        raise ConfigError(f"{len(x)} object(s): a neighbour score needs at least 2")
    k = min(k, len(x) - 1)
    if method == "faiss" or (method == "auto" and len(x) > EXACT_UP_TO):
        return faiss_neighbours(x, k, nprobe, seed)
    return exact_neighbours(x, k)


def exact_neighbours(x: np.ndarray, k: int) -> Neighbours:
    unit = unit_rows(x)
    index, similarity = exact_search(unit, np.arange(len(unit)), k)
    return Neighbours(index, (1.0 - similarity).clip(0.0, 2.0))


def exact_search(unit: np.ndarray, rows: np.ndarray, k: int, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(indices, cosine similarities) of the k nearest other rows of `unit` for each of `rows`."""
    base = torch.from_numpy(unit)
    index, similarity = [], []
    for start in range(0, len(rows), chunk):
        queries = torch.from_numpy(rows[start : start + chunk])
        sims = base[queries] @ base.T
        sims[torch.arange(len(queries)), queries] = -math.inf  # not itself
        top = sims.topk(k, dim=1)
        index.append(top.indices.numpy())
        similarity.append(top.values.numpy())
    return np.concatenate(index).astype(np.int64), np.concatenate(similarity)


def faiss_neighbours(x: np.ndarray, k: int, nprobe: int, seed: int = 0) -> Neighbours:
    """Approximate search: an inverted-file index (sqrt(n) lists, k-means trained on a sample of 64
    per list) probed `nprobe` lists deep (at 100k x 512, nprobe 8 had recall@16 0.998 against
    exact search at a fifth of its time: docs/discovery.md). Rows the probes leave short of k neighbours are searched exactly."""
    faiss = discovery_import("faiss")
    unit = unit_rows(x)
    n, d = unit.shape
    lists = max(1, min(int(math.sqrt(n)), n // 39))  # faiss wants >= 39 training points per list
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, lists, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    rng = np.random.default_rng(seed)
    train = unit[rng.choice(n, min(n, 64 * lists), replace=False)]
    index.train(train)
    index.add(unit)
    index.nprobe = min(nprobe, lists)
    sims, found = index.search(unit, k + 1)
    keep = (found != np.arange(n)[:, None]) & (found >= 0)  # drop the row itself (usually first)
    first = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # the first k kept, in distance order
    out_index = np.take_along_axis(found, first, axis=1).astype(np.int64)
    out_sims = np.take_along_axis(sims, first, axis=1)
    short = np.flatnonzero(keep.sum(1) < k)
    if len(short):
        out_index[short], out_sims[short] = exact_search(unit, short, k)
    return Neighbours(out_index, (1.0 - out_sims).clip(0.0, 2.0))


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Share of the exact k nearest neighbours (rows of indices) that an approximate search found."""
    hits = [len(np.intersect1d(a, e)) for a, e in zip(found, exact, strict=True)]
    return float(np.sum(hits) / exact.size)


def knn_distance(nb: Neighbours) -> np.ndarray:
    """Mean cosine distance to the k nearest other objects."""
    return nb.distance.mean(1).astype(np.float64)


def local_outlier_factor(nb: Neighbours) -> np.ndarray:
    """scikit-learn's LOF on the neighbour graph (chordal distances sqrt(2 (1 - cos)))."""
    neighbors = discovery_import("sklearn.neighbors")
    sparse = discovery_import("scipy.sparse")
    n, k = nb.index.shape
    # each row: itself at distance 0, then its k neighbours, as scikit-learn expects of a training graph
    columns = np.concatenate([np.arange(n)[:, None], nb.index], axis=1).reshape(-1)
    distances = np.concatenate([np.zeros((n, 1)), np.sqrt(2.0 * nb.distance)], axis=1).reshape(-1)
    graph = sparse.csr_matrix((distances, columns, np.arange(0, n * (k + 1) + 1, k + 1)), shape=(n, n))
    lof = neighbors.LocalOutlierFactor(n_neighbors=k, metric="precomputed").fit(graph)
    return -lof.negative_outlier_factor_


def isolation_forest(x: np.ndarray, trees: int, sample: int = 256, seed: int = 0) -> np.ndarray:
    """scikit-learn's isolation forest; the score 2^(-E[h(x)] / c(sample)) in (0, 1]."""
    ensemble = discovery_import("sklearn.ensemble")
    forest = ensemble.IsolationForest(n_estimators=trees, max_samples=min(sample, len(x)), random_state=seed)
    return -forest.fit(x).score_samples(x)


@dataclass
class FlowOptions:
    """The density model of the `flow` scorer."""

    components: int = 16  # PCA components the flow models
    transforms: int = 4  # autoregressive transforms
    hidden: int = 64  # width of the two hidden layers of each transform
    epochs: int = 20
    batch: int = 256
    lr: float = 1e-3
    clip: float = 5.0  # standardised PCA coordinates are clipped to +-clip
    fit_sample: int = 20_000  # the flow is fitted on at most this many objects, scored on all

    def __post_init__(self) -> None:
        if min(self.components, self.transforms, self.hidden, self.epochs, self.batch, self.fit_sample) < 1:
            raise ConfigError(f"flow options must be positive: {self}")
        if self.clip <= 0 or self.lr <= 0:
            raise ConfigError(f"flow clip and lr must be positive: {self}")


def flow_nll(x: np.ndarray, options: FlowOptions | None = None, seed: int = 0) -> np.ndarray:
    """Negative log-density of each row under a masked autoregressive flow (zuko) fitted to the
    rows' standardised, clipped PCA coordinates. Seeded: the same rows give the same scores on CPU."""
    options = options or FlowOptions()
    decomposition = discovery_import("sklearn.decomposition")
    rng = np.random.default_rng(seed)
    fit_rows = np.sort(rng.choice(len(x), min(len(x), options.fit_sample), replace=False))
    components = max(1, min(options.components, x.shape[1], len(fit_rows) - 1))
    pca = decomposition.PCA(components, whiten=True, random_state=seed).fit(x[fit_rows])
    z = torch.from_numpy(pca.transform(x).clip(-options.clip, options.clip).astype(np.float32))
    threads = torch.get_num_threads()
    # batches of 256 x 64: one thread is fastest, and on a busy machine two threads waiting on
    # each other made it 20-40x slower (benchmarks/discovery_bench.py)
    torch.set_num_threads(1)
    try:
        return _fit_and_score(z, fit_rows, components, options, seed)
    finally:
        torch.set_num_threads(threads)


def _fit_and_score(z: torch.Tensor, fit_rows: np.ndarray, components: int, options: FlowOptions, seed: int) -> np.ndarray:
    zuko = discovery_import("zuko")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # one feature has no autoregressive structure to model; zuko's MAF wants >= 2
        flow = zuko.flows.MAF(max(components, 2), transforms=options.transforms,
                              hidden_features=(options.hidden, options.hidden))
        data = z if components > 1 else torch.cat([z, torch.zeros_like(z)], dim=1)
        fit = data[torch.from_numpy(fit_rows)]
        optimizer = torch.optim.Adam(flow.parameters(), lr=options.lr)
        order = torch.Generator().manual_seed(seed)
        flow.train()
        for _ in range(options.epochs):
            for batch in torch.randperm(len(fit), generator=order).split(options.batch):
                loss = -flow().log_prob(fit[batch]).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        flow.eval()
        with torch.no_grad():
            log_density = torch.cat([flow().log_prob(part) for part in data.split(8192)])
    return -log_density.double().numpy()


def mismatch(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 - cosine similarity between each object's two modality embeddings (same width)."""
    return 1.0 - (unit_rows(a) * unit_rows(b)).sum(1).astype(np.float64)


def mapped_mismatch(a: np.ndarray, b: np.ndarray, folds: int = 5, alpha: float = 1.0, seed: int = 0) -> np.ndarray:
    """1 - cosine between b and a ridge map of a into b's space, each object predicted by a map
    fitted without it (scikit-learn, `folds` folds)."""
    linear_model = discovery_import("sklearn.linear_model")
    model_selection = discovery_import("sklearn.model_selection")
    folds = model_selection.KFold(min(folds, len(a)), shuffle=True, random_state=seed)
    predicted = model_selection.cross_val_predict(linear_model.Ridge(alpha=alpha), a, b, cv=folds)
    return mismatch(predicted, b)


def percentile(scores: np.ndarray) -> np.ndarray:
    """Rank / n in (0, 1] over the scores that are not NaN (+inf ranks most anomalous), 1 for the
    most anomalous; ties share their mean rank; NaN where the score is NaN."""
    out = np.full(len(scores), np.nan)
    finite = ~np.isnan(scores)
    if finite.any():
        _, inverse, counts = np.unique(scores[finite], return_inverse=True, return_counts=True)
        mean_rank = np.cumsum(counts) - (counts - 1) / 2.0
        out[finite] = mean_rank[inverse] / finite.sum()
    return out


FUSIONS = ("gmean", "min", "mean", "max")


def fuse(percentiles: list[np.ndarray], how: str) -> np.ndarray:
    """Per object, the geometric mean, minimum, mean or maximum of the percentiles it has; NaN
    (without a NumPy warning) where it has none. `min` asks every score to agree; `max` keeps an
    object any one score finds (a kind only one scorer sees, such as a mismatch, is diluted by the others)."""
    if how not in FUSIONS:
        raise ConfigError(f"fusion '{how}': choose {', '.join(FUSIONS)}")
    stack = np.stack(percentiles)
    finite = np.isfinite(stack)
    count = finite.sum(0)
    if how in ("min", "max"):
        fill = np.inf if how == "min" else -np.inf
        extreme = getattr(np.where(finite, stack, fill), how)(0)
        return np.where(count > 0, extreme, np.nan)
    values = np.log(np.where(finite, stack, 1.0)) if how == "gmean" else np.where(finite, stack, 0.0)
    mean = np.divide(values.sum(0), count, out=np.full(count.shape, np.nan), where=count > 0)
    return np.exp(mean) if how == "gmean" else mean
