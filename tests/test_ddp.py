"""DDP on CPU with gloo: two real processes started the way torchrun starts them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fmb.train import checkpoint as ckpt
from fmb.train.distributed import env_ranks
from tests.toy import ToyTrainer, toy_config

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(out: Path, world: int, batch: int, accum: int, steps: int, env_style: str = "torchrun", *extra: str) -> None:
    port = free_port()
    procs = []
    for rank in range(world):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "SLURM_", "LOCAL_RANK"))}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        if world > 1 and env_style == "torchrun":
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
        elif world > 1:
            env.update(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS=str(world))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.ddp_worker", str(out), str(batch), str(accum), str(steps), *extra],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    for proc in procs:
        output, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, output


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return ckpt.read_safetensors(ckpt.latest_checkpoint(run) / ckpt.MODEL_FILE)


def test_env_ranks_from_torchrun_and_slurm():
    assert env_ranks({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}) == (3, 1, 8)
    assert env_ranks({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"}) == (5, 1, 8)
    assert env_ranks({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == (0, 0, 1)
    assert env_ranks({}) == (0, 0, 1)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    # global batch 8 = 2 ranks x 2 samples x 2 accumulation steps, launched the way srun does it
    out = tmp_path_factory.mktemp("ddp") / "run"
    launch(out, 2, 2, 2, 6, "slurm", "--decay-steps", "6")
    return out


def test_two_gloo_ranks_match_single_process(ddp_run, tmp_path):
    cfg = toy_config(tmp_path / "single", batch_size=8, grad_accum_steps=1, max_steps=6, eval_every=3)
    cfg.train.schedule.decay_steps = 6
    ToyTrainer(cfg).fit()
    ddp, single = final_weights(ddp_run), final_weights(tmp_path / "single")
    for key in ddp:
        torch.testing.assert_close(ddp[key], single[key], rtol=0, atol=1e-5)

    # validation is sharded over both ranks and reduced: same figure as one process
    def last_val(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x) for x in lines if "val/loss" in x][-1]["val/loss"]

    assert last_val(ddp_run) == pytest.approx(last_val(tmp_path / "single"), rel=1e-4)
    # rank 0 writes one directory per save (step 3: best validation, step 6: the end), nothing half-done
    names = sorted(p.name for p in (ddp_run / "checkpoints").iterdir())
    assert names == ["best.json", "step_0000003", "step_0000006"]


def test_fsdp_matches_ddp_and_resumes(ddp_run, tmp_path):
    launch(tmp_path / "fsdp", 2, 2, 2, 6, "torchrun", "--parallel", "fsdp", "--decay-steps", "6")
    ddp, fsdp = final_weights(ddp_run), final_weights(tmp_path / "fsdp")
    assert ddp.keys() == fsdp.keys()  # one unsharded model.safetensors with clean keys
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=0, atol=1e-5)
    directory = ckpt.latest_checkpoint(tmp_path / "fsdp")
    assert (directory / "optimizer").is_dir()  # the optimizer state stays sharded
    # 4 steps, then a resumed run to 6: the same weights as 6 straight
    launch(tmp_path / "resumed", 2, 2, 2, 4, "torchrun", "--parallel", "fsdp", "--decay-steps", "6")
    launch(tmp_path / "resumed", 2, 2, 2, 6, "torchrun", "--parallel", "fsdp", "--decay-steps", "6", "--resume")
    resumed = final_weights(tmp_path / "resumed")
    for key in fsdp:
        torch.testing.assert_close(resumed[key], fsdp[key], rtol=0, atol=1e-6)


def test_every_family_trains_under_fsdp_with_an_uneven_validation_split(tmp_path):
    """2 gloo ranks, 3 validation batches: a rank that ran fewer forwards would hang the collective."""
    from tests.fsdp_families_worker import TINY

    ports = ",".join(str(free_port()) for _ in TINY)
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "SLURM_", "LOCAL_RANK"))}
        env.update(MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}",
                   RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.fsdp_families_worker", str(tmp_path), ports],
                                      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [p.communicate(timeout=600)[0] for p in procs]  # the timeout is the test's, not the code's
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    done = [line for line in outputs[0].splitlines() if line.startswith("FAMILY ")]
    assert [line.split()[1] for line in done] == list(TINY)
    assert all(" completed step 2 " in line and "val/loss" in line for line in done), done
    for name in TINY:
        saved = tmp_path / name / "checkpoints" / "step_0000002"
        # FSDP shards the optimizer state into a directory; DDP keeps it in the trainer state.
        assert (saved / "optimizer").is_dir() if "-ddp" not in name else (saved / "trainer_state.pt").is_file(), name
