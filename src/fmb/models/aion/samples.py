"""Sample grids and per-band image metrics for the Euclid <-> HSC round trip (no plotting package needed).

A grid has one row per object: the Euclid input bands, the HSC-like adapter output (g..y), and
the reconstructed Euclid bands, each as an arcsinh-stretched greyscale tile. Reconstructions use
their input band's stretch, so differences in brightness show; HSC tiles have their own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fmb.data.images import encode_png

GAP = 2


def _stretch(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    return ((x - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)


def _limits(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tile 1st and 99.5th percentiles of (..., H, W)."""
    flat = x.flatten(-2)
    return (torch.quantile(flat, 0.01, dim=-1)[..., None, None], torch.quantile(flat, 0.995, dim=-1)[..., None, None])


def sample_grid(euclid: torch.Tensor, hsc: torch.Tensor, reconstruction: torch.Tensor, softening: float) -> np.ndarray:
    """(N, 4, S, S), (N, 5, S, S), (N, 4, S, S) float tensors -> H x W x 3 uint8 image."""
    euclid, hsc, reconstruction = (t.detach().float().cpu() for t in (euclid, hsc, reconstruction))
    e = torch.asinh(euclid / softening)
    r = torch.asinh(reconstruction / softening)
    h = torch.asinh(hsc / softening)
    low, high = _limits(e)
    h_low, h_high = _limits(h)
    tiles = torch.cat([_stretch(e, low, high), _stretch(h, h_low, h_high), _stretch(r, low, high)], dim=1)
    n, columns, size, _ = tiles.shape
    canvas = torch.ones(n * (size + GAP) - GAP, columns * (size + GAP) - GAP)
    for i in range(n):
        for j in range(columns):
            canvas[i * (size + GAP):i * (size + GAP) + size, j * (size + GAP):j * (size + GAP) + size] = tiles[i, j]
    grey = (canvas.numpy() * 255).round().astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def write_grid(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(image))
    return path


def band_errors(prediction: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per object and band: MSE over valid pixels and PSNR (peak = the band's largest |target|), both (N, C)."""
    valid = valid.to(prediction.dtype)
    count = valid.sum((-1, -2)).clamp_min(1)
    mse = ((prediction - target) ** 2 * valid).sum((-1, -2)) / count
    peak = (target.abs() * valid).flatten(-2).amax(-1)
    psnr = 10 * torch.log10(peak.clamp_min(1e-12) ** 2 / mse.clamp_min(1e-20))
    return mse, psnr
