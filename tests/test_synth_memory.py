"""Synthetic generators write in chunks: memory does not grow with the number of objects."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tracemalloc

import pyarrow.parquet as pq
import pytest

OPTIONS = {"astrom3": {}, "splus": {}, "astroclip": {"image_size": 32}, "euclid_desi": {"image_size": 16}}


@pytest.mark.parametrize("kind", sorted(OPTIONS))
def test_generators_write_in_chunks_with_flat_memory(tmp_path, kind):
    module = importlib.import_module(f"fmb.data.synth.{kind}")

    def peak(n: int) -> int:
        tracemalloc.start()
        try:
            module.write(tmp_path / str(n), n, 0, chunk=8, **OPTIONS[kind])
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(48), peak(240)  # 3 fields x 16 and x 80 objects: the same chunks of 8
    assert large < 1.5 * small, (small, large)  # 5x the objects, not 5x the memory
    if kind != "astroclip":
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in (tmp_path / "240").rglob("*.parquet"))
        assert rows == 240


def peak_rss_mb(directory, n: int, **options) -> float:
    """Peak resident set of a fresh process writing `n` euclid-desi objects with `options`: the whole
    process (NumPy, Arrow buffers, the parquet writer: what tracemalloc misses), as the process's own
    high-water mark (VmHWM, Linux): its `wait4` figure would be this test process's peak when that is
    the larger (the kernel keeps the larger of the pre-exec and post-exec peaks)."""
    code = (f"import sys; from fmb.data.synth import euclid_desi as e; e.write(sys.argv[1], {n}, 0, **{options!r}); "
            "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])")
    done = subprocess.run([sys.executable, "-c", code, str(directory / str(n))], stdout=subprocess.PIPE, text=True,
                          check=True)
    return int(done.stdout) / 1024  # kilobytes


def test_euclid_desi_resident_memory_stays_flat(tmp_path):
    """4x the objects in chunks of 32, with anomalies planted, hardly raise the peak."""
    options = {"image_size": 16, "chunk": 32, "anomalies": 0.2}
    small, large = peak_rss_mb(tmp_path, 64, **options), peak_rss_mb(tmp_path, 256, **options)
    assert large < 1.25 * small, (small, large)


def test_euclid_desi_chunk_costs_a_few_times_its_data(tmp_path):
    """A chunk's peak is a small multiple of the bytes it holds (columns built from NumPy buffers, line
    profiles in blocks); Python lists of every value cost over 10x."""
    options = {"image_size": 32, "chunk": 512}
    base, full = peak_rss_mb(tmp_path, 8, **options), peak_rss_mb(tmp_path, 300, **options)
    train_objects = 300 - 45  # one chunk: the train split
    data_mb = train_objects * (4 * 32 * 32 + 3 * 7781) * 4 / 2**20  # four bands and flux, wavelength, error
    assert full - base < 5 * data_mb, (base, full, data_mb)
