"""The `fmb` command: exit codes, one-paragraph errors, config show, paths, doctor, fast --help."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from fmb import cli
from fmb.models import register_family
from tests import toy
from tests.cli_runner import run_cli as run


@pytest.fixture(autouse=True)
def _toy_family():
    register_family(toy.FAMILY)


def test_help_is_fast_and_does_not_import_torch():
    code = "import sys; import fmb.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    result = subprocess.run([sys.executable, "-m", "fmb", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "retrain" in result.stdout and "doctor" in result.stdout


def test_unknown_model_lists_valid_ones(monkeypatch, capsys):
    code, _, err = run(monkeypatch, capsys, "retrain", "astroqt")
    assert code == 2
    assert "unknown model 'astroqt'" in err and "toy" in err and "Traceback" not in err


def test_config_error_exit_code_and_debug_traceback(monkeypatch, capsys):
    code, _, err = run(monkeypatch, capsys, "config", "show", "toy", "--set", "train.optim.lrr=1")
    assert code == 2 and "did you mean 'train.optim.lr'" in err
    monkeypatch.setattr(sys, "argv", ["fmb", "--debug", "config", "show", "toy", "--set", "train.optim.lrr=1"])
    with pytest.raises(Exception, match="unknown config key"):
        cli.main()


def test_config_show_prints_resolved_yaml(monkeypatch, capsys, tmp_path):
    paths = tmp_path / "p.yaml"
    paths.write_text("runs: /data/runs\n")
    code, out, _ = run(monkeypatch, capsys, "config", "show", "toy", "--set", "train.optim.lr=1e-4",
                       "--paths", str(paths))
    assert code == 0
    shown = yaml.safe_load(out)
    assert shown["train"]["optim"]["lr"] == 1e-4 and shown["train"]["out"] == "/data/runs/toy"


def test_retrain_runs_and_writes_run_directory(monkeypatch, capsys, tmp_path):
    code, _, err = run(monkeypatch, capsys, "retrain", "toy", "--out", str(tmp_path / "r"), "--max-steps", "3",
                       "--batch-size", "8", "--lr", "1e-3", "--device", "cpu", "--no-progress",
                       "--set", "train.num_workers=0")
    assert code == 0, err
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 3 and saved["train"]["optim"]["lr"] == 1e-3
    assert (tmp_path / "r" / "checkpoints" / "step_0000003" / "model.safetensors").is_file()


def test_retrain_without_steps_is_a_usage_error(monkeypatch, capsys, tmp_path):
    code, _, err = run(monkeypatch, capsys, "retrain", "toy", "--out", str(tmp_path / "r"), "--no-progress")
    assert code == 2 and "set train.max_steps or train.epochs" in err


def test_graceful_stop_exit_code(monkeypatch, capsys, tmp_path):
    code, _, err = run(monkeypatch, capsys, "retrain", "toy", "--out", str(tmp_path / "r"), "--max-steps", "6",
                       "--batch-size", "8", "--no-progress", "--set", "train.num_workers=0",
                       "--set", "data.kill_at_step=2")
    assert code == 75, err
    code, _, err = run(monkeypatch, capsys, "retrain", "toy", "--out", str(tmp_path / "r"), "--max-steps", "6",
                       "--batch-size", "8", "--no-progress", "--set", "train.num_workers=0", "--resume")
    assert code == 0, err


def test_paths_and_doctor(monkeypatch, capsys, tmp_path):
    paths = tmp_path / "p.yaml"
    (tmp_path / "there").mkdir()
    paths.write_text("here: there\nnothing:\nlost: /no/such/dir\n")
    code, out, _ = run(monkeypatch, capsys, "paths", "--paths", str(paths))
    assert code == 0
    assert "here" in out and "ok" in out and "not set" in out and "missing" in out
    code, out, _ = run(monkeypatch, capsys, "doctor", "--paths", str(paths))
    assert code == 0 and "torch" in out and "CUDA" in out and "MISSING" in out
    for extra in ("images", "plots", "parity", "eval", "discovery"):  # each extra, installed or what to install
        assert f"extra {extra}" in out


def test_convert_and_embed_need_family_support(monkeypatch, capsys, tmp_path):
    from fmb.models import Family
    from fmb.train import BaseTrainer

    class Bare(toy.ToyTrainer):
        embedding_datasets = BaseTrainer.embedding_datasets

    register_family(Family(name="bare", summary="no embedding export", trainer=Bare))
    code, _, err = run(monkeypatch, capsys, "convert", "toy", str(tmp_path), "--out", str(tmp_path / "o"))
    assert code == 2 and "no upstream checkpoint converter" in err
    code, _, err = run(monkeypatch, capsys, "embed", "bare", "--checkpoint", str(tmp_path), "--out", "x.parquet")
    assert code == 2 and "no embedding export" in err


def test_a_family_registered_from_outside_plugs_into_every_command(monkeypatch, capsys, tmp_path):
    """Nothing in fmb names the toy family: retrain, embed, slurm, config show and data kinds find it."""
    import pyarrow.parquet as pq

    run_dir = tmp_path / "run"
    code, _, err = run(monkeypatch, capsys, "retrain", "toy", "--out", str(run_dir), "--max-steps", "2", "--no-progress")
    assert code == 0, err
    code, out, err = run(monkeypatch, capsys, "embed", "toy", "--checkpoint", str(run_dir), "--out",
                         str(tmp_path / "e.parquet"), "--split", "validation", "--set", "model.dropout=0.5")
    assert code == 0, err
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.num_rows == 16 and set(table.column("split").to_pylist()) == {"validation"}
    assert {"object_id", "y", "embedding_joint"} <= set(table.column_names) and "embedded 16 objects" in out
    code, _, err = run(monkeypatch, capsys, "embed", "toy", "--checkpoint", str(run_dir), "--out",
                       str(tmp_path / "f.parquet"), "--set", "model.hidden=8")
    assert code == 1 and "does not fit the model" in err  # --set reaches the architecture, and it must fit
    code, out, _ = run(monkeypatch, capsys, "slurm", "toy", "--cluster", "candide", "--gpus-per-node", "2")
    assert code == 0 and "python -m fmb retrain toy" in out
    code, out, _ = run(monkeypatch, capsys, "config", "show", "toy")
    assert code == 0 and "hidden: 16" in out
    code, out, _ = run(monkeypatch, capsys, "data", "kinds")
    assert code == 0 and "toy-points" in out
    code, out, _ = run(monkeypatch, capsys, "data", "synth", "toy-points", "--out", str(tmp_path / "pts"), "-n", "5")
    assert code == 0 and (tmp_path / "pts" / "points.pt").is_file()


def test_synth_unknown_kind(monkeypatch, capsys, tmp_path):
    code, _, err = run(monkeypatch, capsys, "data", "synth", "nope", "--out", str(tmp_path))
    assert code == 2 and "unknown synthetic data kind 'nope'" in err
