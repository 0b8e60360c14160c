"""Euclid + DESI loader throughput for AstroPT (224 px RGB images + DESI spectra, batch 32): fmb's loader
at 0, 1, 2 workers against a naive per-sample path (the peer).

    PYTHONPATH=src python benchmarks/loader_bench.py                       # 512 objects, 3 rounds
    PYTHONPATH=src python benchmarks/loader_bench.py --workers 0 1 2 4 --rounds 5 --json loader.json

The naive peer is what a first PyTorch Dataset over the parquet shards does: the columns the model
uses read once into an Arrow table, then per sample the row as Python objects (`to_pylist`), the PNG
through Pillow into NumPy, the spectrum from Python lists, then the same tokens as fmb's (image
patches in [0, 1], spectrum patches divided by their spread), batched by the default collate with
no workers. fmb's side is `EuclidDesiPatches` through `fmb.train.loader.make_loader` and its
block-shuffling `ResumableSampler`, the path `fmb retrain astropt` takes.

Both sides run in turn within each round (paired), over `--epochs` epochs of the same data; the
first epoch of each is a warm-up (worker start, first reads), the wall rate is over the others. Also
printed: samples per CPU second of the main process and its workers together (every epoch), the
cost of a sample whatever else the machine runs: on a shared machine wall rates with workers
measure the free cores more than the loader. Targets
(issue 19): with W workers >= 0.8 x W x the one-worker rate, and one worker >= 1.5 x the naive path.
Beside it: what a GPU step consumes (a stated figure, not measured here).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

from fmb.data.surveys.euclid_desi import open_split
from fmb.data.synth import euclid_desi
from fmb.models.astropt.data import EuclidDesiPatches, columns_for
from fmb.models.astropt.model import Modality
from fmb.train.loader import ResumableSampler, make_loader, stop_workers

PATCH, SPECTRUM_PATCH, SPECTRUM_LENGTH = 16, 10, 7781
MODALITIES = [Modality("images", PATCH * PATCH * 3, PATCH), Modality("spectra", SPECTRUM_PATCH, SPECTRUM_PATCH)]
# issue 19: the 095M AstroPT preset at 40% MFU on one H100, 224 px images + spectra (stated, not measured)
GPU_CONSUMPTION = 270.0


def synthetic(directory: Path, objects: int, size: int) -> Path:
    """The Euclid + DESI synthetic sample at `size` px (written once; `fmb data synth euclid-desi` writes
    the same schema at 64 px); or `directory` itself, when it is a parquet file already."""
    if directory.suffix == ".parquet":
        return directory
    marker = directory / f".complete-{objects}-{size}"
    if not marker.exists():
        euclid_desi.write(directory, objects, seed=0, image_size=size)
        marker.touch()
    return directory / "data" / "train-00000-of-00001.parquet"


class NaiveRows(Dataset):
    """The peer: a row as Python objects -> Pillow -> NumPy -> tokens."""

    def __init__(self, path: Path, size: int) -> None:
        self.table = pq.read_table(path, columns=["object_id", "RGB_image", "spectrum"])
        self.size = size

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        row = self.table.slice(i, 1).to_pylist()[0]
        image = np.array(Image.open(io.BytesIO(row["RGB_image"]["bytes"])).convert("RGB"))
        pixels = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
        side = self.size // PATCH
        patches = pixels.reshape(3, side, PATCH, side, PATCH).permute(1, 3, 2, 4, 0).reshape(-1, PATCH * PATCH * 3)
        if row["spectrum"] is None:
            flux = np.zeros(SPECTRUM_LENGTH, np.float32)
        else:
            flux = np.asarray(row["spectrum"]["flux"], np.float32)
            flux = np.nan_to_num(flux / np.nanstd(flux))
        pad = (-len(flux)) % SPECTRUM_PATCH
        spectrum = torch.from_numpy(np.pad(flux, (0, pad)).reshape(-1, SPECTRUM_PATCH))
        return {"object_id": row["object_id"], "images": patches, "spectra": spectrum}


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (DataLoader workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed_epochs(loader: DataLoader, sampler: ResumableSampler | None, dataset: Dataset | None, epochs: int) -> float:
    """Samples per second of wall time over the epochs after the first."""
    samples, seconds = 0, 0.0
    for epoch in range(epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        start = time.perf_counter()
        count = sum(len(batch["object_id"]) for batch in loader)
        if epoch:
            samples, seconds = samples + count, seconds + time.perf_counter() - start
    return samples / seconds


def measured(rate: Callable[[], float], samples: int) -> tuple[float, float]:
    """(wall samples/s after the warm-up epoch, samples per CPU second over every epoch, workers included)."""
    start = cpu_seconds()
    wall = rate()
    return wall, samples / (cpu_seconds() - start)


def naive_rate(path: Path, size: int, batch: int, epochs: int) -> float:
    dataset = NaiveRows(path, size)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=0,
                        generator=torch.Generator().manual_seed(0))
    return timed_epochs(loader, None, None, epochs)


def fmb_rate(path: Path, size: int, batch: int, workers: int, epochs: int) -> float:
    rows = open_split(str(path), "train", columns_for(MODALITIES), None, 0.0, 0)
    dataset = EuclidDesiPatches(rows, MODALITIES, size, SPECTRUM_LENGTH)
    sampler = ResumableSampler(dataset, num_replicas=1, rank=0, seed=0)
    loader = make_loader(dataset, sampler, batch, workers, None, pin_memory=False, drop_last=True, seed=0)
    try:
        return timed_epochs(loader, sampler, loader.dataset, epochs)
    finally:
        stop_workers(loader)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/fmb-loader-bench"), help="where the sample is written, or a Euclid + DESI parquet file to read")
    parser.add_argument("--objects", type=int, default=512, help="objects in the sample (85%% of them train)")
    parser.add_argument("--image-size", type=int, default=224, help="pixels (a multiple of 16)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3, help="per measurement; the first is a warm-up")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    path = synthetic(args.data, args.objects, args.image_size)
    samples = (pq.ParquetFile(path).metadata.num_rows // args.batch) * args.batch * args.epochs
    runs = {"naive": lambda: naive_rate(path, args.image_size, args.batch, args.epochs),
            **{f"fmb_{w}": (lambda w=w: fmb_rate(path, args.image_size, args.batch, w, args.epochs)) for w in args.workers}}
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            rate, per_cpu = measured(run, samples)
            wall[name].append(rate)
            cpu[name].append(per_cpu)
    median = {name: statistics.median(values) for name, values in wall.items()}
    per_cpu = {name: statistics.median(values) for name, values in cpu.items()}
    load = os.getloadavg()[0]
    print(f"Euclid + DESI, {args.image_size} px images + spectra, batch {args.batch}, {args.threads} main thread(s), "
          f"{args.rounds} paired rounds, load average {load:.1f} on {os.cpu_count()} CPUs")
    print("  samples/s of wall time (after a warm-up epoch), and samples per CPU second (main process + workers)")
    print(f"  naive per-sample path (peer), 0 workers: {median['naive']:7.1f} /s  {per_cpu['naive']:7.1f} per CPU s")
    one = median.get("fmb_1")
    for w in args.workers:
        name = f"fmb_{w}"
        line = (f"  fmb, {w} worker(s): {median[name]:7.1f} /s  {per_cpu[name]:7.1f} per CPU s  "
                f"x{median[name] / median['naive']:.2f} naive (wall), x{per_cpu[name] / per_cpu['naive']:.2f} (CPU)")
        if w > 0:
            line += f"  {median[name] / w:.1f}/s per worker"
        if one and w > 1:
            line += f"  {median[name] / (w * one):.2f} of W x one-worker (target >= 0.80)"
        print(line)
    if one:
        print(f"  one worker / naive: {one / median['naive']:.2f} wall, {per_cpu['fmb_1'] / per_cpu['naive']:.2f} CPU "
              "(target >= 1.50)")
    print(f"  GPU consumption, AstroPT 095M at 40% MFU on an H100: ~{GPU_CONSUMPTION:.0f} samples/s (stated, "
          f"not measured): {GPU_CONSUMPTION / one if one else float('nan'):.1f} workers at the one-worker rate")
    if args.json:
        args.json.write_text(json.dumps({"samples_per_s": median, "samples_per_cpu_s": per_cpu, "rounds": wall,
                                         "rounds_per_cpu_s": cpu, "load_average": load, "batch": args.batch, "image_size": args.image_size,
                                         "gpu_consumption_stated": GPU_CONSUMPTION}, indent=1))


if __name__ == "__main__":
    main()
