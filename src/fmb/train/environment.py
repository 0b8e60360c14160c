"""Where a run executes, built once: device, processes, precision.

Training (`BaseTrainer.setup`), `fmb embed` and `fmb bench` all start from `build_environment`, so a
torchrun / srun launch, `--device` and `train.precision` mean the same thing everywhere.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from fmb.train.distributed import DistInfo, init_distributed, resolve_device

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass
class RunEnvironment:
    device: torch.device
    dist: DistInfo
    precision: str  # bf16 | fp16 | fp32 (resolved from auto)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return AMP_DTYPES[self.precision]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 on CUDA (fp16 where bf16 is missing), fp32 on CPU."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def build_environment(device: str = "auto", precision: str = "auto", cpu_threads: int | None = None,
                      tf32: bool = True) -> RunEnvironment:
    """Processes from torchrun / SLURM variables (gloo on CPU, NCCL on CUDA), this rank's device,
    the precision, CPU threads and TF32 matmuls."""
    if cpu_threads:
        torch.set_num_threads(cpu_threads)
    resolved = resolve_device(device, 0)
    dist = init_distributed(resolved)
    if dist.enabled and resolved.type == "cuda":
        resolved = resolve_device(device, dist.local_rank)
    if resolved.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    return RunEnvironment(device=resolved, dist=dist, precision=resolve_precision(precision, resolved))
