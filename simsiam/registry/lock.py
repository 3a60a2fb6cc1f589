"""One retrain at a time: the registry's exclusive hold.

Locally ``flock`` (dropped by the kernel when its process dies). Object stores have no locks: the lock
is a lease object created with ``If-None-Match: *`` (so of two racing runs exactly one creates it),
naming its holder and an expiry; the holder renews it (``If-Match`` on its own version) every third of
its time to live and deletes it at the end. A lease past its expiry belongs to a dead run: the next
run takes it over with ``If-Match`` on the stale version (again exactly one wins). A holder that fails
to renew knows it lost the registry and commits nothing (:meth:`Lease.renew` raises).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator

from simsiam import io as sio
from simsiam.io import dumps_json
from simsiam.registry.errors import RegistryBusy, RegistryError
from simsiam.registry.store import now, parse_json

LEASE_TTL_S = 600.0         # an object-store lease not renewed for this long belongs to a dead run


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
            holder = parse_json(self.path, data) if data is not None else None
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


@contextlib.contextmanager
def local_lock(root: str, lock_path: str) -> Iterator[None]:
    """Hold ``lock_path`` with ``flock`` (non-blocking): :class:`RegistryBusy` names the holder otherwise.
    The lock file records the holder (pid, host, since) for that message; the kernel drops the lock
    when its process dies."""
    os.makedirs(root, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            raise RegistryBusy(f"{root}: another retrain holds the registry ({holder}); not starting a "
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
