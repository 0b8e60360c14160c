"""Incomplete Euclid + DESI data for the families reading it: columns nulled post hoc, and the check
that embeddings are null exactly where the data lacks a modality."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from fmb.data.synth import euclid_desi, null_rows


def write_incomplete(data: Path, n: int, image_size: int, image_columns: list[str], seed: int = 6) -> None:
    """Synthetic Euclid + DESI rows under `data`; in each file every third object has no image (all of
    `image_columns` null) and every second no spectrum (so every sixth has neither)."""
    euclid_desi.write(data, n, seed=seed, image_size=image_size)
    for file in sorted((data / "data").glob("*.parquet")):
        table = pq.read_table(file)
        rows = np.arange(table.num_rows)
        pq.write_table(null_rows(null_rows(table, image_columns, rows % 3 == 0), ["spectrum"], rows % 2 == 0), file)


def assert_nulls_follow_the_data(embeddings: Path, data: Path, image_column: str, split: str = "test") -> None:
    """`embedding_image` / `embedding_spectrum` null where the object lacks that modality, `embedding_joint`
    only where it lacks both."""
    table = pq.read_table(embeddings)
    source = pq.read_table(data / "data" / f"{split}-00000-of-00001.parquet", columns=["object_id", image_column, "spectrum"])
    ids = source.column("object_id").to_pylist()
    order = [ids.index(i) for i in table.column("object_id").to_pylist()]
    no_image = np.asarray(source.column(image_column).is_null())[order]
    no_spectrum = np.asarray(source.column("spectrum").is_null())[order]
    assert no_image.any() and no_spectrum.any()
    assert np.array_equal(np.asarray(table.column("embedding_image").is_null()), no_image)
    assert np.array_equal(np.asarray(table.column("embedding_spectrum").is_null()), no_spectrum)
    assert np.array_equal(np.asarray(table.column("embedding_joint").is_null()), no_image & no_spectrum)


def retrain_and_embed(monkeypatch, capsys, family: str, tmp_path: Path, retrain: list[str], embed: list[str]) -> Path:
    """`fmb retrain <family> --demo RETRAIN` (every training loss finite), then `fmb embed <family> EMBED`
    of the test split; the embedding file."""
    import json
    import math

    from tests.cli_runner import run_cli

    run, out = tmp_path / "run", tmp_path / "emb.parquet"
    code, _, err = run_cli(monkeypatch, capsys, "retrain", family, "--demo", "--out", str(run), "--no-progress", *retrain)
    assert code == 0, err
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["train/loss"]) for r in records if "train/loss" in r)
    code, _, err = run_cli(monkeypatch, capsys, "embed", family, "--checkpoint", str(run), "--out", str(out),
                           "--split", "test", *embed)
    assert code == 0, err
    return out
