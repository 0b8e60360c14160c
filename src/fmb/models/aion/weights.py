"""Reading and writing AION image-codec weights on local disk (never the network).

Layouts found from the directory a user names (`paths_local.yaml: aion_codec`):
- the codec directory itself: `<dir>/config.json` + `<dir>/model.safetensors`;
- the hub layout of `polymathic-ai/aion-base`: `<dir>/codecs/image/{config.json,model.safetensors}`;
- an offline HuggingFace cache: `<dir>` is the cache (or its `hub/`) or the `models--polymathic-ai--aion-base`
  folder; the snapshot named by `refs/main`, else the newest snapshot, is used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from fmb.errors import CheckpointError, ConfigError
from fmb.models.aion.model import AionImageCodec, CodecConfig
from fmb.train import checkpoint as ckpt

log = logging.getLogger("fmb")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
HUB_SUBDIR = Path("codecs") / "image"
HUB_CACHE_NAME = "models--polymathic-ai--aion-base"
PATHS_KEY = "aion_codec"
# fmb name -> upstream name (the only key that differs)
UPSTREAM_KEYS = {"quantizer.levels": "_quantizer.levels"}
STANDIN_MARK = "standin.json"  # written by fmb.models.aion.standin next to a stand-in's weights


def _snapshots(cache_model_dir: Path) -> list[Path]:
    """Snapshots of one cached hub model, the one `refs/main` names first."""
    snapshots = cache_model_dir / "snapshots"
    if not snapshots.is_dir():
        return []
    ordered = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    ref = cache_model_dir / "refs" / "main"
    if ref.is_file():
        named = snapshots / ref.read_text().strip()
        ordered = [named] + [p for p in ordered if p != named]
    return ordered


def hub_roots(root: Path) -> list[Path]:
    """`root` and the snapshots of polymathic-ai/aion-base when `root` is (or holds) an offline HuggingFace cache."""
    out = [root]
    for model_dir in (root, root / HUB_CACHE_NAME, root / "hub" / HUB_CACHE_NAME):
        out += _snapshots(model_dir)
    return out


def candidate_dirs(root: Path) -> list[Path]:
    """Directories that may hold config.json + model.safetensors, in the order they are tried: the hub layout
    first, since its root holds the transformer's config.json + model.safetensors."""
    return [hub / HUB_SUBDIR for hub in hub_roots(root)] + [root]


def find_codec_dir(path: str | Path) -> Path:
    root = Path(path).expanduser()
    if not root.exists():
        raise CheckpointError(f"AION codec path {root} does not exist (paths_local.yaml: {PATHS_KEY})")
    if root.is_file():  # pointed at config.json or model.safetensors itself
        root = root.parent
    searched = candidate_dirs(root)
    for directory in searched:
        if (directory / CONFIG_NAME).is_file() and (directory / WEIGHTS_NAME).is_file():
            return directory
    listed = "\n  ".join(str(d) for d in searched)
    raise CheckpointError(
        f"no AION image codec ({CONFIG_NAME} + {WEIGHTS_NAME}) found under {root}. Looked in:\n  {listed}\n"
        f"Copy `codecs/image/` of polymathic-ai/aion-base there and point paths_local.yaml: {PATHS_KEY} at it."
    )


def read_json_object(file: Path, what: str) -> dict:
    """The JSON object in `file` (a config.json of AION weights), or a CheckpointError saying what is wrong."""
    try:
        raw = json.loads(Path(file).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read the {what} config {file}: {exc}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: expected a JSON object of {what} settings")
    return raw


def read_codec_config(file: Path) -> CodecConfig:
    raw = read_json_object(file, "image-codec")
    known = {f.name: f for f in dataclasses.fields(CodecConfig)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise CheckpointError(f"{file}: unknown image-codec settings {unknown}; known: {', '.join(known)}")
    if "quantizer_levels" not in raw:
        raise CheckpointError(f"{file}: quantizer_levels is missing")
    cfg = CodecConfig(**raw)
    for name, spec in known.items():
        value = getattr(cfg, name)
        if name == "quantizer_levels":
            ok = isinstance(value, list) and all(isinstance(v, int) for v in value)
        else:
            ok = isinstance(value, int if spec.type == "int" else (int, float)) and not isinstance(value, bool)
        if not ok:
            raise CheckpointError(f"{file}: {name} has an invalid value {value!r}")
    try:
        cfg.check()
    except ValueError as exc:
        raise CheckpointError(f"{file}: {exc}") from None
    return cfg


def load_codec(path: str | Path) -> AionImageCodec:
    """Build the codec from `config.json` and load `model.safetensors` strictly (every key, every shape)."""
    directory = find_codec_dir(path)
    cfg = read_codec_config(directory / CONFIG_NAME)
    codec = AionImageCodec(cfg)
    state = ckpt.read_safetensors(directory / WEIGHTS_NAME)
    from_upstream = {up: fmb for fmb, up in UPSTREAM_KEYS.items()}
    state = {from_upstream.get(key, key): value for key, value in state.items()}
    ckpt.load_state_strict(codec, state, f"{directory / WEIGHTS_NAME} (with {directory / CONFIG_NAME})")
    levels = codec.quantizer.levels.tolist()
    if levels != list(cfg.quantizer_levels):
        raise CheckpointError(f"{directory}: the weights' quantizer levels {levels} differ from config.json's "
                              f"quantizer_levels {cfg.quantizer_levels}")
    if (directory / STANDIN_MARK).is_file():
        log.warning(f"{directory} is a stand-in codec pretrained on synthetic HSC cutouts (see its {STANDIN_MARK}), "
                    "not the published AION weights")
    else:
        log.info(f"AION image codec loaded from {directory}")
    return codec


def save_codec(codec: AionImageCodec, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write config.json + model.safetensors with upstream key names (loadable by fmb and polymathic-aion);
    `state`: the codec's full state where the module holds shards (FSDP)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(codec.cfg), indent=2))
    state = {UPSTREAM_KEYS.get(k, k): v for k, v in (codec.state_dict() if state is None else state).items()}
    ckpt.save_safetensors(state, directory / WEIGHTS_NAME, {"format": "pt"})
    return directory


def require_codec_source(path: str | None, random_init: bool) -> None:
    if not path and not random_init:
        raise ConfigError(
            f"model.codec.path is not set: set `{PATHS_KEY}:` in paths_local.yaml to the directory holding the AION "
            "image codec (config.json + model.safetensors, the hub layout codecs/image/, or an offline HuggingFace "
            "cache), or set model.codec.random_init=true for a demo/test run with an untrained codec"
        )


def build_codec(path: str | None, random_init: bool, random_cfg: CodecConfig) -> AionImageCodec:
    """The codec from `path`, or (random_init) an untrained one of shape `random_cfg`."""
    if path:
        return load_codec(path)
    require_codec_source(path, random_init)
    log.warning("!" * 80)
    log.warning("AION image codec: RANDOM WEIGHTS (model.codec.random_init=true). Results are meaningless for "
                "science; use it only for demos and tests.")
    log.warning("!" * 80)
    return AionImageCodec(random_cfg)
