"""The model registry of scheduled retraining: which shards were used, every run, the promoted model.

A registry is a LOCAL directory (or a POSIX volume mounted on the machine that runs the retrain driver,
e.g. a Kubernetes PersistentVolumeClaim on the Ray head): it relies on ``flock`` and atomic renames,
which object stores do not offer. Training checkpoints may still live on s3:// or gs:// (run.storage_path)::

    DIR/
      registry.json              format marker, written once
      promoted.json              THE pointer: run id, model dir, its linear top-1/top-5, eval fingerprint
      manifest.json              shards already used: path -> size, mtime_ns, rows, dataset, run_id, used_at
      models/<run_id>/           a copy of each model ever promoted (checkpoint.pt + model.json); never deleted
      runs/<run_id>/             one per run: config.yaml, train.shards.json, results.json, record.json,
                                 ray/ (Ray Train storage when run.storage_path is empty; safe to delete)
      .lock                      held (flock) for a run's whole life, so two runs never overlap

Crash safety. Every file is replaced atomically (temp name, fsync, rename). A promoted model is copied
to ``models/.<run_id>.<rand>.tmp`` and renamed into place before anything points at it. The end of a run is
one journalled commit: ``record.json`` is first rewritten with status ``committing`` and the changes
(new pointer, shards to mark used); then ``promoted.json`` and ``manifest.json`` are replaced; then the
record says ``completed``. A crash before the journal leaves the registry exactly as it was (the shards
stay new, so the next run retries them); a crash after it is rolled forward by the next run's
:meth:`Registry.recover`, so the pointer and the manifest never disagree. Runs still ``running`` when a
new run starts (the lock proves they are dead) are marked ``crashed``.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import posixpath
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from simsiam.data.schema import (
    METADATA_FILE,
    PLAN_FILE,
    SHARD_SUFFIX,
    DataError,
    absolute,
    filesystem,
    is_uri,
    read_metadata,
)
from simsiam.io import atomic_write_json

FORMAT = "simsiam-registry"
VERSION = 1
CHECKPOINT_FILE = "checkpoint.pt"
# Run statuses in record.json. "completed" runs carry a decision: promoted or not_promoted.
RUN_STATUSES = ("running", "committing", "completed", "failed", "crashed")


class RegistryError(RuntimeError):
    """A registry that cannot be used as asked: the message names the directory and what is wrong."""


class RegistryBusy(RegistryError):
    """Another retrain holds the registry's lock."""


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def new_run_id() -> str:
    """Sortable by start time (UTC, milliseconds), unique by its random suffix."""
    t = time.time()
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(t))}-{int(t * 1000) % 1000:03d}-{secrets.token_hex(2)}"


# ----------------------------------------------------------------------------------------- source scan


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


# ----------------------------------------------------------------------------------------- the registry


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise RegistryError(f"{path}: unreadable ({e}); it is only ever replaced atomically, so this file was "
                            "changed by hand - restore it from runs/*/record.json") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Registry:
    """A registry directory (see the module docstring). Methods that change it expect :meth:`lock` held."""

    def __init__(self, root: str | os.PathLike):
        if is_uri(str(root)):
            raise RegistryError(f"--registry {root}: the registry must be a local directory (or a mounted "
                                "volume): it needs file locks and atomic renames, which object stores lack. "
                                "Checkpoints can still go to s3:// or gs:// through run.storage_path")
        self.root = Path(root).expanduser().resolve()
        self.promoted_path = self.root / "promoted.json"
        self.manifest_path = self.root / "manifest.json"
        self.marker_path = self.root / "registry.json"
        self.runs_dir = self.root / "runs"
        self.models_dir = self.root / "models"
        self.lock_path = self.root / ".lock"

    # ---- layout
    def exists(self) -> bool:
        return self.marker_path.is_file()

    def init(self) -> None:
        """Create the layout; refuse a non-empty directory that is not a registry."""
        if self.root.is_file():
            raise RegistryError(f"--registry {self.root}: is a file, not a directory")
        if not self.exists():
            if self.root.is_dir() and any(p.name not in (".lock",) for p in self.root.iterdir()):
                raise RegistryError(f"--registry {self.root}: not empty and not a simsiam registry (no "
                                    f"{self.marker_path.name}); choose an empty or new directory")
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.marker_path, {"format": FORMAT, "version": VERSION, "created": now()})
        marker = _read_json(self.marker_path) or {}
        if marker.get("format") != FORMAT or marker.get("version", 0) > VERSION:
            raise RegistryError(f"{self.marker_path}: not a registry this code understands ({marker})")
        self.runs_dir.mkdir(exist_ok=True)
        self.models_dir.mkdir(exist_ok=True)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the registry exclusively (non-blocking): :class:`RegistryBusy` names the holder otherwise.
        The kernel drops the lock when its process dies, so a crash never leaves the registry locked."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
                raise RegistryBusy(f"{self.root}: another retrain holds the registry ({holder}); not starting a "
                                   "second one") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": now()}).encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    # ---- state
    def promoted(self) -> dict | None:
        """The promoted model's pointer (run_id, model dir relative to the registry, metrics, ...) or None."""
        return _read_json(self.promoted_path)

    def promoted_model_dir(self) -> Path | None:
        p = self.promoted()
        return self.root / p["model"] if p else None

    def manifest(self) -> dict:
        """``{"version": 1, "shards": {path: {size, mtime_ns, rows, dataset, run_id, used_at}}}``."""
        m = _read_json(self.manifest_path)
        return m if m is not None else {"version": VERSION, "shards": {}}

    def new_shards(self, found: list[Shard]) -> tuple[list[Shard], list[Shard]]:
        """(shards never used, shards used before but changed since) among ``found``."""
        used = self.manifest()["shards"]
        fresh, changed = [], []
        for s in found:
            entry = used.get(s.path)
            if entry is None:
                fresh.append(s)
            elif not s.same_file(entry):
                changed.append(s)
        return fresh, changed

    # ---- runs
    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id

    def record(self, run_id: str) -> dict | None:
        return _read_json(self.run_dir(run_id) / "record.json")

    def write_record(self, run_id: str, record: dict) -> None:
        atomic_write_json(self.run_dir(run_id) / "record.json", {**record, "updated": now()})

    def runs(self) -> list[dict]:
        """Every run's record, oldest first."""
        out = []
        for d in sorted(self.runs_dir.iterdir()) if self.runs_dir.is_dir() else []:
            rec = _read_json(d / "record.json") if d.is_dir() else None
            if rec is not None:
                out.append(rec)
        return out

    def save_model(self, run_id: str, checkpoint: str) -> str:
        """Copy a checkpoint directory (local path or URI) to ``models/<run_id>``; return that path relative
        to the registry. Copied under a temp name and renamed, so ``models/<run_id>`` is whole or absent."""
        rel = f"models/{run_id}"
        final = self.root / rel
        if (final / CHECKPOINT_FILE).is_file():
            return rel
        tmp = self.models_dir / f".{run_id}.{secrets.token_hex(3)}.tmp"
        try:
            if is_uri(checkpoint):
                tmp.mkdir()
                pafs.copy_files(checkpoint, str(tmp), destination_filesystem=pafs.LocalFileSystem())
            else:
                shutil.copytree(checkpoint, tmp)
            ckpt = tmp / CHECKPOINT_FILE
            if not ckpt.is_file():
                raise RegistryError(f"{checkpoint}: no {CHECKPOINT_FILE} in this checkpoint directory")
            atomic_write_json(tmp / "model.json", {"run_id": run_id, "source": checkpoint, "saved": now(),
                                                   "sha256": _sha256(ckpt), "bytes": ckpt.stat().st_size})
            for p in tmp.rglob("*"):
                if p.is_file():
                    with open(p, "rb") as f:
                        os.fsync(f.fileno())
            os.rename(tmp, final)
            _fsync_dir(self.models_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return rel

    def commit(self, run_id: str, record: dict, *, promote: dict | None = None, rebaseline: dict | None = None,
               used: list[Shard] = ()) -> dict:
        """End a run that completed: journal the changes in its record, apply them, mark it completed.

        ``promote``: the new ``promoted.json`` (its model already saved); ``rebaseline``: new metrics for
        the current promoted model (re-evaluated under a changed eval protocol); ``used``: shards to
        mark used. Returns the final record."""
        pending = {"run_id": run_id, "promote": promote, "rebaseline": rebaseline,
                   "used": [s.to_json() for s in used], "at": now()}
        # The journal: once this write lands, the commit completes (now, or in the next run's recover()).
        self.write_record(run_id, {**record, "status": "committing", "pending": pending})
        self._apply(pending)
        final = {**record, "status": "completed"}
        self.write_record(run_id, final)
        return final

    def _apply(self, pending: dict) -> None:
        """Apply a journalled commit; idempotent, so a roll-forward may repeat what already landed."""
        promote, rebaseline = pending.get("promote"), pending.get("rebaseline")
        current = self.promoted()
        if promote is not None:
            if not (self.root / promote["model"] / CHECKPOINT_FILE).is_file():
                raise RegistryError(f"{self.root / promote['model']}: the model to promote is missing")
            if current != promote:
                atomic_write_json(self.promoted_path, promote)
        elif rebaseline is not None and current is not None and current["run_id"] == rebaseline["run_id"]:
            updated = {**current, **{k: v for k, v in rebaseline.items() if k != "run_id"}}
            if updated != current:
                atomic_write_json(self.promoted_path, updated)
        if pending.get("used"):
            manifest = self.manifest()
            changed = False
            for s in pending["used"]:
                entry = {k: s[k] for k in ("size", "mtime_ns", "rows", "dataset")}
                entry.update(run_id=pending["run_id"], used_at=pending["at"])
                if manifest["shards"].get(s["path"]) != entry:
                    manifest["shards"][s["path"]] = entry
                    changed = True
            if changed:
                atomic_write_json(self.manifest_path, manifest)

    def recover(self) -> list[str]:
        """Tidy up after crashed runs (call with the lock held): roll journalled commits forward, mark dead
        ``running`` runs ``crashed``, remove temp files of interrupted writes. Returns what it did."""
        notes = []
        for d in (self.root, self.models_dir):
            for p in d.glob(".*.tmp") if d.is_dir() else []:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                notes.append(f"removed {p.relative_to(self.root)} (left by an interrupted write)")
        for rec in self.runs():
            run_id, status = rec.get("run_id"), rec.get("status")
            for p in self.run_dir(run_id).glob(".*.tmp"):
                p.unlink(missing_ok=True)
            if status == "committing":
                pending = rec.pop("pending")
                self._apply(pending)
                self.write_record(run_id, {**rec, "status": "completed"})
                notes.append(f"run {run_id}: finished its interrupted commit ({rec.get('decision')})")
            elif status == "running":
                self.write_record(run_id, {**rec, "status": "crashed", "decision": "failed",
                                           "reason": "the run stopped without finishing (killed or crashed); "
                                                     "its shards stay new and are retried"})
                notes.append(f"run {run_id}: marked crashed (it stopped without finishing)")
        return notes
