"""The shared embedding schema writer: nulls for absent modalities, resumable shards."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fmb.embeddings import EmbeddingWriter, joint_embedding
from fmb.errors import DataError


def test_writer_resumes_after_an_interruption(tmp_path):
    out = tmp_path / "emb.parquet"
    vectors = torch.randn(10, 4)
    present = torch.tensor([True] * 9 + [False])
    first = EmbeddingWriter(out, shard_rows=3)
    for start in range(0, 6, 3):  # two shards written, then the run "dies"
        rows = slice(start, start + 3)
        first.add(np.arange(10)[rows], {"redshift": np.linspace(0, 1, 10)[rows]}, {"images": vectors[rows]},
                  {"images": present[rows]})
    assert not out.exists() and first.rows_done == 6

    second = EmbeddingWriter(out, shard_rows=3)
    assert second.rows_done == 6  # the restarted run skips these
    second.add(np.arange(6, 10), {"redshift": np.linspace(0, 1, 10)[6:]}, {"images": vectors[6:]}, {"images": present[6:]})
    table = pq.read_table(second.finish())
    assert table.column("object_id").to_pylist() == list(range(10))
    assert table.schema.field("embedding_images").type == pa.list_(pa.float32(), 4)
    assert table.column("embedding_images").null_count == 1
    np.testing.assert_allclose(np.array(table.column("embedding_images").to_pylist()[0]), vectors[0].numpy(), rtol=1e-6)
    assert not (tmp_path / "emb.parquet.parts").exists()


def test_resuming_with_another_embedding_width_names_the_shard_and_column(tmp_path):
    out = tmp_path / "emb.parquet"
    first = EmbeddingWriter(out, shard_rows=2)
    first.add(np.arange(2), {}, {"image": torch.randn(2, 5)})  # one shard written, then the run "dies"
    second = EmbeddingWriter(out, shard_rows=2)
    with pytest.raises(DataError, match=r"part-00000\.parquet: column embedding_image .*delete"):
        second.add(np.arange(2, 4), {}, {"image": torch.randn(2, 10)})  # e.g. a newer pooling
    third = EmbeddingWriter(out, shard_rows=2)
    third.add(np.arange(2, 4), {}, {"image": torch.randn(2, 5)})  # the same width continues
    assert pq.read_table(third.finish()).num_rows == 4


def test_joint_embedding_uses_the_modalities_present():
    a, b = torch.tensor([[3.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 2.0], [0.0, 5.0]])
    joint = joint_embedding({"a": a, "b": b}, {"a": torch.tensor([True, True]), "b": torch.tensor([True, False])})
    torch.testing.assert_close(joint, torch.tensor([[0.7071068, 0.7071068], [1.0, 0.0]]))


def test_files_written_before_the_modality_vocabulary_read_with_the_new_names(tmp_path):
    from fmb.embeddings import load_embeddings

    writer = EmbeddingWriter(tmp_path / "old.parquet")
    writer.add(np.arange(4), {"redshift": np.zeros(4)}, {"images": torch.randn(4, 3), "spectra": torch.randn(4, 3),
                                                         "joint": torch.randn(4, 3)})
    loaded = load_embeddings(writer.finish())
    assert sorted(loaded.embeddings) == ["image", "joint", "spectrum"]
