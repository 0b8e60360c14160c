"""Peak resident memory of `fmb embed astropt` and of an AstroPT training epoch as the dataset grows, for
parquet shards and for a `save_to_disk` Arrow directory of the same objects.

    PYTHONPATH=src python benchmarks/memory_bench.py                      # 1k and 8k objects
    PYTHONPATH=src python benchmarks/memory_bench.py --sizes 1000 8000 32000

Each case is its own `python -m fmb ...` process (0 DataLoader workers, so the one process holds all
of it), and its peak RSS is the kernel's figure for that process (`wait4`, from a small launcher). The data is the
Euclid + DESI synthetic sample (`fmb data synth euclid-desi`, 64 px); the model is a one-layer AstroPT
trained for two steps, so the figures are the data path's: a reader whose memory follows the dataset
(every page of a memory-mapped file that was read stays in the resident set) shows growth here.
Target (issue 19): less than 10% more from the smallest size to 8k objects.
The script drives only the command line, so the same script measures any checkout (PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from steps import peak_rss

TINY = ["--set", "model.n_layer=1", "--set", "model.n_head=2", "--set", "model.n_embd=32"]
BATCH = 64


def fmb(*args: str) -> list[str]:
    return [sys.executable, "-m", "fmb", *args]


def to_save_to_disk(parquet_root: Path, out: Path) -> Path:
    """The same splits as a `save_to_disk` DatasetDict: Arrow stream files of 1000-row record batches."""
    if (out / "dataset_dict.json").exists():
        return out
    splits = sorted(f.name.split("-")[0] for f in (parquet_root / "data").glob("*.parquet"))
    for split in splits:
        folder = out / split
        folder.mkdir(parents=True)
        source = pq.ParquetFile(parquet_root / "data" / f"{split}-00000-of-00001.parquet")
        with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, \
                pa.ipc.new_stream(sink, source.schema_arrow) as writer:
            for batch in source.iter_batches(batch_size=1000):
                writer.write_batch(batch)
        (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}],
                                                       "_split": split}))
        (folder / "dataset_info.json").write_text("{}")
    (out / "dataset_dict.json").write_text(json.dumps({"splits": splits}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/fmb-memory-bench"), help="data, runs and logs")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 8000])
    parser.add_argument("--cases", nargs="+", default=["embed", "train"], choices=["embed", "train"])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    logs = args.work / "logs"
    logs.mkdir(exist_ok=True)

    data: dict[tuple[str, int], Path] = {}
    for n in args.sizes:
        parquet = args.work / f"parquet-{n}"
        if not (parquet / ".complete").exists():
            subprocess.run(fmb("data", "synth", "euclid-desi", "-n", str(n), "-o", str(parquet)), check=True)
            (parquet / ".complete").touch()
        data["parquet", n] = parquet
        data["arrow", n] = to_save_to_disk(parquet, args.work / f"arrow-{n}")

    checkpoint = args.work / "tiny-run"
    if not (checkpoint / "status.json").exists():
        subprocess.run(fmb("retrain", "astropt", "--demo", "--out", str(checkpoint), "--no-progress", *TINY,
                           "--set", "data.synthetic=200", "--set", "train.max_steps=2", "--set", "train.num_workers=0",
                           "--set", "train.eval_at_start=false"), check=True, stdout=subprocess.DEVNULL)

    results = []
    for case in args.cases:
        for layout in ("parquet", "arrow"):
            for n in args.sizes:
                path = data[layout, n]
                name = f"{case}-{layout}-{n}"
                if case == "embed":
                    command = fmb("embed", "astropt", "--checkpoint", str(checkpoint), "--data", str(path), "--device", "cpu",
                                  "--out", str(args.work / f"{name}.parquet"), "--num-workers", "0")
                    (args.work / f"{name}.parquet").unlink(missing_ok=True)
                else:  # one epoch of the training split (minus the demo recipe's 10% hold-out)
                    steps = math.ceil(0.85 * 0.9 * n / BATCH)
                    command = fmb("retrain", "astropt", "--demo", "--out", str(args.work / name), "--no-progress", *TINY,
                                  "--set", "data.synthetic=0", "--set", f"data.path={path}",
                                  "--set", f"train.batch_size={BATCH}", "--set", f"train.max_steps={steps}",
                                  "--set", "train.num_workers=0", "--set", "train.eval_at_start=false",
                                  "--set", "train.eval_every=100000", "--set", "train.checkpoint.every=100000")
                    subprocess.run(["rm", "-rf", str(args.work / name)], check=True)
                rss, seconds = peak_rss(command, logs / f"{name}.log", {**os.environ, "OMP_NUM_THREADS": "1"})
                results.append({"case": case, "layout": layout, "objects": n, "peak_rss_mib": rss, "seconds": seconds})
                print(f"{case:<6} {layout:<8} {n:>6} objects: peak RSS {rss:7.1f} MiB ({seconds:.0f} s)", flush=True)

    print(f"\ngrowth of peak RSS from {args.sizes[0]} objects (load average {os.getloadavg()[0]:.1f}):")
    for case in args.cases:
        for layout in ("parquet", "arrow"):
            base = next(r["peak_rss_mib"] for r in results if (r["case"], r["layout"], r["objects"]) == (case, layout, args.sizes[0]))
            growth = ", ".join(f"{r['objects']}: {r['peak_rss_mib'] / base - 1:+.1%}" for r in results
                               if (r["case"], r["layout"]) == (case, layout) and r["objects"] != args.sizes[0])
            print(f"  {case:<6} {layout:<8} {growth}  (target < +10% at 8000)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
