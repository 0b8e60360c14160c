"""Deterministic train/validation hold-outs for datasets that ship only train and test splits."""

from __future__ import annotations

import numpy as np


def mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a well-spread hash of 64-bit integers."""
    z = values.astype(np.uint64)
    with np.errstate(over="ignore"):
        z = (z + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(0xFFFFFFFFFFFFFFFF)
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & np.uint64(0xFFFFFFFFFFFFFFFF)
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    return z ^ (z >> np.uint64(31))


def holdout_mask(ids: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """True for the objects held out for validation: about `fraction` of them, chosen by a hash
    of the object id, so membership never changes when rows are added or reordered."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    hashed = mix64(np.asarray(ids, dtype=np.int64).view(np.uint64) ^ np.uint64(seed))
    return (hashed >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction
