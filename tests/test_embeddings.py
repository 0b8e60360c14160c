"""The shared embedding schema: nulls for absent modalities, resumable parts joined in order."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fmb.embeddings import EmbeddingParts, embedding_table, joint_embedding, load_embeddings
from fmb.errors import DataError
from fmb.train.embed import ChunkRows


def test_parts_join_in_chunk_order_with_nulls_for_absent_modalities(tmp_path):
    out = tmp_path / "emb.parquet"
    vectors = torch.randn(10, 4)
    present = torch.tensor([True] * 9 + [False])
    parts = EmbeddingParts(out)
    for chunk, rows in ((1, slice(5, 10)), (0, slice(0, 5))):  # written out of order (two ranks)
        parts.write_chunk(chunk, [embedding_table(np.arange(10)[rows], {"redshift": np.linspace(0, 1, 10)[rows]},
                                                  {"image": vectors[rows]}, {"image": present[rows]})])
    assert parts.done_chunks() == {0, 1} and not out.exists()
    with pytest.raises(DataError, match=r"chunks \[2\] were not embedded"):
        parts.finish(3)
    table = pq.read_table(parts.finish(2))
    assert table.column("object_id").to_pylist() == list(range(10))
    assert table.schema.field("embedding_image").type == pa.list_(pa.float32(), 4)
    assert table.column("embedding_image").null_count == 1
    np.testing.assert_allclose(np.array(table.column("embedding_image").to_pylist()[0]), vectors[0].numpy(), rtol=1e-6)
    assert not parts.directory.exists()


def test_a_column_null_in_one_chunk_takes_the_type_of_the_others(tmp_path):
    parts = EmbeddingParts(tmp_path / "emb.parquet")
    parts.write_chunk(0, [embedding_table(np.arange(2), {"truth_anomaly": [None, None]}, {"joint": torch.randn(2, 3)})])
    parts.write_chunk(1, [embedding_table(np.arange(2, 4), {"truth_anomaly": ["streak", None]}, {"joint": torch.randn(2, 3)})])
    table = pq.read_table(parts.finish(2))
    assert table.schema.field("truth_anomaly").type == pa.string()
    assert table.column("truth_anomaly").to_pylist() == [None, None, "streak", None]


def test_resuming_with_another_embedding_width_names_the_part_and_column(tmp_path):
    parts = EmbeddingParts(tmp_path / "emb.parquet")
    parts.write_chunk(0, [embedding_table(np.arange(2), {}, {"image": torch.randn(2, 5)})])  # then the run "dies"
    with pytest.raises(DataError, match=r"part-000000\.parquet: column embedding_image .*delete"):
        parts.write_chunk(1, [embedding_table(np.arange(2, 4), {}, {"image": torch.randn(2, 10)})])  # a newer pooling
    parts.write_chunk(1, [embedding_table(np.arange(2, 4), {}, {"image": torch.randn(2, 5)})])  # the same width continues
    assert pq.read_table(parts.finish(2)).num_rows == 4


def test_a_chunk_gathers_its_batches_into_arrays_allocated_once():
    """`fmb embed` keeps nothing per batch across a chunk (docs/benchmarks.md, memory): the rows land in
    arrays made at the chunk's first batch, and the chunk's table equals one built from all rows."""
    ids, redshift, vectors = torch.arange(5), torch.linspace(0, 1, 5, dtype=torch.float64), torch.randn(5, 3)
    present, text = torch.tensor([True, False, True, True, False]), ["", "streak", "", "", "glint"]
    gathered = ChunkRows(5, chunk=0)
    for rows in (slice(0, 3), slice(3, 5)):
        gathered.add(len(ids[rows]), ids[rows], {"redshift": redshift[rows], "truth_anomaly": text[rows]},
                     {"joint": vectors[rows].to(torch.bfloat16)}, {"joint": present[rows]})
        if rows.start == 0:
            first = {key: values for key, values in gathered.columns.items() if isinstance(values, np.ndarray)}
    assert all(gathered.columns[key] is values for key, values in first.items())
    expected = embedding_table(ids, {"redshift": redshift, "truth_anomaly": text},
                               {"joint": vectors.to(torch.bfloat16).float()}, {"joint": present})
    assert gathered.table().equals(expected)


def test_a_chunk_with_a_column_some_batches_lacked_is_refused():
    """A column missing from one batch would leave rows of the chunk's array uninitialised: the chunk is
    not written, and the error names the column and how many of its rows were given."""
    gathered = ChunkRows(4, chunk=3)
    gathered.add(2, torch.arange(2), {"redshift": torch.zeros(2)}, {"joint": torch.randn(2, 3)}, {})
    gathered.add(2, torch.arange(2, 4), {}, {"joint": torch.randn(2, 3)}, {})
    with pytest.raises(DataError, match=r"embedding chunk 3 \(4 rows\): targets column 'redshift' was given for 2 rows"):
        gathered.table()
    with pytest.raises(DataError, match="embedding chunk 3: a batch of 2 rows gave 1 values for vectors column 'joint'"):
        ChunkRows(4, chunk=3).add(2, torch.arange(2), {}, {"joint": torch.randn(1, 3)}, {})


def test_joint_embedding_uses_the_modalities_present():
    a, b = torch.tensor([[3.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 2.0], [0.0, 5.0]])
    joint = joint_embedding({"a": a, "b": b}, {"a": torch.tensor([True, True]), "b": torch.tensor([True, False])})
    torch.testing.assert_close(joint, torch.tensor([[0.7071068, 0.7071068], [1.0, 0.0]]))


def test_files_written_before_the_modality_vocabulary_read_with_the_new_names(tmp_path):
    table = embedding_table(np.arange(4), {"redshift": np.zeros(4)},
                            {"images": torch.randn(4, 3), "spectra": torch.randn(4, 3), "joint": torch.randn(4, 3)})
    pq.write_table(table, tmp_path / "old.parquet")
    loaded = load_embeddings(tmp_path / "old.parquet")
    assert sorted(loaded.embeddings) == ["image", "joint", "spectrum"]
