"""Turning one shard row into an RGB image, with every way that can fail made explicit.

Used by the Ray Data tasks, the inspector and the benchmark baseline, so all of them accept and
reject exactly the same rows.
"""
from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from simsiam.data.schema import DataError


class BadImage(Exception):
    """One row's image cannot be used; the message says why (the caller adds shard and row)."""


def _open_encoded(data: bytes, max_pixels: int) -> Image.Image:
    """The image with only its header read, after the pixel-limit check; raises :class:`BadImage`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise BadImage("corrupt or not an image: no known image format in these bytes") from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...) for bad headers
        raise BadImage(f"corrupt or not an image: {type(e).__name__}: {e}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise BadImage(f"image is {w}x{h} = {w * h} pixels, over data.max_pixels = {max_pixels} "
                       "(possible decompression bomb)")
    return img


def _decode_encoded(data: bytes, max_pixels: int) -> Image.Image:
    saved = Image.MAX_IMAGE_PIXELS
    # PIL's own bomb check would fire inside open() with its own threshold and message; ours runs on
    # the header's size, before any pixel is decoded.
    Image.MAX_IMAGE_PIXELS = None
    try:
        img = _open_encoded(data, max_pixels)
        try:
            img.load()
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...) for bad files
            kind = "truncated" if "truncated" in str(e) else "corrupt or not an image"
            raise BadImage(f"{kind}: {type(e).__name__}: {e}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def probe(data: Any, max_pixels: int) -> tuple[str, int, int]:
    """(format, height, width) of one encoded image from its header alone, no pixel decoded; format is
    PIL's name (``"JPEG"``, ``"PNG"``...). Raises :class:`BadImage` as :func:`decode` does for what the
    header shows (empty, no known format, over ``max_pixels``); a truncated body shows only at decode."""
    if data is None or len(data) == 0:
        raise BadImage("empty image bytes")
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        img = _open_encoded(bytes(data), max_pixels)
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    return str(img.format), img.height, img.width


def _decode_raw(data: bytes, height: int, width: int, channels: int, max_pixels: int) -> Image.Image:
    if height <= 0 or width <= 0 or channels not in (1, 3):
        raise BadImage(f"raw image has invalid shape height={height} width={width} channels={channels} "
                       "(channels must be 1 or 3)")
    if height * width > max_pixels:
        raise BadImage(f"image is {width}x{height} = {width * height} pixels, over data.max_pixels = "
                       f"{max_pixels}")
    if len(data) != height * width * channels:
        raise BadImage(f"raw image has {len(data)} bytes but height x width x channels = "
                       f"{height}x{width}x{channels} = {height * width * channels}")
    img = Image.frombytes("L" if channels == 1 else "RGB", (width, height), data)
    return img.convert("RGB") if channels == 1 else img


def decode(data: Any, height: int | None, width: int | None, channels: int | None,
           max_pixels: int) -> Image.Image:
    """One row -> an RGB PIL image; raises :class:`BadImage` with the reason."""
    if data is None or len(data) == 0:
        raise BadImage("empty image bytes")
    if height is None:
        return _decode_encoded(bytes(data), max_pixels)
    if width is None or channels is None:
        raise BadImage("raw image with height set but width or channels missing")
    return _decode_raw(bytes(data), int(height), int(width), int(channels), max_pixels)


class Rows:
    """Column access over a pyarrow batch of shard rows, with the shard path for error messages."""

    def __init__(self, table: pa.Table) -> None:
        self.n = table.num_rows
        names = set(table.column_names)
        self.images = table.column("image").to_pylist()
        self.ids = table.column("id").to_pylist()
        self.labels = (np.asarray(table.column("label").fill_null(-1).to_numpy(), dtype=np.int64)
                       if "label" in names else np.full(self.n, -1, dtype=np.int64))
        none = [None] * self.n
        self.heights = table.column("height").to_pylist() if "height" in names else none
        self.widths = table.column("width").to_pylist() if "width" in names else none
        self.channels = table.column("channels").to_pylist() if "channels" in names else none
        self.paths = table.column("path").to_pylist() if "path" in names else ["<unknown shard>"] * self.n

    def where(self, i: int) -> str:
        return f"{self.paths[i]}: row id={self.ids[i]!r}"

    def decode(self, i: int, max_pixels: int) -> Image.Image:
        return decode(self.images[i], self.heights[i], self.widths[i], self.channels[i], max_pixels)

    def bad(self, i: int, reason: str) -> DataError:
        return DataError(f"{self.where(i)}: {reason}")
