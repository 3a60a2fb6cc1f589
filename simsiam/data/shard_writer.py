"""Building and writing one shard: a source's payload -> a Parquet table -> an atomic write.

Runs in the converter's worker processes (:func:`write_shard` is what they are handed), and reads
back the shards an interrupted conversion finished (:func:`read_done_shard`), so a rerun keeps them.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from simsiam import io as sio
from simsiam.data.decode import BadImage, decode
from simsiam.data.schema import SCHEMA, DataError, shard_name
from simsiam.io import atomic_write_bytes

KEEP_FORMATS = ("JPEG", "PNG")  # stored as found; other formats are transcoded to PNG (lossless)
ROW_GROUP_TARGET_BYTES = 8 << 20


def _encode_png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _file_row(path: str, max_pixels: int) -> bytes:
    """The bytes to store for one image file: as found for JPEG/PNG, else transcoded to PNG. Every image
    is decoded in full first, with the pipeline's own decoder and pixel limit: a file whose header reads
    but whose pixels do not (a truncated JPEG) must not become a row that fails training later."""
    from PIL import Image

    data = Path(path).read_bytes()
    try:
        img = decode(data, None, None, None, max_pixels)
        with Image.open(io.BytesIO(data)) as header:  # decode() succeeded, so this only reads the header
            fmt = header.format
    except BadImage as e:
        raise DataError(f"not a readable image: {e}") from None
    if fmt in KEEP_FORMATS:
        return data
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _build_table(payload: tuple, on_bad_image: str, max_pixels: int) -> tuple[pa.Table, list[tuple[str, str]]]:
    skipped: list[tuple[str, str]] = []
    if payload[0] == "files":
        images, labels, ids = [], [], []
        for rel, path, label in payload[1]:
            try:
                images.append(_file_row(path, max_pixels))
            except (DataError, OSError) as e:
                if on_bad_image != "skip":
                    raise DataError(f"{path}: {e}") from None
                skipped.append((path, str(e)))
                continue
            labels.append(label)
            ids.append(rel)
        n = len(ids)
        cols = [pa.array(images, pa.binary()), pa.array(labels, pa.int64()), pa.array(ids, pa.string()),
                pa.nulls(n, pa.int32()), pa.nulls(n, pa.int32()), pa.nulls(n, pa.int32())]
    else:
        _, arr, labs, prefix, start, storage = payload
        n, h, w, c = arr.shape
        if storage == "raw":
            flat = arr.reshape(n, -1)
            images = pa.array([row.tobytes() for row in flat], pa.binary())
            dims = [pa.array(np.full(n, v, np.int32)) for v in (h, w, c)]
        else:
            images = pa.array([_encode_png(img) for img in arr], pa.binary())
            dims = [pa.nulls(n, pa.int32())] * 3
        ids = [f"{prefix}/{start + i:06d}" for i in range(n)]
        cols = [images, pa.array(labs, pa.int64()), pa.array(ids, pa.string()), *dims]
    return pa.Table.from_arrays(cols, schema=SCHEMA), skipped


def write_shard(dest: str, index: int, payload: tuple, on_bad_image: str, max_pixels: int) -> dict[str, Any]:
    """Build shard ``index`` and write it atomically; runs in a worker process."""
    table, skipped = _build_table(payload, on_bad_image, max_pixels)
    row_bytes = max(1, table.nbytes // max(1, table.num_rows))
    meta = dict(table.schema.metadata or {})
    meta[b"simsiam.skipped"] = json.dumps(skipped).encode()
    table = table.replace_schema_metadata(meta)
    encoded = payload[0] == "files" or payload[-1] == "encoded"
    buf = pa.BufferOutputStream()
    pq.write_table(
        table, buf,
        row_group_size=max(1, min(table.num_rows, ROW_GROUP_TARGET_BYTES // row_bytes)),
        # JPEG/PNG bytes do not compress; raw pixels do, cheaply.
        compression={"image": "none" if encoded else "zstd", "label": "zstd", "id": "zstd",
                     "height": "zstd", "width": "zstd", "channels": "zstd"},
        # Min/max statistics of an image column would copy image bytes into every footer.
        write_statistics=["label", "height", "width", "channels"],
    )
    data = buf.getvalue().to_pybytes()
    path = sio.join(dest, shard_name(index))
    atomic_write_bytes(path, data)
    publish(path)
    return _shard_info(index, table, len(data), skipped)


def publish(path: str | os.PathLike) -> None:
    """Make a written local file readable by all (an object store has no modes)."""
    # Temp files are created private (0600); shards are meant to be read by other users and services.
    if not sio.is_uri(path):
        os.chmod(path, 0o644)


def _shard_info(index: int, table_or_labels: Any, nbytes: int, skipped: list) -> dict[str, Any]:
    labels = (table_or_labels.column("label").to_numpy() if isinstance(table_or_labels, pa.Table)
              else table_or_labels)
    values, counts = np.unique(np.asarray(labels, dtype=np.int64), return_counts=True)
    return {"index": index, "file": shard_name(index), "rows": int(len(labels)), "bytes": int(nbytes),
            "counts": {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)}, "skipped": skipped}


def read_done_shard(dest: str, index: int) -> dict[str, Any] | None:
    """Info of a shard an earlier run finished, or None if it is absent or unreadable."""
    path = sio.join(dest, shard_name(index))
    try:
        with sio.open_input(path) as f:
            size = f.size()
            pf = pq.ParquetFile(f)
            labels = pf.read(columns=["label"]).column("label").to_numpy()
            raw = (pf.schema_arrow.metadata or {}).get(b"simsiam.skipped", b"[]")
        skipped = [tuple(x) for x in json.loads(raw)]
    except FileNotFoundError:
        return None
    except (pa.ArrowInvalid, OSError, ValueError):
        return None
    return _shard_info(index, labels, size, skipped)
