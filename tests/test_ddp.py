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

from fmb.train.distributed import env_ranks

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(out: Path, world: int, batch: int, accum: int, steps: int, env_style: str = "torchrun") -> None:
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
            [sys.executable, "-m", "tests.ddp_worker", str(out), str(batch), str(accum), str(steps)],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    for proc in procs:
        output, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, output


def test_env_ranks_from_torchrun_and_slurm():
    assert env_ranks({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}) == (3, 1, 8)
    assert env_ranks({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"}) == (5, 1, 8)
    assert env_ranks({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == (0, 0, 1)
    assert env_ranks({}) == (0, 0, 1)


def test_two_gloo_ranks_match_single_process(tmp_path):
    # global batch 8 = 2 ranks x 2 samples x 2 accumulation steps, against 1 process x 8
    launch(tmp_path / "ddp", world=2, batch=2, accum=2, steps=6, env_style="slurm")
    launch(tmp_path / "single", world=1, batch=8, accum=1, steps=6)
    rank0 = torch.load(tmp_path / "ddp" / "final_rank0.pt")
    rank1 = torch.load(tmp_path / "ddp" / "final_rank1.pt")
    single = torch.load(tmp_path / "single" / "final_rank0.pt")
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"ranks disagree on {key}"
        torch.testing.assert_close(rank0[key], single[key], rtol=0, atol=1e-5)
    # validation is sharded over both ranks and reduced: same figure as one process
    def last_val(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x) for x in lines if "val/loss" in x][-1]["val/loss"]

    assert last_val("ddp") == pytest.approx(last_val("single"), rel=1e-4)
    # only rank 0 writes files
    assert len(list((tmp_path / "ddp" / "checkpoints").glob("step_*"))) == 1
