"""The one embedding-file schema every `fmb embed <model>` writes: its resumable writer and its reader.

Columns: `object_id` (int64, or string for surveys with string ids), the targets the data has (redshift, label,
text truth such as `truth_anomaly`, null for normal objects, ...), and one `embedding_<name>` column per
modality (plus `embedding_joint` where a family has several): fixed-size lists of float32, null where that modality is absent for the object.

`embedding_table` makes rows in that schema; `EmbeddingParts` keeps one parquet part per finished
chunk of rows under `<out>.parts/` (so an interrupted `fmb embed` continues) and joins them into
`<out>` (fmb.train.embed runs both).
`load_embeddings` reads a file back (embeddings as NaN-padded matrices) and `align` restricts
several files to the objects they share.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from fmb.errors import DataError

log = logging.getLogger("fmb")

EMBEDDING_PREFIX = "embedding_"
# The modality vocabulary of embedding columns (`embedding_<name>`), the same for every family.
MODALITIES = ("image", "spectrum", "photometry", "metadata", "joint")
# Names written before the vocabulary was fixed (AstroPT: images/spectra; AstroM3: spectra).
OLD_NAMES = {"images": "image", "spectra": "spectrum"}


def joint_embedding(vectors: dict[str, torch.Tensor], present: dict[str, torch.Tensor]) -> torch.Tensor:
    """normalize(sum of the L2-normalised modality embeddings an object has)."""
    total = sum(F.normalize(v.float(), dim=-1) * present[k][:, None].to(v.device) for k, v in vectors.items())
    return F.normalize(total, dim=-1)


def host_array(value: Any) -> Any:
    """A column as a host NumPy array (half-precision tensors as float32: NumPy has no bfloat16);
    anything but a tensor (lists of strings, arrays) as it is."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return (value.float() if value.dtype in (torch.float16, torch.bfloat16) else value).numpy()
    return value


def embedding_table(object_id: Any, targets: dict[str, Any], embeddings: dict[str, torch.Tensor | np.ndarray],
                    present: dict[str, Any] | None = None) -> pa.Table:
    """Rows in the schema: object_id, target columns, `embedding_<name>` fixed-size float32 lists
    (null where `present` is False)."""
    ids = np.asarray(host_array(object_id))
    # integer ids stay int64; surveys with string ids (S-PLUS) keep strings
    columns: dict[str, pa.Array] = {"object_id": pa.array(ids.astype(np.int64) if ids.dtype.kind in "iu" else ids.tolist())}
    for name, values in targets.items():
        values = host_array(values)
        if isinstance(values, list) and values and all(isinstance(v, str) for v in values):
            columns[name] = pa.array([v or None for v in values], pa.string())  # text crosses the loader with "" for null
        else:
            columns[name] = pa.array(values.tolist() if isinstance(values, np.ndarray) else values)
    for name, matrix in embeddings.items():
        matrix = np.asarray(host_array(matrix), np.float32)
        mask = None
        if present and name in present:
            keep = np.asarray(host_array(present[name]))
            mask = pa.array(~keep.astype(bool))
        flat = pa.array(matrix.reshape(-1))
        columns[f"{EMBEDDING_PREFIX}{name}"] = pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1], mask=mask)
    return pa.table(columns)


class EmbeddingParts:
    """`<out>.parts/part-NNNNNN.parquet`, one per finished chunk of rows, joined into `<out>` at the end."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.directory = self.out.with_name(self.out.name + ".parts")

    def _path(self, chunk: int) -> Path:
        return self.directory / f"part-{chunk:06d}.parquet"

    def done_chunks(self) -> set[int]:
        if not self.directory.is_dir():
            return set()
        return {int(p.stem.split("-")[1]) for p in self.directory.glob("part-*.parquet")}

    def write_chunk(self, chunk: int, tables: list[pa.Table], faults: dict[str, Any] | None = None) -> Path:
        """One chunk's rows, written under a temporary name and renamed: a part is whole or absent.
        Its columns must fit the parts already written (same checkpoint, same widths). `faults` (the
        chunk's data-fault record) is kept in the part's metadata, so a resumed export counts them all."""
        table = pa.concat_tables(tables, promote_options="permissive")
        if faults:
            table = table.replace_schema_metadata({b"fmb_faults": json.dumps(faults).encode()})
        written = sorted(self.directory.glob("part-*.parquet")) if self.directory.is_dir() else []
        if written:
            _check_fits(written[0], pq.read_schema(written[0]), table.schema, self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(chunk)
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
        return path

    def fault_records(self) -> list[dict[str, Any]]:
        """The data-fault records of every part written so far."""
        records = []
        for part in sorted(self.directory.glob("part-*.parquet")) if self.directory.is_dir() else []:
            meta = pq.read_schema(part).metadata or {}
            if b"fmb_faults" in meta:
                records.append(json.loads(meta[b"fmb_faults"]))
        return records

    def finish(self, chunks: int, out: Path | None = None) -> Path:
        """Join parts 0..chunks-1, in order and one at a time (memory stays flat), into `out`."""
        out = Path(out or self.out)
        missing = [c for c in range(chunks) if not self._path(c).is_file()]
        if missing:
            raise DataError(f"{self.directory}: chunks {missing[:8]} were not embedded; run the command again")
        files = [self._path(c) for c in range(chunks)]
        schema = pa.unify_schemas([pq.read_schema(f) for f in files], promote_options="permissive")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        schema = schema.remove_metadata()
        with pq.ParquetWriter(tmp, schema) as writer:
            # without pre-buffering, which added 8-23 MiB to the peak of `fmb embed` at 16 parts
            for file in files:
                with pq.ParquetFile(file, pre_buffer=False) as part:
                    writer.write_table(part.read(use_threads=False).cast(schema))
        os.replace(tmp, out)
        shutil.rmtree(self.directory, ignore_errors=True)
        return out


def _check_fits(shard: Path, written: pa.Schema, schema: pa.Schema, parts: Path) -> None:
    for field in written:
        if pa.types.is_null(field.type):
            continue  # a column that was all null in that chunk takes any type
        now = schema.field(field.name).type if schema.get_field_index(field.name) >= 0 else None
        if now is None or (now != field.type and not pa.types.is_null(now)):
            raise DataError(f"{shard}: column {field.name} is {field.type} there but {now or 'absent'} in this run; "
                            f"the earlier parts come from another model or version: delete {parts} "
                            "to embed from the start")


# ----------------------------------------------------------------------------- reading


@dataclass
class EmbeddingFile:
    name: str
    path: Path
    ids: np.ndarray
    embeddings: dict[str, np.ndarray]  # column -> (n, d) float32, NaN rows where absent
    targets: dict[str, np.ndarray]

    def take(self, rows: np.ndarray) -> EmbeddingFile:
        return EmbeddingFile(self.name, self.path, self.ids[rows], {k: v[rows] for k, v in self.embeddings.items()},
                             {k: v[rows] for k, v in self.targets.items()})


def load_embeddings(path: str | Path) -> EmbeddingFile:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"embedding file not found: {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if "object_id" not in table.column_names:
        raise DataError(f"{path}: no 'object_id' column; it has {', '.join(table.column_names)}")
    names = [c for c in table.column_names if c.startswith(EMBEDDING_PREFIX)]
    if not names:
        raise DataError(f"{path}: no '{EMBEDDING_PREFIX}*' columns; it has {', '.join(table.column_names)}")
    if table.num_rows == 0:
        raise DataError(f"{path}: no rows")
    ids = table.column("object_id").to_numpy()
    if len(np.unique(ids)) != len(ids):
        raise DataError(f"{path}: object_id values are not unique")
    embeddings = {}
    for name in names:
        modality = name[len(EMBEDDING_PREFIX):]
        if modality in OLD_NAMES and f"{EMBEDDING_PREFIX}{OLD_NAMES[modality]}" not in names:
            log.info(f"{path}: column {name} read as {EMBEDDING_PREFIX}{OLD_NAMES[modality]} (the name before the "
                     "modality vocabulary was fixed)")
            modality = OLD_NAMES[modality]
        column = table.column(name)
        if column.null_count == len(column):  # no object has that modality: normal, not an error
            log.warning(f"{path}: column {name} is null for every object; left out")
            continue
        embeddings[modality] = _matrix(column, path, name)
    if not embeddings:
        raise DataError(f"{path}: every embedding column is null for every object ({', '.join(names)})")
    targets = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names
               if c != "object_id" and not c.startswith(EMBEDDING_PREFIX)}
    return EmbeddingFile(path.stem, path, ids, embeddings, targets)


def _matrix(column: pa.ChunkedArray, path: Path, name: str) -> np.ndarray:
    """(rows, width) float32 from a list column, NaN rows where the value is null (vectorised)."""
    array = column.combine_chunks()
    valid = ~array.is_null().to_numpy(zero_copy_only=False)
    present = array if valid.all() else array.filter(pa.array(valid))  # filtering copies the whole column
    lengths = np.unique(present.value_lengths().to_numpy(zero_copy_only=False))
    if len(lengths) != 1:
        raise DataError(f"{path}: column {name} has rows of different lengths ({lengths[:5].tolist()})")
    width = int(lengths[0])
    out = np.full((len(array), width), np.nan, dtype=np.float32)
    out[valid] = present.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, width)
    return out


def align(files: list[EmbeddingFile]) -> list[EmbeddingFile]:
    """Restrict every file to the objects all of them share, in one order; report the overlap."""
    common = files[0].ids
    for f in files[1:]:
        common = np.intersect1d(common, f.ids)
    if len(common) == 0:
        raise DataError("the embedding files share no object_id: " + ", ".join(str(f.path) for f in files))
    for f in files:
        if len(common) < len(f.ids):
            log.info(f"{f.path}: {len(common)} of {len(f.ids)} objects are in every file; evaluating those")
    common = np.sort(common)
    # a file already in that order is kept as it is: no copy of its embeddings
    return [f if len(f.ids) == len(common) and (f.ids == common).all() else f.take(_rows_of(f.ids, common))
            for f in files]


def _rows_of(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    order = np.argsort(ids)
    return order[np.searchsorted(ids, wanted, sorter=order)]
