"""Check AstroM3's claim on synthetic data: with few labels, photometry classification
fine-tuned from CLIP pre-training beats the same classifier trained from scratch.

Steps: write synthetic AstroM3 data; CLIP-pretrain on every training object (no labels);
fine-tune `model.mode=photo` on `--label-fraction` of the training labels from the CLIP
checkpoint and from scratch, with identical settings, for each of `--seeds` fine-tuning seeds;
report the test accuracy and macro-F1 of each run's best validation checkpoint, and their
means. Uses the demo recipe's small model.

The data and the CLIP run live in a folder under `--out` named by every option they depend on
(`--objects`, `--seed`, `--clip-steps`) and are reused by a later invocation with the same ones (an
interrupted CLIP run is resumed); the fine-tuning runs of each invocation go to a new numbered
folder under `--out` (001, 002, ...), so other labels or seeds can be tried on the same CLIP run.

    python benchmarks/astrom3_paper_claim.py --out runs/astrom3-claim
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from steps import fresh_folder, parse_with_threads

from fmb.models import get_family, write_synthetic
from fmb.models.astrom3.trainer import AstroM3Trainer, classification_metrics
from fmb.recipes import RunRequest, load_run_config
from fmb.train.checkpoint import step_dirname
from fmb.train.embed import EmbedOptions, run_embed


def train(out: Path, sets: list[str], resume: bool = False) -> Path:
    config, _ = load_run_config(RunRequest(model="astrom3", config_files=[], sets=sets, flags={"out": str(out)},
                                           demo=True), AstroM3Trainer.config_cls)
    config.train.progress = False
    AstroM3Trainer(config).fit(resume=resume)
    return out


def test_scores(run: Path, data: Path, classes: list[str]) -> dict[str, float]:
    result = run_embed(get_family("astrom3"), run, run / "test_embeddings.parquet",
                       EmbedOptions(data=str(data), split="test", device="cpu"))
    table = pq.read_table(result.out)
    index = {c: i for i, c in enumerate(classes)}
    confusion = np.zeros((len(classes), len(classes)))
    for true, pred in zip(table.column("label").to_pylist(), table.column("predicted").to_pylist(), strict=True):
        confusion[index[true], index[pred]] += 1
    scores = classification_metrics(confusion, classes)
    return {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/astrom3-claim"))
    parser.add_argument("--objects", type=int, default=2000)
    parser.add_argument("--label-fraction", type=float, default=0.1)
    parser.add_argument("--clip-steps", type=int, default=300)
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0, help="data and CLIP seed")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per arm")
    args = parse_with_threads(parser)
    start = time.perf_counter()

    shared = args.out / f"clip_{args.objects}objects_seed{args.seed}_{args.clip_steps}steps"
    data = shared / "data"
    if not data.is_dir():  # written under another name first: a half-written folder is never reused
        partial = shared / "data.partial"
        shutil.rmtree(partial, ignore_errors=True)
        write_synthetic("astrom3", partial, args.objects, args.seed)
        partial.rename(data)
    common = [f"data.path={data}", f"train.seed={args.seed}"]
    clip = shared / "clip"
    if not (clip / "checkpoints" / step_dirname(args.clip_steps)).is_dir():  # reuse a finished CLIP run
        train(clip, [*common, f"train.max_steps={args.clip_steps}", f"train.checkpoint.every={args.clip_steps}"],
              resume=True)
    finetune_root = fresh_folder(args.out)
    finetune = [f"data.path={data}", "model.mode=photo", f"data.label_fraction={args.label_fraction}",
                "train.batch_size=32", f"train.max_steps={args.finetune_steps}", "train.eval_every=15",
                "train.log_every=15", "train.checkpoint.every=15", "train.checkpoint.keep_last=1",
                "train.checkpoint.best_metric=val/accuracy", "train.checkpoint.best_mode=max"]
    classes = AstroM3Trainer.config_cls().data.classes
    arms = {"from_scratch": [], "clip_pretrained": [f"model.init_from={clip}"]}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in arms}
    for seed in range(args.seed, args.seed + args.seeds):
        for name, extra in arms.items():
            run = train(finetune_root / f"{name}_seed{seed}", [*finetune, *extra, f"train.seed={seed}"])
            scores = test_scores(run, data, classes)
            scores["best_val_accuracy"] = json.loads((run / "checkpoints" / "best.json").read_text())["value"]
            results[name].append(scores)
    elapsed = time.perf_counter() - start

    n_labels = len(pq.read_table(data / "train-00000-of-00001.parquet", columns=["label"]))
    print(f"synthetic AstroM3, {args.objects} objects, photometry classifier on {args.label_fraction:.0%} of "
          f"{n_labels} training labels, CLIP {args.clip_steps} steps, fine-tune {args.finetune_steps} steps, "
          f"{args.seeds} seeds, {elapsed:.0f} s (CLIP run in {clip}, fine-tuning runs in {finetune_root})")
    for name, runs in results.items():
        for key in ("accuracy", "macro_f1", "best_val_accuracy"):
            values = np.array([r[key] for r in runs])
            label = {"accuracy": "test accuracy", "macro_f1": "test macro-F1", "best_val_accuracy": "best val accuracy"}[key]
            print(f"  {name:<16} {label:<18} mean {values.mean():.3f} +- {values.std():.3f}  "
                  f"({', '.join(f'{v:.3f}' for v in values)})")
    gains = np.array([c["accuracy"] - s["accuracy"] for c, s in zip(results["clip_pretrained"], results["from_scratch"], strict=True)])
    print(f"  CLIP minus scratch, test accuracy: mean {gains.mean():+.3f} (per seed {', '.join(f'{g:+.3f}' for g in gains)})")


if __name__ == "__main__":
    main()
