"""astromodal data: token shards, vocabulary and sequences (the S-PLUS fields themselves are read by
fmb.data.surveys.splus).

Token shards (written by `encode_dataset`, read with random access through memory maps):
  meta.json            row count, streams, dtypes, source files
  objects.parquet      id, field file, key (int64 hash of the id), truth columns when present
  scalar.bin           (N, C) int16 bin per scalar column, -1 for missing
  <stream>.bin         flat int16 tokens of one stream (image, or a spectrum group)
  <stream>.offsets.npy (N + 1,) int64: row i is tokens[offsets[i]:offsets[i + 1]]; empty = absent

Sequence layout: [BOS] image [SEP] scalars [SEP] {group [SEP]}* [EOS]. A missing scalar is a
MISS token (typed as its column); a missing image leaves its block empty; a missing spectrum
group is left out. Truncation: when a sequence is longer than the model's maximum, whole
spectrum groups are dropped from the end (counted); a layout that cannot fit the image and
scalars is a configuration error.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from fmb.data.surveys.splus import (
    BANDS,
    GAIA_SCALARS,
    MORPHOLOGY,
    VISTA_BANDS,
    FieldBatch,
    object_key,
)
from fmb.errors import ConfigError, DataError

log = logging.getLogger("fmb")

DEFAULT_SCALARS = (
    [f"mag_pstotal_{b}" for b in BANDS] + [f"err_mag_pstotal_{b}" for b in BANDS] + list(MORPHOLOGY)
    + [f"gaia_{name}" for name in GAIA_SCALARS] + ["specz_z", "specz_e_z"]
    + [f"vista_{b}apermag6{suffix}" for b in VISTA_BANDS for suffix in ("", "err")]
)


# ----------------------------------------------------------------------------- vocabulary


PAD, BOS, EOS, SEP, MISS = 0, 1, 2, 3, 4
SPECIALS = ("PAD", "BOS", "EOS", "SEP", "MISS")


@dataclass
class Vocabulary:
    """Token ids: the specials, then one range per modality (image, scalars, each spectrum group).

    Token types: 0 for specials, 1 for image tokens, one type per scalar column, one per
    spectrum group. Scalar bins of every column share one id range; the column is in the type.
    """

    image_size: int
    image_tokens: int  # tokens per image (latent grid cells)
    scalar_columns: list[str]
    scalar_bins: int
    groups: dict[str, int] = field(default_factory=dict)  # spectrum group -> codebook size

    def __post_init__(self) -> None:
        self.ranges: dict[str, tuple[int, int]] = {}
        start = len(SPECIALS)
        for name, size in [("image", self.image_size), ("scalar", self.scalar_bins),
                           *[(f"spec/{g}", k) for g, k in self.groups.items()]]:
            self.ranges[name] = (start, start + size)
            start += size
        self.size = start
        self.scalar_type0 = 2
        self.group_type = {g: self.scalar_type0 + len(self.scalar_columns) + i for i, g in enumerate(self.groups)}
        self.n_types = self.scalar_type0 + len(self.scalar_columns) + len(self.groups)

    def to_json(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "image_tokens": self.image_tokens,
                "scalar_columns": self.scalar_columns, "scalar_bins": self.scalar_bins, "groups": self.groups}

    def check_fits(self, max_len: int) -> None:
        """[BOS] image [SEP] scalars [SEP] [EOS] is never truncated: it must fit in max_len."""
        needed = self.image_tokens + len(self.scalar_columns) + 4
        if max_len < needed:
            raise ConfigError(f"model.max_len={max_len} cannot hold the image ({self.image_tokens} tokens) "
                              f"and {len(self.scalar_columns)} scalars: at least {needed} needed")

    def sequence(self, image: np.ndarray | None, scalars: np.ndarray, groups: dict[str, np.ndarray | None],
                 max_len: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(token ids, token types, number of spectrum groups dropped to fit max_len)."""
        self.check_fits(max_len)
        ids = [np.array([BOS])]
        types = [np.array([0])]
        if image is not None and len(image):
            ids.append(image.astype(np.int64) + self.ranges["image"][0])
            types.append(np.full(len(image), 1))
        bins = scalars.astype(np.int64)
        ids += [np.array([SEP]), np.where(bins < 0, MISS, bins + self.ranges["scalar"][0]), np.array([SEP])]
        types += [np.array([0]), self.scalar_type0 + np.arange(len(bins)), np.array([0])]
        length = sum(len(a) for a in ids) + 1
        dropped = 0
        for name in self.groups:
            tokens = groups.get(name)
            if tokens is None or not len(tokens):
                continue
            if length + len(tokens) + 1 > max_len:
                dropped += 1
                continue
            ids += [tokens.astype(np.int64) + self.ranges[f"spec/{name}"][0], np.array([SEP])]
            types += [np.full(len(tokens), self.group_type[name]), np.array([0])]
            length += len(tokens) + 1
        ids.append(np.array([EOS]))
        types.append(np.array([0]))
        return np.concatenate(ids), np.concatenate(types), dropped


# ----------------------------------------------------------------------------- token shards


class ShardWriter:
    """Appends encoded rows to a shard directory; `close` writes offsets and metadata."""

    def __init__(self, out_dir: Path, n_scalars: int, streams: list[str]) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.n_scalars = n_scalars
        self.streams = streams
        self.scalar_file = open(self.dir / "scalar.bin", "wb")  # closed in close()
        self.files = {s: open(self.dir / f"{s}.bin", "wb") for s in streams}
        self.lengths: dict[str, list[np.ndarray]] = {s: [] for s in streams}
        self.objects: list[pa.Table] = []
        self.rows = 0

    def add(self, batch: FieldBatch, scalars: np.ndarray, streams: dict[str, list[np.ndarray | None]],
            truth: dict[str, pa.Array | None]) -> None:
        n = len(batch)
        self.scalar_file.write(scalars.astype(np.int16).tobytes())
        for name in self.streams:
            rows = streams[name]
            lengths = np.array([0 if r is None else len(r) for r in rows], np.int64)
            present = [r.astype(np.int16) for r in rows if r is not None]
            if present:
                self.files[name].write(np.concatenate(present).tobytes())
            self.lengths[name].append(lengths)
        table = {"id": pa.array(batch.ids), "field": pa.array([batch.file.name] * n),
                 "key": pa.array(object_key(batch.ids))}
        table.update({k: v for k, v in truth.items() if v is not None})
        self.objects.append(pa.table(table))
        self.rows += n

    def close(self, meta: dict[str, Any]) -> Path:
        self.scalar_file.close()
        for name, handle in self.files.items():
            handle.close()
            lengths = np.concatenate(self.lengths[name]) if self.lengths[name] else np.zeros(0, np.int64)
            np.save(self.dir / f"{name}.offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        pq.write_table(pa.concat_tables(self.objects, promote_options="default"), self.dir / "objects.parquet")
        meta = {**meta, "rows": self.rows, "n_scalars": self.n_scalars, "streams": self.streams, "dtype": "int16"}
        (self.dir / "meta.json").write_text(json.dumps(meta, indent=1))
        return self.dir


class TokenShards:
    """Random access to an encoded shard directory through memory maps (opened lazily per process)."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        meta_file = self.dir / "meta.json"
        if not meta_file.is_file():
            raise DataError(f"{self.dir} is not a token shard directory (no meta.json); "
                            "write one with `fmb tokenize encode`")
        self.meta = json.loads(meta_file.read_text())
        self.rows = int(self.meta["rows"])
        self.streams = list(self.meta["streams"])
        self._maps: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.rows

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}  # workers map the files themselves

    def _open(self) -> dict[str, np.ndarray]:
        if self._maps is None:
            maps = {"scalar": np.memmap(self.dir / "scalar.bin", np.int16, "r").reshape(self.rows, -1)
                    if self.rows else np.zeros((0, self.meta["n_scalars"]), np.int16)}
            for s in self.streams:
                size = (self.dir / f"{s}.bin").stat().st_size
                maps[s] = np.memmap(self.dir / f"{s}.bin", np.int16, "r") if size else np.zeros(0, np.int16)
                maps[f"{s}.offsets"] = np.load(self.dir / f"{s}.offsets.npy", mmap_mode="r")
            self._maps = maps
        return self._maps

    def row(self, i: int) -> tuple[np.ndarray, dict[str, np.ndarray | None]]:
        """(scalar bins (C,), {stream: tokens or None})."""
        maps = self._open()
        out: dict[str, np.ndarray | None] = {}
        for s in self.streams:
            a, b = maps[f"{s}.offsets"][i], maps[f"{s}.offsets"][i + 1]
            out[s] = np.asarray(maps[s][a:b]) if b > a else None
        return np.asarray(maps["scalar"][i]), out

    def objects(self, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.dir / "objects.parquet", columns=columns)


class SequenceDataset(Dataset):
    """Token sequences of selected shard rows; items are dicts of int64 arrays."""

    def __init__(self, shards: TokenShards, vocab: Vocabulary, max_len: int, indices: np.ndarray) -> None:
        self.shards = shards
        self.vocab = vocab
        self.max_len = max_len
        self.indices = np.asarray(indices, np.int64)
        vocab.check_fits(max_len)
        self.dropped = 0

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = int(self.indices[i])
        scalars, streams = self.shards.row(row)
        groups = {g: streams.get(g) for g in self.vocab.groups}
        tokens, types, dropped = self.vocab.sequence(streams.get("image"), scalars, groups, self.max_len)
        if dropped and not self.dropped:
            log.info(f"sequence of row {row} longer than model.max_len={self.max_len}: {dropped} spectrum "
                     "group(s) dropped from the end (logged once per process)")
        self.dropped += dropped
        return {"tokens": tokens, "types": types, "index": row}


def collate_sequences(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Right-pad with PAD (type 0); `mask` is True on real tokens."""
    length = max(len(it["tokens"]) for it in items)
    tokens = np.full((len(items), length), PAD, np.int64)
    types = np.zeros((len(items), length), np.int64)
    for k, it in enumerate(items):
        tokens[k, :len(it["tokens"])] = it["tokens"]
        types[k, :len(it["types"])] = it["types"]
    tokens_t = torch.from_numpy(tokens)
    return {"tokens": tokens_t, "types": torch.from_numpy(types), "mask": tokens_t != PAD,
            "index": torch.tensor([it["index"] for it in items])}
