"""The shared training core, driven through a tiny real family (tests/toy.py)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from fmb.errors import ConfigError, TrainingError
from fmb.train import checkpoint as ckpt
from tests.toy import ToyModel, ToyTrainer, toy_config


def weights(run_dir):
    return ckpt.read_safetensors(ckpt.latest_checkpoint(run_dir) / ckpt.MODEL_FILE)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    big = toy_config(tmp_path / "big", batch_size=8, grad_accum_steps=1, max_steps=6)
    small = toy_config(tmp_path / "small", batch_size=2, grad_accum_steps=4, max_steps=6)
    ToyTrainer(big).fit()
    ToyTrainer(small).fit()
    a, b = weights(tmp_path / "big"), weights(tmp_path / "small")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=2e-6)
    # The logged loss is the per-sample mean, not a sum over micro-steps.
    la = [r["train/loss"] for r in records(tmp_path / "big") if "train/loss" in r]
    lb = [r["train/loss"] for r in records(tmp_path / "small") if "train/loss" in r]
    assert la[0] == pytest.approx(lb[0], rel=1e-5)


@pytest.mark.parametrize("workers", [0, 1])
def test_exact_resume_is_bitwise(tmp_path, workers):
    common = dict(max_steps=10, batch_size=4, num_workers=workers)
    straight = toy_config(tmp_path / "straight", **common)
    straight.model.dropout = 0.2  # random stream must be restored too

    # Stop after 7 steps (64 samples / batch 4 = 16 batches per epoch: mid-epoch),
    # with the schedule of the 10-step run.
    first = toy_config(tmp_path / "resumed", **{**common, "max_steps": 7})
    first.model.dropout = 0.2
    for cfg in (straight, first):
        cfg.train.schedule.decay_steps = 10
    ToyTrainer(straight).fit()
    ToyTrainer(first).fit()
    second = toy_config(tmp_path / "resumed", **common)
    second.model.dropout = 0.2
    second.train.schedule.decay_steps = 10
    result = ToyTrainer(second).fit(resume=True)
    assert result.step == 10
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_with_epochs_crossing_and_multiple_epochs(tmp_path):
    cfg = toy_config(tmp_path / "e", max_steps=None, epochs=3, batch_size=16)
    result = ToyTrainer(cfg).fit()
    assert result.step == 3 * (64 // 16)
    last = [r for r in records(tmp_path / "e") if "train/loss" in r][-1]
    assert last["epoch"] == pytest.approx(3.0)


def test_cpu_threads_setting(tmp_path):
    ToyTrainer(toy_config(tmp_path / "t", max_steps=1, cpu_threads=2)).fit()
    assert torch.get_num_threads() == 2  # conftest puts it back to 1 for the next test


def test_bf16_autocast_on_cpu(tmp_path):
    cfg = toy_config(tmp_path / "bf16", precision="bf16", max_steps=4)
    trainer = ToyTrainer(cfg)
    seen = []
    original = trainer.compute_loss

    def spy(model, batch):
        out = original(model, batch)
        seen.append(model(batch["x"]).dtype)
        return out

    trainer.compute_loss = spy
    result = trainer.fit()
    assert result.status == "completed"
    assert torch.bfloat16 in seen
    # weights stay fp32 (autocast, not a cast of the model)
    assert all(v.dtype == torch.float32 for v in weights(tmp_path / "bf16").values())


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    cfg = toy_config(tmp_path / "nan", max_steps=6, max_nonfinite_steps=5)
    cfg.data.nan_from_step = 4  # steps 4 and 5 are NaN: 2 in a row < 5
    cfg.train.schedule.kind = "constant"
    ToyTrainer(cfg).fit()
    recs = [r for r in records(tmp_path / "nan") if "train/loss" in r]
    assert recs[-1]["nonfinite_steps"] == 2
    ref = toy_config(tmp_path / "ref", max_steps=4)
    ref.train.schedule.kind = "constant"
    ToyTrainer(ref).fit()
    # Skipped steps leave the weights exactly where step 4 left them.
    a, b = weights(tmp_path / "nan"), weights(tmp_path / "ref")
    for key in a:
        assert torch.equal(a[key], b[key]), key
        assert torch.isfinite(a[key]).all()


def test_nonfinite_streak_stops_with_step_and_ids(tmp_path):
    cfg = toy_config(tmp_path / "nan", max_steps=20, max_nonfinite_steps=3)
    cfg.data.nan_from_step = 2
    with pytest.raises(TrainingError, match=r"3 optimizer steps in a row.*steps 2, 3, 4.*Object ids") as info:
        ToyTrainer(cfg).fit()
    assert "1" in str(info.value)  # toy object ids are 1000 + index


def test_sigterm_writes_resumable_checkpoint(tmp_path):
    straight = toy_config(tmp_path / "straight", max_steps=9)
    ToyTrainer(straight).fit()

    cfg = toy_config(tmp_path / "killed", max_steps=9)
    cfg.data.kill_at_step = 4
    result = ToyTrainer(cfg).fit()
    assert result.status == "stopped"
    assert result.step == 5  # the step in flight is finished, then saved
    assert ckpt.latest_checkpoint(tmp_path / "killed").name == "step_0000005"

    again = toy_config(tmp_path / "killed", max_steps=9)
    assert ToyTrainer(again).fit(resume=True).status == "completed"
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "killed")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_partial_checkpoint_directory_is_ignored(tmp_path):
    run = tmp_path / "run"
    ToyTrainer(toy_config(run, max_steps=4, checkpoint=_ckpt(every=2))).fit()
    # A directory that looks newer but lacks files (a crash while copying), and a temp dir.
    partial = run / "checkpoints" / "step_0000006"
    shutil.copytree(run / "checkpoints" / "step_0000004", partial)
    (partial / ckpt.STATE_FILE).unlink()
    (run / "checkpoints" / ".tmp-step_0000008").mkdir()
    assert ckpt.latest_checkpoint(run).name == "step_0000004"
    result = ToyTrainer(toy_config(run, max_steps=6)).fit(resume=True)
    assert result.step == 6


def test_checkpoint_files_and_clean_keys(tmp_path):
    run = tmp_path / "run"
    ToyTrainer(toy_config(run, max_steps=6, eval_every=2, checkpoint=_ckpt(every=2, keep_last=2))).fit()
    steps = [p.name for _, p in ckpt.list_checkpoints(run)]
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert set(steps) >= {"step_0000004", "step_0000006"}
    assert f"step_{best['step']:07d}" in steps and len(steps) <= 3
    directory = ckpt.latest_checkpoint(run)
    state = torch.load(directory / ckpt.STATE_FILE, weights_only=True)  # plain types only
    assert state["progress"]["step"] == 6 and state["optimizer"]["state"]
    keys = weights(run).keys()
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in keys)
    model = ToyModel(ToyTrainer(toy_config(run)).config.model)
    ckpt.load_state_strict(model, weights(run), "test")


def test_strict_loading_lists_mismatches(tmp_path):
    model = ToyModel(toy_config(tmp_path).model)
    state = model.state_dict()
    state["module.extra"] = torch.zeros(1)
    state["net.0.weight"] = torch.zeros(3, 3)
    del state["net.4.bias"]
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_state_strict(model, state, "bad.safetensors")
    text = str(info.value)
    assert "missing keys: net.4.bias" in text and "unexpected keys: extra" in text
    assert "net.0.weight: checkpoint (3, 3) vs model (16, 8)" in text


def test_wrapper_prefixes_are_stripped():
    assert ckpt.clean_key("_orig_mod.module.net.0.weight") == "net.0.weight"
    assert ckpt.clean_key("module._orig_mod.a.b") == "a.b"


def test_validation_restores_train_mode_and_early_stopping(tmp_path):
    cfg = toy_config(tmp_path / "es", max_steps=200, eval_every=1, optim=_optim(lr=0.0))
    cfg.train.early_stopping.patience = 3
    cfg.train.schedule.kind = "constant"
    trainer = ToyTrainer(cfg)
    modes = []
    original = trainer.compute_loss

    def spy(model, batch):
        modes.append(model.training)
        return original(model, batch)

    trainer.compute_loss = spy
    result = trainer.fit()
    assert result.status == "early_stopped" and result.step == 4  # lr 0: never improves after the first
    # one training micro-batch, then two validation batches (16 samples / 8): train mode restored each time
    assert modes == [True, False, False] * 4
    vals = [r for r in records(tmp_path / "es") if "val/loss" in r]
    assert len(vals) == 4


def test_metrics_jsonl_fields(tmp_path):
    ToyTrainer(toy_config(tmp_path / "m", max_steps=3, eval_every=3)).fit()
    recs = records(tmp_path / "m")
    train = [r for r in recs if "train/loss" in r][0]
    for key in ("step", "epoch", "lr", "grad_norm", "train/mae", "samples_per_s", "step_time_s",
                "data_wait_s", "peak_mem_gb", "nonfinite_steps"):
        assert key in train, key
    assert any("val/loss" in r for r in recs)
    assert (tmp_path / "m" / "config.yaml").is_file() and (tmp_path / "m" / "train.log").is_file()


def _ckpt(**kwargs):
    from fmb.train.config import CheckpointConfig
    return CheckpointConfig(**kwargs)


def _optim(**kwargs):
    from fmb.train.config import OptimConfig
    return OptimConfig(**kwargs)


def test_rerun_into_an_existing_run_needs_resume(tmp_path):
    ToyTrainer(toy_config(tmp_path / "r", max_steps=2)).fit()
    with pytest.raises(ConfigError, match=r"already holds a run \(newest checkpoint step_0000002\): pass --resume"):
        ToyTrainer(toy_config(tmp_path / "r", max_steps=4)).fit()
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path / "r")] == ["step_0000002"]


def test_resume_applies_the_configured_optimizer_settings(tmp_path):
    ToyTrainer(toy_config(tmp_path / "r", max_steps=2, schedule=_schedule(kind="constant"))).fit()
    cfg = toy_config(tmp_path / "r", max_steps=4, schedule=_schedule(kind="constant"), optim=_optim(lr=1e-4, weight_decay=0.0))
    trainer = ToyTrainer(cfg)
    trainer.fit(resume=True)
    lrs = [r["lr"] for r in records(tmp_path / "r") if "lr" in r]
    assert lrs[:2] == [1e-2, 1e-2] and lrs[-1] == pytest.approx(1e-4)
    assert all(g["weight_decay"] == 0.0 for g in trainer.optimizer.param_groups)


def test_nonfinite_streak_between_checks_is_not_missed(tmp_path):
    cfg = toy_config(tmp_path / "nan", max_steps=8, max_nonfinite_steps=3, log_every=50)
    trainer = ToyTrainer(cfg)
    original = trainer.compute_loss

    def nan_at_steps_1_to_3(model, batch):
        out = original(model, batch)
        if 1 <= trainer.progress.step <= 3:
            out.loss = out.loss * float("nan")
        return out

    trainer.compute_loss = nan_at_steps_1_to_3
    with pytest.raises(TrainingError, match=r"3 optimizer steps in a row.*steps 1, 2, 3"):
        trainer.fit()


def test_fp16_scaler_skips_are_not_errors_and_resume_is_exact(tmp_path):
    common = dict(precision="fp16", max_nonfinite_steps=2, schedule=_schedule(kind="constant"))
    straight = ToyTrainer(toy_config(tmp_path / "a", max_steps=6, **common))
    assert straight.fit().status == "completed"  # early overflow skips while the scale calibrates
    ToyTrainer(toy_config(tmp_path / "b", max_steps=3, **common)).fit()
    resumed = ToyTrainer(toy_config(tmp_path / "b", max_steps=6, **common))
    resumed.fit(resume=True)
    assert resumed.scaler.get_scale() == straight.scaler.get_scale()
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_best_checkpoint_is_kept_when_an_evaluation_improves(tmp_path):
    run = tmp_path / "r"
    ToyTrainer(toy_config(run, max_steps=6, eval_every=2, checkpoint=_ckpt(every=1000, keep_last=1))).fit()
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert (run / "checkpoints" / best["dir"]).is_dir()  # saved at an evaluation, not a checkpoint step
    vals = {r["step"]: r["val/loss"] for r in records(run) if "val/loss" in r}
    assert best["value"] == pytest.approx(min(vals.values()))


def test_sampler_order_changes_with_epoch_and_skips_on_resume():
    from fmb.train.loader import ResumableSampler

    data = list(range(40))
    sampler = ResumableSampler(data, num_replicas=2, rank=1, seed=3)
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert len(first) == len(second) == 20
    assert first != second
    sampler.set_epoch(0)
    sampler.set_start(5)
    assert list(sampler) == first[5:]
    other = ResumableSampler(data, num_replicas=2, rank=0, seed=3)
    other.set_epoch(0)
    assert set(other).isdisjoint(first)


class _EpochItems(torch.utils.data.Dataset):
    """Items that say which index, epoch and process made them."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([i, self.epoch, os.getpid()])


def test_persistent_workers_follow_the_epoch_and_reshuffle():
    from fmb.train.loader import ResumableSampler, make_loader, stop_workers

    data = _EpochItems(16)
    sampler = ResumableSampler(data, num_replicas=1, rank=0, seed=0)
    loader = make_loader(data, sampler, 4, 1, None, pin_memory=False, drop_last=True, seed=0)
    orders, workers = [], set()
    try:
        for epoch in range(3):
            sampler.set_epoch(epoch)
            loader.dataset.set_epoch(epoch)
            items = torch.cat(list(loader))
            assert (items[:, 1] == epoch).all()  # the epoch reached the worker's copy of the dataset
            orders.append(items[:, 0].tolist())
            workers |= set(items[:, 2].tolist())
        assert len(workers) == 1 and os.getpid() not in workers  # one worker, the same every epoch
        assert orders[0] != orders[1] != orders[2] and sorted(orders[1]) == list(range(16))
        sampler.set_epoch(1)  # a resumed epoch: the rest of the same order
        sampler.set_start(8)
        loader.dataset.set_epoch(1)
        assert torch.cat(list(loader))[:, 0].tolist() == orders[1][8:]
    finally:
        stop_workers(loader)


def test_global_batch_size_sets_accumulation_from_world_size(tmp_path):
    from fmb.train.distributed import DistInfo

    trainer = ToyTrainer(toy_config(tmp_path, batch_size=4, global_batch_size=32))
    trainer.env.dist = DistInfo(rank=0, world_size=2)
    assert trainer._accumulation_steps() == 4  # 32 / (4 x 2 processes), not / local devices
    trainer.cfg.global_batch_size = 20
    with pytest.raises(ConfigError, match="not a multiple"):
        trainer._accumulation_steps()


def test_gradient_sync_skips_all_reduce_on_non_final_micro_steps(tmp_path):
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from fmb.train import parallel
    from fmb.train.distributed import DistInfo

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29000 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = ToyModel(toy_config(tmp_path).model)
        ddp = DistributedDataParallel(model)
        calls = []

        def count(state, bucket):
            calls.append(1)
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        ddp.register_comm_hook(None, count)
        info = DistInfo(rank=0, world_size=2)  # the multi-process code path, over a real process group
        for micro in range(4):
            with parallel.gradient_sync(ddp, model, "ddp", info, enabled=micro == 3):
                ddp(torch.randn(2, 8)).sum().backward()
        assert len(calls) == 1  # one all-reduce per optimizer step, after the last micro-step
    finally:
        dist.destroy_process_group()


def _schedule(**kwargs):
    from fmb.train.config import ScheduleConfig
    return ScheduleConfig(**kwargs)
