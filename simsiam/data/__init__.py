"""Datasets as Parquet image shards, and the Ray Data pipelines that stream them into training.

- :mod:`simsiam.data.schema` - the shard format and its checks.
- :mod:`simsiam.data.convert` - image folders / .npz / built-in sets -> shards (``simsiam data convert``):
  what it reads in :mod:`~simsiam.data.sources` and :mod:`~simsiam.data.formats`, each shard built and
  written by :mod:`~simsiam.data.shard_writer`.
- :mod:`simsiam.data.inspect` - counts, sizes and sample grids (``simsiam data inspect``).
- :mod:`simsiam.data.pipeline` - Ray Data: train (two augmented views) and eval datasets.

Importing this package stays light (no Ray, no torch), so the CLI and converters start fast.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from simsiam.config import ConfigError, DataConfig
from simsiam.data.schema import (
    METADATA_FILE,
    DataError,
    list_shards,
    read_metadata,
)

__all__ = ["DataError", "resolve_paths", "builtin_dir", "read_metadata", "BUILTINS"]

BUILTIN_PREFIX = "builtin:"
BUILTINS = ("shapes", "digits")  # see simsiam.data.sources.BUILTIN_SOURCES


def _cache_root(data_cfg: DataConfig) -> Path:
    return Path(data_cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "simsiam")).expanduser()


def builtin_dir(name: str, cache_dir: str | os.PathLike) -> Path:
    """Convert built-in set ``name`` into ``cache_dir/name/{train,test}`` once; return ``cache_dir/name``.

    Safe under concurrency (parallel Tune trials, several Ray workers on one node): an exclusive file
    lock serialises the callers, the first converts into a temp directory and renames it into place,
    the others find it done. A crash mid-conversion leaves only a temp directory, never a half dataset.
    """
    if name not in BUILTINS:
        raise DataError(f"data.path: unknown built-in set {BUILTIN_PREFIX}{name}; available: "
                        + ", ".join(BUILTIN_PREFIX + b for b in BUILTINS))
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    splits = ("train", "test")

    def complete() -> bool:
        return all((final / s / METADATA_FILE).is_file() for s in splits)

    if complete():
        return final
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if complete():
                return final
            from simsiam.data.convert import convert

            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
            try:
                convert(None, tmp, builtin=name, workers=1)
                if final.exists():  # an incomplete leftover from before atomic renames existed, or by hand
                    shutil.rmtree(final)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final


def _resolve_one(path: str, data_cfg: DataConfig, what: str, split: str) -> str:
    path = (path or "").strip()
    if path.startswith(BUILTIN_PREFIX):
        return str(builtin_dir(path[len(BUILTIN_PREFIX):], _cache_root(data_cfg)) / split)
    list_shards(path, what)
    return path


def resolve_paths(data_cfg: DataConfig) -> tuple[str, str]:
    """(train path, eval path) for a data config, converting a built-in set on first use.

    ``data.path`` is a directory or URI of shards, or ``builtin:shapes``; ``data.eval_path`` defaults
    to the built-in set's test split. A built-in set lives in a node-local cache; on a multi-node
    cluster the pipeline reads it on the driver (it is small) instead of in remote tasks. Raises
    :class:`DataError` naming a missing or empty path, :class:`ConfigError` when no eval path exists.
    """
    path = (data_cfg.path or "").strip()
    if not path:
        raise DataError("data.path is empty: give a directory (or URI) of Parquet shards, or builtin:shapes")
    train = _resolve_one(path, data_cfg, "data.path", "train")
    if data_cfg.eval_path.strip():
        eval_path = _resolve_one(data_cfg.eval_path, data_cfg, "data.eval_path", "test")
    elif path.startswith(BUILTIN_PREFIX):
        eval_path = _resolve_one(path, data_cfg, "data.path", "test")
    else:
        raise ConfigError(f"data.eval_path is needed: data.path ({path}) is not a built-in set, so there is no "
                          "default held-out split for kNN and linear evaluation")
    return train, eval_path
