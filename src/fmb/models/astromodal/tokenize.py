"""Fitting the tokenisers on hypercube fields and encoding fields into token shards.

Used by the trainer's `prepare()` and by `fmb tokenize fit|encode`. A tokeniser directory
holds scalar / spectrum / image `.safetensors` + `.json` files and `tokenizer_config.json`
(the settings they were fitted with, reused when encoding: same selection, same rebinning).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from fmb.config import ConfigLayers, build, parse_set_option, read_yaml
from fmb.data.surveys.splus import (
    CUTOUT_COLUMNS,
    SHAPE_COLUMNS,
    SPECTRUM_GROUPS,
    TRUTH_COLUMNS,
    FieldBatch,
    Selection,
    cutout_stack,
    list_rows,
    read_fields,
    scalar_matrix,
)
from fmb.errors import ConfigError, DataError
from fmb.models.astromodal.data import ShardWriter, Vocabulary
from fmb.models.astromodal.tokenizers import (
    ImageTokenizer,
    ScalarTokenizer,
    SpectrumTokenizer,
    TokenizerConfig,
)
from fmb.train.distributed import resolve_device

log = logging.getLogger("fmb")

KINDS = ("scalar", "spectrum", "image")
CONFIG_FILE = "tokenizer_config.json"


def selection_of(cfg: TokenizerConfig) -> Selection:
    return Selection(cfg.mag_column, cfg.err_column, tuple(cfg.mag_range), cfg.max_err)


def _columns(kinds: list[str], cfg: TokenizerConfig) -> list[str]:
    columns: list[str] = []
    if "scalar" in kinds:
        columns += cfg.scalar_columns
    if "spectrum" in kinds:
        columns += [c for g in cfg.spectrum_groups for c in SPECTRUM_GROUPS[g][:2]]
    if "image" in kinds:
        columns += CUTOUT_COLUMNS + list(SHAPE_COLUMNS)
    return list(dict.fromkeys(columns))


def _group_features(tok: SpectrumTokenizer, batch: FieldBatch, group: str) -> list[np.ndarray | None]:
    flux_col, unc_col, _ = SPECTRUM_GROUPS[group]
    rows = []
    for i, (flux, unc) in enumerate(zip(list_rows(batch, flux_col), list_rows(batch, unc_col), strict=True)):
        try:
            rows.append(tok.features(group, flux, unc))
        except DataError as exc:
            raise DataError(f"{batch.file}: object {batch.ids[i]}, columns {flux_col} / {unc_col}: {exc}") from None
    return rows


def _images_of(batch: FieldBatch) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row indices with at least one band, images, band presence, shapes a / b / theta) of a batch."""
    images, present = cutout_stack(batch)
    rows = np.flatnonzero(present.any(1))
    shapes = scalar_matrix(batch, list(SHAPE_COLUMNS))[rows]
    return rows, torch.from_numpy(images[rows]), torch.from_numpy(present[rows]), torch.from_numpy(shapes).float()


def fit_tokenizers(data: str | Path, out_dir: str | Path, cfg: TokenizerConfig, kinds: list[str]) -> Path:
    """Fit the tokenisers named in `kinds` on the selected rows of `data`; save them in `out_dir`."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ConfigError(f"unknown tokeniser kind(s) {unknown}; choose from {', '.join(KINDS)} or all")
    out = Path(out_dir)
    device = resolve_device(cfg.device, 0)
    spectra = SpectrumTokenizer(cfg.spectrum_groups, cfg.spectrum_codebook, cfg.desi_rebin, cfg.flux_clip)
    scalars: list[np.ndarray] = []
    features: dict[str, list[np.ndarray]] = {g: [] for g in cfg.spectrum_groups}
    images: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    n_images = rows = 0
    start = time.perf_counter()
    for batch in read_fields(data, _columns(kinds, cfg), selection_of(cfg), max_rows=cfg.fit_max_rows):
        rows += len(batch)
        if "scalar" in kinds:
            scalars.append(scalar_matrix(batch, cfg.scalar_columns))
        if "spectrum" in kinds:
            for g in cfg.spectrum_groups:
                features[g] += [f for f in _group_features(spectra, batch, g) if f is not None]
        if "image" in kinds and n_images < cfg.fit_max_images:
            index, img, present, shapes = _images_of(batch)
            keep = slice(0, cfg.fit_max_images - n_images)
            images.append((img[keep], present[keep], shapes[keep]))
            n_images += len(index[keep])
    log.info(f"tokenizer fit: {rows} rows read in {time.perf_counter() - start:.1f}s")
    out.mkdir(parents=True, exist_ok=True)
    if "scalar" in kinds:
        ScalarTokenizer(cfg.scalar_columns, cfg.scalar_bins).fit(np.concatenate(scalars)).save(out)
        log.info(f"scalar tokenizer: {len(cfg.scalar_columns)} columns x {cfg.scalar_bins} bins")
    if "spectrum" in kinds:
        spectra.fit(features, cfg.kmeans_steps, cfg.kmeans_batch, cfg.fit_max_vectors, cfg.seed, device).save(out)
        log.info("spectrum tokenizer: " + ", ".join(f"{g} {len(features[g])} objects" for g in cfg.spectrum_groups))
    if "image" in kinds:
        if n_images == 0:
            raise DataError(f"{data}: no object in the fitting rows has a cutout (splus_cut_* columns)")
        tok = ImageTokenizer(len(CUTOUT_COLUMNS), 96, cfg.image_codebook, cfg.image_latent_channels,
                             cfg.image_hidden, cfg.image_downsample)
        tok.fit(*(torch.cat(parts) for parts in zip(*images, strict=True)), cfg, device).save(out)
        log.info(f"image tokenizer: {n_images} images, {tok.tokens_per_image} tokens per image")
    (out / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    return out


def fit_from_options(kind: str, data: Path, out: Path, config_files: list[str], sets: list[str]) -> Path:
    """`fmb tokenize fit`: settings from YAML files (a `tokenizer:` section, or bare keys) and
    `--set key=value` (keys of the tokenizer section, with or without the `tokenizer.` prefix)."""
    layers = ConfigLayers()
    for file in config_files:
        tree = read_yaml(Path(file)) or {}
        layers.add(tree.get("tokenizer", tree) if isinstance(tree, dict) else tree, str(file))
    for option in sets:
        key, value = parse_set_option(option)
        layers.set(key.removeprefix("tokenizer."), value, f"--set {option}")
    cfg = build(TokenizerConfig, layers)
    return fit_tokenizers(data, out, cfg, list(KINDS) if kind == "all" else [kind])


def read_tokenizer_config(directory: Path) -> TokenizerConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise DataError(f"{directory} holds no fitted tokenisers ({CONFIG_FILE} missing); run `fmb tokenize fit`")
    layers = ConfigLayers()
    layers.add(json.loads(path.read_text()), str(path))
    return build(TokenizerConfig, layers)


@dataclasses.dataclass
class Tokenizers:
    config: TokenizerConfig
    scalar: ScalarTokenizer
    spectrum: SpectrumTokenizer
    image: ImageTokenizer

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizers:
        directory = Path(directory)
        return cls(read_tokenizer_config(directory), ScalarTokenizer.load(directory),
                   SpectrumTokenizer.load(directory), ImageTokenizer.load(directory))

    def vocabulary(self) -> Vocabulary:
        return Vocabulary(self.image.codebook_size, self.image.tokens_per_image, self.scalar.columns,
                          self.scalar.n_bins, {g: self.spectrum.size for g in self.spectrum.groups})


def encode_dataset(data: str | Path, tokenizer_dir: str | Path, out_dir: str | Path) -> Path:
    """Encode the selected rows of every field into a token shard directory."""
    toks = Tokenizers.load(tokenizer_dir)
    cfg = toks.config
    groups = toks.spectrum.groups
    writer = ShardWriter(Path(out_dir), len(toks.scalar.columns), ["image", *groups])
    skipped = dict.fromkeys(groups, 0)
    device = resolve_device(cfg.device, 0)
    start = time.perf_counter()
    for batch in read_fields(data, _columns(list(KINDS), cfg), selection_of(cfg), optional=TRUTH_COLUMNS):
        scalars = toks.scalar.encode(scalar_matrix(batch, toks.scalar.columns))
        streams: dict[str, list[np.ndarray | None]] = {"image": [None] * len(batch)}
        rows, images, present, _ = _images_of(batch)
        if len(rows):
            for row, tokens in zip(rows, toks.image.encode(images, present, device), strict=True):
                streams["image"][row] = tokens
        for g in groups:
            feats = _group_features(toks.spectrum, batch, g)
            has_data = list_rows(batch, SPECTRUM_GROUPS[g][0])
            skipped[g] += sum(f is None and d is not None for f, d in zip(feats, has_data, strict=True))
            streams[g] = [None if f is None else toks.spectrum.encode(g, f) for f in feats]
        writer.add(batch, scalars, streams, {c: batch.columns.get(c) for c in TRUTH_COLUMNS})
    for g, count in skipped.items():
        if count:
            log.warning(f"{g}: {count} spectra without a usable pixel (all NaN, zero ivar or zero flux) "
                        "encoded as missing")
    out = writer.close({"tokenizers": str(Path(tokenizer_dir).resolve()), "data": str(Path(data).resolve()),
                        "vocabulary": toks.vocabulary().to_json()})
    log.info(f"encoded {writer.rows} objects into {out} in {time.perf_counter() - start:.1f}s")
    return out
