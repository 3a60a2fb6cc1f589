"""The registry's files on local disk or an object store: JSON read back strictly, replaced by
compare-and-swap; run ids and timestamps; checksums of saved models.

Every file is written atomically (:func:`simsiam.io.atomic_write_json`: locally a temp name, fsynced
and renamed; on an object store one upload), so a reader sees the old file or the whole new one.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from simsiam import io as sio
from simsiam.io import dumps_json
from simsiam.registry.errors import RegistryError


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def new_run_id() -> str:
    """Sortable by start time (UTC, milliseconds), unique by its random suffix."""
    t = time.time()
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(t))}-{int(t * 1000) % 1000:03d}-{secrets.token_hex(2)}"


def fsync_dir(path: Path) -> None:
    """Make a rename inside the local directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def parse_json(path: str, data: bytes | None) -> Any:
    """The JSON in ``data`` read from ``path`` (None for no data); a clear error if it is not JSON."""
    if data is None:
        return None
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RegistryError(f"{path}: unreadable ({e}); it is only ever replaced atomically, so this file was "
                            "changed by hand - restore it from runs/*/record.json") from None


def read_json(path: str) -> Any:
    """The JSON file at ``path`` (local or URI), or None if it does not exist."""
    try:
        return parse_json(path, sio.read_bytes(path))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RegistryError(f"{path}: unreadable ({sio.describe_error(path, e)})") from None


def sha256_and_size(path: str) -> tuple[str, int]:
    """The SHA-256 hex digest and byte size of a file (local or URI), read in 1 MiB chunks."""
    h, n = hashlib.sha256(), 0
    with sio.open_input(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def swap_json(path: str, change: Callable[[Any], Any]) -> None:
    """Replace a JSON file by compare-and-swap: ``change(current) -> new`` (None: leave it). A writer that
    lost the registry (another one wrote since it read) overwrites nothing."""
    data, version = sio.read_versioned(path)
    new = change(parse_json(path, data))
    if new is None:
        return
    try:
        sio.put_if_version(path, dumps_json(new), version)
    except sio.PreconditionFailed:
        raise RegistryError(f"{path}: changed by another writer while this run held the registry; nothing "
                            "was overwritten (was the lease lost?)") from None
