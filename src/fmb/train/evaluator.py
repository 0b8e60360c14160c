"""Validation that gives the same figure for any number of processes, and never hangs under FSDP.

The validation split is cut into fixed global batches (rows 0..B-1, B..2B-1, ...), the same for any
world size; rank r evaluates batches r, r + W, r + 2W, ... So every batch holds the same objects as
in a single-process run, which matters for losses that depend on the batch (contrastive losses,
token-weighted means). The per-batch (sum, count) pairs of every rank are gathered and added in
global batch order, so the result is the same to the last bit for 1 or N processes on CPU.

Under FSDP every forward is a collective, so a rank with fewer batches runs uncounted repeats until
all ranks have run as many forwards (a rank with none repeats global batch 0).

A family's `validation_step` returns named (sum, count) pairs, or a `ValidationBatch` that also
carries per-object rows (embeddings for retrieval over the whole split); its `validation_metrics`
turns the reduced totals (and the rows, concatenated in data order) into the reported figures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as torch_dist
from torch.utils.data import DataLoader, Dataset, Sampler

from fmb.errors import TrainingError
from fmb.train.distributed import DistInfo, gather_objects
from fmb.train.faults import FaultCounter

Sums = dict[str, tuple[torch.Tensor, "torch.Tensor | float"]]


@dataclass
class ValidationBatch:
    sums: Sums  # name -> (sum over the batch, count): reduced as sum of sums / sum of counts
    rows: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (batch, ...) per-object rows


class EvalBatchSampler(Sampler[list[int]]):
    """This rank's share of the fixed global batches, then (`pad`) repeats to the longest share."""

    def __init__(self, length: int, batch_size: int, rank: int, world_size: int, max_batches: int | None = None,
                 pad: bool = False) -> None:
        total = -(-length // batch_size)
        self.total = min(total, max_batches) if max_batches else total
        self.length, self.batch_size, self.rank, self.world = length, batch_size, rank, world_size
        self.owned = list(range(rank, self.total, world_size))  # global batch indices of this rank
        longest = -(-self.total // world_size)
        self.repeats = longest - len(self.owned) if pad else 0

    def batch(self, index: int) -> list[int]:
        return list(range(index * self.batch_size, min((index + 1) * self.batch_size, self.length)))

    def __iter__(self) -> Iterator[list[int]]:
        for index in self.owned:
            yield self.batch(index)
        filler = self.owned[-1] if self.owned else 0
        for _ in range(self.repeats):
            yield self.batch(filler)

    def __len__(self) -> int:
        return len(self.owned) + self.repeats


class Evaluator:
    """Runs a validation pass: batches on the device, the family's step, exact reduction."""

    def __init__(self, dataset: Dataset, sampler: EvalBatchSampler, loader: DataLoader, device: torch.device,
                 dist: DistInfo) -> None:
        self.dataset, self.sampler, self.loader = dataset, sampler, loader
        self.device, self.dist = device, dist
        self.faults = FaultCounter()

    def batches(self) -> Iterator[tuple[Any, bool]]:
        """(batch on the device, counted) pairs; fault entries are counted and removed."""
        from fmb.train.loader import to_device

        for position, batch in enumerate(self.loader):
            counted = position < len(self.sampler.owned)
            batch = self.faults.take(batch) if counted else FaultCounter().take(batch)
            yield to_device(batch, self.device), counted

    def run(self, step: Callable[[Any], Sums | ValidationBatch],
            metrics: Callable[[dict[str, tuple[torch.Tensor, float]], dict[str, torch.Tensor]], dict[str, float]],
            autocast: Callable[[], Any]) -> dict[str, float]:
        per_batch: list[Sums] = []
        rows: list[dict[str, torch.Tensor]] = []
        for batch, counted in self.batches():
            with autocast():
                out = step(batch)
            if not counted:
                continue
            out = out if isinstance(out, ValidationBatch) else ValidationBatch(sums=out)
            if per_batch and (out.sums.keys() != per_batch[0].keys() or out.rows.keys() != rows[0].keys()):
                raise TrainingError(f"validation_step returned {sorted(out.sums)} / rows {sorted(out.rows)} in one "
                                    f"batch but {sorted(per_batch[0])} / rows {sorted(rows[0])} in another")
            per_batch.append({n: (_tensor(s, self.device), _tensor(c, self.device)) for n, (s, c) in out.sums.items()})
            rows.append({n: r.detach() for n, r in out.rows.items()})
        totals = self._reduce_sums(per_batch)
        return metrics(totals, self._gather_rows(rows))

    # ---------------------------------------------------------------- exact reduction

    def _layout(self, per_batch: list[dict[str, Any]], what: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Names with their shapes (of a sum; of a row) and dtypes, identical on every rank that has batches."""
        mine = {}
        for name, value in (per_batch[0].items() if per_batch else []):
            sample = value[0] if what == "sums" else value[0:1]
            mine[name] = (tuple(sample.shape) if what == "sums" else tuple(sample.shape[1:]), sample.dtype)
        layouts = [lay for lay, owned in zip(gather_objects(mine, self.dist), self._owned_counts(), strict=True) if owned]
        if any(lay != layouts[0] for lay in layouts):
            raise TrainingError(f"validation {what} differ between ranks: {layouts}")
        return layouts[0] if layouts else {}

    def _owned_counts(self) -> list[int]:
        return [len(range(r, self.sampler.total, self.dist.world_size)) for r in range(self.dist.world_size)]

    def _gather(self, local: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        """Every rank's rows (`counts[r]` of them on rank r), padded to the longest for the collective."""
        if not self.dist.enabled:
            return [local]
        padded = local.new_zeros((max(counts), *local.shape[1:]))
        padded[: len(local)] = local
        parts = [torch.empty_like(padded) for _ in counts]
        torch_dist.all_gather(parts, padded)
        return [part[:count] for part, count in zip(parts, counts, strict=True)]

    def _in_global_order(self, per_rank: list[torch.Tensor], sizes: list[list[int]]) -> torch.Tensor:
        """Rows of every global batch, in global batch order (batch g lives on rank g mod W)."""
        world = self.dist.world_size
        pieces = [torch.split(part, size) if size else () for part, size in zip(per_rank, sizes, strict=True)]
        ordered = [pieces[g % world][g // world] for g in range(self.sampler.total)]
        return torch.cat(ordered) if ordered else per_rank[0][:0]

    def _reduce_sums(self, per_batch: list[Sums]) -> dict[str, tuple[torch.Tensor, float]]:
        layout = self._layout(per_batch, "sums")
        if not layout:
            return {}
        counts = self._owned_counts()
        out = {}
        for name, (shape, _) in layout.items():
            sums = torch.stack([b[name][0] for b in per_batch]) if per_batch else torch.zeros((0, *shape), dtype=torch.float64,
                                                                                              device=self.device)
            numbers = (torch.stack([b[name][1] for b in per_batch]) if per_batch
                       else torch.zeros(0, dtype=torch.float64, device=self.device))
            ordered_sums = self._in_global_order(self._gather(sums, counts), [[1] * c for c in counts])
            ordered_counts = self._in_global_order(self._gather(numbers, counts), [[1] * c for c in counts])
            out[name] = (ordered_sums.sum(0), float(ordered_counts.sum()))
        return out

    def _gather_rows(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        layout = self._layout(rows, "rows")
        if not layout:
            return {}
        owned = self._owned_counts()
        sizes = [[len(self.sampler.batch(g)) for g in range(r, self.sampler.total, self.dist.world_size)]
                 for r in range(self.dist.world_size)]
        lengths = [sum(s) for s in sizes]
        out = {}
        for name, (shape, dtype) in layout.items():
            local = (torch.cat([r[name] for r in rows]) if rows
                     else torch.zeros((0, *shape), dtype=dtype, device=self.device))
            out[name] = self._in_global_order(self._gather(local, lengths), [s if o else [] for s, o in zip(sizes, owned, strict=True)])
        return out


def _tensor(value: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(value, device=device).detach().to(torch.float64)


def mean_metrics(totals: dict[str, tuple[torch.Tensor, float]], rows: dict[str, torch.Tensor]) -> dict[str, float]:
    """The default figures: each name's sum divided by its count."""
    return {name: float(total) / max(count, 1e-12) for name, (total, count) in totals.items()}
