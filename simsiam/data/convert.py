"""Convert image folders, .npz arrays and the built-in sets (shapes, digits) into Parquet shards (see schema.py).

Rules every conversion follows:

- DEST is a local directory or an object-store URI (s3://, gs://; see simsiam/io.py). Each shard is
  written atomically - locally to a temp name renamed into place, on an object store as one upload -
  and ``_simsiam.json`` is written last, so a reader never sees half a shard and a dataset without its
  metadata is known to be unfinished.
- The plan (source fingerprint, rows per shard, options) is saved first as ``_simsiam.convert.json``.
  Rerunning the same command after an interruption keeps every finished shard and writes the rest;
  rows map to shards deterministically, so nothing is duplicated or lost.
- An existing dataset is never replaced without ``overwrite``; the same conversion run again is a
  no-op. Files this module did not write are never deleted.
- Shards are built in parallel worker processes (one per core by default) when there is enough work.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from simsiam import io as sio
from simsiam.config import DataConfig
from simsiam.data.decode import BadImage, decode
from simsiam.data.schema import (
    METADATA_FILE,
    PLAN_FILE,
    SCHEMA,
    SCHEMA_VERSION,
    SHARD_PREFIX,
    SHARD_SUFFIX,
    DataError,
    shard_name,
)
from simsiam.io import atomic_write_bytes, atomic_write_json

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
KEEP_FORMATS = ("JPEG", "PNG")  # stored as found; other formats are transcoded to PNG (lossless)
RAW_MAX_SIDE = 64               # arrays with both sides <= this are stored raw, larger ones as PNG
SHARD_TARGET_BYTES = 64 << 20
ROW_GROUP_TARGET_BYTES = 8 << 20
MIN_SHARDS = 16                 # small sets still get several shards, for read parallelism and file shuffle
MIN_SHARD_ROWS = 256
POOL_MIN_BYTES = 16 << 20       # below this, worker start-up costs more than it saves

# A progress callback receives (shards done, shards total, rows done, rows total).
Progress = Callable[[int, int, int, int], None]


@dataclass
class ConvertReport:
    """What one dataset directory's conversion did."""

    dest: str
    num_rows: int = 0
    num_shards: int = 0
    bytes: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (source item, reason)
    reused_shards: int = 0
    up_to_date: bool = False
    seconds: float = 0.0

    def summary(self) -> str:
        if self.up_to_date:
            return f"{self.dest}: already converted from this source ({self.num_rows} rows); nothing to do"
        by_class = ", ".join(f"{self._name(k)}: {v}" for k, v in sorted(self.counts.items(), key=lambda kv: int(kv[0])))
        lines = [f"{self.dest}: {self.num_rows} rows in {self.num_shards} shards, {self.bytes / 2**20:.1f} MiB, "
                 f"{self.seconds:.1f} s" + (f" ({self.reused_shards} shards kept from an earlier run)"
                                             if self.reused_shards else ""),
                 f"  per class: {by_class}"]
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} bad image(s):")
            lines += [f"    {item}: {reason}" for item, reason in self.skipped[:20]]
            if len(self.skipped) > 20:
                lines.append(f"    ... and {len(self.skipped) - 20} more")
        return "\n".join(lines)

    def _name(self, label: str) -> str:
        i = int(label)
        if i < 0:
            return "unlabeled"
        return self.class_names[i] if i < len(self.class_names) else label


# --------------------------------------------------------------------------- sources
#
# A source turns into picklable per-shard payloads; a worker process builds and writes each shard from
# its payload alone, so the parent never holds more than the source's index.


@dataclass
class _Source:
    kind: str                 # "files" or "array"
    fingerprint: dict         # identifies the input; part of the resume plan
    num_rows: int
    class_names: list[str]
    storage: str              # "encoded" or "raw" (arrays <= 64 px)
    est_row_bytes: int
    files: list[tuple[str, str, int]] | None = None   # (id, absolute path, label)
    images: np.ndarray | None = None
    labels: np.ndarray | None = None
    id_prefix: str = ""

    def payload(self, start: int, stop: int) -> tuple:
        if self.kind == "files":
            return ("files", self.files[start:stop])
        return ("array", np.ascontiguousarray(self.images[start:stop]), self.labels[start:stop],
                self.id_prefix, start, self.storage)


def _images_under(d: Path) -> list[Path]:
    """Image files anywhere under ``d``, in a stable (sorted) order; hidden files and folders skipped."""
    out = []
    for root, dirs, names in os.walk(d):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        out += [Path(root) / n for n in sorted(names)
                if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
    return out


def _folder_source(src: Path) -> _Source:
    if not src.is_dir():
        raise DataError(f"SRC {src}: not a directory, .npz file or --builtin name")
    top_files = sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.name.lower().endswith(IMAGE_EXTENSIONS))
    class_dirs = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_dirs = [d for d in class_dirs if _images_under(d)]
    if top_files and class_dirs:
        raise DataError(f"SRC {src}: has both images at the top level ({top_files[0].name}, ...) and class "
                        f"sub-folders ({class_dirs[0].name}, ...); use one layout")
    files: list[tuple[str, str, int]] = []
    if class_dirs:
        class_names = [d.name for d in class_dirs]
        for label, d in enumerate(class_dirs):
            files += [(p.relative_to(src).as_posix(), str(p), label) for p in _images_under(d)]
    else:
        class_names = []
        files = [(p.name, str(p), -1) for p in top_files]
    return _files_source(src, files, class_names)


def _files_source(src: Path, files: list[tuple[str, str, int]], class_names: list[str],
                  extra: dict | None = None) -> _Source:
    """A source of image files ``(id, path, label)`` found under ``src``, fingerprinted by names, sizes
    and mtimes (so a resume notices changed files)."""
    if not files:
        raise DataError(f"SRC {src}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    digest = hashlib.sha1()
    total = 0
    for rel, path, label in files:
        st = os.stat(path)
        total += st.st_size
        digest.update(f"{rel}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return _Source("files", {"type": "folder", "path": str(src.resolve()), "files": len(files),
                             "sha1": digest.hexdigest(), **(extra or {})},
                   len(files), class_names, "encoded", max(1, total // len(files)), files=files)


def _as_nhwc(images: np.ndarray, where: str) -> np.ndarray:
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise DataError(f"{where}: expected images shaped (N, H, W), (N, H, W, C) or (N, C, H, W), "
                        f"got {images.shape}")
    if images.shape[-1] not in (1, 3, 4) and images.shape[1] in (1, 3):
        images = images.transpose(0, 2, 3, 1)
    if images.shape[-1] == 4:
        images = images[..., :3]
    if images.shape[-1] not in (1, 3):
        raise DataError(f"{where}: cannot tell the channel axis of images shaped {images.shape} "
                        "(need 1 or 3 channels first or last)")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.integer):
            raise DataError(f"{where}: images must be uint8 (0..255), got {images.dtype}; scale and cast them "
                            "first")
        lo, hi = int(images.min()), int(images.max())
        if lo < 0 or hi > 255:
            raise DataError(f"{where}: integer images must lie in 0..255, found {lo}..{hi}")
        images = images.astype(np.uint8)
    return images


def _labels_array(labels: np.ndarray | None, n: int, where: str) -> np.ndarray:
    if labels is None:
        return np.full(n, -1, dtype=np.int64)
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or labels.shape[0] != n:
        raise DataError(f"{where}: labels shaped {labels.shape} do not match {n} images")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: labels must be integers, got {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.size and labels.min() < -1:
        raise DataError(f"{where}: labels must be >= 0 (or -1 for unknown), found {labels.min()}")
    return labels


def _array_source(images: np.ndarray, labels: np.ndarray | None, class_names: list[str] | None,
                  fingerprint: dict, id_prefix: str, where: str) -> _Source:
    images = _as_nhwc(images, where)
    labels = _labels_array(labels, images.shape[0], where)
    if images.shape[0] == 0:
        raise DataError(f"{where}: no images (0 rows)")
    if class_names is None:
        top = int(labels.max()) if labels.size else -1
        class_names = [str(i) for i in range(top + 1)]
    elif labels.size and labels.max() >= len(class_names):
        raise DataError(f"{where}: label {labels.max()} but only {len(class_names)} class names")
    h, w, c = images.shape[1:]
    storage = "raw" if max(h, w) <= RAW_MAX_SIDE else "encoded"
    row_bytes = h * w * c if storage == "raw" else max(1, h * w * c // 2)
    fp = {**fingerprint, "shape": list(images.shape), "sha1": hashlib.sha1(
        images[:: max(1, len(images) // 64)].tobytes() + labels.tobytes()).hexdigest()}
    return _Source("array", fp, int(images.shape[0]), list(class_names), storage, row_bytes,
                   images=images, labels=labels, id_prefix=id_prefix)


_NPZ_SPLITS = (("x_train", "y_train", "train"), ("x_test", "y_test", "test"))
_NPZ_SINGLE = (("images", "labels"), ("x", "y"), ("data", "labels"), ("X", "y"))
_NPZ_CLASS_NAMES = ("class_names", "label_names", "classes")


def _npz_sources(src: Path, images_key: str | None, labels_key: str | None) -> dict[str | None, _Source]:
    """{split name or None: source}. Split arrays (x_train/y_train, x_test/y_test) become DEST/train, DEST/test."""
    try:
        npz = np.load(src, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"SRC {src}: not a readable .npz file: {e}") from None
    with npz:
        keys = set(npz.files)
        class_names = None
        for k in _NPZ_CLASS_NAMES:
            if k in keys:
                class_names = [str(x) for x in npz[k].tolist()]
                break
        st = src.stat()
        base = {"type": "npz", "path": str(src.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if images_key:
            pairs = [(images_key, labels_key, None)]
        elif "x_train" in keys:
            pairs = [(x, y if y in keys else None, s) for x, y, s in _NPZ_SPLITS if x in keys]
        else:
            found = next(((x, y) for x, y in _NPZ_SINGLE if x in keys), None)
            if found is None:
                raise DataError(f"SRC {src}: no image array found; keys are {', '.join(sorted(keys))}. Expected "
                                "x_train/y_train (+ x_test/y_test), images/labels or x/y, or pass --images-key")
            pairs = [(found[0], labels_key or (found[1] if found[1] in keys else None), None)]
        out: dict[str | None, _Source] = {}
        for x, y, split in pairs:
            if x not in keys:
                raise DataError(f"SRC {src}: no array {x!r}; keys are {', '.join(sorted(keys))}")
            if y is not None and y not in keys:
                raise DataError(f"SRC {src}: no array {y!r}; keys are {', '.join(sorted(keys))}")
            where = f"{src}[{x}]"
            out[split] = _array_source(npz[x], npz[y] if y else None, class_names,
                                       {**base, "images_key": x, "labels_key": y}, split or src.stem, where)
        return out


def digits_split() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """scikit-learn's digits as uint8 (x 255/16), split 80/20 stratified with random_state=0.

    Returns {"train": (images, labels, original indices), "test": (...)}.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    idx = np.arange(len(images))
    tr, te = train_test_split(idx, test_size=0.2, random_state=0, stratify=d.target)
    return {"train": (images[tr], d.target[tr].astype(np.int64), tr),
            "test": (images[te], d.target[te].astype(np.int64), te)}


def _shapes_sources() -> dict[str | None, _Source]:
    from simsiam.data import shapes

    out = {}
    for split, (images, labels) in shapes.shapes_split().items():
        fp = {"type": "builtin", "name": "shapes", "split": split, "version": shapes.VERSION, "seed": 0}
        out[split] = _array_source(images, labels, list(shapes.CLASSES), fp, f"shapes/{split}", f"shapes[{split}]")
    return out


# The built-in sets: name -> sources of its train and test splits (``--builtin NAME``, ``builtin:NAME``).
BUILTIN_SOURCES: dict[str, Callable[[], dict[str | None, _Source]]] = {}


def _digits_sources() -> dict[str | None, _Source]:
    import sklearn

    out = {}
    for split, (images, labels, _) in digits_split().items():
        fp = {"type": "builtin", "name": "digits", "split": split, "sklearn": sklearn.__version__}
        out[split] = _array_source(images, labels, [str(i) for i in range(10)], fp, f"digits/{split}",
                                   f"digits[{split}]")
    return out


BUILTIN_SOURCES.update(shapes=_shapes_sources, digits=_digits_sources)


# --------------------------------------------------------------------------- building one shard


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


def _write_shard(dest: str, index: int, payload: tuple, on_bad_image: str, max_pixels: int) -> dict[str, Any]:
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
    _publish(path)
    return _shard_info(index, table, len(data), skipped)


def _publish(path: str | os.PathLike) -> None:
    # Temp files are created private (0600); shards are meant to be read by other users and services.
    if not sio.is_uri(path):
        os.chmod(path, 0o644)


def _shard_info(index: int, table_or_labels: Any, nbytes: int, skipped: list) -> dict[str, Any]:
    labels = (table_or_labels.column("label").to_numpy() if isinstance(table_or_labels, pa.Table)
              else table_or_labels)
    values, counts = np.unique(np.asarray(labels, dtype=np.int64), return_counts=True)
    return {"index": index, "file": shard_name(index), "rows": int(len(labels)), "bytes": int(nbytes),
            "counts": {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)}, "skipped": skipped}


def _read_done_shard(dest: str, index: int) -> dict[str, Any] | None:
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


# --------------------------------------------------------------------------- the writer


def _is_ours(name: str) -> bool:
    return (name in (METADATA_FILE, PLAN_FILE) or (name.startswith(SHARD_PREFIX) and name.endswith(SHARD_SUFFIX))
            or (name.startswith(f".{SHARD_PREFIX}") or name.startswith((f".{METADATA_FILE}", f".{PLAN_FILE}")))
            and name.endswith(".tmp"))


def _clear(dest: str) -> None:
    present = sio.names(dest)
    foreign = [n for n in present if not _is_ours(n)]
    if foreign:
        raise DataError(f"DEST {dest}: also holds files this tool did not write ({', '.join(sorted(foreign)[:3])}"
                        f"{', ...' if len(foreign) > 3 else ''}); refusing to delete them - choose another DEST")
    # The metadata first: from then on the dataset reads as unfinished, never as complete with shards missing.
    for n in sorted(present, key=lambda n: n != METADATA_FILE):
        sio.remove(sio.join(dest, n))


def _default_shard_rows(source: _Source) -> int:
    by_bytes = max(1, SHARD_TARGET_BYTES // source.est_row_bytes)
    by_count = max(MIN_SHARD_ROWS, math.ceil(source.num_rows / MIN_SHARDS))
    return int(min(by_bytes, by_count))


def _read_json_or(path: str, default: Any) -> Any:
    try:
        return sio.read_json(path, default)
    except (OSError, ValueError):
        return default


def _prepare(dest: str, plan: dict, overwrite: bool) -> tuple[str, dict | None]:
    """Decide what to do with DEST: ("fresh" | "resume" | "done", existing metadata)."""
    try:
        if sio.is_file(dest):
            raise DataError(f"DEST {dest}: exists and is not a directory")
        names = set(sio.names(dest))
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"DEST {sio.describe_error(dest, e)}") from None
    if not names:
        sio.make_dirs(dest)
        return "fresh", None
    if METADATA_FILE in names:
        meta = _read_json_or(sio.join(dest, METADATA_FILE), {})
        if overwrite:
            _clear(dest)
            return "fresh", None
        if meta.get("plan") == plan:
            return "done", meta
        origin = meta.get("source", {}).get("path") or meta.get("source", {}).get("name", "?")
        raise DataError(f"DEST {dest}: already holds a converted dataset (from {origin}); pass --overwrite to "
                        "replace it")
    if PLAN_FILE in names:
        old = _read_json_or(sio.join(dest, PLAN_FILE), None)
        if old == plan and not overwrite:
            return "resume", None
        if overwrite:
            _clear(dest)
            return "fresh", None
        raise DataError(f"DEST {dest}: holds an unfinished conversion of a different source or with different "
                        "options; rerun that conversion to finish it, or pass --overwrite to discard it")
    foreign = sorted(n for n in names if not _is_ours(n))
    if foreign:
        raise DataError(f"DEST {dest}: is not empty and is not a simsiam dataset (found {', '.join(foreign[:3])}"
                        f"{', ...' if len(foreign) > 3 else ''}); choose an empty or new directory")
    if not overwrite:
        raise DataError(f"DEST {dest}: holds shard files without a conversion plan; pass --overwrite to replace "
                        "them")
    _clear(dest)
    return "fresh", None


def _stderr_progress(label: str) -> Progress:
    state = {"last": 0.0, "t0": time.monotonic()}

    def report(done: int, total: int, rows: int, total_rows: int) -> None:
        now = time.monotonic()
        if done < total and now - state["last"] < 0.5:
            return
        state["last"] = now
        rate = rows / max(now - state["t0"], 1e-9)
        print(f"  {label}: {done}/{total} shards, {rows}/{total_rows} rows ({rate:,.0f} rows/s)",
              file=sys.stderr, flush=True)

    return report


def write_dataset(source: _Source, dest: str | os.PathLike, *, overwrite: bool = False,
                  shard_rows: int | None = None, workers: int | None = None, on_bad_image: str = "error",
                  progress: Progress | None = None, max_pixels: int = DataConfig().max_pixels) -> ConvertReport:
    """Write one source as a dataset directory (shards + ``_simsiam.json``), resuming when possible.
    Source images over ``max_pixels`` are bad images (stopped at, or skipped and counted)."""
    t0 = time.monotonic()
    dest = sio.absolute(dest)
    if on_bad_image not in ("error", "skip"):
        raise DataError(f"on_bad_image: {on_bad_image!r} is not allowed; choose error or skip")
    rows_per_shard = int(shard_rows) if shard_rows else _default_shard_rows(source)
    if rows_per_shard < 1:
        raise DataError(f"shard_rows: {shard_rows} is out of range; must be >= 1")
    num_shards = math.ceil(source.num_rows / rows_per_shard)
    plan = {"schema_version": SCHEMA_VERSION, "source": source.fingerprint, "num_rows": source.num_rows,
            "shard_rows": rows_per_shard, "num_shards": num_shards, "storage": source.storage,
            "class_names": source.class_names, "on_bad_image": on_bad_image}
    if max_pixels != DataConfig().max_pixels:  # only then, so datasets planned before this option still match
        plan["max_pixels"] = max_pixels
    state, meta = _prepare(dest, plan, overwrite)
    report = ConvertReport(str(dest), class_names=list(source.class_names))
    if state == "done":
        report.up_to_date = True
        report.num_rows, report.num_shards = meta["num_rows"], len(meta["shards"])
        report.counts = dict(meta["counts"])
        return report
    infos: dict[int, dict] = {}
    if state == "resume":
        for n in sio.names(dest):
            if n.endswith(".tmp"):  # left by a local writer that was killed mid-write
                sio.remove(sio.join(dest, n))
        for k in range(num_shards):
            info = _read_done_shard(str(dest), k)
            if info is not None:
                infos[k] = info
        report.reused_shards = len(infos)
    else:
        atomic_write_json(sio.join(dest, PLAN_FILE), plan)
    todo = [k for k in range(num_shards) if k not in infos]

    def payload(k: int) -> tuple:
        return source.payload(k * rows_per_shard, min(source.num_rows, (k + 1) * rows_per_shard))

    rows_done = sum(i["rows"] + len(i["skipped"]) for i in infos.values())

    def finished(info: dict) -> None:
        nonlocal rows_done
        infos[info["index"]] = info
        rows_done += info["rows"] + len(info["skipped"])
        if progress:
            progress(len(infos), num_shards, rows_done, source.num_rows)

    n_workers = workers if workers else (os.cpu_count() or 1)
    big = len(todo) * rows_per_shard * source.est_row_bytes >= POOL_MIN_BYTES
    if n_workers > 1 and len(todo) > 1 and (big or workers):
        # spawn, not fork: the caller may be a threaded process (a Ray worker, a trainer).
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(n_workers, len(todo)), mp_context=ctx) as pool:
            futures = [pool.submit(_write_shard, str(dest), k, payload(k), on_bad_image, max_pixels) for k in todo]
            try:
                for fut in futures:
                    finished(fut.result())
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    else:
        for k in todo:
            finished(_write_shard(str(dest), k, payload(k), on_bad_image, max_pixels))

    shards = [infos[k] for k in range(num_shards)]
    counts: dict[str, int] = {}
    for info in shards:
        for label, c in info["counts"].items():
            counts[label] = counts.get(label, 0) + c
        report.skipped += [tuple(s) for s in info["skipped"]]
    report.num_rows = sum(i["rows"] for i in shards)
    if report.num_rows == 0:
        raise DataError(f"DEST {dest}: every image was skipped as bad; nothing to write")
    report.num_shards = num_shards
    report.bytes = sum(i["bytes"] for i in shards)
    report.counts = counts
    metadata = {
        "schema_version": SCHEMA_VERSION,
        "format": "simsiam-parquet-shards",
        "image_storage": source.storage,
        "class_names": source.class_names,
        "num_rows": report.num_rows,
        "counts": dict(sorted(counts.items(), key=lambda kv: int(kv[0]))),
        "shards": [{"file": i["file"], "rows": i["rows"], "bytes": i["bytes"]} for i in shards],
        "skipped": [{"item": a, "reason": b} for a, b in report.skipped],
        "source": source.fingerprint,
        "plan": plan,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(sio.join(dest, METADATA_FILE), metadata)
    _publish(sio.join(dest, METADATA_FILE))
    sio.remove(sio.join(dest, PLAN_FILE))
    report.seconds = time.monotonic() - t0
    return report


# --------------------------------------------------------------------------- entry points


def convert(src: str | os.PathLike | None, dest: str | os.PathLike, *, builtin: str | None = None,
            overwrite: bool = False, shard_rows: int | None = None, workers: int | None = None,
            images_key: str | None = None, labels_key: str | None = None, on_bad_image: str = "error",
            progress: bool = False, val_labels: str | os.PathLike | None = None,
            max_pixels: int = DataConfig().max_pixels) -> list[ConvertReport]:
    """Convert an image folder, a .npz file, a CIFAR python folder, an ImageNet-style train/val folder
    (see :mod:`simsiam.data.formats`) or a built-in set into shards under ``dest``.

    Sources with splits (the digits, CIFAR, an .npz with x_train/x_test: ``dest/train`` and
    ``dest/test``; train/val folders: ``dest/train`` and ``dest/val``) write one directory per split;
    others write ``dest`` itself. Returns one report per dataset directory written.
    """
    from simsiam.data import formats

    dest = sio.absolute(dest)
    if builtin is not None:
        if builtin not in BUILTIN_SOURCES:
            raise DataError(f"--builtin {builtin!r}: unknown; available: {', '.join(BUILTIN_SOURCES)}")
        sources = BUILTIN_SOURCES[builtin]()
    else:
        if src is None or not str(src).strip():
            raise DataError("SRC is empty: give an image folder or a .npz file (or --builtin shapes|digits)")
        src = Path(src)
        if not src.exists():
            raise DataError(f"SRC {src}: does not exist")
        if src.is_file() and src.suffix.lower() == ".npz":
            sources = _npz_sources(src, images_key, labels_key)
        elif src.is_file():
            raise DataError(f"SRC {src}: a file that is not .npz; give an image folder or a .npz file")
        else:
            if images_key or labels_key:
                raise DataError("--images-key/--labels-key apply to .npz sources only")
            layout = formats.detect(src) if src.is_dir() else None
            if val_labels and layout != "split":
                raise DataError("--val-labels applies to a folder with train/ and val/ sub-folders only")
            if layout in ("cifar10", "cifar100"):
                sources = formats.cifar_sources(src, layout)
            elif layout == "split":
                sources = formats.split_sources(src, val_labels)
            else:
                sources = {None: _folder_source(src)}
    reports = []
    for split, source in sources.items():
        out = sio.join(dest, split) if split else dest
        label = split or out.rstrip("/").rsplit("/", 1)[-1]
        reports.append(write_dataset(source, out, overwrite=overwrite, shard_rows=shard_rows, workers=workers,
                                     on_bad_image=on_bad_image, max_pixels=max_pixels,
                                     progress=_stderr_progress(label) if progress else None))
    return reports
