"""AstroM3 through the real `fmb` CLI: CLIP demo, every fine-tune mode from a CLIP checkpoint,
confusion matrices, masked bad rows, embedding export and conversion of upstream weights."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from fmb import cli
from fmb.data.surveys.astrom3 import CLASSES
from fmb.errors import CheckpointError, ConfigError
from fmb.models import write_synthetic
from fmb.models.astrom3.convert import convert
from fmb.models.astrom3.model import AstroM3, AstroM3ModelConfig
from fmb.models.astrom3.trainer import AstroM3Config, AstroM3Trainer
from fmb.train import checkpoint as ckpt
from tests.cli_runner import run_cli as run

TINY = ["model.embed_dim=16", "model.seq_len=32", "model.d_model=16", "model.n_heads=2", "model.n_layers=1",
        "model.d_ff=32", "model.factor=2", "model.conv_channels=[4,4,4,4]", "model.m_hidden=16",
        "train.num_workers=0", "train.batch_size=16", "train.eval_every=3", "train.log_every=3"]


def sets(*extra: str) -> list[str]:
    out = []
    for item in (*TINY, *extra):
        out += ["--set", item]
    return out


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic("astrom3", tmp_path_factory.mktemp("astrom3") / "data", n=100, seed=0)


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory, data_dir):
    """A tiny CLIP run through the demo recipe (writing its own synthetic data)."""
    out = tmp_path_factory.mktemp("clip") / "run"
    mp = pytest.MonkeyPatch()
    mp.setattr(sys, "argv", ["fmb", "retrain", "astrom3", "--demo", "--out", str(out), "--max-steps", "6",
                             "--no-progress", *sets("data.synthetic=80")])
    with pytest.raises(SystemExit) as info:
        cli.main()
    mp.undo()
    assert info.value.code == 0
    return out


def test_clip_demo_writes_data_checkpoint_and_retrieval_metric(clip_run):
    assert (clip_run / "data" / "train-00000-of-00001.parquet").is_file()
    vals = [r for r in records(clip_run) if "val/retrieval_acc" in r]
    assert [r["step"] for r in vals][0] == 0 and len(vals) == 3  # the demo validates at step 0 too
    assert all(0.0 <= r["val/retrieval_acc"] <= 1.0 and math.isfinite(r["val/loss"]) for r in vals)
    best = json.loads((clip_run / "checkpoints" / "best.json").read_text())
    assert best["metric"] == "val/retrieval_acc"
    directory = ckpt.latest_checkpoint(clip_run)
    ckpt.check_family(directory, "astrom3")
    state = ckpt.read_safetensors(directory / ckpt.MODEL_FILE)
    # Training-split metadata statistics and the class order travel with the checkpoint.
    assert state["meta_std"].min() > 0 and not torch.equal(state["meta_mean"], torch.zeros(38))
    assert "classes:" in (directory / ckpt.CONFIG_FILE).read_text()
    assert state["logit_scale"].shape == (3,)


@pytest.mark.parametrize("mode,freeze", [("photo", True), ("spectra", False), ("meta", False), ("all", False)])
def test_finetune_modes_from_clip(monkeypatch, capsys, tmp_path, clip_run, mode, freeze):
    out = tmp_path / mode
    code, _, err = run(monkeypatch, capsys, "retrain", "astrom3", "--config", "configs/astrom3/finetune.yaml",
                       "--out", str(out), "--max-steps", "3", "--device", "cpu", "--no-progress",
                       *sets(f"model.mode={mode}", f"model.init_from={clip_run}", f"model.freeze_encoders={freeze}",
                             f"data.path={clip_run / 'data'}"))
    assert code == 0, err
    vals = [r for r in records(out) if "val/accuracy" in r]
    assert vals and 0 <= vals[-1]["val/accuracy"] <= 1 and "val/macro_f1" in vals[-1]
    confusion = json.loads((out / "confusion_matrix.json").read_text())
    matrix = np.array(confusion["matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 8  # the 8 validation objects of 80
    assert (out / "confusion" / "step_0000003.json").is_file()
    clip_state = ckpt.read_safetensors(ckpt.latest_checkpoint(clip_run) / ckpt.MODEL_FILE)
    tuned = ckpt.read_safetensors(ckpt.latest_checkpoint(out) / ckpt.MODEL_FILE)
    assert torch.equal(tuned["meta_mean"], clip_state["meta_mean"])
    encoder_key = {"photo": "photometry_proj.weight", "spectra": "spectra_proj.weight",
                   "meta": "metadata_proj.weight", "all": "metadata_proj.weight"}[mode]
    # Frozen encoders stay exactly as pre-trained; trained ones move.
    assert torch.equal(tuned[encoder_key], clip_state[encoder_key]) == freeze


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_is_exact(tmp_path, data_dir, workers):
    # Random crops, dropout and ProbSparse key sampling must all follow the saved state. With a worker,
    # the crops are drawn in a persistent worker that a resumed run starts afresh (its torch, numpy and
    # random streams seeded differently): only draws from (seed, epoch, index) match. 80 training
    # objects in batches of 16: the run stops in epoch 0 and resumes across into epoch 1.
    def config(out, steps):
        cfg = AstroM3Config()
        for item in TINY:
            key, value = item.split("=")
            if key.startswith("model."):
                setattr(cfg.model, key[6:], [4, 4, 4, 4] if key.endswith("channels") else int(value))
        cfg.data.path = str(data_dir)
        cfg.train.out, cfg.train.max_steps, cfg.train.batch_size = str(out), steps, 16
        cfg.train.num_workers, cfg.train.progress, cfg.train.eval_every = workers, False, 100
        cfg.train.schedule.decay_steps = 6
        return cfg

    AstroM3Trainer(config(tmp_path / "straight", 6)).fit()
    AstroM3Trainer(config(tmp_path / "resumed", 4)).fit()
    AstroM3Trainer(config(tmp_path / "resumed", 6)).fit(resume=True)
    a = ckpt.read_safetensors(ckpt.latest_checkpoint(tmp_path / "straight") / ckpt.MODEL_FILE)
    b = ckpt.read_safetensors(ckpt.latest_checkpoint(tmp_path / "resumed") / ckpt.MODEL_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_metric_of_another_mode_is_a_config_error():
    cfg = AstroM3Config()
    cfg.model.mode = "photo"
    cfg.train.checkpoint.best_metric = "val/retrieval_acc"
    with pytest.raises(ConfigError, match="val/retrieval_acc is not reported in model.mode=photo"):
        AstroM3Trainer(cfg)


def test_bad_rows_masked_keep_losses_finite(monkeypatch, capsys, tmp_path, data_dir):
    table = pq.read_table(data_dir / "train-00000-of-00001.parquet")
    photometry = table.column("photometry").to_pylist()
    labels = table.column("label").to_pylist()
    for i in range(0, len(photometry), 4):  # a quarter of the rows: single-point or NaN light curves
        photometry[i] = photometry[i][:1] if i % 8 else [[p[0], float("nan"), p[2]] for p in photometry[i]]
    labels[1] = "CEPHEID"
    table = table.set_column(table.column_names.index("photometry"), "photometry",
                             pa.array(photometry, table.schema.field("photometry").type))
    table = table.set_column(table.column_names.index("label"), "label", pa.array(labels))
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(table, bad / "train-00000-of-00001.parquet")
    pq.write_table(pq.read_table(data_dir / "validation-00000-of-00001.parquet"), bad / "validation-00000-of-00001.parquet")
    args = ["retrain", "astrom3", "--out", str(tmp_path / "r"), "--max-steps", "3", "--device", "cpu", "--no-progress"]
    code, _, err = run(monkeypatch, capsys, *args, *sets(f"data.path={bad}"))
    assert code == 1 and "object" in err and "data.bad_rows=mask" in err
    code, _, err = run(monkeypatch, capsys, *args, *sets(f"data.path={bad}", "data.bad_rows=mask"))
    assert code == 0, err
    train = [r for r in records(tmp_path / "r") if "train/loss" in r]
    assert all(math.isfinite(r["train/loss"]) for r in train) and train[-1]["train/masked"] > 0.1
    assert train[-1]["nonfinite_steps"] == 0


def test_embed_cli_writes_embeddings(monkeypatch, capsys, tmp_path, clip_run):
    out = tmp_path / "emb.parquet"
    code, _, err = run(monkeypatch, capsys, "embed", "astrom3", "--checkpoint", str(clip_run), "--out", str(out),
                       "--device", "cpu", "--split", "test")
    assert code == 0, err
    table = pq.read_table(out)
    assert table.num_rows == 8
    assert {"object_id", "label", "class_index", "valid"} <= set(table.column_names)
    for name in ("photometry", "spectrum", "metadata"):
        values = np.array(table.column(f"embedding_{name}").to_pylist(), dtype=np.float32)
        assert values.shape == (8, 16)
        np.testing.assert_allclose(np.linalg.norm(values, axis=1), 1.0, rtol=1e-5)
    expected = pq.read_table(clip_run / "data" / "test-00000-of-00001.parquet", columns=["object_id", "label"])
    assert table.column("object_id").to_pylist() == expected.column("object_id").to_pylist()
    assert table.column("label").to_pylist() == expected.column("label").to_pylist()
    code, _, err = run(monkeypatch, capsys, "embed", "astrom3", "--checkpoint", str(clip_run), "--out", str(out),
                       "--set", "split=test")
    assert code == 2 and "unknown config key 'split'" in err  # --set is the run's config, honoured or refused
    classes = table.column("label").to_pylist()
    reordered = sorted(set(classes), reverse=True)  # the same classes in another order: other class indices
    others = [c for c in CLASSES if c not in reordered]
    code, _, err = run(monkeypatch, capsys, "embed", "astrom3", "--checkpoint", str(clip_run), "--out", str(out),
                       "--device", "cpu", "--split", "test", "--set", f"data.classes=[{', '.join(reordered + others)}]")
    assert code == 0, err
    index = pq.read_table(out).column("class_index").to_pylist()
    assert index == [(reordered + others).index(c) for c in classes]


# ----------------------------------------------------------------------------- conversion


def upstream_layout(model: AstroM3) -> dict[str, torch.Tensor]:
    """The fmb model's weights under the key names of MeriDK/AstroM3 src/model.py + informer.py."""
    s = model.state_dict()
    d = model.cfg.d_model
    out = {"photometry_encoder.enc_embedding.value_embedding.tokenConv.weight": s["photometry_encoder.token.weight"]}
    position = torch.arange(5000.0)[:, None]
    div = torch.exp(torch.arange(0, d, 2).float() * -(math.log(10000.0) / d))
    pe = torch.zeros(5000, d)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(position * div), torch.cos(position * div)
    out["photometry_encoder.enc_embedding.position_embedding.pe"] = pe[None]
    for i in range(model.cfg.n_layers):
        up = f"photometry_encoder.encoder.attn_layers.{i}."
        me = f"photometry_encoder.layers.{i}."
        for kind in ("weight", "bias"):
            for ours, theirs in (("query", "query_projection"), ("key", "key_projection"),
                                 ("value", "value_projection"), ("out", "out_projection")):
                out[f"{up}attention.{theirs}.{kind}"] = s[f"{me}attention.{ours}.{kind}"]
            for ours, theirs in (("ff1", "conv1"), ("ff2", "conv2")):
                value = s[f"{me}{ours}.{kind}"]
                out[f"{up}{theirs}.{kind}"] = value[..., None] if kind == "weight" else value
            for norm in ("norm1", "norm2"):
                out[f"{up}{norm}.{kind}"] = s[f"{me}{norm}.{kind}"]
    for kind in ("weight", "bias"):
        out[f"photometry_encoder.encoder.norm.{kind}"] = s[f"photometry_encoder.norm.{kind}"]
        for j in range(4):
            out[f"spectra_encoder.layers.{3 * j}.{kind}"] = s[f"spectra_encoder.convs.{j}.{kind}"]
        out[f"metadata_encoder.model.0.{kind}"] = s[f"metadata_encoder.fc1.{kind}"]
        out[f"metadata_encoder.model.3.{kind}"] = s[f"metadata_encoder.fc2.{kind}"]
        for name in ("photometry", "spectra", "metadata"):
            out[f"{name}_proj.{kind}"] = s[f"{name}_proj.{kind}"]
    for i, name in enumerate(("logit_scale_ps", "logit_scale_sm", "logit_scale_mp")):
        out[name] = s["logit_scale"][i].clone()
    return {k: v.contiguous() for k, v in out.items()}


def test_convert_upstream_layout_strictly(monkeypatch, capsys, tmp_path):
    cfg = AstroM3ModelConfig(embed_dim=16, seq_len=32, d_model=16, n_heads=2, n_layers=2, d_ff=32, factor=2,
                             conv_channels=[4, 4, 4, 4], m_hidden=16)
    torch.manual_seed(0)
    original = AstroM3(cfg, num_classes=10).eval()
    with torch.no_grad():
        original.logit_scale.copy_(torch.tensor([1.0, 2.0, 3.0]))
    src = tmp_path / "AstroM3-CLIP"
    src.mkdir()
    state = upstream_layout(original)
    save_file(state, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({"p_n_heads": 2, "p_factor": 2, "s_mp_kernel_size": 4}))

    out = tmp_path / "converted"
    code, _, err = run(monkeypatch, capsys, "convert", "astrom3", str(src), "--out", str(out))
    assert code == 0, err
    meta = ckpt.check_family(out, "astrom3")
    assert meta["step"] == 0
    converted = ckpt.read_safetensors(out / ckpt.MODEL_FILE)
    model = AstroM3(cfg, num_classes=10)
    ckpt.load_state_strict(model, converted, str(out))
    model.eval()
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 32, dtype=torch.bool)
    mask[1, 20:] = False
    batch = (torch.randn(2, 32, 5, generator=gen), mask, torch.randn(2, 3, 2575, generator=gen), torch.randn(2, 38, generator=gen))
    torch.manual_seed(5)
    a = original(*batch)
    torch.manual_seed(5)
    b = model(*batch)
    for name in ("photometry", "spectra", "metadata", "scales"):
        torch.testing.assert_close(a[name], b[name])

    extra = dict(state)
    extra["photometry_encoder.encoder.attn_layers.0.attention.extra.weight"] = torch.zeros(2)
    save_file(extra, str(src / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no place"):
        convert(src, tmp_path / "c2")
    missing = {k: v for k, v in state.items() if k != "metadata_encoder.model.3.bias"}
    save_file(missing, str(src / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing keys: metadata_encoder.fc2.bias"):
        convert(src, tmp_path / "c3")


# ----------------------------------------------------------------------------- incomplete data


def test_photometry_classifier_trains_without_spectra_and_with_missing_metadata(monkeypatch, capsys, tmp_path):
    """The issue's case: light curves and labels, spectra all null, a third of the catalogue NaN."""
    out = tmp_path / "photo"
    code, _, err = run(monkeypatch, capsys, "retrain", "astrom3", "--demo", "--config", "configs/astrom3/finetune.yaml",
                       "--out", str(out), "--max-steps", "6", "--no-progress",
                       *sets("data.synthetic=80", "data.synthetic_missing={spectra: 1.0, metadata: 0.3}"))
    assert code == 0, err
    table = pq.read_table(out / "data" / "train-00000-of-00001.parquet")
    assert table.column("spectra").null_count == table.num_rows
    vals = [r for r in records(out) if "val/accuracy" in r]
    assert vals and all(math.isfinite(r["val/loss"]) for r in vals) and 0 <= vals[-1]["val/accuracy"] <= 1
    emb = tmp_path / "photo.parquet"
    code, _, err = run(monkeypatch, capsys, "embed", "astrom3", "--checkpoint", str(out), "--out", str(emb),
                       "--device", "cpu", "--split", "test")
    assert code == 0, err
    embedded = pq.read_table(emb)
    assert embedded.column("embedding_photometry").null_count == 0
    assert "embedding_spectrum" not in embedded.column_names and embedded.column("predicted").null_count == 0
    # The spectra classifier cannot train on this sample: the error names the modality and the split.
    code, _, err = run(monkeypatch, capsys, "retrain", "astrom3", "--config", "configs/astrom3/finetune.yaml",
                       "--out", str(tmp_path / "spectra"), "--max-steps", "2", "--device", "cpu", "--no-progress",
                       *sets("model.mode=spectra", f"data.path={out / 'data'}"))
    assert code == 1 and "no object has a 'spectra' value" in err and "split train" in err


def test_clip_trains_on_the_pairs_each_object_has_and_embeds_what_is_present(monkeypatch, capsys, tmp_path):
    data = write_synthetic("astrom3", tmp_path / "data", n=100, seed=3,
                           missing={"spectra": 0.7, "photometry": 0.2, "metadata": 0.3})
    out = tmp_path / "clip"
    code, _, err = run(monkeypatch, capsys, "retrain", "astrom3", "--out", str(out), "--max-steps", "6", "--device",
                       "cpu", "--no-progress", *sets(f"data.path={data}", "data.missing_sentinels=[-99.99]"))
    assert code == 0, err
    rows = records(out)
    train = [r for r in rows if "train/loss" in r]
    assert train and all(math.isfinite(r["train/loss"]) and r["train/meta_phot"] > 0 for r in train)
    assert all(0 <= r["val/retrieval_acc"] <= 1 for r in rows if "val/retrieval_acc" in r)
    emb = tmp_path / "clip.parquet"
    code, _, err = run(monkeypatch, capsys, "embed", "astrom3", "--checkpoint", str(out), "--out", str(emb),
                       "--device", "cpu", "--split", "train")
    assert code == 0, err
    source = pq.read_table(data / "train-00000-of-00001.parquet", columns=["spectra", "photometry"])
    embedded = pq.read_table(emb)
    for column, modality in (("spectra", "spectrum"), ("photometry", "photometry")):
        absent = source.column(column).is_null().to_pylist()
        assert embedded.column(f"embedding_{modality}").is_null().to_pylist() == absent
    assert embedded.column("embedding_joint").null_count == 0  # metadata is there for every object


def test_incomplete_benchmark_rerun_into_the_same_out_trains_afresh(tmp_path):
    # A rerun used to meet the first run's case folders (refused) or, with another --objects or --seed,
    # train on the data the first run wrote while its header named the new options.
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root / "src"), os.environ.get("PYTHONPATH")]))}

    def table(*options: str) -> list[str]:
        done = subprocess.run([sys.executable, "benchmarks/astrom3_incomplete.py", "--out", str(tmp_path / "out"),
                               "--steps", "1", "--seeds", "1", *options], cwd=root, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return [line for line in done.stdout.splitlines() if line.startswith("| ")]

    first = table("--objects", "96")
    assert len(first) == 1 + 8 and table("--objects", "96") == first  # the second run's own data and runs
    written = sum(pq.read_metadata(f).num_rows for f in (tmp_path / "out" / "002" / "data" / "complete").glob("*.parquet"))
    assert written == 96
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["001", "002"]
