"""What a cluster user meets: stop on a signal to the whole job, one writer per run directory,
damaged checkpoints, reproducible files, run status, validation independent of the world size."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fmb.errors import CheckpointError, ConfigError, DataError
from fmb.train import checkpoint as ckpt
from fmb.train.faults import FaultCounter
from fmb.train.rundir import RunLock, is_locked, read_status
from tests.cli_runner import run_cli
from tests.test_ddp import free_port
from tests.toy import ToyTrainer, toy_config

ROOT = Path(__file__).resolve().parents[1]


def rank_env(rank: int | None, world: int, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "SLURM_", "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}")
    if rank is not None:
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
    return env


def wait_for_training(run: Path, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and "train/loss" in metrics.read_text()):
        for proc in procs:
            assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.1)


def worker(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.ddp_worker", *args]


# ----------------------------------------------------------------------------- signals to the whole job


@pytest.mark.parametrize("world", [1, 2])
def test_sigterm_to_the_whole_process_group_with_workers_writes_a_checkpoint(tmp_path, world):
    """scancel signals every process of the job, DataLoader workers included."""
    run, port = tmp_path / "run", free_port()
    procs = []
    for rank in range(world):
        group = {"process_group": 0 if rank == 0 else procs[0].pid}  # one process group: the job
        procs.append(subprocess.Popen(worker(str(run), "2", "1", "100000", "--num-workers", "2"),
                                      env=rank_env(rank if world > 1 else None, world, port), cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **group))
    wait_for_training(run, procs)
    os.killpg(procs[0].pid, signal.SIGTERM)
    for proc in procs:
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 75, output
    step = int(ckpt.latest_checkpoint(run).name.split("_")[1])
    assert 0 < step < 100000
    record = read_status(run)
    assert record["status"] == "stopped" and record["exit_code"] == 75 and record["step"] == step
    assert not is_locked(run)


def test_torchrun_stop_is_told_from_a_crash_by_fmb_status(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "tests.ddp_worker", str(run), "2", "1", "100000", "--num-workers", "1"]
    launcher = subprocess.Popen(command, env=rank_env(None, 1, 0), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for_training(run, [launcher])
    os.killpg(launcher.pid, signal.SIGTERM)
    output, _ = launcher.communicate(timeout=120)
    assert launcher.returncode != 75  # torchrun's own report of the stop is a failure code
    code, out, _ = run_cli(monkeypatch, capsys, "status", str(run))
    assert code == 75, output
    assert "stopped" in out and "checkpoint" in out

    # A run killed without a word (SIGKILL) says "running" but holds no lock: reported as a crash.
    record = json.loads((run / "status.json").read_text())
    (run / "status.json").write_text(json.dumps({**record, "status": "running"}))
    code, out, _ = run_cli(monkeypatch, capsys, "status", str(run))
    assert code == 1 and "crashed" in out


# ----------------------------------------------------------------------------- one writer per run


def test_a_second_writer_is_refused_and_a_crashed_holder_leaves_no_lock(tmp_path):
    run = tmp_path / "run"
    holder = RunLock(run).acquire()
    with pytest.raises(ConfigError, match=rf"{run} is in use by another fmb run \(pid {os.getpid()} on "):
        ToyTrainer(toy_config(run)).fit()
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
    holder.release()

    # A process holding the lock dies by SIGKILL: the next run starts without anyone cleaning up.
    script = (f"from fmb.train.rundir import RunLock; import time; RunLock({str(run)!r}).acquire(); "
              "print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", script], env=rank_env(None, 1, 0), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    assert is_locked(run)
    proc.kill()
    proc.wait()
    assert ToyTrainer(toy_config(run, max_steps=2)).fit().status == "completed"
    assert read_status(run)["status"] == "completed"


# ----------------------------------------------------------------------------- damaged checkpoints


def test_resume_falls_back_past_a_damaged_checkpoint(tmp_path, caplog):
    run = tmp_path / "run"
    cfg = toy_config(run, max_steps=4)
    cfg.train.checkpoint.every = 2
    ToyTrainer(cfg).fit()
    newest = run / "checkpoints" / "step_0000004"
    meta = json.loads((newest / "meta.json").read_text())
    assert set(meta["files"]) == {"model.safetensors", "trainer_state.pt", "config.yaml"}
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a truncated copy
    with pytest.raises(CheckpointError, match=r"step_0000004 is damaged \(model.safetensors has .* bytes"):
        ckpt.find_checkpoint(run)
    cfg = toy_config(run, max_steps=6)
    with caplog.at_level("WARNING", logger="fmb"):
        result = ToyTrainer(cfg).fit(resume=True)
    assert f"checkpoint {newest} is damaged" in caplog.text
    assert result.step == 6
    # Same size, other bytes: only the digest can tell.
    state = run / "checkpoints" / "step_0000006" / "trainer_state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    assert "SHA-256" in ckpt.damage(state.parent)


def test_checkpoint_bytes_are_reproducible_and_follow_the_umask(tmp_path):
    script = """
import os, sys, torch
from fmb.train import checkpoint as ckpt
state = {f"layer{i}.weight": torch.full((3, 2), float(i)) for i in range(6)}
for directory, umask in zip(sys.argv[1::2], sys.argv[2::2]):
    os.umask(int(umask, 8))
    ckpt.write_checkpoint(directory, "toy", {"train": {"seed": 0}}, state, 7, {"progress": {"step": 7}}, metrics={"a": 1})
"""
    env = rank_env(None, 1, 0)  # two processes: safetensors used to order its metadata per process
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "a"), "022", str(tmp_path / "c"), "002"], check=True, env=env)
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "b"), "022"], check=True, env=env)
    for file in ("model.safetensors", "trainer_state.pt", "config.yaml", "meta.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file
        assert (tmp_path / "a" / file).stat().st_mode & 0o777 == 0o644, file
        assert (tmp_path / "c" / file).stat().st_mode & 0o777 == 0o664, file


def test_a_process_that_joined_a_group_exits_with_its_code_and_flushed_output():
    """After a multi-process run the process ends without the interpreter's shutdown (exit_process):
    the code and everything printed must still come out, as with sys.exit."""
    code = ("import fmb.train.distributed as d; d._JOINED = True; import logging, sys; "
            "logging.basicConfig(stream=sys.stderr); print('kept', end=''); logging.warning('logged'); "
            "sys.stderr.write('err'); d.exit_process({})")
    for argument, returncode in (("3", 3), ("None", 0), ("'a message'", 1)):
        done = subprocess.run([sys.executable, "-c", code.format(argument)], env=rank_env(None, 1, 0), cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == returncode and done.stdout == "kept"
        assert "logged" in done.stderr and "err" in done.stderr
        assert ("a message" in done.stderr) == (returncode == 1)


# ----------------------------------------------------------------------------- validation and status


def test_validation_is_the_same_for_one_and_two_processes(tmp_path):
    """21 validation objects in batches of 8 (8, 8, 5): the batch spread depends on who shares a batch."""
    run = tmp_path / "run"
    cfg = toy_config(run, batch_size=4, max_steps=3)
    cfg.data.n_val = 21
    ToyTrainer(cfg).fit()
    cfg = toy_config(run, batch_size=8, max_steps=3)
    cfg.data.n_val = 21
    one = ToyTrainer(cfg)
    one.setup(resume=True)
    try:
        single = one.validate()
    finally:
        one.close()
    port = free_port()
    procs = [subprocess.Popen(worker(str(run), "8", "1", "3", "--n-val", "21", "--validate-only"),
                              env=rank_env(rank, 2, port), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    double = json.loads(outputs[0].split("VALIDATION ", 1)[1].splitlines()[0])
    assert single == double  # to the last bit
    assert set(single) == {"val/loss", "val/mae", "val/spread"}


def test_status_and_summary_name_where_the_results_are(tmp_path):
    run = tmp_path / "run"
    cfg = toy_config(run, max_steps=4, eval_every=2)
    result = ToyTrainer(cfg).fit()
    summary = result.summary()
    assert f"checkpoint {run / 'checkpoints' / 'step_0000004'}" in summary and "metrics.jsonl" in summary
    assert "best val/loss" in summary
    record = read_status(run)
    assert record["status"] == "completed" and record["exit_code"] == 0 and record["step"] == 4
    assert record["best"]["metric"] == "val/loss"


def test_a_failed_run_records_its_error(tmp_path):
    cfg = toy_config(tmp_path / "run", max_steps=20)
    cfg.data.nan_from_step = 0
    cfg.train.max_nonfinite_steps = 2
    with pytest.raises(Exception, match="non-finite"):
        ToyTrainer(cfg).fit()
    record = read_status(tmp_path / "run")
    assert record["status"] == "failed" and record["exit_code"] == 1 and "non-finite" in record["error"]


# ----------------------------------------------------------------------------- data faults


def test_fault_counter_counts_per_modality_and_stops_above_the_limit():
    counter = FaultCounter()
    for _ in range(6):
        batch = {"x": torch.zeros(50), "fault_image": ["cannot decode image bytes (f.parquet row 3)"] * 50,
                 "fault_spectrum": [""] * 49 + ["spectrum has 100 pixels where 7781 are expected (f.parquet row 9)"]}
        counter.take(batch)
        assert list(batch) == ["x"]
    assert counter.samples == 300 and counter.counts == {"image": 300, "spectrum": 6}
    assert counter.record() == {"data/samples": 300, "data/unusable_image": 300, "data/unusable_spectrum": 6}
    counter.counts.pop("image")
    counter.check(0.05, "epoch 0", final=True)  # 2% of spectra: fine
    counter.counts["image"] = 16
    with pytest.raises(DataError, match=r"image is unusable for 16 of 300 samples \(5%"):
        counter.check(0.05, "epoch 0", final=True)


def test_configuration_errors_exit_2_before_any_work(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "retrain", "astropt", "--demo", "--lr", "-1", "--out", str(tmp_path / "a"))
    assert code == 2 and "train.optim.lr" in err and "Traceback" not in err
    code, _, err = run_cli(monkeypatch, capsys, "retrain", "astropt", "--demo", "--out", str(tmp_path / "b"),
                           "--set", "model.preset=bogus")
    assert code == 2 and "model.preset 'bogus'" in err
    assert not (tmp_path / "b" / "data").exists()  # no demo data written before the check


# ----------------------------------------------------------------------------- distributed embedding


def test_distributed_embed_equals_one_process_and_resumes(tmp_path, monkeypatch, capsys):
    """torchrun with 2 ranks shares the chunks out; the result is the single-process file, and a run
    that lost a chunk recomputes only that one."""
    import pyarrow.parquet as pq

    run = tmp_path / "run"
    code, _, err = run_cli(monkeypatch, capsys, "retrain", "astropt", "--demo", "--out", str(run), "--max-steps", "2",
                           "--no-progress", "--set", "data.synthetic=40", "--set", "data.image_size=16",
                           "--set", "model.n_layer=1", "--set", "model.n_embd=32", "--set", "model.n_head=2",
                           "--set", "train.num_workers=0", "--set", "train.eval_at_start=false")
    assert code == 0, err
    embed = ["embed", "astropt", "--checkpoint", str(run), "--device", "cpu", "--batch-size", "4", "--chunk-rows", "8"]
    single, double = tmp_path / "single.parquet", tmp_path / "double.parquet"
    code, _, err = run_cli(monkeypatch, capsys, *embed, "--out", str(single))
    assert code == 0, err
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
                "-m", "fmb", *embed, "--out", str(double)]
    result = subprocess.run(torchrun, env=rank_env(None, 1, 0), cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    a, b = pq.read_table(single), pq.read_table(double)
    assert a.num_rows == 40 and a.equals(b)  # same rows, same order, same values

    # Lose one finished chunk of an interrupted export: the next run (1 process) redoes only it.
    parts = tmp_path / "again.parquet.parts"
    parts.mkdir()
    for chunk in (0, 1, 3, 4):
        pq.write_table(a.slice(chunk * 8, 8), parts / f"part-{chunk:06d}.parquet")
    code, _, err = run_cli(monkeypatch, capsys, *embed, "--out", str(tmp_path / "again.parquet"))
    assert code == 0 and "4 of 5 chunks already embedded" in err, err
    assert pq.read_table(tmp_path / "again.parquet").equals(a)


def test_embedding_stops_when_a_modality_is_unusable_for_too_many_objects(tmp_path):
    from fmb.models import get_family, register_family
    from fmb.train.embed import EmbedOptions, run_embed
    from tests import toy

    register_family(toy.FAMILY)
    ToyTrainer(toy_config(tmp_path / "run", max_steps=2)).fit()
    with pytest.raises(DataError, match=r"embedding.*x is unusable for .*toy row 0"):
        run_embed(get_family("toy"), tmp_path / "run", tmp_path / "e.parquet",
                  EmbedOptions(device="cpu", sets=["data.fault_every=2"]))
    result = run_embed(get_family("toy"), tmp_path / "run", tmp_path / "e.parquet",
                       EmbedOptions(device="cpu", sets=["data.fault_every=2", "train.max_unusable_fraction=1"]))
    assert result.faults == {"x": 40} and "unusable (embedded without it): x for 40" in result.summary()
