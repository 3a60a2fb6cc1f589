"""Shared fixtures: the built-in digits converted once per session, and small fast configs."""
from __future__ import annotations

import os

import pytest

from simsiam import config as C

# Ray Data's progress bars are noise in test logs.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory) -> str:
    """A data.cache_dir holding the converted digits (train/test shards), shared by the session."""
    from simsiam.data import resolve_paths

    cache = str(tmp_path_factory.mktemp("simsiam-cache"))
    cfg = C.load("sample", {"data.cache_dir": cache})
    resolve_paths(cfg.data)
    return cache


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for dashboards of extra clusters started by a test)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_config(cache_dir: str, **overrides) -> C.Config:
    """The sample preset shrunk so a Ray Train run takes seconds: small widths, few steps."""
    base = {
        "data.cache_dir": cache_dir,
        "model.small_width": 16,
        "model.dim": 128,
        "model.pred_dim": 32,
        "optim.batch_size": 64,
        "train.epochs": 2,
        "train.max_steps_per_epoch": 3,
        "train.cpus_per_worker": 0.5,
        "train.knn_every": 0,
        "train.log_every": 1,
        "train.collapse_guard.enabled": False,
        "eval.linear.epochs": 5,
    }
    base.update(overrides)
    return C.load("sample", base)
