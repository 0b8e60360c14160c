"""`fmb evaluate` and `fmb detect` over embedding parquet files written by `fmb embed`.

An embedding file has `object_id`, target columns, and `embedding_<name>` columns (float32
lists, null where a modality is absent). Several files are joined on object_id: every model is
evaluated on the objects all files share, and the overlap is reported. Rows with a missing
target or a missing/non-finite embedding are excluded and counted, never imputed.
"""

from __future__ import annotations

import csv
import itertools
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from fmb.embeddings import EMBEDDING_PREFIX, EmbeddingFile, align, load_embeddings
from fmb.errors import ConfigError, DataError
from fmb.evaluation import anomaly
from fmb.evaluation.probes import cross_validate, retrieval_topk, score

log = logging.getLogger("fmb")

MAX_CLASSES = 50


def is_classification(values: np.ndarray) -> bool:
    if values.dtype.kind in "fc":
        return False
    return len(np.unique(values[~missing_values(values)])) <= MAX_CLASSES


def missing_values(values: np.ndarray) -> np.ndarray:
    """True where a target value is absent (NaN, inf or None)."""
    if values.dtype.kind in "fc":
        return ~np.isfinite(values)
    return np.array([v is None for v in values]) if values.dtype == object else np.zeros(len(values), bool)


def evaluate(paths: list[str], targets: list[str], baselines: list[str] | None = None, classify: list[str] | None = None,
             folds: int = 5, k: int = 64, fractions: tuple[float, ...] = (0.01, 0.1, 1.0),
             probes: tuple[str, ...] = ("knn", "linear", "mlp"), seed: int = 0, plot_dir: Path | None = None) -> list[dict]:
    """One row per (model, embedding, target, probe, label fraction, metric), plus retrieval rows.
    With `plot_dir`, figures too (see fmb.evaluation.plots)."""
    if baselines and len(baselines) != len(paths):
        raise ConfigError(f"--baseline given {len(baselines)} times for {len(paths)} embedding files: give one per file")
    files = align([load_embeddings(p) for p in paths] + [load_embeddings(p) for p in baselines or []])
    models, bases = files[: len(paths)], files[len(paths):] or [None] * len(paths)
    rows: list[dict] = []
    for model, base in zip(models, bases, strict=True):
        for target in targets:
            if target not in model.targets:
                raise DataError(f"{model.path}: no target column '{target}'; it has {', '.join(sorted(model.targets)) or 'none'}")
            y_all = model.targets[target]
            task_classify = target in (classify or []) or is_classification(y_all)
            for column, x_all in model.embeddings.items():
                keep = ~missing_values(y_all) & np.isfinite(x_all).all(1)
                if base is not None:
                    if column not in base.embeddings:
                        raise DataError(f"baseline {base.path} has no column {EMBEDDING_PREFIX}{column}")
                    keep &= np.isfinite(base.embeddings[column]).all(1)
                excluded = int((~keep).sum())
                if keep.sum() < 2 * folds:
                    log.warning(f"{model.name}/{column}/{target}: only {int(keep.sum())} usable objects; skipped")
                    continue
                y = y_all[keep] if task_classify else y_all[keep].astype(np.float64)
                results = cross_validate(x_all[keep], y, task_classify, target, folds, fractions, k, seed, probes)
                base_results = (cross_validate(base.embeddings[column][keep], y, task_classify, target, folds, fractions, k, seed, probes)
                                if base is not None else [None] * len(results))
                added = []
                for res, base_res in zip(results, base_results, strict=True):
                    for metric, value in res.metrics.items():
                        added.append({"model": model.name, "embedding": column, "target": target, "probe": res.probe,
                                      "labels": res.fraction, "metric": metric, "value": value,
                                      "baseline": base_res.metrics[metric] if base_res else None,
                                      "n": int(keep.sum()), "excluded": excluded})
                rows += added
                if plot_dir is not None:
                    _plot_target(plot_dir, model.name, column, target, x_all[keep], y, results, added, task_classify)
            if not task_classify:
                rows += _zero_shot_rows(model, base, target)
        rows += _retrieval_rows(model, base, plot_dir)
    return rows


def _zero_shot_rows(model: EmbeddingFile, base: EmbeddingFile | None, target: str) -> list[dict]:
    """A model's own predictions of `target` (float columns `<name>_<target>`, e.g. `aion_redshift` from
    `fmb embed aion`) scored against it directly: probe "zero-shot", no labels used."""
    rows = []
    y_all = model.targets[target].astype(np.float64)
    for column, predicted in model.targets.items():
        if not column.endswith(f"_{target}") or predicted.dtype.kind != "f":
            continue
        keep = np.isfinite(y_all) & np.isfinite(predicted)
        if base is not None and column in base.targets:
            keep &= np.isfinite(base.targets[column])
        if keep.sum() < 2:
            continue
        base_metrics = (score(y_all[keep], base.targets[column][keep], False, target)
                        if base is not None and column in base.targets else {})
        for metric, value in score(y_all[keep], predicted[keep], False, target).items():
            rows.append({"model": model.name, "embedding": column, "target": target, "probe": "zero-shot", "labels": 0.0,
                         "metric": metric, "value": value, "baseline": base_metrics.get(metric),
                         "n": int(keep.sum()), "excluded": int((~keep).sum())})
    return rows


def _plot_target(plot_dir: Path, model: str, column: str, target: str, x: np.ndarray, y: np.ndarray,
                 results: list, rows: list[dict], classify: bool) -> None:
    from fmb.evaluation import plots

    stem = f"{model}__{column}__{target}"
    plots.projection(x, y, f"{model} {column}: PCA by {target}", plot_dir / f"{stem}__pca.png")
    metric = "accuracy" if classify else "r2"
    if len({r["labels"] for r in rows}) > 1:
        plots.few_shot(rows, metric, f"{model} {column}: {target}", plot_dir / f"{stem}__few_shot.png")
    if not classify:
        best = max((r for r in results if r.fraction == max(x.fraction for x in results)), key=lambda r: r.metrics["r2"])
        plots.prediction_scatter(y, best.predictions, f"{model} {column}: {target} ({best.probe})",
                                 plot_dir / f"{stem}__{best.probe}_scatter.png")


def _retrieval_rows(model: EmbeddingFile, base: EmbeddingFile | None, plot_dir: Path | None = None) -> list[dict]:
    rows = []
    modalities = [c for c in model.embeddings if c != "joint"]
    for a, b in itertools.permutations(modalities, 2):
        keep = np.isfinite(model.embeddings[a]).all(1) & np.isfinite(model.embeddings[b]).all(1)
        if keep.sum() < 2 or model.embeddings[a].shape[1] != model.embeddings[b].shape[1]:
            continue  # retrieval needs a shared space of one width
        scores = retrieval_topk(model.embeddings[a][keep], model.embeddings[b][keep])
        if plot_dir is not None:
            from fmb.evaluation import plots

            plots.retrieval_curve(model.embeddings[a][keep], model.embeddings[b][keep], f"{model.name}: {a} -> {b}",
                                  plot_dir / f"{model.name}__{a}__to__{b}__retrieval.png")
        base_scores = retrieval_topk(base.embeddings[a][keep], base.embeddings[b][keep]) if base is not None else {}
        for metric, value in scores.items():
            rows.append({"model": model.name, "embedding": f"{a}->{b}", "target": "retrieval", "probe": "cosine",
                         "labels": 1.0, "metric": metric, "value": value, "baseline": base_scores.get(metric),
                         "n": int(keep.sum()), "excluded": int((~keep).sum())})
    return rows


def write_tables(rows: list[dict], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = ["model", "embedding", "target", "probe", "labels", "metric", "value", "baseline", "n", "excluded"]
    csv_path, md_path = out_dir / "results.csv", out_dir / "results.md"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    md_path.write_text(markdown_table(rows))
    return csv_path, md_path


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | embedding | target | probe | labels | metric | value | random-init | n |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = "" if r["baseline"] is None else f"{r['baseline']:.3f}"
        lines.append(f"| {r['model']} | {r['embedding']} | {r['target']} | {r['probe']} | {r['labels']:.0%} | "
                     f"{r['metric']} | {r['value']:.3f} | {base} | {r['n']} |")
    return "\n".join(lines) + "\n"


def detect(paths: list[str], out: Path, k: int = 16, seed: int = 0) -> Path:
    """Anomaly scores per model and a fused rank (mean rank percentile over every score)."""
    files = align([load_embeddings(p) for p in paths])
    columns: dict[str, np.ndarray] = {"object_id": files[0].ids}
    percentiles = []
    for f in files:
        modalities = [c for c in f.embeddings if c != "joint"]
        scores = {f"knn_{c}": _masked(f.embeddings[c], lambda x: anomaly.knn_distance(x, k)) for c in f.embeddings}
        pairs = [(a, b) for a, b in itertools.combinations(modalities, 2)
                 if f.embeddings[a].shape[1] == f.embeddings[b].shape[1]]
        if pairs:
            disagreement = np.nanmean([anomaly.cross_modal_disagreement(f.embeddings[a], f.embeddings[b]) for a, b in pairs], axis=0)
            scores["cross_modal"] = disagreement
        main = "joint" if "joint" in f.embeddings else modalities[0]
        scores[f"iforest_{main}"] = _masked(f.embeddings[main], lambda x: anomaly.isolation_forest(x, seed=seed))
        for name, values in scores.items():
            columns[f"{f.name}/{name}"] = values
            finite = np.isfinite(values)
            pct = np.full(len(values), np.nan)
            pct[finite] = anomaly.rank_percentile(values[finite])
            percentiles.append(pct)
    columns["fused_rank"] = np.nanmean(np.stack(percentiles), axis=0)
    table = pa.table(columns).sort_by([("fused_rank", "descending")])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".csv":
        pa_csv.write_csv(table, out)
    else:
        pq.write_table(table, out)
    return out


def _masked(x: np.ndarray, fn) -> np.ndarray:
    """Apply a score to the rows with a finite embedding; NaN for the others."""
    keep = np.isfinite(x).all(1)
    out = np.full(len(x), np.nan)
    if keep.sum() > 1:
        out[keep] = fn(x[keep])
    return out
