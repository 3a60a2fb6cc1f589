"""The model registry of scheduled retraining: which shards were used, every run, the promoted model.

A registry is a local directory (or a mounted POSIX volume) or an object-store prefix (s3://, or an
S3-compatible store through AWS_ENDPOINT_URL; see simsiam/io.py). The layout is the same on both::

    ROOT/
      registry.json              format marker, written once
      promoted.json              THE pointer: run id, model dir, its linear top-1/top-5, eval fingerprint
      manifest.json              shards already used: path -> size, mtime_ns, rows, dataset, run_id, used_at
      models/<run_id>/           a copy of each model ever promoted (checkpoint.pt, then model.json); never deleted
      runs/<run_id>/             one per run: config.yaml, train.shards.json, results.json, record.json,
                                 ray/ (Ray Train storage when run.storage_path is empty; safe to delete)
      .lock                      local: held (flock) for a run's whole life, so two runs never overlap
      .lease.json                object store: the lease that stands in for the lock (see below)

Crash safety. Every file is written atomically: locally to a temp name, fsynced and renamed; on an object
store as one upload (readers see the old object or the whole new one). ``promoted.json`` and
``manifest.json`` are replaced by compare-and-swap (:func:`simsiam.io.put_if_version`: ``If-Match`` on
S3), so a writer that lost the registry cannot overwrite what a newer run wrote. A model counts as saved
once its ``model.json`` (checksum of checkpoint.pt) exists - written last, after the checkpoint, inside a
temp directory renamed into place locally - and nothing points at a model before that. The end of a run
is one journalled commit: ``record.json`` is first rewritten with status ``committing`` and the changes
(new pointer, shards to mark used); then ``promoted.json`` and ``manifest.json`` are replaced; then the
record says ``completed``. A crash before the journal leaves the registry exactly as it was (the shards
stay new, so the next run retries them); a crash after it is rolled forward by the next run's
:meth:`Registry.recover`, so the pointer and the manifest never disagree. Runs still ``running`` when a
new run starts (the lock proves they are dead) are marked ``crashed``.

One retrain at a time. Locally ``flock`` (dropped by the kernel when its process dies). Object stores
have no locks: the lock is a lease object created with ``If-None-Match: *`` (so of two racing runs
exactly one creates it), naming its holder and an expiry; the holder renews it (``If-Match`` on its own
version) every third of its time to live and deletes it at the end. A lease past its expiry belongs to a
dead run: the next run takes it over with ``If-Match`` on the stale version (again exactly one wins).
A holder that fails to renew knows it lost the registry and commits nothing (:meth:`Registry.commit`
checks). gs:// registries are refused: pyarrow's GCS filesystem does not expose generation preconditions
(GCS's compare-and-swap), so neither the lease nor the pointer could be safe there.
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
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from simsiam import io as sio
from simsiam.data.schema import (
    METADATA_FILE,
    PLAN_FILE,
    SHARD_SUFFIX,
    DataError,
    absolute,
    filesystem,
    read_metadata,
)
from simsiam.io import atomic_write_json, dumps_json

FORMAT = "simsiam-registry"
VERSION = 1
CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.json"   # written last: a model directory without it is an interrupted copy
LEASE_TTL_S = 600.0         # an object-store lease not renewed for this long belongs to a dead run
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


def _parse(path: str, data: bytes | None) -> Any:
    if data is None:
        return None
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RegistryError(f"{path}: unreadable ({e}); it is only ever replaced atomically, so this file was "
                            "changed by hand - restore it from runs/*/record.json") from None


def _read_json(path: str) -> Any:
    try:
        return _parse(path, sio.read_bytes(path))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RegistryError(f"{path}: unreadable ({sio.describe_error(path, e)})") from None


def _sha256_and_size(path: str) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with sio.open_input(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


class Lease:
    """The object-store lock (see the module docstring): created with If-None-Match, renewed and released
    with If-Match on its own version, taken over from a dead holder with If-Match on the expired version."""

    def __init__(self, path: str, ttl_s: float = LEASE_TTL_S):
        self.path, self.ttl_s = path, ttl_s
        self.version: str | None = None
        self.lost: str | None = None  # why the lease was lost, once it was
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    def _body(self) -> bytes:
        return dumps_json({"pid": os.getpid(), "host": socket.gethostname(), "since": now(),
                           "expires_at": time.time() + self.ttl_s, "owner": id(self)})

    def acquire(self) -> None:
        try:
            self.version = sio.put_if_absent(self.path, self._body())
        except sio.PreconditionFailed:
            data, version = sio.read_versioned(self.path)
            holder = _parse(self.path, data) if data is not None else None
            if holder is not None and holder.get("expires_at", 0) > time.time():
                who = {k: holder.get(k) for k in ("pid", "host", "since")}
                raise RegistryBusy(f"{self.path}: another retrain holds the registry ({json.dumps(who)}, lease "
                                   f"until {time.strftime('%H:%M:%SZ', time.gmtime(holder['expires_at']))}); "
                                   "not starting a second one") from None
            try:  # expired (its holder died) or deleted meanwhile: take it over; of several, one wins
                self.version = sio.put_if_version(self.path, self._body(), version)
            except sio.PreconditionFailed:
                raise RegistryBusy(f"{self.path}: another retrain took over the expired lease first; not "
                                   "starting a second one") from None
        self._thread = threading.Thread(target=self._renew_loop, name="registry-lease", daemon=True)
        self._thread.start()

    def renew(self) -> None:
        """Extend the lease; :class:`RegistryError` if it was lost (expired and taken over)."""
        with self._mutex:
            if self.lost:
                raise RegistryError(self.lost)
            try:
                self.version = sio.put_if_version(self.path, self._body(), self.version)
            except sio.PreconditionFailed:
                self.lost = (f"{self.path}: this run lost the registry lease (not renewed within {self.ttl_s:g} s, "
                             "and another retrain took it over); it commits nothing")
                raise RegistryError(self.lost) from None

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except RegistryError:
                return
            except OSError:
                continue  # the store is unreachable for now: retry; commit() renews before it writes

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._mutex:
            if self.lost or self.version is None:
                return
            with contextlib.suppress(sio.PreconditionFailed, FileNotFoundError):
                sio.delete_if_version(self.path, self.version)


class Registry:
    """A registry directory or prefix (see the module docstring). Methods that change it expect
    :meth:`lock` held."""

    def __init__(self, root: str | os.PathLike, *, lease_ttl_s: float = LEASE_TTL_S):
        root = str(root)
        if sio.is_uri(root) and sio.scheme(root) != "s3":
            raise RegistryError(f"--registry {root}: a registry needs compare-and-swap writes, which this layer "
                                "has on s3:// (and S3-compatible stores) and local directories only; pyarrow's "
                                "GCS filesystem does not expose generation preconditions. Use s3://, a local "
                                "directory or a mounted volume (checkpoints can still go to gs:// through "
                                "run.storage_path)")
        self.remote = sio.is_uri(root)
        self.root = root.rstrip("/") if self.remote else str(Path(root).expanduser().resolve())
        self.promoted_path = sio.join(self.root, "promoted.json")
        self.manifest_path = sio.join(self.root, "manifest.json")
        self.marker_path = sio.join(self.root, "registry.json")
        self.runs_dir = sio.join(self.root, "runs")
        self.models_dir = sio.join(self.root, "models")
        self.lock_path = sio.join(self.root, ".lease.json" if self.remote else ".lock")
        self.lease_ttl_s = lease_ttl_s
        self._lease: Lease | None = None

    def path(self, rel: str) -> str:
        """A path relative to the registry as a full path or URI."""
        return sio.join(self.root, rel)

    # ---- layout
    def exists(self) -> bool:
        return sio.is_file(self.marker_path)

    def init(self) -> None:
        """Create the layout; refuse a non-empty directory that is not a registry."""
        if sio.is_file(self.root):
            raise RegistryError(f"--registry {self.root}: is a file, not a directory")
        if not self.exists():
            if any(n not in (".lock", ".lease.json") for n in sio.names(self.root)):
                raise RegistryError(f"--registry {self.root}: not empty and not a simsiam registry (no "
                                    "registry.json); choose an empty or new directory")
            with contextlib.suppress(sio.PreconditionFailed):  # two first runs: one marker
                sio.put_if_absent(self.marker_path, dumps_json({"format": FORMAT, "version": VERSION,
                                                                "created": now()}))
        marker = _read_json(self.marker_path) or {}
        if marker.get("format") != FORMAT or marker.get("version", 0) > VERSION:
            raise RegistryError(f"{self.marker_path}: not a registry this code understands ({marker})")
        sio.make_dirs(self.runs_dir)
        sio.make_dirs(self.models_dir)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the registry exclusively (non-blocking): :class:`RegistryBusy` names the holder otherwise.
        Locally the kernel drops the lock when its process dies; on an object store the lease expires."""
        if self.remote:
            lease = Lease(self.lock_path, self.lease_ttl_s)
            try:
                lease.acquire()
            except OSError as e:
                raise RegistryError(f"--registry {sio.describe_error(self.root, e)}") from None
            self._lease = lease
            try:
                yield
            finally:
                self._lease = None
                lease.release()
            return
        os.makedirs(self.root, exist_ok=True)
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

    def _still_ours(self) -> None:
        """Before changing shared state: on an object store, renew the lease (fails if it was lost)."""
        if self._lease is not None:
            self._lease.renew()

    # ---- state
    def promoted(self) -> dict | None:
        """The promoted model's pointer (run_id, model dir relative to the registry, metrics, ...) or None."""
        return _read_json(self.promoted_path)

    def promoted_model_dir(self) -> str | None:
        p = self.promoted()
        return self.path(p["model"]) if p else None

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
    def run_dir(self, run_id: str) -> str:
        return sio.join(self.runs_dir, run_id)

    def record(self, run_id: str) -> dict | None:
        return _read_json(sio.join(self.run_dir(run_id), "record.json"))

    def write_record(self, run_id: str, record: dict) -> None:
        atomic_write_json(sio.join(self.run_dir(run_id), "record.json"), {**record, "updated": now()})

    def runs(self) -> list[dict]:
        """Every run's record, oldest first."""
        out = []
        for name in sio.names(self.runs_dir):
            rec = self.record(name) if not name.startswith(".") else None
            if rec is not None:
                out.append(rec)
        return out

    def model_complete(self, rel: str) -> bool:
        """Is ``models/<run_id>`` (``rel``) a whole model copy (its model.json, written last, exists)?"""
        return sio.is_file(sio.join(self.path(rel), MODEL_FILE))

    def save_model(self, run_id: str, checkpoint: str) -> str:
        """Copy a checkpoint directory (local path or URI) to ``models/<run_id>``; return that path relative
        to the registry. ``model.json`` (checksum, source) is written last: locally inside a temp directory
        renamed into place, on an object store after the checkpoint objects; so a model either has it and
        is whole, or is an interrupted copy that :meth:`recover` removes."""
        rel = f"models/{run_id}"
        if self.model_complete(rel):
            return rel
        if not sio.is_file(sio.join(checkpoint, CHECKPOINT_FILE)):
            raise RegistryError(f"{checkpoint}: no {CHECKPOINT_FILE} in this checkpoint directory")
        if self.remote:
            final = self.path(rel)
            sio.copy_tree(checkpoint, final)
            digest, size = _sha256_and_size(sio.join(final, CHECKPOINT_FILE))
            atomic_write_json(sio.join(final, MODEL_FILE), {"run_id": run_id, "source": checkpoint, "saved": now(),
                                                            "sha256": digest, "bytes": size})
            return rel
        final = Path(self.path(rel))
        tmp = Path(self.models_dir) / f".{run_id}.{secrets.token_hex(3)}.tmp"
        try:
            sio.copy_tree(checkpoint, str(tmp))
            digest, size = _sha256_and_size(str(tmp / CHECKPOINT_FILE))
            atomic_write_json(tmp / MODEL_FILE, {"run_id": run_id, "source": checkpoint, "saved": now(),
                                                 "sha256": digest, "bytes": size})
            for p in tmp.rglob("*"):
                if p.is_file():
                    with open(p, "rb") as f:
                        os.fsync(f.fileno())
            os.rename(tmp, final)
            _fsync_dir(Path(self.models_dir))
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
        self._still_ours()
        pending = {"run_id": run_id, "promote": promote, "rebaseline": rebaseline,
                   "used": [s.to_json() for s in used], "at": now()}
        # The journal: once this write lands, the commit completes (now, or in the next run's recover()).
        self.write_record(run_id, {**record, "status": "committing", "pending": pending})
        self._apply(pending)
        final = {**record, "status": "completed"}
        self.write_record(run_id, final)
        return final

    def _swap_json(self, path: str, change) -> None:
        """Replace a JSON file by compare-and-swap: ``change(current) -> new`` (None: leave it)."""
        data, version = sio.read_versioned(path)
        new = change(_parse(path, data))
        if new is None:
            return
        try:
            sio.put_if_version(path, dumps_json(new), version)
        except sio.PreconditionFailed:
            raise RegistryError(f"{path}: changed by another writer while this run held the registry; nothing "
                                "was overwritten (was the lease lost?)") from None

    def _apply(self, pending: dict) -> None:
        """Apply a journalled commit; idempotent, so a roll-forward may repeat what already landed."""
        promote, rebaseline = pending.get("promote"), pending.get("rebaseline")
        if promote is not None:
            if not self.model_complete(promote["model"]):
                raise RegistryError(f"{self.path(promote['model'])}: the model to promote is missing")
            self._swap_json(self.promoted_path, lambda cur: promote if cur != promote else None)
        elif rebaseline is not None:
            def rescore(cur: dict | None) -> dict | None:
                if cur is None or cur["run_id"] != rebaseline["run_id"]:
                    return None
                updated = {**cur, **{k: v for k, v in rebaseline.items() if k != "run_id"}}
                return updated if updated != cur else None
            self._swap_json(self.promoted_path, rescore)
        if pending.get("used"):
            def mark(cur: dict | None) -> dict | None:
                manifest = cur if cur is not None else {"version": VERSION, "shards": {}}
                changed = False
                for s in pending["used"]:
                    entry = {k: s[k] for k in ("size", "mtime_ns", "rows", "dataset")}
                    entry.update(run_id=pending["run_id"], used_at=pending["at"])
                    if manifest["shards"].get(s["path"]) != entry:
                        manifest["shards"][s["path"]] = entry
                        changed = True
                return manifest if changed else None
            self._swap_json(self.manifest_path, mark)

    def _remove_interrupted_writes(self) -> list[str]:
        notes = []
        if self.remote:  # no temp names on an object store; a model copy without its model.json was cut short
            for name in sio.names(self.models_dir):
                if not self.model_complete(f"models/{name}"):
                    sio.remove_tree(sio.join(self.models_dir, name))
                    notes.append(f"removed models/{name} (a model copy cut short)")
            return notes
        for d in (Path(self.root), Path(self.models_dir)):
            for p in d.glob(".*.tmp") if d.is_dir() else []:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                notes.append(f"removed {p.relative_to(self.root)} (left by an interrupted write)")
        for d in Path(self.runs_dir).iterdir() if Path(self.runs_dir).is_dir() else []:
            for p in d.glob(".*.tmp"):
                p.unlink(missing_ok=True)
        return notes

    def recover(self) -> list[str]:
        """Tidy up after crashed runs (call with the lock held): roll journalled commits forward, mark dead
        ``running`` runs ``crashed``, remove what interrupted writes left. Returns what it did."""
        notes = self._remove_interrupted_writes()
        for rec in self.runs():
            run_id, status = rec.get("run_id"), rec.get("status")
            if status == "committing":
                self._still_ours()
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
