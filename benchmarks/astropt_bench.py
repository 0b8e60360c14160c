"""AstroPT training-step throughput: fmb vs upstream `astropt` 2.0.9, side by side in one process.

Both models get the same weights (upstream's, converted), the same batch and the same fused
AdamW; steps are timed in interleaved rounds so machine noise hits both alike. Also reports
the Euclid+DESI loader's samples/s on synthetic data, and MFU on CUDA (PaLM FLOP formula).

    python benchmarks/astropt_bench.py --preset 001M --batch 8 --image-tokens 64 --spectrum-tokens 195
    python benchmarks/astropt_bench.py --device cuda --preset 095M --batch 32 --compile   # GPU

Needs the parity extra (`pip install --no-deps astropt==2.0.9` and loralib) for the upstream side.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fmb.models.astropt.convert import map_key
from fmb.models.astropt.model import PRESETS, AstroPT, GPTShape, Modality, next_patch_loss

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


def timed_steps(step, steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


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
    args = parser.parse_args()

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
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if args.compile:
        upstream, ours_run = torch.compile(upstream), torch.compile(ours)
    else:
        ours_run = ours

    def make_step(model, loss_fn):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step():
            with autocast:
                loss = loss_fn(model)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    up_step = make_step(upstream, lambda m: m(up_inputs, targets=up_targets)[1])
    our_step = make_step(ours_run, lambda m: next_patch_loss(ours.modalities, tokens, m(tokens, positions))[0])
    for step in (up_step, our_step):  # warm-up (and compilation)
        timed_steps(step, 2, device)
    up_times, our_times = [], []
    for _ in range(args.rounds):
        up_times.append(timed_steps(up_step, args.steps, device))
        our_times.append(timed_steps(our_step, args.steps, device))
    up_t, our_t = statistics.median(up_times), statistics.median(our_times)

    params = sum(p.numel() for p in ours.parameters())
    layers, _, width, _ = PRESETS[args.preset]
    flops_per_token = 6 * params + 12 * layers * length * width
    print(f"device {device} | preset {args.preset} ({params / 1e6:.2f}M params) | batch {batch} x {length} tokens"
          f" | {'bf16' if device.type == 'cuda' else 'fp32'}{' | compile' if args.compile else ''}")
    for name, seconds in (("upstream astropt 2.0.9", up_t), ("fmb", our_t)):
        line = f"{name:>24}: {seconds * 1e3:8.1f} ms/step | {batch / seconds:8.1f} samples/s | {batch * length / seconds:10.0f} tokens/s"
        if device.type == "cuda":
            name_gpu = torch.cuda.get_device_name(device)
            peak = next((v for k, v in PEAK_BF16.items() if k in name_gpu), None)
            if peak:
                line += f" | MFU {flops_per_token * batch * length / seconds / peak:.1%}"
        print(line)
    print(f"time ratio fmb / upstream: {our_t / up_t:.3f} (<= 1.0: fmb no slower)")
    if device.type == "cuda":
        print(f"peak memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    if args.loader_samples:
        for workers in (0, args.loader_workers):
            rate = loader_throughput(args.loader_samples, workers)
            print(f"loader (224 px RGB + 7781-pixel spectra, {workers} workers): {rate:.0f} samples/s")


if __name__ == "__main__":
    main()
