"""Training metrics: device-side accumulation, `metrics.jsonl`, a one-line summary, optional sinks.

Values are accumulated as tensors on the device and read (one synchronisation) only when a
log record is written. Only rank 0 writes; each line is flushed, so a crash loses nothing
already logged.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from fmb.errors import ConfigError

log = logging.getLogger("fmb")


class Meter:
    """Running sums of named scalars, kept on the device until `read`."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
            self.counts[name] = self.counts.get(name, 0) + 1

    def read(self) -> dict[str, float]:
        """Mean of each name since the last read."""
        if not self.sums:
            return {}
        names = list(self.sums)
        stacked = torch.stack([self.sums[n].reshape(()) for n in names]).cpu().tolist()
        out = {n: v / self.counts[n] for n, v in zip(names, stacked, strict=False)}
        self.sums.clear()
        self.counts.clear()
        return out


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    scale = 2**20 if sys.platform != "darwin" else 2**30  # ru_maxrss: KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


class MetricsLog:
    """Writes `metrics.jsonl` (and TensorBoard / W&B when asked) on rank 0."""

    def __init__(self, run_dir: Path, enabled: bool, sinks: list[str], run_name: str) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._file = open(self.path, "a") if enabled else None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        for sink in sinks:
            if sink == "tensorboard":
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    raise ConfigError("train.log_to has 'tensorboard' but it is not installed: pip install 'fmb[tensorboard]'") from None
                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
            elif sink == "wandb":
                try:
                    import wandb
                except ImportError:
                    raise ConfigError("train.log_to has 'wandb' but it is not installed: pip install 'fmb[wandb]'") from None
                self._wandb = wandb.init(project="fmb", name=run_name, dir=str(run_dir))
            else:
                raise ConfigError(f"train.log_to: unknown sink '{sink}' (tensorboard or wandb)")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        step = int(record.get("step", 0))
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def summary_line(record: dict[str, Any], keys: tuple[str, ...]) -> str:
    parts = [f"step {record['step']}"]
    for key in keys:
        value = record.get(key)
        if isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
    return " | ".join(parts)
