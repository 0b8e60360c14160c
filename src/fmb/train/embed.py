"""`fmb embed <model>`: the one embedding path of every family, on one process or many.

The runner finds the checkpoint (a run directory or a step directory; another family's checkpoint is
named as such), reads its config with `--set` on top, builds the family's trainer and the environment
(device, processes, precision: `fmb.train.environment`), builds the architecture and loads the weights
(or keeps fresh ones for `--random-init`), and feeds the family's rows through `embed_batch` under
`no_grad` and autocast, with DataLoader workers and a progress bar. Data faults (a modality present but
unusable) are counted, reported, and stop the export above `train.max_unusable_fraction`. A family supplies only its rows
(`embedding_datasets`) and "batch -> {modality: vectors}, present masks" (`embed_batch`).

Rows are cut into fixed chunks (`--chunk-rows`, 2048 by default); under torchrun / srun chunk c is embedded by rank
c mod W. Each finished chunk is one parquet part under `<out>.parts/`, so an interrupted run (a crash,
or SIGTERM / SIGUSR1: exit 75) continues with the chunks still missing, on any number of processes,
and the result is identical in rows (and order) to a single-process run. Rank 0 then joins the parts,
streaming, into `<out>`.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import ConcatDataset, Dataset, Sampler
from tqdm import tqdm

from fmb.embeddings import EmbeddingParts, embedding_table, host_array
from fmb.errors import ConfigError, DataError, FmbError
from fmb.train import checkpoint as ckpt
from fmb.train.distributed import barrier, gather_objects, shutdown_distributed
from fmb.train.environment import build_environment
from fmb.train.faults import FaultCounter
from fmb.train.loader import make_loader, to_device
from fmb.train.rundir import RunLock
from fmb.train.stop import StopRequest

log = logging.getLogger("fmb")



class EmbeddingStopped(FmbError):
    """A stop signal arrived: the finished chunks are kept, `fmb embed` again continues."""

    exit_code = 75


@dataclass
class EmbedBatch:
    """What a family's `embed_batch` returns for one batch."""

    vectors: dict[str, torch.Tensor]  # modality -> (batch, width); `embedding_<modality>` columns
    present: dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> (batch,) bool; absent: all present
    targets: dict[str, Any] = field(default_factory=dict)  # extra columns (model outputs such as a prediction)
    ids: Any = None  # object ids; None: batch["object_id"]


@dataclass
class EmbedOptions:
    data: str | None = None  # another dataset than the checkpoint's
    split: str | None = None  # None: every split
    batch_size: int = 64
    device: str = "auto"
    num_workers: int | None = None  # None: the run's train.num_workers
    random_init: bool = False
    sets: list[str] = field(default_factory=list)
    chunk_rows: int = 2048  # rows per part: the unit of sharding and of resumption


@dataclass
class EmbedResult:
    out: Path
    rows: int
    splits: dict[str, int]
    seconds: float
    faults: dict[str, int]

    def summary(self) -> str:
        splits = ", ".join(f"{name} {count}" for name, count in self.splits.items())
        text = (f"embedded {self.rows} objects ({splits}) in {self.seconds:.1f} s "
                f"({self.rows / max(self.seconds, 1e-9):.0f} objects/s); wrote {self.out}")
        unusable = ", ".join(f"{m} for {n}" for m, n in self.faults.items() if n)
        return text + (f"; unusable (embedded without it): {unusable}" if unusable else "")


class ChunkBatches(Sampler[list[int]]):
    """Batches of this rank's chunks that are not written yet, never crossing a chunk boundary."""

    def __init__(self, total: int, batch_size: int, chunk_rows: int, chunks: list[int]) -> None:
        self.plan: list[tuple[int, list[int], bool]] = []  # (chunk, row indices, last batch of the chunk)
        self.chunk_sizes: dict[int, int] = {}  # chunk -> its number of rows (the last chunk may be short)
        for chunk in chunks:
            rows = range(chunk * chunk_rows, min((chunk + 1) * chunk_rows, total))
            self.chunk_sizes[chunk] = len(rows)
            starts = list(range(rows.start, rows.stop, batch_size))
            for k, start in enumerate(starts):
                self.plan.append((chunk, list(range(start, min(start + batch_size, rows.stop))), k == len(starts) - 1))

    def __iter__(self) -> Iterator[list[int]]:
        return iter(rows for _, rows, _ in self.plan)

    def __len__(self) -> int:
        return len(self.plan)


class ChunkRows:
    """One chunk's embedding outputs, gathered batch by batch into arrays allocated once for the whole
    chunk, and made into one embedding table when the chunk is done. Keeping a table per batch
    instead held a few hundred small allocations per batch (Arrow's objects, NumPy copies) for the
    whole chunk, scattered through the C heap between each batch's large short-lived buffers, which
    the heap then could not reuse: +20-45 MiB of resident memory (docs/benchmarks.md, memory)."""

    def __init__(self, rows: int, chunk: int) -> None:
        self.rows = rows
        self.chunk = chunk
        self.filled = 0
        self.columns: dict[tuple[str, str], np.ndarray | list] = {}  # (kind, name) -> values of the chunk
        self.counts: dict[tuple[str, str], int] = {}  # (kind, name) -> rows given so far

    def add(self, n: int, ids: Any, targets: dict[str, Any], vectors: dict[str, Any], present: dict[str, Any]) -> None:
        for kind, values in (("ids", {"": ids}), ("targets", targets), ("vectors", vectors), ("present", present)):
            for name, value in values.items():
                value = host_array(value)
                if len(value) != n:
                    raise DataError(f"embedding chunk {self.chunk}: a batch of {n} rows gave {len(value)} values for "
                                    f"{kind} column '{name or 'object_id'}'")
                self.counts[kind, name] = self.counts.get((kind, name), 0) + n
                if not isinstance(value, np.ndarray):  # strings (ids of some surveys, text truth): a list
                    self.columns.setdefault((kind, name), []).extend(value)
                    continue
                if (kind, name) not in self.columns:
                    self.columns[kind, name] = np.empty((self.rows, *value.shape[1:]), value.dtype)
                self.columns[kind, name][self.filled:self.filled + n] = value
        self.filled += n

    def table(self) -> pa.Table:
        """The chunk's rows; every column must have one value per row (a column some batches lacked
        would otherwise be written with uninitialised or shifted values)."""
        for (kind, name), count in self.counts.items():
            if count != self.rows:
                raise DataError(f"embedding chunk {self.chunk} ({self.rows} rows): {kind} column '{name or 'object_id'}' "
                                f"was given for {count} rows; every batch must give every column")

        def of(kind: str) -> dict[str, Any]:
            return {name: values for (k, name), values in self.columns.items() if k == kind}
        return embedding_table(of("ids")[""], of("targets"), of("vectors"), of("present"))


def run_embed(family: Any, checkpoint: Path, out: Path, options: EmbedOptions) -> EmbedResult:
    """Embed with a checkpoint of `family` (a registry record) into `out`."""
    from fmb.train.trainer import BaseTrainer

    trainer_cls = family.trainer_class()
    if trainer_cls.embedding_datasets is BaseTrainer.embedding_datasets:
        raise ConfigError(f"'{family.name}' has no embedding export")
    directory = ckpt.find_checkpoint(Path(checkpoint))
    config = ckpt.read_config(directory, trainer_cls.config_cls, options.sets, family=family.name)
    trainer = trainer_cls(config)
    if options.batch_size < 1 or options.chunk_rows < 1 or (options.num_workers is not None and options.num_workers < 0):
        raise ConfigError("--batch-size and --chunk-rows must be at least 1, --num-workers at least 0")
    trainer.check_config()
    env = build_environment(options.device, config.train.precision, config.train.cpu_threads, config.train.tf32)
    trainer.env = env
    try:
        with StopRequest() as stop:
            return _embed(trainer, directory, Path(out), options, stop)
    finally:
        shutdown_distributed()


def _embed(trainer: Any, directory: Path, out: Path, options: EmbedOptions, stop: StopRequest) -> EmbedResult:
    dist = trainer.env.dist
    parts = EmbeddingParts(out)
    lock, problem = None, None
    if dist.is_main:  # one writer per output: rank 0 holds the parts directory for every rank
        try:
            lock = RunLock(parts.directory, what="embedding").acquire()
        except FmbError as exc:
            problem = exc
    refusal = next((p for p in gather_objects(str(problem) if problem else None, dist) if p), None)
    if problem is not None:
        raise problem
    if refusal:
        raise ConfigError(refusal)
    try:
        return _embed_locked(trainer, directory, parts, options, stop)
    finally:
        if lock is not None:
            lock.release()


def _embed_locked(trainer: Any, directory: Path, parts: EmbeddingParts, options: EmbedOptions,
                  stop: StopRequest) -> EmbedResult:
    env, dist = trainer.env, trainer.env.dist
    trainer.prepare_embedding(directory, parts.directory / "work")
    parts_of_splits = trainer.embedding_datasets(options.data, options.split)
    if not parts_of_splits or sum(len(ds) for _, ds in parts_of_splits) == 0:
        raise DataError("nothing to embed: the selected data is empty")
    dataset: Dataset = ConcatDataset([ds for _, ds in parts_of_splits])
    split_of_row = np.concatenate([np.full(len(ds), i, np.int32) for i, (_, ds) in enumerate(parts_of_splits)])
    split_names = [name for name, _ in parts_of_splits]
    total = len(dataset)

    torch.manual_seed(trainer.cfg.seed)  # --random-init and any sampling inside the model: reproducible
    model = trainer.new_model()
    trained = ckpt.check_state_fits(model, ckpt.read_safetensors(directory / ckpt.MODEL_FILE), str(directory))
    state = trainer.random_init_state(model.state_dict(), trained) if options.random_init else trained
    model.load_state_dict(state, strict=True)
    model.to(env.device).eval()

    done = parts.done_chunks()
    n_chunks = -(-total // options.chunk_rows)
    mine = [c for c in range(dist.rank, n_chunks, dist.world_size) if c not in done]
    if done and dist.is_main:
        log.info(f"{parts.directory}: {len(done)} of {n_chunks} chunks already embedded; continuing after them")
    sampler = ChunkBatches(total, options.batch_size, options.chunk_rows, mine)
    workers = trainer.cfg.num_workers if options.num_workers is None else options.num_workers
    loader = make_loader(dataset, None, None, workers, trainer.collate_fn(), env.device.type == "cuda",
                         drop_last=False, seed=trainer.cfg.seed, batch_sampler=sampler, persistent=False)
    start = time.perf_counter()
    faults, chunk_faults = FaultCounter(), FaultCounter()
    gathered: ChunkRows | None = None
    bar = tqdm(total=sum(len(rows) for _, rows, _ in sampler.plan), desc=f"embed {trainer.family}", unit="obj",
               disable=not (dist.is_main and sys.stderr.isatty()))
    with torch.no_grad():
        for (chunk, rows, last), batch in zip(sampler.plan, loader, strict=True):
            if stop.requested:
                raise EmbeddingStopped(f"stopped by {stop.signal_name}: {len(parts.done_chunks())} of {n_chunks} "
                                       f"chunks are in {parts.directory}; run the same command to continue")
            batch = chunk_faults.take(batch)
            FaultCounter.combined([faults.as_record(), chunk_faults.as_record()]).check(
                trainer.cfg.max_unusable_fraction, f"embedding (rank {dist.rank})", final=False)
            ids = batch.get("object_id") if isinstance(batch, dict) else None
            targets = batch.get("targets", {}) if isinstance(batch, dict) else {}
            with env.autocast():
                result = trainer.embed_batch(model, to_device(batch, env.device))
            if gathered is None:
                gathered = ChunkRows(sampler.chunk_sizes[chunk], chunk)
            names = [split_names[s] for s in split_of_row[rows]]
            gathered.add(len(rows), result.ids if result.ids is not None else ids,
                         {**targets, **result.targets, "split": names}, result.vectors, result.present)
            bar.update(len(rows))
            if last:
                parts.write_chunk(chunk, [gathered.table()], chunk_faults.as_record())
                faults, chunk_faults, gathered = FaultCounter.combined([faults.as_record(), chunk_faults.as_record()]), FaultCounter(), None
    bar.close()
    seconds = time.perf_counter() - start
    barrier(dist)
    total_faults = FaultCounter.combined(parts.fault_records())  # every part, this run's and earlier ones'
    if dist.is_main:
        total_faults.report("embedding")
    total_faults.check(trainer.cfg.max_unusable_fraction, "embedding", final=True)
    if dist.is_main:
        parts.finish(n_chunks)
    counts = dict(zip(split_names, (len(ds) for _, ds in parts_of_splits), strict=True))
    return EmbedResult(out=parts.out, rows=len(dataset), splits=counts, seconds=seconds, faults=total_faults.counts)
