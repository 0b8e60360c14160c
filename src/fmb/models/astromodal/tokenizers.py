"""astromodal tokenisers: scalar quantile bins, spectrum codebooks, image autoencoder + codebook.

Each has fit / encode / decode / save / load; a saved tokeniser is `<name>.safetensors`
(tensors) plus `<name>.json` (metadata) in one directory. Missing values are never imputed:
the scalar tokeniser returns -1 (the MISS token) and the others return None for the row.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fmb.data.surveys.splus import SPECTRUM_GROUPS
from fmb.errors import DataError
from fmb.models.astromodal.data import DEFAULT_SCALARS
from fmb.models.astromodal.kmeans import fit_kmeans, nearest

log = logging.getLogger("fmb")


@dataclass
class TokenizerConfig:
    """How the three tokenisers are fitted (upstream sizes by default)."""

    scalar_columns: list[str] = field(default_factory=lambda: list(DEFAULT_SCALARS))
    scalar_bins: int = 1024
    spectrum_groups: list[str] = field(default_factory=lambda: list(SPECTRUM_GROUPS))
    spectrum_codebook: int = 2048
    desi_rebin: int = 1  # DESI pixels averaged (ivar-weighted) into one token; XP coefficients are never rebinned
    flux_clip: float = 20.0  # normalised flux is clipped to +-flux_clip
    image_codebook: int = 2048
    image_latent_channels: int = 2
    image_downsample: int = 2  # stride-2 stages: 96 -> 24 (576 tokens); 3 gives 12 x 12
    image_hidden: int = 32
    image_epochs: int = 10
    image_batch_size: int = 32
    image_lr: float = 1e-3
    mask_scale: float = 3.0  # object ellipse = mask_scale x (a, b) of the detection
    mask_outside_weight: float = 0.3  # MSE weight outside the object ellipse (1 inside)
    kmeans_steps: int = 200
    kmeans_batch: int = 8192
    fit_max_rows: int | None = 200_000  # rows read to fit, shared evenly between the fields
    fit_max_vectors: int = 2_000_000  # feature vectors given to each k-means
    fit_max_images: int = 4096  # images held in memory to fit the autoencoder (4096 x 442 kB = 1.8 GB)
    # Sample selection, applied when fitting and encoding (upstream: 14 < r < 22, err < 2).
    mag_column: str = "mag_pstotal_r"
    err_column: str = "err_mag_pstotal_r"
    mag_range: tuple[float, float] = (14.0, 22.0)
    max_err: float = 2.0
    device: str = "auto"
    seed: int = 0


def _save(directory: Path, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(meta, indent=1))


def _load(directory: Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    files = [directory / f"{name}.safetensors", directory / f"{name}.json"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(f"tokeniser '{name}' not found: missing {', '.join(missing)}; fit it with `fmb tokenize fit {name}`")
    return load_file(str(files[0])), json.loads(files[1].read_text())


# ----------------------------------------------------------------------------- scalars


class ScalarTokenizer:
    """Per-column quantile bins. Bin b of column c covers [edges[c, b], edges[c, b + 1]];
    its centre is the mean of the fitted values in it. Values outside the fitted range go
    to the first / last bin; missing values are -1 (MISS). `loc` / `scale` (median and
    robust spread) define each column's own normalised units for reconstruction losses."""

    name = "scalar"

    def __init__(self, columns: list[str], n_bins: int) -> None:
        self.columns = list(columns)
        self.n_bins = n_bins
        self.edges = np.zeros((len(columns), n_bins + 1))
        self.centres = np.zeros((len(columns), n_bins))
        self.loc = np.zeros(len(columns))
        self.scale = np.ones(len(columns))

    def fit(self, values: np.ndarray) -> ScalarTokenizer:
        """values: (N, C) float, NaN for missing."""
        q = np.linspace(0.0, 1.0, self.n_bins + 1)
        for c, name in enumerate(self.columns):
            x = values[:, c]
            x = x[np.isfinite(x)]
            if x.size == 0:
                raise DataError(f"scalar column '{name}' has no finite value in the rows used for fitting; "
                                "remove it from tokenizer.scalar_columns")
            self.edges[c] = np.quantile(x, q)
            bins = self._bins(c, x)
            sums = np.bincount(bins, weights=x, minlength=self.n_bins)
            counts = np.bincount(bins, minlength=self.n_bins)
            mid = 0.5 * (self.edges[c, :-1] + self.edges[c, 1:])
            self.centres[c] = np.where(counts > 0, sums / np.maximum(counts, 1), mid)
            self.loc[c] = np.median(x)
            spread = np.subtract(*np.quantile(x, [0.84, 0.16]))
            self.scale[c] = spread if spread > 0 else max(float(np.std(x)), 1.0)
        return self

    def _bins(self, c: int, x: np.ndarray) -> np.ndarray:
        return np.clip(np.searchsorted(self.edges[c, 1:-1], x, side="right"), 0, self.n_bins - 1)

    def encode(self, values: np.ndarray) -> np.ndarray:
        """(N, C) bins, -1 where the value is missing or not finite."""
        out = np.full(values.shape, -1, np.int64)
        for c in range(len(self.columns)):
            ok = np.isfinite(values[:, c])
            out[ok, c] = self._bins(c, values[ok, c])
        return out

    def decode(self, bins: np.ndarray) -> np.ndarray:
        """Bin centres in the original units, NaN for MISS."""
        safe = np.clip(bins, 0, self.n_bins - 1)
        values = np.take_along_axis(self.centres[None, :, :].repeat(len(bins), 0), safe[:, :, None], 2)[:, :, 0]
        return np.where(bins >= 0, values, np.nan)

    def normalised_centres(self) -> torch.Tensor:
        """(C, n_bins) float32: each column's centres in its own normalised units."""
        return torch.from_numpy((self.centres - self.loc[:, None]) / self.scale[:, None]).float()

    def from_normalised(self, values: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """Values in the original units from normalised ones (e.g. `model.reconstruct` output),
        `columns` giving each value's column index."""
        return values * self.scale[columns] + self.loc[columns]

    def save(self, directory: Path) -> None:
        tensors = {k: torch.from_numpy(getattr(self, k)) for k in ("edges", "centres", "loc", "scale")}
        _save(Path(directory), self.name, tensors, {"columns": self.columns, "n_bins": self.n_bins})

    @classmethod
    def load(cls, directory: Path) -> ScalarTokenizer:
        tensors, meta = _load(Path(directory), cls.name)
        tok = cls(meta["columns"], meta["n_bins"])
        for key in ("edges", "centres", "loc", "scale"):
            setattr(tok, key, tensors[key].numpy().astype(np.float64))
        return tok


# ----------------------------------------------------------------------------- spectra


def spectrum_features(flux: np.ndarray, uncertainty: np.ndarray, kind: str, rebin: int,
                      clip: float) -> np.ndarray | None:
    """Per-pixel (normalised flux, precision) features (L', 2), or None without usable pixels.

    ivar comes from the column or as 1 / error^2 with error <= 0 or non-finite masked (never
    a division by zero). Pixels are averaged in groups of `rebin` (ivar-weighted). The flux
    is divided by the median |flux| of good pixels; precision = log(1 + sqrt(ivar) x scale).
    """
    flux = np.asarray(flux, np.float64)
    unc = np.asarray(uncertainty, np.float64)
    if kind == "ivar":
        ivar = np.where(np.isfinite(unc) & (unc > 0), unc, 0.0)
    else:
        ok = np.isfinite(unc) & (unc > 0)
        ivar = np.where(ok, 1.0 / np.where(ok, unc, 1.0) ** 2, 0.0)
    ivar = np.where(np.isfinite(flux), ivar, 0.0)
    flux = np.where(ivar > 0, flux, 0.0)
    if rebin > 1:
        pad = (-len(flux)) % rebin
        flux = np.pad(flux, (0, pad)).reshape(-1, rebin)
        ivar = np.pad(ivar, (0, pad)).reshape(-1, rebin)
        weight = ivar.sum(1)
        flux = np.where(weight > 0, (flux * ivar).sum(1) / np.where(weight > 0, weight, 1.0), 0.0)
        ivar = weight
    good = ivar > 0
    if not good.any():
        return None
    scale = float(np.median(np.abs(flux[good])))
    if not (math.isfinite(scale) and scale > 0):
        return None
    norm = np.clip(flux / scale, -clip, clip)
    precision = np.log1p(np.sqrt(ivar) * scale)
    return np.stack([norm, precision], 1).astype(np.float32)


class SpectrumTokenizer:
    """One k-means codebook per spectrum group over per-pixel (normalised flux, precision)."""

    name = "spectrum"

    def __init__(self, groups: list[str], size: int, desi_rebin: int, clip: float) -> None:
        unknown = [g for g in groups if g not in SPECTRUM_GROUPS]
        if unknown:
            raise DataError(f"unknown spectrum group(s) {unknown}; known: {', '.join(SPECTRUM_GROUPS)}")
        self.groups = list(groups)
        self.size = size
        self.desi_rebin = desi_rebin
        self.clip = clip
        self.codebooks: dict[str, torch.Tensor] = {}

    def rebin(self, group: str) -> int:
        return self.desi_rebin if group.startswith("desi") else 1

    def features(self, group: str, flux: np.ndarray | None, unc: np.ndarray | None) -> np.ndarray | None:
        if flux is None or unc is None:
            return None
        if len(flux) != len(unc):
            raise DataError(f"spectrum group {group}: {len(flux)} values but {len(unc)} uncertainties")
        return spectrum_features(flux, unc, SPECTRUM_GROUPS[group][2], self.rebin(group), self.clip)

    def fit(self, features: dict[str, list[np.ndarray]], steps: int, batch: int, max_vectors: int,
            seed: int, device: torch.device) -> SpectrumTokenizer:
        rng = np.random.default_rng(seed)
        for g in self.groups:
            rows = features.get(g) or []
            if not rows:
                raise DataError(f"spectrum group '{g}': no object with a usable spectrum in the fitting rows")
            x = np.concatenate(rows)
            if len(x) > max_vectors:
                x = x[rng.choice(len(x), max_vectors, replace=False)]
            self.codebooks[g] = fit_kmeans(torch.from_numpy(x).to(device), self.size, steps, batch, seed,
                                           name=f"spectrum group '{g}'").cpu()
        return self

    def encode(self, group: str, features: np.ndarray) -> np.ndarray:
        codebook = self.codebooks[group]
        return nearest(torch.from_numpy(features).to(codebook.device), codebook).numpy()

    def decode(self, group: str, tokens: np.ndarray) -> np.ndarray:
        """(L, 2) features (normalised flux, precision) of the tokens' centroids."""
        return self.codebooks[group][torch.as_tensor(tokens, dtype=torch.long)].numpy()

    def save(self, directory: Path) -> None:
        _save(Path(directory), self.name, {f"codebook.{g}": c for g, c in self.codebooks.items()},
              {"groups": self.groups, "size": self.size, "desi_rebin": self.desi_rebin, "clip": self.clip})

    @classmethod
    def load(cls, directory: Path) -> SpectrumTokenizer:
        tensors, meta = _load(Path(directory), cls.name)
        tok = cls(meta["groups"], meta["size"], meta["desi_rebin"], meta["clip"])
        tok.codebooks = {g: tensors[f"codebook.{g}"] for g in tok.groups}
        return tok


# ----------------------------------------------------------------------------- images


def normalise_images(images: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Per-image, per-band robust arcsinh: asinh((x - median) / (1.4826 MAD)); absent bands and
    non-finite pixels become 0 (their weight in the loss is 0)."""
    n, b = images.shape[:2]
    flat = images.reshape(n, b, -1).float()
    finite = torch.isfinite(flat)
    flat = torch.where(finite, flat, torch.nan)
    # Robust statistics from every 7th pixel: the same estimate for a fraction of the sort cost.
    sample = flat[:, :, ::7]
    med = sample.nanmedian(dim=2, keepdim=True).values
    mad = (sample - med).abs().nanmedian(dim=2, keepdim=True).values * 1.4826
    scale = torch.where(torch.isfinite(mad) & (mad > 0), mad, torch.ones_like(mad))
    out = torch.asinh((flat - torch.nan_to_num(med)) / scale)
    out = torch.where(finite & present[:, :, None], out, torch.zeros_like(out))
    return out.reshape(images.shape)


def ellipse_weights(shape: torch.Tensor, size: int, scale: float, outside: float) -> torch.Tensor:
    """(n, 1, size, size) MSE weights: 1 inside the object's ellipse (scale x a, b, angle theta
    in degrees from the x axis), `outside` elsewhere; 1 everywhere when the shape is unknown."""
    a, b, theta = (shape[:, i, None, None] for i in range(3))
    grid = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    dy, dx = torch.meshgrid(grid, grid, indexing="ij")
    t = torch.deg2rad(theta)
    u = dx * torch.cos(t) + dy * torch.sin(t)
    v = -dx * torch.sin(t) + dy * torch.cos(t)
    inside = (u / (scale * a)) ** 2 + (v / (scale * b)) ** 2 <= 1.0
    known = torch.isfinite(shape).all(1) & (shape[:, 0] > 0) & (shape[:, 1] > 0)
    weights = torch.where(inside, 1.0, outside)
    return torch.where(known[:, None, None], weights, torch.ones_like(weights))[:, None]


class ImageAutoencoder(nn.Module):
    """Conv autoencoder: (B, 12, 96, 96) -> (B, latent, 96 / 2^d, 96 / 2^d) -> back."""

    def __init__(self, bands: int, hidden: int, latent: int, downsample: int) -> None:
        super().__init__()
        enc: list[nn.Module] = []
        dec: list[nn.Module] = []
        channels = bands
        for k in range(downsample):
            width = hidden * 2**k
            enc += [nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.GELU()]
            dec = [nn.GELU(), nn.ConvTranspose2d(width, channels, 4, stride=2, padding=1)] + dec
            channels = width
        self.encoder = nn.Sequential(*enc, nn.Conv2d(channels, latent, 1))
        # The last decoder layer outputs images directly: no activation after it.
        self.decoder = nn.Sequential(nn.Conv2d(latent, channels, 1), *dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class ImageTokenizer:
    """Autoencoder latents (one `latent`-d vector per grid cell) quantised by a k-means codebook."""

    name = "image"

    def __init__(self, bands: int, size: int, codebook_size: int, latent: int, hidden: int, downsample: int) -> None:
        self.bands, self.size, self.codebook_size = bands, size, codebook_size
        self.latent, self.hidden, self.downsample = latent, hidden, downsample
        self.autoencoder = ImageAutoencoder(bands, hidden, latent, downsample)
        self.codebook = torch.zeros(codebook_size, latent)

    @property
    def grid(self) -> int:
        return self.size // 2**self.downsample

    @property
    def tokens_per_image(self) -> int:
        return self.grid * self.grid

    def fit(self, images: torch.Tensor, present: torch.Tensor, shapes: torch.Tensor, cfg: TokenizerConfig,
            device: torch.device) -> ImageTokenizer:
        """images (N, bands, size, size) raw, present (N, bands), shapes (N, 3) = a, b, theta."""
        x = normalise_images(images, present)
        weight = ellipse_weights(shapes, self.size, cfg.mask_scale, cfg.mask_outside_weight) * present[:, :, None, None]
        model = self.autoencoder.to(device).train()
        opt = torch.optim.Adam(model.parameters(), lr=cfg.image_lr)
        gen = torch.Generator().manual_seed(cfg.seed)
        for epoch in range(cfg.image_epochs):
            order = torch.randperm(len(x), generator=gen)
            total = torch.zeros((), device=device)
            for start in range(0, len(x), cfg.image_batch_size):
                idx = order[start:start + cfg.image_batch_size]
                xb, wb = x[idx].to(device), weight[idx].to(device)
                loss = weighted_mse(model(xb), xb, wb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach() * len(idx)
            log.info(f"image autoencoder epoch {epoch + 1}/{cfg.image_epochs}: weighted MSE {total.item() / len(x):.4f}")
        model.eval().cpu()
        latents = self._latents(x, device)
        rng = np.random.default_rng(cfg.seed)
        if len(latents) > cfg.fit_max_vectors:
            latents = latents[torch.from_numpy(rng.choice(len(latents), cfg.fit_max_vectors, replace=False))]
        self.codebook = fit_kmeans(latents.to(device), self.codebook_size, cfg.kmeans_steps, cfg.kmeans_batch,
                                   cfg.seed, name="image latents").cpu()
        return self

    @torch.no_grad()
    def _latents(self, x: torch.Tensor, device: torch.device, batch: int = 64) -> torch.Tensor:
        """(N * grid^2, latent) latent vectors of normalised images, row-major per image."""
        model = self.autoencoder.to(device)
        out = [model.encoder(x[s:s + batch].to(device)).permute(0, 2, 3, 1).reshape(-1, self.latent).cpu()
               for s in range(0, len(x), batch)]
        model.cpu()
        return torch.cat(out) if out else torch.zeros(0, self.latent)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, present: torch.Tensor, device: torch.device | None = None) -> np.ndarray:
        """(N, grid^2) tokens of raw images (the encoder runs on `device`, CPU by default)."""
        latents = self._latents(normalise_images(images, present), device or torch.device("cpu"))
        return nearest(latents, self.codebook).reshape(len(images), -1).numpy()

    @torch.no_grad()
    def decode(self, tokens: np.ndarray) -> torch.Tensor:
        """(N, bands, size, size) normalised images from tokens."""
        z = self.codebook[torch.as_tensor(tokens, dtype=torch.long)]  # (N, grid^2, latent)
        z = z.reshape(len(tokens), self.grid, self.grid, self.latent).permute(0, 3, 1, 2)
        return self.autoencoder.decoder(z)

    def save(self, directory: Path) -> None:
        tensors = {f"autoencoder.{k}": v for k, v in self.autoencoder.state_dict().items()}
        tensors["codebook"] = self.codebook
        meta = {"bands": self.bands, "size": self.size, "codebook_size": self.codebook_size, "latent": self.latent,
                "hidden": self.hidden, "downsample": self.downsample}
        _save(Path(directory), self.name, tensors, meta)

    @classmethod
    def load(cls, directory: Path) -> ImageTokenizer:
        tensors, meta = _load(Path(directory), cls.name)
        tok = cls(meta["bands"], meta["size"], meta["codebook_size"], meta["latent"], meta["hidden"], meta["downsample"])
        tok.autoencoder.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("autoencoder.")})
        tok.autoencoder.eval()
        tok.codebook = tensors["codebook"]
        return tok


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    weight = weight.expand_as(target)
    return (weight * (pred - target) ** 2).sum() / weight.sum().clamp_min(1e-12)
