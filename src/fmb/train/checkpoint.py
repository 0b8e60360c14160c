"""Checkpoint directories: `<out>/checkpoints/step_NNNNNNN/`.

Each holds `model.safetensors` (clean keys, no `module.` / `_orig_mod.`), `trainer_state.pt`
(optimizer, schedule, scaler, counters, per-rank RNG states; plain types only, so it loads
with `torch.load(weights_only=True)`), `config.yaml` and `meta.json` (family, step, metrics).
A directory is written under a temporary name and renamed when complete, so a crash never
leaves a directory that looks complete; resume also checks that every file is present.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fmb.errors import CheckpointError

MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
REQUIRED_FILES = (MODEL_FILE, STATE_FILE, CONFIG_FILE, META_FILE)
_STEP_DIR = re.compile(r"^step_(\d{7,})$")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def step_dirname(step: int) -> str:
    return f"step_{step:07d}"


def clean_key(key: str) -> str:
    """Strip DDP (`module.`) and torch.compile (`_orig_mod.`) wrappers, wherever they sit."""
    parts = [p for p in key.split(".") if p not in ("module", "_orig_mod")]
    return ".".join(parts)


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = clean_key(key) if key.startswith(_WRAPPER_PREFIXES) or "._orig_mod." in key else key
        out[new] = value
    return out


def save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Save CPU-contiguous copies; tensors sharing storage (tied weights) are stored separately."""
    seen: set[tuple[int, int]] = set()
    tensors = {}
    for key, value in clean_state_dict(state).items():
        value = value.detach().to("cpu").contiguous()
        ident = (value.untyped_storage().data_ptr(), value.storage_offset())
        if ident in seen:
            value = value.clone()
        seen.add(ident)
        tensors[key] = value
    save_file(tensors, str(path), metadata=metadata)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"missing weights file {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load every key with its exact shape, or fail listing every mismatch."""
    model.load_state_dict(check_state_fits(model, state, source), strict=True)


def check_state_fits(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The state dict with clean keys, if every key and shape matches the model; else an error
    listing every mismatch. (Shapes are global shapes, also for sharded models.)"""
    state = clean_state_dict(state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        lines = [f"{source} does not fit the model:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
            if items:
                shown = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
                lines.append(f"  {title} keys: {shown}")
        raise CheckpointError("\n".join(lines))
    return state


def write_converted(out: Path, family: str, model: nn.Module, config: Any, step: int = 0, **meta: Any) -> Path:
    """An fmb checkpoint directory from converted upstream weights: model.safetensors, config.yaml
    and meta.json (no trainer state: it starts runs via model.init_from, it does not resume them)."""
    from fmb import __version__
    from fmb.config import to_yaml

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(model.state_dict(), out / MODEL_FILE, {"fmb_family": family, "step": str(step)})
    (out / CONFIG_FILE).write_text(to_yaml(config))
    record = {"family": family, "step": step, "fmb_version": __version__, **meta}
    (out / META_FILE).write_text(json.dumps(record, indent=1))
    return out


def read_config(directory: Path, cls: type, sets: list[str] | tuple[str, ...] = ()) -> Any:
    """A checkpoint's config.yaml as the family's config dataclass, with `--set` overrides on top."""
    from fmb.config import ConfigLayers, build, parse_set_option

    layers = ConfigLayers()
    layers.add_file(Path(directory) / CONFIG_FILE)
    for option in sets:
        layers.set(*parse_set_option(option), source=f"--set {option}")
    return build(cls, layers)


def read_meta(directory: Path) -> dict[str, Any]:
    path = directory / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not an fmb checkpoint directory (no {META_FILE})")
    return json.loads(path.read_text())


def check_family(directory: Path, family: str) -> dict[str, Any]:
    meta = read_meta(directory)
    if meta.get("family") != family:
        raise CheckpointError(
            f"{directory} is a checkpoint of the '{meta.get('family')}' family, not '{family}'"
        )
    return meta


def is_complete(directory: Path) -> bool:
    return directory.is_dir() and all((directory / name).is_file() for name in REQUIRED_FILES)


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoint directories under `<run_dir>/checkpoints`, oldest first."""
    root = run_dir / "checkpoints"
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and is_complete(child):
                found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def find_checkpoint(path: Path) -> Path:
    """A checkpoint directory itself, or in a run directory the best one (else the newest)."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    best = path / "checkpoints" / "best.json"
    if best.is_file():
        candidate = path / "checkpoints" / json.loads(best.read_text())["dir"]
        if (candidate / META_FILE).is_file():
            return candidate
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"no fmb checkpoint at {path} (expected meta.json there, or a run directory with checkpoints/)")
    return latest


class CheckpointWriter:
    """Writes step directories atomically and applies retention (last K plus the best)."""

    def __init__(self, run_dir: Path, keep_last: int) -> None:
        self.root = run_dir / "checkpoints"
        self.keep_last = keep_last
        self.best_step: int | None = None

    def tmp_dir(self, step: int) -> Path:
        return self.root / f".tmp-{step_dirname(step)}"

    def begin(self, step: int) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_dir(step)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        return tmp

    def commit(self, tmp: Path, step: int) -> Path:
        final = self.root / step_dirname(step)
        if final.exists():
            shutil.rmtree(final)
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as handle:
                    os.fsync(handle.fileno())
        os.replace(tmp, final)
        self._prune()
        return final

    def mark_best(self, step: int, metric: str, value: float) -> None:
        self.best_step = step
        record = {"step": step, "metric": metric, "value": value, "dir": step_dirname(step)}
        tmp = self.root / ".best.json.tmp"
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, self.root / "best.json")

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        steps = [s for s, _ in list_checkpoints(self.root.parent)]
        for step in steps[: max(0, len(steps) - self.keep_last)]:
            if step != self.best_step:
                shutil.rmtree(self.root / step_dirname(step), ignore_errors=True)


# ----------------------------------------------------------------------------- RNG state


def capture_rng() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states as weights_only-safe values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((
        "MT19937",
        np_state["keys"].numpy().astype(np.uint32),
        np_state["pos"],
        np_state["has_gauss"],
        np_state["cached_gaussian"],
    ))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value
