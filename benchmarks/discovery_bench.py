"""`fmb detect` at survey scale: every scorer on N objects x 3 models x 512-d embeddings.

For each size (a fresh process each, so the memory figures are its own) three embedding files are
written in chunks of 10k rows: per model an image and a spectrum column, both a random projection of
one shared 32-d latent (a mixture of 64 clusters) plus noise, so neighbours, densities and the
cross-modal cosine mean something; 0.5% of objects have a far-off latent (`outlier`) and 0.5% the
spectrum of another object (`swap`), as `truth_anomaly`. Then `detect` runs end to end (load, every
scorer on every column, fusion, truth and agreement tables), and the script prints wall time and
peak RSS per scorer (RSS sampled every 20 ms while that scorer runs) and in total, the growth from
the smallest size, the AUROC of each kind as a sanity check, and the neighbour search against its
peer, exact search: recall@k of faiss on a sample of queries, and exact search's time on those
queries scaled to every object.

    PYTHONPATH=src OMP_NUM_THREADS=2 python benchmarks/discovery_bench.py --sizes 10000,100000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MODELS = ("model_a", "model_b", "model_c")
LATENT, CLUSTERS, CHUNK = 32, 64, 10_000


def rss_mib() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakByStage:
    """Samples RSS in a thread; the peak is kept per stage name (set by detect's `stage` callback)."""

    def __init__(self) -> None:
        self.stage, self.peaks, self.seconds, self.running = "start", {}, {}, True
        self.since = time.perf_counter()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def __call__(self, name: str) -> None:
        self._record()
        now = time.perf_counter()
        self.seconds[self.stage] = self.seconds.get(self.stage, 0.0) + now - self.since
        self.stage, self.since = name, now

    def _record(self) -> None:
        self.peaks[self.stage] = max(self.peaks.get(self.stage, 0.0), rss_mib())

    def _sample(self) -> None:
        while self.running:
            self._record()
            time.sleep(0.02)

    def stop(self) -> None:
        self.running = False
        self.thread.join()


def write_files(n: int, dim: int, directory: Path, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLUSTERS, LATENT)) * 2.0
    projections = [rng.standard_normal((LATENT, dim)).astype(np.float32) / np.sqrt(LATENT) for _ in MODELS]
    paths = [directory / f"{m}.parquet" for m in MODELS]
    writers = None
    for start in range(0, n, CHUNK):
        rows = min(CHUNK, n - start)
        part = np.random.default_rng([seed, start])
        latent = centres[part.integers(0, CLUSTERS, rows)] + part.standard_normal((rows, LATENT))
        kind = np.array([None] * rows, dtype=object)
        draw = part.random(rows)
        outlier, swap = draw < 0.005, (draw >= 0.005) & (draw < 0.01)
        latent[outlier] = part.standard_normal((outlier.sum(), LATENT)) * 6.0
        kind[outlier], kind[swap] = "outlier", "swap"
        spectrum_latent = latent.copy()
        spectrum_latent[swap] = latent[part.permutation(np.flatnonzero(~outlier & ~swap))[: swap.sum()]]
        tables = []
        for w in projections:
            image = latent.astype(np.float32) @ w + 0.3 * part.standard_normal((rows, dim), dtype=np.float32)
            spectrum = spectrum_latent.astype(np.float32) @ w + 0.3 * part.standard_normal((rows, dim), dtype=np.float32)
            columns = {"object_id": pa.array(np.arange(start, start + rows, dtype=np.int64)),
                       "truth_anomaly": pa.array(kind.tolist(), pa.string())}
            for name, matrix in (("image", image), ("spectrum", spectrum)):
                columns[f"embedding_{name}"] = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), dim)
            tables.append(pa.table(columns))
        writers = writers or [pq.ParquetWriter(p, t.schema) for p, t in zip(paths, tables, strict=True)]
        for writer, table in zip(writers, tables, strict=True):
            writer.write_table(table)
    for writer in writers:
        writer.close()
    return paths


def one_size(n: int, directory: Path, recall_queries: int, search: str) -> dict:
    from fmb.embeddings import load_embeddings
    from fmb.evaluation import anomaly
    from fmb.evaluation.detect import DetectOptions, detect

    paths = [directory / f"{m}.parquet" for m in MODELS]
    rss_before = rss_mib()
    peaks = PeakByStage()
    start = time.perf_counter()
    result = detect([str(p) for p in paths], directory / "out", DetectOptions(neighbour_search=search), stage=peaks)
    total = time.perf_counter() - start
    peaks.stop()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    truth_rows = _rows(directory / "out" / "truth.csv")
    by_kind: dict[str, dict[str, list[float]]] = {}  # scorer -> kind -> AUROC of each model and column
    for r in truth_rows:
        by_kind.setdefault(r["score"].rsplit("/", 1)[-1], {}).setdefault(r["kind"], []).append(r["auroc"])
    best = {scorer: {kind: float(np.mean(v)) for kind, v in kinds.items()} for scorer, kinds in by_kind.items()}
    by_scorer: dict[str, float] = {}  # the last part of a stage name: load, a scorer, fusion and reports
    seconds: dict[str, float] = {}
    for stage, peak in peaks.peaks.items():
        scorer = stage.rsplit("/", 1)[-1]
        by_scorer[scorer] = max(by_scorer.get(scorer, 0.0), peak)
        seconds[scorer] = seconds.get(scorer, 0.0) + peaks.seconds.get(stage, 0.0)
    # the neighbour search against exact search, on a sample of queries of the first column
    rows, nb = result.neighbours[f"{MODELS[0]}/image"]
    unit = anomaly.unit_rows(load_embeddings(paths[0]).embeddings["image"][rows])
    queries = np.random.default_rng(1).choice(len(unit), min(recall_queries, len(unit)), replace=False)
    start = time.perf_counter()
    exact_index, _ = anomaly.exact_search(unit, queries, nb.k)
    exact_seconds = (time.perf_counter() - start) * len(unit) / len(queries)
    recall = anomaly.recall_at_k(nb.index[queries], exact_index)
    return {"n": n, "scores": len(result.scores), "total_s": total, "rss_before_mib": rss_before, "peak_rss_mib": peak_rss,
            "time_s": seconds, "peak_mib": by_scorer, "auroc": best, "recall": recall,
            "search": search if search != "auto" else ("faiss" if n > anomaly.EXACT_UP_TO else "exact"),
            "exact_s_per_column": exact_seconds, "search_s_per_column": seconds["neighbours"] / (2 * len(MODELS))}


def _rows(path: Path) -> list[dict]:
    import pyarrow.csv as pa_csv

    return pa_csv.read_csv(path).to_pylist()


def report(results: list[dict]) -> None:
    base = results[0]
    stages = ["load", "neighbours", "knn", "lof", "iforest", "flow", "mismatch", "mapped_mismatch", "fusion and reports"]
    print(f"\nload: {os.getloadavg()[0]:.1f} (1-min average at the end); threads OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"{'objects':>8} | " + " | ".join(f"{s[:16]:>16}" for s in [*stages, "total"]))
    for r in results:
        cells = [f"{r['time_s'].get(s, 0):7.1f}s {r['peak_mib'].get(s, 0) / 1024:5.2f}G" for s in stages]
        print(f"{r['n']:>8} | " + " | ".join(f"{c:>16}" for c in cells) + f" | {r['total_s']:7.1f}s {r['peak_rss_mib'] / 1024:5.2f}G")
    print("(seconds over every model and column, and the peak RSS while that stage ran)")
    for r in results[1:]:
        print(f"{r['n']} / {base['n']} objects: time x{r['total_s'] / base['total_s']:.1f}, "
              f"peak RSS x{r['peak_rss_mib'] / base['peak_rss_mib']:.1f}")
    for r in results:
        print(f"{r['n']}: neighbour search {r['search']} {r['search_s_per_column']:.1f}s per column, exact search "
              f"{r['exact_s_per_column']:.1f}s per column (scaled from a query sample): x{r['exact_s_per_column'] / r['search_s_per_column']:.1f}; "
              f"recall@16 vs exact {r['recall']:.3f}; neighbour search without faiss would take "
              f"{r['total_s'] - r['time_s']['neighbours'] + 2 * len(MODELS) * r['exact_s_per_column']:.0f}s in all")
        print("  mean AUROC over models and columns per scorer (outlier / swap / any): "
              + ", ".join(f"{scorer} {' / '.join(f'{v:.2f}' for v in kinds.values())}" for scorer, kinds in r["auroc"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000", help="object counts, comma-separated")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--recall-queries", type=int, default=2000)
    parser.add_argument("--search", default="auto", help="neighbour search: auto, exact or faiss")
    parser.add_argument("--write", type=int, help=argparse.SUPPRESS)  # child: write the files of one size
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child: detect on them (JSON out)
    parser.add_argument("--directory", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        write_files(args.write, args.dim, args.directory)
        return
    if args.one:
        print(json.dumps(one_size(args.one, args.directory, args.recall_queries, args.search)))
        return
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            # a process each: writing the files, then detect, so each peak RSS is its own
            common = [sys.executable, __file__, "--directory", tmp, "--dim", str(args.dim)]
            start = time.perf_counter()
            subprocess.run([*common, "--write", str(n)], check=True)
            written = time.perf_counter() - start
            out = subprocess.run([*common, "--one", str(n), "--search", args.search,
                                  "--recall-queries", str(args.recall_queries)], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"size {n} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{n}: files written in {written:.0f}s; detect {results[-1]['total_s']:.1f}s, "
              f"peak RSS {results[-1]['peak_rss_mib'] / 1024:.2f} GiB", flush=True)
    report(results)


if __name__ == "__main__":
    main()
