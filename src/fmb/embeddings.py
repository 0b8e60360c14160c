"""The one embedding-file schema every `fmb embed <model>` writes: its resumable writer and its reader.

Columns: `object_id` (int64, or string for surveys with string ids), the targets the data has (redshift, label, ...), and one
`embedding_<name>` column per modality (plus `embedding_joint` where a family has several):
fixed-size lists of float32, null where that modality is absent for the object.

Rows are appended to shards under `<out>.parts/` as they are computed; an interrupted run
started again skips the rows already written. `finish` joins the shards into `<out>`.
`load_embeddings` reads a file back (embeddings as NaN-padded matrices) and `align` restricts
several files to the objects they share.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

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


class EmbeddingWriter:
    def __init__(self, out: Path, shard_rows: int = 20_000) -> None:
        self.out = Path(out)
        self.parts = self.out.with_name(self.out.name + ".parts")
        self.shard_rows = shard_rows
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        shards = sorted(self.parts.glob("part-*.parquet")) if self.parts.is_dir() else []
        self.shard_count = len(shards)
        self.rows_done = sum(pq.ParquetFile(s).metadata.num_rows for s in shards)
        # New rows must fit the shards already written (same checkpoint, same embedding widths).
        self.resumed_from = (shards[-1], pq.read_schema(shards[-1])) if shards else None
        if self.rows_done:
            log.info(f"{self.parts}: {self.rows_done} rows already embedded; continuing after them")

    def add(self, object_id: np.ndarray, targets: dict[str, np.ndarray | list], embeddings: dict[str, torch.Tensor | np.ndarray],
            present: dict[str, np.ndarray | torch.Tensor] | None = None) -> None:
        ids = np.asarray(object_id)
        # integer ids stay int64; surveys with string ids (S-PLUS) keep strings
        columns: dict[str, pa.Array] = {"object_id": pa.array(ids.astype(np.int64) if ids.dtype.kind in "iu" else ids.tolist())}
        for name, values in targets.items():
            columns[name] = pa.array(values.tolist() if isinstance(values, np.ndarray) else values)
        for name, matrix in embeddings.items():
            matrix = matrix.detach().float().cpu().numpy() if isinstance(matrix, torch.Tensor) else np.asarray(matrix, np.float32)
            mask = None
            if present is not None and name in present:
                keep = present[name].cpu().numpy() if isinstance(present[name], torch.Tensor) else np.asarray(present[name])
                mask = pa.array(~keep.astype(bool))
            flat = pa.array(matrix.astype(np.float32).reshape(-1))
            columns[f"{EMBEDDING_PREFIX}{name}"] = pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1], mask=mask)
        table = pa.table(columns)
        if self.resumed_from is not None:
            self._check_fits(table.schema)
        self.buffer.append(table)
        self.buffered += table.num_rows
        if self.buffered >= self.shard_rows:
            self._flush()

    def _check_fits(self, schema: pa.Schema) -> None:
        shard, written = self.resumed_from
        for field in written:
            if schema.get_field_index(field.name) < 0 or schema.field(field.name).type != field.type:
                now = schema.field(field.name).type if schema.get_field_index(field.name) >= 0 else "absent"
                raise DataError(f"{shard}: column {field.name} is {field.type} there but {now} in this run; "
                                f"the earlier shards come from another model or version: delete {self.parts} "
                                "to embed from the start")
        self.resumed_from = None  # checked once

    def _flush(self) -> None:
        if not self.buffer:
            return
        self.parts.mkdir(parents=True, exist_ok=True)
        shard = self.parts / f"part-{self.shard_count:05d}.parquet"
        tmp = shard.with_suffix(".tmp")
        pq.write_table(pa.concat_tables(self.buffer), tmp)
        os.replace(tmp, shard)
        self.shard_count += 1
        self.rows_done += self.buffered
        self.buffer, self.buffered = [], 0

    def finish(self) -> Path:
        self._flush()
        shards = sorted(self.parts.glob("part-*.parquet"))
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tables = [pq.read_table(s) for s in shards]
        pq.write_table(pa.concat_tables(tables) if tables else pa.table({"object_id": pa.array([], pa.int64())}), tmp)
        os.replace(tmp, self.out)
        shutil.rmtree(self.parts, ignore_errors=True)
        return self.out


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
        embeddings[modality] = _matrix(table.column(name), path, name)
    targets = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names
               if c != "object_id" and not c.startswith(EMBEDDING_PREFIX)}
    return EmbeddingFile(path.stem, path, ids, embeddings, targets)


def _matrix(column: pa.ChunkedArray, path: Path, name: str) -> np.ndarray:
    """(rows, width) float32 from a list column, NaN rows where the value is null (vectorised)."""
    array = column.combine_chunks()
    valid = ~array.is_null().to_numpy(zero_copy_only=False)
    if not valid.any():
        raise DataError(f"{path}: column {name} is empty (all null)")
    present = array.filter(pa.array(valid))
    lengths = np.unique(present.value_lengths().to_numpy(zero_copy_only=False))
    if len(lengths) != 1:
        raise DataError(f"{path}: column {name} has rows of different lengths ({lengths[:5].tolist()})")
    width = int(lengths[0])
    out = np.full((len(array), width), np.nan, dtype=np.float32)
    out[valid] = present.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, width)
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
    return [f.take(_rows_of(f.ids, common)) for f in files]


def _rows_of(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    order = np.argsort(ids)
    return order[np.searchsorted(ids, wanted, sorter=order)]
