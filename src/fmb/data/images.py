"""Encoded images (the `RGB_image` bytes of the Euclid+DESI sample): PNG writing and decoding.

fmb writes unfiltered 8-bit PNGs itself and reads them back without extra packages. Other PNGs
and JPEGs are decoded with Pillow (the optional `images` extra), which is only imported then.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np

from fmb.errors import DataError

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def encode_png(image: np.ndarray) -> bytes:
    """An H x W x 3 uint8 array as PNG bytes (no row filters; zlib level 6)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 uint8 array, got {image.dtype} {image.shape}")
    height, width, _ = image.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, width * 3)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return _PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b"")


def image_bytes(value: Any) -> bytes | None:
    """The encoded bytes of an `RGB_image` value: a {bytes, path} struct (Euclid+DESI) or bare bytes;
    None when there are none."""
    raw = value.get("bytes") if isinstance(value, dict) else value
    return raw or None


def decode_image(data: bytes) -> np.ndarray:
    """PNG or JPEG bytes -> H x W x 3 uint8. Raises DataError for bytes that are not an image."""
    if not data:
        raise DataError("empty image bytes")
    fast = _decode_unfiltered_png(data)
    if fast is not None:
        return fast
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise DataError("this image needs Pillow to decode (JPEG or filtered PNG): pip install 'fmb[images]'") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    except UnidentifiedImageError:
        raise DataError(f"cannot decode image bytes ({len(data)} bytes starting {data[:8]!r}): not an image format "
                        "Pillow reads") from None
    except (OSError, SyntaxError, ValueError) as exc:  # a known format, damaged
        raise DataError(f"cannot decode image bytes ({len(data)} bytes): {exc}") from None


def _decode_unfiltered_png(data: bytes) -> np.ndarray | None:
    """8-bit RGB, non-interlaced PNG whose rows all use filter 0; None for anything else."""
    if not data.startswith(_PNG_SIGNATURE):
        return None
    pos, header, idat = 8, None, []
    try:
        while pos < len(data):
            (length,) = struct.unpack(">I", data[pos : pos + 4])
            kind = data[pos + 4 : pos + 8]
            body = data[pos + 8 : pos + 8 + length]
            pos += 12 + length
            if kind == b"IHDR":
                header = struct.unpack(">IIBBBBB", body)
            elif kind == b"IDAT":
                idat.append(body)
            elif kind == b"IEND":
                break
        if header is None:
            return None
        width, height, depth, color, _, _, interlace = header
        if depth != 8 or color != 2 or interlace != 0:
            return None
        raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8)
    except (struct.error, zlib.error):
        raise DataError("corrupt PNG bytes") from None
    if raw.size != height * (width * 3 + 1):
        raise DataError(f"corrupt PNG bytes: {raw.size} pixel bytes for a {width} x {height} image")
    rows = raw.reshape(height, width * 3 + 1)
    if rows[:, 0].any():
        return None
    return rows[:, 1:].reshape(height, width, 3).copy()
