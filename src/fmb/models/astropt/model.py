"""AstroPT: a GPT-2 style decoder over patches of several modalities, trained by next-patch regression.

Each modality (e.g. image patches, spectrum patches) has a tokeniser (data -> embedding), a
position embedder (a learned table indexed by patch number, or an MLP on float positions such
as wavelengths) and a decoder (embedding -> data). The token sequence is the modalities'
tokens concatenated in alphabetical order of their names; hidden state i predicts token i + 1,
through the decoder of token i + 1's modality. So the last image token predicts spectrum
patch 0, and the final hidden state predicts nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fmb.models.checkpointing import run_blocks

# name -> (n_layer, n_head, n_embd, reference peak learning rate)
PRESETS: dict[str, tuple[int, int, int, float]] = {
    "001M": (4, 8, 128, 1e-3),
    "005M": (6, 8, 256, 1e-3),
    "010M": (6, 8, 384, 1e-3),
    "020M": (6, 8, 512, 1e-3),
    "070M": (12, 12, 768, 6e-4),
    "095M": (12, 12, 768, 6e-4),
    "300M": (24, 16, 1024, 3e-4),
    "700M": (16, 8, 2048, 3e-4),
    "2100M": (26, 32, 2560, 1.6e-4),
}


@dataclass
class Modality:
    name: str
    input_size: int  # values per token (patch)
    patch_size: int
    positions: str = "index"  # "index": learned table; "float": MLP on float position vectors
    pos_input_size: int = 1  # width of float position vectors
    loss_weight: float = 1.0


@dataclass
class GPTShape:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int = 1024
    dropout: float = 0.0
    bias: bool = False
    tokeniser: str = "aim"  # "aim": Linear-GELU-Linear (4x wide); "affine": one Linear


class Tokeniser(nn.Module):
    """Maps between data space and the embedding: aim (Linear 4E, GELU, Linear) or affine."""

    def __init__(self, in_size: int, out_size: int, hidden: int, kind: str, bias: bool) -> None:
        super().__init__()
        if kind == "affine":
            self.fc = nn.Linear(in_size, out_size, bias=bias)
            self.proj = None
        else:
            self.fc = nn.Linear(in_size, hidden, bias=bias)
            self.proj = nn.Linear(hidden, out_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(x)
        if self.proj is not None:
            x = self.proj(F.gelu(x, approximate="tanh"))
        return x


class PositionTable(nn.Module):
    def __init__(self, block_size: int, n_embd: int) -> None:
        super().__init__()
        self.table = nn.Embedding(block_size, n_embd)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.table(positions)


class CausalSelfAttention(nn.Module):
    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        self.n_head = shape.n_head
        self.dropout = shape.dropout
        self.qkv = nn.Linear(shape.n_embd, 3 * shape.n_embd, bias=shape.bias)
        self.proj = nn.Linear(shape.n_embd, shape.n_embd, bias=shape.bias)
        self.resid_dropout = nn.Dropout(shape.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.n_head, width // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).reshape(batch, length, width)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        self.fc = nn.Linear(shape.n_embd, 4 * shape.n_embd, bias=shape.bias)
        self.proj = nn.Linear(4 * shape.n_embd, shape.n_embd, bias=shape.bias)
        self.dropout = nn.Dropout(shape.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(shape.n_embd, eps=1e-5, bias=shape.bias)
        self.attn = CausalSelfAttention(shape)
        self.ln_2 = nn.LayerNorm(shape.n_embd, eps=1e-5, bias=shape.bias)
        self.mlp = MLP(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class AstroPT(nn.Module):
    def __init__(self, shape: GPTShape, modalities: list[Modality]) -> None:
        super().__init__()
        if shape.n_embd % shape.n_head:
            raise ValueError(f"n_embd {shape.n_embd} is not divisible by n_head {shape.n_head}")
        self.shape = shape
        self.modalities = sorted(modalities, key=lambda m: m.name)
        width, hidden = shape.n_embd, 4 * shape.n_embd
        self.encoders = nn.ModuleDict()
        self.embedders = nn.ModuleDict()
        self.decoders = nn.ModuleDict()
        for mod in self.modalities:
            self.encoders[mod.name] = Tokeniser(mod.input_size, width, hidden, shape.tokeniser, shape.bias)
            if mod.positions == "index":
                self.embedders[mod.name] = PositionTable(shape.block_size, width)
            else:
                self.embedders[mod.name] = Tokeniser(mod.pos_input_size, width, hidden, shape.tokeniser, shape.bias)
            self.decoders[mod.name] = Tokeniser(width, mod.input_size, hidden, shape.tokeniser, shape.bias)
        self.drop = nn.Dropout(shape.dropout)
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.n_layer))
        self.ln_f = nn.LayerNorm(width, eps=1e-5, bias=shape.bias)
        self.activation_checkpointing = False  # recompute each block in backward (fmb.models.checkpointing)
        self.apply(self._init_weights)
        # GPT-2 scaled init of every output projection (blocks, tokenisers and decoders alike).
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * shape.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def lengths(self, tokens: dict[str, torch.Tensor]) -> list[int]:
        return [tokens[m.name].shape[1] for m in self.modalities]

    def hidden_states(self, tokens: dict[str, torch.Tensor], positions: dict[str, torch.Tensor],
                      stop_after: int | None = None) -> torch.Tensor:
        """Residual stream after `stop_after` blocks (all, then the final norm, when None)."""
        total = sum(self.lengths(tokens))
        if total > self.shape.block_size:
            raise ValueError(f"sequence of {total} tokens exceeds block_size {self.shape.block_size}")
        x = torch.cat([self.encoders[m.name](tokens[m.name]) + self.embedders[m.name](positions[m.name])
                       for m in self.modalities], dim=1)
        x = self.drop(x)
        x = run_blocks(self.blocks if stop_after is None else self.blocks[:stop_after], x, self.activation_checkpointing)
        return self.ln_f(x) if stop_after is None else x

    def forward(self, tokens: dict[str, torch.Tensor], positions: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Next-token predictions per modality: for the first modality, of its tokens 1..L-1;
        for each later one, of all its tokens."""
        x = self.hidden_states(tokens, positions)
        predictions = {}
        start = 0
        for index, mod in enumerate(self.modalities):
            length = tokens[mod.name].shape[1]
            # hidden state i predicts token i + 1: the first modality's token 0 has no predictor
            count = length - 1 if index == 0 else length
            predictions[mod.name] = self.decoders[mod.name](x[:, start : start + count])
            start += count
        return predictions

    @torch.no_grad()
    def embed(self, tokens: dict[str, torch.Tensor], positions: dict[str, torch.Tensor],
              masks: dict[str, torch.Tensor] | None = None, layer: str = "middle",
              reduction: str = "mean") -> dict[str, torch.Tensor]:
        """One vector per object and modality: the middle block's output (before the final norm)
        or the last (after it), reduced over the modality's valid tokens."""
        stop = self.shape.n_layer // 2 + 1 if layer == "middle" else None
        x = self.hidden_states(tokens, positions, stop_after=stop).float()
        out = {}
        start = 0
        for mod in self.modalities:
            length = tokens[mod.name].shape[1]
            chunk = x[:, start : start + length]
            start += length
            mask = masks[mod.name].float() if masks is not None and mod.name in masks else torch.ones(chunk.shape[:2], device=x.device)
            if reduction == "mean":
                out[mod.name] = (chunk * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
            elif reduction == "last":
                last = (mask * torch.arange(length, device=x.device)).argmax(dim=1)
                out[mod.name] = chunk[torch.arange(len(chunk), device=x.device), last]
            elif reduction == "exp_decay":
                weights = torch.logspace(0, -1, length, device=x.device)[None, :] * mask
                out[mod.name] = (chunk * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1e-12)
            else:
                raise ValueError(f"unknown reduction '{reduction}' (mean, last, exp_decay)")
        return out


def next_patch_loss(modalities: list[Modality], tokens: dict[str, torch.Tensor], predictions: dict[str, torch.Tensor],
                    masks: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Huber (delta 1) per modality over valid target tokens, times loss_weight, summed and
    divided by the number of modalities; computed in fp32. `modalities` in model order;
    `masks[name]` (B, L) is True for real tokens (absent spectra, NaN patches are False)."""
    total = torch.zeros((), device=next(iter(predictions.values())).device)
    parts = {}
    for index, mod in enumerate(modalities):
        target = tokens[mod.name][:, 1:] if index == 0 else tokens[mod.name]
        error = F.huber_loss(predictions[mod.name].float(), target.float(), reduction="none", delta=1.0).mean(dim=-1)
        if masks is not None and mod.name in masks:
            mask = (masks[mod.name][:, 1:] if index == 0 else masks[mod.name]).to(error.dtype)
            value = (error * mask).sum() / mask.sum().clamp(min=1.0)
        else:
            value = error.mean()
        parts[mod.name] = value
        total = total + mod.loss_weight * value
    return total / len(modalities), parts
