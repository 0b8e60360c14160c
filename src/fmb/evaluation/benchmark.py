"""`fmb benchmark SUITE.yaml`: every model on the same objects and frozen folds, one leaderboard.

A suite (`configs/benchmark/demo.yaml` is the shipped one) names:
- models: embedding files (`embeddings:`, optional `baseline:`), or checkpoints to embed through
  the one embed path (`family:` + `checkpoint:`, `fmb.train.embed.run_embed`), each with its
  random-init baseline embedded by the same runner; a checkpoint that is absent is trained first
  when the model says how (`retrain:`, the `fmb retrain` recipe machinery, e.g. its demo recipe);
- tasks: a target (from the files or the catalogue), its kind, probes and label fractions;
- an optional catalogue (`fmb.evaluation.catalog`), synthetic data to write first, and a seed.

The folds are drawn once per object id and written to `OUT/split.csv`; a rerun, or a suite with
another model, reads them back, so every figure is on the same rows. Output in OUT: `results.csv`
(every probe, fraction and metric with its 95% interval), `leaderboard.md` / `leaderboard.csv`
(per task: each model's best embedding ranked, the random-init baseline beside it),
`similarity.md` (CKA and mutual kNN between every pair of embedding columns), `report.html`
(all of it, plots inline) and `plots/`.

Relative paths in a suite are relative to the suite file; `${paths.work}` is the work directory
(checkpoints, embeddings, data) and `${paths.out}` the output directory.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from fmb.config import ConfigLayers, build, read_yaml
from fmb.embeddings import EMBEDDING_PREFIX, EmbeddingFile, align, load_embeddings
from fmb.errors import CheckpointError, ConfigError, DataError
from fmb.evaluation.catalog import SENTINELS, join, read_catalog
from fmb.evaluation.metrics import OUTLIER_THRESHOLD, ZERO_SHOT, is_redshift, is_zero_shot
from fmb.evaluation.probes import FEW_SHOT_DRAWS, PROBES, Folds, make_folds
from fmb.evaluation.run import (
    FIELDS,
    Task,
    evaluate_task,
    interval,
    is_classification,
    write_csv,
    zero_shot_rows,
)

log = logging.getLogger("fmb")

LOWER_IS_BETTER = {"nmad", "sigma_68", "outlier_frac", "rmse", "mae"}


# ----------------------------------------------------------------------------- the suite


@dataclass
class SyntheticSpec:
    kind: str = "euclid-desi"
    n: int = 600
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class CatalogSpec:
    path: str = ""
    id_column: str = "object_id"
    map: dict[str, str] = field(default_factory=dict)
    sentinels: list[float] = field(default_factory=lambda: list(SENTINELS))


@dataclass
class RetrainSpec:
    """How to obtain an absent checkpoint: `fmb retrain FAMILY [--demo] --out CHECKPOINT --set ...`."""

    demo: bool = True
    sets: list[str] = field(default_factory=list)


@dataclass
class ModelSpec:
    name: str = ""
    embeddings: str | None = None  # an embedding file (from `fmb embed`)
    baseline: str | None = None  # its random-init counterpart
    family: str | None = None  # with checkpoint: embedded here
    checkpoint: str | None = None
    data: str | None = None  # what to embed (default: the checkpoint's data)
    sets: list[str] = field(default_factory=list)  # --set for the embedding
    random_init: bool = True  # embed the random-init baseline too
    columns: list[str] = field(default_factory=list)  # embedding columns to score (default: all)
    retrain: RetrainSpec | None = None


@dataclass
class TaskSpec:
    target: str = ""
    kind: str | None = None  # redshift, regression or classification; None: from the name and values
    probes: list[str] = field(default_factory=lambda: list(PROBES))
    fractions: list[float] = field(default_factory=lambda: [0.1, 1.0])
    rank_by: str | None = None  # the leaderboard metric (default: nmad / r2 / accuracy by kind)


@dataclass
class Suite:
    name: str = "benchmark"
    seed: int = 0
    folds: int = 5
    k: int = 64  # kNN probe neighbours
    bootstrap: int = 1000
    draws: int = FEW_SHOT_DRAWS  # label subsets per few-shot fraction (below 1)
    outlier_threshold: float = OUTLIER_THRESHOLD
    similarity_k: int = 10
    plots: bool = True
    projections: list[str] = field(default_factory=lambda: ["umap", "pca"])  # per model, coloured by every target
    synthetic: SyntheticSpec | None = None  # written to ${paths.work}/data before anything else
    catalog: CatalogSpec | None = None
    thumbnails: str | None = None  # data with an RGB_image column: a thumbnail-grid UMAP per model
    models: list[ModelSpec] = field(default_factory=list)
    tasks: list[TaskSpec] = field(default_factory=list)


def demo_suite() -> Path:
    from fmb.paths import configs_dir

    return configs_dir() / "benchmark" / "demo.yaml"


def load_suite(path: Path, work: Path, out: Path) -> Suite:
    layers = ConfigLayers()
    layers.add(read_yaml(path), str(path))
    suite = build(Suite, layers, {"work": str(work), "out": str(out)}, str(path))
    if not suite.models or not suite.tasks:
        raise ConfigError(f"{path}: a suite needs at least one entry under models: and under tasks:")
    root = path.parent
    names = set()
    for i, model in enumerate(suite.models):
        where = f"{path}: models[{i}]"
        if not model.name:
            raise ConfigError(f"{where} has no name")
        if model.name in names:
            raise ConfigError(f"{where}: the name '{model.name}' is used twice")
        names.add(model.name)
        if (model.embeddings is None) == (model.checkpoint is None):
            raise ConfigError(f"{where} ({model.name}): give either embeddings: FILE or family: + checkpoint: DIR")
        if model.checkpoint is not None and model.family is None:
            raise ConfigError(f"{where} ({model.name}): checkpoint: needs family: (one of the `fmb embed` models)")
        for key in ("embeddings", "baseline", "checkpoint", "data"):
            if getattr(model, key):
                setattr(model, key, str(_resolve(root, getattr(model, key))))
    if suite.catalog is not None:
        suite.catalog.path = str(_resolve(root, suite.catalog.path))
    if suite.thumbnails:
        suite.thumbnails = str(_resolve(root, suite.thumbnails))
    if suite.draws < 1:
        raise ConfigError(f"{path}: draws: {suite.draws}; at least one label draw per few-shot fraction")
    for method in suite.projections:
        if method not in ("umap", "pca"):
            raise ConfigError(f"{path}: projections: '{method}' is not one of umap, pca")
    for i, task in enumerate(suite.tasks):
        if not task.target:
            raise ConfigError(f"{path}: tasks[{i}] has no target")
        for probe in task.probes:
            if probe not in PROBES:
                raise ConfigError(f"{path}: tasks[{i}] ({task.target}): unknown probe '{probe}'; choose from {', '.join(PROBES)}")
    return suite


def _resolve(root: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else root / path


# ----------------------------------------------------------------------------- embeddings


def prepare_embeddings(suite: Suite, work: Path) -> list[tuple[ModelSpec, Path, Path | None]]:
    """(model, its embedding file, its baseline file or None), embedding (and training) what is absent."""
    if suite.synthetic is not None:
        _write_synthetic(suite.synthetic, work / "data")
    prepared = []
    for model in suite.models:
        if model.embeddings is not None:
            prepared.append((model, Path(model.embeddings), Path(model.baseline) if model.baseline else None))
            continue
        from fmb.models import get_family

        family = get_family(model.family)
        checkpoint = Path(model.checkpoint)
        _ensure_checkpoint(model, family, checkpoint)
        out = work / "embeddings" / f"{model.name}.parquet"
        base = work / "embeddings" / f"{model.name}_random.parquet" if model.random_init else None
        _embed(model, family, checkpoint, out, random_init=False)
        if base is not None:
            _embed(model, family, checkpoint, base, random_init=True)
        prepared.append((model, out, base))
    return prepared


def _write_synthetic(spec: SyntheticSpec, target: Path) -> None:
    marker = target / "synthetic.json"
    wanted = {"kind": spec.kind, "n": spec.n, "seed": spec.seed, "options": spec.options}
    if marker.is_file():
        if json.loads(marker.read_text()) != json.loads(json.dumps(wanted)):
            raise ConfigError(f"{target} holds other synthetic data ({marker.read_text().strip()}): delete it or use another --work")
        return
    from fmb.models import write_synthetic

    log.info(f"writing {spec.n} synthetic '{spec.kind}' objects to {target}")
    write_synthetic(spec.kind, target, spec.n, spec.seed, **spec.options)
    marker.write_text(json.dumps(wanted, indent=1))


def _ensure_checkpoint(model: ModelSpec, family: Any, checkpoint: Path) -> None:
    from fmb.train.checkpoint import find_checkpoint

    try:
        find_checkpoint(checkpoint)
        return
    except CheckpointError:
        if model.retrain is None:
            raise
    from fmb.recipes import RunRequest, load_run_config

    log.info(f"{model.name}: no checkpoint in {checkpoint}; training one: fmb retrain {model.family}"
             f"{' --demo' if model.retrain.demo else ''} --out {checkpoint} " + " ".join(f"--set {s}" for s in model.retrain.sets))
    request = RunRequest(model=model.family, config_files=[], sets=list(model.retrain.sets), flags={"out": str(checkpoint)},
                         demo=model.retrain.demo)
    config, _ = load_run_config(request, family.trainer_class().config_cls)
    config.train.progress = sys.stderr.isatty()
    result = family.trainer_class()(config).fit(resume=False)
    log.info(result.summary())
    if result.exit_code:
        raise CheckpointError(f"{model.name}: training into {checkpoint} stopped with exit code {result.exit_code}; "
                              "run the benchmark again to continue")


def _embed(model: ModelSpec, family: Any, checkpoint: Path, out: Path, random_init: bool) -> None:
    """`fmb embed` into `out` unless it is there already, made from the same checkpoint."""
    from fmb.train.checkpoint import MODEL_FILE, find_checkpoint
    from fmb.train.embed import EmbedOptions, run_embed

    directory = find_checkpoint(checkpoint)
    stamp = {"checkpoint": str(directory), "modified": (directory / MODEL_FILE).stat().st_mtime, "random_init": random_init,
             "data": model.data, "sets": model.sets}
    record = out.with_name(out.name + ".json")
    if out.is_file() and record.is_file() and json.loads(record.read_text()) == json.loads(json.dumps(stamp)):
        log.info(f"{model.name}: reusing {out}")
        return
    options = EmbedOptions(data=model.data, random_init=random_init, sets=list(model.sets), num_workers=0)
    result = run_embed(family, checkpoint, out, options)
    log.info(f"{model.name}{' (random init)' if random_init else ''}: {result.summary()}")
    record.write_text(json.dumps(stamp, indent=1))


# ----------------------------------------------------------------------------- frozen folds


def frozen_folds(path: Path, ids: np.ndarray, folds: int, seed: int) -> Folds:
    """The fold and rank of each of `ids`, from `path` (written the first time)."""
    if path.is_file():
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows or set(rows[0]) != {"object_id", "fold", "rank"}:
            raise DataError(f"{path}: not a split file (columns object_id, fold, rank); delete it to draw new folds")
        stored = np.array([_id_value(r["object_id"], ids) for r in rows], dtype=ids.dtype)
        fold_of = dict(zip(stored.tolist(), (int(r["fold"]) for r in rows), strict=True))
        rank_of = dict(zip(stored.tolist(), (int(r["rank"]) for r in rows), strict=True))
        known = np.array([i in fold_of for i in ids.tolist()])
        if not known.all():
            log.warning(f"{path}: {int((~known).sum())} of {len(ids)} objects are not in the frozen split and are not "
                        "scored; delete the file to draw folds over every object")
        fold = np.array([fold_of.get(i, -1) for i in ids.tolist()], np.int64)
        rank = np.array([rank_of.get(i, len(rank_of)) for i in ids.tolist()], np.int64)
        log.info(f"{path}: frozen folds of {len(rows)} objects reused")
        return Folds(fold, rank)
    split = make_folds(len(ids), folds, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["object_id", "fold", "rank"])
        writer.writerows(zip(ids.tolist(), split.fold.tolist(), split.rank.tolist(), strict=True))
    log.info(f"{path}: {folds} folds over {len(ids)} objects drawn (seed {seed}) and frozen")
    return split


def _id_value(text: str, like: np.ndarray) -> Any:
    return int(text) if like.dtype.kind in "iu" else text


# ----------------------------------------------------------------------------- the run


@dataclass
class BenchmarkResult:
    out: Path
    rows: list[dict]
    leaderboard: list[dict]
    seconds: float
    files: list[Path]

    def summary(self) -> str:
        return (f"benchmark: {len(self.leaderboard)} leaderboard rows, {len(self.rows)} figures in {self.seconds:.0f} s; "
                f"wrote {', '.join(str(f) for f in self.files)}")


def run_benchmark(suite_path: Path, out: Path, work: Path | None = None, command: str = "") -> BenchmarkResult:
    started = time.perf_counter()
    out = Path(out).resolve()  # absolute: suite paths relative to the suite file must not re-anchor them
    work = Path(work).resolve() if work else out / "work"
    suite = load_suite(Path(suite_path), work, out)
    prepared = prepare_embeddings(suite, work)

    files = [load_embeddings(path) for _, path, _ in prepared]
    bases = [load_embeddings(path) for _, _, path in prepared if path is not None]
    aligned = align(files + bases)
    models = aligned[: len(files)]
    base_iter = iter(aligned[len(files):])
    baselines = [next(base_iter) if base is not None else None for _, _, base in prepared]
    for (spec, _, _), model in zip(prepared, models, strict=True):
        model.name = spec.name
        for column in spec.columns:
            if column not in model.embeddings:
                raise DataError(f"suite model '{spec.name}': {model.path} has no column {EMBEDDING_PREFIX}{column}; "
                                f"it has {', '.join(EMBEDDING_PREFIX + c for c in model.embeddings)}")
    units: dict[str, str] = {}
    if suite.catalog is not None:
        catalog = read_catalog(suite.catalog.path, suite.catalog.id_column, suite.catalog.map, tuple(suite.catalog.sentinels))
        units = catalog.units
        joined = join(catalog, models[0].ids, f"suite {suite.name}")
        for f in models + [b for b in baselines if b is not None]:
            f.targets.update(joined)
    tasks = [_task(spec, models[0], suite.outlier_threshold) for spec in suite.tasks]
    for model in models:
        for task in tasks:
            if task.target not in model.targets:
                raise DataError(f"suite task '{task.target}': {model.path} has no such column and the suite's catalogue "
                                f"does not map it; it has {', '.join(sorted(model.targets)) or 'none'}")

    split = frozen_folds(out / "split.csv", models[0].ids, suite.folds, suite.seed)
    scored = split.fold >= 0
    plot_dir = out / "plots" if suite.plots else None
    predictions: dict = {}
    fits = sum(len(spec.columns or m.embeddings) * len(t.probes) * len(t.fractions) * (2 if b is not None else 1)
               for (spec, _, _), m, b in zip(prepared, models, baselines, strict=True) for t in tasks)
    bar = tqdm(total=fits, desc="benchmark probes", unit="fit", disable=not sys.stderr.isatty())
    rows = []
    for (spec, _, _), model, base in zip(prepared, models, baselines, strict=True):
        model_rows, base_rows = model.take(np.flatnonzero(scored)), base.take(np.flatnonzero(scored)) if base else None
        for task in tasks:
            rows += evaluate_task(model_rows, base_rows, task, split.take(scored), suite.folds, suite.k, suite.seed,
                                  suite.bootstrap, bar, columns=spec.columns or None, collect=predictions,
                                  draws=suite.draws)
            if not task.classify:  # a model's own predictions of the target (AION's aion_redshift)
                rows += zero_shot_rows(model_rows, base_rows, task, suite.bootstrap, suite.seed)
    bar.close()
    board = leaderboard(rows, tasks)

    from fmb.evaluation.similarity import similarity

    columns = {f"{spec.name}/{c}": m.embeddings[c] for (spec, _, _), m in zip(prepared, models, strict=True)
               for c in (spec.columns or m.embeddings)}
    matrix = similarity(columns, suite.similarity_k)

    written = write_report(out, suite, rows, board, matrix, tasks, units, command or f"fmb benchmark {suite_path}",
                           models, predictions, plot_dir)
    return BenchmarkResult(out, rows, board, time.perf_counter() - started, written)


def _task(spec: TaskSpec, sample: EmbeddingFile, threshold: float) -> Task:
    kind = spec.kind
    if kind is None and spec.target in sample.targets:
        values = sample.targets[spec.target]
        kind = "classification" if is_classification(values) else "redshift" if is_redshift(spec.target) else "regression"
    kind = kind or ("redshift" if is_redshift(spec.target) else "regression")
    return Task(spec.target, kind, tuple(spec.probes), tuple(spec.fractions), threshold, spec.rank_by)


def leaderboard(rows: list[dict], tasks: list[Task]) -> list[dict]:
    """Per task: each (model, embedding)'s best figure on the task's metric, ranked (1 = best): its best
    probe trained on all the labels or, for a model's own prediction column, that column scored as it is
    (probe "zero-shot", no labels). `tied` marks an entry whose 95% interval overlaps the leader's."""
    board = []
    for task in tasks:
        lower = task.rank_by in LOWER_IS_BETTER
        full = max(task.fractions)
        candidates: dict[tuple[str, str], dict] = {}
        for r in rows:
            if r["target"] != task.target or r["metric"] != task.rank_by or (r["labels"] != full and not is_zero_shot(r)):
                continue
            key = (r["model"], r["embedding"])
            best = candidates.get(key)
            if best is None or (r["value"] < best["value"] if lower else r["value"] > best["value"]):
                candidates[key] = r
        if not candidates and any(r["target"] == task.target for r in rows):
            raise DataError(f"task {task.target}: no '{task.rank_by}' figure to rank by; rank_by is one of "
                            + ", ".join(sorted({r['metric'] for r in rows if r['target'] == task.target})))
        ordered = sorted(candidates.values(), key=lambda r: r["value"] if lower else -r["value"])
        per_model_seen: set[str] = set()
        leader = ordered[0] if ordered else None
        for position, r in enumerate(ordered, 1):
            # a worse entry whose interval reaches into the leader's
            overlap = leader is not None and r is not leader and (
                r["low"] <= leader["high"] if lower else r["high"] >= leader["low"])
            entry = {"task": task.target, "kind": task.kind, "metric": task.rank_by, "rank": position,
                     "model": r["model"], "embedding": r["embedding"], "probe": r["probe"], "labels": r["labels"],
                     "value": r["value"], "low": r["low"], "high": r["high"], "baseline": r["baseline"],
                     "baseline_low": r["baseline_low"], "baseline_high": r["baseline_high"], "n": r["n"],
                     "tied": bool(overlap), "model_best": r["model"] not in per_model_seen}
            per_model_seen.add(r["model"])
            board.append(entry)
    return board


LEADERBOARD_FIELDS = ["task", "kind", "metric", "rank", "model", "embedding", "probe", "labels", "value", "low", "high",
                      "baseline", "baseline_low", "baseline_high", "n", "tied", "model_best"]


def few_shot_note(draws: int) -> str:
    return (f"below 100% of the labels, the mean of {draws} label draws with their replicates pooled (which objects are "
            "scored and which are labelled both vary); zero-shot: a model's own prediction column, no labels used.")


def leaderboard_markdown(board: list[dict], rows: list[dict], tasks: list[Task], units: dict[str, str],
                         draws: int = FEW_SHOT_DRAWS) -> str:
    """Per task: the ranked table (every probe and label fraction of the ranking metric), then ranks per model."""
    parts = []
    for task in tasks:
        entries = [e for e in board if e["task"] == task.target]
        if not entries:
            continue
        unit = f" [{units[task.target]}]" if task.target in units else ""
        better = "lower is better" if task.rank_by in LOWER_IS_BETTER else "higher is better"
        columns = [(p, f) for f in task.fractions for p in task.probes]
        if any(is_zero_shot(e) for e in entries):
            columns.append((ZERO_SHOT, 0.0))
        header = " | ".join(p if p == ZERO_SHOT else f"{p} {f:.0%}" for p, f in columns)
        parts += [f"### {task.target}{unit} ({task.kind}; {task.rank_by}, {better})", "",
                  f"| rank | model | embedding | {header} | random init (best probe, {max(task.fractions):.0%}) | n |",
                  "|---" * (len(columns) + 5) + "|"]
        for e in entries:
            cells = []
            for probe, fraction in columns:
                match = [r for r in rows if r["model"] == e["model"] and r["embedding"] == e["embedding"]
                         and r["target"] == task.target and r["metric"] == task.rank_by and r["probe"] == probe
                         and r["labels"] == fraction]
                cells.append(interval(match[0]["value"], match[0]["low"], match[0]["high"]) if match else "")
            rank = f"{e['rank']}{' =' if e['tied'] else ''}"
            parts.append(f"| {rank} | {e['model']} | {e['embedding']} | " + " | ".join(cells)
                         + f" | {interval(e['baseline'], e['baseline_low'], e['baseline_high'])} | {e['n']} |")
        parts.append("")
    parts += ["### Ranks per task (each model's best embedding)", "",
              "| model | " + " | ".join(t.target for t in tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for model in dict.fromkeys(e["model"] for e in board):
        cells = []
        for task in tasks:
            mine = [e for e in board if e["task"] == task.target and e["model"] == model]
            models_ranked = list(dict.fromkeys(e["model"] for e in board if e["task"] == task.target))
            cells.append(f"{models_ranked.index(model) + 1} ({mine[0]['value']:.3f} {mine[0]['embedding']})" if mine else "")
        parts.append(f"| {model} | " + " | ".join(cells) + " |")
    parts += ["", "`=`: the 95% interval overlaps the leader's (not a significant difference). Intervals: "
              f"bootstrap over the scored objects of the out-of-fold predictions; {few_shot_note(draws)}"]
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- report


def write_report(out: Path, suite: Suite, rows: list[dict], board: list[dict], matrix: Any, tasks: list[Task],
                 units: dict[str, str], command: str, models: list[EmbeddingFile], predictions: dict,
                 plot_dir: Path | None) -> list[Path]:
    """results.csv, leaderboard.csv / .md, similarity.csv / .md, the figures and report.html."""
    from fmb.evaluation.similarity import markdown as similarity_markdown

    board_md = leaderboard_markdown(board, rows, tasks, units, suite.draws)
    similarity_md = similarity_markdown(matrix)
    header = f"Suite `{suite.name}` (seed {suite.seed}, {suite.folds} folds frozen in split.csv):\n\n```bash\n{command}\n```\n\n"
    (out / "leaderboard.md").write_text(header + board_md)
    (out / "similarity.md").write_text(header + similarity_md)
    written = [write_csv(out / "results.csv", rows, FIELDS), write_csv(out / "leaderboard.csv", board, LEADERBOARD_FIELDS),
               out / "leaderboard.md", _similarity_csv(out / "similarity.csv", matrix), out / "similarity.md"]
    figures = _figures(plot_dir, suite, rows, board, matrix, tasks, models, predictions) if plot_dir else []
    html_path = out / "report.html"
    html_path.write_text(report_html(suite, command, board, rows, tasks, units, matrix, figures, models))
    return written + [html_path] + ([plot_dir] if figures else [])


def _similarity_csv(path: Path, matrix: Any) -> Path:
    rows = [{"a": a, "b": b, "cka": matrix.cka[i, j], "mutual_knn": matrix.mutual_knn[i, j], "objects": matrix.objects[i, j]}
            for i, a in enumerate(matrix.names) for j, b in enumerate(matrix.names) if i < j]
    return write_csv(path, rows, ["a", "b", "cka", "mutual_knn", "objects"])


def _figures(plot_dir: Path, suite: Suite, rows: list[dict], board: list[dict], matrix: Any, tasks: list[Task],
             models: list[EmbeddingFile], predictions: dict) -> list[tuple[str, str, Path]]:
    """(section, caption, png) of every figure of the report."""
    from fmb.evaluation import plots

    figures = []
    for task in tasks:
        trained = [e for e in board if e["task"] == task.target and not is_zero_shot(e)]
        if len(task.fractions) > 1 and trained:
            lines = few_shot_lines(board, rows, task.target)
            path = plots.few_shot(lines, task.rank_by, f"{task.target}: few-shot", plot_dir / f"{task.target}__few_shot.png",
                                  key="line", group="model")
            zero_shot = "; dotted: the model's best zero-shot prediction" if any(is_zero_shot(r) for r in lines) else ""
            figures.append((task.target, f"{task.rank_by} against the fraction of training labels, each model's best "
                            f"embedding and probe trained on labels; shaded: 95% interval; dashed: random init{zero_shot}",
                            path))
        if not trained:
            continue
        leader = trained[0]  # the scatter / confusion of the best probe trained on labels
        y, results = predictions[(leader["model"], leader["embedding"], task.target)]
        result = next(r for r in results if r.probe == leader["probe"] and r.fraction == leader["labels"])
        name = f"{leader['model']} {leader['embedding']} ({leader['probe']})"
        if task.classify:
            path = plots.confusion(result.confusion, result.classes, f"{task.target}: {name}",
                                   plot_dir / f"{task.target}__confusion.png")
            figures.append((task.target, f"confusion matrix of the best probe trained on labels, {name} (out of fold)", path))
        else:
            path = plots.prediction_scatter(y, result.predictions, f"{task.target}: {name}", plot_dir / f"{task.target}__scatter.png",
                                            task.threshold if task.kind == "redshift" else None)
            figures.append((task.target, f"out-of-fold predictions of the best probe trained on labels, {name}, "
                            "against the truth", path))
    for model in models:
        column = "joint" if "joint" in model.embeddings else next(iter(model.embeddings))
        x = model.embeddings[column]
        present = np.flatnonzero(np.isfinite(x).all(1))
        colours_of = {t.target: model.targets[t.target][present] for t in tasks}
        for method in suite.projections:
            rows_drawn, xy = plots.project(x[present], method, suite.seed)
            path = plots.coloured_panels(xy, {f"{model.name} {column}: {t}": v[rows_drawn] for t, v in colours_of.items()},
                                         plot_dir / f"{model.name}__{column}__{method}.png", method.upper() if method == "umap" else "PC")
            figures.append(("projections", f"{model.name} {column}: {method.upper()} coloured by each target", path))
            if method == "umap" and suite.thumbnails:
                grid = _thumbnails(suite.thumbnails, model.ids[present][rows_drawn], xy)
                if grid:
                    path = plots.thumbnail_grid(grid, f"{model.name} {column}: UMAP", plot_dir / f"{model.name}__{column}__thumbnails.png")
                    figures.append(("projections", f"{model.name} {column}: images at their UMAP positions (the central half of each cutout)", path))
    if len(matrix.names) > 1:
        path = plots.similarity_matrices(matrix.names, matrix.cka, matrix.mutual_knn, plot_dir / "similarity.png")
        figures.append(("similarity", f"linear CKA and mutual kNN (k = {matrix.k}) between every pair of embeddings", path))
    return figures


def few_shot_lines(board: list[dict], rows: list[dict], target: str) -> list[dict]:
    """The rows of the few-shot figure of `target`, `line` naming the line each is on: per model, its best
    entry trained on labels at every fraction, and its best zero-shot prediction (one row, drawn across)."""
    lines = []
    for model in dict.fromkeys(e["model"] for e in board if e["task"] == target):
        mine = [e for e in board if e["task"] == target and e["model"] == model]
        best = [next((e for e in mine if is_zero_shot(e) == zero_shot), None) for zero_shot in (False, True)]
        for e in filter(None, best):
            name = f"{model} {e['embedding']}" + ("" if is_zero_shot(e) else f" ({e['probe']})")
            lines += [{**r, "line": name} for r in rows if r["model"] == model and r["embedding"] == e["embedding"]
                      and r["target"] == target and r["probe"] == e["probe"] and r["metric"] == e["metric"]]
    return lines


def _thumbnails(data: str, ids: np.ndarray, xy: np.ndarray, cells: int = 16) -> dict:
    """cell -> image of the object shown there (read only for those objects)."""
    from fmb.data.images import decode_image, image_bytes
    from fmb.data.tables import rows_by_id
    from fmb.evaluation.plots import grid_cells

    chosen = grid_cells(xy, cells)
    found = rows_by_id(data, ids[list(chosen.values())], ["RGB_image"])
    grid = {}
    for cell, row in zip(chosen, found, strict=True):
        data_bytes = image_bytes(row.get("RGB_image")) if row is not None else None
        if data_bytes:
            try:
                image = decode_image(data_bytes)
                height, width = image.shape[:2]
                # the central half: cutouts are mostly sky, and a cell is a few dozen pixels wide
                grid[cell] = image[height // 4: height - height // 4, width // 4: width - width // 4]
            except DataError as exc:
                log.info(f"{data}: a thumbnail is not drawn: {exc}")
    return grid


def report_html(suite: Suite, command: str, board: list[dict], rows: list[dict], tasks: list[Task], units: dict[str, str],
                matrix: Any, figures: list[tuple[str, str, Path]], models: list[EmbeddingFile]) -> str:
    """One self-contained page: the leaderboard, ranks, similarity, every figure inline (base64 PNG)."""
    import base64
    from html import escape

    def table(head: list[str], body: list[list[str]], numeric_from: int = 0) -> str:
        cells = "".join(f"<th>{escape(h)}</th>" for h in head)
        lines = "".join("<tr>" + "".join(f"<td{' class=num' if i >= numeric_from and numeric_from else ''}>{escape(c)}</td>"
                                         for i, c in enumerate(r)) + "</tr>" for r in body)
        return f"<div class=wide><table><thead><tr>{cells}</tr></thead><tbody>{lines}</tbody></table></div>"

    def figure(caption: str, png: bytes) -> str:
        # as wide as the PNG (its header's width), so the caption wraps under it and figures sit side by side
        width = int.from_bytes(png[16:20], "big")
        return (f'<figure style="width:{width}px"><img alt="{escape(caption)}" src="data:image/png;base64,'
                f'{base64.b64encode(png).decode()}"><figcaption>{escape(caption)}</figcaption></figure>')

    def images(section: str) -> str:
        return "".join(figure(caption, path.read_bytes()) for where, caption, path in figures if where == section)

    parts = [f"<h1>fmb benchmark: {escape(suite.name)}</h1>",
             f"<p>{len(models[0].ids)} objects shared by {len(models)} models; seed {suite.seed}; {suite.folds} folds frozen "
             f"in <code>split.csv</code>; 95% bootstrap intervals ({suite.bootstrap} replicates) in brackets, "
             f"{escape(few_shot_note(suite.draws))} <b>=</b> marks an interval overlapping the leader's.</p>",
             f"<pre><code>{escape(command)}</code></pre>", "<h2>Leaderboard</h2>"]
    for task in tasks:
        entries = [e for e in board if e["task"] == task.target]
        unit = f" [{units[task.target]}]" if task.target in units else ""
        better = "lower is better" if task.rank_by in LOWER_IS_BETTER else "higher is better"
        parts.append(f"<h3 id='task-{escape(task.target)}'>{escape(task.target + unit)} "
                     f"<small>({escape(task.kind)}; ranked by {escape(task.rank_by)}, {better})</small></h3>")
        body = [[f"{e['rank']}{' =' if e['tied'] else ''}", e["model"], e["embedding"], e["probe"],
                 interval(e["value"], e["low"], e["high"]), interval(e["baseline"], e["baseline_low"], e["baseline_high"]),
                 str(e["n"])] for e in entries]
        parts.append(table(["rank", "model", "embedding", "best probe", f"{task.rank_by} (all labels)",
                            "random init", "n"], body, 4))
        others = [r for r in rows if r["target"] == task.target and r["labels"] in (max(task.fractions), 0.0)
                  and r["metric"] != task.rank_by and any(e["model"] == r["model"] and e["embedding"] == r["embedding"]
                                                          and e["probe"] == r["probe"] and e["model_best"] for e in entries)]
        if others:
            metrics = list(dict.fromkeys(r["metric"] for r in others))
            keyed = {(r["model"], r["embedding"], r["metric"]): r for r in others}
            body = [[e["model"], e["embedding"], e["probe"]]
                    + [interval(keyed[(e["model"], e["embedding"], m)]["value"], keyed[(e["model"], e["embedding"], m)]["low"],
                                keyed[(e["model"], e["embedding"], m)]["high"]) if (e["model"], e["embedding"], m) in keyed else ""
                       for m in metrics] for e in entries if e["model_best"]]
            parts.append("<p>Every figure of each model's best entry:</p>" + table(["model", "embedding", "probe", *metrics], body, 3))
        parts.append(f"<div class=figs>{images(task.target)}</div>")
    parts.append("<h2>Ranks per task</h2>")
    head = ["model"] + [t.target for t in tasks]
    body = []
    for model in dict.fromkeys(e["model"] for e in board):
        line = [model]
        for task in tasks:
            ranked = list(dict.fromkeys(e["model"] for e in board if e["task"] == task.target))
            line.append(str(ranked.index(model) + 1) if model in ranked else "")
        body.append(line)
    parts.append(table(head, body, 1))
    parts.append("<h2>Similarity between embeddings</h2><p>Linear CKA above the diagonal, mutual kNN "
                 f"(k = {matrix.k}) below.</p>")
    body = [[a] + ["-" if i == j else f"{(matrix.cka if j > i else matrix.mutual_knn)[i, j]:.3f}"
                   for j in range(len(matrix.names))] for i, a in enumerate(matrix.names)]
    parts.append(table(["", *matrix.names], body, 1))
    parts.append(f"<div class=figs>{images('similarity')}</div>")
    parts.append(f"<h2>Projections</h2><div class=figs>{images('projections')}</div>")
    parts.append("<h2>Models</h2>" + table(["model", "file", "objects", "embeddings"],
                                           [[m.name, str(m.path), str(len(m.ids)), ", ".join(m.embeddings)] for m in models]))
    full = [[r["model"], r["embedding"], r["target"], r["probe"], f"{r['labels']:.0%}", r["metric"],
             interval(r["value"], r["low"], r["high"]), interval(r["baseline"], r["baseline_low"], r["baseline_high"]), str(r["n"])]
            for r in rows]
    parts.append(f"<details><summary>Every figure ({len(rows)} rows, also in results.csv)</summary>"
                 + table(["model", "embedding", "target", "probe", "labels", "metric", "value", "random init", "n"], full, 6)
                 + "</details>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1300px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:0.5em 0 1em;font-size:0.85em}th,td{border:1px solid #ccc;padding:3px 7px}"
             "th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}"
             ".wide{overflow-x:auto}"  # a table wider than the page (many embeddings) scrolls, the page does not
             # figures at their own size (100 dpi), shrunk only to the page width: matrix labels stay legible
             ".figs{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;max-width:100%}figure img{width:100%}"
             "figcaption{font-size:0.8em;color:#555}pre{background:#f6f6f6;padding:0.6em;overflow-x:auto}")
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>fmb benchmark {escape(suite.name)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")
