"""astromodal: a causal transformer over multimodal token sequences, and its losses.

Input: token ids and token types (data.Vocabulary) of sequences laid out as
[BOS] image [SEP] scalars [SEP] {spectrum group [SEP]}* [EOS], right-padded with PAD.
Embedding = token + type + learned position; pre-LN blocks with causal scaled-dot-product
attention; the output head is tied to the token embedding. Padding is at the end of each
sequence, so a real token never sees one: causal attention needs no padding mask, and the
flash kernels apply (a dense mask rules them out).

Loss = cross-entropy of the next token (PAD targets ignored) + for each modality a weighted
"reconstruction" MSE: at up to K target positions of that modality, the softmax over the
modality's own id range gives an expected value (image: latent codebook centroid; spectrum
group: that group's codebook; scalar: bin centre of the target's own column, in that
column's normalised units), compared with the value of the true token. Computed in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fmb.errors import ConfigError
from fmb.models.astromodal.data import Vocabulary
from fmb.models.checkpointing import run_blocks

# name -> (layers, heads, width, feed-forward width)
PRESETS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (2, 4, 128, 512),
    "small": (6, 8, 384, 1536),
    "base": (12, 12, 768, 3072),  # upstream default
}


@dataclass
class AstromodalModelConfig:
    preset: str = "base"
    # Each of these, when set, replaces the preset's value.
    n_layer: int | None = None
    n_head: int | None = None
    d_model: int | None = None
    d_ff: int | None = None
    max_len: int = 2048
    dropout: float = 0.0

    def shape(self) -> tuple[int, int, int, int]:
        if self.preset not in PRESETS:
            raise ConfigError(f"model.preset={self.preset!r}: choose one of {', '.join(PRESETS)}")
        base = PRESETS[self.preset]
        dims = tuple(v if v is not None else b for v, b in zip((self.n_layer, self.n_head, self.d_model, self.d_ff),
                                                              base, strict=True))
        if dims[2] % dims[1]:
            raise ConfigError(f"model.d_model={dims[2]} is not a multiple of model.n_head={dims[1]}")
        return dims


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_head, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class ReconstructionTargets(nn.Module):
    """Values behind the tokens, saved with the weights so a checkpoint can decode on its own:
    image codebook (K, D), per-column normalised scalar bin centres (C, bins), one codebook
    per spectrum group (K_g, 2)."""

    def __init__(self, vocab: Vocabulary, image_dim: int, spectrum_dim: int = 2) -> None:
        super().__init__()
        self.register_buffer("image", torch.zeros(vocab.image_size, image_dim))
        self.register_buffer("scalar", torch.zeros(len(vocab.scalar_columns), vocab.scalar_bins))
        for g, size in vocab.groups.items():
            self.register_buffer(f"spec_{g}", torch.zeros(size, spectrum_dim))

    def codebook(self, modality: str) -> torch.Tensor:
        return self.image if modality == "image" else getattr(self, "spec_" + modality.removeprefix("spec/"))


class AstromodalTransformer(nn.Module):
    def __init__(self, cfg: AstromodalModelConfig, vocab: Vocabulary, image_dim: int) -> None:
        super().__init__()
        n_layer, n_head, d_model, d_ff = cfg.shape()
        self.vocab = vocab
        self.max_len = cfg.max_len
        self.tok_emb = nn.Embedding(vocab.size, d_model)
        self.type_emb = nn.Embedding(vocab.n_types, d_model)
        self.pos_emb = nn.Embedding(cfg.max_len, d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_head, d_ff, cfg.dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab.size, bias=False)
        self.head.weight = self.tok_emb.weight
        self.targets = ReconstructionTargets(vocab, image_dim)
        self.activation_checkpointing = False  # recompute each block in backward (fmb.models.checkpointing)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith(("proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, 0.0, 0.02 / (2 * n_layer) ** 0.5)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor, types: torch.Tensor, pad_mask: torch.Tensor | None = None,
                return_hidden: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits (B, T, V) (and final hidden states) of token ids and types (B, T).

        `pad_mask` (B, T) is True on real tokens, which come first in each row (right padding, as
        `collate_sequences` makes); None when there is no padding. Outputs at padded positions are
        not meaningful (they see earlier padding) and nothing reads them: PAD targets are ignored by
        the loss, embeddings pool over real tokens.
        """
        b, t = tokens.shape
        if t > self.max_len:
            raise ValueError(f"sequence of {t} tokens is longer than model.max_len={self.max_len}")
        if pad_mask is not None and pad_mask.device.type == "cpu" and (pad_mask[:, 1:] > pad_mask[:, :-1]).any():
            # (checked where it is free; on a GPU it would cost a host sync per step)
            raise ValueError("pad_mask has padding before real tokens: astromodal sequences are right-padded")
        pos = torch.arange(t, device=tokens.device)
        x = self.drop(self.tok_emb(tokens) + self.type_emb(types) + self.pos_emb(pos))
        hidden = self.ln_f(run_blocks(self.blocks, x, self.activation_checkpointing))
        logits = self.head(hidden)
        return (logits, hidden) if return_hidden else logits


# ----------------------------------------------------------------------------- losses


@dataclass
class LossConfig:
    """Weights of the reconstruction terms (upstream: 0.1 each) and the positions sampled."""

    image_weight: float = 0.1
    scalar_weight: float = 0.1
    spectrum_weight: float = 0.1
    positions: int = 256  # K target positions per modality per batch in training; all in evaluation


def sample_positions(in_modality: torch.Tensor, k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat indices, validity) of up to k random positions where `in_modality` (flat) is True,
    without a host sync: random scores + 1 on the modality's positions, top k. k=None: all of
    them (this one synchronises, for evaluation)."""
    if k is None:
        idx = torch.nonzero(in_modality).squeeze(1)
        return idx, torch.ones_like(idx, dtype=torch.bool)
    scores = torch.rand(in_modality.shape, device=in_modality.device) + in_modality.float()
    idx = scores.topk(min(k, len(scores))).indices
    return idx, in_modality[idx]


def _columns(target_types: torch.Tensor, vocab: Vocabulary) -> torch.Tensor:
    return (target_types - vocab.scalar_type0).clamp(0, len(vocab.scalar_columns) - 1)


def expected_values(logits: torch.Tensor, target_types: torch.Tensor, vocab: Vocabulary,
                    targets_module: ReconstructionTargets, modality: str) -> torch.Tensor:
    """Expected value under the softmax over one modality's ids, in fp32.

    logits (N, V) and target_types (N,) at positions predicting that modality. Returns (N, D)
    for image / spectrum groups (expected codebook vector) and (N,) for scalars (expected
    bin centre of each position's own column, in that column's normalised units).
    """
    lo, hi = vocab.ranges[modality]
    probs = torch.softmax(logits[:, lo:hi].float(), dim=-1)
    if modality == "scalar":
        centres = targets_module.scalar.float()[_columns(target_types, vocab)]  # (N, bins)
        return (probs * centres).sum(-1)
    return probs @ targets_module.codebook(modality).float()


def true_values(targets: torch.Tensor, target_types: torch.Tensor, vocab: Vocabulary,
                targets_module: ReconstructionTargets, modality: str) -> torch.Tensor:
    lo, hi = vocab.ranges[modality]
    index = (targets - lo).clamp(0, hi - lo - 1)  # positions outside the modality are masked by the caller
    if modality == "scalar":
        centres = targets_module.scalar.float()[_columns(target_types, vocab)]
        return centres.gather(1, index[:, None]).squeeze(1)
    return targets_module.codebook(modality).float()[index]


def astromodal_loss(logits: torch.Tensor, targets: torch.Tensor, target_types: torch.Tensor, vocab: Vocabulary,
                    targets_module: ReconstructionTargets, cfg: LossConfig, sample: bool
                    ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Total loss and named (mean, count) terms: `ce` and `recon_<modality>`.

    logits (B, T, V); targets (B, T) next-token ids, PAD where there is none; target_types
    (B, T). With `sample`, each reconstruction term uses up to cfg.positions random positions.
    """
    with torch.autocast(logits.device.type, enabled=False):
        flat_logits = logits.reshape(-1, logits.shape[-1])
        flat_targets = targets.reshape(-1)
        flat_types = target_types.reshape(-1)
        real = flat_targets != 0  # PAD
        n_real = real.sum()
        ce_sum = F.cross_entropy(flat_logits.float(), flat_targets, ignore_index=0, reduction="sum")
        ce = ce_sum / n_real.clamp_min(1)
        total = ce
        terms = {"ce": (ce, n_real)}
        weights = {"image": cfg.image_weight, "scalar": cfg.scalar_weight}
        for modality, (lo, hi) in vocab.ranges.items():
            idx, valid = sample_positions((flat_targets >= lo) & (flat_targets < hi), cfg.positions if sample else None)
            expected = expected_values(flat_logits[idx], flat_types[idx], vocab, targets_module, modality)
            truth = true_values(flat_targets[idx], flat_types[idx], vocab, targets_module, modality)
            err = (expected - truth) ** 2
            err = err.mean(-1) if err.ndim == 2 else err  # codebook vectors: mean over dimensions
            count = valid.sum()
            mse = (err * valid).sum() / count.clamp_min(1)
            total = total + weights.get(modality, cfg.spectrum_weight) * mse
            terms[f"recon_{modality.replace('/', '_')}"] = (mse, count)
    return total, terms


@torch.no_grad()
def reconstruct(logits: torch.Tensor, types: torch.Tensor, vocab: Vocabulary,
                targets_module: ReconstructionTargets) -> dict[str, torch.Tensor]:
    """Expected value of the next token at every position, per modality, from logits (B, T, V).

    `types` (B, T) are the types of the tokens being predicted (the inputs shifted by one).
    Returns for each modality the expected values at positions whose next token is of that
    modality (NaN elsewhere): image and spectrum groups (B, T, D), scalars (B, T) in normalised
    units of the column (`ScalarTokenizer.from_normalised` maps them back).
    """
    out: dict[str, torch.Tensor] = {}
    flat = logits.reshape(-1, logits.shape[-1])
    flat_types = types.reshape(-1)
    for modality in vocab.ranges:
        if modality == "scalar":
            want = (flat_types >= vocab.scalar_type0) & (flat_types < vocab.scalar_type0 + len(vocab.scalar_columns))
            values = torch.full((len(flat),), float("nan"), device=logits.device)
        else:
            t = 1 if modality == "image" else vocab.group_type[modality.removeprefix("spec/")]
            want = flat_types == t
            values = torch.full((len(flat), targets_module.codebook(modality).shape[1]), float("nan"),
                                device=logits.device)
        idx = torch.nonzero(want).squeeze(1)
        values[idx] = expected_values(flat[idx], flat_types[idx], vocab, targets_module, modality)
        out[modality] = values.reshape(*types.shape, *values.shape[1:])
    return out
