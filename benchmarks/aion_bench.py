"""AION benchmark: image-codec encode+decode throughput of fmb vs polymathic-aion at the same weights,
and adapter-training throughput. Prints figures; needs polymathic-aion (the `parity` extra) for the
comparison. Weights are random (built locally from the codec config), which does not change the cost.

    python benchmarks/aion_bench.py --device cuda --batch 64 --precision bf16 --channels-last
    python benchmarks/aion_bench.py --device cpu --batch 4 --hidden-dims 64 --num-consecutive 1
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Callable

import torch

from fmb.models.aion.model import LEGACY_BANDS, AionAdapters
from fmb.models.aion.weights import load_codec


def timed(fns: list[Callable[[], object]], device: torch.device, repeats: int, warmup: int = 2) -> list[float]:
    """Median seconds per call of each function; calls alternate, so load changes hit all alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, record in zip(fns, times, strict=True):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            record.append(time.perf_counter() - start)
    return [sorted(t)[len(t) // 2] for t in times]


def training_step(model: AionAdapters, euclid: torch.Tensor,
                  autocast: Callable[[], contextlib.AbstractContextManager]) -> Callable[[], None]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step() -> None:
        with autocast():
            out = model(euclid)
            loss = ((out["euclid"].float() - euclid) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--hidden-dims", type=int, default=512)  # the published codec
    parser.add_argument("--num-consecutive", type=int, default=4)
    parser.add_argument("--adapter-hidden", type=int, default=16)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    from aion.codecs.image import ImageCodec
    from aion.modalities import Image, LegacySurveyImage

    upstream = ImageCodec(quantizer_levels=[7, 5, 5, 5, 5], hidden_dims=args.hidden_dims,
                          num_consecutive=args.num_consecutive).eval()
    with tempfile.TemporaryDirectory() as tmp:
        upstream.save_pretrained(tmp, modality=Image)
        ours = load_codec(tmp).eval()
    upstream.to(device)
    ours.to(device)
    if args.channels_last:
        upstream.to(memory_format=torch.channels_last)
        ours.to(memory_format=torch.channels_last)
    flux = torch.randn(args.batch, 4, 96, 96, device=device) * 2

    def autocast() -> contextlib.AbstractContextManager:
        if args.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    bands = list(LEGACY_BANDS)

    def run_upstream() -> torch.Tensor:
        with torch.no_grad(), autocast():
            tokens = upstream.encode(LegacySurveyImage(flux=flux.clone(), bands=bands))  # it writes into its input
            return upstream.decode(tokens, bands=bands).flux

    def run_ours() -> torch.Tensor:
        with torch.no_grad(), autocast():
            return ours.decode_indices(ours.indices(flux, bands), bands)

    t_up, t_ours = timed([run_upstream, run_ours], device, args.repeats)
    print(f"device {device} | batch {args.batch} | {args.precision} | channels_last {args.channels_last} | "
          f"codec hidden {args.hidden_dims} x{args.num_consecutive}")
    print(f"codec encode+decode  polymathic-aion {args.batch / t_up:9.1f} images/s")
    print(f"codec encode+decode  fmb             {args.batch / t_ours:9.1f} images/s")
    print(f"time ratio fmb / polymathic-aion     {t_ours / t_up:9.3f}")

    ours.requires_grad_(False)
    for mode in ("ste", "full"):
        model = AionAdapters(ours, hidden=args.adapter_hidden, gradient=mode).to(device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        model.train()
        ours.eval()
        euclid = torch.rand(args.batch, 4, 96, 96, device=device) * 0.1
        (t_step,) = timed([training_step(model, euclid, autocast)], device, args.repeats)
        print(f"adapter training ({mode:>4})          {args.batch / t_step:9.1f} images/s")


if __name__ == "__main__":
    main()
