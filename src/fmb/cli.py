"""The `fmb` command. Heavy imports (torch, families) happen inside the commands that need them."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from fmb.errors import EXIT_OK, EXIT_RUNTIME, FmbError
from fmb.models import family_commands, family_names, family_summaries

app = typer.Typer(
    name="fmb",
    help="Foundation Models Benchmark: retrain and compare astronomy foundation models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
config_app = typer.Typer(help="Inspect run configurations.", no_args_is_help=True)
data_app = typer.Typer(help="Datasets: synthetic data in the real formats.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
for _name, _commands in family_commands():  # family-specific groups, e.g. astromodal's `fmb tokenize`
    app.add_typer(_commands, name=_name)


def _models_help() -> str:
    summaries = family_summaries()
    if not summaries:
        return "Model family."
    return "Model family: " + "; ".join(f"{name} ({text})" for name, text in summaries.items()) + "."


ModelArg = Annotated[str, typer.Argument(help=_models_help(), show_default=False)]
ConfigOpt = Annotated[list[str], typer.Option("--config", "-c", help="Extra YAML config file (repeatable, later wins).")]
SetOpt = Annotated[list[str], typer.Option("--set", "-s", help="Override: dotted.key=value (repeatable).")]
PathsOpt = Annotated[str | None, typer.Option("--paths", help="paths_local.yaml to use (default: $FMB_PATHS, ./, repo root).")]
DemoOpt = Annotated[bool, typer.Option("--demo", help="Train on built-in synthetic data with the small demo recipe.")]


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False) -> None:
    level = logging.DEBUG if debug else logging.INFO
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    _setup_logging(level if rank == 0 else logging.WARNING)


def _setup_logging(level: int) -> None:
    logger = logging.getLogger("fmb")
    logger.setLevel(level)
    if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("[fmb] %(message)s"))
        logger.addHandler(handler)


class _TqdmHandler(logging.StreamHandler):
    """Writes log lines above an active progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def _run_request(model: str, config: list[str], sets: list[str], demo: bool, paths: str | None, **flags):
    from fmb.recipes import RunRequest

    return RunRequest(model=model, config_files=config or [], sets=sets or [], flags=flags, demo=demo, paths=paths)


@app.command()
def retrain(
    model: ModelArg,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[str | None, typer.Option(help="Run directory (checkpoints, metrics, logs).")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Passes over the training split (instead of --max-steps).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Per-process micro-batch size.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (weights, data order).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest complete checkpoint in the run directory.")] = False,
    demo: DemoOpt = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
    paths: PathsOpt = None,
) -> None:
    """Train (or fine-tune) a model family. Exit code 75: stopped by a signal, resume with --resume."""
    from fmb.models import get_family
    from fmb.recipes import load_run_config

    family = get_family(model)
    request = _run_request(model, config, set_, demo, paths, out=out, max_steps=max_steps, epochs=epochs,
                           batch_size=batch_size, lr=lr, device=device, seed=seed)
    run_config, _ = load_run_config(request, family.trainer_class().config_cls)
    if no_progress:
        run_config.train.progress = False
    result = family.trainer_class()(run_config).fit(resume=resume)
    logging.getLogger("fmb").info(result.summary())
    if result.exit_code:
        raise typer.Exit(result.exit_code)


@app.command("status")
def status_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (the --out of `fmb retrain`).")],
) -> None:
    """How the last run into RUN_DIR ended, exiting with its code: 0 completed, 75 stopped by a signal
    (resume with --resume), 1 failed or crashed. Under torchrun, whose agent reports a graceful stop
    of its workers as a failure, `torchrun ... -m fmb retrain ... --out R || fmb status R` gives 75."""
    from fmb.train.rundir import exit_code_of, read_status

    record = read_status(run_dir)
    parts = [f"{run_dir}: {record.get('status')}", f"step {record.get('step')}"]
    if record.get("checkpoint"):
        parts.append(f"checkpoint {record['checkpoint']}")
    if record.get("best"):
        best = record["best"]
        parts.append(f"best {best['metric']} {best['value']:.4g} at step {best['step']}")
    if record.get("error"):
        parts.append(f"error: {record['error']}")
    if record.get("status") == "crashed":
        parts.append("the process ended without a word (SIGKILL, out of memory?): resume with --resume")
    typer.echo("; ".join(parts) + f" (updated {record.get('updated')})")
    code = exit_code_of(record)
    if code:
        raise typer.Exit(code)


@config_app.command("show")
def config_show(
    model: ModelArg,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    demo: DemoOpt = False,
    paths: PathsOpt = None,
) -> None:
    """Print the fully resolved configuration of a run as YAML."""
    from fmb.config import to_yaml
    from fmb.models import get_family
    from fmb.recipes import load_run_config

    family = get_family(model)
    run_config, _ = load_run_config(_run_request(model, config, set_, demo, paths), family.trainer_class().config_cls)
    typer.echo(to_yaml(run_config), nl=False)


@app.command("paths")
def paths_cmd(paths: PathsOpt = None) -> None:
    """Show which paths_local.yaml is used and whether each entry exists."""
    from fmb.paths import find_paths_file

    found = find_paths_file(paths)
    if found.file is None:
        typer.echo("no paths_local.yaml found; searched:\n  " + "\n  ".join(found.searched))
        return
    typer.echo(f"paths file: {found.file}")
    for name, value in found.resolved().items():
        state = "not set" if value is None else ("ok" if Path(value).exists() else "missing")
        typer.echo(f"  {name:<20} {state:<8} {value or ''}")


@data_app.command("synth")
def data_synth(
    kind: Annotated[str, typer.Argument(help="Kind of synthetic data (see `fmb data kinds`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")],
    n: Annotated[int, typer.Option("-n", help="Number of objects.")] = 1000,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    missing: Annotated[str | None, typer.Option(help="Shares of missing data per modality, e.g. spectra=0.7,metadata=0.3.")] = None,
    anomalies: Annotated[float | None, typer.Option(help="Share of objects with a planted anomaly (kind in truth_anomaly), e.g. 0.03.")] = None,
) -> None:
    """Write synthetic data in the exact schema of a real dataset (latent truth stored as columns)."""
    from fmb.data.synth import parse_missing
    from fmb.models import write_synthetic

    options: dict[str, Any] = {"missing": parse_missing(missing)} if missing else {}
    if anomalies is not None:
        options["anomalies"] = anomalies
    path = write_synthetic(kind, out, n, seed, **options)
    typer.echo(f"wrote {n} objects of '{kind}' to {path}")


@data_app.command("kinds")
def data_kinds() -> None:
    """List the synthetic data kinds."""
    from fmb.models import synthetic_kinds

    for name, (_, summary) in synthetic_kinds().items():
        typer.echo(f"{name:<16} {summary}")


@app.command()
def convert(
    model: ModelArg,
    src: Annotated[Path, typer.Argument(help="Upstream checkpoint file or directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="fmb checkpoint directory to write.")],
) -> None:
    """Turn an upstream checkpoint into an fmb checkpoint directory."""
    from fmb.errors import ConfigError
    from fmb.models import get_family

    family = get_family(model)
    converter = family.converter()
    if converter is None:
        raise ConfigError(f"'{model}' has no upstream checkpoint converter")
    if not src.exists():
        raise ConfigError(f"no such file or directory: {src}")
    written = converter(src, out)
    typer.echo(f"wrote {written}")


@app.command()
def embed(
    model: ModelArg,
    checkpoint: Annotated[Path, typer.Option(help="fmb checkpoint: a run directory (its best, else newest checkpoint) or a step_* directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Parquet file to write.")],
    data: Annotated[str | None, typer.Option(help="Data to embed (default: the checkpoint's dataset).")] = None,
    split: Annotated[str | None, typer.Option(help="Embed only this split (default: every object, each row's split in the `split` column).")] = None,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    num_workers: Annotated[int | None, typer.Option(help="DataLoader workers (default: the run's train.num_workers).")] = None,
    random_init: Annotated[bool, typer.Option("--random-init", help="Same architecture with untrained weights (the baseline for `fmb evaluate`).")] = False,
    chunk_rows: Annotated[int, typer.Option(help="Rows per resumable part (the unit shared out between processes).")] = 2048,
    set_: SetOpt = None,
) -> None:
    """Write per-object embeddings to parquet (resumable; torchrun / srun shard the rows). Exit code 75:
    stopped by a signal, the same command continues."""
    from fmb.models import get_family
    from fmb.train.embed import EmbedOptions, run_embed

    options = EmbedOptions(data=data, split=split, batch_size=batch_size, device=device, num_workers=num_workers,
                           random_init=random_init, sets=set_ or [], chunk_rows=chunk_rows)
    result = run_embed(get_family(model), checkpoint, out, options)
    typer.echo(result.summary())


@app.command()
def bench(
    model: ModelArg,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    preset: Annotated[str | None, typer.Option(help="Model size preset (sets model.preset).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Per-process micro-batch size.")] = None,
    compile_model: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    steps: Annotated[int, typer.Option(help="Timed optimizer steps (after 3 warm-up steps).")] = 10,
    demo: Annotated[bool, typer.Option("--demo/--no-demo", help="Use the demo recipe's synthetic data (default) or the configured data.")] = True,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the figures as JSON.")] = None,
    paths: PathsOpt = None,
) -> None:
    """Measure training throughput (samples/s, tokens/s), MFU, loader samples/s and peak memory."""
    import json
    import tempfile

    from fmb.models import get_family
    from fmb.recipes import load_run_config
    from fmb.train.bench import format_table, run_bench

    family = get_family(model)
    sets = list(set_ or []) + ([f"model.preset={preset}"] if preset else []) + (["train.compile=true"] if compile_model else [])
    with tempfile.TemporaryDirectory(prefix="fmb-bench-") as scratch:
        request = _run_request(model, config, sets, demo, paths, out=scratch, batch_size=batch_size, device=device,
                               max_steps=None, epochs=None, lr=None, seed=None)
        run_config, _ = load_run_config(request, family.trainer_class().config_cls)
        run_config.train.progress = False
        result = run_bench(family.trainer_class()(run_config), steps=steps)
    typer.echo(f"fmb bench {model}")
    typer.echo(format_table(result))
    if json_out:
        json_out.write_text(json.dumps(result, indent=1))


@app.command()
def evaluate(
    embeddings: Annotated[list[Path], typer.Argument(help="Embedding parquet files (from `fmb embed`).")],
    target: Annotated[list[str], typer.Option("--target", "-t", help="Target column (repeatable), e.g. redshift.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for results.csv and results.md.")] = Path("evaluation"),
    baseline: Annotated[list[Path], typer.Option(help="Random-init embeddings, one per file, same order (repeatable).")] = None,
    classify: Annotated[list[str], typer.Option(help="Treat this target as classes (repeatable; auto for non-float columns).")] = None,
    catalog: Annotated[Path | None, typer.Option(help="Catalogue with the targets: FITS, parquet or CSV, joined on object id.")] = None,
    id_column: Annotated[str, typer.Option(help="The catalogue's object id column.")] = "object_id",
    map_: Annotated[list[str], typer.Option("--map", help="target=COLUMN of the catalogue (repeatable), e.g. mass=LOGM.")] = None,
    folds: Annotated[int, typer.Option(help="Cross-validation folds.")] = 5,
    k: Annotated[int, typer.Option(help="Neighbours of the kNN probe.")] = 64,
    fractions: Annotated[str, typer.Option(help="Label fractions for few-shot curves, comma-separated.")] = "0.01,0.1,1.0",
    draws: Annotated[int, typer.Option(help="Label subsets drawn per fraction below 1 (figures averaged, intervals pooled).")] = 5,
    probes: Annotated[str, typer.Option(help="Probes, comma-separated: knn, linear, mlp.")] = "knn,linear,mlp",
    outlier: Annotated[float, typer.Option(help="Catastrophic redshift outlier: |dz|/(1+z) above this.")] = 0.15,
    plots: Annotated[bool, typer.Option("--plots", help="Also write figures to OUT/plots (needs the plots extra).")] = False,
) -> None:
    """Score what embeddings know: kNN / linear / MLP probes (k-fold), retrieval, few-shot, vs baselines,
    each figure with its 95% bootstrap interval."""
    from fmb.errors import ConfigError
    from fmb.evaluation.catalog import parse_mapping, read_catalog
    from fmb.evaluation.run import evaluate as run_evaluate
    from fmb.evaluation.run import markdown_table, write_tables

    mapping = parse_mapping(map_ or [])
    if mapping and catalog is None:
        raise ConfigError("--map names catalogue columns: give the catalogue with --catalog FILE")
    table = read_catalog(catalog, id_column, mapping) if catalog else None
    rows = run_evaluate([str(p) for p in embeddings], target, [str(p) for p in baseline or []] or None, classify,
                        folds, k, tuple(float(f) for f in fractions.split(",")), tuple(probes.split(",")),
                        plot_dir=out / "plots" if plots else None, catalog=table, threshold=outlier, draws=draws)
    csv_path, md_path = write_tables(rows, out)
    typer.echo(markdown_table(rows), nl=False)
    typer.echo(f"wrote {csv_path} and {md_path}" + (f" and figures in {out / 'plots'}" if plots else ""))


@app.command()
def benchmark(
    suite: Annotated[Path | None, typer.Argument(help="Suite YAML: models, tasks, catalogue, seed (see configs/benchmark/demo.yaml).")] = None,
    demo: Annotated[bool, typer.Option("--demo", help="The shipped suite: AstroPT, AstroCLIP and AION demo models on synthetic Euclid+DESI.")] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Results directory (default: benchmark/<suite name>).")] = None,
    work: Annotated[Path | None, typer.Option(help="Where the suite's data, checkpoints and embeddings are made (default: OUT/work).")] = None,
) -> None:
    """One leaderboard: every model on the same objects and frozen folds, with intervals, ranks,
    random-init baselines, cross-model similarity and an HTML report."""
    from fmb.errors import ConfigError
    from fmb.evaluation.benchmark import demo_suite, run_benchmark

    if (suite is None) == (not demo):
        raise ConfigError("give a suite file or --demo (not both)")
    path = demo_suite() if demo else suite
    if not path.is_file():
        raise ConfigError(f"suite file not found: {path}")
    result = run_benchmark(path, out or Path("benchmark") / path.stem, work, command=" ".join(["fmb", *sys.argv[1:]]))
    typer.echo(result.summary())


@app.command()
def detect(
    embeddings: Annotated[list[Path], typer.Argument(help="Embedding parquet files (from `fmb embed`), one per model.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Results directory: anomalies.parquet, top_k.csv, summary.md, truth and agreement tables.")] = Path("detect"),
    scorers: Annotated[str | None, typer.Option(help="Comma-separated: knn, lof, iforest, flow, mismatch, mapped_mismatch (default: all; the mismatches where a file has two modalities).")] = None,
    fusion: Annotated[str | None, typer.Option(help="Fusion of percentile ranks, per model then across models: gmean, min, mean or max (default mean).")] = None,
    threshold: Annotated[list[str], typer.Option(help="SCORE=PERCENTILE (repeatable): keep objects at or above it; SCORE is a name, a scorer or a glob, e.g. mismatch=0.95.")] = None,
    top_k: Annotated[int | None, typer.Option(help="Objects in top_k.csv (default 100).")] = None,
    pair: Annotated[list[str], typer.Option(help="A:B modality columns for the mismatches (repeatable; default every pair; of one width for mismatch).")] = None,
    k: Annotated[int | None, typer.Option(help="Neighbours of knn and lof (default 16).")] = None,
    neighbours: Annotated[str | None, typer.Option(help="Neighbour search: exact, faiss or auto (exact up to 30000 objects).")] = None,
    nprobe: Annotated[int | None, typer.Option(help="faiss: index lists probed per query (default 8).")] = None,
    trees: Annotated[int | None, typer.Option(help="Isolation-forest trees (default 100).")] = None,
    flow_components: Annotated[int | None, typer.Option(help="Flow: PCA components modelled (default 16).")] = None,
    flow_transforms: Annotated[int | None, typer.Option(help="Flow: autoregressive transforms (default 4).")] = None,
    flow_epochs: Annotated[int | None, typer.Option(help="Flow: training epochs (default 20).")] = None,
    flow_fit_sample: Annotated[int | None, typer.Option(help="Flow: fitted on at most this many objects (default 20000).")] = None,
    truth: Annotated[Path | None, typer.Option(help="Data directory or table with truth_anomaly, joined on --truth-id (default: the embedding files' own column).")] = None,
    truth_id: Annotated[str, typer.Option(help="The truth table's object id column.")] = "object_id",
    plots: Annotated[bool, typer.Option("--plots", help="Also write agreement heatmaps to OUT/plots (needs the plots extra).")] = False,
    seed: Annotated[int | None, typer.Option(help="Seed of the forest, the flow and the faiss index (default 0).")] = None,
) -> None:
    """Anomaly scores per model and modality (kNN, LOF, isolation forest, flow density, cross-modal
    mismatch), fused percentile ranks, thresholds, a top-K list; truth metrics when the objects carry
    truth_anomaly; cross-model agreement."""
    from dataclasses import fields

    from fmb.errors import ConfigError
    from fmb.evaluation.anomaly import FlowOptions
    from fmb.evaluation.detect import DetectOptions
    from fmb.evaluation.detect import detect as run_detect

    def given(cls, **values):  # unset flags leave the dataclass defaults: one definition of each
        return cls(**{f.name: values[f.name] for f in fields(cls) if values.get(f.name) is not None})

    thresholds = {}
    for item in threshold or []:
        key, sep, value = item.rpartition("=")
        try:
            thresholds[key] = float(value)
        except ValueError:
            key = ""
        if not sep or not key:
            raise ConfigError(f"--threshold {item!r}: write SCORE=PERCENTILE, e.g. knn=0.99")
    pairs = []
    for item in pair or []:
        a, sep, b = item.partition(":")
        if not sep or not a or not b:
            raise ConfigError(f"--pair {item!r}: write A:B, e.g. image:spectrum")
        pairs.append((a, b))
    flow = given(FlowOptions, components=flow_components, transforms=flow_transforms, epochs=flow_epochs,
                 fit_sample=flow_fit_sample)
    options = given(DetectOptions, scorers=tuple(s.strip() for s in scorers.split(",") if s.strip()) if scorers else None,
                    fusion=fusion, thresholds=thresholds or None, top_k=top_k, pairs=tuple(pairs) or None, k=k,
                    neighbour_search=neighbours, nprobe=nprobe, trees=trees, flow=flow, seed=seed, plots=plots or None)
    result = run_detect([str(p) for p in embeddings], out, options, str(truth) if truth else None, truth_id)
    typer.echo(result.summary())


@app.command()
def slurm(
    model: ModelArg,
    cluster: Annotated[str, typer.Option(help="jean-zay or candide.")],
    nodes: Annotated[int, typer.Option(help="Nodes.")] = 1,
    gpus_per_node: Annotated[int | None, typer.Option(help="GPUs (= tasks) per node; default: all of a node.")] = None,
    constraint: Annotated[str | None, typer.Option(help="Node kind (-C); Jean-Zay: a100 (default) or h100.")] = None,
    partition: Annotated[str | None, typer.Option(help="Partition (default: slurm_partition of paths_local.yaml).")] = None,
    account: Annotated[str | None, typer.Option(help="Account (default: slurm_account of paths_local.yaml).")] = None,
    qos: Annotated[str | None, typer.Option(help="QoS (default: slurm_qos of paths_local.yaml).")] = None,
    time: Annotated[str | None, typer.Option(help="Time limit per job, [D-]HH:MM:SS (the run continues across requeues).")] = None,
    cpus_per_task: Annotated[int | None, typer.Option(help="Cores per GPU task (default: the node's cores per GPU).")] = None,
    out: Annotated[str | None, typer.Option(help="retrain: run directory on the cluster (default: ${FMB_RUNS:-<cluster runs dir>}/<model>); embed: the parquet file.")] = None,
    job_kind: Annotated[str, typer.Option("--job", help="retrain, or embed (with --checkpoint and --out).")] = "retrain",
    checkpoint: Annotated[str | None, typer.Option(help="embed: the run (or step) directory to embed with.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    script: Annotated[Path | None, typer.Option(help="Write the script here (default: print it; with --submit ./fmb-<label>.sbatch).")] = None,
    submit: Annotated[bool, typer.Option("--submit", help="Write the script and submit it with sbatch.")] = False,
    paths: PathsOpt = None,
) -> None:
    """Render an sbatch script for `fmb retrain` or `fmb embed` (one task per GPU, requeued across time limits)."""
    import shutil
    import subprocess

    from fmb.errors import ConfigError
    from fmb.paths import find_paths_file
    from fmb.slurm import SlurmJob, job_label, render

    if model not in family_names():
        raise ConfigError(f"unknown model '{model}'. Valid models: {', '.join(family_names())}")
    found = find_paths_file(paths)
    modules, setup = found.setting("slurm_modules") or [], found.setting("slurm_setup") or []
    extra = [arg for c in config or [] for arg in ("--config", str(Path(c).resolve()))]
    extra += [arg for s in set_ or [] for arg in ("--set", s)]
    job = SlurmJob(
        model=model, cluster=cluster, nodes=nodes, gpus_per_node=gpus_per_node,
        constraint=constraint or found.setting("slurm_constraint"),
        partition=partition or found.setting("slurm_partition"),
        account=account or found.setting("slurm_account"),
        qos=qos or found.setting("slurm_qos"),
        modules=tuple(str(m) for m in ([modules] if isinstance(modules, str) else modules)),
        setup=tuple(str(s) for s in ([setup] if isinstance(setup, str) else setup)),
        time=time, out=str(Path(out).resolve()) if out and "$" not in out else out,
        cpus_per_task=cpus_per_task, retrain_args=tuple(extra), job=job_kind,
        checkpoint=str(Path(checkpoint).resolve()) if checkpoint and "$" not in checkpoint else checkpoint,
    )
    text = render(job)
    if submit and script is None:
        script = Path(f"fmb-{cluster}-{job_label(job)}.sbatch")
    if script is None:
        typer.echo(text, nl=False)
        return
    script.write_text(text, encoding="utf-8")
    typer.echo(f"wrote {script}")
    if submit:
        if shutil.which("sbatch") is None:
            raise ConfigError("sbatch not found: submit from a SLURM login node")
        result = subprocess.run(["sbatch", str(script)], capture_output=True, text=True)
        if result.returncode != 0:
            raise ConfigError(f"sbatch {script} failed: {result.stderr.strip() or result.stdout.strip()}")
        typer.echo(result.stdout.strip())


DataOpt = Annotated[str, typer.Option("--data", help="The data the embeddings came from (Euclid+DESI schema: RGB_image, bands, spectrum).")]


@app.command()
def show(
    object_id: Annotated[str, typer.Argument(help="The object's object_id.")],
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")] = Path("object.png"),
) -> None:
    """One object: its RGB composite and band images, its spectrum with the main lines marked at its redshift."""
    from fmb.evaluation import views

    item = views.read_objects(data, [views.parse_id(object_id, views.id_dtype(data))])[0]
    typer.echo(f"wrote {views.show_object(item, out)}")


@app.command()
def gallery(
    table: Annotated[Path, typer.Argument(help="Ranked table with object_id and scores (parquet or CSV, e.g. from `fmb detect`).")],
    data: DataOpt,
    top: Annotated[int, typer.Option(help="How many of the table's first rows to show.")] = 24,
    scores: Annotated[str | None, typer.Option(help="Columns to print under each object, comma-separated (default: the fused score first, 4 at most).")] = None,
    columns: Annotated[int, typer.Option(help="Objects per row.")] = 3,
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")] = Path("gallery.png"),
) -> None:
    """The first TOP objects of a ranked table: image, spectrum, scores and id of each."""
    from fmb.errors import ConfigError
    from fmb.evaluation import views

    if top < 1:
        raise ConfigError(f"--top must be at least 1, got {top}")
    ids, values = views.read_scores(table, top, scores.split(",") if scores else None)
    items = views.read_objects(data, ids)
    texts = [[f"#{i + 1}", *views.score_lines(values, i)] for i in range(len(items))]
    typer.echo(f"wrote {views.gallery(items, texts, out, f'{table.name}: first {len(items)}', columns)}")


@app.command()
def similar(
    embeddings: Annotated[Path, typer.Argument(help="Embedding parquet file (from `fmb embed`).")],
    object_id: Annotated[str, typer.Option("--id", help="The query's object_id.")],
    data: DataOpt,
    column: Annotated[str | None, typer.Option(help="Embedding column without its prefix, e.g. image (default: joint, else the first).")] = None,
    k: Annotated[int, typer.Option(help="Neighbours to show.")] = 8,
    columns: Annotated[int, typer.Option(help="Objects per row.")] = 3,
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")] = Path("similar.png"),
) -> None:
    """Similarity search: the query and its K nearest neighbours (cosine) as a grid of images and spectra."""
    from fmb.embeddings import load_embeddings
    from fmb.errors import ConfigError
    from fmb.evaluation import views

    if k < 1:
        raise ConfigError(f"--k must be at least 1, got {k}")
    file = load_embeddings(embeddings)
    used, ids, cosines = views.similar_objects(file, views.parse_id(object_id, file.ids), column, k)
    items = views.read_objects(data, ids)
    texts = [["query"]] + [[f"#{i}", f"cosine = {c:.3f}"] for i, c in enumerate(cosines[1:], 1)]
    title = f"{embeddings.name} {used}: {ids[0]} and its {len(ids) - 1} nearest neighbours"
    typer.echo(f"wrote {views.gallery(items, texts, out, title, columns, highlight=0)}")


@app.command()
def doctor(paths: PathsOpt = None) -> None:
    """Check the installation: torch, devices, optional extras, externals and dataset paths."""
    import torch

    from fmb import __version__
    from fmb.externals import EXTERNALS, upstream_status
    from fmb.paths import find_paths_file

    typer.echo(f"fmb {__version__} | python {sys.version.split()[0]} | torch {torch.__version__}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            typer.echo(f"  cuda:{i} {props.name} {props.total_memory / 2**30:.0f} GiB (CUDA {torch.version.cuda})")
    else:
        typer.echo(f"  CUDA: not available; CPU threads {torch.get_num_threads()}")
    # extra -> (modules it provides, what it is for)
    extras = {"images": (("PIL",), "JPEG / filtered PNG images of real data"),
              "plots": (("matplotlib",), "figures of evaluate / detect / benchmark"),
              "parity": (("loralib", "aion"), "upstream parity tests (and astropt==2.0.9 with --no-deps)"),
              "eval": (("sklearn", "astropy", "umap"), "probes, FITS catalogues, UMAP"),
              "discovery": (("sklearn", "zuko", "faiss"), "anomaly scorers, flows, nearest neighbours"),
              "tensorboard": (("tensorboard",), "train.log_to: [tensorboard]"),
              "wandb": (("wandb",), "train.log_to: [wandb]"),
              "dev": (("pytest", "ruff"), "tests and lint")}
    for extra, (modules, purpose) in extras.items():
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        state = "installed" if not missing else f"MISSING {', '.join(missing)}: pip install 'fmb[{extra}]'"
        typer.echo(f"  extra {extra:<12} {state}  ({purpose})")
    for found in upstream_status():  # optional upstream code, for parity checks only
        directory = EXTERNALS[found.name].directory
        where = {"external": f"present: external/{directory}", "installed": f"installed: {found.path}",
                 "absent": f"absent (git submodule update --init external/{directory})"}[found.where]
        typer.echo(f"  upstream {found.name:<12} {where}")
    typer.echo(f"  models: {', '.join(family_names()) or 'none'}")
    found = find_paths_file(paths)
    typer.echo(f"  paths file: {found.file or 'none found'}")
    for name, value in found.resolved().items():
        state = "not set" if value is None else ("ok" if Path(value).exists() else "MISSING")
        typer.echo(f"    {name:<18} {state:<8} {value or ''}")
    from fmb.models.aion.pretrained import weights_report  # what the AION weight directories hold

    typer.echo("\n".join(f"  {line}" for line in weights_report(found.resolved())))


def main() -> None:
    from fmb.train.distributed import exit_process

    debug = "--debug" in sys.argv
    code: int | str | None = EXIT_OK
    try:
        app(prog_name="fmb")
    except SystemExit as exc:  # how typer ends every command
        code = exc.code
    except FmbError as exc:
        if debug:
            raise
        typer.echo(f"fmb: error: {exc}", err=True)
        code = exc.exit_code
    except KeyboardInterrupt:
        typer.echo("fmb: interrupted", err=True)
        code = EXIT_RUNTIME
    exit_process(code)
