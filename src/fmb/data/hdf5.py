"""Row access to HDF5 files whose objects are rows of same-length datasets, possibly in groups.

The AstroCLIP cross-match keeps one group per healpix chunk, each with `image`, `spectrum`,
`redshift`, `targetid` datasets; a flat file keeps the datasets at the root. `fraction`
selects the same part of every group (upstream: the first 80% is train). The file is opened
lazily in each process, so a source can be handed to DataLoader workers.
"""

from __future__ import annotations

import bisect
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from fmb.errors import DataError


class HDF5Source:
    def __init__(self, path: str | Path, fields: list[str], fraction: tuple[float, float] = (0.0, 1.0)) -> None:
        self.path = Path(path)
        self.fields = list(fields)
        if not self.path.is_file():
            raise DataError(f"HDF5 file does not exist: {self.path}")
        lo, hi = fraction
        if not 0.0 <= lo <= hi <= 1.0:
            raise DataError(f"HDF5 row fraction must satisfy 0 <= lo <= hi <= 1, got {fraction}")
        self._ranges: list[tuple[str, int, int]] = []  # (group name, first row, end row)
        self._starts: list[int] = []
        total = 0
        try:
            with h5py.File(self.path, "r") as handle:
                groups = [g for g in sorted(handle) if isinstance(handle[g], h5py.Group)]
                groups = groups or ["/"]
                for name in groups:
                    group = handle[name]
                    missing = [f for f in self.fields if f not in group]
                    if missing:
                        raise DataError(f"{self.path}: group '{name}' has no field(s) {', '.join(missing)}; "
                                        f"it has: {', '.join(sorted(group))}")
                    lengths = {group[f].shape[0] for f in self.fields}
                    if len(lengths) != 1:
                        raise DataError(f"{self.path}: group '{name}' fields have different lengths {sorted(lengths)}")
                    n = lengths.pop()
                    first, end = int(n * lo), int(n * hi)
                    if end > first:
                        self._ranges.append((name, first, end))
                        self._starts.append(total)
                        total += end - first
        except OSError as exc:
            raise DataError(f"cannot read HDF5 file {self.path}: {exc}") from None
        self._length = total
        self._handle: h5py.File | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return self._length

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_handle=None, _pid=None)
        return state

    def _file(self) -> h5py.File:
        if self._handle is None or self._pid != os.getpid():
            self._handle = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._handle

    def locate(self, index: int) -> tuple[str, int]:
        """(group, row in group) of a global index."""
        if not 0 <= index < self._length:
            raise IndexError(f"row {index} out of range for {self._length} rows in {self.path}")
        chunk = bisect.bisect_right(self._starts, index) - 1
        name, first, _ = self._ranges[chunk]
        return name, first + index - self._starts[chunk]

    def row(self, index: int) -> dict[str, np.ndarray]:
        name, row = self.locate(index)
        group = self._file()[name]
        return {field: np.asarray(group[field][row]) for field in self.fields}
