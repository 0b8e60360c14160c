"""Training-step time of fmb's AstroCLIP, astromodal and AstroM3 models against a peer, in paired rounds.

Peers (AstroPT and AION have their own upstream benchmarks: astropt_bench.py, aion_bench.py):
- AstroM3: the upstream code (MeriDK/AstroM3 `src/model.py`, not on PyPI: `git submodule update
  --init external/AstroM3`, found through fmb.externals), with fmb's weights loaded from it through
  `fmb convert astrom3`'s key map, the published CLIP configuration and loss. Skipped when absent.
- AstroCLIP ViT and SpecFormer: upstream needs `lightning` and the `dinov2` code, neither installable
  from PyPI, so the stand-in is torch's `nn.TransformerEncoder` (pre-LN, GELU, 4x MLP, the same
  width, depth, heads and token count) behind the same patch / slice embedding and final norm.
- astromodal: no upstream package; the stand-in is `nn.TransformerEncoder` with the causal hint
  (SDPA's causal kernel), the same embeddings, width, depth, heads, feed-forward width and tied head.

Both sides of a pair get the same inputs, loss and AdamW; rounds alternate them, and the ratio is
taken round by round (median and range), by CPU time on CPU (shared machines) or wall time on CUDA.

    PYTHONPATH=src python benchmarks/peers_bench.py --rounds 5
    PYTHONPATH=src python benchmarks/peers_bench.py --device cuda --large   # ViT-L/12, SpecFormer base, astromodal base
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from steps import paired_rounds, ratio_summary, training_step
from torch import nn

from fmb.models.astroclip.model import SpecFormer, SpecFormerShape, ViT, ViTShape, spectrum_tokens


def encoder_stack(width: int, depth: int, heads: int, ff: int, eps: float) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(width, heads, ff, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True, layer_norm_eps=eps)
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


class ViTStandIn(nn.Module):
    def __init__(self, shape: ViTShape) -> None:
        super().__init__()
        grid = shape.image_size // shape.patch_size
        self.patch_embed = nn.Conv2d(3, shape.width, shape.patch_size, stride=shape.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, shape.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, shape.width))
        self.encoder = encoder_stack(shape.width, shape.depth, shape.heads, 4 * shape.width, 1e-6)
        self.norm = nn.LayerNorm(shape.width, eps=1e-6)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.encoder(x))


class SpecFormerStandIn(nn.Module):
    def __init__(self, shape: SpecFormerShape) -> None:
        super().__init__()
        self.data_embed = nn.Linear(shape.features, shape.width)
        self.position_embed = nn.Embedding(shape.max_len, shape.width)
        self.encoder = encoder_stack(shape.width, shape.depth, shape.heads, 4 * shape.width, 1e-5)
        self.final_layernorm = nn.LayerNorm(shape.width)
        self.head = nn.Linear(shape.width, shape.features)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.final_layernorm(self.encoder(self.data_embed(tokens) + self.position_embed.weight[:tokens.shape[1]]))
        return x, self.head(x)


class AstromodalStandIn(nn.Module):
    def __init__(self, vocab_size: int, n_types: int, layers: int, heads: int, width: int, ff: int, length: int) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, width)
        self.type_emb = nn.Embedding(n_types, width)
        self.pos_emb = nn.Embedding(length, width)
        self.encoder = encoder_stack(width, layers, heads, ff, 1e-5)
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight

    def forward(self, tokens: torch.Tensor, types: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        length = tokens.shape[1]
        x = self.tok_emb(tokens) + self.type_emb(types) + self.pos_emb(torch.arange(length, device=tokens.device))
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        return self.head(self.ln_f(self.encoder(x, mask=causal, is_causal=True)))


def params(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def vit_pair(large: bool, batch: int, device: torch.device):
    shape = ViTShape(*((1024, 24, 16) if large else (384, 12, 6)), patch_size=12, image_size=144)
    images = torch.rand(batch, 3, 144, 144, device=device)
    loss = lambda m: m(images).float().square().mean()  # noqa: E731
    return f"AstroCLIP ViT-{'L' if large else 'S'}/12 144 px", ViT(shape), ViTStandIn(shape), loss, loss


def specformer_pair(large: bool, batch: int, device: torch.device):
    shape = SpecFormerShape(*((768, 6, 6) if large else (256, 4, 4)))
    tokens = spectrum_tokens(1.0 + torch.randn(batch, 7781, device=device))
    loss = lambda m: sum(out.float().square().mean() for out in m(tokens))  # noqa: E731
    return f"SpecFormer {'base' if large else 'small'} ({tokens.shape[1]} tokens)", SpecFormer(shape), \
        SpecFormerStandIn(shape), loss, loss


def astromodal_pair(large: bool, batch: int, device: torch.device):
    from fmb.models.astromodal.data import Vocabulary
    from fmb.models.astromodal.model import PRESETS, AstromodalModelConfig, AstromodalTransformer

    preset, length = ("base", 2048) if large else ("small", 1024)
    vocab = Vocabulary(image_size=1024, image_tokens=576, scalar_columns=[f"c{i}" for i in range(40)], scalar_bins=256,
                       groups={"desi_b": 512, "desi_r": 512, "desi_z": 512, "gaiaxp_bp": 256, "gaiaxp_rp": 256})
    ours = AstromodalTransformer(AstromodalModelConfig(preset=preset, max_len=length), vocab, image_dim=2)
    peer = AstromodalStandIn(vocab.size, vocab.n_types, *PRESETS[preset], length)
    tokens = torch.randint(5, vocab.size, (batch, length), device=device)
    types = torch.randint(0, vocab.n_types, (batch, length), device=device)
    loss = lambda m: F.cross_entropy(m(tokens[:, :-1], types[:, :-1]).flatten(0, 1).float(), tokens[:, 1:].flatten())  # noqa: E731
    return f"astromodal {preset} ({length} tokens)", ours, peer, loss, loss


def astrom3_pair(large: bool, batch: int, device: torch.device, external: Path | None):
    """Upstream AstroM3 (CLIP mode, published configuration) and fmb's, with the same weights."""
    from fmb.externals import find_upstream, upstream
    from fmb.models.astrom3.convert import map_state, model_config
    from fmb.models.astrom3.model import N_CATALOGUE, AstroM3, trimodal_clip_loss

    if not find_upstream("astrom3", external).present:
        return None
    config = {"classification": False, "num_classes": None, "hidden_dim": 512, "fusion": "avg", "seq_len": 200,
              "p_enc_in": 9, "p_d_model": 128, "p_dropout": 0.1, "p_factor": 1, "p_output_attention": False,
              "p_n_heads": 4, "p_d_ff": 512, "p_activation": "gelu", "p_e_layers": 8, "s_dropout": 0.2,
              "s_conv_channels": [3, 64, 64, 32, 32], "s_kernel_size": 3, "s_mp_kernel_size": 4,
              "m_input_dim": N_CATALOGUE, "m_hidden_dim": 512, "m_dropout": 0.1}
    with upstream("astrom3", external):
        from model import AstroM3 as UpstreamAstroM3  # external/AstroM3/src/model.py

        peer = UpstreamAstroM3(**config)
    state = peer.state_dict()
    ours = AstroM3(model_config(state, config), num_classes=10)
    ours.load_state_dict(map_state(state, ours), strict=True)
    length = config["seq_len"]
    photometry = torch.randn(batch, length, 5, device=device)  # fmb inserts the 4 metadata features itself
    metadata = torch.randn(batch, N_CATALOGUE + 4, device=device)
    assembled = torch.cat([photometry[..., :3], metadata[:, None, N_CATALOGUE:].expand(-1, length, -1),
                           photometry[..., 3:]], dim=-1)
    mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    spectra = torch.randn(batch, 3, 2575, device=device)

    def our_loss(m: nn.Module) -> torch.Tensor:
        out = m(photometry, mask, spectra, metadata)
        return trimodal_clip_loss(out, out["scales"])["loss"]

    def peer_loss(m: nn.Module) -> torch.Tensor:
        labels = torch.arange(batch, device=device)
        return sum(F.cross_entropy(lg, labels) + F.cross_entropy(lg.T, labels)
                   for lg in m(assembled, mask, spectra, metadata[:, :N_CATALOGUE]))

    return "AstroM3 CLIP (published sizes)", ours, peer, our_loss, peer_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--large", action="store_true", help="the published sizes (a GPU)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--astrom3-batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--external", type=Path, default=None, help="external/ directory (default: the checkout's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device} | {torch.get_num_threads()} threads | load average {os.getloadavg()[0]:.1f} | "
          f"{'wall' if device.type == 'cuda' else 'CPU'} time, {args.rounds} paired rounds")
    print(f"{'model':<40}{'peer':<34}{'params M':>16}{'fmb s':>9}{'peer s':>9}  fmb / peer time")
    pairs = [vit_pair(args.large, args.batch, device), specformer_pair(args.large, args.batch, device),
             astromodal_pair(args.large, args.batch, device)]
    pairs.append(astrom3_pair(args.large, args.astrom3_batch, device, args.external))
    peers = ["nn.TransformerEncoder stand-in"] * 3 + ["upstream MeriDK/AstroM3"]
    for pair, peer_name in zip(pairs, peers, strict=True):
        if pair is None:
            print(f"{'AstroM3 CLIP':<40}skipped: upstream code absent (git submodule update --init external/AstroM3)")
            continue
        torch.manual_seed(0)
        label, ours, peer, our_loss, peer_loss = pair
        ours.to(device).train()
        peer.to(device).train()
        clock = time.perf_counter if device.type == "cuda" else time.process_time
        our_times, peer_times = paired_rounds([training_step(ours, our_loss, device),
                                               training_step(peer, peer_loss, device)], device, args.rounds, clock=clock)
        sizes = f"{params(ours):.1f} / {params(peer):.1f}"
        print(f"{label:<40}{peer_name:<34}{sizes:>16}{statistics.median(our_times):>9.3f}"
              f"{statistics.median(peer_times):>9.3f}  {ratio_summary(our_times, peer_times)}", flush=True)


if __name__ == "__main__":
    main()
