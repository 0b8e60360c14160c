"""BaseTrainer: the training loop every model family shares.

A family subclasses BaseTrainer and provides `build_model`, `build_datasets` and `compute_loss`
(plus optional hooks, see docs/design.md). The trainer owns the loop; the pieces around it are
components with small interfaces: the environment (device, processes, precision:
`fmb.train.environment`), the checkpointer (a set of stateful objects: `fmb.train.checkpoint`), the
evaluator (`fmb.train.evaluator`), schedules, metrics, data faults, the run directory's lock and
status file (`fmb.train.rundir`) and the stop request. `train_step` is public: `fmb bench` times it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from fmb.config import to_yaml
from fmb.errors import EXIT_RUNTIME, ConfigError, DataError, FmbError, TrainingError
from fmb.models.checkpointing import set_activation_checkpointing
from fmb.train import checkpoint as ckpt
from fmb.train import parallel
from fmb.train.config import BaseTrainingConfig
from fmb.train.distributed import (
    DistInfo,
    all_reduce_sum,
    any_rank,
    barrier,
    gather_objects,
    shutdown_distributed,
)
from fmb.train.environment import RunEnvironment, build_environment
from fmb.train.evaluator import EvalBatchSampler, Evaluator, Sums, ValidationBatch, mean_metrics
from fmb.train.faults import FaultCounter
from fmb.train.loader import ResumableSampler, make_loader, stop_workers, to_device
from fmb.train.metrics import Meter, MetricsLog, peak_memory_gb, summary_line
from fmb.train.optim import build_adamw, parameter_groups
from fmb.train.rundir import EXIT_CODES, RunLock, write_status
from fmb.train.schedule import BestTracker, EarlyStopping, Schedule
from fmb.train.stop import StopRequest

if TYPE_CHECKING:
    from fmb.train.embed import EmbedBatch

log = logging.getLogger("fmb")


@dataclass
class StepOutput:
    """What a family's `compute_loss` returns for one micro-batch."""

    loss: torch.Tensor  # scalar, mean over the micro-batch
    components: dict[str, torch.Tensor] = field(default_factory=dict)  # logged as train/<name>
    n_samples: int = 0
    n_tokens: int = 0  # for tokens/s; 0 when not meaningful


@dataclass
class StepStats:
    """One optimizer step, as `train_step` returns it (tensors stay on the device)."""

    loss: torch.Tensor  # mean of the micro-batch losses
    components: dict[str, torch.Tensor]  # means over the micro-batches
    grad_norm: torch.Tensor
    skipped: torch.Tensor  # 1.0 when the step was skipped for a non-finite gradient (fp16: non-finite loss)
    samples: int
    tokens: int
    ids: list
    data_wait_s: float


@dataclass
class RunResult:
    status: str  # completed | stopped | early_stopped
    step: int
    run_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    best: dict[str, Any] | None = None
    checkpoint: Path | None = None  # the last one written

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]

    def summary(self) -> str:
        """What a user reads at the end: how it ended and where everything is."""
        parts = [f"{self.status} at step {self.step}"]
        if self.checkpoint is not None:
            parts.append(f"checkpoint {self.checkpoint}")
        parts.append(f"metrics {self.run_dir / 'metrics.jsonl'}")
        if self.best:
            parts.append(f"best {self.best['metric']} {self.best['value']:.4g} at step {self.best['step']}")
        return "; ".join(parts)


@dataclass
class _Progress:
    """Counters saved in trainer_state.pt."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    samples_seen: int = 0
    nonfinite_total: int = 0

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


class _OptionalState:
    """A stateful object that may be absent (the fp16 GradScaler): saved as None."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def state_dict(self) -> Any:
        return self.obj.state_dict() if self.obj is not None else None

    def load_state_dict(self, state: Any) -> None:
        if self.obj is not None and state:
            self.obj.load_state_dict(state)


class BaseTrainer:
    family: ClassVar[str] = "base"
    config_cls: ClassVar[type[BaseTrainingConfig]] = BaseTrainingConfig
    # DDP must look for parameters without gradients only when a family can leave some unused.
    find_unused_parameters: ClassVar[bool] = False
    # Components shown in the one-line summary besides the loss.
    summary_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: BaseTrainingConfig) -> None:
        self.config = config
        self.cfg = config.train
        self.env = RunEnvironment(torch.device("cpu"), DistInfo(), "fp32")
        self.run_dir = Path(self.cfg.out or f"runs/{self.family}")

    # ------------------------------------------------------------------ family hooks

    def check_config(self) -> None:
        """Validate the whole configuration (presets, shapes, modality lists) before any work is done:
        raise ConfigError naming the key. Runs first in `setup`, before demo data or models exist."""

    def new_model(self) -> nn.Module:
        """The architecture the configuration describes, with fresh weights (embedding loads a
        checkpoint into it; `--random-init` keeps them)."""
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        """The model training starts from: `new_model()` with `model.init_from` loaded, if set, by the
        one weight loader (a run directory or a step directory of this family)."""
        model = self.new_model()
        source = getattr(getattr(self.config, "model", None), "init_from", None)
        if source:
            directory = ckpt.load_weights(model, source, self.family)
            log.info(f"initialised from {directory} (step {ckpt.read_meta(directory).get('step')})")
        return model

    def demo_data(self) -> tuple[str, dict[str, Any]] | None:
        """(synthetic data kind, generator options) to write under <run>/data when data.path is unset
        and data.synthetic > 0 (the demo); None: the family has no demo data."""
        return None

    def build_datasets(self) -> tuple[Dataset, Dataset | None]:
        """(train, validation); validation may be None."""
        raise NotImplementedError

    def compute_loss(self, model: nn.Module, batch: Any) -> StepOutput:
        """Loss of one micro-batch already on the device. Call `model(...)`, not its methods, so
        that DDP and torch.compile see the forward."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Work before datasets are built (write demo data, fit tokenisers). Runs on every rank;
        use `self.main_process_first()` around work only one rank should do."""

    def collate_fn(self) -> Any:
        return None

    def lr_for(self, name: str) -> float | None:
        """Per-parameter learning rate (by qualified name); None: train.optim.lr."""
        return None

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        """Sub-modules that become separate FSDP units (train.parallel=fsdp): by default every
        element of every nn.ModuleList."""
        return parallel.default_shard_units(model)

    def set_train_mode(self, model: nn.Module) -> None:
        """Put the model in training mode (families keep frozen parts in eval mode here)."""
        model.train()

    def batch_ids(self, batch: Any) -> list:
        """Object ids of a batch, for error messages."""
        if isinstance(batch, dict):
            for key in ("object_id", "targetid", "id"):
                ids = batch.get(key)
                if isinstance(ids, torch.Tensor):
                    return ids.tolist()
                if isinstance(ids, list):
                    return ids
        return []

    def validation_step(self, model: nn.Module, batch: Any) -> Sums | ValidationBatch:
        """Named (sum, count) pairs of one validation batch (or a ValidationBatch that also carries
        per-object rows); the evaluator reduces them over batches and ranks in a fixed order."""
        out = self.compute_loss(model, batch)
        n = out.n_samples or 1
        metrics = {"loss": (out.loss.detach().float() * n, n)}
        for name, value in out.components.items():
            metrics[name] = (value.detach().float() * n, n)
        return metrics

    def validation_metrics(self, totals: dict[str, tuple[torch.Tensor, float]],
                           rows: dict[str, torch.Tensor]) -> dict[str, float]:
        """The reported figures (without the `val/` prefix) from the reduced totals and the rows of the
        whole split (concatenated in data order, on every rank): by default each sum over its count."""
        return mean_metrics(totals, rows)

    def on_validation_end(self, model: nn.Module, step: int, metrics: dict[str, float]) -> None:
        """Called on every rank after each validation (write sample images, confusion matrices...)."""

    # ------------------------------------------------------------------ embedding hooks (fmb.train.embed)

    def prepare_embedding(self, directory: Path, work: Path) -> None:
        """Load what `new_model` and the datasets need besides the checkpoint's config (e.g. fitted
        tokenisers); `work` is a directory for this export's intermediate files, kept until it ends."""

    def embedding_datasets(self, data: str | None, split: str | None) -> list[tuple[str, Dataset]]:
        """(split name, dataset) pairs to embed: every split of the run's data (or of `data`) unless
        `split` names one. Items hold "object_id" and a "targets" dict of columns to carry along. A
        split the family cannot select is a ConfigError, never ignored."""
        raise ConfigError(f"'{self.family}' has no embedding export")

    def embed_batch(self, model: nn.Module, batch: Any) -> EmbedBatch:
        """{modality: vectors} and present masks of a batch already on the device."""
        raise NotImplementedError

    def random_init_state(self, fresh: dict[str, torch.Tensor], trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weights of the `--random-init` baseline: by default all fresh (families keep frozen
        pretrained parts, e.g. AION's codec)."""
        return fresh

    # ------------------------------------------------------------------ helpers for families

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def dist(self) -> DistInfo:
        return self.env.dist

    @property
    def precision(self) -> str:
        return self.env.precision

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return self.env.amp_dtype

    @contextlib.contextmanager
    def main_process_first(self) -> Iterator[bool]:
        """Rank 0 runs the block first; the others wait, then run it (e.g. to read what it wrote).
        If rank 0 fails, the others are released (and meet the same failure) instead of hanging."""
        if not self.dist.is_main:
            barrier(self.dist)
            yield False
            return
        try:
            yield True
        finally:
            barrier(self.dist)

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.env.autocast()

    # ------------------------------------------------------------------ run

    def fit(self, resume: bool = False) -> RunResult:
        # The handler is installed before set-up: a signal while data or the model load is honoured
        # (a checkpoint at the first step, exit 75) instead of killing the process.
        with StopRequest() as stop:
            try:
                self.setup(resume)
                result = self._loop(stop)
                self._write_status(result.status, result.exit_code, result=result)
                return result
            except BaseException as exc:
                self._write_status("failed", getattr(exc, "exit_code", EXIT_RUNTIME), error=_one_line(exc))
                raise
            finally:
                self.close()

    def setup(self, resume: bool = False) -> None:
        """Everything before the first step: processes, run directory, data, model, optimizer,
        schedule, and the resumed state. (`fit` = setup + loop; `fmb bench` times steps after it.)"""
        self.check_config()
        cfg = self.cfg
        self._seed_everything(cfg.seed)
        self.env = build_environment(cfg.device, cfg.precision, cfg.cpu_threads, cfg.tf32)
        self._open_run_dir(resume)
        self._write_demo_data()
        self.prepare()
        if self.dist.is_main:  # after prepare(), which may fill in paths (demo data)
            (self.run_dir / "config.yaml").write_text(to_yaml(self.config))

        train_set, val_set = self.build_datasets()
        if len(train_set) == 0:
            raise DataError("the training split is empty: check data paths and split names")
        self.train_sampler = ResumableSampler(train_set, self.dist.world_size, self.dist.rank, seed=cfg.seed)
        pin = self.device.type == "cuda"
        self.train_loader = make_loader(train_set, self.train_sampler, cfg.batch_size, cfg.num_workers,
                                        self.collate_fn(), pin, drop_last=True, seed=cfg.seed)
        self.batches_per_epoch = len(self.train_sampler) // cfg.batch_size
        if self.batches_per_epoch == 0:
            raise DataError(
                f"the training split has {len(train_set)} samples, fewer than one batch of "
                f"{cfg.batch_size} per process x {self.dist.world_size} processes: lower train.batch_size"
            )
        self.evaluator = None
        if val_set is not None and len(val_set) > 0:
            sampler = EvalBatchSampler(len(val_set), cfg.batch_size, self.dist.rank, self.dist.world_size,
                                       cfg.eval_max_batches, pad=parallel.is_sharded(cfg.parallel, self.dist))
            loader = make_loader(val_set, None, None, cfg.num_workers, self.collate_fn(), pin, drop_last=False,
                                 seed=cfg.seed, batch_sampler=sampler)
            self.evaluator = Evaluator(val_set, sampler, loader, self.device, self.dist)

        self.accum = self._accumulation_steps()
        self.total_steps = self._total_steps()

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = self.build_model().to(self.device)
        set_activation_checkpointing(self.model, cfg.activation_checkpointing, self.family)
        self.set_train_mode(self.model)
        self.train_model = parallel.wrap(self.model, cfg.parallel, self.dist, self.device, cfg.compile,
                                         self.find_unused_parameters, self.shard_units(self.model))

        groups = parameter_groups(self.model, cfg.optim, self.lr_for)
        self.optimizer = build_adamw(groups, cfg.optim)
        self.schedule = Schedule(cfg.schedule, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.early_stopping = EarlyStopping(**dataclasses.asdict(cfg.early_stopping))
        self.best = BestTracker(cfg.checkpoint.best_metric, cfg.checkpoint.best_mode)
        self.checkpointer = ckpt.Checkpointer(self.run_dir, cfg.checkpoint.keep_last, self.dist, cfg.parallel)
        self.progress = _Progress()
        self.faults = FaultCounter()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.last_checkpoint: Path | None = None

        # Each rank gets its own dropout / augmentation stream.
        self._seed_everything(cfg.seed + self.dist.rank)
        if resume:
            self._resume()
        self._log_start(train_set, val_set, groups)

    def close(self) -> None:
        stop_workers(getattr(self, "train_loader", None))
        stop_workers(getattr(getattr(self, "evaluator", None), "loader", None))
        self._close_logging()
        if getattr(self, "_lock", None) is not None:
            self._lock.release()
            self._lock = None
        shutdown_distributed()

    def stateful(self) -> dict[str, Any]:
        """What a checkpoint restores besides the weights and the optimizer, by name in trainer_state.pt."""
        return {"progress": self.progress, "schedule": self.schedule, "scaler": _OptionalState(self.scaler),
                "early_stopping": self.early_stopping, "best": self.best}

    def train_step(self, batches: Iterator[Any]) -> StepStats:
        """One optimizer step: `accum` micro-batches from `batches` (forward, backward, gradient sync on
        the last only), then clipping and the optimizer step at the scheduled learning rate."""
        factor = self.schedule.factor(self.progress.step)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        ids: list = []
        loss_sum = torch.zeros((), device=self.device)
        components: dict[str, torch.Tensor] = {}
        samples = tokens = 0
        wait = 0.0
        for micro in range(self.accum):
            start = time.perf_counter()
            batch = self.faults.take(next(batches))
            wait += time.perf_counter() - start
            ids.extend(self.batch_ids(batch))
            batch = to_device(batch, self.device)
            with parallel.gradient_sync(self.train_model, self.model, self.cfg.parallel, self.dist,
                                        enabled=micro == self.accum - 1):
                with self.autocast():
                    out = self.compute_loss(self.train_model, batch)
                loss = out.loss / self.accum  # the mean over the whole accumulated batch
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_sum = loss_sum + loss.detach().float()
            for name, value in out.components.items():
                components[name] = components.get(name, 0) + value.detach().float() / self.accum
            samples += out.n_samples
            tokens += out.n_tokens
        grad_norm, found_inf = self.optimizer_step()
        # fp16: the scaler's own overflow skips are normal; count steps whose loss is non-finite.
        skipped = (~torch.isfinite(loss_sum)).float() if self.scaler is not None else found_inf
        return StepStats(loss=loss_sum, components=components, grad_norm=grad_norm, skipped=skipped,
                         samples=samples, tokens=tokens, ids=ids, data_wait_s=wait)

    def validate(self) -> dict[str, float]:
        """One validation pass (every rank), logged, with the `val/` prefix."""
        start = time.perf_counter()
        self.model.eval()
        # Evaluation draws from its own fixed RNG stream: it neither perturbs training randomness
        # (exact resume) nor varies between evaluations.
        with torch.no_grad(), _isolated_rng(self.cfg.seed, self.device):
            raw = self.evaluator.run(lambda batch: self.validation_step(self.model, batch), self.validation_metrics,
                                     self.autocast)
        self.set_train_mode(self.model)
        metrics = {f"val/{k}": v for k, v in raw.items()}
        self.schedule.observe(metrics, self.progress.step)
        record = {"step": self.progress.step, "epoch": self.progress.epoch, **metrics,
                  "eval_time_s": time.perf_counter() - start}
        faults = self.evaluator.faults.merged(self.dist)
        if faults.counts:
            faults.report("validation")
            record.update({f"val_{k}": v for k, v in faults.record().items()})
        self.evaluator.faults = FaultCounter()
        self.metrics_log.write(record)
        log.info(summary_line(record, tuple(metrics)))
        self.on_validation_end(self.model, self.progress.step, metrics)
        return metrics

    def _loop(self, stop: StopRequest) -> RunResult:
        cfg = self.cfg
        prog = self.progress
        meter = Meter()
        # Per-step "skipped" flags stay on the device and are read once per window.
        window: list[tuple[int, list, torch.Tensor]] = []
        check_every = max(1, min(cfg.log_every, cfg.max_nonfinite_steps)) if cfg.max_nonfinite_steps > 0 else cfg.log_every
        self._streak: list[tuple[int, list]] = []
        metrics: dict[str, float] = {}
        status = "completed"

        bar = tqdm(total=self.total_steps, initial=prog.step, desc=self.family, unit="step", dynamic_ncols=True,
                   disable=not (self.dist.is_main and cfg.progress and sys.stderr.isatty()))
        interval_start = time.perf_counter()
        interval = {"steps": 0, "samples": 0, "tokens": 0, "data_wait": 0.0}
        batches = self._batches()
        if cfg.eval_at_start and self.evaluator is not None and prog.step == 0:
            metrics = self.validate()

        while prog.step < self.total_steps:
            stats = self.train_step(batches)
            meter.add({"loss": stats.loss, **stats.components, "grad_norm": stats.grad_norm})
            window.append((prog.step, stats.ids, stats.skipped))
            interval["samples"] += stats.samples
            interval["tokens"] += stats.tokens
            interval["data_wait"] += stats.data_wait_s

            prog.step += 1
            interval["steps"] += 1
            bar.update(1)
            is_last = prog.step >= self.total_steps

            if prog.step % check_every == 0 or is_last:
                self._check_nonfinite(window)
                window = []

            if prog.step % cfg.log_every == 0 or is_last:
                elapsed = time.perf_counter() - interval_start
                record = self._train_record(meter, interval, elapsed, prog.nonfinite_total)
                self.faults.merged(self.dist).check(cfg.max_unusable_fraction, f"training epoch {prog.epoch}", final=False)
                self.metrics_log.write(record)
                bar.set_postfix(loss=f"{record.get('train/loss', float('nan')):.4g}", refresh=False)
                log.info(summary_line(record, ("train/loss", *[f"train/{k}" for k in self.summary_keys],
                                               "lr", "samples_per_s")))
                interval_start = time.perf_counter()
                interval = {"steps": 0, "samples": 0, "tokens": 0, "data_wait": 0.0}

            evaluated = False
            if self.evaluator is not None and (prog.step % cfg.eval_every == 0 or is_last):
                metrics = self.validate()
                evaluated = True

            stop_now = any_rank(stop.requested, self.dist)
            early = evaluated and self.early_stopping.should_stop(metrics)
            new_best = self.best.update(metrics, prog.step) if evaluated else None
            if prog.step % cfg.checkpoint.every == 0 or is_last or stop_now or early or new_best:
                self._save(metrics if evaluated else None, new_best)
            if stop_now:
                log.warning(f"stop requested ({stop.signal_name or 'signal on another rank'}): "
                            f"checkpoint written at step {prog.step}; resume with --resume")
                status = "stopped"
                break
            if early:
                log.info(f"early stopping at step {prog.step}: {cfg.early_stopping.metric} has not improved "
                         f"for {cfg.early_stopping.patience} evaluations")
                status = "early_stopped"
                break
        bar.close()
        return RunResult(status=status, step=prog.step, run_dir=self.run_dir, metrics=metrics, best=self.best.record,
                         checkpoint=self.last_checkpoint)

    # ------------------------------------------------------------------ loop pieces

    def _batches(self) -> Iterator[Any]:
        """Micro-batches forever, epoch after epoch, starting at the saved data position; data faults
        are reported (and checked against train.max_unusable_fraction) at the end of every epoch."""
        prog = self.progress
        while True:
            self.train_sampler.set_epoch(prog.epoch)
            self.train_sampler.set_start(prog.batches_in_epoch * self.cfg.batch_size)
            dataset = self.train_loader.dataset
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(prog.epoch)
            self.train_loader.generator.manual_seed(self.cfg.seed * 100003 + prog.epoch)
            for batch in self.train_loader:
                prog.batches_in_epoch += 1
                prog.samples_seen += self.cfg.batch_size * self.dist.world_size
                yield batch
            self._end_epoch_faults()
            prog.epoch += 1
            prog.batches_in_epoch = 0

    def _end_epoch_faults(self) -> None:
        faults = self.faults.merged(self.dist)
        self.faults = FaultCounter()
        if not faults.counts:
            return
        where = f"training epoch {self.progress.epoch}"
        faults.report(where)
        self.metrics_log.write({"step": self.progress.step, "epoch": self.progress.epoch, **faults.record()})
        faults.check(self.cfg.max_unusable_fraction, where, final=True)

    def optimizer_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip, step (skipped on the device when the gradient norm is not finite), zero grads."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.clip_grad_norm if self.cfg.clip_grad_norm > 0 else math.inf
        grad_norm = parallel.local_norm(torch.nn.utils.clip_grad_norm_(self.trainable, max_norm, foreach=True))
        # The norm is computed from all-reduced gradients, so every rank takes the same decision.
        found_inf = (~torch.isfinite(grad_norm)).float()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.optimizer.defaults.get("fused"):
            self.optimizer.found_inf = found_inf
            self.optimizer.step()
        elif not found_inf.item():  # unfused fallback has to ask the device
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.detach(), found_inf

    def _check_nonfinite(self, window: list[tuple[int, list, torch.Tensor]]) -> None:
        """Read the window's flags (one synchronisation), agree on them across ranks (a CPU
        collective), count them, and stop when `max_nonfinite_steps` came in a row."""
        if not window:
            return
        flags = torch.stack([flag for _, _, flag in window]).cpu().to(torch.int32)
        if self.dist.enabled:  # fp16 losses are per rank: any rank's bad step counts for all
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=self.dist.control_group)
        limit = self.cfg.max_nonfinite_steps
        for (step, ids, _), bad in zip(window, flags.tolist(), strict=True):
            if not bad:
                self._streak = []
                continue
            self.progress.nonfinite_total += 1
            self._streak.append((step, ids))
            if len(self._streak) >= limit > 0:
                steps = ", ".join(str(s) for s, _ in self._streak)
                objects = [i for _, batch_ids in self._streak for i in batch_ids][:20]
                raise TrainingError(
                    f"{len(self._streak)} optimizer steps in a row had a non-finite loss or gradient (steps {steps}); "
                    f"stopping. Object ids in those batches (first 20): {objects or 'n/a'}. Lower the learning "
                    "rate, check the data of these objects, or try train.precision=fp32."
                )

    def _train_record(self, meter: Meter, interval: dict, elapsed: float, nonfinite: int) -> dict[str, Any]:
        values = meter.read()
        if self.dist.enabled:
            names = sorted(values)
            packed = all_reduce_sum(torch.tensor([values[n] for n in names], dtype=torch.float64,
                                                 device=self.device), self.dist)
            values = {n: v / self.dist.world_size for n, v in zip(names, packed.cpu().tolist(), strict=False)}
        steps = max(1, interval["steps"])
        world = self.dist.world_size
        record: dict[str, Any] = {
            "step": self.progress.step,
            "epoch": self.progress.epoch + self.progress.batches_in_epoch / self.batches_per_epoch,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": values.pop("grad_norm", float("nan")),
        }
        record.update({f"train/{k}": v for k, v in values.items()})
        record.update({
            "samples_per_s": interval["samples"] * world / max(elapsed, 1e-9),
            "step_time_s": elapsed / steps,
            "data_wait_s": interval["data_wait"] / steps,
            "peak_mem_gb": peak_memory_gb(self.device),
            "nonfinite_steps": nonfinite,
        })
        if interval["tokens"]:
            record["tokens_per_s"] = interval["tokens"] * world / max(elapsed, 1e-9)
        return record

    # ------------------------------------------------------------------ checkpoints

    def _save(self, metrics: dict[str, float] | None, best: dict[str, Any] | None) -> None:
        self.last_checkpoint = self.checkpointer.save(
            self.progress.step, self.family, self.config, self.model, self.optimizer, self.stateful(), best,
            metrics=metrics or {})

    def _resume(self) -> None:
        restored = self.checkpointer.restore(self.family, self.model, self.optimizer, self.stateful())
        if restored is None:
            log.info(f"--resume: no complete checkpoint in {self.run_dir / 'checkpoints'}; starting from step 0")
            return
        directory, same_world = restored
        self.checkpointer.writer.best_step = self.best.record["step"] if self.best.record else None
        if not same_world:
            saved = ckpt.read_meta(directory).get("world_size", self.dist.world_size)
            log.warning(f"resuming with {self.dist.world_size} processes instead of {saved}: "
                        "the data order and random streams differ from an uninterrupted run")
            self.progress.batches_in_epoch = int(self.progress.batches_in_epoch * saved / self.dist.world_size)
        self.last_checkpoint = directory
        log.info(f"resumed from {directory} (step {self.progress.step}, epoch {self.progress.epoch})")

    # ------------------------------------------------------------------ set-up

    def _accumulation_steps(self) -> int:
        cfg = self.cfg
        if cfg.global_batch_size is None:
            return cfg.grad_accum_steps
        per_step = cfg.batch_size * self.dist.world_size
        if cfg.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={cfg.global_batch_size} is not a multiple of train.batch_size "
                f"({cfg.batch_size}) x processes ({self.dist.world_size})"
            )
        return cfg.global_batch_size // per_step

    def _total_steps(self) -> int:
        cfg = self.cfg
        if cfg.max_steps is not None:
            return cfg.max_steps
        if cfg.epochs is not None:
            return max(1, cfg.epochs * self.batches_per_epoch // self.accum)
        raise ConfigError("set train.max_steps or train.epochs (e.g. --max-steps 1000)")

    def _open_run_dir(self, resume: bool) -> None:
        """Create and lock the run directory (rank 0, for every rank), refuse to overwrite a run,
        open the logs and mark the status "running"."""
        self._lock = None
        problem = None
        if self.dist.is_main:
            try:
                self._lock = RunLock(self.run_dir).acquire()
                existing = ckpt.latest_checkpoint(self.run_dir)
                if existing is not None and not resume:
                    raise ConfigError(f"{self.run_dir} already holds a run (newest checkpoint {existing.name}): pass "
                                      "--resume to continue it, or choose another --out")
            except FmbError as exc:
                problem = exc
        failures = gather_objects(str(problem) if problem else None, self.dist)
        if problem is not None:
            raise problem
        if any(failures):
            raise ConfigError(next(f for f in failures if f))
        self._log_handler = None
        if self.dist.is_main:
            handler = logging.FileHandler(self.run_dir / "train.log")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            log.addHandler(handler)
            self._log_handler = handler
        self.metrics_log = MetricsLog(self.run_dir, self.dist.is_main, self.cfg.log_to, self.run_dir.name)
        self._write_status("running", None)

    def _write_demo_data(self) -> None:
        """The demo hook: `demo_data()` written once under <run>/data (<run>/data/synthetic.json records
        what), then data.path points at it, so config.yaml and the checkpoints name real files."""
        data, spec = getattr(self.config, "data", None), self.demo_data()
        if spec is None or data is None or getattr(data, "path", None) is not None or getattr(data, "synthetic", 0) <= 0:
            return
        kind, options = spec
        target = self.run_dir / "data"
        marker = target / "synthetic.json"
        wanted = {"kind": kind, "n": data.synthetic, "seed": self.cfg.seed, "options": options}
        with self.main_process_first() as is_main:
            if is_main and marker.is_file():
                record = json.loads(marker.read_text())
                if {key: record.get(key) for key in wanted} != json.loads(json.dumps(wanted)):
                    raise ConfigError(f"{target} holds synthetic data made with {record}, not {wanted}: "
                                      "choose another --out, or delete it")
            elif is_main:
                log.info(f"writing {data.synthetic} synthetic '{kind}' objects to {target}")
                from fmb.models import write_synthetic

                path = write_synthetic(kind, target, data.synthetic, self.cfg.seed, **options)
                marker.write_text(json.dumps({**wanted, "path": str(path)}, indent=1))
        data.path = json.loads(marker.read_text())["path"]

    def _write_status(self, status: str, exit_code: int | None, result: RunResult | None = None, **extra: Any) -> None:
        """status.json on rank 0, once the run directory is ours (see fmb.train.rundir)."""
        if not self.dist.is_main or getattr(self, "_lock", None) is None:
            return
        record: dict[str, Any] = {"status": status, "exit_code": exit_code, "family": self.family,
                                  "world_size": self.dist.world_size, **extra}
        progress = getattr(self, "progress", None)
        record["step"] = progress.step if progress is not None else 0
        checkpoint = getattr(self, "last_checkpoint", None)
        record["checkpoint"] = str(checkpoint) if checkpoint else None
        best = getattr(self, "best", None)
        record["best"] = best.record if best is not None else None
        if result is not None:
            record["metrics"] = result.metrics
        write_status(self.run_dir, **record)

    def _close_logging(self) -> None:
        if getattr(self, "metrics_log", None) is not None:
            self.metrics_log.close()
        if getattr(self, "_log_handler", None) is not None:
            log.removeHandler(self._log_handler)
            self._log_handler.close()

    def _log_start(self, train_set: Dataset, val_set: Dataset | None, groups: list[dict]) -> None:
        n_params = sum(p.numel() for p in self.model.parameters())
        n_train = sum(p.numel() for p in self.trainable)
        global_batch = self.cfg.batch_size * self.accum * self.dist.world_size
        log.info(
            f"{self.family}: {n_params / 1e6:.2f}M parameters ({n_train / 1e6:.2f}M trainable) | "
            f"{len(train_set)} train / {len(val_set) if val_set is not None else 0} val samples | "
            f"device {self.device} x {self.dist.world_size} | {self.precision} | global batch {global_batch} "
            f"({self.cfg.batch_size} x {self.accum} accum x {self.dist.world_size} procs) | "
            f"{self.total_steps} steps | run dir {self.run_dir}"
        )
        for group in groups:
            log.debug(f"param group {group['name']}: {len(group['params'])} tensors")

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


@contextlib.contextmanager
def _isolated_rng(seed: int, device: torch.device) -> Iterator[None]:
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
