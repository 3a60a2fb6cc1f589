"""The shard format: Parquet files of images plus one JSON file of metadata.

A dataset is a directory (local, or a URI pyarrow understands: s3://, gs://, ...) holding

- ``part-00000.parquet``, ``part-00001.parquet``, ... with the columns

  ========  ========  =========================================================================
  column    type      meaning
  ========  ========  =========================================================================
  image     binary    the encoded file's bytes (JPEG/PNG, kept as found), or raw uint8 pixels
  label     int64     class index into ``class_names``; -1 when unknown
  id        string    unique row id (the source file's relative path, or ``<source>/<index>``)
  height    int32     raw images only: rows; null for encoded images
  width     int32     raw images only: columns; null for encoded images
  channels  int32     raw images only: 1 (gray) or 3 (RGB), HWC order; null for encoded images
  ========  ========  =========================================================================

  A row whose ``height`` is set is raw (``len(image) == height * width * channels``); otherwise the
  bytes are decoded with PIL. Raw storage is for small images (<= 64 px), where decoding would cost
  more than it saves. Row groups hold a few MiB, so a reader streams a shard without loading it.

- ``_simsiam.json``: ``schema_version``, ``class_names``, ``num_rows``, ``counts`` (rows per label,
  "-1" for unlabeled), ``shards`` (file, rows, bytes), ``image_storage`` (raw/encoded) and the
  source it was converted from. It is written last, so its presence marks a complete conversion.

Images are always delivered as 3 channels: gray sources are replicated to RGB at decode.

Wherever a dataset path is accepted, a *shard list* may stand in for a directory: a file named
``*.shards.txt`` (one shard path or URI per line; blank lines and lines starting with ``#`` ignored) or
``*.shards.json`` (``{"shards": [path, ...]}``, other keys ignored). Relative entries are relative to
the list's own directory. A list carries no ``_simsiam.json``, so its row and label counts come from
the shards themselves. Scheduled retraining uses lists to train on exactly the shards it picked.
"""
from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from simsiam import io as sio
from simsiam.io import absolute, is_uri, join  # noqa: F401 - re-exported: dataset paths are storage paths

SCHEMA_VERSION = 1
METADATA_FILE = "_simsiam.json"
# Present only while a conversion is in progress (or was interrupted): it records the plan to resume.
PLAN_FILE = "_simsiam.convert.json"
SHARD_PREFIX = "part-"
SHARD_SUFFIX = ".parquet"
SHARD_LIST_SUFFIXES = (".shards.txt", ".shards.json")

SCHEMA = pa.schema([
    pa.field("image", pa.binary(), nullable=False),
    pa.field("label", pa.int64(), nullable=False),
    pa.field("id", pa.string(), nullable=False),
    pa.field("height", pa.int32()),
    pa.field("width", pa.int32()),
    pa.field("channels", pa.int32()),
], metadata={b"simsiam.schema_version": str(SCHEMA_VERSION).encode()})

REQUIRED = ("image", "label", "id")
RAW_COLUMNS = ("height", "width", "channels")


class DataError(ValueError):
    """Bad or missing data: the message names the path, shard, row or field at fault."""


def _data_error_in(e: BaseException) -> DataError | None:
    """Our DataError inside the wrappers Ray puts around an exception raised in a task, if any."""
    seen = 0
    while e is not None and seen < 16:
        if isinstance(e, DataError) and type(e) is DataError:
            return e
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
        seen += 1
    return None


T = TypeVar("T")


def plain_data_errors(batches: Iterator[T]) -> Iterator[T]:
    """``batches`` (from a Ray Data iterator), re-raising a bad-data error from a Ray task as the plain
    one-line DataError it started as, rather than Ray's wrapper whose message is mostly remote traceback."""
    try:
        yield from batches
    except Exception as e:  # Ray wraps task errors in several exception types
        found = _data_error_in(e)
        if found is None:
            raise
        # Ray appends its retry advice as extra lines; the first line is the whole story.
        raise DataError(str(found).splitlines()[0]) from None


def shard_name(index: int) -> str:
    return f"{SHARD_PREFIX}{index:05d}{SHARD_SUFFIX}"


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI (s3://, gs://, file://, ...); see simsiam/io.py."""
    try:
        return sio.filesystem(path)
    except sio.StorageError as e:
        raise DataError(str(e)) from None


def _check_type(col: str, t: pa.DataType) -> str | None:
    ok = {
        "image": pa.types.is_binary(t) or pa.types.is_large_binary(t),
        "label": pa.types.is_integer(t),
        "id": pa.types.is_string(t) or pa.types.is_large_string(t),
    }.get(col, pa.types.is_integer(t))
    if ok:
        return None
    want = {"image": "binary", "label": "int64", "id": "string"}.get(col, "int32")
    return f"column {col!r} is {t}, expected {want}"


def check_schema(schema: pa.Schema, where: str) -> None:
    """Raise :class:`DataError` naming ``where`` unless ``schema`` has the shard columns and types."""
    names = set(schema.names)
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise DataError(f"{where}: wrong schema: missing column(s) {', '.join(missing)} "
                        f"(has {', '.join(schema.names) or 'none'}); expected {', '.join(SCHEMA.names)}")
    for col in (*REQUIRED, *RAW_COLUMNS):
        if col in names:
            problem = _check_type(col, schema.field(col).type)
            if problem:
                raise DataError(f"{where}: wrong schema: {problem}")


def _is_shard(name: str) -> bool:
    base = posixpath.basename(name)
    return base.endswith(SHARD_SUFFIX) and not base.startswith((".", "_"))


def is_shard_list(path: str) -> bool:
    """True when ``path`` names a shard-list file (``*.shards.txt`` / ``*.shards.json``)."""
    return str(path).rstrip("/").endswith(SHARD_LIST_SUFFIXES)


def read_shard_list(path: str, what: str = "data.path") -> list[str]:
    """The shard paths a shard-list file names, in its order, relative entries resolved against the
    list's directory. :class:`DataError` naming the list (and line) when it is unreadable, empty,
    repeats a shard, names another list, or names a local shard that does not exist."""
    fs, inner = filesystem(path)
    try:
        with fs.open_input_stream(inner) as f:
            text = f.read().decode()
    except FileNotFoundError:
        raise DataError(f"{what}: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{what}: {path}: unreadable shard list: {e}") from None
    entries: list[tuple[str, str]] = []  # (entry, where it came from)
    if path.endswith(".json"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{what}: {path}: not valid JSON: {e}") from None
        items = doc.get("shards") if isinstance(doc, dict) else None
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise DataError(f'{what}: {path}: expected {{"shards": ["part-00000.parquet", ...]}} (a list of '
                            "path strings)")
        entries = [(x.strip(), f"{path}: shards[{i}]") for i, x in enumerate(items)]
    else:
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if line and not line.startswith("#"):
                entries.append((line, f"{path}:{n}"))
    base = posixpath.dirname(path.rstrip("/")) if is_uri(path) else os.path.dirname(absolute(path))
    out: list[str] = []
    seen: set[str] = set()
    for entry, where in entries:
        if not entry:
            raise DataError(f"{what}: {where}: empty shard path")
        full = entry if is_uri(entry) or os.path.isabs(entry) else join(base, entry)
        if not is_uri(full):
            full = os.path.normpath(full)
        if is_shard_list(full):
            raise DataError(f"{what}: {where}: {entry} is itself a shard list; lists do not nest")
        if full in seen:
            raise DataError(f"{what}: {where}: {entry} is listed twice")
        if not is_uri(full) and not os.path.isfile(full):
            raise DataError(f"{what}: {where}: shard {full} does not exist")
        seen.add(full)
        out.append(full)
    if not out:
        raise DataError(f"{what}: {path}: the shard list is empty")
    return out


def list_shards(path: str, what: str = "data.path") -> list[str]:
    """Sorted shard paths under a dataset directory (or the single file given, or the shards a
    shard-list file names, in its order); clear errors otherwise.

    ``what`` names the setting the path came from, for the error message.
    """
    if not path or not str(path).strip():
        raise DataError(f"{what} is empty: give a directory (or URI) of Parquet shards, or builtin:shapes")
    path = absolute(path)
    fs, inner = filesystem(path)
    try:
        info = fs.get_file_info(inner)
        files = (fs.get_file_info(pafs.FileSelector(inner, recursive=False))
                 if info.type == pafs.FileType.Directory else [])
    except OSError as e:  # unreachable store, missing or wrong credentials: say which and where
        raise DataError(f"{what}: {sio.describe_error(path, e)}") from None
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{what}: {path} does not exist")
    if info.type == pafs.FileType.File:
        return read_shard_list(path, what) if is_shard_list(path) else [path]
    prefix = path.rstrip("/")
    shards = sorted(prefix + "/" + posixpath.basename(f.path) for f in files
                    if f.type == pafs.FileType.File and _is_shard(f.path))
    if not shards:
        names = {posixpath.basename(f.path) for f in files}
        if PLAN_FILE in names:
            raise DataError(f"{what}: {path} holds an unfinished conversion; rerun 'simsiam data convert' "
                            "with the same arguments to resume it")
        raise DataError(f"{what}: {path} contains no .parquet shards")
    names = {posixpath.basename(f.path) for f in files}
    if PLAN_FILE in names and METADATA_FILE not in names:
        raise DataError(f"{what}: {path} holds an unfinished conversion (no {METADATA_FILE}); rerun "
                        "'simsiam data convert' with the same arguments to resume it")
    return shards


def read_shard_schemas(shards: list[str], threads: int = 16) -> list[tuple[pa.Schema, int, int]]:
    """(schema, rows, uncompressed bytes) of each shard from its footer alone, read in parallel
    (footers on remote stores are slow to fetch one by one)."""

    def one(shard: str) -> tuple[pa.Schema, int, int]:
        fs, inner = filesystem(shard)
        try:
            with fs.open_input_file(inner) as f:
                md = pq.ParquetFile(f).metadata
                size = sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups))
                return md.schema.to_arrow_schema(), md.num_rows, size
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{shard}: not a readable Parquet file: {e}") from None

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(shards)))) as pool:
        return list(pool.map(one, shards))


def read_column(shard: str, column: str) -> pa.ChunkedArray:
    """One column of one shard (only that column's pages are read)."""
    fs, inner = filesystem(shard)
    try:
        with fs.open_input_file(inner) as f:
            return pq.read_table(f, columns=[column]).column(column)
    except (pa.ArrowInvalid, OSError, KeyError) as e:
        raise DataError(f"{shard}: cannot read column {column!r}: {e}") from None


def duplicate_ids(shards: list[str], limit: int = 5, threads: int = 16) -> tuple[int, dict[str, list[tuple[str, int]]]]:
    """How many ids occur in more than one row of ``shards``, and where (shard, row index) the first
    ``limit`` of them (in sorted order) occur. Reads only the ``id`` column."""
    import pyarrow.compute as pc

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(shards)))) as pool:
        columns = [c.cast(pa.large_string()) for c in pool.map(lambda s: read_column(s, "id"), shards)]
    chunks = [chunk for c in columns for chunk in c.chunks]
    if not chunks:
        return 0, {}
    counts = pc.value_counts(pa.chunked_array(chunks, pa.large_string()))
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(repeated) == 0:
        return 0, {}
    shown = pa.array(sorted(repeated.to_pylist())[:limit], pa.large_string())
    where: dict[str, list[tuple[str, int]]] = {v: [] for v in shown.to_pylist()}
    for shard, col in zip(shards, columns, strict=True):
        flat = col.combine_chunks()
        for i in pc.indices_nonzero(pc.is_in(flat, value_set=shown)).to_pylist():
            where[flat[i].as_py()].append((shard, int(i)))
    return len(repeated), where


def describe_duplicates(count: int, where: dict[str, list[tuple[str, int]]]) -> str:
    """``"3 ids occur more than once: 'a' (part-00000.parquet row 3, part-00001.parquet row 0); ..."``"""
    examples = "; ".join(f"{i!r} (" + ", ".join(f"{posixpath.basename(s)} row {r}" for s, r in rows) + ")"
                         for i, rows in where.items())
    more = f"; and {count - len(where)} more" if count > len(where) else ""
    return f"{count} id{'s' if count != 1 else ''} occur{'' if count != 1 else 's'} more than once: {examples}{more}"


def check_unique_ids(path: str, what: str = "data.path") -> None:
    """Raise :class:`DataError` naming the repeated ids and their shards and rows when two rows of the
    dataset at ``path`` share an ``id`` (the schema requires unique ids: checkpoints, skip lists and
    evaluations refer to rows by id). Reads only the ``id`` column of every shard."""
    shards = list_shards(path, what)
    count, where = duplicate_ids(shards)
    if count:
        raise DataError(f"{what}: {path}: {describe_duplicates(count, where)}; the schema requires unique ids "
                        "- reconvert the source, or remove the repeated rows")


@dataclass
class ShardSet:
    """A validated dataset: its shard paths, the shard columns they all share, rows and bytes."""

    shards: list[str]
    columns: list[str]
    num_rows: int
    num_bytes: int


def validate_shards(path: str, what: str = "data.path") -> ShardSet:
    """List the shards of ``path`` and check every schema (and that they agree); error on 0 rows."""
    shards = list_shards(path, what)
    total = size = 0
    cols: list[str] | None = None
    for shard, (schema, rows, nbytes) in zip(shards, read_shard_schemas(shards), strict=True):
        check_schema(schema, shard)
        have = [c for c in (*REQUIRED, *RAW_COLUMNS) if c in schema.names]
        if cols is None:
            cols = have
        elif have != cols:
            raise DataError(f"{shard}: wrong schema: columns {', '.join(have)} differ from {shards[0]}'s "
                            f"({', '.join(cols)}); all shards of a dataset must agree")
        total += rows
        size += nbytes
    if total == 0:
        raise DataError(f"{what}: {path} has 0 rows")
    return ShardSet(shards, cols or [], total, size)


def read_metadata(path: str) -> dict[str, Any]:
    """The dataset's ``_simsiam.json`` as a dict; :class:`DataError` if missing or malformed."""
    if is_shard_list(path):
        # Same message as a directory without metadata, so callers fall back to reading the shards.
        raise DataError(f"{path}: no {METADATA_FILE} (a shard list; its counts come from the shards)")
    fs, inner = filesystem(path)
    meta_path = inner.rstrip("/") + "/" + METADATA_FILE
    try:
        with fs.open_input_stream(meta_path) as f:
            meta = json.loads(f.read().decode())
    except FileNotFoundError:
        raise DataError(f"{path}: no {METADATA_FILE} (not a converted dataset, or the conversion did not "
                        "finish)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{join(path, METADATA_FILE)}: unreadable: {e}") from None
    if not isinstance(meta, dict) or "schema_version" not in meta:
        raise DataError(f"{join(path, METADATA_FILE)}: not simsiam shard metadata (no schema_version)")
    if meta["schema_version"] > SCHEMA_VERSION:
        raise DataError(f"{join(path, METADATA_FILE)}: schema_version {meta['schema_version']} is newer than "
                        f"this code understands ({SCHEMA_VERSION}); upgrade simsiam")
    return meta
