"""Peak memory of the synthetic generators: `fmb data synth KIND -n N` for each N in a fresh process,
its wall time and peak resident set (from os.wait4), and the peak against the smallest N's (the
generators write in chunks, so the ratio should stay near 1 as N grows).

    python benchmarks/synth_memory_bench.py euclid-desi -n 1000 3000 10000
    python benchmarks/synth_memory_bench.py euclid-desi -n 3000 --extra=--anomalies=0.05
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time


def peak(kind: str, n: int, extra: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one `fmb data synth` run."""
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "fmb", "data", "synth", kind, "-o", out, "-n", str(n), *extra],
                                 stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"fmb data synth {kind} -n {n} failed")
        return time.perf_counter() - start, usage.ru_maxrss / 1024  # Linux: kilobytes


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
