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

import pyarrow as pa

from simsiam import io as sio
from simsiam.config import DataConfig
from simsiam.data.schema import (
    METADATA_FILE,
    PLAN_FILE,
    SCHEMA_VERSION,
    SHARD_PREFIX,
    SHARD_SUFFIX,
    DataError,
)
from simsiam.data.shard_writer import publish, read_done_shard, write_shard
from simsiam.data.sources import BUILTIN_SOURCES, Source, digits_split, folder_source, npz_sources
from simsiam.io import atomic_write_json

__all__ = ["ConvertReport", "Progress", "convert", "digits_split", "write_dataset"]

SHARD_TARGET_BYTES = 64 << 20
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


def _default_shard_rows(source: Source) -> int:
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

def write_dataset(source: Source, dest: str | os.PathLike, *, overwrite: bool = False,
                  shard_rows: int | None = None, workers: int | None = None, on_bad_image: str = "error",
                  progress: Progress | None = None, max_pixels: int = DataConfig().max_pixels) -> ConvertReport:
    """Write one source as a dataset directory (shards + ``_simsiam.json``), resuming when possible.
    Source images over ``max_pixels`` are bad images (stopped at, or skipped and counted)."""
    t0 = time.monotonic()
    dest = sio.absolute(dest)
    plan = _plan(source, shard_rows, on_bad_image, max_pixels)
    state, meta = _prepare(dest, plan, overwrite)
    report = ConvertReport(str(dest), class_names=list(source.class_names))
    if state == "done":
        report.up_to_date = True
        report.num_rows, report.num_shards = meta["num_rows"], len(meta["shards"])
        report.counts = dict(meta["counts"])
        return report
    if state == "resume":
        infos = _finished_shards(dest, plan["num_shards"])
        report.reused_shards = len(infos)
    else:
        infos = {}
        atomic_write_json(sio.join(dest, PLAN_FILE), plan)
    _write_missing_shards(source, dest, plan, infos, workers, max_pixels, progress)
    _finish(source, dest, plan, [infos[k] for k in range(plan["num_shards"])], report)
    report.seconds = time.monotonic() - t0
    return report


def _plan(source: Source, shard_rows: int | None, on_bad_image: str, max_pixels: int) -> dict[str, Any]:
    """The conversion plan: everything that decides the shards' contents (saved for resuming)."""
    if on_bad_image not in ("error", "skip"):
        raise DataError(f"on_bad_image: {on_bad_image!r} is not allowed; choose error or skip")
    rows_per_shard = int(shard_rows) if shard_rows else _default_shard_rows(source)
    if rows_per_shard < 1:
        raise DataError(f"shard_rows: {shard_rows} is out of range; must be >= 1")
    plan = {"schema_version": SCHEMA_VERSION, "source": source.fingerprint, "num_rows": source.num_rows,
            "shard_rows": rows_per_shard, "num_shards": math.ceil(source.num_rows / rows_per_shard),
            "storage": source.storage, "class_names": source.class_names, "on_bad_image": on_bad_image}
    if max_pixels != DataConfig().max_pixels:  # only then, so datasets planned before this option still match
        plan["max_pixels"] = max_pixels
    return plan


def _finished_shards(dest: str, num_shards: int) -> dict[int, dict]:
    """{index: info} of the shards an interrupted run of the same plan finished; its temp files removed."""
    for n in sio.names(dest):
        if n.endswith(".tmp"):  # left by a local writer that was killed mid-write
            sio.remove(sio.join(dest, n))
    infos = {}
    for k in range(num_shards):
        info = read_done_shard(str(dest), k)
        if info is not None:
            infos[k] = info
    return infos


def _write_missing_shards(source: Source, dest: str, plan: dict, infos: dict[int, dict], workers: int | None,
                          max_pixels: int, progress: Progress | None) -> None:
    """Write every shard not in ``infos`` (in worker processes when there is enough work), adding its info."""
    rows_per_shard, num_shards = plan["shard_rows"], plan["num_shards"]
    todo = [k for k in range(num_shards) if k not in infos]
    args = [(str(dest), k, source.payload(k * rows_per_shard, min(source.num_rows, (k + 1) * rows_per_shard)),
             plan["on_bad_image"], max_pixels) for k in todo]
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
            futures = [pool.submit(write_shard, *a) for a in args]
            try:
                for fut in futures:
                    finished(fut.result())
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    else:
        for a in args:
            finished(write_shard(*a))


def _finish(source: Source, dest: str, plan: dict, shards: list[dict], report: ConvertReport) -> None:
    """Total the shards into ``report`` and write ``_simsiam.json`` last: from then on DEST is complete."""
    counts: dict[str, int] = {}
    for info in shards:
        for label, c in info["counts"].items():
            counts[label] = counts.get(label, 0) + c
        report.skipped += [tuple(s) for s in info["skipped"]]
    report.num_rows = sum(i["rows"] for i in shards)
    if report.num_rows == 0:
        raise DataError(f"DEST {dest}: every image was skipped as bad; nothing to write")
    report.num_shards = len(shards)
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
    publish(sio.join(dest, METADATA_FILE))
    sio.remove(sio.join(dest, PLAN_FILE))


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
            sources = npz_sources(src, images_key, labels_key)
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
                sources = {None: folder_source(src)}
    reports = []
    for split, source in sources.items():
        out = sio.join(dest, split) if split else dest
        label = split or out.rstrip("/").rsplit("/", 1)[-1]
        reports.append(write_dataset(source, out, overwrite=overwrite, shard_rows=shard_rows, workers=workers,
                                     on_bad_image=on_bad_image, max_pixels=max_pixels,
                                     progress=_stderr_progress(label) if progress else None))
    return reports
