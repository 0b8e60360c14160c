"""AION image codec (weight-compatible with `polymathic-aion` 0.0.2) and the Euclid <-> HSC adapters.

Read top to bottom:
1. Band tables and the codec configuration (the fields of the upstream `config.json`).
2. The MagVit-style auto-encoder (same module tree, hence the same state-dict keys, as upstream).
3. The masked 9-band projection and finite scalar quantisation (FSQ).
4. `AionImageCodec`: preprocessing (centre crop 96, per-band clamp, HSC zero-point rescale, range
   compression, 9-band padding with a presence mask), encode / quantise / decode, and the exact
   inverse on decode for HSC as well as Legacy Survey (DES) bands. Inputs are never modified.
5. The U-Net adapters and `AionAdapters`, the Euclid -> HSC -> codec -> HSC -> Euclid round trip.

Loading weights from disk lives in `fmb.models.aion.weights`; this file has no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fmb.models.checkpointing import run_blocks

# ----------------------------------------------------------------------------- bands

# Fixed 9-band space of the codec: HSC g..y then Legacy Survey (DES) g..z.
BAND_INDEX = {"HSC-G": 0, "HSC-R": 1, "HSC-I": 2, "HSC-Z": 3, "HSC-Y": 4,
              "DES-G": 5, "DES-R": 6, "DES-I": 7, "DES-Z": 8}
# Inputs are clipped to +/- these values (native survey units) before anything else.
BAND_CLAMP = {"HSC-G": 80.0, "HSC-R": 110.0, "HSC-I": 200.0, "HSC-Z": 330.0, "HSC-Y": 500.0,
              "DES-G": 6.0, "DES-R": 15.0, "DES-I": 20.0, "DES-Z": 25.0}
HSC_BANDS = ("HSC-G", "HSC-R", "HSC-I", "HSC-Z", "HSC-Y")
LEGACY_BANDS = ("DES-G", "DES-R", "DES-I", "DES-Z")
# HSC fluxes (zero point 27) are brought to the Legacy Survey zero point 22.5.
HSC_ZP_SCALE = 10.0 ** ((27.0 - 22.5) / 2.5)
CROP = 96


def band_indices(bands: list[str] | tuple[str, ...]) -> list[int]:
    """Positions of `bands` in the 9-band space; one survey per call, no repeats."""
    unknown = [b for b in bands if b not in BAND_INDEX]
    if unknown or not bands:
        raise ValueError(f"unknown image bands {unknown or '(none given)'}; valid: {', '.join(BAND_INDEX)}")
    if len(set(bands)) != len(bands):
        raise ValueError(f"repeated image bands in {list(bands)}")
    if len({b.split('-')[0] for b in bands}) > 1:
        raise ValueError(f"bands {list(bands)} mix surveys; encode HSC and Legacy Survey images separately")
    return [BAND_INDEX[b] for b in bands]


@dataclass
class CodecConfig:
    """The image codec's `config.json` (keyword arguments of upstream `ImageCodec`), same defaults."""

    quantizer_levels: list[int] = field(default_factory=lambda: [7, 5, 5, 5, 5])
    hidden_dims: int = 512
    multisurvey_projection_dims: int = 54
    n_compressions: int = 2
    num_consecutive: int = 4
    embedding_dim: int = 5
    range_compression_factor: float = 0.01
    mult_factor: float = 10.0

    def check(self) -> None:
        if len(self.quantizer_levels) != self.embedding_dim:
            raise ValueError(f"quantizer_levels {self.quantizer_levels} must have embedding_dim={self.embedding_dim} entries")
        if any(level < 2 for level in self.quantizer_levels):
            raise ValueError(f"quantizer_levels must all be >= 2, got {self.quantizer_levels}")
        if self.hidden_dims % 2**self.n_compressions:
            raise ValueError(f"hidden_dims {self.hidden_dims} is not divisible by 2**n_compressions")
        if CROP % 2**self.n_compressions:
            raise ValueError(f"the {CROP} px crop is not divisible by 2**n_compressions={2**self.n_compressions}")


# ----------------------------------------------------------------------------- MagVit auto-encoder


# Winograd F(2x2, 3x3) (Lavin & Gray 2016) for the codec's wide 3x3 convolutions in CPU inference:
# each 4x4 input tile and 3x3 kernel is transformed so that a 2x2 output tile costs 16 products
# instead of 36, as 16 (out x in) matrix products over all tiles. oneDNN has no Winograd kernel
# for AVX2 CPUs; this takes a quarter to a third off a 512-wide 24 x 24 layer, with a smaller
# rounding error than the direct kernel's (benchmarks/aion_bench.py compares with upstream). The
# transformed weights are kept per layer (16/9 of its weights) until the weights change.
WINOGRAD_MIN_CHANNELS = 256  # below this the matrix products are too small to pay for the transforms


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """(out, in, 3, 3) kernels -> (16, out, in): G g G^T, flattened over the 4 x 4 tile positions."""
    transform = weight.new_tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
    kron = torch.kron(transform, transform)  # (16, 9): row 4a + b, column 3k + l
    return (kron @ weight.reshape(-1, 9).T).view(16, *weight.shape[:2])


def _input_transform(d0: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor, d3: torch.Tensor, out: torch.Tensor) -> None:
    """out[0..3] = B^T (d0, d1, d2, d3), the 1-d input transform of F(2, 3)."""
    torch.sub(d0, d2, out=out[0])
    torch.add(d1, d2, out=out[1])
    torch.sub(d2, d1, out=out[2])
    torch.sub(d1, d3, out=out[3])


def winograd_conv3x3(x: torch.Tensor, transformed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Same-padded stride-1 3x3 convolution of x (B, C, H, W), H and W even, by F(2x2, 3x3).
    `transformed` is `winograd_weight(weight)`. Inference only: the `out=` writes have no autograd."""
    batch, channels, height, width = x.shape
    out_channels = transformed.shape[1]
    rows, cols = height // 2, width // 2
    padded = F.pad(x, (1, 1, 1, 1)).transpose(0, 1)  # (C, B, H + 2, W + 2): tiles of all images side by side
    # Even and odd columns apart once, so every tile column below is a contiguous slice.
    parity = x.new_empty(2, channels, batch, height + 2, cols + 1)
    parity[0].copy_(padded[..., 0::2])
    parity[1].copy_(padded[..., 1::2])
    even, odd = parity
    across = x.new_empty(4, channels, batch, height + 2, cols)
    _input_transform(even[..., :cols], odd[..., :cols], even[..., 1:], odd[..., 1:], across)
    tiles = x.new_empty(4, 4, channels, batch, rows, cols)
    for q in range(4):
        _input_transform(*(across[q][:, :, k:k + 2 * rows:2] for k in range(4)), tiles[:, q])
    m = torch.bmm(transformed, tiles.view(16, channels, -1)).view(4, 4, out_channels, batch, rows, cols)
    if bias is not None:
        m[1, 1] += bias.view(-1, 1, 1, 1)  # the (1, 1) term reaches all four outputs of a tile with weight 1
    # Output transform A^T m A, A^T = [[1, 1, 1, 0], [0, 1, -1, -1]], first over tile rows, then columns.
    half = x.new_empty(2, 4, out_channels, batch, rows, cols)
    torch.add(m[0], m[1], out=half[0]).add_(m[2])
    torch.sub(m[1], m[2], out=half[1]).sub_(m[3])
    y = x.new_empty(2, 2, out_channels, batch, rows, cols)
    torch.add(half[:, 0], half[:, 1], out=y[:, 0]).add_(half[:, 2])
    torch.sub(half[:, 1], half[:, 2], out=y[:, 1]).sub_(half[:, 3])
    return y.permute(3, 2, 4, 0, 5, 1).reshape(batch, out_channels, height, width)


class SameConv2d(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim_in, dim_out, kernel_size, padding=kernel_size // 2)
        self._winograd: tuple[tuple, torch.Tensor] | None = None  # (weight identity, transformed weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_winograd(x):
            return winograd_conv3x3(x, self._winograd_weight(), self.conv.bias)
        return self.conv(x)

    def _use_winograd(self, x: torch.Tensor) -> bool:
        weight = self.conv.weight
        return (weight.shape[-1] == 3 and min(weight.shape[:2]) >= WINOGRAD_MIN_CHANNELS and x.device.type == "cpu"
                and x.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
                and x.shape[-1] % 2 == 0 and x.shape[-2] % 2 == 0
                and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))

    def _winograd_weight(self) -> torch.Tensor:
        # Transformed once per weight value (the version counter moves with every in-place update).
        weight = self.conv.weight
        key = (weight.data_ptr(), weight._version)
        if self._winograd is None or self._winograd[0] != key:
            with torch.no_grad():
                self._winograd = (key, winograd_weight(weight))
        return self._winograd[1]


class SqueezeExcite(nn.Module):
    """Global-context gating: a softmax-weighted spatial average drives per-channel gates."""

    def __init__(self, dim: int, hidden_min: int = 16) -> None:
        super().__init__()
        hidden = max(hidden_min, dim // 2)
        self.to_k = nn.Conv2d(dim, 1, 1)
        self.net = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.LeakyReLU(0.1), nn.Conv2d(hidden, dim, 1), nn.Sigmoid())
        # Gates start closed, so a fresh residual unit is close to the identity.
        nn.init.zeros_(self.net[2].weight)
        nn.init.constant_(self.net[2].bias, -10.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.to_k(x).flatten(2).softmax(dim=-1)  # (B, 1, HW)
        context = torch.bmm(x.flatten(2), weights.transpose(1, 2))  # (B, C, 1)
        return self.net(context.unsqueeze(-1)) * x


class ResidualUnit(nn.Module):
    def __init__(self, dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(SameConv2d(dim, dim, kernel_size), nn.ELU(), nn.Conv2d(dim, dim, 1), nn.ELU(),
                                 SqueezeExcite(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + x


class Downsample(nn.Module):
    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim_out, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """1x1 conv to 4x channels, SiLU, then depth-to-space (pixel shuffle) by 2."""

    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        conv = nn.Conv2d(dim, dim_out * 4, 1)
        # The four sub-pixels start with the same weights: a fresh layer upsamples by repetition.
        weight = torch.empty(dim_out, dim, 1, 1)
        nn.init.kaiming_uniform_(weight)
        with torch.no_grad():
            conv.weight.copy_(weight.repeat_interleave(4, dim=0))
            conv.bias.zero_()
        self.net = nn.Sequential(conv, nn.SiLU(), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ChannelsLast(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


class ChannelsFirst(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


def residual_stack(dim: int, count: int) -> nn.Sequential:
    return nn.Sequential(*[ResidualUnit(dim) for _ in range(count)])


class MagVitAE(nn.Module):
    """Conv encoder/decoder: widths hidden/2^n ... hidden, n stride-2 steps, LayerNorm before quantisation.

    Module names and order follow the upstream tree so that state-dict keys match one to one
    (`encoder_layers.K...`, `decoder_layers.K...`, `conv_in`, `conv_out`).
    """

    def __init__(self, n_bands: int, hidden_dims: int, n_compressions: int, num_consecutive: int) -> None:
        super().__init__()
        dim = hidden_dims // 2**n_compressions
        self.conv_in = SameConv2d(n_bands, dim, 7)
        self.conv_out = SameConv2d(dim, n_bands, 3)
        encoder: list[nn.Module] = [ResidualUnit(dim)]
        decoder: list[nn.Module] = [ResidualUnit(dim)]
        for _ in range(n_compressions):
            encoder += [Downsample(dim, dim * 2), residual_stack(dim * 2, num_consecutive)]
            decoder += [Upsample(dim * 2, dim), residual_stack(dim * 2, num_consecutive)]
            dim *= 2
        encoder += [SameConv2d(dim, dim, 7), residual_stack(dim, num_consecutive),
                    nn.Sequential(ChannelsLast(), nn.LayerNorm(dim), ChannelsFirst())]
        decoder += [SameConv2d(dim, dim, 3), residual_stack(dim, num_consecutive)]
        self.encoder_layers = nn.ModuleList(encoder)
        self.decoder_layers = nn.ModuleList(decoder[::-1])  # built from the output end
        self.checkpointing = False  # recompute each layer in backward (activation checkpointing)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_body(self.conv_in(x))

    def encode_body(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder after `conv_in`."""
        return run_blocks(self.encoder_layers, x, self.checkpointing)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.decode_body(x))

    def decode_body(self, x: torch.Tensor) -> torch.Tensor:
        """The decoder before `conv_out`."""
        return run_blocks(self.decoder_layers, x, self.checkpointing)


# ----------------------------------------------------------------------------- projection and FSQ


class SubsampledLinear(nn.Module):
    """Per-pixel linear map between the 9-band space and the projection space.

    Into the projection (`subsample_in`): absent bands are zeroed and the output is scaled by
    sqrt(dim_in / n_present), so images with fewer bands keep a comparable amplitude. Out of it:
    the output channels of absent bands are zeroed.
    """

    def __init__(self, dim_in: int, dim_out: int, subsample_in: bool) -> None:
        super().__init__()
        layer = nn.Linear(dim_in, dim_out)
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.bias = nn.Parameter(layer.bias.detach().clone())
        self.subsample_in = subsample_in

    def forward(self, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), present (B, 9) bool."""
        x = x.permute(0, 2, 3, 1)
        mask = present[:, None, None, :].to(x.dtype)
        if self.subsample_in:
            scale = (self.weight.shape[1] / present.sum(dim=1).to(x.dtype)).sqrt()
            y = F.linear(x * mask, self.weight, self.bias) * scale[:, None, None, None]
        else:
            y = F.linear(x, self.weight, self.bias) * mask
        return y.permute(0, 3, 1, 2)


class FSQ(nn.Module):
    """Finite scalar quantisation: each latent channel is bounded with tanh and rounded to its levels.

    Token index = sum_c digit_c * prod(levels[:c]) with digit_c in [0, levels_c). Computed in fp32
    with integer digits, so the index never depends on float truncation.
    """

    def __init__(self, levels: list[int], eps: float = 1e-3) -> None:
        super().__init__()
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.int32))  # part of the upstream weights
        self.register_buffer("basis", torch.tensor([math.prod(levels[:i]) for i in range(len(levels))]),
                             persistent=False)
        self.eps = eps

    def _per_channel(self, ndim: int) -> torch.Tensor:
        return self.levels.float().view(1, -1, *([1] * (ndim - 2)))

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        levels = self._per_channel(z.ndim)
        half = (levels - 1) * (1 + self.eps) / 2
        offset = torch.where(levels % 2 == 1, 0.0, 0.5)
        return torch.tanh(z + torch.atanh(offset / half)) * half - offset

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, E, ...) -> quantised values in [-1, 1], straight-through gradient for the rounding."""
        bounded = self.bound(z.float())
        rounded = bounded + (bounded.round() - bounded).detach()
        return rounded / torch.div(self._per_channel(z.ndim), 2, rounding_mode="floor")

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, E, ...) -> token indices (B, ...) int64."""
        half = torch.div(self._per_channel(z.ndim), 2, rounding_mode="floor")
        digits = (self.bound(z.float()).round() + half).long()
        basis = self.basis.view(1, -1, *([1] * (z.ndim - 2)))
        return (digits * basis).sum(dim=1)

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token indices (B, ...) -> quantised values (B, E, ...)."""
        basis = self.basis.view(1, -1, *([1] * (tokens.ndim - 1)))
        levels = self.levels.long().view_as(basis)
        digits = (tokens.long().unsqueeze(1) // basis) % levels
        half = torch.div(levels, 2, rounding_mode="floor")
        return (digits - half).float() / half.float()


# ----------------------------------------------------------------------------- the codec


class AionImageCodec(nn.Module):
    """AION image codec: flux images of HSC or Legacy Survey bands <-> 24 x 24 FSQ tokens.

    `encode` returns the pre-quantisation latents (B, E, g, g); `indices` the tokens (B, g*g);
    `decode` maps quantised latents back to flux in the requested bands, inverting the range
    compression and (for HSC) the zero-point rescale. Parameter names match upstream except
    `quantizer.levels` (upstream `_quantizer.levels`, renamed on load).
    """

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        cfg.check()
        self.cfg = cfg
        nbands = len(BAND_INDEX)
        self.subsample_in = SubsampledLinear(nbands, cfg.multisurvey_projection_dims, subsample_in=True)
        self.subsample_out = SubsampledLinear(cfg.multisurvey_projection_dims, nbands, subsample_in=False)
        self.model = MagVitAE(cfg.multisurvey_projection_dims, cfg.hidden_dims, cfg.n_compressions, cfg.num_consecutive)
        self.pre_quant_proj = nn.Conv2d(cfg.hidden_dims, cfg.embedding_dim, 1)
        self.post_quant_proj = nn.Conv2d(cfg.embedding_dim, cfg.hidden_dims, 1)
        self.quantizer = FSQ(cfg.quantizer_levels)
        names = list(BAND_INDEX)
        self.register_buffer("clamp", torch.tensor([BAND_CLAMP[b] for b in names]), persistent=False)
        self._tables: dict[tuple, torch.Tensor] = {}
        self.register_buffer("zp_scale", torch.tensor([HSC_ZP_SCALE if b.startswith("HSC") else 1.0 for b in names]),
                             persistent=False)

    # -- preprocessing (pure functions of the input: nothing is modified in place)

    def _band_table(self, bands: list[str] | tuple[str, ...], device: torch.device) -> torch.Tensor:
        # Cached: building the index tensor on a GPU each call would be a host-to-device copy per step.
        key = (tuple(bands), str(device))
        if key not in self._tables:
            self._tables[key] = torch.tensor(band_indices(bands), device=device)
        return self._tables[key]

    def compress(self, flux: torch.Tensor, bands: list[str] | tuple[str, ...]) -> torch.Tensor:
        """Zero-point rescale and range compression: arcsinh(x / f) * f * mult."""
        idx = self._band_table(bands, flux.device)
        f = self.cfg.range_compression_factor
        x = flux / self.zp_scale[idx].view(1, -1, 1, 1).to(flux.dtype)
        return torch.asinh(x / f) * (f * self.cfg.mult_factor)

    def decompress(self, values: torch.Tensor, bands: list[str] | tuple[str, ...]) -> torch.Tensor:
        """Exact inverse of `compress`, for every band (HSC included)."""
        idx = self._band_table(bands, values.device)
        f = self.cfg.range_compression_factor
        x = torch.sinh(values / (f * self.cfg.mult_factor)) * f
        return x * self.zp_scale[idx].view(1, -1, 1, 1).to(x.dtype)

    def preprocess(self, flux: torch.Tensor, bands: list[str] | tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n, H, W) flux -> (B, 9, 96, 96) padded compressed image and the (B, 9) presence mask."""
        if flux.ndim != 4 or flux.shape[1] != len(bands):
            raise ValueError(f"expected a (batch, {len(bands)} bands, H, W) flux tensor for bands {list(bands)}, "
                             f"got shape {tuple(flux.shape)}")
        height, width = flux.shape[-2:]
        if height < CROP or width < CROP:
            raise ValueError(f"images must be at least {CROP} x {CROP} pixels for the AION codec, got {height} x {width}")
        idx = self._band_table(bands, flux.device)
        top, left = (height - CROP) // 2, (width - CROP) // 2
        x = flux[:, :, top:top + CROP, left:left + CROP].float()  # arcsinh / sinh need fp32 under autocast
        limit = self.clamp[idx].view(1, -1, 1, 1).to(x.dtype)
        x = self.compress(torch.maximum(torch.minimum(x, limit), -limit), bands)
        padded = x.new_zeros(x.shape[0], len(BAND_INDEX), CROP, CROP)
        padded[:, idx] = x
        present = torch.zeros(x.shape[0], len(BAND_INDEX), dtype=torch.bool, device=x.device)
        present[:, idx] = True
        return padded, present

    # -- encode / quantise / decode

    def encode(self, flux: torch.Tensor, bands: list[str] | tuple[str, ...]) -> torch.Tensor:
        """Pre-quantisation latents (B, E, g, g)."""
        return self.pre_quant_proj(self.encode_features(flux, bands))

    def encode_features(self, flux: torch.Tensor, bands: list[str] | tuple[str, ...]) -> torch.Tensor:
        """Encoder output before the 1x1 projection (B, hidden_dims, g, g)."""
        return self.encode_preprocessed(*self.preprocess(flux, bands))

    def encode_preprocessed(self, padded: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """`encode_features` of what `preprocess` returned (for callers that also need the preprocessed input)."""
        return self.model.encode_body(self._stem(padded, present))

    def _stem(self, padded: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """`model.conv_in(subsample_in(padded, present))` as one convolution over 9 + 1 input channels.

        The projection is per-pixel affine, so it folds into conv_in's weights (10 input channels
        instead of 54: a fifth of the FLOPs); its bias becomes a constant channel of ones, zero in
        the padding like the projected image it replaces, and its per-image scale is applied to the
        output. The result is conv_in of the projection up to float rounding.
        """
        proj, conv = self.subsample_in, self.model.conv_in.conv
        flat = conv.weight.flatten(2)  # (out, 54, k*k)
        weight = torch.cat([torch.matmul(proj.weight.T, flat), torch.matmul(proj.bias, flat).unsqueeze(1)], dim=1)
        weight = weight.view(*weight.shape[:2], *conv.weight.shape[2:])
        ones = padded.new_ones(padded.shape[0], 1, *padded.shape[2:])
        x = torch.cat([padded * present[:, :, None, None].to(padded.dtype), ones], dim=1)
        scale = (proj.weight.shape[1] / present.sum(dim=1).to(padded.dtype)).sqrt()
        y = F.conv2d(x, weight, padding=conv.padding)
        return torch.addcmul(conv.bias.view(1, -1, 1, 1).to(y.dtype), y, scale.view(-1, 1, 1, 1).to(y.dtype))

    def _head(self, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """`subsample_out(model.conv_out(h))` in the bands `idx`, as one convolution: both maps are
        linear, so their weights compose exactly (n output channels instead of 54, then 9)."""
        conv, proj = self.model.conv_out.conv, self.subsample_out
        weight = (proj.weight[idx] @ conv.weight.flatten(1)).view(len(idx), *conv.weight.shape[1:])
        bias = proj.weight[idx] @ conv.bias + proj.bias[idx]
        return F.conv2d(h, weight, bias, padding=conv.padding)

    def indices(self, flux: torch.Tensor, bands: list[str] | tuple[str, ...]) -> torch.Tensor:
        """Token indices (B, g*g) int64, in raster order."""
        return self.quantizer.indices(self.encode(flux, bands)).flatten(1)

    def decode_compressed(self, quantized: torch.Tensor, bands: list[str] | tuple[str, ...],
                          clamp: bool = False) -> torch.Tensor:
        """Quantised latents (B, E, g, g) -> range-compressed values (B, n, 96, 96) in `bands`.

        clamp=True limits each band to the clamp range the encoder accepts, which keeps an
        untrained decoder's outputs bounded.
        """
        idx = self._band_table(bands, quantized.device)
        values = self._head(self.model.decode_body(self.post_quant_proj(quantized)), idx).float()
        if clamp:
            f, mult = self.cfg.range_compression_factor, self.cfg.mult_factor
            limit = torch.asinh(self.clamp[idx] / self.zp_scale[idx] / f) * f * mult
            limit = limit.view(1, -1, 1, 1).to(values.dtype)
            values = torch.maximum(torch.minimum(values, limit), -limit)
        return values

    def decode(self, quantized: torch.Tensor, bands: list[str] | tuple[str, ...], clamp: bool = False) -> torch.Tensor:
        """Quantised latents (B, E, g, g) -> flux (B, n, 96, 96) in `bands` (see `decode_compressed`)."""
        return self.decompress(self.decode_compressed(quantized, bands, clamp), bands)

    def compressed_round_trip(self, flux: torch.Tensor, bands: list[str] | tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the preprocessed input, its reconstruction through the quantiser), both range-compressed
        (B, n, 96, 96): the space an auto-encoder objective for the codec compares them in."""
        padded, present = self.preprocess(flux, bands)
        latent = self.pre_quant_proj(self.encode_preprocessed(padded, present))
        decoded = self.decode_compressed(self.quantizer.quantize(latent).to(latent.dtype), bands)
        return padded[:, self._band_table(bands, flux.device)], decoded

    def decode_indices(self, tokens: torch.Tensor, bands: list[str] | tuple[str, ...]) -> torch.Tensor:
        """Token indices (B, g*g) -> flux (B, n, 96, 96)."""
        grid = math.isqrt(tokens.shape[1])
        if grid * grid != tokens.shape[1]:
            raise ValueError(f"{tokens.shape[1]} tokens do not form a square grid")
        z = self.quantizer.lookup(tokens.reshape(tokens.shape[0], grid, grid))
        return self.decode(z.to(self.post_quant_proj.weight.dtype), bands)

    def forward(self, flux: torch.Tensor, bands: list[str] | tuple[str, ...]) -> torch.Tensor:
        """Round trip: encode, quantise, decode to the same bands."""
        return self.decode(self.quantizer.quantize(self.encode(flux, bands)), bands)

    def encoder_parameters(self) -> list[nn.Parameter]:
        parts = [self.subsample_in, self.model.conv_in, self.model.encoder_layers, self.pre_quant_proj]
        return [p for part in parts for p in part.parameters()]

    def decoder_parameters(self) -> list[nn.Parameter]:
        parts = [self.post_quant_proj, self.model.decoder_layers, self.model.conv_out, self.subsample_out]
        return [p for part in parts for p in part.parameters()]


# ----------------------------------------------------------------------------- adapters

Norm = Literal["batch", "group", "none"]


def norm_layer(kind: Norm, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.Identity()


class ConvBlock(nn.Sequential):
    """(conv3x3 - norm - ReLU) x 2."""

    def __init__(self, dim_in: int, dim_out: int, norm: Norm) -> None:
        bias = norm == "none"
        super().__init__(nn.Conv2d(dim_in, dim_out, 3, padding=1, bias=bias), norm_layer(norm, dim_out), nn.ReLU(inplace=True),
                         nn.Conv2d(dim_out, dim_out, 3, padding=1, bias=bias), norm_layer(norm, dim_out), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """U-Net: `depth` max-pool steps with widths hidden * 2^k, bilinear upsampling, skip concatenation."""

    def __init__(self, dim_in: int, dim_out: int, depth: int = 2, hidden: int = 16, norm: Norm = "batch") -> None:
        super().__init__()
        widths = [hidden * 2**k for k in range(depth + 1)]
        self.down = nn.ModuleList([ConvBlock(dim_in if k == 0 else widths[k - 1], widths[k], norm) for k in range(depth)])
        self.bottom = ConvBlock(widths[depth - 1] if depth else dim_in, widths[depth], norm)
        self.up = nn.ModuleList([ConvBlock(widths[k + 1] + widths[k], widths[k], norm) for k in reversed(range(depth))])
        self.head = nn.Conv2d(widths[0], dim_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottom(x)
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)


class AionAdapters(nn.Module):
    """Euclid (4 bands) -> HSC-like (5 bands) -> AION codec -> HSC -> Euclid.

    The adapters see arcsinh-compressed inputs (Euclid: arcsinh(x / euclid_softening); HSC: the
    codec's own range compression), so their inputs stay O(1) whatever the flux scale; they
    output flux. gradient="ste" passes the codec as the identity in backward (and runs it
    without a graph); "full" back-propagates through it.
    """

    def __init__(self, codec: AionImageCodec, n_euclid: int = 4, depth: int = 2, hidden: int = 16, norm: Norm = "batch",
                 euclid_softening: float = 0.01, gradient: Literal["ste", "full"] = "ste",
                 clamp_decoded: bool = True, latent_consistency: bool = False) -> None:
        super().__init__()
        self.codec = codec
        self.euclid_to_hsc = UNet(n_euclid, len(HSC_BANDS), depth, hidden, norm)
        self.hsc_to_euclid = UNet(len(HSC_BANDS), n_euclid, depth, hidden, norm)
        self.euclid_softening = euclid_softening
        self.gradient = gradient
        self.clamp_decoded = clamp_decoded
        self.latent_consistency = latent_consistency

    def to_hsc(self, euclid: torch.Tensor) -> torch.Tensor:
        return self.euclid_to_hsc(torch.asinh(euclid.float() / self.euclid_softening))

    def to_euclid(self, hsc: torch.Tensor) -> torch.Tensor:
        return self.hsc_to_euclid(self.codec.compress(hsc.float(), HSC_BANDS))

    def codec_round_trip(self, hsc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latent = self.codec.encode(hsc, HSC_BANDS)
        quantized = self.codec.quantizer.quantize(latent).to(latent.dtype)
        return latent, self.codec.decode(quantized, HSC_BANDS, clamp=self.clamp_decoded)

    def forward(self, euclid: torch.Tensor) -> dict[str, torch.Tensor]:
        """Keys: hsc (Euclid -> HSC adapter output, HSC flux), hsc_decoded (the codec's reconstruction of
        it; straight-through in `ste` mode), euclid (HSC -> Euclid output, Euclid flux), latent
        (pre-quantisation latents of hsc) and, with latent consistency, latent_decoded (of hsc_decoded)."""
        hsc = self.to_hsc(euclid)
        if self.gradient == "ste":
            with torch.no_grad():
                latent, decoded = self.codec_round_trip(hsc)
            decoded = hsc + (decoded - hsc).detach()
        else:
            latent, decoded = self.codec_round_trip(hsc)
        out = {"hsc": hsc, "hsc_decoded": decoded, "euclid": self.to_euclid(decoded), "latent": latent}
        if self.latent_consistency:
            out["latent_decoded"] = self.codec.encode(decoded, HSC_BANDS)
        return out
