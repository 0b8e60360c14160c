"""sbatch scripts: rendering, shipped copies, and runs under fake srun / scontrol / sbatch on PATH."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fmb import cli
from fmb.errors import ConfigError
from fmb.slurm import SlurmJob, render, shipped_jobs

ROOT = Path(__file__).resolve().parents[1]

FAKE_SRUN = r"""#!/bin/bash
# Fake srun: starts $SLURM_NTASKS local tasks with the variables srun gives each one, and
# passes SIGUSR1 on to them, as slurmstepd does for `--signal=USR1@T` (without B:).
log="$FAKE_SLURM_LOG"
opts=()
while [[ "$1" == -* ]]; do opts+=("$1"); shift; done
echo "${opts[*]}" > "$log/srun.opts"
echo "$*" > "$log/srun.command"
per_node="${SLURM_NTASKS_PER_NODE:-$SLURM_NTASKS}"
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
    if [ -n "${FAKE_SRUN_PROBE:-}" ]; then cmd=(python -c "$FAKE_SRUN_PROBE"); else cmd=("$@"); fi
    SLURM_PROCID=$i SLURM_LOCALID=$((i % per_node)) SLURM_NODEID=$((i / per_node)) "${cmd[@]}" &
    pids+=($!)
done
trap 'kill -USR1 "${pids[@]}" 2>/dev/null' USR1
echo $$ > "$log/srun.pid"
status=0
for pid in "${pids[@]}"; do
    while :; do
        wait "$pid"; rc=$?
        if [ "$rc" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then continue; fi
        break
    done
    if [ "$rc" -gt "$status" ]; then status=$rc; fi
done
exit "$status"
"""

FAKE_SCONTROL = r"""#!/bin/bash
echo "$*" >> "$FAKE_SLURM_LOG/scontrol.calls"
if [ "$1 $2" = "show hostnames" ]; then for host in $FAKE_HOSTNAMES; do echo "$host"; done; fi
"""

FAKE_SBATCH = r"""#!/bin/bash
echo "$*" >> "$FAKE_SLURM_LOG/sbatch.calls"
echo "Submitted batch job 4242"
"""

PROBE = """
import json, os
from fmb.train.distributed import env_ranks
rank, local, world = env_ranks()
print("PROBE " + json.dumps({"rank": rank, "local": local, "world": world,
      "addr": os.environ["MASTER_ADDR"], "port": os.environ["MASTER_PORT"],
      "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "omp": os.environ["OMP_NUM_THREADS"]}))
"""


@pytest.fixture
def fake_slurm(tmp_path: Path) -> dict[str, str]:
    """Environment of a batch job with fake SLURM commands first on PATH; logs in FAKE_SLURM_LOG."""
    bin_dir, log = tmp_path / "bin", tmp_path / "slurm-log"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("sbatch", FAKE_SBATCH)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    # The scripts call `python`: make it this interpreter. A wrapper, not a symlink: a venv's python
    # finds its environment from the path it is started by, so a symlink elsewhere loses the venv.
    (bin_dir / "python").write_text(f'#!/bin/bash\nexec {shlex.quote(sys.executable)} "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "CUDA_VISIBLE"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}",
               FAKE_SLURM_LOG=str(log), SLURM_JOB_ID="4321", SLURM_CPUS_PER_TASK="1")
    return env


def batch_env(env: dict[str, str], nodes: int, per_node: int, hosts: str, **extra: str) -> dict[str, str]:
    out = dict(env, SLURM_NNODES=str(nodes), SLURM_NTASKS=str(nodes * per_node),
               SLURM_NTASKS_PER_NODE=str(per_node), SLURM_JOB_NODELIST="fake[1-2]", FAKE_HOSTNAMES=hosts)
    out.update(extra)
    return out


def write_script(tmp_path: Path, job: SlurmJob) -> Path:
    path = tmp_path / "job.sbatch"
    path.write_text(render(job))
    return path


def calls(env: dict[str, str], name: str) -> list[str]:
    path = Path(env["FAKE_SLURM_LOG"]) / name
    return path.read_text().splitlines() if path.exists() else []


def test_shipped_scripts_are_what_the_renderer_writes_and_parse():
    shipped = {str(p.relative_to(ROOT / "slurm")) for p in (ROOT / "slurm").rglob("*.sbatch")}
    jobs = shipped_jobs()
    assert shipped == set(jobs), "slurm/ is out of date: run `python -m fmb.slurm`"
    assert {(job.cluster, job.job) for job in jobs.values()} == {(c, j) for c in ("jean-zay", "candide")
                                                                  for j in ("retrain", "embed")}
    for relative, job in jobs.items():
        text = (ROOT / "slurm" / relative).read_text()
        assert text == render(job), f"slurm/{relative} differs from the template: run `python -m fmb.slurm`"
    result = subprocess.run(["bash", "-c", 'for f in "$@"; do bash -n "$f" || exit 1; done', "_",
                             *sorted(str(ROOT / "slurm" / r) for r in jobs)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_jean_zay_script_directives_and_what_it_never_does(tmp_path):
    job = SlurmJob(model="astropt", cluster="jean-zay", constraint="h100", nodes=2, account="abc",
                   qos="qos_gpu_h100-t3", modules=("pytorch-gpu/py3/2.5.0",),
                   setup=("source $WORK/venv/bin/activate",), time="19:00:00",
                   retrain_args=("--set", "train.optim.lr=1e-4", "--config", "/w/my run.yaml"))
    text = render(job)
    for line in ("#SBATCH --account=abc@h100", "#SBATCH -C h100", "#SBATCH --qos=qos_gpu_h100-t3",
                 "#SBATCH --hint=nomultithread", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --gres=gpu:4", "#SBATCH --cpus-per-task=24", "#SBATCH --time=19:00:00",
                 "#SBATCH --signal=USR1@120", "#SBATCH --requeue", "module purge", "module load arch/h100",
                 "module load pytorch-gpu/py3/2.5.0", "source $WORK/venv/bin/activate"):
        assert line in text.splitlines(), line
    assert text.index("module load arch/h100") < text.index("module load pytorch-gpu")
    assert "--set train.optim.lr=1e-4 --config '/w/my run.yaml' \"$@\"" in text
    script = write_script(tmp_path, job)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    for rendered in [text, *(render(j) for j in shipped_jobs().values())]:
        assert "B:USR1" not in rendered and "CUDA_VISIBLE_DEVICES" not in rendered
        assert not re.search(r"\b(pip|wget|curl|git|huggingface-cli)\b", rendered.split("set -eo")[1])


def test_render_errors_name_the_setting():
    with pytest.raises(ConfigError, match="slurm_account in paths_local.yaml.*--account"):
        render(SlurmJob(model="astropt", cluster="jean-zay"))
    with pytest.raises(ConfigError, match="h100 nodes have 4 GPUs, not 8"):
        render(SlurmJob(model="astropt", cluster="jean-zay", constraint="h100", gpus_per_node=8, account="a"))
    with pytest.raises(ConfigError, match="a100, h100"):
        render(SlurmJob(model="astropt", cluster="jean-zay", constraint="v100", account="a"))
    with pytest.raises(ConfigError, match="unknown cluster 'adastra'"):
        render(SlurmJob(model="astropt", cluster="adastra"))
    with pytest.raises(ConfigError, match="--time '20h'"):
        render(SlurmJob(model="astropt", cluster="candide", time="20h"))
    candide = render(SlurmJob(model="astropt", cluster="candide", partition="gpu"))
    assert "#SBATCH --partition=gpu" in candide and "--account" not in candide and "arch/" not in candide


def test_cli_renders_from_paths_file_and_submits(monkeypatch, capsys, tmp_path, fake_slurm):
    paths = tmp_path / "paths_local.yaml"
    paths.write_text("slurm_account: abc\nslurm_qos: qos_gpu_a100-dev\nslurm_modules: [pytorch-gpu/py3/2.5.0]\n"
                     "slurm_setup: ['source $WORK/venv/bin/activate']\n")
    monkeypatch.setenv("PATH", fake_slurm["PATH"])
    monkeypatch.setenv("FAKE_SLURM_LOG", fake_slurm["FAKE_SLURM_LOG"])
    monkeypatch.setattr(sys, "argv", ["fmb", "slurm", "astropt", "--cluster", "jean-zay", "--nodes", "2",
                                      "--paths", str(paths), "--out", str(tmp_path / "run"), "--time", "01:00:00",
                                      "--script", str(tmp_path / "job.sbatch"), "--submit"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    out = capsys.readouterr()
    assert info.value.code == 0, out.err
    assert "Submitted batch job 4242" in out.out
    assert calls(fake_slurm, "sbatch.calls") == [str(tmp_path / "job.sbatch")]
    text = (tmp_path / "job.sbatch").read_text()
    for line in ("#SBATCH --account=abc@a100", "#SBATCH --qos=qos_gpu_a100-dev", "#SBATCH --ntasks-per-node=8",
                 "module load pytorch-gpu/py3/2.5.0", "source $WORK/venv/bin/activate",
                 f'RUN_DIR="{tmp_path / "run"}"', "#SBATCH --time=01:00:00"):
        assert line in text.splitlines(), line
    monkeypatch.setenv("FMB_PATHS", str(tmp_path / "empty.yaml"))
    (tmp_path / "empty.yaml").write_text("runs: r\n")
    monkeypatch.setattr(sys, "argv", ["fmb", "slurm", "astropt", "--cluster", "jean-zay"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2 and "slurm_account" in capsys.readouterr().err


def test_srun_tasks_get_ranks_world_size_and_master_address(tmp_path, fake_slurm):
    run_dir = tmp_path / "run"
    script = write_script(tmp_path, SlurmJob(model="astropt", cluster="candide", nodes=2, gpus_per_node=2,
                                             out=str(run_dir)))
    env = batch_env(fake_slurm, 2, 2, "gpu-node-07 gpu-node-08", FAKE_SRUN_PROBE=PROBE)
    result = subprocess.run(["bash", str(script), "--set", "train.optim.lr=1e-4"], env=env,
                            capture_output=True, text=True, timeout=120)
    log = (run_dir / "slurm-4321.out").read_text()
    assert result.returncode == 0, log
    probes = sorted((json.loads(line.split("PROBE ", 1)[1]) for line in log.splitlines() if "PROBE " in line),
                    key=lambda p: p["rank"])
    assert [(p["rank"], p["local"], p["world"]) for p in probes] == [(0, 0, 4), (1, 1, 4), (2, 0, 4), (3, 1, 4)]
    assert {p["addr"] for p in probes} == {"gpu-node-07"}
    assert {p["port"] for p in probes} == {str(20000 + 4321 % 20000)}
    assert {p["cuda_visible"] for p in probes} == {None} and {p["omp"] for p in probes} == {"1"}
    assert calls(env, "srun.command") == [
        f"python -m fmb retrain astropt --out {run_dir} --resume --no-progress --set train.optim.lr=1e-4"]
    assert "--cpus-per-task=1" in calls(env, "srun.opts")[0]
    assert calls(env, "scontrol.calls") == ["show hostnames fake[1-2]"]  # no requeue after success


@pytest.mark.parametrize("exit_code, restarts, requeued", [(75, 0, True), (75, 20, False), (1, 0, False)])
def test_requeue_only_after_a_graceful_stop_and_below_the_limit(tmp_path, fake_slurm, exit_code, restarts, requeued):
    script = write_script(tmp_path, SlurmJob(model="astropt", cluster="candide", gpus_per_node=1,
                                             out=str(tmp_path / "run")))
    env = batch_env(fake_slurm, 1, 1, "n1", FAKE_SRUN_PROBE=f"raise SystemExit({exit_code})",
                    SLURM_RESTART_COUNT=str(restarts))
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == exit_code
    assert ("requeue 4321" in calls(env, "scontrol.calls")) == requeued


def test_graceful_stop_requeues_and_the_requeued_job_resumes(tmp_path, fake_slurm):
    run_dir = tmp_path / "run"
    script = write_script(tmp_path, SlurmJob(model="astropt", cluster="candide", gpus_per_node=1, out=str(run_dir)))
    tiny = ["--demo", "--device", "cpu", "--batch-size", "2", "--set", "data.synthetic=16",
            "--set", "data.image_size=32", "--set", "train.eval_at_start=false", "--set", "train.num_workers=0",
            "--set", "train.log_every=1", "--set", "train.eval_every=100000"]
    env = batch_env(fake_slurm, 1, 1, "127.0.0.1")
    job = subprocess.Popen(["bash", str(script), *tiny, "--max-steps", "100000"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics, pid_file = run_dir / "metrics.jsonl", Path(env["FAKE_SLURM_LOG"]) / "srun.pid"
    deadline = time.monotonic() + 150
    while not (metrics.exists() and "train/loss" in metrics.read_text() and pid_file.exists()):
        assert job.poll() is None and time.monotonic() < deadline, (run_dir / "slurm-4321.out").read_text()
        time.sleep(0.2)
    os.kill(int(pid_file.read_text()), signal.SIGUSR1)  # what SLURM does 120 s before the limit
    assert job.wait(timeout=120) == 75, (run_dir / "slurm-4321.out").read_text()
    assert calls(env, "scontrol.calls")[-1] == "requeue 4321"
    stopped = [int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*")]
    assert len(stopped) == 1 and 0 < stopped[0] < 100000

    # The requeued job: same script, SLURM_RESTART_COUNT=1; here it is allowed 2 more steps.
    env["SLURM_RESTART_COUNT"] = "1"
    result = subprocess.run(["bash", str(script), *tiny, "--max-steps", str(stopped[0] + 2)], env=env,
                            capture_output=True, text=True, timeout=150)
    log = (run_dir / "slurm-4321.out").read_text()
    assert result.returncode == 0, log
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped[0]:07d}'} (step {stopped[0]}" in log
    assert (run_dir / "checkpoints" / f"step_{stopped[0] + 2:07d}" / "model.safetensors").is_file()
    assert calls(env, "scontrol.calls").count("requeue 4321") == 1
    assert "start 0" in log and "start 1" in log and "requeueing job 4321" in log


def test_embed_jobs_run_fmb_embed_and_requeue_after_a_stop(tmp_path, fake_slurm):
    out = tmp_path / "emb" / "astropt.parquet"
    job = SlurmJob(model="astropt", cluster="candide", gpus_per_node=2, job="embed", checkpoint=str(tmp_path / "run"),
                   out=str(out))
    script = write_script(tmp_path, job)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = batch_env(fake_slurm, 1, 2, "n1", FAKE_SRUN_PROBE="raise SystemExit(75)")
    result = subprocess.run(["bash", str(script), "--batch-size", "128"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 75
    assert calls(env, "srun.command") == [
        f"python -m fmb embed astropt --checkpoint {tmp_path / 'run'} --out {out} --batch-size 128"]
    assert "requeue 4321" in calls(env, "scontrol.calls")
    assert (out.parent / "slurm-4321.out").is_file()  # logs next to the embeddings
    with pytest.raises(ConfigError, match="needs --checkpoint"):
        render(SlurmJob(model="astropt", cluster="candide", job="embed"))


def test_a_training_stop_reported_by_srun_as_a_failure_is_still_requeued(tmp_path, fake_slurm):
    """srun reports the worst task code; the run's status file says it stopped gracefully."""
    run_dir = tmp_path / "run"
    probe = (f"import json, pathlib; d = pathlib.Path({str(run_dir)!r}); d.mkdir(exist_ok=True); "
             "(d / 'status.json').write_text(json.dumps({'status': 'stopped', 'exit_code': 75, 'step': 3})); "
             "raise SystemExit(137)")
    script = write_script(tmp_path, SlurmJob(model="astropt", cluster="candide", gpus_per_node=1, out=str(run_dir)))
    env = batch_env(fake_slurm, 1, 1, "n1", FAKE_SRUN_PROBE=probe)
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 75, (run_dir / "slurm-4321.out").read_text()
    assert "requeue 4321" in calls(env, "scontrol.calls")
