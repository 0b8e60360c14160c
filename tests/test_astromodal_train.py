"""astromodal end to end: `fmb data synth splus`, `fmb tokenize fit/encode`, training through the
core trainer, and `fmb embed astromodal`."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import torch
import yaml

from fmb.data.splits import holdout_mask
from fmb.models.astromodal.data import TokenShards
from fmb.models.astromodal.trainer import AstromodalConfig, AstromodalTrainer
from fmb.train import checkpoint as ckpt
from tests.cli_runner import run_cli

TINY_TOKENIZERS = ["scalar_bins=16", "spectrum_codebook=8", "desi_rebin=128", "image_codebook=16",
                   "image_downsample=4", "image_hidden=4", "image_epochs=1", "kmeans_steps=10",
                   "kmeans_batch=512", "device=cpu"]


def test_tokenize_cli_train_and_embed(tmp_path, monkeypatch, capsys):
    data, tok, shards = tmp_path / "data", tmp_path / "tok", tmp_path / "tokens"
    code, out, err = run_cli(monkeypatch, capsys, "data", "synth", "splus", "--out", str(data), "-n", "180")
    assert code == 0, err
    sets = [arg for s in TINY_TOKENIZERS for arg in ("--set", s)]
    code, _, err = run_cli(monkeypatch, capsys, "tokenize", "fit", "all", "--data", str(data), "--out", str(tok), *sets)
    assert code == 0, err
    assert {p.name for p in tok.iterdir()} >= {"scalar.safetensors", "scalar.json", "spectrum.safetensors",
                                               "image.safetensors", "image.json", "tokenizer_config.json"}
    code, _, err = run_cli(monkeypatch, capsys, "tokenize", "fit", "audio", "--data", str(data), "--out", str(tok))
    assert code == 2 and "unknown tokeniser kind" in err
    code, _, err = run_cli(monkeypatch, capsys, "tokenize", "encode", "--data", str(data), "--tokenizers", str(tok),
                           "--out", str(shards))
    assert code == 0, err
    assert len(TokenShards(shards)) > 120

    cfg = AstromodalConfig()
    cfg.data.tokenizers, cfg.data.tokens, cfg.data.val_fraction = str(tok), str(shards), 0.2
    cfg.model.preset, cfg.model.d_model, cfg.model.d_ff, cfg.model.max_len = "tiny", 64, 128, 256
    train = cfg.train
    train.out, train.device, train.num_workers, train.progress = str(tmp_path / "run"), "cpu", 0, False
    train.batch_size, train.max_steps, train.eval_every, train.log_every = 16, 30, 10, 10
    train.optim.lr = 3e-3
    result = AstromodalTrainer(cfg).fit()
    assert result.status == "completed"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val/ce" in r]
    assert len(evals) == 3
    first, last = evals[0], evals[-1]
    assert last["val/ce"] < first["val/ce"]
    recon = [k for k in last if k.startswith("val/recon_")]
    assert {"val/recon_image", "val/recon_scalar", "val/recon_spec_desi_b", "val/recon_spec_gaiaxp_rp"} <= set(recon)
    assert all(np.isfinite(r[k]) for r in evals for k in recon)
    assert any("tokens_per_s" in r for r in records)

    # The checkpoint carries the codebooks: a fresh model loaded from it decodes on its own.
    directory = ckpt.find_checkpoint(tmp_path / "run")
    trainer = AstromodalTrainer(ckpt.read_config(directory, AstromodalConfig))
    trainer.prepare_embedding(directory, tmp_path / "work")
    model = trainer.new_model()
    ckpt.load_state_strict(model, ckpt.read_safetensors(directory / ckpt.MODEL_FILE), str(directory))
    np.testing.assert_allclose(model.targets.image.numpy(), trainer.tokenizers.image.codebook.numpy())
    assert ckpt.read_meta(ckpt.latest_checkpoint(tmp_path / "run"))["family"] == "astromodal"

    out_file = tmp_path / "emb.parquet"
    code, _, err = run_cli(monkeypatch, capsys, "embed", "astromodal", "--checkpoint", str(tmp_path / "run"),
                           "--out", str(out_file), "--device", "cpu")
    assert code == 0, err
    table = pq.read_table(out_file)
    keys = TokenShards(shards).objects(["key"]).column("key").to_numpy()
    assert table.num_rows == len(keys)  # every object, each with the split it belongs to in the run
    assert table.column("split").to_pylist().count("validation") == holdout_mask(keys, 0.2, 0).sum() > 0
    code, _, err = run_cli(monkeypatch, capsys, "embed", "astromodal", "--checkpoint", str(tmp_path / "run"),
                           "--out", str(out_file), "--device", "cpu", "--split", "validation",
                           "--set", "data.val_fraction=0.5")  # --set reaches the run's split
    assert code == 0, err
    assert pq.read_table(out_file).num_rows == holdout_mask(keys, 0.5, 0).sum() > holdout_mask(keys, 0.2, 0).sum()
    vectors = np.stack(table.column("embedding_joint").to_numpy(zero_copy_only=False))
    assert vectors.shape == (table.num_rows, 64) and np.isfinite(vectors).all()
    assert set(table.column_names) >= {"object_id", "field", "truth_redshift"}
    # hypercube fields given directly are tokenised with the run's tokenisers first
    code, _, err = run_cli(monkeypatch, capsys, "embed", "astromodal", "--checkpoint", str(tmp_path / "run"),
                           "--data", str(data), "--out", str(tmp_path / "all.parquet"), "--device", "cpu", "--random-init")
    assert code == 0, err
    assert pq.read_table(tmp_path / "all.parquet").num_rows == len(TokenShards(shards))


def test_demo_recipe_resolves(monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "config", "show", "astromodal", "--demo")
    assert code == 0, err
    shown = yaml.safe_load(out)
    assert shown["data"]["path"] is None and shown["data"]["synthetic"] > 0
    assert shown["train"]["device"] == "cpu" and shown["train"]["cpu_threads"] == 1
    assert shown["model"]["preset"] == "tiny" and shown["loss"]["image_weight"] == 0.1


def resume_config(out, shared, max_steps: int) -> AstromodalConfig:
    cfg = AstromodalConfig()
    cfg.data.synthetic = 120
    cfg.data.tokenizers, cfg.data.tokens, cfg.data.val_fraction = str(shared / "tok"), str(shared / "tokens"), 0.2
    for option in TINY_TOKENIZERS:
        key, value = option.split("=")
        setattr(cfg.tokenizer, key, type(getattr(cfg.tokenizer, key))(value))
    cfg.loss.positions = 8  # fewer than the positions of a batch: sampling draws random numbers
    cfg.model.preset, cfg.model.d_model, cfg.model.d_ff, cfg.model.max_len, cfg.model.dropout = "tiny", 32, 64, 256, 0.1
    train = cfg.train
    train.out, train.device, train.num_workers, train.progress = str(out), "cpu", 0, False
    train.batch_size, train.max_steps, train.eval_every, train.log_every = 8, max_steps, 1000, 1
    train.schedule.decay_steps = 6
    return cfg


def test_exact_resume_with_sampled_reconstruction_positions(tmp_path):
    shared = tmp_path / "shared"
    AstromodalTrainer(resume_config(tmp_path / "straight", shared, 6)).fit()
    AstromodalTrainer(resume_config(tmp_path / "resumed", shared, 3)).fit()
    result = AstromodalTrainer(resume_config(tmp_path / "resumed", shared, 6)).fit(resume=True)
    assert result.step == 6
    a = ckpt.read_safetensors(ckpt.latest_checkpoint(tmp_path / "straight") / ckpt.MODEL_FILE)
    b = ckpt.read_safetensors(ckpt.latest_checkpoint(tmp_path / "resumed") / ckpt.MODEL_FILE)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_objects_without_image_spectra_or_bands_train_and_embed(tmp_path, monkeypatch, capsys):
    """More missing than the survey's own gaps: half the cutouts and DESI spectra gone, a fifth of
    the band magnitudes null; such objects still train (a MISS token, an empty block) and embed."""
    data, tok, shards = tmp_path / "data", tmp_path / "tok", tmp_path / "tokens"
    code, _, err = run_cli(monkeypatch, capsys, "data", "synth", "splus", "--out", str(data), "-n", "150",
                           "--missing", "image=0.5,desi=0.5,photometry=0.2")
    assert code == 0, err
    sets = [arg for s in TINY_TOKENIZERS for arg in ("--set", s)]
    code, _, err = run_cli(monkeypatch, capsys, "tokenize", "fit", "all", "--data", str(data), "--out", str(tok), *sets)
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, "tokenize", "encode", "--data", str(data), "--tokenizers", str(tok),
                           "--out", str(shards))
    assert code == 0, err
    scalars = np.fromfile(shards / "scalar.bin", dtype=np.int16).reshape(len(TokenShards(shards)), -1)
    assert (scalars[:, :12] == -1).mean() > 0.1  # missing band magnitudes reach the tokens as missing
    cfg = AstromodalConfig()
    cfg.data.tokenizers, cfg.data.tokens, cfg.data.val_fraction = str(tok), str(shards), 0.2
    cfg.model.preset, cfg.model.d_model, cfg.model.d_ff, cfg.model.max_len = "tiny", 32, 64, 256
    cfg.train.out, cfg.train.device, cfg.train.num_workers, cfg.train.progress = str(tmp_path / "run"), "cpu", 0, False
    cfg.train.batch_size, cfg.train.max_steps, cfg.train.eval_every, cfg.train.log_every = 16, 4, 4, 2
    assert AstromodalTrainer(cfg).fit().status == "completed"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["train/loss"]) for r in records if "train/loss" in r)
    out_file = tmp_path / "emb.parquet"
    code, _, err = run_cli(monkeypatch, capsys, "embed", "astromodal", "--checkpoint", str(tmp_path / "run"),
                           "--out", str(out_file), "--device", "cpu")
    assert code == 0, err
    table = pq.read_table(out_file)
    vectors = np.stack(table.column("embedding_joint").to_numpy(zero_copy_only=False))
    assert table.num_rows == len(TokenShards(shards)) and np.isfinite(vectors).all()
