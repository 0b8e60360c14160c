"""Looking at objects: one object's image and spectrum, a gallery of a ranked list, similarity search.

Objects are read by `object_id` from the data the embeddings came from (the Euclid+DESI schema:
`RGB_image` {bytes, path}, the VIS / NISP band arrays, `spectrum` {flux, wavelength}, `redshift`),
reading only those columns and only the wanted rows (`fmb.data.tables.rows_by_id`). A column the
data lacks, or a null value, is an empty panel saying "no image" / "no spectrum": missing
modalities are normal; image bytes that do not decode are an empty panel "unreadable image" and a
warning naming the data and the object. Spectral lines are marked at the object's redshift where
they fall in the spectrum's range (`observed_lines`, vacuum rest wavelengths as DESI spectra are in
vacuum). Text is drawn as it is (parse_math off: a `$` in an id or a score is not mathtext).
Figures need matplotlib (the `plots` extra).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fmb.data.images import decode_image, image_bytes
from fmb.data.spectral_lines import LINES
from fmb.data.surveys.euclid_desi import DESI_PIXELS, DESI_WAVELENGTH, EUCLID_BAND_COLUMNS
from fmb.data.tables import data_schema, rows_by_id
from fmb.embeddings import EMBEDDING_PREFIX, EmbeddingFile
from fmb.errors import DataError
from fmb.evaluation.plots import pyplot, save_figure

log = logging.getLogger("fmb")

# (name, rest wavelength in vacuum [A], emission or absorption)
SPECTRAL_LINES = tuple((line.label, line.vacuum, line.kind) for line in LINES.values())
IMAGE_COLUMN, SPECTRUM_COLUMN, REDSHIFT_COLUMN = "RGB_image", "spectrum", "redshift"
BAND_NAMES = {c: c.removesuffix("_image") for c in EUCLID_BAND_COLUMNS}
# what a gallery shows first when the table has it (fmb detect's fused score)
HEADLINE_SCORES = ("anomaly_score",)


@dataclass
class ObjectData:
    """What the data holds about one object; None (or empty) where it has no such modality."""

    object_id: Any
    rgb: np.ndarray | None = None  # (h, w, 3) uint8
    bands: dict[str, np.ndarray] = field(default_factory=dict)  # band name -> (h, w)
    wavelength: np.ndarray | None = None
    flux: np.ndarray | None = None
    redshift: float = float("nan")
    image_unreadable: bool = False  # the data has image bytes for it, but they do not decode


def observed_lines(redshift: float | None, low: float, high: float) -> list[tuple[str, float, str]]:
    """(name, observed wavelength, kind) of the lines that fall within [low, high] at `redshift`;
    none when the redshift is unknown."""
    if redshift is None or not np.isfinite(redshift):
        return []
    shifted = [(name, rest * (1.0 + redshift), kind) for name, rest, kind in SPECTRAL_LINES]
    return [line for line in shifted if low <= line[1] <= high]


def parse_id(text: str, like: np.ndarray | np.dtype) -> Any:
    """An id typed on the command line, as the ids it is compared with (integers stay integers)."""
    kind = like.dtype.kind if isinstance(like, np.ndarray) else np.dtype(like).kind
    if kind in "iu":
        try:
            return int(text)
        except ValueError:
            raise DataError(f"object id '{text}' is not an integer, as the ids it is looked up among are") from None
    return text


def _schema_with_ids(data: str | Path) -> pa.Schema:
    """The data's schema (no rows read); an error naming the data when it has no object_id column."""
    schema = data_schema(data)
    if "object_id" not in schema.names:
        raise DataError(f"{data}: no object_id column; it has {', '.join(schema.names)}")
    return schema


def id_dtype(data: str | Path) -> np.dtype:
    """The dtype of the data's object_id values (from the schema; no rows read)."""
    kind = _schema_with_ids(data).field("object_id").type
    return np.dtype(np.int64) if pa.types.is_integer(kind) else np.dtype(object)


def read_objects(data: str | Path, ids: list | np.ndarray) -> list[ObjectData]:
    """The image, bands, spectrum and redshift of each object of `ids`, in that order. An id the data
    does not hold is an error naming it and the data."""
    present = set(_schema_with_ids(data).names)
    wanted = [c for c in (IMAGE_COLUMN, *EUCLID_BAND_COLUMNS, SPECTRUM_COLUMN, REDSHIFT_COLUMN) if c in present]
    rows = rows_by_id(data, ids, wanted)
    absent = [str(i) for i, row in zip(ids, rows, strict=True) if row is None]
    if absent:
        raise DataError(f"{data}: no object with object_id {', '.join(absent[:10])}"
                        + (f" (and {len(absent) - 10} more)" if len(absent) > 10 else ""))
    return [_object(data, i, row) for i, row in zip(ids, rows, strict=True)]


def _object(data: str | Path, object_id: Any, row: dict) -> ObjectData:
    found = ObjectData(object_id)
    raw = image_bytes(row.get(IMAGE_COLUMN))
    if raw:
        try:
            found.rgb = decode_image(raw)
        except DataError as exc:
            found.image_unreadable = True
            log.warning(f"{data}: object {object_id}: its {IMAGE_COLUMN} is not drawn: {exc}")
    for column, band in BAND_NAMES.items():
        value = row.get(column)
        if value is not None and np.asarray(value).ndim == 2 and np.asarray(value).size:
            found.bands[band] = np.asarray(value, np.float32)
    spectrum = row.get(SPECTRUM_COLUMN)
    if isinstance(spectrum, dict) and spectrum.get("flux") is not None and len(spectrum["flux"]):
        flux = np.asarray(spectrum["flux"], np.float64).reshape(-1)
        wavelength = spectrum.get("wavelength")
        if wavelength is not None and len(wavelength) == len(flux):
            found.wavelength = np.asarray(wavelength, np.float64).reshape(-1)
        elif len(flux) == DESI_PIXELS:
            found.wavelength = DESI_WAVELENGTH
        else:
            found.wavelength = np.arange(len(flux), dtype=np.float64)  # pixels: no lines are marked
        if np.isfinite(flux).sum() >= 2:
            found.flux = flux
    redshift = row.get(REDSHIFT_COLUMN)
    if redshift is not None:
        found.redshift = float(redshift)
    return found


def nearest(x: np.ndarray, query: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cosine similarities) of the k rows most similar to row `query`, most similar first;
    the query itself and rows with a non-finite embedding left out."""
    finite = np.isfinite(x).all(1)
    norms = np.linalg.norm(np.where(finite[:, None], x, 0.0), axis=1)
    unit = np.where((norms > 0)[:, None], x / np.maximum(norms, 1e-12)[:, None], 0.0)
    similarity = unit @ unit[query]
    candidates = np.flatnonzero(finite & (norms > 0) & (np.arange(len(x)) != query))
    order = candidates[np.argsort(-similarity[candidates], kind="stable")[:k]]
    return order, similarity[order]


def similar_objects(embeddings: EmbeddingFile, object_id: Any, column: str | None, k: int
                    ) -> tuple[str, list[Any], list[float]]:
    """(column used, [query id, neighbour ids...], [1.0, cosine similarities...])."""
    column = column or ("joint" if "joint" in embeddings.embeddings else next(iter(embeddings.embeddings)))
    if column not in embeddings.embeddings:
        raise DataError(f"{embeddings.path}: no column {EMBEDDING_PREFIX}{column}; it has "
                        + ", ".join(EMBEDDING_PREFIX + c for c in embeddings.embeddings))
    rows = np.flatnonzero(embeddings.ids == object_id)
    if not len(rows):
        raise DataError(f"{embeddings.path}: no object with object_id {object_id}")
    x = embeddings.embeddings[column]
    if not np.isfinite(x[rows[0]]).all():
        raise DataError(f"{embeddings.path}: object {object_id} has no {EMBEDDING_PREFIX}{column} (null: that modality "
                        "is absent for it); choose another --column")
    found, scores = nearest(x, int(rows[0]), k)
    return column, [object_id, *embeddings.ids[found].tolist()], [1.0, *scores.tolist()]


def read_scores(table: str | Path, top: int, scores: list[str] | None = None) -> tuple[list[Any], dict[str, list]]:
    """The first `top` object ids of a ranked table (parquet or CSV with object_id, e.g. `fmb detect`'s)
    and the values of the score columns to show (default: the fused score first, then other number or
    text columns, at most 4). A table without rows, a null id among the first `top` rows, or a score
    column of images, arrays or structs is an error naming the table."""
    path = Path(table)
    if not path.is_file():
        raise DataError(f"table not found: {path}")
    if path.suffix == ".csv":
        import pyarrow.csv as pa_csv

        data = pa_csv.read_csv(path)
        schema = data.schema
    else:
        schema = pq.read_schema(path)
    names = schema.names
    if "object_id" not in names:
        raise DataError(f"{path}: no object_id column; it has {', '.join(names)}")
    chosen = scores if scores is not None else _default_scores(schema)
    unknown = [c for c in chosen if c not in names]
    if unknown:
        raise DataError(f"{path}: no column {', '.join(unknown)}; it has {', '.join(names)}")
    for column in chosen:
        if not _printable(schema.field(column).type):
            raise DataError(f"{path}: column {column} holds {schema.field(column).type} values, not a score to print; "
                            "--scores takes number or text columns")
    if path.suffix != ".csv":
        data = pq.read_table(path, columns=list(dict.fromkeys(["object_id", *chosen])))
    if not data.num_rows:
        raise DataError(f"{path}: no rows")
    head = data.slice(0, top)
    ids = head.column("object_id").to_pylist()
    if None in ids:
        raise DataError(f"{path}: row {ids.index(None) + 1} (counting data rows from 1) has a null object_id")
    return ids, {c: head.column(c).to_pylist() for c in chosen}


def _printable(kind: pa.DataType) -> bool:
    """A number or a text: one line under an object (not image bytes, arrays or structs)."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
            or pa.types.is_string(kind) or pa.types.is_large_string(kind))


def _default_scores(schema: pa.Schema, most: int = 4) -> list[str]:
    others = [f.name for f in schema if f.name != "object_id" and _printable(f.type)]
    first = [c for c in HEADLINE_SCORES if c in others]
    return (first + [c for c in others if c not in first])[:most]


def score_lines(scores: dict[str, list], position: int) -> list[str]:
    """`name = value` for one row of `read_scores`' columns."""
    lines = []
    for name, values in scores.items():
        value = values[position]
        shown = "-" if value is None else f"{value:.4g}" if isinstance(value, float) else value
        lines.append(f"{name} = {shown}")
    return lines


# ----------------------------------------------------------------------------- drawing


def _empty(ax: Any, text: str, square: bool = False) -> None:
    ax.set_facecolor("#f4f4f4")
    if square:  # the shape an image would have had
        ax.set_aspect("equal")
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#777", fontsize=8, parse_math=False)
    ax.set_xticks([])
    ax.set_yticks([])


def _stretch(band: np.ndarray) -> np.ndarray:
    """asinh of the band in units of its noise (robust spread), clipped to its 0.5-99.8 percentiles."""
    finite = band[np.isfinite(band)]
    if not finite.size:
        return np.zeros_like(band)
    sky = np.median(finite)
    noise = 1.4826 * np.median(np.abs(finite - sky)) or float(np.std(finite)) or 1.0
    shown = np.arcsinh((np.nan_to_num(band, nan=sky) - sky) / (3.0 * noise))
    low, high = np.percentile(shown, [0.5, 99.8])
    return np.clip(shown, low, high)


def draw_image(ax: Any, item: ObjectData, title: str | None = None) -> None:
    if item.rgb is None:
        _empty(ax, "unreadable image" if item.image_unreadable else "no image", square=True)
    else:
        ax.imshow(item.rgb, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8, parse_math=False)


def draw_band(ax: Any, item: ObjectData, band: str) -> None:
    if band not in item.bands:
        _empty(ax, "no image", square=True)
    else:
        ax.imshow(_stretch(item.bands[band]), cmap="gray", interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title(band, fontsize=8)


def _smooth(flux: np.ndarray, width: int) -> np.ndarray:
    """Boxcar mean over `width` pixels (fewer at the ends: the mean of those there), non-finite pixels
    filled by interpolation first."""
    good = np.isfinite(flux)
    filled = np.interp(np.arange(len(flux)), np.flatnonzero(good), flux[good]) if not good.all() else flux
    if len(flux) <= width:
        return filled
    box = np.ones(width)
    return np.convolve(filled, box, mode="same") / np.convolve(np.ones(len(flux)), box, mode="same")


def draw_spectrum(ax: Any, item: ObjectData, smooth: int = 15, labels: bool = True, raw: bool = True) -> None:
    """The flux (light grey, with `raw`) and its boxcar smoothing, lines marked at the object's
    redshift: emission blue, absorption red (named with `labels`)."""
    if item.flux is None:
        _empty(ax, "no spectrum")
        return
    wavelength, flux = item.wavelength, item.flux
    smoothed = _smooth(flux, smooth)
    if raw:
        ax.plot(wavelength, flux, color="#d0d0d0", linewidth=0.3)
    ax.plot(wavelength, smoothed, color="black", linewidth=0.7)
    low, high = np.percentile(smoothed, 0.5), float(smoothed.max())  # emission lines shown whole
    pad = 0.1 * (high - low) if high > low else 1.0
    ax.set_ylim(low - pad, high + 2 * pad)
    ax.set_xlim(wavelength[0], wavelength[-1])
    on_grid = wavelength[-1] > 1000  # Angstrom, not pixel indices
    for name, where, kind in observed_lines(item.redshift, wavelength[0], wavelength[-1]) if on_grid else []:
        ax.axvline(where, color="tab:blue" if kind == "emission" else "tab:red", linewidth=0.6, alpha=0.6, linestyle="--")
        if labels:
            ax.text(where, 1.0, name, transform=ax.get_xaxis_transform(), rotation=90, fontsize=6, ha="right", va="top",
                    color="tab:blue" if kind == "emission" else "tab:red")
    ax.tick_params(labelsize=6)
    ax.set_xlabel("observed wavelength [Å]" if on_grid else "pixel", fontsize=7)


def show_object(item: ObjectData, path: Path, notes: list[str] | None = None) -> Path:
    """One object: the RGB composite and every band above, the spectrum with its lines below."""
    plt = pyplot()
    bands = list(BAND_NAMES.values())
    fig = plt.figure(figsize=(2.4 * (1 + len(bands)), 5.6))
    grid = fig.add_gridspec(2, 1 + len(bands), height_ratios=[1, 1.1], hspace=0.15)
    redshift = f"z = {item.redshift:.4f}" if np.isfinite(item.redshift) else "redshift unknown"
    draw_image(fig.add_subplot(grid[0, 0]), item, "RGB")
    for i, band in enumerate(bands, 1):
        draw_band(fig.add_subplot(grid[0, i]), item, band)
    spectrum = fig.add_subplot(grid[1, :])
    draw_spectrum(spectrum, item)
    spectrum.set_ylabel("flux", fontsize=7)
    fig.suptitle("; ".join([f"object {item.object_id}", redshift, *(notes or [])]), fontsize=10, parse_math=False)
    return save_figure(fig, plt, path, crop=True)


def gallery(items: list[ObjectData], texts: list[list[str]], path: Path, title: str = "", columns: int = 2,
            highlight: int | None = None) -> Path:
    """Many objects, each as its image beside its spectrum under a few lines of text (id, scores).
    `highlight`: the position of an item drawn framed in red (the query of a similarity search)."""
    plt = pyplot()
    columns = max(1, min(columns, len(items)))
    rows = -(-len(items) // columns)
    fig = plt.figure(figsize=(6.4 * columns, 2.1 * rows + (0.5 if title else 0)))
    grid = fig.add_gridspec(rows, 2 * columns, width_ratios=[1, 2.6] * columns, hspace=0.6, wspace=0.25)
    for position, (item, lines) in enumerate(zip(items, texts, strict=True)):
        row, col = divmod(position, columns)
        image_ax = fig.add_subplot(grid[row, 2 * col])
        draw_image(image_ax, item)
        spectrum_ax = fig.add_subplot(grid[row, 2 * col + 1])
        draw_spectrum(spectrum_ax, item, labels=False, raw=False)
        spectrum_ax.set_xlabel("")
        redshift = f"z = {item.redshift:.3f}" if np.isfinite(item.redshift) else ""
        spectrum_ax.set_title("   ".join([str(item.object_id), redshift]), fontsize=7, loc="left", parse_math=False)
        image_ax.set_title("\n".join(lines), fontsize=6, loc="left", parse_math=False)
        if position == highlight:
            for side in image_ax.spines.values():
                side.set(color="red", linewidth=2.0, visible=True)
    if title:
        fig.suptitle(title, fontsize=10, parse_math=False)
    return save_figure(fig, plt, path, crop=True)
