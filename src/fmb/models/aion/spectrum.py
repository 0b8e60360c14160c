"""AION's spectrum codec (weight-compatible with `polymathic-aion` 0.0.2): a spectrum (flux, inverse variance,
bad-pixel mask on a wavelength grid) <-> 273 tokens, one flux-normalisation token then 272 LFQ tokens.

Encoding, step by step as upstream:
1. NaN -> 0 in flux and inverse variance; ivar clipped to [0, clip_ivar] (flux to +/- clip_flux if set);
   istd = sqrt(ivar).
2. Normalisation: the mean flux of the good pixels (sum / (count + 1)), at least 0.1, taken as
   log10(1 + mean) and binned on `normalization_range` (the first token); n = max(10^bin - 1, 0.1).
3. flux -> (flux / n - 1) * input_scaling and istd -> istd / n * input_scaling, linearly interpolated
   onto the latent grid (lambda_min + resolution * k, k < num_pixels; 0 outside the observed range).
4. arcsinh of the two as channels -> ConvNeXt-V2 1-D encoder (stride-4 stem, three stride-2 steps: 8704
   pixels -> 272) -> LayerNorm -> 1x1 conv to embedding_dim -> lookup-free quantisation: the token is the
   sign bits of the (optionally projected) channels, the first channel the most significant bit.
Decoding mirrors it: bits -> +/-1 codes -> 1x1 conv -> ConvNeXt decoder (transposed convs) -> flux (and,
with two output channels, a bad-pixel logit), times the normalisation.

Module names follow upstream except the two renamed on load (`RENAMES`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

# fmb key prefix -> upstream key prefix
RENAMES = (("quantizer.", "_quantizer._quantizer."), ("latent_grid.wavelength", "latent_grid._wavelength"),
           ("normalization_buckets", "normalization_quantizer.buckets"))
DOWNSAMPLING = 32  # stem 4 x three 2s: latent pixels per token


@dataclass
class SpectrumCodecConfig:
    """The spectrum codec's `config.json` (keyword arguments of upstream `SpectrumCodec`), same defaults."""

    encoder_depths: tuple[int, ...] = (3, 3, 9, 3)
    encoder_dims: tuple[int, ...] = (96, 192, 384, 768)
    decoder_depths: tuple[int, ...] = (3, 3, 9, 3)
    decoder_dims: tuple[int, ...] = (384, 192, 96, 1)
    lambda_min: float = 3500.0
    resolution: float = 0.8
    num_pixels: int = 8704
    latent_channels: int = 512
    embedding_dim: int = 4
    clip_ivar: float | None = 100.0
    clip_flux: float | None = None
    input_scaling: float = 0.2
    normalization_range: tuple[float, float] = (-1.0, 5.0)
    codebook_size: int = 1024
    dim: int = 10

    def check(self) -> None:
        if self.encoder_dims[-1] != self.latent_channels:
            raise ValueError(f"the last encoder dim {self.encoder_dims[-1]} must equal latent_channels {self.latent_channels}")
        if len(self.encoder_depths) != len(self.encoder_dims) or len(self.decoder_depths) != len(self.decoder_dims):
            raise ValueError("encoder/decoder depths and dims must have the same lengths")
        if len(self.encoder_dims) != 4 or len(self.decoder_dims) != 4:
            raise ValueError("the spectrum codec has four stages")
        if self.embedding_dim != self.dim:
            raise ValueError(f"embedding_dim {self.embedding_dim} must equal the quantiser's dim {self.dim}")
        if self.codebook_size < 2 or not math.log2(self.codebook_size).is_integer():
            raise ValueError(f"codebook_size {self.codebook_size} must be a power of 2")
        if self.num_pixels % DOWNSAMPLING or self.decoder_dims[-1] not in (1, 2):
            raise ValueError(f"num_pixels must be a multiple of {DOWNSAMPLING} and the last decoder dim 1 or 2")

    @property
    def num_tokens(self) -> int:
        return 1 + self.num_pixels // DOWNSAMPLING


# ----------------------------------------------------------------------------- ConvNeXt-V2 1-D


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of (B, C, L)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN over (B, L, C): channels rescaled by their L2 norm over L relative to the mean norm."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        return self.gamma * (x * (norm / (norm.mean(dim=-1, keepdim=True) + 1e-6))) + self.beta + x


class ConvNextBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = GlobalResponseNorm(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).transpose(1, 2))
        y = self.pwconv2(self.grn(self.act(self.pwconv1(y))))
        return x + y.transpose(1, 2)


def stages(dims: tuple[int, ...], depths: tuple[int, ...]) -> nn.ModuleList:
    return nn.ModuleList([nn.Sequential(*[ConvNextBlock(dim) for _ in range(depth)]) for dim, depth in zip(dims, depths, strict=True)])


class ConvNextEncoder(nn.Module):
    def __init__(self, dims: tuple[int, ...], depths: tuple[int, ...], in_channels: int = 2) -> None:
        super().__init__()
        steps = [nn.Sequential(nn.Conv1d(in_channels, dims[0], 4, stride=4), ChannelNorm(dims[0], eps=1e-6))]
        steps += [nn.Sequential(ChannelNorm(dims[i], eps=1e-6), nn.Conv1d(dims[i], dims[i + 1], 2, stride=2))
                  for i in range(len(dims) - 1)]
        self.downsample_layers = nn.ModuleList(steps)
        self.stages = stages(dims, depths)
        self.norm = ChannelNorm(dims[-1], eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(step(x))
        return self.norm(x)


class ConvNextDecoder(nn.Module):
    def __init__(self, in_channels: int, dims: tuple[int, ...], depths: tuple[int, ...]) -> None:
        super().__init__()
        last = len(dims) - 2
        steps = [nn.Sequential(nn.ConvTranspose1d(in_channels, dims[0], 2, stride=2), ChannelNorm(dims[0], eps=1e-6))]
        steps += [nn.Sequential(ChannelNorm(dims[i], eps=1e-6),
                                nn.ConvTranspose1d(dims[i], dims[i + 1], 4 if i == last else 2, stride=4 if i == last else 2))
                  for i in range(len(dims) - 1)]
        self.upsample_layers = nn.ModuleList(steps)
        self.stages = stages(dims, depths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step, stage in zip(self.upsample_layers, self.stages, strict=True):
            x = stage(step(x))
        return x


# ----------------------------------------------------------------------------- quantisers and the latent grid


class LookupFreeQuantizer(nn.Module):
    """Token = the sign bits of the channels (after `project_in` when dim != log2(codebook_size))."""

    def __init__(self, dim: int, codebook_size: int) -> None:
        super().__init__()
        bits = int(math.log2(codebook_size))
        self.register_buffer("mask", 2 ** torch.arange(bits - 1, -1, -1))  # part of the upstream weights
        self.projected = dim != bits
        if self.projected:
            self.project_in = nn.Linear(dim, bits)
            self.project_out = nn.Linear(bits, dim)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """(B, dim, L) latents -> (B, L) int64 tokens."""
        z = z.float().transpose(1, 2)
        if self.projected:
            z = self.project_in(z)
        return ((z > 0).long() * self.mask).sum(dim=-1)

    def codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) tokens -> (B, dim, L) +/-1 codes (projected back when projected)."""
        codes = ((tokens[..., None] & self.mask) != 0).float() * 2.0 - 1.0
        if self.projected:
            codes = self.project_out(codes)
        return codes.transpose(1, 2)


class LatentGrid(nn.Module):
    """The codec's fixed wavelength grid, and linear interpolation between it and an observed grid."""

    def __init__(self, lambda_min: float, resolution: float, num_pixels: int) -> None:
        super().__init__()
        self.register_buffer("lambda_min", torch.tensor(lambda_min))
        self.register_buffer("resolution", torch.tensor(resolution))
        self.register_buffer("length", torch.tensor(num_pixels))
        self.register_buffer("wavelength", (torch.arange(num_pixels) * resolution + lambda_min).reshape(1, num_pixels))

    def to_latent(self, values: torch.Tensor, wavelength: torch.Tensor) -> torch.Tensor:
        """(B, N) values on the increasing observed grid `wavelength` (N,) -> (B, num_pixels)."""
        return interpolate(wavelength, values, self.wavelength[0])

    def to_observed(self, values: torch.Tensor, wavelength: torch.Tensor) -> torch.Tensor:
        """(B, num_pixels) latent-grid values -> (B, N) on `wavelength` (N,)."""
        return interpolate(self.wavelength[0], values, wavelength)


def interpolate(x: torch.Tensor, y: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of rows y (B, N) given at increasing x (N,) onto `at` (M,); 0 outside [x0, xN]."""
    segment = (torch.searchsorted(x, at) - 1).clamp(0, x.shape[0] - 2)
    slope = (y[:, :-1] - y[:, 1:]) / (x[:-1] - x[1:])
    out = y[:, segment] + (at - x[segment]) * slope[:, segment]
    return out.masked_fill((at < x[0]) | (at > x[-1]), 0.0)


# ----------------------------------------------------------------------------- the codec


class SpectrumCodec(nn.Module):
    """AION's DESI (and SDSS) spectrum codec: `tokens` (B, 273) from flux, and `decode` back to flux."""

    def __init__(self, cfg: SpectrumCodecConfig) -> None:
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.encoder = ConvNextEncoder(cfg.encoder_dims, cfg.encoder_depths)
        self.decoder = ConvNextDecoder(cfg.latent_channels, cfg.decoder_dims, cfg.decoder_depths)
        self.pre_quant_norm = nn.LayerNorm(cfg.latent_channels)
        self.quant_conv = nn.Conv1d(cfg.latent_channels, cfg.embedding_dim, 1)
        self.post_quant_conv = nn.Conv1d(cfg.embedding_dim, cfg.latent_channels, 1)
        self.quantizer = LookupFreeQuantizer(cfg.dim, cfg.codebook_size)
        self.register_buffer("normalization_buckets", torch.linspace(*cfg.normalization_range, cfg.codebook_size))
        self.latent_grid = LatentGrid(cfg.lambda_min, cfg.resolution, cfg.num_pixels)
        for module in self.modules():  # upstream's start; loaded weights replace it
            if isinstance(module, nn.Conv1d | nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def normalization_token(self, flux: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
        """(B,) bin of log10(1 + mean good flux), the mean at least 0.1."""
        mean = (flux * (~bad).to(flux.dtype)).sum(dim=-1) / ((~bad).sum(dim=-1) + 1.0)
        return self.bucket(torch.log10(mean.clamp_min(0.1) + 1.0))

    def bucket(self, values: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(values, self.normalization_buckets).clamp(0, self.cfg.codebook_size - 1)

    def tokens(self, flux: torch.Tensor, ivar: torch.Tensor, bad: torch.Tensor, wavelength: torch.Tensor) -> torch.Tensor:
        """(B, N) flux, inverse variance and bad-pixel mask (True = bad) on the increasing grid `wavelength`
        (N,) -> (B, 273) int64 tokens. Inputs are not modified."""
        cfg = self.cfg
        flux = torch.nan_to_num(flux.float())
        if cfg.clip_flux is not None:
            flux = flux.clamp(-cfg.clip_flux, cfg.clip_flux)
        ivar = torch.nan_to_num(ivar.float())
        if cfg.clip_ivar is not None:
            ivar = ivar.clamp(0.0, cfg.clip_ivar)
        norm_token = self.normalization_token(flux, bad)
        scale = (10.0 ** self.normalization_buckets[norm_token][:, None] - 1.0).clamp_min(0.1)
        flux = self.latent_grid.to_latent((flux / scale - 1.0) * cfg.input_scaling, wavelength)
        istd = self.latent_grid.to_latent(ivar.sqrt() / scale * cfg.input_scaling, wavelength)
        h = self.encoder(torch.asinh(torch.stack([flux, istd], dim=1)))
        latent = self.quant_conv(self.pre_quant_norm(h.transpose(1, 2)).transpose(1, 2))
        return torch.cat([norm_token[:, None].long(), self.quantizer.indices(latent)], dim=1)

    def decode(self, tokens: torch.Tensor, wavelength: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 273) tokens -> (flux, bad-pixel mask), (B, num_pixels) on the latent grid or (B, N) on
        `wavelength` (N,). A codec with one output channel marks no pixel bad (0.0.2 interpolates an
        infinite logit there, which turns into NaN)."""
        scale = (10.0 ** self.normalization_buckets[tokens[:, 0]][:, None] - 1.0).clamp_min(0.1)
        out = self.decoder(self.post_quant_conv(self.quantizer.codes(tokens[:, 1:])))
        flux, bad_logit = out[:, 0], out[:, 1] if out.shape[1] == 2 else None
        if wavelength is not None:
            flux = self.latent_grid.to_observed(flux, wavelength)
            bad_logit = None if bad_logit is None else self.latent_grid.to_observed(bad_logit, wavelength)
        bad = torch.zeros_like(flux, dtype=torch.bool) if bad_logit is None else bad_logit > 0  # sigmoid > 1/2
        return (flux + 1.0) * scale, bad


def to_upstream_key(key: str) -> str:
    for ours, theirs in RENAMES:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return key


def from_upstream_key(key: str) -> str:
    for ours, theirs in RENAMES:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return key

