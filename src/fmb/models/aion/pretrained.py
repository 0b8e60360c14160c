"""The AION model directory on local disk: the transformer and the codecs it needs, read without
`polymathic-aion` (and never from the network).

Layout, as polymathic-ai/aion-base is published and as 0.0.2's own `save_pretrained` writes it:
  <dir>/config.json, <dir>/model.safetensors                 the transformer (`paths_local.yaml: aion_model`)
  <dir>/codecs/spectrum/{config.json,model.safetensors}      the DESI / SDSS spectrum codec
  <dir>/codecs/Z/{config.json,model.safetensors}             the redshift codec
  <dir>/codecs/image/...                                     the image codec (fmb.models.aion.weights)
`<dir>` may also be an offline HuggingFace cache holding that repository (the snapshot `refs/main` names,
else the newest). Loading is strict: unknown settings, missing or unexpected weights and shape mismatches
are listed in one error, as are a size other than the one asked for and codecs whose vocabulary does not
fit the transformer's (codec and transformer from different releases).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_model

from fmb.config import ConfigLayers, build
from fmb.errors import CheckpointError, ConfigError
from fmb.models.aion.model import CROP, AionImageCodec
from fmb.models.aion.redshift import OLDER_KEYS, UPSTREAM_KEYS, RedshiftCodec, RedshiftCodecConfig
from fmb.models.aion.spectrum import (
    SpectrumCodec,
    SpectrumCodecConfig,
    from_upstream_key,
    to_upstream_key,
)
from fmb.models.aion.standin import write_once
from fmb.models.aion.transformer import (
    IMAGE_HSC,
    MODALITIES,
    PRESETS,
    REDSHIFT,
    SIZE_KEYS,
    SPECTRUM_DESI,
    AionTransformer,
    TransformerConfig,
    preset_config,
    preset_name,
)
from fmb.models.aion.weights import (
    CONFIG_NAME,
    STANDIN_MARK,
    WEIGHTS_NAME,
    find_codec_dir,
    hub_roots,
    read_codec_config,
    read_json_object,
)
from fmb.train import checkpoint as ckpt

log = logging.getLogger("fmb")

PATHS_KEY = "aion_model"
SPECTRUM_DIR = Path("codecs") / "spectrum"
REDSHIFT_DIR = Path("codecs") / "Z"
STANDIN_DOMAINS = [IMAGE_HSC, SPECTRUM_DESI, REDSHIFT]
# The demo stand-in's spectrum codec: upstream's shape, much narrower.
DEMO_SPECTRUM = SpectrumCodecConfig(encoder_depths=(1, 1, 1, 1), encoder_dims=(8, 16, 32, 64), decoder_depths=(1, 1, 1, 1),
                                    decoder_dims=(32, 16, 8, 1), latent_channels=64, embedding_dim=10)
DOWNLOAD = ("huggingface-cli download polymathic-ai/aion-base config.json model.safetensors "
            "codecs/image/config.json codecs/image/model.safetensors codecs/spectrum/config.json "
            "codecs/spectrum/model.safetensors codecs/Z/config.json codecs/Z/model.safetensors --local-dir DIR")


@dataclass
class AionModel:
    """The transformer and the codecs of the modalities it takes (None where it takes none)."""

    directory: Path
    transformer: AionTransformer
    spectrum: SpectrumCodec | None
    redshift: RedshiftCodec | None
    standin: bool

    def to(self, device: torch.device) -> AionModel:
        for part in (self.transformer, self.spectrum, self.redshift):
            if part is not None:
                part.to(device).eval()
        return self


# ----------------------------------------------------------------------------- reading


def find_model_dir(path: str | Path) -> Path:
    """The directory holding the transformer's config.json + model.safetensors under `path`."""
    root = Path(path).expanduser()
    if not root.exists():
        raise CheckpointError(f"AION model path {root} does not exist (model.transformer.path, or paths_local.yaml: {PATHS_KEY})")
    searched = hub_roots(root)
    for directory in searched:
        if (directory / CONFIG_NAME).is_file() and (directory / WEIGHTS_NAME).is_file():
            return directory
    listed = "\n  ".join(str(d) for d in searched)
    raise CheckpointError(f"no AION transformer ({CONFIG_NAME} + {WEIGHTS_NAME}) under {root}. Looked in:\n  {listed}\n"
                          f"Download it on a login node: {DOWNLOAD} (docs/aion.md)")


def read_json_config(file: Path, cls: type, what: str):
    """A config dataclass from a JSON file, every key and type checked (fmb.config's schema rules)."""
    layers = ConfigLayers()
    layers.add(read_json_object(file, what), str(file))
    try:
        return build(cls, layers)
    except ConfigError as exc:
        raise CheckpointError(f"{file} is not an {what} config.json: {exc}") from None


def check_size(cfg: TransformerConfig, size: str | None, source: Path) -> None:
    """A CheckpointError naming each size key that differs from preset `size` (None: any size)."""
    if size is None:
        return
    wanted = PRESETS[size]
    wrong = [f"{key} {getattr(cfg, key)} (expected {wanted[key]})" for key in SIZE_KEYS if getattr(cfg, key) != wanted[key]]
    if wrong:
        found = preset_name(cfg)
        raise CheckpointError(f"{source} is not AION-{size}: {', '.join(wrong)}"
                              + (f"; it is the '{found}' size" if found else "")
                              + ". Set model.transformer.size to its size, or to null to accept any")


def load_transformer(directory: Path, size: str | None) -> AionTransformer:
    """The transformer of `directory`, loaded strictly. Upstream stores a modality embedding shared by
    the encoder and decoder once (safetensors drops the duplicate); both names are filled from it."""
    cfg = read_json_config(directory / CONFIG_NAME, TransformerConfig, "AION transformer")
    check_size(cfg, size, directory / CONFIG_NAME)
    try:
        model = AionTransformer(cfg)
    except ValueError as exc:
        raise CheckpointError(f"{directory / CONFIG_NAME}: {exc}") from None
    state = ckpt.read_safetensors(directory / WEIGHTS_NAME)
    if cfg.share_modality_embeddings:
        for m in set(cfg.domains_in) & set(cfg.domains_out):
            names = (f"encoder_embeddings.{m}.mod_emb", f"decoder_embeddings.{m}.mod_emb")
            for kept, dropped in (names, names[::-1]):
                if kept in state and dropped not in state:
                    state[dropped] = state[kept]
    ckpt.load_state_strict(model, state, f"{directory / WEIGHTS_NAME} (with {directory / CONFIG_NAME})")
    return model.eval()


def load_spectrum_codec(directory: Path) -> SpectrumCodec:
    cfg = read_json_config(directory / CONFIG_NAME, SpectrumCodecConfig, "AION spectrum codec")
    try:
        codec = SpectrumCodec(cfg)
    except ValueError as exc:
        raise CheckpointError(f"{directory / CONFIG_NAME}: {exc}") from None
    state = {from_upstream_key(k): v for k, v in ckpt.read_safetensors(directory / WEIGHTS_NAME).items()}
    ckpt.load_state_strict(codec, state, f"{directory / WEIGHTS_NAME} (with {directory / CONFIG_NAME})")
    return codec.eval()


def load_redshift_codec(directory: Path) -> RedshiftCodec:
    cfg = read_json_config(directory / CONFIG_NAME, RedshiftCodecConfig, "AION redshift codec")
    if cfg.modality != "Z":
        raise CheckpointError(f"{directory / CONFIG_NAME} is the codec of {cfg.modality}, not of the redshift Z")
    codec = RedshiftCodec(cfg.codebook_size)
    renames = {**{up: ours for ours, up in UPSTREAM_KEYS.items()}, **OLDER_KEYS}
    state = {renames.get(k, k): v for k, v in ckpt.read_safetensors(directory / WEIGHTS_NAME).items()}
    ckpt.load_state_strict(codec, state, str(directory / WEIGHTS_NAME))
    return codec.eval()


def codec_part(root: Path, sub: Path, needed_for: str) -> Path:
    directory = root / sub
    if not ((directory / CONFIG_NAME).is_file() and (directory / WEIGHTS_NAME).is_file()):
        raise CheckpointError(f"{directory} has no {CONFIG_NAME} + {WEIGHTS_NAME}: the transformer takes {needed_for}, "
                              f"which needs this codec. Download it with the transformer: {DOWNLOAD}")
    return directory


def load_aion(path: str | Path, size: str | None = "base", image_codec: AionImageCodec | None = None) -> AionModel:
    """The transformer under `path`, of preset `size` (None: any), with the spectrum and redshift codecs
    of the modalities it takes, checked against each other and against `image_codec`."""
    directory = find_model_dir(path)
    transformer = load_transformer(directory, size)
    cfg = transformer.cfg
    spectrum = load_spectrum_codec(codec_part(directory, SPECTRUM_DIR, SPECTRUM_DESI)) if SPECTRUM_DESI in cfg.domains_in else None
    redshift = load_redshift_codec(codec_part(directory, REDSHIFT_DIR, REDSHIFT)) if REDSHIFT in cfg.domains_out else None
    standin = (directory / STANDIN_MARK).is_file()
    model = AionModel(directory, transformer, spectrum, redshift, standin)
    check_releases(model, image_codec)
    if standin:
        log.warning("!" * 80)
        log.warning(f"{directory} is a RANDOM stand-in AION transformer (see its {STANDIN_MARK}), not the published "
                    "weights: its embeddings test the pipeline, not AION")
        log.warning("!" * 80)
    else:
        log.info(f"AION transformer loaded from {directory}: {describe(transformer)}")
    return model


def check_releases(model: AionModel, image_codec: AionImageCodec | None) -> None:
    """The codecs' vocabularies and token counts must be the transformer's, or they come from another release."""
    t, problems = model.transformer, []
    if image_codec is not None and IMAGE_HSC in t.encoder_embeddings:
        vocab, grid = math.prod(image_codec.cfg.quantizer_levels), CROP // 2**image_codec.cfg.n_compressions
        spec = MODALITIES[IMAGE_HSC]
        if vocab != spec.vocab or grid * grid != spec.num_tokens:
            problems.append(f"the image codec has {vocab} codes on a {grid} x {grid} grid, the transformer's "
                            f"{IMAGE_HSC} {spec.vocab} codes on {spec.rows} x {spec.cols}")
    if model.spectrum is not None:
        spec, codec = MODALITIES[SPECTRUM_DESI], model.spectrum.cfg
        if codec.codebook_size != spec.vocab or codec.num_tokens != spec.num_tokens:
            problems.append(f"{SPECTRUM_DIR} has {codec.codebook_size} codes and {codec.num_tokens} tokens, the "
                            f"transformer's {SPECTRUM_DESI} {spec.vocab} codes and {spec.num_tokens} tokens")
    if model.redshift is not None and model.redshift.buckets.shape[0] > MODALITIES[REDSHIFT].vocab:
        problems.append(f"{REDSHIFT_DIR} has {model.redshift.buckets.shape[0]} codes, more than the transformer's "
                        f"{REDSHIFT} vocabulary of {MODALITIES[REDSHIFT].vocab}")
    if problems:
        raise CheckpointError(f"the codecs and the transformer of {model.directory} come from different AION releases: "
                              + "; ".join(problems) + ". Take them from one revision of polymathic-ai/aion-base")


def describe(transformer: AionTransformer) -> str:
    cfg = transformer.cfg
    size = preset_name(cfg) or "custom"
    millions = sum(p.numel() for p in transformer.parameters()) / 1e6
    return f"{size} ({cfg.dim} wide, {cfg.encoder_depth}+{cfg.decoder_depth} blocks, {millions:.1f}M parameters)"


# ----------------------------------------------------------------------------- writing, stand-ins


def save_aion(model: AionModel, directory: str | Path) -> Path:
    """Write the transformer and its codecs in the upstream layout (loadable by fmb and by polymathic-aion)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(model.transformer.cfg), indent=2))
    save_model(model.transformer, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})  # one copy of shared tensors
    if model.spectrum is not None:
        (directory / SPECTRUM_DIR).mkdir(parents=True, exist_ok=True)
        (directory / SPECTRUM_DIR / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(model.spectrum.cfg), indent=2))
        state = {to_upstream_key(k): v for k, v in model.spectrum.state_dict().items()}
        ckpt.save_safetensors(state, directory / SPECTRUM_DIR / WEIGHTS_NAME, {"format": "pt"})
    if model.redshift is not None:
        (directory / REDSHIFT_DIR).mkdir(parents=True, exist_ok=True)
        config = RedshiftCodecConfig(codebook_size=model.redshift.buckets.shape[0])
        (directory / REDSHIFT_DIR / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(config), indent=2))
        state = {UPSTREAM_KEYS[k]: v for k, v in model.redshift.state_dict().items()}
        ckpt.save_safetensors(state, directory / REDSHIFT_DIR / WEIGHTS_NAME, {"format": "pt"})
    return directory


def random_standin(size: str, seed: int) -> AionModel:
    """A random transformer of `size` taking and predicting HSC images, DESI spectra and redshift, with a
    random spectrum codec (upstream's shape; narrow for `demo`) and the 0.0.2 redshift codec."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone
        torch.manual_seed(seed)
        transformer = AionTransformer(preset_config(size, STANDIN_DOMAINS))
        spectrum = SpectrumCodec(DEMO_SPECTRUM if size == "demo" else SpectrumCodecConfig(embedding_dim=10))
        for module in spectrum.modules():  # PyTorch's default scale: upstream's small start gives near-constant tokens
            if isinstance(module, torch.nn.Conv1d | torch.nn.ConvTranspose1d | torch.nn.Linear):
                module.reset_parameters()
    return AionModel(Path(), transformer.eval(), spectrum.eval(), RedshiftCodec(), standin=True)


def ensure_standin(directory: Path, size: str, seed: int) -> Path:
    """A random stand-in under `directory` (upstream layout + standin.json): written there, or reused when a
    complete one of the same size and seed is there (a resumed run)."""

    def write(staging: Path) -> dict:
        log.warning(f"no published AION transformer: writing a RANDOM stand-in ({size}) to {directory}. Its embeddings "
                    "exercise the pipeline; set model.transformer.path (paths_local.yaml: aion_model) for AION itself.")
        save_aion(random_standin(size, seed), staging)
        return {"weights": "random (never trained)"}

    return write_once(directory, {"size": size, "seed": seed}, "stand-in AION transformer", write)


# ----------------------------------------------------------------------------- fmb doctor


def weights_report(paths: dict[str, str | None]) -> list[str]:
    """Lines for `fmb doctor`: what the `aion_model` and `aion_codec` entries hold, read from the files'
    headers (no weights are loaded)."""
    lines = []
    model_path = paths.get(PATHS_KEY)
    if not model_path:
        lines.append(f"AION transformer   not set ({PATHS_KEY} in paths_local.yaml; docs/aion.md says what to download)")
    else:
        try:
            directory = find_model_dir(model_path)
            cfg = read_json_config(directory / CONFIG_NAME, TransformerConfig, "AION transformer")
            with safe_open(str(directory / WEIGHTS_NAME), "pt") as weights:
                tensors = len(list(weights.keys()))
            size = preset_name(cfg) or "custom"
            kind = "RANDOM STAND-IN" if (directory / STANDIN_MARK).is_file() else "ok"
            lines.append(f"AION transformer   {kind}: {directory} ({size}, {cfg.dim} wide, {tensors} tensors, "
                         f"{len(cfg.domains_in)} input modalities)")
            for sub, modality in ((SPECTRUM_DIR, SPECTRUM_DESI), (REDSHIFT_DIR, REDSHIFT)):
                if modality in cfg.domains_in + cfg.domains_out:
                    there = (directory / sub / CONFIG_NAME).is_file() and (directory / sub / WEIGHTS_NAME).is_file()
                    lines.append(f"  {str(sub):<16} {'ok' if there else 'MISSING'}: {directory / sub}")
        except (CheckpointError, OSError, SafetensorError) as exc:
            lines.append(f"AION transformer   PROBLEM: {str(exc).splitlines()[0]}")
    codec_path = paths.get("aion_codec") or model_path
    if codec_path:
        try:
            directory = find_codec_dir(codec_path)
            read_codec_config(directory / CONFIG_NAME)
            lines.append(f"AION image codec   ok: {directory}")
        except CheckpointError as exc:
            lines.append(f"AION image codec   PROBLEM: {str(exc).splitlines()[0]}")
    else:
        lines.append("AION image codec   not set (aion_codec in paths_local.yaml)")
    return lines
