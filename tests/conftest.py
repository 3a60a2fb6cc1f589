"""Shared fixtures: the built-in digits converted once per session, and small fast configs."""
from __future__ import annotations

import os

import pytest

from simsiam import config as C

# Ray Data's progress bars are noise in test logs.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Tests use only the clusters they start (ray.init(address="local"), Cluster, their own head); a
# RAY_ADDRESS from the host would send a pipeline under test to someone else's cluster.
os.environ.pop("RAY_ADDRESS", None)
# Ray Train's controller polls its workers every 2 s and starts a preemption-watcher actor per run
# (for cloud spot notices); on a local test cluster a faster poll and no watcher take ~6 s off each
# of the suite's ~40 Ray Train runs. Set before any Ray process starts, so every one inherits them.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

# The test S3 endpoint (tests/s3_server.py), reached the way AWS is: pyarrow and boto3 read these. Set
# at import, before any Ray process starts, so every Ray worker inherits them; the server itself starts
# on first use (``s3`` fixture). Forced, not defaulted: no test may reach a real cloud account.
from tests.s3_server import S3Server  # noqa: E402
from tests.s3_server import free_port as _free_port  # noqa: E402

S3_PORT = _free_port()
os.environ.update({
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata lookups (seconds of timeouts) on a laptop
})
for _var in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_var, None)


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory) -> str:
    """A data.cache_dir holding the converted digits (train/test shards), shared by the session."""
    from simsiam.data import resolve_paths

    cache = str(tmp_path_factory.mktemp("simsiam-cache"))
    cfg = C.load("sample", {"data.cache_dir": cache, "data.path": "builtin:digits"})
    resolve_paths(cfg.data)
    return cache


@pytest.fixture(scope="session")
def shapes_cache(digits_cache) -> str:
    """The same data.cache_dir with the built-in shapes (the sample preset's data) converted too."""
    from simsiam.data import resolve_paths

    resolve_paths(C.load("sample", {"data.cache_dir": digits_cache}).data)
    return digits_cache


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
        # The digits at 16 px: the fastest data for runs that test the machinery, not the learning.
        "data.path": "builtin:digits",
        "data.image_size": 16,
        "eval.baselines": False,
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


def start_local_ray() -> None:
    """A fresh local Ray cluster for this process: 2 CPUs, dashboard on 127.0.0.1 (Tune's resource
    cleaner needs the state API). address="local": never a cluster someone else left on this host."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1")
    ray.data.DataContext.get_current().enable_progress_bars = False


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster shared by every test module that needs one (each start costs ~10 s on
    2 cores). Tests that need a cluster of another shape shut it down and start it again after."""
    import ray

    start_local_ray()
    yield
    ray.shutdown()



@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """The session's S3 endpoint (a moto server process on 127.0.0.1; see tests/s3_server.py)."""
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    server = S3Server(S3_PORT, str(log)).start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3, request) -> str:
    """A new, empty bucket for one test: ``s3://<name>``."""
    import re
    import secrets

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    return s3.create_bucket(f"{name}-{secrets.token_hex(3)}")
