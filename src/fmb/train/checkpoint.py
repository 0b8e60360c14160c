"""Checkpoint directories: `<out>/checkpoints/step_NNNNNNN/`.

Each holds `model.safetensors` (clean keys, no `module.` / `_orig_mod.`), `trainer_state.pt`
(optimizer, schedule, scaler, counters, per-rank RNG states; plain types only, so it loads
with `torch.load(weights_only=True)`), `config.yaml` and `meta.json` (family, step, metrics).
A directory is written under a temporary name and renamed when complete, so a crash never
leaves a directory that looks complete; resume also checks that every file is present.
`meta.json` records the size and SHA-256 of every other file, so damage done later (a truncated
copy, a full disk during a transfer) is detected: resume then falls back to the previous complete
checkpoint with a warning naming the damaged one. The same state gives the same bytes, and files
follow the umask (readable by the group where the umask allows it).
"""

from __future__ import annotations

import hashlib
import json
import logging
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
log = logging.getLogger("fmb")
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
    """Save CPU-contiguous copies; tensors sharing storage (tied weights) are stored separately.

    Several metadata entries go in as one JSON entry: safetensors orders several entries differently
    in every process, which would make the same state give different bytes."""
    seen: set[tuple[int, int]] = set()
    tensors = {}
    for key, value in clean_state_dict(state).items():
        value = value.detach().to("cpu").contiguous()
        ident = (value.untyped_storage().data_ptr(), value.storage_offset())
        if ident in seen:
            value = value.clone()
        seen.add(ident)
        tensors[key] = value
    save_file(tensors, str(path), metadata=metadata if len(metadata) <= 1 else {"fmb": json.dumps(metadata, sort_keys=True)})
    os.chmod(path, 0o666 & ~_umask())  # safetensors creates the file 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_digests(directory: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file under `directory` but meta.json, by relative path."""
    out = {}
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file() and p.name != META_FILE):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        out[path.relative_to(directory).as_posix()] = {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}
    return out


def damage(directory: Path) -> str | None:
    """What is wrong with a checkpoint's files against the sizes and digests meta.json records;
    None when they match (or when meta.json predates the record and nothing can be checked)."""
    try:
        recorded = read_meta(directory).get("files")
    except (CheckpointError, ValueError) as exc:
        return str(exc)
    if not recorded:
        return None
    for name, expected in recorded.items():
        path = Path(directory) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {expected['bytes']} were written"
    actual = file_digests(directory)
    for name, expected in recorded.items():
        if actual[name]["sha256"] != expected["sha256"]:
            return f"{name} does not have the SHA-256 recorded when it was written"
    return None


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


def write_checkpoint(directory: Path, family: str, config: Any, model_state: dict[str, torch.Tensor], step: int,
                     trainer_state: dict[str, Any] | None = None, **meta: Any) -> Path:
    """The one place that decides what a checkpoint directory holds: model.safetensors, trainer_state.pt
    (training runs only), config.yaml, and meta.json (family, step, version, `meta`, and the size and
    SHA-256 of every other file in the directory, an FSDP optimizer/ folder included), written last."""
    from fmb import __version__
    from fmb.config import to_yaml

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(model_state, directory / MODEL_FILE, {"fmb_family": family, "step": str(step)})
    if trainer_state is not None:
        torch.save(trainer_state, directory / STATE_FILE)
    (directory / CONFIG_FILE).write_text(to_yaml(config))
    record = {"family": family, "step": step, "fmb_version": __version__, **meta, "files": file_digests(directory)}
    (directory / META_FILE).write_text(json.dumps(record, indent=1))
    return directory


def write_converted(out: Path, family: str, model: nn.Module, config: Any, step: int = 0, **meta: Any) -> Path:
    """An fmb checkpoint directory from converted upstream weights (no trainer state: it starts runs
    via model.init_from, it does not resume them)."""
    return write_checkpoint(Path(out), family, config, model.state_dict(), step, None, **meta)


def load_weights(model: nn.Module, source: str | Path, family: str, component: str | None = None,
                 exclude: tuple[str, ...] = (), subset: bool = False) -> Path:
    """The one weight loader (`model.init_from` and friends): `source` is a run directory (its best,
    else newest checkpoint) or a checkpoint directory; its family (and `component`, for converted
    parts such as an image backbone) must match; every key and shape must fit, except the keys
    starting with an `exclude` prefix, which keep the model's own values. With `subset`, the source
    may hold more than the model (a CLIP run initialising one classifier branch). Returns the directory."""
    directory = find_checkpoint(Path(source))
    meta = check_family(directory, family)
    if meta.get("component") != component:
        have = meta.get("component") or "a whole model"
        raise CheckpointError(f"{directory} holds {have}, not {component or 'a whole model'}")
    state = read_safetensors(directory / MODEL_FILE)
    if subset:
        wanted = set(model.state_dict())
        state = {k: v for k, v in clean_state_dict(state).items() if k in wanted}
    if exclude:
        own = {k: v for k, v in model.state_dict().items() if k.startswith(exclude)}
        state = {**{k: v for k, v in clean_state_dict(state).items() if not k.startswith(exclude)}, **own}
    load_state_strict(model, state, str(directory))
    return directory


def read_config(directory: Path, cls: type, sets: list[str] | tuple[str, ...] = (), family: str | None = None) -> Any:
    """A checkpoint's config.yaml as the family's config dataclass, with `--set` overrides on top
    (with `family`, the checkpoint's family is checked first, so another family's checkpoint is named
    as such rather than failing on its config keys)."""
    from fmb.config import ConfigLayers, build, parse_set_option

    if family is not None:
        check_family(Path(directory), family)
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


def resumable_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint whose files are intact; damaged newer ones are named in a warning."""
    for _, directory in reversed(list_checkpoints(run_dir)):
        problem = damage(directory)
        if problem is None:
            return directory
        log.warning(f"checkpoint {directory} is damaged ({problem}); falling back to the previous one")
    return None


def find_checkpoint(path: Path) -> Path:
    """A checkpoint directory itself, or in a run directory the best one (else the newest); a
    damaged one is refused, naming it and what is wrong."""
    path = Path(path)
    directory = None
    if (path / META_FILE).is_file():
        directory = path
    best = path / "checkpoints" / "best.json"
    if directory is None and best.is_file():
        candidate = path / "checkpoints" / json.loads(best.read_text())["dir"]
        if (candidate / META_FILE).is_file():
            directory = candidate
    directory = directory or latest_checkpoint(path)
    if directory is None:
        raise CheckpointError(f"no fmb checkpoint at {path} (expected meta.json there, or a run directory with checkpoints/)")
    problem = damage(directory)
    if problem is not None:
        others = [d.name for _, d in list_checkpoints(directory.parent.parent) if d != directory]
        hint = f"; pass one of {', '.join(others)} explicitly" if others else ""
        raise CheckpointError(f"checkpoint {directory} is damaged ({problem}){hint}")
    return directory


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


class Checkpointer:
    """Saves and restores a training run: the model's full weights, the optimizer (in trainer_state.pt,
    or sharded under optimizer/ with FSDP), a set of stateful objects (anything with `state_dict` /
    `load_state_dict`, stored under its name in trainer_state.pt) and every rank's RNG state.
    Every rank calls `save` and `restore` (they hold collectives); rank 0 writes the files."""

    def __init__(self, run_dir: Path, keep_last: int, dist: Any, parallel_kind: str) -> None:
        self.run_dir = Path(run_dir)
        self.writer = CheckpointWriter(self.run_dir, keep_last)
        self.dist, self.kind = dist, parallel_kind

    def save(self, step: int, family: str, config: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
             stateful: dict[str, Any], best: dict[str, Any] | None, **meta: Any) -> Path:
        """Write `step_NNNNNNN/` atomically; `best` (metric, value) marks it the best checkpoint."""
        from fmb.train import parallel
        from fmb.train.distributed import barrier, gather_objects

        rng_states = gather_objects(capture_rng(), self.dist)
        model_state = parallel.full_model_state(model, self.kind, self.dist)  # a collective under FSDP
        if self.dist.is_main:
            self.writer.begin(step)
        barrier(self.dist)
        tmp = self.writer.tmp_dir(step)
        optimizer_state = parallel.save_optimizer(model, optimizer, self.kind, self.dist, tmp)
        barrier(self.dist)
        final = self.writer.root / step_dirname(step)
        if self.dist.is_main:
            state = {name: obj.state_dict() for name, obj in stateful.items()}
            state.update(world_size=self.dist.world_size, optimizer=optimizer_state, rng=rng_states)
            write_checkpoint(tmp, family, config, model_state, step, state, world_size=self.dist.world_size,
                             parallel=self.kind, **meta)
            if best is not None:
                self.writer.best_step = step
            self.writer.commit(tmp, step)
            if best is not None:
                self.writer.mark_best(step, best["metric"], best["value"])
        barrier(self.dist)
        return final

    def restore(self, family: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                stateful: dict[str, Any]) -> tuple[Path, bool] | None:
        """Load the newest intact checkpoint into the model, the optimizer and the stateful objects; the
        run's configured optimizer hyper-parameters win over the saved ones. Returns (directory, whether
        the RNG states were restored, i.e. the world size is the one saved), or None without checkpoints."""
        from fmb.train import parallel
        from fmb.train.distributed import gather_objects

        choice = resumable_checkpoint(self.run_dir) if self.dist.is_main else None
        directory = gather_objects(choice, self.dist)[0]  # rank 0 checks the digests once for everyone
        if directory is None:
            return None
        check_family(directory, family)
        weights = check_state_fits(model, read_safetensors(directory / MODEL_FILE), str(directory))
        parallel.load_model_state(model, weights, self.kind, self.dist)
        try:
            state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as exc:  # a corrupt file must stop the run, never start it afresh
            raise CheckpointError(f"cannot read {directory / STATE_FILE}: {exc}") from exc
        configured = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        parallel.load_optimizer(model, optimizer, self.kind, self.dist, directory, state["optimizer"])
        _reapply_hyperparameters(optimizer, configured)
        for name, obj in stateful.items():
            obj.load_state_dict(state[name])
        same_world = state["world_size"] == self.dist.world_size
        if same_world:
            restore_rng(state["rng"][self.dist.rank])
        return directory, same_world


def _reapply_hyperparameters(optimizer: torch.optim.Optimizer, configured: list[dict[str, Any]]) -> None:
    """Loading an optimizer state restores the saved lr, weight decay, betas and eps; the
    configuration of this run wins (lowering the lr before a requeue must take effect)."""
    for group, wanted in zip(optimizer.param_groups, configured, strict=True):
        for key in ("base_lr", "lr", "weight_decay", "betas", "eps"):
            if key in wanted and group.get(key) != wanted[key]:
                if key != "lr":
                    log.info(f"resume: {group.get('name', 'group')} {key} {group.get(key)} -> {wanted[key]} (from the config)")
                group[key] = wanted[key]


# ----------------------------------------------------------------------------- upstream checkpoints

# What any pickled checkpoint may rebuild: tensors, plain containers and NumPy scalars / arrays.
_PLAIN_GLOBALS = {
    ("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("torch", "Size"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "slice"), ("_codecs", "encode"), ("numpy", "dtype"), ("numpy", "ndarray"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    *((f"numpy{sub}.dtypes", f"{kind}DType") for sub in ("", "._core") for kind in ("Float32", "Float64", "Int64", "Int32", "Bool")),
    *(("numpy.dtypes", f"{kind}DType") for kind in ("Float16", "UInt8")),
}


class Inert(dict):
    """Stands in for a pickled class or function the reader does not trust: it accepts calls, items
    and state (kept as attributes), and runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.args = args

    def __call__(self, *args: Any, **kwargs: Any) -> Inert:
        return Inert(*args)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state

    def append(self, item: Any) -> None:
        self.setdefault("_items", []).append(item)

    def extend(self, items: Any) -> None:
        self.setdefault("_items", []).extend(items)


def read_foreign(path: Path, allowed: dict[tuple[str, str], type] | None = None, unknown: str = "refuse") -> Any:
    """An upstream checkpoint file, read under one safe-unpickling policy: a `.safetensors` file as
    tensors; a pickle (`torch.save`) rebuilding only tensors, plain containers, NumPy values and the
    `allowed` (module, name) classes, mapped to fmb's stand-ins. Any other class or function is
    refused (`unknown="refuse"`: CheckpointError) or becomes an `Inert` placeholder (`"inert"`, for
    checkpoints that pickle training-framework objects next to the weights). Nothing in the file
    runs, and no upstream package is needed."""
    import pickle
    import types

    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    allowed = allowed or {}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) in _PLAIN_GLOBALS:
                return super().find_class(module, name)
            if (module, name) in allowed:
                return allowed[(module, name)]
            if unknown == "inert":
                return type(name, (Inert,), {"__module__": f"inert.{module}"})
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in this checkpoint")

    module = types.SimpleNamespace(Unpickler=Unpickler, __name__="fmb_safe_pickle",
                                   load=lambda f, **kw: Unpickler(f, **kw).load())
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=module)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused to unpickle: {exc}") from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None


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
