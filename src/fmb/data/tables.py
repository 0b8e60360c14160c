"""Row access to parquet files/directories and HuggingFace `save_to_disk` Arrow directories.

pyarrow only (no `datasets` package). Only the requested columns are read, and a column named
`parent.child` reads only that field of a struct (e.g. `spectrum.flux`). Memory stays flat at any
dataset size: parquet row groups are read with plain file reads (no memory map: every mapped page
a process touched counts in its resident memory, so a pass over a mapped dataset grows it by the
dataset's size) and a few decoded ones are kept; Arrow files are memory-mapped (zero copy) and the
pages touched are handed back to the kernel every `RELEASE_EVERY_ROWS` rows.
Handles are opened lazily in each process, so a source can be handed to DataLoader workers.

Layouts understood for `split`:
- a `.parquet` or `.arrow` file (the split name is not used);
- `save_to_disk` DatasetDict: `<dir>/dataset_dict.json` and `<dir>/<split>/state.json`;
- `save_to_disk` Dataset: `<dir>/state.json` (a single split);
- parquet shards: `<dir>/<split>/*.parquet`, `<dir>/data/<split>-*.parquet` or `<dir>/<split>-*.parquet`.
"""

from __future__ import annotations

import bisect
import json
import mmap
import os
import re
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fmb.errors import DataError

_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}")
# Rows read from memory-mapped Arrow files between two releases of the pages touched. A row touches
# far more of the map than its own bytes (the kernel reads and maps around each page fault: about
# 2-3 MB per Euclid + DESI row measured), so this bounds the mapped pages of a process to ~20 MB;
# releasing costs nothing measurable (the pages are read back from the page cache).
RELEASE_EVERY_ROWS = 8


def available_splits(root: Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        return []
    if (root / "dataset_dict.json").is_file():
        return json.loads((root / "dataset_dict.json").read_text()).get("splits", [])
    names = {p.name for p in root.iterdir() if p.is_dir() and p.name != "data"
             and (any(p.glob("*.parquet")) or (p / "state.json").is_file())}
    for folder in (root, root / "data"):
        for file in folder.glob("*.parquet"):
            match = _SHARD.match(file.name)
            names.add(match.group("split") if match else file.stem.split("-")[0])
    return sorted(names)


def resolve_files(path: str | Path, split: str | None) -> list[Path]:
    """The data files of one split, in order."""
    root = Path(path)
    if not root.exists():
        raise DataError(f"data path does not exist: {root}")
    if root.is_file():
        return [root]
    if (root / "dataset_dict.json").is_file():
        if split is None:
            raise DataError(f"{root} holds several splits ({', '.join(available_splits(root))}); name one")
        root = root / split
        if not root.is_dir():
            raise DataError(f"split '{split}' not found in {root.parent}; available: {', '.join(available_splits(root.parent))}")
    if (root / "state.json").is_file():
        state = json.loads((root / "state.json").read_text())
        files = [root / entry["filename"] for entry in state.get("_data_files", [])]
        missing = [str(f) for f in files if not f.is_file()]
        if missing or not files:
            raise DataError(f"{root / 'state.json'} lists data files that are missing: {missing or 'none listed'}")
        return files
    if split is None:
        files = sorted(root.rglob("*.parquet"))
    else:
        files = sorted((root / split).glob("*.parquet"))
        for folder in (root / "data", root):
            files = files or sorted(f for f in folder.glob(f"{split}-*.parquet") if _split_of(f) == split)
            files = files or sorted(folder.glob(f"{split}.parquet"))
    if not files:
        splits = available_splits(root)
        what = f"split '{split}'" if split else "parquet files"
        raise DataError(f"no {what} found in {root}" + (f"; available splits: {', '.join(splits)}" if splits else ""))
    return files


def data_schema(path: str | Path, split: str | None = None) -> pa.Schema:
    """The schema of a dataset (its first file's; of a `save_to_disk` DatasetDict without `split`, its
    first split's), without reading any rows."""
    if split is None and (Path(path) / "dataset_dict.json").is_file():
        split = next(iter(available_splits(Path(path))), None)
    return _inspect(resolve_files(path, split)[0])[0]


def column_names(path: str | Path, split: str | None = None) -> list[str]:
    """The columns of a dataset (from `data_schema`), without reading any rows."""
    return data_schema(path, split).names


def _split_of(file: Path) -> str:
    match = _SHARD.match(file.name)
    return match.group("split") if match else file.stem.split("-")[0]


class _RowGroupCache:
    """Decoded parquet row groups, shared by every TableSource of a process: the sources a run opens
    (train, validation and test each open their own) keep at most the largest `cache_row_groups` any
    of them asks for, together, so memory does not grow with the number of splits read; sources
    over the same file and columns share the row groups."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.tables: OrderedDict[tuple, pa.Table] = OrderedDict()
        self.limit = 0

    def get(self, key: tuple, read: Callable[[], pa.Table], limit: int) -> pa.Table:
        if self.pid != os.getpid():  # a new process (DataLoader worker) starts empty
            self.pid, self.tables, self.limit = os.getpid(), OrderedDict(), 0
        self.limit = max(self.limit, limit)
        if key in self.tables:
            self.tables.move_to_end(key)
            return self.tables[key]
        table = self.tables[key] = read()
        while len(self.tables) > self.limit:
            self.tables.popitem(last=False)
        return table


_ROW_GROUPS = _RowGroupCache()


class TableSource:
    """Random access by row to selected columns of one split.

    `row(i)` returns a dict: scalars as Python values, lists as NumPy arrays (nested lists as
    2-D arrays), structs as dicts, binary as bytes, nulls as None. A `parent.child` column gives
    `row(i)["parent"]` as a dict of the selected children the file has (a null struct stays None).
    """

    def __init__(self, path: str | Path, columns: list[str], split: str | None = None, cache_row_groups: int = 4) -> None:
        self.path = Path(path)
        self.split = split
        self.columns = list(columns)
        self.fields = struct_fields(self.columns)
        self.files = resolve_files(self.path, split)
        self.cache_size = cache_row_groups
        self._chunks: list[tuple[int, int]] = []  # (file index, row group) per chunk; -1 row group = whole Arrow file
        self._starts: list[int] = []
        self.read_columns: list[list[str]] = []  # per file: what pyarrow is asked for (dotted for struct children)
        total = 0
        for index, file in enumerate(self.files):
            schema, counts = _inspect(file)
            missing = [c for c in self.fields if c not in schema.names]
            if missing:
                raise DataError(f"{file}: missing column(s) {', '.join(missing)}; it has: {', '.join(schema.names)}")
            self.read_columns.append(_projection(schema, self.fields))
            for group, count in enumerate(counts):
                if count:
                    self._chunks.append((index, group if file.suffix == ".parquet" else -1))
                    self._starts.append(total)
                    total += count
        self._length = total
        self._pid: int | None = None
        self._arrow: dict[int, tuple[pa.Table, mmap.mmap]] = {}
        self._parquet: dict[int, pq.ParquetFile] = {}
        self._mapped_rows = 0

    def __len__(self) -> int:
        return self._length

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_pid=None, _arrow={}, _parquet={}, _mapped_rows=0)
        return state

    def _chunk_table(self, chunk: int) -> pa.Table:
        if self._pid != os.getpid():  # a new process (DataLoader worker): drop inherited handles
            self._pid, self._arrow, self._parquet = os.getpid(), {}, {}
        file_index, group = self._chunks[chunk]
        if group < 0:
            return self._mapped_table(file_index)
        columns = self.read_columns[file_index]

        def read() -> pa.Table:
            if file_index not in self._parquet:
                self._parquet[file_index] = pq.ParquetFile(self.files[file_index], memory_map=False)
            return self._parquet[file_index].read_row_group(group, columns=columns, use_threads=False)

        return _ROW_GROUPS.get((str(self.files[file_index]), group, tuple(columns)), read, self.cache_size)

    def _mapped_table(self, file_index: int) -> pa.Table:
        """An Arrow file's columns, zero copy over a memory map whose touched pages are released
        every RELEASE_EVERY_ROWS rows (they are read again from the page cache when needed)."""
        self._mapped_rows += 1
        if self._mapped_rows >= RELEASE_EVERY_ROWS:
            self._mapped_rows = 0
            for _, mapped in self._arrow.values():
                mapped.madvise(mmap.MADV_DONTNEED)
        if file_index not in self._arrow:
            with open(self.files[file_index], "rb") as handle:
                mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            table = _read_ipc(pa.BufferReader(pa.py_buffer(mapped)))
            self._arrow[file_index] = (table.select(list(self.fields)), mapped)
        return self._arrow[file_index][0]

    def chunk_of(self, rows: np.ndarray) -> np.ndarray:
        """The storage chunk (parquet row group, or Arrow file) of each global row index."""
        return np.searchsorted(np.asarray(self._starts), np.asarray(rows), side="right") - 1

    @property
    def compressed(self) -> bool:
        """True when rows are read by decoding parquet row groups (random access is costly)."""
        return any(group >= 0 for _, group in self._chunks)

    def locate(self, index: int) -> tuple[Path, int]:
        """(file, row within file) of a global row index, for error messages."""
        chunk = bisect.bisect_right(self._starts, index) - 1
        file_index, group = self._chunks[chunk]
        first_of_file = next(s for s, (f, _) in zip(self._starts, self._chunks, strict=False) if f == file_index)
        return self.files[file_index], index - first_of_file

    def row(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self._length:
            raise IndexError(f"row {index} out of range for {self._length} rows in {self.path}")
        chunk = bisect.bisect_right(self._starts, index) - 1
        table = self._chunk_table(chunk)
        offset = index - self._starts[chunk]
        # a scalar of the chunk holding the row: no slice or concatenation (which copies, and touches
        # memory-mapped pages far beyond the row), at a quarter to a half of the cost of one-element arrays
        return {name: to_numpy_value(table.column(name)[offset], children) for name, children in self.fields.items()}

    def column(self, name: str) -> np.ndarray:
        """One whole scalar column (ids, redshifts) as an array, reading only that column."""
        parts = []
        for file in self.files:
            table = _read_arrow(file).select([name]) if file.suffix != ".parquet" else pq.read_table(file, columns=[name])
            parts.append(table.column(name).to_numpy(zero_copy_only=False))
        return np.concatenate(parts) if parts else np.array([])

    def has_values(self, name: str) -> bool:
        """Whether any row holds a non-null value of column `name`, without reading the rows where
        possible: parquet answers from its column-chunk statistics (a leaf value count above the
        null count; an empty list counts as no value), Arrow files from the memory-mapped column;
        parquet without statistics by decoding one row group at a time."""
        for file in self.files:
            if file.suffix != ".parquet":
                column = _read_arrow(file).column(name)
                if len(column) > column.null_count:
                    return True
                continue
            parquet = pq.ParquetFile(file)
            meta = parquet.metadata
            leaves = [j for j in range(meta.num_columns) if meta.schema.column(j).path.split(".")[0] == name]
            for group in range(meta.num_row_groups):
                for j in leaves:
                    chunk = meta.row_group(group).column(j)
                    stats = chunk.statistics
                    if stats is None or not stats.has_null_count:
                        table = parquet.read_row_group(group, columns=[name])
                        if table.column(name).null_count < table.num_rows:
                            return True
                    elif chunk.num_values > stats.null_count:
                        return True
        return False


def _inspect(file: Path) -> tuple[pa.Schema, list[int]]:
    try:
        if file.suffix == ".parquet":
            meta = pq.ParquetFile(file).metadata
            return meta.schema.to_arrow_schema(), [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        table = _read_arrow(file)
        return table.schema, [table.num_rows]
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"cannot read {file}: {exc}") from None


def struct_fields(columns: list[str]) -> dict[str, list[str] | None]:
    """Column names -> {top-level column: the struct children asked for, or None for all of it}:
    ["spectrum.flux", "spectrum.wavelength", "object_id"] -> {"spectrum": ["flux", "wavelength"],
    "object_id": None}."""
    fields: dict[str, list[str] | None] = {}
    for column in columns:
        top, _, child = column.partition(".")
        if not child or (top in fields and fields[top] is None):
            fields[top] = None
        else:
            fields[top] = [*(fields.get(top) or []), child]
    return fields


def _projection(schema: pa.Schema, fields: dict[str, list[str] | None]) -> list[str]:
    """The column paths to read from a file: struct children the file lacks are left out (they are
    optional); a struct with none of the children asked for is read whole, so its nulls are kept."""
    paths = []
    for top, children in fields.items():
        kind = schema.field(top).type
        present = [c for c in children or [] if pa.types.is_struct(kind) and kind.get_field_index(c) >= 0]
        paths.extend([f"{top}.{c}" for c in present] if present else [top])
    return paths


def _read_arrow(file: Path) -> pa.Table:
    """A memory-mapped Arrow IPC file, for one-off reads of a column or the schema."""
    return _read_ipc(pa.memory_map(str(file), "r"))


def _read_ipc(source: Any) -> pa.Table:
    """All record batches, zero copy over a mapped source (`save_to_disk` writes the stream format)."""
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_file(source).read_all()


def to_numpy_value(value: pa.Scalar, children: list[str] | None = None) -> Any:
    """Convert an Arrow scalar to Python/NumPy (see TableSource.row); of a struct, only the
    `children` named (those it has), when given."""
    if not value.is_valid:
        return None
    kind = value.type
    if pa.types.is_struct(kind):
        return {kind.field(i).name: to_numpy_value(value[i]) for i in range(kind.num_fields)
                if children is None or kind.field(i).name in children}
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        values = value.values
        inner = values.type
        if pa.types.is_list(inner) or pa.types.is_large_list(inner) or pa.types.is_fixed_size_list(inner):
            rows = len(values)
            flat = values.flatten()
            if rows and len(flat) % rows == 0 and values.null_count == 0:
                return flat.to_numpy(zero_copy_only=False).reshape(rows, -1)
            return [to_numpy_value(values[i]) for i in range(rows)]
        return values.to_numpy(zero_copy_only=False)
    return value.as_py()


def rows_by_id(path: str | Path, ids: np.ndarray | list, columns: list[str], id_column: str = "object_id") -> list[dict | None]:
    """The rows (selected columns, as `TableSource.row` gives them) of the objects `ids`, in that
    order, searched in every split of the dataset; None for an id the dataset does not hold.
    Only the id column is read whole: for galleries and object views, not for training."""
    wanted = np.asarray(ids)
    found: list[dict | None] = [None] * len(wanted)
    splits = available_splits(Path(path)) or [None]
    if Path(path).is_file() or (Path(path) / "state.json").is_file():
        splits = [None]
    for split in splits:
        source = TableSource(path, list(dict.fromkeys([id_column, *columns])), split=split)
        held = source.column(id_column)
        order = np.argsort(held, kind="stable")
        slots = np.searchsorted(held, wanted, sorter=order).clip(0, max(len(held) - 1, 0))
        for position, (target, slot) in enumerate(zip(wanted, slots, strict=True)):
            if found[position] is None and len(held) and held[order[slot]] == target:
                found[position] = source.row(int(order[slot]))
    return found
