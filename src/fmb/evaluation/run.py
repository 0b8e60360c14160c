"""`fmb evaluate` over embedding parquet files written by `fmb embed`.

An embedding file has `object_id`, target columns, and `embedding_<name>` columns (float32
lists, null where a modality is absent). Several files are joined on object_id: every model is
evaluated on the objects all files share, and the overlap is reported. Targets come from the
files or from a catalogue (`fmb.evaluation.catalog`). Rows with a missing target or a
missing/non-finite embedding are excluded and counted, never imputed. Every figure carries its
95% bootstrap interval (`fmb.evaluation.metrics`).
"""

from __future__ import annotations

import csv
import itertools
import logging
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fmb.embeddings import EMBEDDING_PREFIX, EmbeddingFile, align, load_embeddings
from fmb.errors import ConfigError, DataError
from fmb.evaluation.catalog import Catalog, join
from fmb.evaluation.metrics import (
    OUTLIER_THRESHOLD,
    ZERO_SHOT,
    Estimate,
    is_redshift,
    mean_interval,
    regression_scores,
)
from fmb.evaluation.probes import (
    FEW_SHOT_DRAWS,
    PROBES,
    Folds,
    ProbeResult,
    cross_validate,
    make_folds,
    retrieval_ranks,
)

log = logging.getLogger("fmb")

MAX_CLASSES = 50
FIELDS = ["model", "embedding", "target", "probe", "labels", "metric", "value", "low", "high",
          "baseline", "baseline_low", "baseline_high", "n", "excluded"]


def is_classification(values: np.ndarray) -> bool:
    if values.dtype.kind in "fc":
        return False
    return len(np.unique(values[~missing_values(values)])) <= MAX_CLASSES


def missing_values(values: np.ndarray) -> np.ndarray:
    """True where a target value is absent (NaN, inf or None)."""
    if values.dtype.kind in "fc":
        return ~np.isfinite(values)
    return np.array([v is None for v in values]) if values.dtype == object else np.zeros(len(values), bool)


def load_aligned(paths: list[str], baselines: list[str] | None = None, catalog: Catalog | None = None
                 ) -> tuple[list[EmbeddingFile], list[EmbeddingFile | None]]:
    """The files restricted to their shared objects (catalogue targets joined in), and their baselines."""
    if baselines and len(baselines) != len(paths):
        raise ConfigError(f"--baseline given {len(baselines)} times for {len(paths)} embedding files: give one per file")
    files = align([load_embeddings(p) for p in paths] + [load_embeddings(p) for p in baselines or []])
    if catalog is not None:
        joined = join(catalog, files[0].ids, f"{len(paths)} embedding file(s)")
        for f in files:
            overridden = sorted(set(joined) & set(f.targets))
            if overridden:
                log.info(f"{f.path}: column(s) {', '.join(overridden)} replaced by the catalogue's")
            f.targets.update(joined)
    return files[: len(paths)], files[len(paths):] or [None] * len(paths)


def evaluate(paths: list[str], targets: list[str], baselines: list[str] | None = None, classify: list[str] | None = None,
             folds: int = 5, k: int = 64, fractions: tuple[float, ...] = (0.01, 0.1, 1.0),
             probes: tuple[str, ...] = PROBES, seed: int = 0, plot_dir: Path | None = None,
             catalog: Catalog | None = None, threshold: float = OUTLIER_THRESHOLD, replicates: int = 1000,
             draws: int = FEW_SHOT_DRAWS) -> list[dict]:
    """One row per (model, embedding, target, probe, label fraction, metric), plus zero-shot and retrieval rows.
    Fractions below 1 average `draws` label subsets. With `plot_dir`, figures too (see fmb.evaluation.plots)."""
    models, bases = load_aligned(paths, baselines, catalog)
    for model in models:
        for target in targets:
            if target not in model.targets:
                raise DataError(f"{model.path}: no target column '{target}'; it has {', '.join(sorted(model.targets)) or 'none'}"
                                + ("" if catalog else "; or take it from a catalogue: --catalog FILE --map TARGET=COLUMN"))
    fits = sum(len(m.embeddings) for m in models) * len(targets) * len(fractions) * len(probes) * (2 if bases[0] else 1)
    bar = tqdm(total=fits, desc="probes", unit="fit", disable=not sys.stderr.isatty())
    rows: list[dict] = []
    for model, base in zip(models, bases, strict=True):
        for target in targets:
            task = Task(target, "classification" if target in (classify or []) or is_classification(model.targets[target])
                        else "redshift" if is_redshift(target) else "regression", probes, fractions, threshold)
            rows += evaluate_task(model, base, task, None, folds, k, seed, replicates, bar, plot_dir, draws=draws)
            if task.kind != "classification":
                rows += zero_shot_rows(model, base, task, replicates, seed)
        rows += _retrieval_rows(model, base, plot_dir, replicates, seed)
    bar.close()
    return rows


class Task:
    """One target to predict: how it is scored, with which probes and label fractions."""

    def __init__(self, target: str, kind: str, probes: tuple[str, ...] = PROBES,
                 fractions: tuple[float, ...] = (0.1, 1.0), threshold: float = OUTLIER_THRESHOLD,
                 rank_by: str | None = None) -> None:
        if kind not in ("redshift", "regression", "classification"):
            raise ConfigError(f"task {target}: kind '{kind}' is not one of redshift, regression, classification")
        self.target, self.kind, self.probes, self.fractions, self.threshold = target, kind, probes, fractions, threshold
        # the figure a leaderboard ranks by
        self.rank_by = rank_by or {"redshift": "nmad", "regression": "r2", "classification": "accuracy"}[kind]

    @property
    def classify(self) -> bool:
        return self.kind == "classification"


def evaluate_task(model: EmbeddingFile, base: EmbeddingFile | None, task: Task, frozen: Folds | None, folds: int,
                  k: int, seed: int, replicates: int, bar: tqdm | None = None, plot_dir: Path | None = None,
                  columns: list[str] | None = None, collect: dict | None = None, draws: int = FEW_SHOT_DRAWS) -> list[dict]:
    """Every probe of `task` on every embedding column of `model` (and of its baseline, on the same rows).
    `frozen`: fold of each row of `model` (fmb benchmark); None: folds drawn here. `collect` receives
    (model, column, target) -> (truth, probe results), for figures drawn later."""
    rows = []
    y_all = model.targets[task.target]
    for column in columns or list(model.embeddings):
        started = time.perf_counter()
        x_all = model.embeddings[column]
        keep = ~missing_values(y_all) & np.isfinite(x_all).all(1)
        if base is not None:
            if column not in base.embeddings:
                raise DataError(f"baseline {base.path} has no column {EMBEDDING_PREFIX}{column}")
            keep &= np.isfinite(base.embeddings[column]).all(1)
        if keep.sum() < 2 * folds:
            log.warning(f"{model.name}/{column}/{task.target}: only {int(keep.sum())} usable objects; skipped")
            if bar is not None:
                bar.update(len(task.fractions) * len(task.probes) * (2 if base is not None else 1))
            continue
        y = y_all[keep] if task.classify else y_all[keep].astype(np.float64)
        split = frozen.take(keep) if frozen is not None else make_folds(int(keep.sum()), folds, seed,
                                                                         y if task.classify else None)
        options = dict(fractions=task.fractions, k=k, seed=seed, probes=task.probes, threshold=task.threshold,
                       replicates=replicates, progress=bar, draws=draws)
        results = cross_validate(x_all[keep], y, task.kind, split, **options)
        base_results = (cross_validate(base.embeddings[column][keep], y, task.kind, split, **options) if base is not None else [None] * len(results))
        added = [_row(model.name, column, task.target, res.probe, res.fraction, metric, value,
                      base_res.metrics[metric] if base_res else None, int(keep.sum()), int((~keep).sum()))
                 for res, base_res in zip(results, base_results, strict=True) for metric, value in res.metrics.items()]
        rows += added
        if collect is not None:
            collect[(model.name, column, task.target)] = (y, results)
        best = max(results, key=lambda r: (r.fraction, _headline(r)))
        log.info(f"{model.name}/{column}/{task.target}: {int(keep.sum())} objects, {len(results)} probe runs in "
                 f"{time.perf_counter() - started:.1f} s; best {best.probe} {_headline_name(best)} {_headline(best):.3f}")
        if plot_dir is not None:
            _plot_target(plot_dir, model.name, column, task, x_all[keep], y, results, added, base_results)
    return rows


def _headline_name(result: ProbeResult) -> str:
    return "accuracy" if "accuracy" in result.metrics else "r2"


def _headline(result: ProbeResult) -> float:
    return result.metrics[_headline_name(result)].value


def _row(model: str, embedding: str, target: str, probe: str, labels: float, metric: str, value: Estimate,
         baseline: Estimate | None, n: int, excluded: int) -> dict:
    return {"model": model, "embedding": embedding, "target": target, "probe": probe, "labels": labels,
            "metric": metric, "value": value.value, "low": value.low, "high": value.high,
            "baseline": baseline.value if baseline else None, "baseline_low": baseline.low if baseline else None,
            "baseline_high": baseline.high if baseline else None, "n": n, "excluded": excluded}


def zero_shot_rows(model: EmbeddingFile, base: EmbeddingFile | None, task: Task, replicates: int, seed: int) -> list[dict]:
    """A model's own predictions of the target (float columns `<name>_<target>`, e.g. `aion_redshift` from
    `fmb embed aion`) scored against it directly: probe "zero-shot", no labels used."""
    rows = []
    target = task.target
    y_all = model.targets[target].astype(np.float64)
    for column, predicted in model.targets.items():
        if not column.endswith(f"_{target}") or predicted.dtype.kind != "f":
            continue
        keep = np.isfinite(y_all) & np.isfinite(predicted)
        has_base = base is not None and column in base.targets
        if has_base:
            keep &= np.isfinite(base.targets[column])
        if keep.sum() < 2:
            continue
        redshift = task.kind == "redshift"
        scores = regression_scores(y_all[keep], predicted[keep], redshift, task.threshold, replicates, seed)
        base_scores = (regression_scores(y_all[keep], base.targets[column][keep], redshift, task.threshold, replicates, seed)
                       if has_base else {})
        rows += [_row(model.name, column, target, ZERO_SHOT, 0.0, metric, value, base_scores.get(metric),
                      int(keep.sum()), int((~keep).sum())) for metric, value in scores.items()]
    return rows


def _plot_target(plot_dir: Path, model: str, column: str, task: Task, x: np.ndarray, y: np.ndarray,
                 results: list[ProbeResult], rows: list[dict], base_results: list) -> None:
    from fmb.evaluation import plots

    stem = f"{model}__{column}__{task.target}"
    for method in ("pca", "umap"):
        plots.projection(x, y, f"{model} {column}: {method.upper()} by {task.target}", plot_dir / f"{stem}__{method}.png",
                         method)
    metric = "accuracy" if task.classify else "r2"
    if len({r["labels"] for r in rows}) > 1:
        plots.few_shot(rows, metric, f"{model} {column}: {task.target}", plot_dir / f"{stem}__few_shot.png")
    full = [r for r in results if r.fraction == max(x.fraction for x in results)]
    best = max(full, key=_headline)
    if task.classify:
        plots.confusion(best.confusion, best.classes, f"{model} {column}: {task.target} ({best.probe})",
                        plot_dir / f"{stem}__{best.probe}_confusion.png")
    else:
        plots.prediction_scatter(y, best.predictions, f"{model} {column}: {task.target} ({best.probe})",
                                 plot_dir / f"{stem}__{best.probe}_scatter.png",
                                 task.threshold if task.kind == "redshift" else None)


def _retrieval_rows(model: EmbeddingFile, base: EmbeddingFile | None, plot_dir: Path | None = None,
                    replicates: int = 1000, seed: int = 0, ks: tuple[int, ...] = (1, 5)) -> list[dict]:
    rows = []
    modalities = [c for c in model.embeddings if c != "joint"]
    for a, b in itertools.permutations(modalities, 2):
        keep = np.isfinite(model.embeddings[a]).all(1) & np.isfinite(model.embeddings[b]).all(1)
        if keep.sum() < 2 or model.embeddings[a].shape[1] != model.embeddings[b].shape[1]:
            continue  # retrieval needs a shared space of one width
        ranks = retrieval_ranks(model.embeddings[a][keep], model.embeddings[b][keep])
        if plot_dir is not None:
            from fmb.evaluation import plots

            plots.retrieval_curve(ranks, f"{model.name}: {a} -> {b}", plot_dir / f"{model.name}__{a}__to__{b}__retrieval.png")
        base_ranks = retrieval_ranks(base.embeddings[a][keep], base.embeddings[b][keep]) if base is not None else None
        for top in ks:
            rows.append(_row(model.name, f"{a}->{b}", "retrieval", "cosine", 1.0, f"top{top}",
                             mean_interval(ranks < top, replicates, seed),
                             mean_interval(base_ranks < top, replicates, seed) if base_ranks is not None else None,
                             int(keep.sum()), int((~keep).sum())))
    return rows


def write_csv(path: Path, rows: list[dict], fields: list[str] | None = None) -> Path:
    """Rows as CSV under `fields` (default: the first row's keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields or (list(rows[0]) if rows else ["empty"]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_tables(rows: list[dict], out_dir: Path) -> tuple[Path, Path]:
    md_path = out_dir / "results.md"
    csv_path = write_csv(out_dir / "results.csv", rows, FIELDS)
    md_path.write_text(markdown_table(rows))
    return csv_path, md_path


def interval(value: float | None, low: float | None, high: float | None) -> str:
    """`0.869 [0.850, 0.887]`: a figure and its 95% interval."""
    if value is None:
        return ""
    if low is None or not np.isfinite(low):
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | embedding | target | probe | labels | metric | value [95% CI] | random-init [95% CI] | n |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['embedding']} | {r['target']} | {r['probe']} | {r['labels']:.0%} | "
                     f"{r['metric']} | {interval(r['value'], r['low'], r['high'])} | "
                     f"{interval(r['baseline'], r['baseline_low'], r['baseline_high'])} | {r['n']} |")
    return "\n".join(lines) + "\n"
