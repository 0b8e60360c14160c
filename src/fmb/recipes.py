"""Assemble a run's configuration: recipe, demo overlay, --config files, flags, --set.

Later sources win: `configs/retrain/<model>.yaml`, `configs/demo/<model>.yaml` (with --demo),
each `--config FILE`, the common flags (--out, --lr, ...), then every `--set key=value`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmb.config import ConfigLayers, build, parse_set_option
from fmb.errors import ConfigError
from fmb.paths import PathsFile, configs_dir, find_paths_file

# Common command-line flags and the config keys they set.
FLAG_KEYS = {
    "out": "train.out",
    "max_steps": "train.max_steps",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "lr": "train.optim.lr",
    "device": "train.device",
    "seed": "train.seed",
}


@dataclass
class RunRequest:
    model: str
    config_files: list[str]
    sets: list[str]
    flags: dict[str, Any]
    demo: bool = False
    paths: str | None = None


def recipe_files(model: str, demo: bool) -> list[Path]:
    root = configs_dir()
    files = [root / "retrain" / f"{model}.yaml"]
    if demo:
        demo_file = root / "demo" / f"{model}.yaml"
        if not demo_file.is_file():
            raise ConfigError(f"model '{model}' has no demo recipe ({demo_file})")
        files.append(demo_file)
    return [f for f in files if f.is_file()]


def load_run_config(request: RunRequest, config_cls: type) -> tuple[Any, PathsFile]:
    """The typed config of a run, and the paths file that resolved its `${paths.*}` references."""
    paths = find_paths_file(request.paths)
    layers = ConfigLayers()
    for path in recipe_files(request.model, request.demo):
        layers.add_file(path)
    for path in request.config_files:
        layers.add_file(path)
    for name, value in request.flags.items():
        if value is not None:
            layers.set(FLAG_KEYS[name], value, f"--{name.replace('_', '-')}")
    for option in request.sets:
        key, value = parse_set_option(option)
        layers.set(key, value, f"--set {option}")
    hint = "" if request.demo else " Or add --demo to train on built-in synthetic data."
    config = build(config_cls, layers, paths.resolved(), str(paths.file) if paths.file else None, hint)
    if config.train.out is None:
        runs = paths.resolved().get("runs") or "runs"
        config.train.out = str(Path(runs) / (f"{request.model}-demo" if request.demo else request.model))
    return config, paths
