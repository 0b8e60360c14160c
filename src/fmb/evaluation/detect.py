"""`fmb detect`: anomaly scores per model and modality, fused into one ranked short list.

Embedding files (from `fmb embed`, one per model) are joined on object_id; the scores use the
objects every file shares and the overlap is reported. Per embedding column, the rows that are
missing, non-finite or of zero norm are excluded and counted: those objects get NaN for that
column's scores (a missing modality is normal; the object is still ranked by its other scores).

Each score (named `model/column/scorer`, see `fmb.evaluation.anomaly`) becomes a percentile rank;
a model's percentiles are fused (`--fusion`: mean, the default, geometric mean, minimum or maximum
of those an object has) into
`model/anomaly_score`, re-ranked, and the models' ranks fused the same way into `anomaly_score`.
Optional thresholds keep the objects at or above a percentile of named scores (`selected`).

Written to the output directory: `anomalies.parquet` (every object, most anomalous first; equal
scores in object_id order, the objects' aligned order, so ties at the top-K cut go to the lower ids),
`top_k.csv`, `summary.md`; with a `truth_anomaly` column, the truth metrics; and the cross-model
agreement (`fmb.evaluation.agreement`).
"""

from __future__ import annotations

import fnmatch
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from fmb.embeddings import EmbeddingFile, align, load_embeddings
from fmb.errors import ConfigError, DataError
from fmb.evaluation import agreement, anomaly
from fmb.evaluation.agreement import TRUTH_COLUMN
from fmb.evaluation.anomaly import FUSIONS, NEIGHBOUR_METHODS, SCORERS, FlowOptions, Neighbours

log = logging.getLogger("fmb")



@dataclass
class DetectOptions:
    scorers: tuple[str, ...] | None = None  # None: every scorer that applies (mismatches where a file has two modalities)
    k: int = 16  # neighbours of knn / lof
    neighbour_search: str = "auto"  # exact, faiss, or auto (exact up to anomaly.EXACT_UP_TO objects)
    nprobe: int = 8  # faiss lists searched per query
    trees: int = 100  # isolation forest
    flow: FlowOptions = field(default_factory=FlowOptions)
    pairs: tuple[tuple[str, str], ...] | None = None  # mismatch pairs; None: every pair of modality columns
    fusion: str = "mean"  # gmean sinks an object that one score finds extra normal (docs/discovery.md)
    thresholds: dict[str, float] = field(default_factory=dict)  # score name or pattern -> lowest percentile kept
    top_k: int = 100
    seed: int = 0
    plots: bool = False

    def __post_init__(self) -> None:
        unknown = [s for s in self.scorers or () if s not in SCORERS]
        if unknown:
            raise ConfigError(f"unknown scorer(s) {', '.join(unknown)}: choose from {', '.join(SCORERS)}")
        if self.scorers is not None and not self.scorers:
            raise ConfigError("no scorer chosen: name at least one of " + ", ".join(SCORERS))
        if self.fusion not in FUSIONS:
            raise ConfigError(f"fusion '{self.fusion}': choose {', '.join(FUSIONS)}")
        if self.neighbour_search not in NEIGHBOUR_METHODS:
            raise ConfigError(f"neighbour search '{self.neighbour_search}': choose {', '.join(NEIGHBOUR_METHODS)}")
        if self.k < 1 or self.top_k < 1 or self.trees < 1 or self.nprobe < 1:
            raise ConfigError(f"k, top_k, trees and nprobe must be at least 1 (k={self.k}, top_k={self.top_k}, "
                              f"trees={self.trees}, nprobe={self.nprobe})")
        for key, value in self.thresholds.items():
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"threshold {key}={value}: a percentile between 0 and 1 (0.99 keeps the top 1%)")

    def wants(self, scorer: str) -> bool:
        return self.scorers is None or scorer in self.scorers


@dataclass
class Score:
    model: str
    column: str  # an embedding column, or "a+b" for a mismatch
    scorer: str
    values: np.ndarray  # one per object, NaN where the object has no usable embedding

    @property
    def name(self) -> str:
        return f"{self.model}/{self.column}/{self.scorer}"


@dataclass
class Detection:
    """Everything `detect` computed, in the aligned object order."""

    ids: np.ndarray
    models: list[str]
    scores: list[Score]
    percentiles: dict[str, np.ndarray]  # score name -> percentile
    model_scores: dict[str, np.ndarray]  # model -> its fused, re-ranked score
    anomaly_score: np.ndarray
    selected: np.ndarray  # passes every threshold
    truth: np.ndarray | None  # anomaly kind per object, None for a normal object
    neighbours: dict[str, tuple[np.ndarray, Neighbours]]  # "model/column" -> (rows scored, their neighbours in rows)
    overlap: list[str]
    exclusions: list[dict]
    timings: dict[str, float]  # scorer -> seconds over every column and model
    files: dict[str, Path] = field(default_factory=dict)
    top: list[int] = field(default_factory=list)  # rows of the top-K export, most anomalous first
    truth_headline: str = ""  # the fused scores' AUROC over every planted kind, when truth is known

    def summary(self) -> str:
        best = ", ".join(str(self.ids[r]) for r in self.top[:5])
        lines = [f"{len(self.ids)} objects, {len(self.scores)} scores from {len(self.models)} model(s); "
                 f"most anomalous: {best}"]
        lines += [self.truth_headline] if self.truth_headline else []
        lines += [f"  {what:<12} {path}" for what, path in self.files.items()]
        return "\n".join(lines)


def model_names(files: list[EmbeddingFile]) -> list[str]:
    """File stems, or parent/stem where two files share a stem (runs/a/emb.parquet, runs/b/emb.parquet)."""
    stems = [f.path.stem for f in files]
    names = [f"{f.path.parent.name}/{f.path.stem}" if stems.count(f.path.stem) > 1 else f.path.stem for f in files]
    if len(set(names)) < len(names):
        raise ConfigError("two embedding files have the same name: " + ", ".join(str(f.path) for f in files))
    return [n.replace("/", "_") for n in names]


def overlap_report(files: list[EmbeddingFile]) -> tuple[list[EmbeddingFile], list[str]]:
    """The files restricted to their shared objects, and one line per file saying what was used."""
    shared = align(files)
    n = len(shared[0].ids)
    lines = [f"{f.path}: {len(f.ids)} objects, {n} in every file" + ("" if n == len(f.ids) else f" ({len(f.ids) - n} unused)")
             for f in files]
    return shared, lines


def usable_rows(x: np.ndarray) -> tuple[np.ndarray, int, int]:
    """(mask of rows a scorer can use, rows missing or non-finite, rows of zero norm)."""
    finite = np.isfinite(x).all(1)
    zero = finite & ~(np.abs(x) > 0).any(1)
    return finite & ~zero, int((~finite).sum()), int(zero.sum())


def mismatch_pairs(f: EmbeddingFile, scorer: str, options: DetectOptions) -> list[tuple[str, str]]:
    """The column pairs of one file `scorer` (mismatch or mapped_mismatch) compares: asked for (each
    checked), or every pair of modality columns (of one width, for the cosine of `mismatch`). A file
    with one modality asked for a mismatch is an error."""
    modalities = [c for c in f.embeddings if c != "joint"]
    same_width = scorer == "mismatch"  # a cosine needs one space; a mapped mismatch maps between two

    def comparable(a: str, b: str) -> bool:
        return not same_width or f.embeddings[a].shape[1] == f.embeddings[b].shape[1]

    if options.pairs is None:
        pairs = [(a, b) for a, b in itertools.combinations(modalities, 2) if comparable(a, b)]
        if not pairs and options.scorers is not None and scorer in options.scorers:
            raise DataError(f"{f.path}: {scorer} needs two modality embeddings{' of one width' if same_width else ''}; it has "
                            + ", ".join(f"embedding_{c} ({f.embeddings[c].shape[1]})" for c in f.embeddings))
        if not pairs and len(modalities) > 1:
            log.info(f"{f.path}: no {scorer} score; its modality embeddings have different widths (mapped_mismatch "
                     "compares them)")
        return pairs
    for a, b in options.pairs:
        for c in (a, b):
            if c not in f.embeddings:
                raise DataError(f"{f.path}: --pair {a}:{b}: no column embedding_{c}; it has "
                                + ", ".join(f"embedding_{n}" for n in f.embeddings))
        if not comparable(a, b):
            raise DataError(f"{f.path}: --pair {a}:{b}: widths {f.embeddings[a].shape[1]} and {f.embeddings[b].shape[1]} "
                            "differ, so the two embeddings cannot be compared by cosine (mapped_mismatch can)")
    return list(options.pairs)


MISMATCHES = ("mismatch", "mapped_mismatch")


def score_file(f: EmbeddingFile, model: str, options: DetectOptions, pairs: dict[str, list[tuple[str, str]]],
               stage: Callable[[str], None], timings: dict[str, float]
               ) -> tuple[list[Score], list[dict], dict[str, tuple[np.ndarray, Neighbours]]]:
    """Every asked-for score of one model's file (`pairs`: the column pairs of each mismatch scorer),
    the exclusions counted per column, and the neighbour graphs."""
    n = len(f.ids)
    scores, exclusions, graphs = [], [], {}

    def timed(scorer: str, column: str, fn: Callable[[], np.ndarray], rows: np.ndarray) -> None:
        stage(f"{model}/{column}/{scorer}")
        start = time.perf_counter()
        values = np.full(n, np.nan)
        values[rows] = fn()
        timings[scorer] = timings.get(scorer, 0.0) + time.perf_counter() - start
        scores.append(Score(model, column, scorer, values))

    usable = {}
    for column, x in f.embeddings.items():
        keep, missing, zero = usable_rows(x)
        usable[column] = keep
        exclusions.append({"model": model, "column": column, "objects": n, "scored": int(keep.sum()),
                           "missing_or_nonfinite": missing, "zero_norm": zero})
        if missing or zero:
            log.info(f"{f.path}: embedding_{column}: {missing} rows missing or non-finite, {zero} of zero norm; "
                     f"excluded from its scores")
        rows = np.flatnonzero(keep)
        if len(rows) < 3:
            log.warning(f"{f.path}: embedding_{column}: only {len(rows)} usable rows; not scored")
            continue
        x_rows = x[rows]
        if options.wants("knn") or options.wants("lof"):
            start = time.perf_counter()
            stage(f"{model}/{column}/neighbours")
            nb = anomaly.neighbours(x_rows, options.k, options.neighbour_search, options.nprobe, options.seed)
            timings["neighbours"] = timings.get("neighbours", 0.0) + time.perf_counter() - start
            graphs[f"{model}/{column}"] = (rows, nb)
            if options.wants("knn"):
                timed("knn", column, lambda nb=nb: anomaly.knn_distance(nb), rows)
            if options.wants("lof"):
                timed("lof", column, lambda nb=nb: anomaly.local_outlier_factor(nb), rows)
        if options.wants("iforest"):
            timed("iforest", column, lambda x=x_rows: anomaly.isolation_forest(x, options.trees, seed=options.seed), rows)
        if options.wants("flow"):
            timed("flow", column, lambda x=x_rows: anomaly.flow_nll(x, options.flow, options.seed), rows)
    compare = {"mismatch": anomaly.mismatch,
               "mapped_mismatch": lambda a, b: anomaly.mapped_mismatch(a, b, seed=options.seed)}
    for scorer, fn in compare.items():
        for a, b in pairs.get(scorer, []):
            rows = np.flatnonzero(usable[a] & usable[b])
            if len(rows) < 3:
                log.warning(f"{f.path}: only {len(rows)} objects have both embedding_{a} and embedding_{b}; no {scorer}")
                continue
            timed(scorer, f"{a}+{b}", lambda rows=rows, a=a, b=b, fn=fn: fn(f.embeddings[a][rows], f.embeddings[b][rows]),
                  rows)
    return scores, exclusions, graphs


def matching_scores(key: str, names: list[str]) -> list[str]:
    """Scores a threshold key names: a full name, a scorer (`knn`), or a glob (`astropt/*/flow`)."""
    # a bare scorer name matches model/column/scorer only, so `anomaly_score` is the overall score alone
    return [n for n in names if n == key or (n.count("/") == 2 and n.rsplit("/", 1)[-1] == key)
            or fnmatch.fnmatchcase(n, key)]


def detect(paths: list[str], out_dir: Path, options: DetectOptions | None = None, truth_file: str | None = None,
           truth_id: str = "object_id", stage: Callable[[str], None] | None = None) -> Detection:
    """Score, fuse, select and write; see the module docstring."""
    options = options or DetectOptions()
    if any(options.wants(s) for s in ("lof", "iforest", "flow", "mapped_mismatch")):
        anomaly.discovery_import("sklearn")
    if options.wants("flow"):
        anomaly.discovery_import("zuko")
    stage = stage or log.info
    stage("load")
    loaded = [load_embeddings(p) for p in paths]
    names = model_names(loaded)
    files, overlap = overlap_report(loaded)
    ids = files[0].ids
    truth = agreement.find_truth(files, ids, truth_file, truth_id)  # before the work: a bad --truth fails at once
    timings: dict[str, float] = {}
    scores, exclusions, graphs = [], [], {}
    # checked before any scoring, so a wrong --pair or --threshold fails at once
    pairs = [{scorer: mismatch_pairs(f, scorer, options) for scorer in MISMATCHES if options.wants(scorer)} for f in files]
    check_thresholds(options.thresholds, planned_scores(files, names, pairs, options))
    for f, model, file_pairs in zip(files, names, pairs, strict=True):
        s, e, g = score_file(f, model, options, file_pairs, stage, timings)
        scores += s
        exclusions += e
        graphs.update(g)
    if not scores:
        raise DataError("no score could be computed: " + ", ".join(paths) + " have too few usable embeddings")
    stage("fusion and reports")
    percentiles = {s.name: anomaly.percentile(s.values) for s in scores}
    model_scores = {}
    for model in names:
        own = [percentiles[s.name] for s in scores if s.model == model]
        if own:
            model_scores[model] = anomaly.percentile(anomaly.fuse(own, options.fusion))
    anomaly_score = anomaly.fuse(list(model_scores.values()), options.fusion)
    selected = select(options.thresholds, percentiles, model_scores, anomaly_score)
    result = Detection(ids, names, scores, percentiles, model_scores, anomaly_score, selected, truth, graphs,
                       overlap, exclusions, timings)
    write(result, Path(out_dir), options)
    stage("done")
    return result


def planned_scores(files: list[EmbeddingFile], names: list[str], pairs: list[dict[str, list[tuple[str, str]]]],
                   options: DetectOptions) -> list[str]:
    """The names of every score, fused score included, that `detect` will compute (or try to: a
    column with too few usable rows is skipped later)."""
    planned = ["anomaly_score"]
    single = [s for s in SCORERS if s not in MISMATCHES and options.wants(s)]
    for f, model, file_pairs in zip(files, names, pairs, strict=True):
        planned.append(f"{model}/anomaly_score")
        planned += [f"{model}/{column}/{scorer}" for column in f.embeddings for scorer in single]
        planned += [f"{model}/{a}+{b}/{scorer}" for scorer, found in file_pairs.items() for a, b in found]
    return planned


def check_thresholds(thresholds: dict[str, float], names: list[str]) -> None:
    for key in thresholds:
        if not matching_scores(key, names):
            raise ConfigError(f"threshold {key}: no score of that name; scores are {', '.join(names)}")


def select(thresholds: dict[str, float], percentiles: dict[str, np.ndarray], model_scores: dict[str, np.ndarray],
           anomaly_score: np.ndarray) -> np.ndarray:
    """Objects at or above every threshold's percentile, among the scores it names; an object
    without such a score (a missing modality) is not removed by that threshold."""
    named = {**percentiles, **{f"{m}/anomaly_score": v for m, v in model_scores.items()},
             "anomaly_score": anomaly.percentile(anomaly_score)}
    check_thresholds(thresholds, list(named))  # again: a planned score may have had too few rows
    keep = np.ones(len(anomaly_score), bool)
    for key, lowest in thresholds.items():
        for name in matching_scores(key, list(named)):
            keep &= ~(named[name] < lowest)  # NaN (no such score) passes
        log.info(f"threshold {key} >= {lowest}: {int(keep.sum())} objects left")
    return keep


def output_table(result: Detection, order: np.ndarray) -> pa.Table:
    columns: dict[str, object] = {"object_id": result.ids[order], "anomaly_score": result.anomaly_score[order],
                                  "selected": result.selected[order]}
    if result.truth is not None:
        columns[TRUTH_COLUMN] = pa.array([v if agreement.is_kind(v) else None for v in result.truth[order]], pa.string())
    for model in result.models:
        if model in result.model_scores:
            columns[f"{model}/anomaly_score"] = result.model_scores[model][order]
        for s in (s for s in result.scores if s.model == model):
            columns[s.name] = s.values[order]
            columns[f"{s.name}_pct"] = result.percentiles[s.name][order]
    return pa.table(columns)


def write(result: Detection, out_dir: Path, options: DetectOptions) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    # most anomalous first, ties in the aligned (object_id) order; objects without any score last
    order = np.argsort(-np.nan_to_num(result.anomaly_score, nan=-1.0), kind="stable")
    table = output_table(result, order)
    result.files["scores"] = out_dir / "anomalies.parquet"
    pq.write_table(table, result.files["scores"])
    chosen = [int(r) for r in order if result.selected[r] and np.isfinite(result.anomaly_score[r])]
    k = options.top_k
    if k > len(chosen):
        log.warning(f"--top-k {k} is more than the {len(chosen)} objects selected; exporting all {len(chosen)}")
        k = len(chosen)
    result.top = chosen[:k]
    result.files["top_k"] = out_dir / "top_k.csv"
    pa_csv.write_csv(output_table(result, np.asarray(result.top, np.int64)), result.files["top_k"])
    result.files["summary"] = out_dir / "summary.md"
    result.files["summary"].write_text(summary_markdown(result, options, k))
    result.files.update(agreement.write_reports(result, out_dir, options))


def summary_markdown(result: Detection, options: DetectOptions, k: int) -> str:
    lines = ["# fmb detect", "", f"Fusion: {options.fusion} of percentile ranks, per model then across models. "
             f"Scorers: {', '.join(options.scorers or SCORERS)}; k = {options.k}, neighbour search {options.neighbour_search}.",
             "", "## Objects used", "", *[f"- {line}" for line in result.overlap], "",
             "## Exclusions per embedding column", "", "| model | column | objects | scored | missing or non-finite | zero norm |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {e['model']} | {e['column']} | {e['objects']} | {e['scored']} | {e['missing_or_nonfinite']} | {e['zero_norm']} |"
              for e in result.exclusions]
    if options.thresholds:
        lines += ["", "## Thresholds", "", *[f"- {key} >= {value}" for key, value in options.thresholds.items()],
                  f"- {int(result.selected.sum())} of {len(result.ids)} objects pass"]
    lines += ["", f"## Top {k}", "", "| rank | object_id | anomaly_score |" + (" truth |" if result.truth is not None else ""),
              "|---|---|---|" + ("---|" if result.truth is not None else "")]
    for rank, row in enumerate(result.top[:20], 1):
        kind = f" {result.truth[row] or ''} |" if result.truth is not None else ""
        lines.append(f"| {rank} | {result.ids[row]} | {result.anomaly_score[row]:.4f} |{kind}")
    lines += ["", "## Time per scorer (s)", "", *[f"- {name}: {sec:.1f}" for name, sec in result.timings.items()]]
    return "\n".join(lines) + "\n"
