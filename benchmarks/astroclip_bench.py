"""AstroCLIP training throughput and peak memory per preset and fine-tune mode.

    PYTHONPATH=src python benchmarks/astroclip_bench.py              # CPU, small presets
    PYTHONPATH=src python benchmarks/astroclip_bench.py --device cuda --reference   # + ViT-L/12 + SpecFormer, bf16

Each configuration runs in its own process (so the peak memory is its own): a few AdamW steps
on random images and spectra of the real shapes, timed after warm-up. On CUDA it also counts
the FLOPs of one step (torch's FlopCounterMode via fmb.train.flops) and reports MFU against --peak-tflops.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from fmb.models.astroclip.model import clip_logits
from fmb.models.astroclip.trainer import (
    AstroCLIPModelConfig,
    apply_finetune,
    build_astroclip,
)
from fmb.train.flops import flop_counter
from fmb.train.losses import masked_clip_loss

# (label, image preset, patch, image size, spectrum preset, spectrum slice/stride, shared width, batch)
CPU_CONFIGS = [
    ("demo", "demo", 8, 32, "demo", (80, 40), 64, 32),
    ("tiny/small", "tiny", 12, 144, "small", (20, 10), 512, 8),
]
REFERENCE = ("ViT-L/12 + SpecFormer", "large", 12, 144, "base", (20, 10), 1024, 64)
MODES = [("full", 0), ("heads", 0), ("heads+image", 2), ("heads+image+spectrum", 2)]


def run_one(spec: dict) -> dict:
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    cfg = AstroCLIPModelConfig(image_preset=spec["image"], patch_size=spec["patch"], spectrum_preset=spec["spectrum"],
                               spectrum_slice=spec["slice"][0], spectrum_stride=spec["slice"][1],
                               embed_dim=spec["embed"], finetune=spec["mode"], image_blocks=spec["blocks"],
                               head_dropout=0.0)
    model = build_astroclip(cfg, spec["size"]).to(device)
    apply_finetune(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    batch = spec["batch"]
    images = torch.rand(batch, 3, spec["size"], spec["size"], device=device)
    spectra = 1.0 + torch.randn(batch, 7781, device=device)
    valid = torch.ones(batch, dtype=torch.bool, device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else None

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            image, spectrum, scale = model(images, spectra)
        masked_clip_loss(clip_logits(image, spectrum, scale), valid).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    flops = None
    if device.type == "cuda":
        with flop_counter() as counter:
            step()
        flops = counter.get_total_flops()
    for _ in range(spec["warmup"]):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(spec["steps"]):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    out = {"samples_per_s": spec["steps"] * batch / elapsed, "step_s": elapsed / spec["steps"],
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "trainable_m": sum(p.numel() for p in params) / 1e6}
    if device.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        out["mfu"] = flops * spec["steps"] / elapsed / (spec["peak_tflops"] * 1e12)
    else:
        out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reference", action="store_true", help="add the ViT-L/12 + SpecFormer reference size")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200: 989)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    configs = CPU_CONFIGS + ([REFERENCE] if args.reference else [])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {args.device} | threads {torch.get_num_threads()} | load average {load:.1f} | "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    memory = "peak GPU GB" if args.device.startswith("cuda") else "peak RSS GB"
    print(f"{'preset':<24}{'mode':<22}{'batch':>6}{'params M':>10}{'trainable M':>12}{'samples/s':>11}{memory:>13}"
          + ("  MFU" if args.device.startswith("cuda") else ""))
    for label, image, patch, size, spectrum, slices, embed, batch in configs:
        for mode, blocks in MODES:
            spec = {"device": args.device, "image": image, "patch": patch, "size": size, "spectrum": spectrum,
                    "slice": slices, "embed": embed, "batch": batch, "mode": mode, "blocks": blocks, "steps": args.steps,
                    "warmup": args.warmup, "peak_tflops": args.peak_tflops}
            done = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True)
            if done.returncode:
                print(f"{label:<24}{mode:<22} failed: {done.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            mem = r.get("peak_mem_gb", r.get("peak_rss_gb"))
            line = (f"{label:<24}{mode:<22}{batch:>6}{r['params_m']:>10.2f}{r['trainable_m']:>12.2f}"
                    f"{r['samples_per_s']:>11.1f}{mem:>13.2f}")
            print(line + (f"  {r['mfu']:.1%}" if "mfu" in r else ""), flush=True)


if __name__ == "__main__":
    main()
