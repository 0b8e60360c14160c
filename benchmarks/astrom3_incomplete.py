"""What incomplete catalogues cost AstroM3's classifiers, on synthetic data: validation accuracy
of each mode on complete data beside the same mode with modalities or catalogue values missing,
plus the effect of phase-folded light curves and of the 4 photometric features.

Every case trains the demo recipe's model from scratch for `--steps` steps on `--objects`
synthetic objects (the same objects in every case: the missing-value masks have their own random
stream), for each of `--seeds` training seeds, and reports the validation accuracy at the last
step, mean +- standard deviation over seeds.

Each invocation writes its data and runs into a new numbered folder under `--out` (001, 002, ...),
so running again into the same `--out` trains afresh on freshly written data and prints the same
table as a first run would, whatever options the earlier runs had.

    python benchmarks/astrom3_incomplete.py --out /tmp/a3missing
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from steps import fresh_folder, parse_with_threads

from fmb.models import write_synthetic
from fmb.models.astrom3.trainer import AstroM3Trainer
from fmb.recipes import RunRequest, load_run_config

# name -> (mode, synthetic missing rates, extra settings, drop the metadata column from the files)
CASES: dict[str, tuple[str, dict[str, float], list[str], bool]] = {
    "photo, complete": ("photo", {}, [], False),
    "photo, no spectra, 30% catalogue values missing": ("photo", {"spectra": 1.0, "metadata": 0.3}, [], False),
    "photo, phase-folded light curves": ("photo", {}, ["data.phased=true"], False),
    "photo, without the photometric features": ("photo", {}, [], True),
    "meta, complete": ("meta", {}, [], False),
    "meta, 30% catalogue values missing": ("meta", {"metadata": 0.3}, [], False),
    "all, complete": ("all", {}, [], False),
    "all, 20% light curves, 50% spectra, 30% catalogue values missing":
        ("all", {"photometry": 0.2, "spectra": 0.5, "metadata": 0.3}, [], False),
}


def dataset(root: Path, objects: int, seed: int, missing: dict[str, float], drop_metadata: bool) -> Path:
    """The synthetic files of one case, under this invocation's folder: written once, shared by the cases
    that read the same files."""
    name = "_".join(f"{k}{v:g}" for k, v in sorted(missing.items())) or "complete"
    path = root / (f"{name}_nometa" if drop_metadata else name)
    if not path.is_dir():
        write_synthetic("astrom3", path, objects, seed, missing=missing)
        if drop_metadata:
            for file in path.glob("*.parquet"):
                table = pq.read_table(file)
                pq.write_table(table.drop_columns(["metadata"]), file)
    return path


def final_accuracy(out: Path, data: Path, mode: str, steps: int, seed: int, extra: list[str]) -> float:
    sets = [f"data.path={data}", f"model.mode={mode}", f"train.seed={seed}", f"train.max_steps={steps}",
            f"train.eval_every={steps}", f"train.log_every={steps}", f"train.checkpoint.every={steps}",
            "train.checkpoint.keep_last=1", "train.checkpoint.best_metric=val/accuracy", "train.checkpoint.best_mode=max",
            "train.eval_at_start=false", *extra]
    config, _ = load_run_config(RunRequest(model="astrom3", config_files=[], sets=sets, flags={"out": str(out)},
                                           demo=True), AstroM3Trainer.config_cls)
    config.train.progress = False
    return float(AstroM3Trainer(config).fit().metrics["val/accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/astrom3-incomplete"))
    parser.add_argument("--objects", type=int, default=1200)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per case")
    args = parse_with_threads(parser)
    start = time.perf_counter()
    root = fresh_folder(args.out)
    print(f"synthetic AstroM3, {args.objects} objects, {args.steps} steps from scratch, validation accuracy at the "
          f"last step over training seeds {args.seed}..{args.seed + args.seeds - 1} (data and runs in {root})")
    print("| case | validation accuracy | per seed |\n|---|---|---|")
    for i, (name, (mode, missing, extra, drop_metadata)) in enumerate(CASES.items()):
        data = dataset(root / "data", args.objects, args.seed, missing, drop_metadata)
        values = np.array([final_accuracy(root / f"case{i}_seed{seed}", data, mode, args.steps, seed, extra)
                           for seed in range(args.seed, args.seed + args.seeds)])
        print(f"| {name} | {values.mean():.3f} +- {values.std():.3f} | {', '.join(f'{v:.3f}' for v in values)} |",
              flush=True)
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
