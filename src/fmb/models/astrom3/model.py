"""AstroM3: trimodal CLIP over light curves, spectra and metadata, plus classification heads.

Read top to bottom: the Informer photometry encoder (ProbSparse self-attention that honours the
padding mask), the GalSpecNet spectra encoder, the metadata MLP, then `AstroM3`, which
standardises the metadata with training-split statistics kept as buffers, projects every
modality to a shared L2-normalised space and either returns the three embeddings with their
logit scales (`mode="clip"`) or class logits (`photo`, `spectra`, `meta`, `all`).

Incomplete data: `present` (batch, 3) says which modalities each object has. A missing metadata
value (NaN, or a column with no finite training value: `meta_used` False) is imputed with 0 after
standardisation, and the encoders see where: missingness flags enter through their own linear
maps (zero at initialisation, so complete data gives the published network exactly). The CLIP
loss of each pair runs over the objects that have both; `all` fuses the embeddings present.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fmb.data.surveys.astrom3 import N_CATALOGUE
from fmb.train.losses import masked_clip_loss

# Model inputs. The dataset gives 5 photometry channels per step; the model appends the 4
# standardised photometric features (amplitude, period, lksl_statistic, rfr_score) to get
# the published 9: time, flux, flux_err, amplitude, period, lksl, rfr, log10(MAD), time span.
N_PHOT_FEATURES = 4
N_METADATA = N_CATALOGUE + N_PHOT_FEATURES
N_SPECTRA_CHANNELS = 3
N_SPECTRA_PIXELS = 2575  # 3850..9000 Angstrom, step 2
ENCODERS = ("photometry", "spectra", "metadata")  # the order of `present` columns


@dataclass
class AstroM3ModelConfig:
    mode: Literal["clip", "photo", "spectra", "meta", "all"] = "clip"
    fusion: Literal["avg", "concat"] = "avg"  # mode "all": average or concatenate the embeddings
    embed_dim: int = 512
    # Informer (photometry)
    seq_len: int = 200
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 8
    d_ff: int = 512
    factor: int = 5  # ProbSparse: c in u = c * ceil(ln L) active queries and sampled keys
    p_dropout: float = 0.1
    # GalSpecNet (spectra)
    conv_channels: list[int] = field(default_factory=lambda: [64, 64, 32, 32])
    kernel_size: int = 3
    pool_size: int = 4
    s_dropout: float = 0.2
    # Metadata MLP
    m_hidden: int = 512
    m_dropout: float = 0.2
    logit_scale_init: float = 100.0
    # The 4 photometric features as auxiliary photometry inputs (False: treated as missing, for ablations)
    photometric_features: bool = True
    # Fine-tuning: a CLIP checkpoint (step directory or run directory) to start from.
    init_from: str | None = None
    freeze_encoders: bool = False


# ----------------------------------------------------------------------------- photometry


class ProbSparseAttention(nn.Module):
    """Informer self-attention: only the u queries with the most peaked attention (measured on
    u sampled keys) attend; the others output the mean of the values. Padded keys are never
    sampled nor attended, padded queries are never chosen, and the lazy mean runs over valid
    steps only, so outputs at valid steps do not depend on what the padding holds."""

    def __init__(self, d_model: int, n_heads: int, factor: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.factor = factor
        self.dropout = dropout
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        H = self.n_heads
        q, k, v = (proj(x).view(B, L, H, C // H).transpose(1, 2) for proj in (self.query, self.key, self.value))
        u = min(L, self.factor * math.ceil(math.log(L)))

        # Sample u valid keys per query: valid positions first, then index below the valid count.
        n_valid = mask.sum(1, keepdim=True).clamp_min(1)  # (B, 1)
        valid_first = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # (B, L)
        draw = (torch.rand(B, L * u, device=x.device) * n_valid).long().clamp_max(L - 1)
        sampled = valid_first.gather(1, draw).view(B, 1, L, u).expand(B, H, L, u)
        scores = q @ k.transpose(-2, -1)  # (B, H, L, L); cheaper than gathering keys at L=200
        scores_sampled = scores.gather(-1, sampled)
        sparsity = scores_sampled.amax(-1) - scores_sampled.mean(-1)  # (B, H, L)
        sparsity = sparsity.masked_fill(~mask[:, None, :], float("-inf"))
        top = sparsity.topk(u, dim=-1).indices  # (B, H, u)

        # Lazy queries: mean of the valid values.
        weights = (mask.to(v.dtype) / n_valid.to(v.dtype))[:, None, :, None]
        context = (v * weights).sum(2, keepdim=True).expand(B, H, L, C // H).clone()
        # Active queries: full attention over the valid keys.
        q_top = q.gather(2, top[..., None].expand(B, H, u, C // H))
        attended = F.scaled_dot_product_attention(
            q_top, k, v, attn_mask=mask[:, None, None, :], dropout_p=self.dropout if self.training else 0.0)
        context = context.scatter(2, top[..., None].expand(B, H, u, C // H), attended.to(context.dtype))
        return self.out(context.transpose(1, 2).reshape(B, L, C))


class InformerLayer(nn.Module):
    """Post-norm encoder layer (as in Informer): attention, then a position-wise GELU MLP."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, factor: int, dropout: float) -> None:
        super().__init__()
        self.attention = ProbSparseAttention(d_model, n_heads, factor, dropout)
        self.ff1 = nn.Linear(d_model, d_ff)
        self.ff2 = nn.Linear(d_ff, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.drop(self.attention(x, mask)))
        y = self.drop(self.ff2(self.drop(F.gelu(self.ff1(x)))))
        return self.norm2(x + y)


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    position = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)
    return table


class InformerEncoder(nn.Module):
    """(B, L, 9) light-curve steps + (B, L) mask -> (B, L * d_model), padded steps zeroed."""

    def __init__(self, cfg: AstroM3ModelConfig, in_channels: int) -> None:
        super().__init__()
        # Circular conv token embedding, no bias (as in Informer).
        self.token = nn.Conv1d(in_channels, cfg.d_model, kernel_size=3, padding=1, padding_mode="circular", bias=False)
        nn.init.kaiming_normal_(self.token.weight, mode="fan_in", nonlinearity="leaky_relu")
        self.register_buffer("positions", sinusoidal_positions(cfg.seq_len, cfg.d_model), persistent=False)
        self.drop = nn.Dropout(cfg.p_dropout)
        self.layers = nn.ModuleList(
            InformerLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.factor, cfg.p_dropout) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.out_dim = cfg.seq_len * cfg.d_model

    def forward(self, x: torch.Tensor, mask: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """`extra` (B, d_model), added to every step's token embedding (missingness flags)."""
        x = x * mask[..., None].to(x.dtype)  # the circular conv must not see padding values
        h = self.token(x.transpose(1, 2)).transpose(1, 2) + self.positions[: x.shape[1]]
        if extra is not None:
            h = h + extra[:, None, :]
        h = self.drop(h)
        for layer in self.layers:
            h = layer(h, mask)
        h = self.drop(self.norm(h)) * mask[..., None].to(h.dtype)
        return h.flatten(1)


# ----------------------------------------------------------------------------- spectra


class GalSpecNet(nn.Module):
    """1-D CNN: conv (k3, ReLU) per channel step, max-pool after all but the last; flattened."""

    def __init__(self, cfg: AstroM3ModelConfig) -> None:
        super().__init__()
        channels = [N_SPECTRA_CHANNELS, *cfg.conv_channels]
        self.convs = nn.ModuleList(nn.Conv1d(a, b, cfg.kernel_size) for a, b in zip(channels, channels[1:], strict=False))
        self.pool = nn.MaxPool1d(cfg.pool_size)
        self.drop = nn.Dropout(cfg.s_dropout)
        length = N_SPECTRA_PIXELS
        for i in range(len(self.convs)):
            length -= cfg.kernel_size - 1
            if i < len(self.convs) - 1:
                length //= cfg.pool_size
        self.out_dim = channels[-1] * length  # 1184 for the published setup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            if i < len(self.convs) - 1:
                x = self.pool(x)
        return self.drop(x.flatten(1))


# ----------------------------------------------------------------------------- metadata


class MetaMLP(nn.Module):
    """34 standardised catalogue values (0 where missing) and their missingness flags -> m_hidden."""

    def __init__(self, cfg: AstroM3ModelConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(N_CATALOGUE, cfg.m_hidden)
        self.missing = nn.Linear(N_CATALOGUE, cfg.m_hidden, bias=False)
        nn.init.zeros_(self.missing.weight)
        self.fc2 = nn.Linear(cfg.m_hidden, cfg.m_hidden)
        self.drop = nn.Dropout(cfg.m_dropout)
        self.out_dim = cfg.m_hidden

    def forward(self, x: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x) + self.missing(missing.to(x.dtype)))
        return self.drop(F.relu(self.fc2(self.drop(h))))


# ----------------------------------------------------------------------------- the model

MODALITIES = {"photo": ("photometry",), "spectra": ("spectra",), "meta": ("metadata",), "all": ENCODERS, "clip": ENCODERS}


class AstroM3(nn.Module):
    def __init__(self, cfg: AstroM3ModelConfig, num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.modalities = MODALITIES[cfg.mode]
        # Metadata standardisation (training-split statistics), saved with the weights.
        self.register_buffer("meta_mean", torch.zeros(N_METADATA))
        self.register_buffer("meta_std", torch.ones(N_METADATA))
        self.register_buffer("meta_used", torch.ones(N_METADATA, dtype=torch.bool))  # False: no finite training value
        if "photometry" in self.modalities:
            self.photometry_encoder = InformerEncoder(cfg, in_channels=9)
            self.photometry_proj = nn.Linear(self.photometry_encoder.out_dim, cfg.embed_dim)
            # Missingness flags of the 4 photometric features, added to every step's token embedding.
            self.feature_missing = nn.Linear(N_PHOT_FEATURES, cfg.d_model, bias=False)
            nn.init.zeros_(self.feature_missing.weight)
        if "spectra" in self.modalities:
            self.spectra_encoder = GalSpecNet(cfg)
            self.spectra_proj = nn.Linear(self.spectra_encoder.out_dim, cfg.embed_dim)
        if "metadata" in self.modalities:
            self.metadata_encoder = MetaMLP(cfg)
            self.metadata_proj = nn.Linear(self.metadata_encoder.out_dim, cfg.embed_dim)
        if cfg.mode == "clip":
            init = torch.full((3,), math.log(cfg.logit_scale_init))
            self.logit_scale = nn.Parameter(init)  # photometry-spectra, spectra-meta, meta-photometry
        else:
            width = cfg.embed_dim * (3 if cfg.mode == "all" and cfg.fusion == "concat" else 1)
            self.head = nn.Linear(width, num_classes)

    def set_metadata_stats(self, mean: torch.Tensor, std: torch.Tensor, used: torch.Tensor | None = None) -> None:
        self.meta_mean.copy_(mean)
        self.meta_std.copy_(std)
        self.meta_used.copy_(used if used is not None else torch.ones_like(self.meta_used))

    def standardised_metadata(self, metadata: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, missing): standardised with the training statistics, missing ones (non-finite
        or in an unused column) set to 0, the training mean."""
        meta = (metadata - self.meta_mean) / self.meta_std
        missing = ~torch.isfinite(meta) | ~self.meta_used
        if not self.cfg.photometric_features:
            missing[:, N_CATALOGUE:] = True
        return meta.masked_fill(missing, 0.0), missing

    def embed(self, photometry: torch.Tensor | None, photometry_mask: torch.Tensor | None,
              spectra: torch.Tensor | None, metadata: torch.Tensor) -> dict[str, torch.Tensor]:
        """L2-normalised embeddings of this model's modalities (the inputs of others may be None)."""
        meta, missing = self.standardised_metadata(metadata)
        out = {}
        if "photometry" in self.modalities:
            features = meta[:, None, N_CATALOGUE:].expand(-1, photometry.shape[1], -1)
            steps = torch.cat([photometry[..., :3], features, photometry[..., 3:]], dim=-1)
            flags = self.feature_missing(missing[:, N_CATALOGUE:].to(steps.dtype))
            out["photometry"] = self.photometry_proj(self.photometry_encoder(steps, photometry_mask, flags))
        if "spectra" in self.modalities:
            out["spectra"] = self.spectra_proj(self.spectra_encoder(spectra))
        if "metadata" in self.modalities:
            out["metadata"] = self.metadata_proj(self.metadata_encoder(meta[:, :N_CATALOGUE], missing[:, :N_CATALOGUE]))
        return {name: F.normalize(e, dim=-1) for name, e in out.items()}

    def forward(self, photometry: torch.Tensor | None, photometry_mask: torch.Tensor | None,
                spectra: torch.Tensor | None, metadata: torch.Tensor,
                present: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Embeddings (and `scales` or `logits`); `present` (batch, 3) in ENCODERS order, None: all
        present. In `all` mode the head sees the mean (or the concatenation, absent ones zero) of
        the embeddings an object has."""
        out = self.embed(photometry, photometry_mask, spectra, metadata)
        if self.cfg.mode == "clip":
            out["scales"] = self.logit_scale.exp().clamp(1.0, 100.0)
            return out
        embeddings = torch.stack([out[m] for m in self.modalities])  # (modalities, batch, dim)
        if present is not None:
            has = present[:, [ENCODERS.index(m) for m in self.modalities]].T[..., None].to(embeddings.dtype)
            embeddings = embeddings * has
        if self.cfg.mode == "all" and self.cfg.fusion == "concat":
            fused = torch.cat(list(embeddings), dim=-1)
        elif present is not None:
            fused = embeddings.sum(0) / has.sum(0).clamp_min(1.0)
        else:
            fused = embeddings.mean(0)
        out["logits"] = self.head(fused)
        return out


# ----------------------------------------------------------------------------- loss

CLIP_PAIRS = (("photometry", "spectra"), ("spectra", "metadata"), ("metadata", "photometry"))


def pair_name(a: str, b: str) -> str:
    return f"{a[:4]}_{b[:4]}"


def symmetric_clip_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                        both: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric cross-entropy of matching rows of a and b; with `both` (batch,) bool, over the rows
    that have both modalities only (the others are neither anchors nor candidates; fewer than two
    such rows give 0). Masked, not indexed: no host synchronisation, every row in the graph."""
    logits = scale * a @ b.T
    if both is not None:
        return masked_clip_loss(logits, both)
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def pair_presence(present: torch.Tensor) -> dict[str, torch.Tensor]:
    """(batch,) bool per CLIP pair: the objects that have both of its modalities."""
    return {pair_name(a, b): present[:, ENCODERS.index(a)] & present[:, ENCODERS.index(b)] for a, b in CLIP_PAIRS}


def trimodal_clip_loss(emb: dict[str, torch.Tensor], scales: torch.Tensor,
                       present: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The three pairwise symmetric cross-entropy losses (each with its own scale, each over the
    objects that have both modalities; `present` None: all) and their sum."""
    both = pair_presence(present) if present is not None else {}
    parts = {pair_name(a, b): symmetric_clip_loss(emb[a].float(), emb[b].float(), scales[i], both.get(pair_name(a, b)))
             for i, (a, b) in enumerate(CLIP_PAIRS)}
    parts["loss"] = sum(parts.values())
    return parts
