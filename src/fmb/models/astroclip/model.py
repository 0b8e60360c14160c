"""AstroCLIP: a galaxy image encoder and a spectrum encoder aligned in one embedding space.

- Image backbone: a Vision Transformer in the DINOv2 layout (AstroDINO): conv patch
  embedding, a CLS token, learned positions (interpolated for other input sizes), pre-LN
  blocks with layerscale and drop-path, final LayerNorm (eps 1e-6).
- Spectrum backbone: SpecFormer. A spectrum (L pixels) is standardised per object (std
  floored at 0.2), cut into overlapping slices of 20 pixels with stride 10, each slice a token
  of 22 features (two leading zeros); a leading token carries the object's (mean - 2) / 2 and
  (std - 2) / 8. Linear 22 -> D plus learned positions, pre-LN blocks, final LayerNorm, and a
  reconstruction head D -> 22 used by its masked-modelling pre-training.
- Heads: a learned query cross-attends to the backbone tokens, then LayerNorm and an MLP
  (D -> 4D -> D) map to the shared space; the spectrum head adds the MLP as a residual, the
  image head does not (as in the reference).
- Loss: symmetric cross-entropy of scale * normalize(img) @ normalize(spec)^T, with a fixed
  multiplier (15.5 in the reference) or a learnable exp(log_scale) clamped to <= 100.

Attention everywhere goes through scaled_dot_product_attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fmb.models.checkpointing import run_blocks

# Image backbones: name -> (width, depth, heads). The reference AstroDINO is "large" with patch 12.
VIT_PRESETS: dict[str, tuple[int, int, int]] = {
    "demo": (64, 2, 4),
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}
# Spectrum backbones: name -> (width, depth, heads). The reference SpecFormer is "base".
SPECFORMER_PRESETS: dict[str, tuple[int, int, int]] = {
    "demo": (64, 2, 4),
    "small": (256, 4, 4),
    "base": (768, 6, 6),
}

STAT_SLOTS = 2  # leading features of every token; the statistics token fills them
STD_FLOOR = 0.2


@dataclass
class ViTShape:
    width: int
    depth: int
    heads: int
    patch_size: int = 12
    image_size: int = 144  # the grid of the stored positions; other sizes are interpolated
    drop_path: float = 0.0
    layerscale: float = 1e-5


@dataclass
class SpecFormerShape:
    width: int
    depth: int
    heads: int
    max_len: int = 800  # positions; 1 + 777 tokens for a DESI spectrum
    slice_length: int = 20  # token features: slice_length + 2 (22 in the reference)
    slice_stride: int = 10
    dropout: float = 0.0

    @property
    def features(self) -> int:
        return self.slice_length + STAT_SLOTS


# ----------------------------------------------------------------------------- shared blocks


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(batch, length, dim))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the residual branch of whole samples, rescaling the kept ones."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - rate)
    return x * keep / (1.0 - rate)


class Block(nn.Module):
    """Pre-LN transformer block; layerscale (DINOv2) when `layerscale` is set."""

    def __init__(self, dim: int, heads: int, eps: float, layerscale: float | None = None,
                 drop_path_rate: float = 0.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, 4 * dim, dropout)
        self.ls1 = LayerScale(dim, layerscale) if layerscale is not None else nn.Identity()
        self.ls2 = LayerScale(dim, layerscale) if layerscale is not None else nn.Identity()
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.ls1(self.attn(self.norm1(x))), self.drop_path_rate, self.training)
        return x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path_rate, self.training)


# ----------------------------------------------------------------------------- image backbone


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, H/p * W/p, D), raster order


class ViT(nn.Module):
    """DINOv2-layout Vision Transformer returning normalised tokens [CLS, patches...]."""

    def __init__(self, shape: ViTShape) -> None:
        super().__init__()
        self.shape = shape
        grid = shape.image_size // shape.patch_size
        self.patch_embed = PatchEmbed(shape.patch_size, shape.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, shape.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, shape.width))
        self.blocks = nn.ModuleList(
            Block(shape.width, shape.heads, eps=1e-6, layerscale=shape.layerscale, drop_path_rate=shape.drop_path)
            for _ in range(shape.depth)
        )
        self.norm = nn.LayerNorm(shape.width, eps=1e-6)
        self.activation_checkpointing = False  # recompute each block in backward (fmb.models.checkpointing)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def positions(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Stored positions, bicubically resampled when the patch grid differs from the stored one."""
        stored = self.pos_embed.shape[1] - 1
        side = math.isqrt(stored)
        if grid_h * grid_w == stored and grid_h == grid_w == side:
            return self.pos_embed
        patch_pos = self.pos_embed[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1).to(self.pos_embed.dtype)
        return torch.cat([self.pos_embed[:, :1], patch_pos], dim=1)

    def forward(self, images: torch.Tensor, with_positions: bool = True) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + N, D). `with_positions=False` feeds the bare patch embeddings
        (no CLS, no positions) through the blocks, which is what the published AstroCLIP image
        head was trained on."""
        patch = self.shape.patch_size
        x = self.patch_embed(images)
        if with_positions:
            x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
            x = x + self.positions(images.shape[2] // patch, images.shape[3] // patch)
        return self.norm(run_blocks(self.blocks, x, self.activation_checkpointing))


# ----------------------------------------------------------------------------- spectrum backbone


def spectrum_tokens(spectrum: torch.Tensor, slice_length: int = 20, slice_stride: int = 10) -> torch.Tensor:
    """(B, L) or (B, L, 1) flux -> (B, 1 + n, slice_length + 2) SpecFormer tokens.

    Standardised per object with the std floored at 0.2; overlapping slices (the last partial
    one dropped: 777 for a 7781-pixel DESI spectrum) take features 2..21; token 0 holds
    (mean - 2) / 2 and (std - 2) / 8 in features 0 and 1.
    """
    if spectrum.ndim == 3:
        spectrum = spectrum.squeeze(-1)
    spectrum = spectrum.float()
    mean = spectrum.mean(dim=1, keepdim=True)
    std = spectrum.std(dim=1, keepdim=True).clamp(min=STD_FLOOR)
    slices = ((spectrum - mean) / std).unfold(1, slice_length, slice_stride)  # (B, n, slice_length)
    tokens = F.pad(slices, (STAT_SLOTS, 0, 1, 0))
    stats = torch.cat([(mean - 2.0) / 2.0, (std - 2.0) / 8.0], dim=1)  # (B, 2)
    tokens[:, 0, :2] = stats
    return tokens


class SpecFormer(nn.Module):
    def __init__(self, shape: SpecFormerShape) -> None:
        super().__init__()
        self.shape = shape
        self.data_embed = nn.Linear(shape.features, shape.width)
        self.position_embed = nn.Embedding(shape.max_len, shape.width)
        self.dropout = nn.Dropout(shape.dropout)
        self.blocks = nn.ModuleList(Block(shape.width, shape.heads, eps=1e-5, dropout=shape.dropout)
                                    for _ in range(shape.depth))
        self.final_layernorm = nn.LayerNorm(shape.width)
        self.head = nn.Linear(shape.width, shape.features)  # reconstruction, for pre-training
        self.activation_checkpointing = False  # recompute each block in backward (fmb.models.checkpointing)
        # Embeddings ~ 1/sqrt(D); linear layers by depth, std 1/sqrt(2 fan_in depth).
        for table in (self.data_embed.weight, self.position_embed.weight):
            std = 1.0 / math.sqrt(shape.width)
            nn.init.trunc_normal_(table, std=std, a=-3 * std, b=3 * std)
        for module, depth in [(m, shape.depth) for m in self.blocks.modules()] + [(self.head, 0.5)]:
            if isinstance(module, nn.Linear):
                std = 1.0 / math.sqrt(2 * module.weight.shape[1] * depth)
                nn.init.trunc_normal_(module.weight, std=std, a=-3 * std, b=3 * std)
                nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, F) tokens -> (embedding (B, T, D), reconstruction (B, T, F))."""
        length = tokens.shape[1]
        if length > self.shape.max_len:
            raise ValueError(f"{length} spectrum tokens exceed max_len {self.shape.max_len}")
        x = self.data_embed(tokens) + self.position_embed.weight[:length]
        x = self.final_layernorm(run_blocks(self.blocks, self.dropout(x), self.activation_checkpointing))
        return x, self.head(x)


def chunk_mask(batch: int, length: int, chunks: int = 6, width: int = 50,
               device: torch.device | None = None) -> torch.Tensor:
    """(B, T) bool: `chunks` runs of `width` tokens, one at a random offset in each 1/chunks of the sequence."""
    section = length // chunks
    if section <= width:
        raise ValueError(f"{length} tokens are too few to mask {chunks} chunks of {width}")
    offsets = torch.randint(0, section - width, (batch, chunks), device=device)
    starts = offsets + torch.arange(chunks, device=device) * length // chunks
    pos = torch.arange(length, device=device)
    inside = (pos >= starts[..., None]) & (pos < starts[..., None] + width)
    return inside.any(dim=1)


def masked_modelling_loss(reconstruction: torch.Tensor, target: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked tokens' features that the masking changed (non-zero targets)."""
    where = (masked[..., None] & (target != 0)).float()
    return ((reconstruction.float() - target) ** 2 * where).sum() / where.sum().clamp(min=1.0)


# ----------------------------------------------------------------------------- heads and the full model


class CrossAttentionHead(nn.Module):
    """A learned query attends to the backbone tokens; LayerNorm; MLP (residual for spectra)."""

    def __init__(self, dim: int, backbone_dim: int, heads: int = 4, dropout: float = 0.1, residual: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.residual = residual
        self.query = nn.Parameter(torch.randn(1, 1, dim))
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(backbone_dim, dim)
        self.v_proj = nn.Linear(backbone_dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)
        self.mlp = MLP(dim, 4 * dim, dropout)
        for module in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, backbone_dim) -> (B, dim)."""
        batch, length, _ = tokens.shape
        dim = self.query.shape[-1]
        split = (batch, -1, self.heads, dim // self.heads)
        q = self.q_proj(self.query).expand(batch, -1, -1).reshape(split).transpose(1, 2)
        k = self.k_proj(tokens).reshape(split).transpose(1, 2)
        v = self.v_proj(tokens).reshape(split).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, 1, dim)
        x = self.norm(self.dropout(self.out_proj(attended)))[:, 0]
        return x + self.mlp(x) if self.residual else self.mlp(x)


class ImageEncoder(nn.Module):
    def __init__(self, backbone: ViT, embed_dim: int, heads: int, dropout: float, with_positions: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = CrossAttentionHead(embed_dim, backbone.shape.width, heads, dropout, residual=False)
        self.with_positions = with_positions

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images, with_positions=self.with_positions))


class SpectrumEncoder(nn.Module):
    def __init__(self, backbone: SpecFormer, embed_dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = CrossAttentionHead(embed_dim, backbone.shape.width, heads, dropout, residual=True)

    def forward(self, spectra: torch.Tensor) -> torch.Tensor:
        shape = self.backbone.shape
        embedding, _ = self.backbone(spectrum_tokens(spectra, shape.slice_length, shape.slice_stride))
        return self.head(embedding)


class AstroCLIP(nn.Module):
    def __init__(self, image: ViTShape, spectrum: SpecFormerShape, embed_dim: int = 1024, head_heads: int = 4,
                 head_dropout: float = 0.1, logit_scale: float = 15.5, learnable_scale: bool = False,
                 image_positions: bool = True) -> None:
        super().__init__()
        self.image_encoder = ImageEncoder(ViT(image), embed_dim, head_heads, head_dropout, image_positions)
        self.spectrum_encoder = SpectrumEncoder(SpecFormer(spectrum), embed_dim, head_heads, head_dropout)
        self.learnable_scale = learnable_scale
        if learnable_scale:
            self.log_scale = nn.Parameter(torch.tensor(math.log(logit_scale)))
        else:  # a buffer so that it follows the model's device; not saved (it is configuration)
            self.register_buffer("fixed_scale", torch.tensor(float(logit_scale)), persistent=False)

    def scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=100.0) if self.learnable_scale else self.fixed_scale

    def forward(self, images: torch.Tensor, spectra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image embeddings, spectrum embeddings, logit scale); embeddings not yet normalised."""
        return self.image_encoder(images), self.spectrum_encoder(spectra), self.scale()


def clip_logits(image: torch.Tensor, spectrum: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """scale * normalize(image) @ normalize(spectrum)^T, in fp32."""
    return scale * F.normalize(image.float(), dim=-1) @ F.normalize(spectrum.float(), dim=-1).T


def clip_loss(image: torch.Tensor, spectrum: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric cross-entropy: image i should pick spectrum i among the batch, and back."""
    logits = clip_logits(image, spectrum, scale)
    labels = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def retrieval_hits(query: torch.Tensor, keys: torch.Tensor, offset: int = 0,
                   ks: tuple[int, ...] = (1, 5)) -> dict[int, torch.Tensor]:
    """How many queries have their true partner among their top-k keys by cosine similarity.

    Query row i's partner is keys[offset + i] (offset: for queries processed in chunks).
    """
    similarity = F.normalize(query.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T
    partner = torch.arange(len(query), device=query.device) + offset
    true = similarity.gather(1, partner[:, None])
    # Rank of the true partner: how many keys score strictly higher (ties count in its favour).
    rank = (similarity > true).sum(dim=1)
    return {k: (rank < k).sum() for k in ks}
