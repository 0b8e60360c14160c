"""benchmarks/gpu_check.sh in its CPU mode (fp32, gloo, tiny model and data): the torchrun and loader
steps, and the summary it writes. (Its other steps are `fmb retrain --demo` and `fmb bench`, which
tests of their own run on CPU; `--compile` is left to the GPU.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.extras import need

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_cpu_and_summarizes(tmp_path):
    need("PIL")  # the loader benchmark's naive peer decodes with Pillow
    env = {**os.environ, "CHECK_MODE": "cpu", "CHECK_STEPS": "torchrun loader", "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["all_passed"] and summary["environment"]["mode"] == "cpu" and summary["total_seconds"] > 0
    assert [s["name"] for s in summary["steps"]] == ["torchrun-astropt", "loader"]
    run = summary["steps"][0]["run"]  # one process under torchrun (gloo), trained to the end
    assert run["status"] == "completed" and run["step"] == 2 and run["train/loss last"] > 0
    assert summary["bench"] == {}  # no bench step asked for
    assert set(summary["loader"]["samples_per_s"]) == {"naive", "fmb_0", "fmb_1"}
    assert "compile-astropt" in summary["not_run"][0]
    assert (tmp_path / "summary.md").read_text().startswith("# GPU check (cpu mode): all steps passed")
