"""What `fmb detect` found, measured two ways: against planted truth, and across models.

Truth (`truth_anomaly`: the anomaly kind, null for a normal object) comes from an embedding file
(`fmb embed` carries `truth_*` columns of the data along) or from `--truth FILE` (a data directory,
parquet, CSV or FITS table joined on the object id). Per model, score and kind (and `any`):
AUROC and average precision of that kind against the normal objects (scikit-learn; objects
without the score left out, `scored` says how many of the kind had it), and recall in the top 1%
and 5% of the score (counted over every object of the kind, so an unscored one is a miss).

Across models (and across the scores of one model): Spearman correlation of the scores, Jaccard
overlap of their top K, top-1% displacement (share of A's top 1% inside B's top 1% and top 10%),
and the neighbour ranks: for the top 1% of a model, the mean percentile of their k nearest
neighbours' scores (0.5 would be chance: high means anomalies come in groups, such as a rare class,
rather than alone). Tables as markdown + CSV; heatmaps with `--plots` (the `plots` extra).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fmb.embeddings import EmbeddingFile
from fmb.errors import DataError
from fmb.evaluation import anomaly
from fmb.evaluation.catalog import (
    Catalog,
    check_unique,
    comparable_ids,
    id_values,
    join,
    read_catalog,
    read_columns,
)
from fmb.evaluation.plots import pyplot, save_figure
from fmb.evaluation.run import write_csv

if TYPE_CHECKING:
    from fmb.evaluation.detect import Detection, DetectOptions

log = logging.getLogger("fmb")

TRUTH_COLUMN = "truth_anomaly"
RECALL_AT = (0.01, 0.05)
TRUTH_FIELDS = ["model", "score", "kind", "positives", "scored", "prevalence", "auroc", "average_precision",
                "recall_top1", "recall_top5"]


UNKNOWN = np.nan  # the truth of an object the truth table lacks (None is a normal object, text a kind)


def is_kind(value: object) -> bool:
    return isinstance(value, str)


def normal_labels(values: np.ndarray) -> np.ndarray:
    """Anomaly kinds as objects, None for a normal object (null, empty, NaN)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        text = None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v).strip()
        out[i] = text or None
    return out


def find_truth(files: list[EmbeddingFile], ids: np.ndarray, truth_file: str | None, id_column: str) -> np.ndarray | None:
    """The anomaly kind of each object (None: normal), from `truth_file` if given, else from the
    first embedding file with a `truth_anomaly` column; None when neither has one."""
    if truth_file is not None:
        catalog = read_truth(truth_file, id_column)
        truth = normal_labels(join(catalog, ids, "the embedding files")[TRUTH_COLUMN])
        unknown = ~np.isin(comparable_ids(ids, catalog.ids), catalog.ids)
        if unknown.any():  # not in the truth table: neither normal nor planted, left out of the metrics
            log.warning(f"{truth_file}: {int(unknown.sum())} of {len(ids)} objects have no row; their truth is "
                        "unknown and they are left out of the truth metrics")
            truth[unknown] = UNKNOWN
        return truth
    for f in files:
        if TRUTH_COLUMN in f.targets:
            return normal_labels(f.targets[TRUTH_COLUMN])
    return None


def read_truth(path: str, id_column: str) -> Catalog:
    """`truth_anomaly` by object id from a data directory or parquet file (every split) or a CSV / FITS table."""
    from fmb.data.tables import resolve_files

    root = Path(path)
    if root.is_dir() or root.suffix == ".parquet":
        ids, labels, origins = [], [], []
        files = resolve_files(root, None)
        for file in files:  # the catalogue's checks, file by file
            columns, _ = read_columns(file, [id_column, TRUTH_COLUMN])
            ids.append(id_values(columns[id_column], file, id_column))
            labels.append(normal_labels(columns[TRUTH_COLUMN]))
            origins.append(np.full(len(ids[-1]), file.name, dtype=object))
            if ids[-1].dtype != ids[0].dtype:  # id_values gives int64 or text (object) ids
                kind = {True: "text", False: "integer"}
                raise DataError(f"{file}: id column '{id_column}' holds {kind[ids[-1].dtype == object]} ids where "
                                f"{files[0]} holds {kind[ids[0].dtype == object]} ids")
        all_ids, all_labels = np.concatenate(ids), np.concatenate(labels)
        check_unique(all_ids, root, id_column, np.concatenate(origins))
        missing = int(sum(v is None for v in all_labels))
        return Catalog(root, all_ids, {TRUTH_COLUMN: all_labels}, missing={TRUTH_COLUMN: missing})
    return read_catalog(root, id_column, {TRUTH_COLUMN: TRUTH_COLUMN}, sentinels=())


def truth_rows(result: Detection) -> list[dict]:
    """Per model, score and anomaly kind (and `any`): AUROC, AP, recall in the top 1% / 5%."""
    metrics = anomaly.discovery_import("sklearn.metrics")
    truth = result.truth
    kinds = sorted({v for v in truth if is_kind(v)})
    normal = np.array([v is None for v in truth])
    planted = np.array([is_kind(v) for v in truth])
    rows = []
    for model, name, values in scored_series(result):
        finite = np.isfinite(values)
        top = {q: top_mask(values, q) for q in RECALL_AT}
        for kind in [*kinds, "any"]:
            positive = planted if kind == "any" else np.array([v == kind for v in truth])
            use = finite & (positive | normal)
            y = positive[use]
            row = {"model": model, "score": name, "kind": kind, "positives": int(positive.sum()),
                   "scored": int((positive & finite).sum()), "prevalence": float(y.mean()) if len(y) else np.nan}
            both = 0 < y.sum() < len(y)
            row["auroc"] = float(metrics.roc_auc_score(y, values[use])) if both else np.nan
            row["average_precision"] = float(metrics.average_precision_score(y, values[use])) if both else np.nan
            for q, field in zip(RECALL_AT, ("recall_top1", "recall_top5"), strict=True):
                row[field] = float((positive & top[q]).sum() / positive.sum()) if positive.any() else np.nan
            rows.append(row)
    return rows


def scored_series(result: Detection) -> list[tuple[str, str, np.ndarray]]:
    """(model, score name, values) of every score, every model's fused score and the overall one."""
    series = [(s.model, s.name, s.values) for s in result.scores]
    series += [(m, f"{m}/anomaly_score", v) for m, v in result.model_scores.items()]
    if len(result.model_scores) > 1:
        series.append(("all", "anomaly_score", result.anomaly_score))
    return series


def top_mask(values: np.ndarray, share: float) -> np.ndarray:
    """The ceil(share x n) highest finite values (at least one); ties at the cut as `top_rows`."""
    return top_rows(values, max(1, int(np.ceil(share * np.isfinite(values).sum()))))


def top_rows(values: np.ndarray, count: int) -> np.ndarray:
    """Mask of the `count` highest finite values; ties at the cut go to the earlier rows, which in
    `detect`'s aligned order (`fmb.embeddings.align`: sorted by object id) are the lower object ids."""
    finite = np.flatnonzero(np.isfinite(values))
    mask = np.zeros(len(values), bool)
    mask[finite[np.argsort(-values[finite], kind="stable")[:count]]] = True
    return mask


def spearman(a: np.ndarray, b: np.ndarray, ranks: dict[int, np.ndarray] | None = None) -> float:
    """Rank correlation over the objects that have both scores (`ranks`: percentiles already
    computed, by id of the array, reused when both scores cover the same objects)."""
    both = np.isfinite(a) & np.isfinite(b)
    if both.sum() < 3:
        return np.nan
    if ranks is not None and both.sum() == np.isfinite(a).sum() == np.isfinite(b).sum():
        ra, rb = ranks[id(a)][both], ranks[id(b)][both]
    else:
        ra, rb = anomaly.percentile(a[both]), anomaly.percentile(b[both])
    if ra.std() == 0 or rb.std() == 0:
        return np.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else np.nan


def agreement_rows(result: Detection, top_k: int) -> list[dict]:
    """Pairwise figures between every two series (scores and fused scores): Spearman, Jaccard of the
    top K, share of A's top 1% in B's top 1% and top 10%. The Jaccard is NaN for a series that scores
    K objects or fewer: its top K is then every object it scores, not a choice (logged)."""
    series = scored_series(result)
    whole = whole_top_k(series, top_k)
    if whole:
        log.warning(f"--top-k {top_k}: {whole_top_k_note(whole, top_k)}")
    tops = {name: (top_rows(v, top_k), top_mask(v, 0.01), top_mask(v, 0.10)) for _, name, v in series}
    ranks = {id(v): anomaly.percentile(v) for _, _, v in series}
    correlation: dict[tuple[str, str], float] = {}
    rows = []
    for _, a, va in series:
        for _, b, vb in series:
            if (b, a) not in correlation:
                correlation[a, b] = spearman(va, vb, ranks)
            k_a, one_a, _ = tops[a]
            k_b, one_b, ten_b = tops[b]
            rows.append({"a": a, "b": b, "spearman": correlation.get((a, b), correlation.get((b, a))),
                         f"jaccard_top{top_k}": np.nan if a in whole or b in whole else jaccard(k_a, k_b),
                         "top1_in_top1": float((one_a & one_b).sum() / one_a.sum()),
                         "top1_in_top10": float((one_a & ten_b).sum() / one_a.sum())})
    return rows


def whole_top_k(series: list[tuple[str, str, np.ndarray]], top_k: int) -> list[str]:
    """The series whose top K is every object they score (K at least their count)."""
    return [name for _, name, values in series if np.isfinite(values).sum() <= top_k]


def whole_top_k_note(whole: list[str], top_k: int) -> str:
    return (f"{len(whole)} score(s) ({', '.join(whole[:5])}{', ...' if len(whole) > 5 else ''}) have {top_k} objects "
            f"or fewer, so their top {top_k} is every object they score and its Jaccard overlap is left empty (NaN)")


def neighbour_rows(result: Detection) -> list[dict]:
    """For each neighbour graph (model/column): the mean percentile, under each model's fused score,
    of the neighbours of the graph model's top 1%, and of everyone's neighbours (the baseline); with
    truth, the share of an anomaly's neighbours of its own kind against the chance that another object
    is of that kind, (m - 1) / (n - 1) for m of the kind among n (a neighbour is never the object itself)."""
    rows = []
    for graph, (scored, nb) in result.neighbours.items():
        model = graph.split("/")[0]
        own = result.model_scores.get(model)
        if own is None:
            continue
        neighbour_rows_global = scored[nb.index]  # (rows, k) positions in the aligned objects
        top = top_mask(own[scored], 0.01)
        for other, values in result.model_scores.items():
            pct = values[neighbour_rows_global]  # a model's fused score is a percentile already
            rows.append({"graph": graph, "anomalies_by": model, "neighbours_scored_by": other,
                         "what": "top 1% neighbours' mean percentile", "value": float(np.nanmean(pct[top])),
                         "baseline": float(np.nanmean(pct))})
        if result.truth is not None:
            kinds = result.truth[scored]
            neighbour_kinds = result.truth[neighbour_rows_global]
            for kind in sorted({v for v in kinds if is_kind(v)}):
                mine = kinds == kind
                same = (neighbour_kinds[mine] == kind).mean()
                rows.append({"graph": graph, "anomalies_by": "truth", "neighbours_scored_by": "truth",
                             "what": f"share of a {kind}'s neighbours that are {kind}", "value": float(same),
                             "baseline": float((mine.sum() - 1) / (len(mine) - 1))})
    return rows


def number(value: float) -> str:
    return "" if value is None or not np.isfinite(value) else f"{value:.3f}"


def markdown(rows: list[dict], fields: list[str]) -> str:
    lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    for r in rows:
        lines.append("| " + " | ".join(number(r[f]) if isinstance(r[f], float) else str(r[f]) for f in fields) + " |")
    return "\n".join(lines) + "\n"


def matrix(rows: list[dict], field: str) -> tuple[list[str], np.ndarray]:
    names = list(dict.fromkeys(r["a"] for r in rows))
    values = np.full((len(names), len(names)), np.nan)
    for r in rows:
        values[names.index(r["a"]), names.index(r["b"])] = r[field]
    return names, values


def write_reports(result: Detection, out_dir: Path, options: DetectOptions) -> dict[str, Path]:
    """truth.md / truth.csv (when truth is known), agreement.md / .csv, neighbours.csv, and heatmaps
    under plots/ with `options.plots` (none of a figure whose every value is empty)."""
    written: dict[str, Path] = {}
    if result.truth is not None:
        if all(v is None for v in result.truth):
            log.warning("truth_anomaly is null for every object: no planted anomalies to measure against")
        else:
            rows = truth_rows(result)
            fused = [f"{r['model']} {r['auroc']:.3f}" for r in rows if r["kind"] == "any" and r["score"].endswith("anomaly_score")]
            result.truth_headline = "AUROC of the fused scores over every planted kind: " + ", ".join(fused)
            written["truth"] = write_csv(out_dir / "truth.csv", rows)
            (out_dir / "truth.md").write_text("# Scores against planted truth\n\n" + markdown(rows, TRUTH_FIELDS))
    rows = agreement_rows(result, options.top_k)
    written["agreement"] = write_csv(out_dir / "agreement.csv", rows)
    neighbours = neighbour_rows(result)
    if neighbours:
        write_csv(out_dir / "neighbours.csv", neighbours)
    models = [f"{m}/anomaly_score" for m in result.model_scores]
    focus = models if len(models) > 1 else [name for _, name, _ in scored_series(result)]
    shown = [r for r in rows if r["a"] in focus and r["b"] in focus and r["a"] != r["b"]]
    fields = ["a", "b", "spearman", f"jaccard_top{options.top_k}", "top1_in_top1", "top1_in_top10"]
    text = ["# Agreement", "", f"Between {'models (fused scores)' if len(models) > 1 else 'the scores of one model'}; "
            "every score in agreement.csv.", "", markdown(shown, fields)]
    whole = [name for name in whole_top_k(scored_series(result), options.top_k) if name in focus]
    if whole:
        text += [f"Jaccard of the top {options.top_k}: {whole_top_k_note(whole, options.top_k)}.", ""]
    if neighbours:
        text += ["## Neighbour ranks", "", markdown(neighbours, ["graph", "anomalies_by", "neighbours_scored_by", "what",
                                                               "value", "baseline"])]
    (out_dir / "agreement.md").write_text("\n".join(text))
    written["agreement_md"] = out_dir / "agreement.md"
    if options.plots:
        written["plots"] = heatmaps(rows, [r for r in rows if r["a"] in focus and r["b"] in focus], out_dir / "plots",
                                    options.top_k)
    return written


def heatmaps(rows: list[dict], focus: list[dict], plot_dir: Path, top_k: int) -> Path:
    plt = pyplot()
    for field, title, subset in (("spearman", "Spearman correlation of scores", rows),
                                 (f"jaccard_top{top_k}", f"Jaccard overlap of the top {top_k}", focus),
                                 ("top1_in_top10", "share of row's top 1% in column's top 10%", focus)):
        names, values = matrix(subset, field)
        if not np.isfinite(values).any():  # nothing to show (e.g. every Jaccard empty: K covers every object)
            continue
        size = 3 + 0.35 * len(names)
        fig, ax = plt.subplots(figsize=(size + 1, size))
        image = ax.imshow(values, vmin=-1 if field == "spearman" else 0, vmax=1, cmap="RdBu_r" if field == "spearman" else "viridis")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        if len(names) <= 12:
            for (i, j), v in np.ndenumerate(values):
                ax.text(j, i, number(v), ha="center", va="center", fontsize=6, color="w")
        fig.colorbar(image, ax=ax)
        ax.set_title(title)
        save_figure(fig, plt, plot_dir / f"{field}.png", dpi=110)
    return plot_dir
