"""astromodal throughput: tokeniser fit / encode, k-means, transformer training, loader.

    PYTHONPATH=src python benchmarks/astromodal_bench.py [--device cpu|cuda] [--objects 400]
                                                         [--peak-tflops 989] [--threads 1]

Writes synthetic S-PLUS fields to a temporary directory, fits small tokenisers on them and
prints one line per figure. MFU is reported when --peak-tflops (the device's dense bf16
peak) is given: the FLOPs of a step (fmb.train.flops, attention included) per second, over the peak.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from fmb.data.surveys.splus import read_fields, scalar_matrix
from fmb.data.synth.splus import write
from fmb.models.astromodal.data import SequenceDataset, TokenShards, collate_sequences
from fmb.models.astromodal.kmeans import fit_kmeans
from fmb.models.astromodal.model import (
    PRESETS,
    AstromodalModelConfig,
    AstromodalTransformer,
    LossConfig,
    astromodal_loss,
)
from fmb.models.astromodal.tokenize import Tokenizers, encode_dataset, fit_tokenizers, selection_of
from fmb.models.astromodal.tokenizers import ScalarTokenizer, TokenizerConfig
from fmb.train.flops import flop_counter


def timed(fn, repeat: int = 1) -> float:
    """Seconds per call (after one warm-up call)."""
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_kmeans(device: torch.device, n: int, k: int, batch: int) -> float:
    x = torch.randn(n, 2, device=device)
    steps = 20

    def run() -> None:
        fit_kmeans(x, k, steps=steps, batch_size=batch, init_samples=4 * k)
        sync(device)

    seconds = timed(run)
    return steps / seconds  # includes the k-means++ initialisation


def bench_transformer(device: torch.device, preset: str, batch: int, length: int, vocab, peak: float | None) -> str:
    cfg = AstromodalModelConfig(preset=preset, max_len=length)
    model = AstromodalTransformer(cfg, vocab, 2).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(5, vocab.size, (batch, length), device=device)
    types = torch.randint(0, vocab.n_types, (batch, length), device=device)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with amp:
            logits = model(tokens[:, :-1], types[:, :-1], mask[:, :-1])
            loss, _ = astromodal_loss(logits, tokens[:, 1:], types[:, 1:], vocab, model.targets, LossConfig(), True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)

    seconds = timed(step, repeat=3)
    tok_s = batch * (length - 1) / seconds
    n_params = sum(p.numel() for p in model.parameters())
    line = f"transformer {preset:<5} B={batch} T={length}: {tok_s:,.0f} tokens/s ({n_params / 1e6:.1f}M params)"
    if peak:
        with flop_counter() as counter:  # attention included, causal by its kept pairs
            step()
        line += f", MFU {counter.get_total_flops() / seconds / (peak * 1e12):.1%}"
    return line


def bench_padded_attention(device: torch.device, preset: str, batch: int, length: int, rounds: int = 3) -> str:
    """Attention of one layer (forward + backward) on a right-padded batch: the dense padding mask the
    model built before (causal & key padding, plus the diagonal), which no flash kernel takes, against
    the causal kernel it uses now (equal outputs at every real token)."""
    _, heads, width, _ = PRESETS[preset]
    q, k, v = (torch.randn(batch, heads, length, width // heads, device=device, requires_grad=True) for _ in range(3))
    real = torch.arange(length, device=device)[None] < torch.randint(length // 2, length + 1, (batch, 1), device=device)
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    dense = ((causal[None] & real[:, None, :]) | torch.eye(length, dtype=torch.bool, device=device))[:, None]

    def dense_mask() -> None:
        F.scaled_dot_product_attention(q, k, v, attn_mask=dense).sum().backward()
        sync(device)

    def causal_only() -> None:
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
        sync(device)

    ratios = sorted(timed(causal_only) / timed(dense_mask) for _ in range(rounds))
    return (f"padded attention {preset} B={batch} T={length}: causal kernel / dense mask time "
            f"{ratios[len(ratios) // 2]:.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f} over {rounds} paired rounds)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--objects", type=int, default=400)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write(root / "data", args.objects, seed=0)
        cfg = TokenizerConfig(scalar_bins=256, spectrum_codebook=64, desi_rebin=8, image_codebook=64,
                              image_epochs=1, image_hidden=16, kmeans_steps=20, kmeans_batch=4096,
                              device=str(device))

        batches = list(read_fields(root / "data", cfg.scalar_columns, selection_of(cfg)))
        values = np.concatenate([scalar_matrix(b, cfg.scalar_columns) for b in batches])
        rows = len(values)
        tiled = np.tile(values, (max(1, 100_000 // rows), 1))
        tok = ScalarTokenizer(cfg.scalar_columns, cfg.scalar_bins)
        print(f"scalar fit:   {len(tiled) / timed(lambda: tok.fit(tiled)):,.0f} rows/s "
              f"({len(cfg.scalar_columns)} columns, {cfg.scalar_bins} bins)")
        print(f"scalar encode: {len(tiled) / timed(lambda: tok.encode(tiled)):,.0f} rows/s")

        start = time.perf_counter()
        fit_tokenizers(root / "data", root / "tok", cfg, ["scalar", "spectrum", "image"])
        print(f"fit all tokenisers: {rows / (time.perf_counter() - start):,.0f} rows/s ({rows} rows, "
              "1 autoencoder epoch, read + features + k-means)")
        start = time.perf_counter()
        encode_dataset(root / "data", root / "tok", root / "tokens")
        print(f"encode fields: {rows / (time.perf_counter() - start):,.0f} rows/s (read + all three tokenisers)")

        for k, n in ((256, 200_000), (2048, 200_000)):
            print(f"k-means k={k} on {n:,} 2-d vectors, batch 8192: {bench_kmeans(device, n, k, 8192):.1f} iterations/s")

        toks = Tokenizers.load(root / "tok")
        vocab = toks.vocabulary()
        shards = TokenShards(root / "tokens")
        dataset = SequenceDataset(shards, vocab, 2048, np.arange(len(shards)))
        loader = DataLoader(dataset, batch_size=32, shuffle=True, collate_fn=collate_sequences)
        start = time.perf_counter()
        seen = sum(len(b["tokens"]) for _ in range(3) for b in loader)
        print(f"loader: {seen / (time.perf_counter() - start):,.0f} samples/s (memory-mapped shards, collate, 0 workers)")

        presets = [("tiny", 8, 1024), ("small", 4, 1024)] + ([("base", 8, 2048)] if device.type == "cuda" else [])
        for preset, batch, length in presets:
            print(bench_transformer(device, preset, batch, length, vocab, args.peak_tflops))
            print(bench_padded_attention(device, preset, batch, length))


if __name__ == "__main__":
    main()
