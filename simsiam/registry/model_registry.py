"""The registry itself: its layout, its state (pointer, manifest, runs, saved models) and the end of a
run as one journalled commit.

Crash safety. Every file is written atomically (see :mod:`simsiam.registry.store`). ``promoted.json``
and ``manifest.json`` are replaced by compare-and-swap (:func:`simsiam.io.put_if_version`: ``If-Match``
on S3), so a writer that lost the registry cannot overwrite what a newer run wrote. A model counts as
saved once its ``model.json`` (checksum of checkpoint.pt) exists - written last, after the checkpoint,
inside a temp directory renamed into place locally - and nothing points at a model before that. The
end of a run is one journalled commit: ``record.json`` is first rewritten with status ``committing``
and the changes (new pointer, shards to mark used); then ``promoted.json`` and ``manifest.json`` are
replaced; then the record says ``completed``. A crash before the journal leaves the registry exactly as
it was (the shards stay new, so the next run retries them); a crash after it is rolled forward by the
next run's :meth:`Registry.recover`, so the pointer and the manifest never disagree. Runs still
``running`` when a new run starts (the lock proves they are dead) are marked ``crashed``.

A run's status in its record.json: running, committing, completed (with a decision: promoted or
not_promoted), failed or crashed.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from simsiam import io as sio
from simsiam.checkpoint import CHECKPOINT_FILE
from simsiam.io import atomic_write_json, dumps_json
from simsiam.registry.errors import RegistryError
from simsiam.registry.lock import LEASE_TTL_S, Lease, local_lock
from simsiam.registry.scan import Shard
from simsiam.registry.store import fsync_dir, now, read_json, sha256_and_size, swap_json

FORMAT = "simsiam-registry"
VERSION = 1
MODEL_FILE = "model.json"   # written last: a model directory without it is an interrupted copy


class Registry:
    """A registry directory or prefix (its layout: :mod:`simsiam.registry`). Methods that change it expect
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
        marker = read_json(self.marker_path) or {}
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
        with local_lock(self.root, self.lock_path):
            yield

    def _still_ours(self) -> None:
        """Before changing shared state: on an object store, renew the lease (fails if it was lost)."""
        if self._lease is not None:
            self._lease.renew()

    # ---- state
    def promoted(self) -> dict | None:
        """The promoted model's pointer (run_id, model dir relative to the registry, metrics, ...) or None."""
        return read_json(self.promoted_path)

    def promoted_model_dir(self) -> str | None:
        p = self.promoted()
        return self.path(p["model"]) if p else None

    def manifest(self) -> dict:
        """``{"version": 1, "shards": {path: {size, mtime_ns, rows, dataset, run_id, used_at}}}``."""
        m = read_json(self.manifest_path)
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
        return read_json(sio.join(self.run_dir(run_id), "record.json"))

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
            digest, size = sha256_and_size(sio.join(final, CHECKPOINT_FILE))
            atomic_write_json(sio.join(final, MODEL_FILE), {"run_id": run_id, "source": checkpoint, "saved": now(),
                                                            "sha256": digest, "bytes": size})
            return rel
        final = Path(self.path(rel))
        tmp = Path(self.models_dir) / f".{run_id}.{secrets.token_hex(3)}.tmp"
        try:
            sio.copy_tree(checkpoint, str(tmp))
            digest, size = sha256_and_size(str(tmp / CHECKPOINT_FILE))
            atomic_write_json(tmp / MODEL_FILE, {"run_id": run_id, "source": checkpoint, "saved": now(),
                                                 "sha256": digest, "bytes": size})
            for p in tmp.rglob("*"):
                if p.is_file():
                    with open(p, "rb") as f:
                        os.fsync(f.fileno())
            os.rename(tmp, final)
            fsync_dir(Path(self.models_dir))
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

    def _apply(self, pending: dict) -> None:
        """Apply a journalled commit; idempotent, so a roll-forward may repeat what already landed."""
        promote, rebaseline = pending.get("promote"), pending.get("rebaseline")
        if promote is not None:
            if not self.model_complete(promote["model"]):
                raise RegistryError(f"{self.path(promote['model'])}: the model to promote is missing")
            swap_json(self.promoted_path, lambda cur: promote if cur != promote else None)
        elif rebaseline is not None:
            def rescore(cur: dict | None) -> dict | None:
                if cur is None or cur["run_id"] != rebaseline["run_id"]:
                    return None
                updated = {**cur, **{k: v for k, v in rebaseline.items() if k != "run_id"}}
                return updated if updated != cur else None
            swap_json(self.promoted_path, rescore)
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
            swap_json(self.manifest_path, mark)

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
