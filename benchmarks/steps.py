"""Shared by the benchmark scripts (run as `python benchmarks/<name>.py`, which puts this folder on
sys.path): one optimizer step of a model, paired, interleaved timing rounds, the peak resident
memory of a command, the `--threads` command line of the CPU training benchmarks, and a fresh
output folder for each invocation."""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


def training_step(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], device: torch.device,
                  autocast: bool | None = None) -> Callable[[], None]:
    """forward (bf16 autocast on CUDA unless `autocast` says otherwise), backward, fused AdamW step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    enabled = device.type == "cuda" if autocast is None else autocast

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled):
            loss = loss_fn(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def paired_rounds(fns: list[Callable[[], object]], device: torch.device, rounds: int, warmup: int = 2,
                  calls: int = 1, clock: Callable[[], float] = time.perf_counter) -> list[list[float]]:
    """Seconds per call of each function in each of `rounds` rounds (`calls` calls per round); the
    functions alternate within a round, so load changes on a shared machine hit all alike: compare
    them round by round. On a shared CPU `clock=time.process_time` counts this process's CPU time,
    which other jobs disturb less."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, record in zip(fns, times, strict=True):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = clock()
            for _ in range(calls):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            record.append((clock() - start) / calls)
    return times


def ratio_summary(ours: list[float], peer: list[float]) -> str:
    """Median of the round-by-round time ratios, with their range."""
    ratios = sorted(o / p for o, p in zip(ours, peer, strict=True))
    return f"{statistics.median(ratios):.3f} (paired rounds: {ratios[0]:.3f}-{ratios[-1]:.3f} over {len(ratios)})"


def parse_with_threads(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """`parser`'s arguments with `--threads` added: torch's CPU threads set from it, and logging at
    warnings only, so what the benchmark prints is its table."""
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 is fastest on a busy machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    return args


def fresh_folder(out: Path) -> Path:
    """A new numbered folder under `out` (001, 002, ...) for one invocation: a rerun into the same
    `--out` (with the same or other options) never meets the runs or data of an earlier one, which
    the trainer would refuse, or a benchmark would silently read as its own."""
    out.mkdir(parents=True, exist_ok=True)
    number = 1 + max((int(p.name) for p in out.iterdir() if p.name.isdigit()), default=0)
    while True:
        folder = out / f"{number:03d}"
        try:
            folder.mkdir()
        except FileExistsError:  # another invocation took it first
            number += 1
            continue
        return folder


# Started by a small launcher process: a child started straight from a benchmark script reports the
# script's own peak when that is larger (the kernel keeps the larger of the pre-exec and post-exec peaks).
LAUNCH = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def peak_rss(command: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one process running `command` (Linux: `wait4`'s kilobytes),
    its output in `log`, `env` its environment (None: this one's); a failure stops the benchmark
    with the log's tail."""
    start = time.perf_counter()
    peak = log.with_suffix(".maxrss")
    with log.open("w") as out:
        code = subprocess.run([sys.executable, "-c", LAUNCH, str(peak), *command], stdout=out, stderr=subprocess.STDOUT,
                              env=env).returncode
    if code != 0:
        raise SystemExit(f"failed ({code}): {' '.join(command)}\n{log.read_text()[-3000:]}")
    return int(peak.read_text()) / 1024, time.perf_counter() - start
