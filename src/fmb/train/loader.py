"""Data loading for the trainer: a resumable DistributedSampler, evaluation shards, device copies.

Sample order depends only on (seed, epoch): the sampler and each DataLoader get their own
generators, so nothing here draws from the global RNG and a resumed run sees the same
batches as an uninterrupted one. Datasets that need randomness (augmentations, crops)
implement `set_epoch(epoch)` and seed per sample from (seed, epoch, index).

Workers persist across epochs (starting them again each epoch re-imports nothing but does reopen
files and re-decode parquet row groups); the epoch reaches their copies of the dataset through
shared memory (`EpochInWorkers`). Each worker runs one torch thread and reads parquet without
pyarrow's thread pool, so W workers use W cores; at 0 workers the main process keeps its threads
for the model, and the samples are prepared with one (`Loader`), as a worker would.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from fmb.train.stop import STOP_SIGNALS


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start part-way through an epoch (after `start` samples).

    A dataset stored in compressed blocks (parquet row groups) can expose `shuffle_blocks()`: a
    list of index arrays, one per block. The epoch order then shuffles the blocks, and the rows
    within each window of `block_window` consecutive blocks, so reading in that order decodes each
    block once per epoch instead of once per sample (readers keep a few blocks cached).
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True,
                 block_window: int = 4) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.start = 0
        self.block_window = block_window
        blocks = dataset.shuffle_blocks() if hasattr(dataset, "shuffle_blocks") else None
        self.blocks = blocks if blocks is not None and len(blocks) > 1 else None

    def set_start(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle and self.blocks is not None:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = block_shuffle(self.blocks, generator, self.block_window)[: self.total_size]
            indices = order[self.rank : self.total_size : self.num_replicas]
        else:
            indices = list(super().__iter__())
        return iter(indices[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


def block_shuffle(blocks: list[np.ndarray], generator: torch.Generator, window: int) -> list[int]:
    """Blocks in random order; rows shuffled within each window of `window` consecutive blocks."""
    order = torch.randperm(len(blocks), generator=generator).tolist()
    out: list[int] = []
    for first in range(0, len(order), window):
        members = np.concatenate([blocks[b] for b in order[first : first + window]])
        out.extend(members[torch.randperm(len(members), generator=generator).numpy()].tolist())
    return out


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM / SIGUSR1 to the main process. `scancel`, preemption and time
    limits signal every process of the job: a worker that died of it would take the run down before
    the main process could write its checkpoint. (An orphaned worker still exits: torch's watchdog
    sees its parent go.) Workers start with the signals blocked (see `Loader`), so one arriving
    before this runs waits, and is then discarded."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class EpochInWorkers(Dataset):
    """A dataset with `set_epoch`, as seen through persistent workers: the epoch is kept in shared
    memory, and each worker's copy calls its own dataset's `set_epoch` when it sees a new value.
    The trainer sets the epoch before it starts iterating, and workers only take indices of an
    epoch after that, so every sample of an epoch sees that epoch."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.shared_epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.seen_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.shared_epoch.fill_(epoch)
        self._follow(epoch)

    def _follow(self, epoch: int) -> None:
        if epoch != self.seen_epoch:
            self.dataset.set_epoch(epoch)
            self.seen_epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: Any) -> Any:
        self._follow(int(self.shared_epoch))
        return self.dataset[index]

    def __getattr__(self, name: str) -> Any:  # shuffle_blocks() and the like, from the dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class Loader(DataLoader):
    """A DataLoader whose workers are forked with the stop signals blocked (the main process gets
    them as soon as the workers exist); without workers, each batch is prepared with one torch
    thread (small per-sample operations split over busy cores cost more than they gain)."""

    def __iter__(self) -> Iterator[Any]:
        if self.num_workers == 0:
            return _one_thread(super().__iter__())
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _one_thread(batches: Iterator[Any]) -> Iterator[Any]:
    """Each batch fetched with one torch thread; the caller's thread count in between."""
    while True:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            batch = next(batches)
        except StopIteration:
            return
        finally:
            torch.set_num_threads(threads)
        yield batch


def make_loader(
    dataset: Dataset,
    sampler: Sampler | None,
    batch_size: int | None,
    num_workers: int,
    collate_fn: Callable | None,
    pin_memory: bool,
    drop_last: bool,
    seed: int,
    batch_sampler: Sampler | None = None,
    persistent: bool = True,
) -> DataLoader:
    """The one way fmb builds a DataLoader (training, validation, embedding). Workers persist across
    epochs unless `persistent` is off (a single pass, as embedding makes, ends its workers with it);
    pinned memory (on CUDA) makes the copies to the device asynchronous."""
    if persistent and num_workers > 0 and hasattr(dataset, "set_epoch"):
        dataset = EpochInWorkers(dataset)
    return Loader(
        dataset,
        batch_size=batch_size if batch_sampler is None else 1,
        sampler=sampler,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        drop_last=drop_last if batch_sampler is None else False,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
        persistent_workers=persistent and num_workers > 0,
    )


def stop_workers(loader: DataLoader | None) -> None:
    """End a loader's persistent workers now rather than when the loader is garbage collected."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None


def to_device(batch: Any, device: torch.device) -> Any:
    """Copy tensors (recursively through dicts, lists, tuples) without blocking the host."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
