"""`fmb bench <model>`: training-step throughput, MFU, loader throughput and peak memory.

The family's own trainer is set up exactly as for training (usually on its demo data), then
real optimizer steps are timed on batches already on the device. FLOPs of one step (forward +
backward) are counted with torch's FlopCounterMode, attention included (`fmb.train.flops`); MFU
divides the achieved FLOP/s by the device's dense peak (a table for GPUs in the precision used;
on CPU a measured fp32 matmul peak).
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import torch

from fmb.train.flops import flop_counter
from fmb.train.loader import to_device
from fmb.train.metrics import peak_memory_gb
from fmb.train.trainer import BaseTrainer

# Dense peak FLOP/s by device-name fragment: (bf16/fp16, tf32).
GPU_PEAKS = {
    "H200": (989e12, 494e12),
    "H100": (989e12, 494e12),
    "A100": (312e12, 156e12),
    "L40S": (362e12, 183e12),
    "V100": (125e12, 15.7e12),
}


def measured_cpu_peak(size: int = 1024, repeats: int = 10) -> float:
    """fp32 FLOP/s of a large square matmul on this CPU (the best of several runs)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def device_peak(device: torch.device, precision: str) -> tuple[float | None, str]:
    if device.type == "cpu":
        return measured_cpu_peak(), "measured fp32 matmul"
    name = torch.cuda.get_device_name(device)
    for fragment, (half, tf32) in GPU_PEAKS.items():
        if fragment in name:
            return (half if precision in ("bf16", "fp16") else tf32), f"{fragment} dense {precision}"
    return None, f"unknown device {name}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_bench(trainer: BaseTrainer, steps: int = 10, warmup: int = 3, loader_batches: int = 20) -> dict[str, Any]:
    trainer.setup()
    try:
        return _measure(trainer, steps, warmup, loader_batches)
    finally:
        trainer.close()


def _measure(trainer: BaseTrainer, steps: int, warmup: int, loader_batches: int) -> dict[str, Any]:
    device = trainer.device
    start = time.perf_counter()
    cached = list(itertools.islice(itertools.cycle(trainer.train_loader), loader_batches))
    loader_seconds = time.perf_counter() - start
    loader_samples = sum(_batch_size(b) for b in cached)
    on_device = [to_device(b, device) for b in cached]

    # FLOPs of one micro-batch, forward + backward, on the unwrapped model.
    counter = flop_counter()  # attention included on every device
    with counter:  # one context: the counts reset on entry
        with trainer.autocast():
            out = trainer.compute_loss(trainer.model, on_device[0])
        out.loss.backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    flops_per_batch = counter.get_total_flops()

    # The training loop's own step (gradient sync skipped on non-final micro-steps, fp16 scaler), fed
    # from batches already on the device.
    batches = itertools.cycle(on_device)
    for _ in range(warmup):
        trainer.train_step(batches)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    samples = tokens = 0
    start = time.perf_counter()
    for _ in range(steps):
        stats = trainer.train_step(batches)
        samples, tokens = samples + stats.samples, tokens + stats.tokens
    _sync(device)
    seconds = time.perf_counter() - start

    peak, peak_source = device_peak(device, trainer.precision)
    achieved = flops_per_batch * steps * trainer.accum / seconds
    return {
        "family": trainer.family,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "precision": trainer.precision,
        "compile": trainer.cfg.compile,
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "batch_size": trainer.cfg.batch_size,
        "grad_accum_steps": trainer.accum,
        "step_time_s": seconds / steps,
        "samples_per_s": samples / seconds,
        "tokens_per_s": tokens / seconds if tokens else None,
        "flops_per_sample": flops_per_batch / max(1, _batch_size(cached[0])),
        "achieved_tflops": achieved / 1e12,
        "peak_tflops": peak / 1e12 if peak else None,
        "peak_source": peak_source,
        "mfu": achieved / peak if peak else None,
        "loader_samples_per_s": loader_samples / loader_seconds,
        "loader_workers": trainer.cfg.num_workers,
        "peak_memory_gb": peak_memory_gb(device),
    }


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        batch = next(iter(batch.values()))
    if isinstance(batch, (list, tuple)):
        return _batch_size(batch[0]) if batch and not isinstance(batch[0], (int, float, str)) else len(batch)
    return len(batch)


def format_table(result: dict[str, Any]) -> str:
    rows = []
    for key, value in result.items():
        if isinstance(value, float):
            value = f"{value:.3%}" if key == "mfu" else f"{value:.4g}"
        rows.append(f"  {key:<22} {value}")
    return "\n".join(rows)
