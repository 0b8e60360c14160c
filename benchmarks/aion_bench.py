"""AION benchmark: image-codec encode+decode throughput of fmb vs polymathic-aion at the same weights,
and adapter-training throughput. Prints figures; needs polymathic-aion (the `parity` extra) for the
comparison. Weights are random (built locally from the codec config, squeeze-excite gates opened so
that every layer counts), which does not change the cost.

    python benchmarks/aion_bench.py --device cuda --batch 64 --precision bf16 --channels-last
    python benchmarks/aion_bench.py --device cpu --batch 4 --hidden-dims 64 --num-consecutive 1
    python benchmarks/aion_bench.py --device cpu --batch 2 --threads 1 --cpu-time --repeats 8 --no-adapters
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time

import torch
from steps import paired_rounds, ratio_summary, training_step

from fmb.models.aion.model import LEGACY_BANDS, AionAdapters
from fmb.models.aion.weights import load_codec


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
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true", help="time by process CPU time (shared CPU, 1 thread)")
    parser.add_argument("--no-adapters", action="store_true", help="only the codec comparison")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    from aion.codecs.image import ImageCodec
    from aion.modalities import Image, LegacySurveyImage

    upstream = ImageCodec(quantizer_levels=[7, 5, 5, 5, 5], hidden_dims=args.hidden_dims,
                          num_consecutive=args.num_consecutive).eval()
    with torch.no_grad():  # upstream starts the squeeze-excite gates closed (bias -10): open them halfway
        for name, p in upstream.named_parameters():
            if name.endswith("net.4.net.2.weight"):
                p.normal_(0.0, 0.5 / p[0].numel() ** 0.5)
            elif name.endswith("net.4.net.2.bias"):
                p.zero_()
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

    with torch.no_grad():
        up_tokens = upstream.encode(LegacySurveyImage(flux=flux.clone(), bands=bands)).long()
        tokens_equal = (ours.indices(flux, bands) == up_tokens).float().mean().item()
        up_flux = upstream.decode(up_tokens, bands=bands).flux
        difference = (ours.decode_indices(up_tokens, bands) - up_flux).abs().max().item()
    clock = time.process_time if args.cpu_time else time.perf_counter
    up_times, our_times = paired_rounds([run_upstream, run_ours], device, args.repeats, clock=clock)
    t_up, t_ours = statistics.median(up_times), statistics.median(our_times)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {device} | batch {args.batch} | {args.precision} | channels_last {args.channels_last} | "
          f"codec hidden {args.hidden_dims} x{args.num_consecutive} | {torch.get_num_threads()} threads | "
          f"load average {load:.1f} | {'CPU' if args.cpu_time else 'wall'} time")
    print(f"codec encode+decode  polymathic-aion {args.batch / t_up:9.2f} images/s")
    print(f"codec encode+decode  fmb             {args.batch / t_ours:9.2f} images/s")
    print(f"time ratio fmb / polymathic-aion     {ratio_summary(our_times, up_times)}")
    print(f"tokens equal to upstream's           {tokens_equal:9.2%}")
    print(f"decoded flux, largest difference     {difference:9.2e} (flux up to {up_flux.abs().max().item():.3g})")
    if args.no_adapters:
        return

    ours.requires_grad_(False)
    for mode in ("ste", "full"):
        model = AionAdapters(ours, hidden=args.adapter_hidden, gradient=mode).to(device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        model.train()
        ours.eval()
        euclid = torch.rand(args.batch, 4, 96, 96, device=device) * 0.1
        loss = lambda m, x=euclid: ((m(x)["euclid"].float() - x) ** 2).mean()  # noqa: E731
        step = training_step(model, loss, device, autocast=args.precision == "bf16")
        (steps,) = paired_rounds([step], device, args.repeats, clock=clock)
        t_step = statistics.median(steps)
        print(f"adapter training ({mode:>4})          {args.batch / t_step:9.1f} images/s")


if __name__ == "__main__":
    main()
