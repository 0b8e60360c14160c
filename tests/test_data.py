"""Readers for parquet, save_to_disk Arrow directories and HDF5; hold-out splits."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from torch.utils.data import DataLoader, Dataset

from fmb.data.hdf5 import HDF5Source
from fmb.data.splits import holdout_mask
from fmb.data.tables import TableSource, available_splits, column_names, rows_by_id
from fmb.errors import DataError


def make_table(n: int, start: int = 0) -> pa.Table:
    ids = np.arange(start, start + n, dtype=np.int64)
    spectra = [{"flux": list(np.full(5, i, np.float32)), "wavelength": list(np.arange(5.0)), "error": None}
               for i in ids]
    images = [np.full((3, 4), i, np.float32).tolist() for i in ids]
    return pa.table({
        "object_id": ids,
        "redshift": ids / 100.0,
        "spectrum": pa.array(spectra, type=pa.struct([("flux", pa.list_(pa.float32())), ("wavelength", pa.list_(pa.float64())),
                                                      ("error", pa.list_(pa.float32()))])),
        "VIS_image": pa.array(images, type=pa.list_(pa.list_(pa.float32()))),
        "RGB_image": pa.array([{"bytes": bytes([i % 256]), "path": None} for i in ids],
                              type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    })


def write_save_to_disk(root, splits: dict[str, pa.Table]) -> None:
    root.mkdir(parents=True)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
    for name, table in splits.items():
        folder = root / name
        folder.mkdir()
        files = []
        for k, start in enumerate(range(0, table.num_rows, 7)):
            filename = f"data-{k:05d}-of-00099.arrow"
            with pa.OSFile(str(folder / filename), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table.slice(start, 7))
            files.append({"filename": filename})
        (folder / "state.json").write_text(json.dumps({"_data_files": files, "_split": name}))
        (folder / "dataset_info.json").write_text("{}")


def test_parquet_shards_by_split_with_projection(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(make_table(10, 0), data / "train-00000-of-00002.parquet", row_group_size=4)
    pq.write_table(make_table(5, 10), data / "train-00001-of-00002.parquet", row_group_size=4)
    pq.write_table(make_table(3, 100), data / "test-00000-of-00001.parquet")
    assert available_splits(tmp_path) == ["test", "train"]
    source = TableSource(tmp_path, ["object_id", "spectrum", "VIS_image"], split="train")
    assert len(source) == 15
    row = source.row(12)
    assert row["object_id"] == 12 and "redshift" not in row
    np.testing.assert_array_equal(row["spectrum"]["flux"], np.full(5, 12, np.float32))
    assert row["spectrum"]["error"] is None
    assert row["VIS_image"].shape == (3, 4) and row["VIS_image"][0, 0] == 12
    assert TableSource(tmp_path, ["object_id"], split="test").row(2)["object_id"] == 102
    np.testing.assert_array_equal(source.column("object_id"), np.arange(15))
    with pytest.raises(DataError, match=r"no split 'validation' found.*available splits: test, train"):
        TableSource(tmp_path, ["object_id"], split="validation")


@pytest.mark.parametrize("layout", ["parquet", "save_to_disk"])
def test_struct_children_are_projected(tmp_path, layout):
    if layout == "parquet":
        pq.write_table(make_table(10), tmp_path / "t.parquet", row_group_size=4)
        root = tmp_path / "t.parquet"
    else:
        root = tmp_path / "ds"
        write_save_to_disk(root, {"train": make_table(10)})
    source = TableSource(root, ["object_id", "spectrum.flux", "spectrum.wavelength", "RGB_image.bytes", "spectrum.nope"],
                         split="train" if layout == "save_to_disk" else None)
    if layout == "parquet":  # what pyarrow decodes: only these leaves (the child the file lacks left out)
        assert source.read_columns == [["object_id", "spectrum.flux", "spectrum.wavelength", "RGB_image.bytes"]]
        assert source._chunk_table(0).schema.field("spectrum").type.names == ["flux", "wavelength"]
    row = source.row(5)
    assert set(row) == {"object_id", "spectrum", "RGB_image"}
    assert set(row["spectrum"]) == {"flux", "wavelength"} and set(row["RGB_image"]) == {"bytes"}
    np.testing.assert_array_equal(row["spectrum"]["flux"], np.full(5, 5, np.float32))
    whole = TableSource(root, ["spectrum", "spectrum.flux"], split="train" if layout == "save_to_disk" else None)
    assert set(whole.row(5)["spectrum"]) == {"flux", "wavelength", "error"}  # the whole struct wins


def test_row_values_of_nulls_ragged_and_nested_columns(tmp_path):
    table = pa.table({
        "cube": pa.array([[[1.0, 2.0], [3.0, 4.0]], [[1.0], [2.0, 3.0]], [[5.0], None], None], pa.list_(pa.list_(pa.float32()))),
        "meta": pa.array([{"n": 1, "inner": {"x": 2}}, {"n": None, "inner": None}, None, {"n": 4, "inner": {"x": None}}],
                         pa.struct([("n", pa.int64()), ("inner", pa.struct([("x", pa.int8())]))])),
        "tags": pa.array([["a"], [], None, ["b", None]], pa.list_(pa.string())),
    })
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=3)  # the last row in a second row group
    source = TableSource(tmp_path / "t.parquet", ["cube", "meta", "tags"])
    first, ragged, with_null, last = (source.row(i) for i in range(4))
    assert isinstance(first["cube"], np.ndarray) and first["cube"].dtype == np.float32  # rectangular: one 2-D array
    np.testing.assert_array_equal(first["cube"], [[1.0, 2.0], [3.0, 4.0]])
    assert isinstance(ragged["cube"], list) and isinstance(first["tags"], np.ndarray)
    assert first["meta"] == {"n": 1, "inner": {"x": 2}} and list(first["tags"]) == ["a"]
    assert [list(r) for r in ragged["cube"]] == [[1.0], [2.0, 3.0]]  # ragged: one array per row
    assert ragged["meta"] == {"n": None, "inner": None} and len(ragged["tags"]) == 0
    assert list(with_null["cube"][0]) == [5.0] and with_null["cube"][1] is None
    assert with_null["meta"] is None and with_null["tags"] is None
    assert last["cube"] is None and last["meta"] == {"n": 4, "inner": {"x": None}} and list(last["tags"]) == ["b", None]


def test_arrow_pages_are_released_and_parquet_is_not_mapped(tmp_path):
    from fmb.data import tables

    write_save_to_disk(tmp_path / "ds", {"train": make_table(20)})
    source = TableSource(tmp_path / "ds", ["object_id", "VIS_image"], split="train")
    for _ in range(tables.RELEASE_EVERY_ROWS // 20 + 1):  # past one release: rows still read right
        assert [source.row(i)["object_id"] for i in range(20)] == list(range(20))
    assert source.row(19)["VIS_image"][0, 0] == 19
    pq.write_table(make_table(10), tmp_path / "t.parquet", row_group_size=4)
    parquet = TableSource(tmp_path / "t.parquet", ["object_id"])
    assert parquet.row(9)["object_id"] == 9
    assert str(tmp_path / "t.parquet") not in Path("/proc/self/maps").read_text()


def test_save_to_disk_directory_is_memory_mapped(tmp_path):
    write_save_to_disk(tmp_path / "ds", {"train": make_table(20), "test": make_table(4, 50)})
    source = TableSource(tmp_path / "ds", ["object_id", "RGB_image", "redshift"], split="train")
    assert len(source) == 20 and len(source.files) == 3
    row = source.row(15)
    assert row["object_id"] == 15 and row["RGB_image"]["bytes"] == bytes([15]) and row["redshift"] == 0.15
    assert TableSource(tmp_path / "ds" / "test", ["object_id"]).row(0)["object_id"] == 50
    assert column_names(tmp_path / "ds")[:2] == ["object_id", "redshift"]  # a DatasetDict: its first split's
    with pytest.raises(DataError, match="split 'val' not found"):
        TableSource(tmp_path / "ds", ["object_id"], split="val")


@pytest.mark.parametrize("layout", ["parquet", "save_to_disk"])
def test_rows_by_id_searches_every_split_in_the_order_asked(tmp_path, layout):
    if layout == "parquet":
        (tmp_path / "data").mkdir()
        pq.write_table(make_table(10, 0), tmp_path / "data" / "train-00000-of-00001.parquet", row_group_size=4)
        pq.write_table(make_table(3, 100), tmp_path / "data" / "test-00000-of-00001.parquet")
        root = tmp_path
    else:
        root = tmp_path / "ds"
        write_save_to_disk(root, {"train": make_table(10), "test": make_table(3, 100)})
    rows = rows_by_id(root, [101, 7, 55, 0], ["redshift"])
    assert [r and r["object_id"] for r in rows] == [101, 7, None, 0]
    assert rows[1]["redshift"] == 0.07 and "spectrum" not in rows[1]


def test_missing_column_and_path_errors(tmp_path):
    pq.write_table(make_table(3), tmp_path / "one.parquet")
    with pytest.raises(DataError, match=r"one\.parquet: missing column\(s\) NISP_H_image; it has: object_id"):
        TableSource(tmp_path / "one.parquet", ["object_id", "NISP_H_image"])
    with pytest.raises(DataError, match="data path does not exist"):
        TableSource(tmp_path / "nowhere", ["object_id"])
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="cannot read .*junk.parquet"):
        TableSource(tmp_path / "junk.parquet", ["object_id"])


class _Rows(Dataset):
    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return self.source.row(i)["object_id"]


def test_sources_work_in_dataloader_workers(tmp_path):
    pq.write_table(make_table(12), tmp_path / "t.parquet", row_group_size=5)
    source = TableSource(tmp_path / "t.parquet", ["object_id"])
    source.row(0)  # open handles in the parent first
    pickle.dumps(source)
    loader = DataLoader(_Rows(source), batch_size=4, num_workers=2)
    assert sorted(int(x) for batch in loader for x in batch) == list(range(12))


def test_hdf5_groups_fraction_and_missing_field(tmp_path):
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        for g, n in (("0", 10), ("1", 5)):
            grp = f.create_group(g)
            grp["targetid"] = np.arange(n) + 100 * int(g)
            grp["spectrum"] = np.random.rand(n, 7, 1).astype(np.float32)
    train = HDF5Source(path, ["targetid", "spectrum"], fraction=(0.0, 0.8))
    test = HDF5Source(path, ["targetid"], fraction=(0.8, 1.0))
    assert len(train) == 8 + 4 and len(test) == 2 + 1
    assert train.row(9)["targetid"] == 101 and train.row(0)["spectrum"].shape == (7, 1)
    assert [int(test.row(i)["targetid"]) for i in range(3)] == [8, 9, 104]
    with pytest.raises(DataError, match=r"group '0' has no field\(s\) image"):
        HDF5Source(path, ["image"])
    with pytest.raises(DataError, match="does not exist"):
        HDF5Source(tmp_path / "none.h5", ["image"])


def test_holdout_is_stable_and_close_to_fraction():
    ids = np.arange(20000, dtype=np.int64) * 7919
    mask = holdout_mask(ids, 0.1)
    assert abs(mask.mean() - 0.1) < 0.01
    np.testing.assert_array_equal(holdout_mask(ids[::-1], 0.1), mask[::-1])  # order-independent
    assert not holdout_mask(ids, 0.0).any()


def test_block_shuffle_reads_each_row_group_in_one_window(tmp_path):
    from fmb.data.surveys.euclid_desi import open_split
    from fmb.train.loader import ResumableSampler

    pq.write_table(make_table(100), tmp_path / "train-00000-of-00001.parquet", row_group_size=10)
    rows = open_split(str(tmp_path), "train", ["object_id"], None, 0.0, 0)

    class Rows:
        def __len__(self):
            return len(rows)

        def shuffle_blocks(self):
            return rows.shuffle_blocks()

    blocks = rows.shuffle_blocks()
    assert len(blocks) == 10 and all(len(b) == 10 for b in blocks)
    sampler = ResumableSampler(Rows(), num_replicas=1, rank=0, seed=1, block_window=2)
    sampler.set_epoch(0)
    order = list(sampler)
    assert sorted(order) == list(range(100))
    groups = rows.source.chunk_of(rows.indices[order])
    for first in range(0, 100, 20):  # every 20 consecutive samples come from 2 row groups
        assert len(set(groups[first : first + 20])) == 2
    sampler.set_epoch(1)
    assert list(sampler) != order
    sampler.set_epoch(0)
    sampler.set_start(7)
    assert list(sampler) == order[7:]


def test_the_shared_row_group_cache_keeps_the_largest_limit_any_source_asked_for():
    from fmb.data.tables import _RowGroupCache

    cache, reads = _RowGroupCache(), []
    for group in range(4):  # a training source keeps 4 row groups
        cache.get(("f", group), lambda g=group: reads.append(g) or g, limit=4)
    cache.get(("g", 0), lambda: reads.append("g") or "g", limit=1)  # a source asking for 1 does not shrink it
    for group in range(1, 4):
        cache.get(("f", group), lambda g=group: reads.append(g) or g, limit=4)
    assert reads == [0, 1, 2, 3, "g"]
