"""The AION transformer: a 4M-style multimodal masked encoder-decoder over codec tokens, weight-compatible
with `polymathic-aion` 0.0.2 (its saved `config.json` + `model.safetensors` load key for key).

Read top to bottom:
1. The modality table: vocabulary and token grid of every AION token key (tok_image_hsc, tok_z, ...).
2. `TransformerConfig`: the fields of the upstream `config.json`, and the published sizes as presets.
3. Building blocks: LayerNorm (optionally without bias), attention (SDPA), feed-forward, blocks.
4. `TokenEmbedding`: one modality's token embedding, fixed sin-cos positions and learned modality vector.
5. `AionTransformer`: selecting the encoder tokens under a budget, `encode`, and `predict` (decoder logits).

How upstream's `AION.encode(tokens, num_encoder_tokens=N)` works, and so this one:
- the modalities' tokens are concatenated in the order given; masked tokens (input masks, True = absent)
  go to the end, each group keeping its order, and the first N tokens are kept (the package default
  N is 256, AION's README uses 600; tokens beyond N are dropped, not sampled);
- kept-but-masked tokens are zeroed and hidden from attention (as keys);
- the output is not the encoder's last layer itself but the decoder's context:
  `decoder_proj_context(encoder_norm(x)) + position/modality embeddings`, one vector per kept token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------- modalities


@dataclass(frozen=True)
class ModalitySpec:
    """A token key of AION: its vocabulary and the grid its fixed positions are laid out on."""

    vocab: int
    rows: int = 1
    cols: int = 1
    sequence: bool = False  # variable-length token list (the catalog): 1-D positions of its valid tokens, id 0 pads

    @property
    def num_tokens(self) -> int:
        return self.rows * self.cols


_SCALARS = ([f"tok_mag_{b}" for b in "grizy"] + [f"tok_a_{b}" for b in "grizy"]
            + ["tok_shape11", "tok_shape12", "tok_shape22", "tok_ebv"]
            + [f"tok_flux_{b}" for b in ("g", "r", "i", "z", "w1", "w2", "w3", "w4")]
            + ["tok_shape_r", "tok_shape_e1", "tok_shape_e2"]
            + [f"tok_flux_{b}_gaia" for b in ("g", "bp", "rp")] + ["tok_parallax", "tok_ra", "tok_dec"])
MODALITIES: dict[str, ModalitySpec] = {
    "tok_image_hsc": ModalitySpec(4375, 24, 24),  # HSC g..y image codec: 24 x 24 FSQ tokens
    "tok_image": ModalitySpec(4375, 24, 24),  # Legacy Survey image, same codec
    "tok_segmap": ModalitySpec(1000, 12, 12),
    "tok_spectrum_desi": ModalitySpec(1024, 273),  # normalisation token + 272 LFQ tokens
    "tok_spectrum_sdss": ModalitySpec(1024, 273),
    "tok_xp_bp": ModalitySpec(1024, 55),
    "tok_xp_rp": ModalitySpec(1024, 55),
    "tok_z": ModalitySpec(1025),  # spectroscopic redshift
    "catalog": ModalitySpec(3468, 50, sequence=True),
    **{name: ModalitySpec(1024) for name in _SCALARS},
}
IMAGE_HSC, SPECTRUM_DESI, REDSHIFT = "tok_image_hsc", "tok_spectrum_desi", "tok_z"
DEFAULT_ENCODER_TOKENS = 256  # upstream AION.encode's num_encoder_tokens

# ----------------------------------------------------------------------------- configuration

SIZE_KEYS = ("dim", "encoder_depth", "decoder_depth", "num_heads")
PRESETS: dict[str, dict[str, int]] = {  # published AION-1 sizes, and fmb's demo stand-in
    "base": {"dim": 768, "encoder_depth": 12, "decoder_depth": 12, "num_heads": 12},  # ~300M parameters
    "large": {"dim": 1024, "encoder_depth": 24, "decoder_depth": 24, "num_heads": 16},  # ~800M
    "xlarge": {"dim": 2048, "encoder_depth": 24, "decoder_depth": 24, "num_heads": 32},  # ~3B
    "demo": {"dim": 64, "encoder_depth": 2, "decoder_depth": 2, "num_heads": 4},  # random stand-in only
}
ACTIVATIONS = {"GELU": nn.GELU, "SiLU": nn.SiLU}


@dataclass
class TransformerConfig:
    """Upstream's `config.json` (keyword arguments of its `FM` / `FourM`), with upstream's defaults.
    The drop-path and activation-checkpointing settings only matter for training and are kept as read."""

    domains_in: list[str] = field(default_factory=list)
    domains_out: list[str] = field(default_factory=list)
    dim: int = 768
    encoder_depth: int = 12
    decoder_depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True
    norm_bias: bool = True
    act_layer: str = "GELU"
    gated_mlp: bool = False  # SwiGLU feed-forward
    qk_norm: bool = False
    decoder_causal_mask: bool = False
    decoder_sep_mask: bool = True
    num_register_tokens: int = 0
    share_modality_embeddings: bool = True
    drop_path_rate_encoder: float = 0.0
    drop_path_rate_decoder: float = 0.0
    shared_drop_path: bool = False
    use_act_checkpoint: bool = False

    def check(self) -> None:
        unknown = sorted(set(self.domains_in) - set(MODALITIES) | set(self.domains_out) - set(MODALITIES))
        if unknown:
            raise ValueError(f"unknown AION modalities {unknown}: this fmb knows {', '.join(MODALITIES)}")
        if not self.domains_in:
            raise ValueError("domains_in is empty: the transformer takes no modality")
        if self.act_layer not in ACTIVATIONS:
            raise ValueError(f"act_layer {self.act_layer!r} is not one of {', '.join(ACTIVATIONS)}")
        if self.dim % self.num_heads or self.dim % 4:
            raise ValueError(f"dim {self.dim} must be divisible by num_heads {self.num_heads} and by 4")


def preset_name(cfg: TransformerConfig) -> str | None:
    """The preset whose size `cfg` has, if any."""
    return next((name for name, keys in PRESETS.items() if all(getattr(cfg, k) == v for k, v in keys.items())), None)


def preset_config(size: str, domains: list[str]) -> TransformerConfig:
    """A config of a named size taking and predicting `domains`."""
    if size not in PRESETS:
        raise ValueError(f"unknown AION size {size!r}; presets: {', '.join(PRESETS)}")
    return TransformerConfig(domains_in=list(domains), domains_out=list(domains), **PRESETS[size])


# ----------------------------------------------------------------------------- building blocks


class LayerNorm(nn.Module):
    """LayerNorm with eps 1e-6; without a learned bias upstream still stores a zero `bias` buffer."""

    def __init__(self, dim: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        if bias:
            self.bias = nn.Parameter(torch.zeros(dim))
        else:
            self.register_buffer("bias", torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-6)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocked: torch.Tensor | None) -> torch.Tensor:
    """SDPA over (B, heads, N, d). `blocked` (B, 1 or Nq, Nk) is True where a query may not see a key. It is
    applied as the most negative finite score, as upstream does, so a query that may see nothing attends
    uniformly to all keys instead of producing NaN."""
    mask = None
    if blocked is not None:
        mask = torch.zeros(blocked.shape, dtype=q.dtype, device=q.device)
        mask = mask.masked_fill_(blocked, torch.finfo(q.dtype).min)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(nn.Module):
    """What self- and cross-attention share: heads, the output projection and optional QK-norms."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.heads = cfg.num_heads
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=cfg.proj_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = LayerNorm(cfg.dim // cfg.num_heads, cfg.norm_bias)
            self.k_norm = LayerNorm(cfg.dim // cfg.num_heads, cfg.norm_bias)

    def heads_out(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocked: torch.Tensor | None) -> torch.Tensor:
        """(B, heads, N, d) queries, keys, values -> (B, N, heads * d) projected output."""
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        out = attend(q, k, v, blocked).transpose(1, 2)
        return self.proj(out.reshape(*out.shape[:2], -1))


class SelfAttention(Attention):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__(cfg)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=cfg.qkv_bias)

    def forward(self, x: torch.Tensor, blocked: torch.Tensor | None) -> torch.Tensor:
        B, N, C = x.shape
        return self.heads_out(*self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4), blocked)


class CrossAttention(Attention):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__(cfg)
        self.q = nn.Linear(cfg.dim, cfg.dim, bias=cfg.qkv_bias)
        self.kv = nn.Linear(cfg.dim, 2 * cfg.dim, bias=cfg.qkv_bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor, blocked: torch.Tensor | None) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(x).view(B, N, self.heads, C // self.heads).transpose(1, 2)
        k, v = self.kv(context).view(B, context.shape[1], 2, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        return self.heads_out(q, k, v, blocked)


class FeedForward(nn.Module):
    """fc2(act(fc1 x)); gated (SwiGLU): fc2(act(fc1 x) * fc3 x), hidden width scaled by 2/3."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        hidden = int(cfg.dim * cfg.mlp_ratio)
        if cfg.gated_mlp:
            hidden = int(2 * hidden / 3)
        self.fc1 = nn.Linear(cfg.dim, hidden, bias=cfg.mlp_bias)
        self.act = ACTIVATIONS[cfg.act_layer]()
        self.fc2 = nn.Linear(hidden, cfg.dim, bias=cfg.mlp_bias)
        self.gated = cfg.gated_mlp
        if cfg.gated_mlp:
            self.fc3 = nn.Linear(cfg.dim, hidden, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.fc1(x))
        return self.fc2(hidden * self.fc3(x) if self.gated else hidden)


class EncoderBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.norm1 = LayerNorm(cfg.dim, cfg.norm_bias)
        self.attn = SelfAttention(cfg)
        self.norm2 = LayerNorm(cfg.dim, cfg.norm_bias)
        self.mlp = FeedForward(cfg)

    def forward(self, x: torch.Tensor, blocked: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), blocked)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.norm1 = LayerNorm(cfg.dim, cfg.norm_bias)
        self.self_attn = SelfAttention(cfg)
        self.query_norm = LayerNorm(cfg.dim, cfg.norm_bias)
        self.context_norm = LayerNorm(cfg.dim, cfg.norm_bias)
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = LayerNorm(cfg.dim, cfg.norm_bias)
        self.mlp = FeedForward(cfg)

    def forward(self, x: torch.Tensor, context: torch.Tensor, self_blocked: torch.Tensor | None,
                context_blocked: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x), self_blocked)
        x = x + self.cross_attn(self.query_norm(x), self.context_norm(context), context_blocked)
        return x + self.mlp(self.norm2(x))


# ----------------------------------------------------------------------------- token embeddings


def sincos_grid(rows: int, cols: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(1, rows * cols, dim) fixed positions, laid out as upstream does: token n sits at (n // rows, n % rows),
    each coordinate taking a quarter of the channels as sin and a quarter as cos."""
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    n = torch.arange(rows * cols)
    first = (n // rows).float()[:, None] * omega
    second = (n % rows).float()[:, None] * omega
    return torch.cat([first.sin(), first.cos(), second.sin(), second.cos()], dim=1)[None]


def sincos_line(length: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(1, length, dim) fixed 1-D positions: half the channels sin, half cos."""
    half = dim // 2
    omega = 1.0 / temperature ** (torch.arange(half, dtype=torch.float32) / half)
    angle = torch.arange(length, dtype=torch.float32)[:, None] * omega
    return torch.cat([angle.sin(), angle.cos()], dim=1)[None]


class TokenEmbedding(nn.Module):
    """One modality: token ids -> vectors (`token_emb`), and its fixed positions (`pos_emb`) plus a learned
    modality vector (`mod_emb`). On the decoder side `to_logits` maps outputs back to its vocabulary."""

    def __init__(self, spec: ModalitySpec, dim: int, decoder: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.token_emb = nn.Embedding(spec.vocab, dim, padding_idx=0 if spec.sequence else None)
        self.mod_emb = nn.Parameter(torch.zeros(1, 1, dim))
        # A sequence's table has 512 positions: 0.0.2 means to cut it to the sequence length, but slices the
        # batch axis, so its weights hold all 512.
        positions = sincos_line(512, dim) if spec.sequence else sincos_grid(spec.rows, spec.cols, dim)
        self.register_buffer("pos_emb", positions)
        if decoder:
            self.to_logits = nn.Linear(dim, spec.vocab, bias=False)

    def positions(self, batch: int, valid: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, tokens, dim) position + modality embedding. A sequence needs `valid` (B, length): its k-th
        valid token takes position k and invalid ones none."""
        if not self.spec.sequence:
            return (self.pos_emb + self.mod_emb).expand(batch, -1, -1)
        slot = (valid.long().cumsum(dim=1) - 1).clamp_min(0)
        return self.pos_emb[0][slot] * valid[..., None] + self.mod_emb


# ----------------------------------------------------------------------------- the transformer


class EncoderInput(NamedTuple):
    tokens: torch.Tensor  # (B, N, D) token vectors
    positions: torch.Tensor  # (B, N, D) position + modality embeddings (zero for registers and padding)
    blocked: torch.Tensor | None  # (B, N) True for kept-but-masked tokens; None when there are none
    source: torch.Tensor  # (B, N) index of each token's modality in the input order; -1 for padding, registers


class Encoded(NamedTuple):
    context: torch.Tensor  # (B, N, D): upstream `encode`'s output
    blocked: torch.Tensor | None  # (B, N) as in EncoderInput
    source: torch.Tensor  # (B, N) as in EncoderInput

    def mean(self) -> torch.Tensor:
        """(B, D) float32 mean over each object's modality tokens (not padding, not registers)."""
        valid = (self.source >= 0).to(torch.float32)[..., None]
        return (self.context.float() * valid).sum(dim=1) / valid.sum(dim=1).clamp_min(1.0)


class AionTransformer(nn.Module):
    """AION's encoder-decoder. Module and parameter names are upstream's, so its weights load one to one
    (when modality embeddings are shared, upstream's file holds one copy: see fmb.models.aion.pretrained)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.encoder_embeddings = nn.ModuleDict({m: TokenEmbedding(MODALITIES[m], cfg.dim) for m in cfg.domains_in})
        self.decoder_embeddings = nn.ModuleDict({m: TokenEmbedding(MODALITIES[m], cfg.dim, decoder=True)
                                                 for m in cfg.domains_out})
        if cfg.share_modality_embeddings:
            for m in set(cfg.domains_in) & set(cfg.domains_out):
                self.decoder_embeddings[m].mod_emb = self.encoder_embeddings[m].mod_emb
        self.encoder = nn.ModuleList([EncoderBlock(cfg) for _ in range(cfg.encoder_depth)])
        self.encoder_norm = LayerNorm(cfg.dim, cfg.norm_bias)
        self.decoder_proj_context = nn.Linear(cfg.dim, cfg.dim)
        self.decoder = nn.ModuleList([DecoderBlock(cfg) for _ in range(cfg.decoder_depth)])
        self.decoder_norm = LayerNorm(cfg.dim, cfg.norm_bias)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        if cfg.num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, cfg.dim))
        self._init_weights()

    def _init_weights(self) -> None:
        """Random weights for stand-ins (loaded weights replace them): Xavier linears, zero biases, unit-normal
        token embeddings (so that which token it is weighs as much as where it is: the sin-cos positions are
        of order 1) and small modality, mask and register vectors."""
        for name, parameter in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(parameter)
            elif "token_emb" in name:
                nn.init.normal_(parameter)
            elif parameter.ndim == 2:
                nn.init.xavier_uniform_(parameter)
            elif parameter.ndim != 1:
                nn.init.normal_(parameter, std=0.02)

    def select_inputs(self, tokens: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None,
                      budget: int = DEFAULT_ENCODER_TOKENS) -> EncoderInput:
        """Embed `tokens` ({modality: (B, n) ids}, in the order given) and keep the first `budget`, the
        masked ones (`masks`: True = absent) after all others, as upstream does."""
        masks = masks or {}
        vectors, positions, blocked, source = [], [], [], []
        for index, (name, ids) in enumerate(tokens.items()):
            if name not in self.encoder_embeddings:
                raise ValueError(f"the transformer takes no {name}; it takes {', '.join(self.encoder_embeddings)}")
            embedding = self.encoder_embeddings[name]
            ids = ids.long().reshape(ids.shape[0], -1)
            if not embedding.spec.sequence and ids.shape[1] != embedding.spec.num_tokens:
                raise ValueError(f"{name} needs {embedding.spec.num_tokens} tokens per object, got {ids.shape[1]}")
            absent = masks.get(name)
            valid = torch.ones_like(ids, dtype=torch.bool) if absent is None else ~absent.to(ids.device, torch.bool)
            vectors.append(embedding.token_emb(ids))
            positions.append(embedding.positions(ids.shape[0], valid))
            blocked.append(~valid)
            source.append(torch.full_like(ids, index))
        x, pos, source = torch.cat(vectors, 1), torch.cat(positions, 1), torch.cat(source, 1)
        if masks:
            absent = torch.cat(blocked, 1)
            keep = torch.argsort(absent.to(torch.uint8), dim=1, stable=True)[:, :budget]
            absent = absent.gather(1, keep)
            x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[2])).masked_fill(absent[..., None], 0.0)
            pos = pos.gather(1, keep[..., None].expand(-1, -1, pos.shape[2])).masked_fill(absent[..., None], 0.0)
            source = source.gather(1, keep).masked_fill(absent, -1)
        else:
            x, pos, source, absent = x[:, :budget], pos[:, :budget], source[:, :budget], None
        if self.cfg.num_register_tokens:  # learned tokens in front, without position or modality
            registers = self.register_tokens.expand(x.shape[0], -1, -1)
            x, pos = torch.cat([registers, x], 1), torch.cat([torch.zeros_like(registers), pos], 1)
            source = torch.cat([torch.full(registers.shape[:2], -1, device=source.device, dtype=source.dtype), source], 1)
            if absent is not None:
                absent = torch.cat([torch.zeros(registers.shape[:2], dtype=torch.bool, device=absent.device), absent], 1)
        return EncoderInput(x, pos, absent, source)

    def encode(self, tokens: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None,
               budget: int = DEFAULT_ENCODER_TOKENS) -> Encoded:
        """Upstream `AION.encode`: the decoder context of every kept token (see the module docstring)."""
        inputs = self.select_inputs(tokens, masks, budget)
        keys_blocked = None if inputs.blocked is None else inputs.blocked[:, None, :]
        x = inputs.tokens + inputs.positions
        for block in self.encoder:
            x = block(x, keys_blocked)
        context = self.decoder_proj_context(self.encoder_norm(x)) + inputs.positions
        return Encoded(context, inputs.blocked, inputs.source)

    def predict(self, encoded: Encoded, targets: list[str]) -> dict[str, torch.Tensor]:
        """Decoder logits {modality: (B, tokens, vocab)} for every token of each target modality, given an
        encoding (upstream `AION.forward`: each target token starts as the mask token plus its position
        and modality embedding and attends to the encoder context)."""
        B = encoded.context.shape[0]
        positions, owner = [], []
        for index, name in enumerate(targets):
            if name not in self.decoder_embeddings:
                raise ValueError(f"the transformer predicts no {name}; it predicts {', '.join(self.decoder_embeddings)}")
            embedding = self.decoder_embeddings[name]
            if embedding.spec.sequence:
                raise ValueError(f"{name} is a token sequence; fmb predicts grid and scalar modalities only")
            positions.append(embedding.positions(B))
            owner.append(torch.full((embedding.spec.num_tokens,), index, device=encoded.context.device))
        y = self.mask_token + torch.cat(positions, 1)
        y_blocked = self.decoder_self_blocking(torch.cat(owner))
        context_blocked = None if encoded.blocked is None else encoded.blocked[:, None, :]
        for block in self.decoder:
            y = block(y, encoded.context, y_blocked, context_blocked)
        y = self.decoder_norm(y)
        owner = torch.cat(owner)
        return {name: self.decoder_embeddings[name].to_logits(y[:, owner == index]) for index, name in enumerate(targets)}

    def decoder_self_blocking(self, owner: torch.Tensor) -> torch.Tensor:
        """(1, M, M) decoder self-attention mask for target tokens of modalities `owner` (M,). As upstream
        builds it for prediction: causal or, by default, every key blocked (so each target token averages
        all target tokens uniformly), and with decoder_sep_mask also every key of another modality."""
        M = owner.shape[0]
        if self.cfg.decoder_causal_mask:
            blocked = torch.ones(M, M, dtype=torch.bool, device=owner.device).triu(1)
        else:
            blocked = torch.ones(M, M, dtype=torch.bool, device=owner.device)
        if self.cfg.decoder_sep_mask:
            blocked = blocked | (owner[:, None] != owner[None, :])
        return blocked[None]
