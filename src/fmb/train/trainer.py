"""BaseTrainer: the training loop every model family shares.

A family subclasses BaseTrainer and provides `build_model`, `build_datasets` and
`compute_loss` (plus optional hooks, see docs/design.md). The base owns devices, precision,
accumulation, clipping, non-finite handling, the optimizer and schedule, DDP, evaluation,
checkpoints, exact resume, logging and graceful stop.
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
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fmb import __version__
from fmb.config import to_yaml
from fmb.errors import ConfigError, DataError, TrainingError
from fmb.train import checkpoint as ckpt
from fmb.train import parallel
from fmb.train.config import BaseTrainingConfig
from fmb.train.distributed import (
    DistInfo,
    all_reduce_sum,
    any_rank,
    barrier,
    gather_objects,
    init_distributed,
    resolve_device,
    shutdown_distributed,
)
from fmb.train.loader import ResumableSampler, ShardSampler, make_loader, to_device
from fmb.train.metrics import Meter, MetricsLog, peak_memory_gb, summary_line
from fmb.train.optim import build_adamw, parameter_groups
from fmb.train.schedule import EarlyStopping, Schedule, is_improvement
from fmb.train.stop import StopRequest

log = logging.getLogger("fmb")


@dataclass
class StepOutput:
    """What a family's `compute_loss` returns for one micro-batch."""

    loss: torch.Tensor  # scalar, mean over the micro-batch
    components: dict[str, torch.Tensor] = field(default_factory=dict)  # logged as train/<name>
    n_samples: int = 0
    n_tokens: int = 0  # for tokens/s; 0 when not meaningful


@dataclass
class RunResult:
    status: str  # completed | stopped | early_stopped
    step: int
    run_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    best: dict[str, Any] | None = None


@dataclass
class _Progress:
    """Counters saved in trainer_state.pt."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    samples_seen: int = 0
    nonfinite_total: int = 0


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
        self.dist = DistInfo()
        self.device = torch.device("cpu")
        self.run_dir = Path(self.cfg.out or f"runs/{self.family}")

    # ------------------------------------------------------------------ family hooks

    def build_model(self) -> nn.Module:
        raise NotImplementedError

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

    def validation_step(self, model: nn.Module, batch: Any) -> dict[str, tuple[torch.Tensor, float]]:
        """Named (sum, count) pairs for one validation batch; reduced over batches and ranks."""
        out = self.compute_loss(model, batch)
        n = out.n_samples or 1
        metrics = {"loss": (out.loss.detach().float() * n, n)}
        for name, value in out.components.items():
            metrics[name] = (value.detach().float() * n, n)
        return metrics

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """Validation metrics (without the `val/` prefix) over this rank's shard, reduced."""
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, float] = {}
        for batch, counted in self.validation_batches(loader):
            with self.autocast():
                step_metrics = self.validation_step(model, batch)
            if not counted:
                continue
            for name, (total, count) in step_metrics.items():
                sums[name] = sums.get(name, 0) + total
                counts[name] = counts.get(name, 0) + count
        names = sorted(sums)
        gathered = gather_objects(names, self.dist)
        if any(g != names for g in gathered):
            raise TrainingError(f"validation metrics differ between ranks: {gathered}")
        if not names:
            return {}
        packed = torch.stack([torch.as_tensor(sums[n], device=self.device, dtype=torch.float64).reshape(())
                              for n in names] + [torch.tensor(float(counts[n]), device=self.device, dtype=torch.float64)
                                                 for n in names])
        packed = all_reduce_sum(packed, self.dist).cpu().tolist()
        k = len(names)
        return {n: packed[i] / max(packed[k + i], 1e-12) for i, n in enumerate(names)}

    def validation_batches(self, loader: DataLoader) -> Iterator[tuple[Any, bool]]:
        """(batch on the device, counted) pairs. Under FSDP every rank must run as many forwards as
        the others, so ranks with a shorter shard repeat their last batch, uncounted."""
        batch = None
        for batch in loader:
            batch = to_device(batch, self.device)
            yield batch, True
        if parallel.is_sharded(self.cfg.parallel, self.dist):
            most = max(gather_objects(len(loader), self.dist))
            for _ in range(most - len(loader)):
                yield batch, False

    def on_validation_end(self, model: nn.Module, step: int, metrics: dict[str, float]) -> None:
        """Called on every rank after each validation (write sample images, confusion matrices...)."""

    # ------------------------------------------------------------------ helpers for families

    @contextlib.contextmanager
    def main_process_first(self) -> Iterator[bool]:
        """Rank 0 runs the block first; the others wait, then run it (e.g. to read what it wrote)."""
        if not self.dist.is_main:
            barrier(self.dist)
        yield self.dist.is_main
        if self.dist.is_main:
            barrier(self.dist)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ run

    def fit(self, resume: bool = False) -> RunResult:
        # The handler is installed before set-up: a signal while data or the model load is honoured
        # (a checkpoint at the first step, exit 75) instead of killing the process.
        with StopRequest() as stop:
            try:
                self.setup(resume)
                return self._loop(stop)
            finally:
                self.close()

    def setup(self, resume: bool = False) -> None:
        """Everything before the first step: processes, run directory, data, model, optimizer,
        schedule, and the resumed state. (`fit` = setup + loop; `fmb bench` times steps after it.)"""
        self._seed_everything(self.cfg.seed)
        if self.cfg.cpu_threads:
            torch.set_num_threads(self.cfg.cpu_threads)
        self.device = resolve_device(self.cfg.device, 0)
        self.dist = init_distributed(self.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = resolve_device(self.cfg.device, self.dist.local_rank)
        cfg = self.cfg
        existing = ckpt.latest_checkpoint(self.run_dir)
        if existing is not None and not resume:
            raise ConfigError(f"{self.run_dir} already holds a run (newest checkpoint {existing.name}): pass --resume "
                              "to continue it, or choose another --out")
        self._setup_run_dir()
        self._setup_precision()
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
        self.val_loader = None
        if val_set is not None and 0 < len(val_set) < self.dist.world_size:
            raise DataError(f"the validation split has {len(val_set)} samples, fewer than the {self.dist.world_size} "
                            "processes that share it: use more validation data")
        if val_set is not None and len(val_set) > 0:
            limit = cfg.eval_max_batches * cfg.batch_size if cfg.eval_max_batches else None
            sampler = ShardSampler(len(val_set), self.dist.rank, self.dist.world_size, limit)
            self.val_loader = make_loader(val_set, sampler, cfg.batch_size, cfg.num_workers,
                                          self.collate_fn(), pin, drop_last=False, seed=cfg.seed)

        self.accum = self._accumulation_steps()
        self.total_steps = self._total_steps()

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = self.build_model().to(self.device)
        self.set_train_mode(self.model)
        self.train_model = parallel.wrap(self.model, cfg.parallel, self.dist, self.device, cfg.compile,
                                         self.find_unused_parameters, self.shard_units(self.model))

        groups = parameter_groups(self.model, cfg.optim, self.lr_for)
        self.optimizer = build_adamw(groups, cfg.optim)
        self.schedule = Schedule(cfg.schedule, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.early_stopping = EarlyStopping(**dataclasses.asdict(cfg.early_stopping))
        self.writer = ckpt.CheckpointWriter(self.run_dir, cfg.checkpoint.keep_last)
        self.best: dict[str, Any] | None = None
        self.progress = _Progress()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]

        # Each rank gets its own dropout / augmentation stream.
        self._seed_everything(cfg.seed + self.dist.rank)
        if resume:
            self._resume()
        self._log_start(train_set, val_set, groups)

    def close(self) -> None:
        self._close_logging()
        shutdown_distributed()

    def _loop(self, stop: StopRequest) -> RunResult:
        cfg = self.cfg
        prog = self.progress
        meter = Meter()
        # Per-step "non-finite" flags stay on the device and are read once per window.
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
        if cfg.eval_at_start and self.val_loader is not None and prog.step == 0:
            metrics = self._validate()

        while prog.step < self.total_steps:
            factor = self.schedule.factor(prog.step)
            for group in self.optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor

            step_ids = []
            loss_sum = torch.zeros((), device=self.device)
            for micro in range(self.accum):
                wait_start = time.perf_counter()
                batch = next(batches)
                interval["data_wait"] += time.perf_counter() - wait_start
                step_ids.extend(self.batch_ids(batch))
                batch = to_device(batch, self.device)
                last = micro == self.accum - 1
                with parallel.gradient_sync(self.train_model, self.model, cfg.parallel, self.dist, enabled=last):
                    with self.autocast():
                        out = self.compute_loss(self.train_model, batch)
                    loss = out.loss / self.accum  # the mean over the whole accumulated batch
                    (self.scaler.scale(loss) if self.scaler else loss).backward()
                loss_sum = loss_sum + loss.detach().float()
                meter.add({"loss": out.loss, **out.components})
                interval["samples"] += out.n_samples
                interval["tokens"] += out.n_tokens
            grad_norm, found_inf = self.optimizer_step()
            meter.add({"grad_norm": grad_norm})
            # fp16: the scaler's own overflow skips are normal; count steps whose loss is non-finite.
            bad = (~torch.isfinite(loss_sum)).float() if self.scaler is not None else found_inf
            window.append((prog.step, step_ids, bad))

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
                self.metrics_log.write(record)
                bar.set_postfix(loss=f"{record.get('train/loss', float('nan')):.4g}", refresh=False)
                log.info(summary_line(record, ("train/loss", *[f"train/{k}" for k in self.summary_keys],
                                               "lr", "samples_per_s")))
                interval_start = time.perf_counter()
                interval = {"steps": 0, "samples": 0, "tokens": 0, "data_wait": 0.0}

            evaluated = False
            if self.val_loader is not None and (prog.step % cfg.eval_every == 0 or is_last):
                metrics = self._validate()
                evaluated = True

            stop_now = any_rank(stop.requested, self.dist)
            early = evaluated and self.early_stopping.should_stop(metrics)
            new_best = evaluated and self._improves_best(metrics)
            if prog.step % cfg.checkpoint.every == 0 or is_last or stop_now or early or new_best:
                self._save(metrics if evaluated else None)
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
        return RunResult(status=status, step=prog.step, run_dir=self.run_dir, metrics=metrics, best=self.best)

    # ------------------------------------------------------------------ loop pieces

    def _batches(self) -> Iterator[Any]:
        """Micro-batches forever, epoch after epoch, starting at the saved data position."""
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
            prog.epoch += 1
            prog.batches_in_epoch = 0

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

    def _improves_best(self, metrics: dict[str, float]) -> bool:
        name = self.cfg.checkpoint.best_metric
        if not name or name not in metrics or not math.isfinite(metrics[name]):
            return False
        return self.best is None or is_improvement(metrics[name], self.best["value"], self.cfg.checkpoint.best_mode, 0.0)

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

    def _validate(self) -> dict[str, float]:
        start = time.perf_counter()
        self.model.eval()
        # Evaluation draws from its own fixed RNG stream: it neither perturbs training randomness
        # (exact resume) nor varies between evaluations.
        with torch.no_grad(), _isolated_rng(self.cfg.seed, self.device):
            raw = self.evaluate(self.model, self.val_loader)
        self.set_train_mode(self.model)
        metrics = {f"val/{k}": v for k, v in raw.items()}
        self.schedule.observe(metrics, self.progress.step)
        record = {"step": self.progress.step, "epoch": self.progress.epoch, **metrics,
                  "eval_time_s": time.perf_counter() - start}
        self.metrics_log.write(record)
        log.info(summary_line(record, tuple(metrics)))
        self.on_validation_end(self.model, self.progress.step, metrics)
        return metrics

    # ------------------------------------------------------------------ checkpoints

    def _save(self, metrics: dict[str, float] | None) -> None:
        step = self.progress.step
        best_cfg = self.cfg.checkpoint
        is_best = False
        if metrics and self._improves_best(metrics):
            self.best = {"metric": best_cfg.best_metric, "value": metrics[best_cfg.best_metric], "step": step}
            is_best = True
        rng_states = gather_objects(ckpt.capture_rng(), self.dist)
        model_state = parallel.full_model_state(self.model, self.cfg.parallel, self.dist)  # collective under FSDP
        if self.dist.is_main:
            self.writer.begin(step)
        barrier(self.dist)
        tmp = self.writer.tmp_dir(step)
        optimizer_state = parallel.save_optimizer(self.model, self.optimizer, self.cfg.parallel, self.dist, tmp)
        barrier(self.dist)
        if self.dist.is_main:
            meta = {"family": self.family, "step": step, "fmb_version": __version__,
                    "metrics": metrics or {}, "world_size": self.dist.world_size, "parallel": self.cfg.parallel}
            ckpt.save_safetensors(model_state, tmp / ckpt.MODEL_FILE, {"fmb_family": self.family, "step": str(step)})
            torch.save(self._trainer_state(rng_states, optimizer_state), tmp / ckpt.STATE_FILE)
            (tmp / ckpt.CONFIG_FILE).write_text(to_yaml(self.config))
            (tmp / ckpt.META_FILE).write_text(json.dumps(meta, indent=1))
            if is_best:
                self.writer.best_step = step
            self.writer.commit(tmp, step)
            if is_best:
                self.writer.mark_best(step, self.best["metric"], self.best["value"])
        barrier(self.dist)

    def _trainer_state(self, rng_states: list, optimizer_state: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "progress": dataclasses.asdict(self.progress),
            "world_size": self.dist.world_size,
            "optimizer": optimizer_state,  # None under FSDP: sharded in optimizer/
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "early_stopping": self.early_stopping.state_dict(),
            "best": self.best,
            "rng": rng_states,
        }

    def _resume(self) -> None:
        directory = ckpt.latest_checkpoint(self.run_dir)
        if directory is None:
            log.info(f"--resume: no complete checkpoint in {self.run_dir / 'checkpoints'}; starting from step 0")
            return
        ckpt.check_family(directory, self.family)
        weights = ckpt.check_state_fits(self.model, ckpt.read_safetensors(directory / ckpt.MODEL_FILE), str(directory))
        parallel.load_model_state(self.model, weights, self.cfg.parallel, self.dist)
        try:
            state = torch.load(directory / ckpt.STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as exc:  # a corrupt file must stop the run, never start it afresh
            raise ckpt.CheckpointError(f"cannot read {directory / ckpt.STATE_FILE}: {exc}") from exc
        configured = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        parallel.load_optimizer(self.model, self.optimizer, self.cfg.parallel, self.dist, directory, state["optimizer"])
        self._reapply_hyperparameters(configured)
        self.schedule.load_state_dict(state["schedule"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.early_stopping.load_state_dict(state["early_stopping"])
        self.best = state["best"]
        self.writer.best_step = self.best["step"] if self.best else None
        self.progress = _Progress(**state["progress"])
        if state["world_size"] == self.dist.world_size:
            ckpt.restore_rng(state["rng"][self.dist.rank])
        else:
            log.warning(f"resuming with {self.dist.world_size} processes instead of {state['world_size']}: "
                        "the data order and random streams differ from an uninterrupted run")
            ratio = state["world_size"] / self.dist.world_size
            self.progress.batches_in_epoch = int(self.progress.batches_in_epoch * ratio)
        log.info(f"resumed from {directory} (step {self.progress.step}, epoch {self.progress.epoch})")

    def _reapply_hyperparameters(self, configured: list[dict[str, Any]]) -> None:
        """Loading an optimizer state restores the saved lr, weight decay, betas and eps; the
        configuration of this run wins (lowering the lr before a requeue must take effect)."""
        for group, wanted in zip(self.optimizer.param_groups, configured, strict=True):
            for key in ("base_lr", "lr", "weight_decay", "betas", "eps"):
                if key in wanted and group.get(key) != wanted[key]:
                    if key != "lr":
                        log.info(f"resume: {group.get('name', 'group')} {key} {group.get(key)} -> {wanted[key]} (from the config)")
                    group[key] = wanted[key]

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

    def _setup_precision(self) -> None:
        precision = self.cfg.precision
        if precision == "auto":
            if self.device.type == "cuda":
                precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            else:
                precision = "fp32"
        self.precision = precision
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = self.cfg.tf32
            torch.backends.cudnn.allow_tf32 = self.cfg.tf32

    def _setup_run_dir(self) -> None:
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        barrier(self.dist)
        self._log_handler = None
        if self.dist.is_main:
            handler = logging.FileHandler(self.run_dir / "train.log")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            log.addHandler(handler)
            self._log_handler = handler
        self.metrics_log = MetricsLog(self.run_dir, self.dist.is_main, self.cfg.log_to, self.run_dir.name)

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
