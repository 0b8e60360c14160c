"""Peak memory of the synthetic generators: `fmb data synth KIND -n N` for each N in a fresh process,
its wall time and peak resident set (from os.wait4), and the peak against the smallest N's (the
generators write in chunks, so the ratio should stay near 1 as N grows).

    python benchmarks/synth_memory_bench.py euclid-desi -n 1000 3000 10000
    python benchmarks/synth_memory_bench.py euclid-desi -n 3000 --extra=--anomalies=0.05
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from steps import peak_rss


def peak(kind: str, n: int, extra: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one `fmb data synth` run."""
    with tempfile.TemporaryDirectory() as work:
        command = [sys.executable, "-m", "fmb", "data", "synth", kind, "-o", f"{work}/data", "-n", str(n), *extra]
        rss, seconds = peak_rss(command, Path(work) / "synth.log")
        return seconds, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind")
    parser.add_argument("-n", type=int, nargs="+", default=[1000, 3000, 10000])
    parser.add_argument("--extra", action="append", default=[], help="more options for fmb data synth")
    args = parser.parse_args()
    first = None
    print(f"| {args.kind} objects | wall time | peak RSS | peak / first |")
    print("|---|---|---|---|")
    for n in args.n:
        seconds, rss = peak(args.kind, n, args.extra)
        first = first or rss
        print(f"| {n} | {seconds:.0f} s | {rss:.0f} MB | {rss / first:.2f} |", flush=True)


if __name__ == "__main__":
    main()
