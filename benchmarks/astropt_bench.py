"""AstroPT training-step throughput: fmb vs upstream `astropt` 2.0.9, side by side in one process.

Both models get the same weights (upstream's, converted), the same batch and the same fused
AdamW; steps are timed in interleaved rounds so machine noise hits both alike. Also reports
the Euclid+DESI loader's samples/s on synthetic data, and each step's share of the device's peak
(FLOPs counted by fmb.train.flops; on CPU the peak is a measured fp32 matmul, on CUDA the bf16 table).
`--profile` splits the step's time into matmuls, attention kernels and the rest.

    python benchmarks/astropt_bench.py --preset 001M --batch 8 --image-tokens 64 --spectrum-tokens 195
    python benchmarks/astropt_bench.py --preset 010M --batch 4 --image-tokens 196 --spectrum-tokens 779 \
        --threads 1 --cpu-time --steps 1 --rounds 5 --loader-samples 0 --profile
    python benchmarks/astropt_bench.py --device cuda --preset 095M --batch 32 --compile   # GPU

Needs the parity extra (`pip install --no-deps astropt==2.0.9` and loralib) for the upstream side.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from steps import paired_rounds, ratio_summary, training_step

from fmb.models.astropt.convert import map_key
from fmb.models.astropt.model import PRESETS, AstroPT, GPTShape, Modality, next_patch_loss
from fmb.train.flops import flop_counter

# Dense bf16 peak FLOP/s by device name fragment.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "V100": 125e12}


def build_pair(preset: str, block_size: int, device: torch.device):
    from astropt.model import GPT, GPTConfig, ModalityConfig, ModalityRegistry

    layers, heads, width, _ = PRESETS[preset]
    configs = [ModalityConfig("images", 768, 1, 16, True, 779 / 196), ModalityConfig("spectra", 10, 1, 10, True, 196 / 779)]
    upstream = GPT(GPTConfig(n_layer=layers, n_head=heads, n_embd=width, block_size=block_size, modalities=configs),
                   ModalityRegistry(configs), master_process=False)
    ours = AstroPT(GPTShape(layers, heads, width, block_size),
                   [Modality("images", 768, 16, loss_weight=779 / 196), Modality("spectra", 10, 10, loss_weight=196 / 779)])
    ours.load_state_dict({map_key(k): v for k, v in upstream.state_dict().items()}, strict=True)
    return upstream.to(device), ours.to(device)


def step_profile(step) -> dict[str, float]:
    """Self CPU time of one step by kind: matmuls, attention kernels, everything else (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    kinds = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for event in prof.key_averages():
        if event.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"):
            kinds["matmul"] += event.self_cpu_time_total
        elif "scaled_dot_product" in event.key and "attention" in event.key:
            kinds["attention"] += event.self_cpu_time_total
        else:
            kinds["other"] += event.self_cpu_time_total
    total = sum(kinds.values())
    return {k: v / total for k, v in kinds.items()}


def loader_throughput(samples: int, workers: int) -> float:
    from torch.utils.data import DataLoader

    from fmb.data.surveys.euclid_desi import open_split
    from fmb.data.synth.euclid_desi import write
    from fmb.models.astropt.data import COLUMNS, EuclidDesiPatches

    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp), samples, seed=0, image_size=64)
        rows = open_split(tmp, "train", COLUMNS, None, 0.0, 0)
        dataset = EuclidDesiPatches(rows, [Modality("images", 768, 16), Modality("spectra", 10, 10)], 224, 7781)
        loader = DataLoader(dataset, batch_size=16, num_workers=workers)
        start = time.perf_counter()
        count = sum(len(batch["object_id"]) for batch in loader)
        return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="001M", choices=list(PRESETS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-tokens", type=int, default=64)
    parser.add_argument("--spectrum-tokens", type=int, default=195)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--loader-samples", type=int, default=256)
    parser.add_argument("--loader-workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true", help="time by process CPU time (shared CPU, 1 thread)")
    parser.add_argument("--profile", action="store_true", help="print where each step's time goes")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    torch.manual_seed(0)
    length = args.image_tokens + args.spectrum_tokens
    upstream, ours = build_pair(args.preset, max(1024, length + 1), device)
    batch = args.batch
    images = torch.rand(batch, args.image_tokens, 768, device=device)
    spectra = torch.randn(batch, args.spectrum_tokens, 10, device=device)
    tokens = {"images": images, "spectra": spectra}
    positions = {k: torch.arange(v.shape[1], device=device).expand(batch, -1) for k, v in tokens.items()}
    up_inputs = {**tokens, **{f"{k}_positions": v for k, v in positions.items()}}
    up_targets = {"images": images[:, 1:], "spectra": spectra}
    if args.compile:
        upstream, ours_run = torch.compile(upstream), torch.compile(ours)
    else:
        ours_run = ours

    up_step = training_step(upstream, lambda m: m(up_inputs, targets=up_targets)[1], device)
    our_step = training_step(ours_run, lambda m: next_patch_loss(ours.modalities, tokens, m(tokens, positions))[0], device)
    clock = time.process_time if args.cpu_time else time.perf_counter
    with flop_counter() as counter:  # one forward + backward, attention included
        next_patch_loss(ours.modalities, tokens, ours(tokens, positions))[0].backward()
    ours.zero_grad(set_to_none=True)
    step_flops = counter.get_total_flops()
    up_times, our_times = paired_rounds([up_step, our_step], device, args.rounds, calls=args.steps, clock=clock)
    up_t, our_t = statistics.median(up_times), statistics.median(our_times)

    if device.type == "cuda":
        name_gpu = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16.items() if k in name_gpu), None)
        peak_name = f"{name_gpu} dense bf16"
    else:
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)  # timed by the steps' clock, best of 10
        peak = 2 * 1024**3 / min(paired_rounds([lambda: a @ b], device, 10, warmup=1, clock=clock)[0])
        peak_name = f"measured fp32 1024^3 matmul, {torch.get_num_threads()} threads"
    params = sum(p.numel() for p in ours.parameters())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {device} | preset {args.preset} ({params / 1e6:.2f}M params) | batch {batch} x {length} tokens"
          f" | {'bf16' if device.type == 'cuda' else 'fp32'}{' | compile' if args.compile else ''}"
          f" | {torch.get_num_threads()} threads | load average {load:.1f} | {'CPU' if args.cpu_time else 'wall'} time")
    print(f"FLOPs per step {step_flops:.3g} (FlopCounterMode, causal attention by its kept pairs); peak: {peak_name}"
          + (f" {peak / 1e12:.3f} TFLOP/s" if peak else ""))
    for name, seconds in (("upstream astropt 2.0.9", up_t), ("fmb", our_t)):
        line = f"{name:>24}: {seconds * 1e3:8.1f} ms/step | {batch / seconds:8.1f} samples/s | {batch * length / seconds:10.0f} tokens/s"
        if peak:
            line += f" | {step_flops / seconds / peak:.1%} of peak"
        print(line)
    print(f"time ratio fmb / upstream: {ratio_summary(our_times, up_times)}")
    if device.type == "cuda":
        print(f"peak memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    if args.profile:
        for name, step in (("upstream", up_step), ("fmb", our_step)):
            shares = step_profile(step)
            print(f"{name:>24} step time: " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))
    if args.loader_samples:
        for workers in (0, args.loader_workers):
            rate = loader_throughput(args.loader_samples, workers)
            print(f"loader (224 px RGB + 7781-pixel spectra, {workers} workers): {rate:.0f} samples/s")


if __name__ == "__main__":
    main()
