"""The source scan of scheduled retraining: every shard of every finished conversion under a root."""
from __future__ import annotations

import posixpath
from dataclasses import asdict, dataclass, field

import pyarrow.fs as pafs

from simsiam.data.schema import (
    METADATA_FILE,
    PLAN_FILE,
    SHARD_SUFFIX,
    DataError,
    absolute,
    filesystem,
    read_metadata,
)


@dataclass(frozen=True)
class Shard:
    """One Parquet shard of a converted dataset, as found under the source root."""

    path: str            # absolute local path or URI
    size: int            # file bytes
    mtime_ns: int | None
    rows: int
    dataset: str         # the converted dataset directory holding it

    def same_file(self, entry: dict) -> bool:
        """Is this still the file the manifest ``entry`` recorded (a rewritten shard is new data)?"""
        if entry.get("size") != self.size or entry.get("rows") != self.rows:
            return False
        return entry.get("mtime_ns") is None or self.mtime_ns is None or entry["mtime_ns"] == self.mtime_ns

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Scan:
    """What :func:`scan_source` found: complete datasets' shards, and notes on what it skipped."""

    root: str
    shards: list[Shard] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)


def scan_source(root: str, what: str = "data.path") -> Scan:
    """Every shard of every finished conversion under ``root`` (searched recursively; local or URI).

    A dataset directory counts once its ``_simsiam.json`` exists (``simsiam data convert`` writes it
    last) and every shard it lists is there at the size it records; only those shards are taken, so a
    conversion or copy in progress, or stray files, are never trained on. Hidden paths (``.name``) are
    ignored. ``notes`` say what was skipped and why.
    """
    root = absolute(root).rstrip("/") or "/"
    fs, inner = filesystem(root)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{what}: {root} does not exist")
    if info.type != pafs.FileType.Directory:
        raise DataError(f"{what}: {root} is a file; retraining needs a directory of converted datasets "
                        "(each written by 'simsiam data convert')")
    inner = inner.rstrip("/")
    by_dir: dict[str, dict[str, pafs.FileInfo]] = {}
    for f in fs.get_file_info(pafs.FileSelector(inner, recursive=True)):
        if f.type != pafs.FileType.File:
            continue
        rel = f.path[len(inner):].lstrip("/")
        parent, name = posixpath.split(rel)
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        by_dir.setdefault(parent, {})[name] = f
    scan = Scan(root)
    for rel_dir in sorted(by_dir):
        files = by_dir[rel_dir]
        ds = root if not rel_dir else f"{root}/{rel_dir}"
        if METADATA_FILE not in files:
            n = sum(1 for name in files if name.endswith(SHARD_SUFFIX))
            if n:
                why = "an unfinished conversion" if PLAN_FILE in files else "not written by 'simsiam data convert'?"
                scan.notes.append(f"skipped {ds}: {n} shard(s) but no {METADATA_FILE} ({why})")
            continue
        meta = read_metadata(ds)
        found, missing, partial = [], [], []
        for entry in meta.get("shards", []):
            fi = files.get(entry["file"])
            if fi is None:
                missing.append(entry["file"])
            elif entry.get("bytes") is not None and int(fi.size) != int(entry["bytes"]):
                partial.append(entry["file"])
            else:
                found.append(Shard(f"{ds}/{entry['file']}", int(fi.size), fi.mtime_ns, int(entry["rows"]), ds))
        # A dataset copied into the source root file by file can show its metadata before all of its shards.
        if missing or partial:
            bad = missing or partial
            what_ = "are missing" if missing else "differ in size from what it records (still being copied?)"
            scan.notes.append(f"skipped {ds}: {METADATA_FILE} lists {len(bad)} shard(s) that {what_} "
                              f"({', '.join(bad[:3])})")
            continue
        scan.shards += found
    return scan
