"""Missing catalogue values: sentinels read as missing, statistics over the finite values.

Real catalogues are incomplete (coverage, depth, crowding) and some write a sentinel such as
-99.99 instead of leaving a value empty. A family standardises a catalogue column with the
mean and standard deviation of its finite training values, imputes a missing value after
standardisation (0, the training mean) and lets the model see a missingness flag. A column
with no finite training value carries nothing: it is reported and left out of the input.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("fmb")


def replace_sentinels(values: np.ndarray, sentinels: Sequence[float]) -> np.ndarray:
    """A float copy of `values` with every value equal to a sentinel (to float32 precision) set to NaN."""
    out = np.array(values, dtype=np.float64)
    for sentinel in sentinels:
        out[np.isclose(out, sentinel, rtol=1e-6, atol=0.0)] = np.nan
    return out


@dataclass
class ColumnStatistics:
    """Per-column mean and standard deviation over the finite values; `used` is False for a column
    with no finite value (left out of the input)."""

    mean: np.ndarray
    std: np.ndarray
    used: np.ndarray

    @classmethod
    def of(cls, matrix: np.ndarray, names: Sequence[str], what: str) -> ColumnStatistics:
        """Statistics of the (rows, columns) `matrix` (NaN: missing); columns with no finite value are
        reported (naming `what`, e.g. "training metadata") and marked unused. The std is floored so
        a constant column does not divide by zero."""
        matrix = np.asarray(matrix, dtype=np.float64)
        finite = np.isfinite(matrix)
        counts = finite.sum(0)
        used = counts > 0
        safe = np.where(finite, matrix, 0.0)
        mean = safe.sum(0) / np.maximum(counts, 1)
        var = (np.where(finite, matrix - mean, 0.0) ** 2).sum(0) / np.maximum(counts, 1)
        if not used.all():
            dropped = [name for name, keep in zip(names, used, strict=True) if not keep]
            log.warning(f"{what}: no finite value in {len(dropped)} column(s) ({', '.join(dropped[:8])}"
                        f"{', ...' if len(dropped) > 8 else ''}); left out of the input")
        share = 1.0 - finite.mean() if matrix.size else 0.0
        if share > 0 and used.any():
            log.info(f"{what}: {share:.1%} of the values are missing; imputed after standardisation and flagged")
        return cls(mean=np.where(used, mean, 0.0).astype(np.float32),
                   std=np.maximum(np.sqrt(var), 1e-6).astype(np.float32), used=used)
