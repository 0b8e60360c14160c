"""Counting data that is present but unusable, per modality, so a broken modality cannot pass unseen.

A dataset marks a sample whose modality exists but cannot be used (corrupt image bytes, a spectrum on
the wrong grid) with `item["fault_<modality>"] = "<what is wrong> (<file> row <n>)"`, and "" when
that modality is fine or simply absent (a null spectrum is the normal case of real catalogues, not a
fault). The default collate turns these into lists of strings. `FaultCounter.take(batch)` removes
them from the batch and counts them on the host; the trainer reports the counts once per epoch (log
and metrics.jsonl) and stops with a clear error when more than `train.max_unusable_fraction` of a
modality's samples were unusable.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from fmb.errors import DataError
from fmb.train.distributed import DistInfo, gather_objects

log = logging.getLogger("fmb")

FAULT_PREFIX = "fault_"
EXAMPLES = 3  # fault messages kept per modality, for the report
MIN_SAMPLES_TO_STOP = 200  # mid-epoch, stop only once this many samples were seen (epoch ends always check)


def fault_keys(item: dict[str, Any]) -> list[str]:
    return [key for key in item if key.startswith(FAULT_PREFIX)]


@dataclass
class FaultCounter:
    samples: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def take(self, batch: Any) -> Any:
        """Count and remove the batch's fault entries (a dict batch; anything else passes through)."""
        if not isinstance(batch, dict):
            return batch
        keys = fault_keys(batch)
        if not keys:
            return batch
        size = None
        for key in keys:
            messages = batch.pop(key)
            size = len(messages)
            modality = key[len(FAULT_PREFIX):]
            bad = [m for m in messages if m]
            self.counts[modality] = self.counts.get(modality, 0) + len(bad)
            kept = self.examples.setdefault(modality, [])
            kept.extend(bad[: EXAMPLES - len(kept)])
        self.samples += size or 0
        return batch

    def as_record(self) -> dict[str, Any]:
        return {"samples": self.samples, "counts": self.counts, "examples": self.examples}

    @classmethod
    def combined(cls, records: list[dict[str, Any]]) -> FaultCounter:
        """One counter from several `as_record` records (ranks, or the parts of an embedding export)."""
        total = cls()
        for record in records:
            total.samples += record["samples"]
            for name, count in record["counts"].items():
                total.counts[name] = total.counts.get(name, 0) + count
                kept = total.examples.setdefault(name, [])
                kept.extend(record["examples"].get(name, [])[: EXAMPLES - len(kept)])
        return total

    def merged(self, dist: DistInfo) -> FaultCounter:
        """The counts of every rank together (a small CPU collective under DDP)."""
        if not dist.enabled:
            return self
        return FaultCounter.combined(gather_objects(self.as_record(), dist))

    def record(self) -> dict[str, int]:
        """metrics.jsonl fields: data/unusable_<modality> and data/samples."""
        return {"data/samples": self.samples, **{f"data/unusable_{m}": n for m, n in sorted(self.counts.items())}}

    def report(self, where: str) -> None:
        for modality, count in sorted(self.counts.items()):
            if count:
                log.warning(f"{where}: {modality} unusable for {count} of {self.samples} samples, e.g. "
                            + "; ".join(self.examples.get(modality, [])))

    def check(self, limit: float, where: str, final: bool) -> None:
        """Raise DataError when a modality's unusable share exceeds `limit` (once enough was seen)."""
        if self.samples == 0 or (not final and self.samples < MIN_SAMPLES_TO_STOP):
            return
        for modality, count in sorted(self.counts.items()):
            share = count / self.samples
            if share > limit:
                raise DataError(
                    f"{where}: {modality} is unusable for {count} of {self.samples} samples ({share:.0%}, more than "
                    f"train.max_unusable_fraction={limit:g}); e.g. " + "; ".join(self.examples.get(modality, []))
                    + ". Fix the data, or raise train.max_unusable_fraction to train on what is usable."
                )
