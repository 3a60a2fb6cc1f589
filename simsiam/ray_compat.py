"""Every workaround for a Ray internal, in one place, pinned to Ray 2.60.

simsiam-ray is built and tested against Ray 2.60 (setup.cfg pins ``ray==2.60.0``). A few things it
needs are not public API there: a private attribute, an undocumented toggle, a module under
``ray._private``. Each one lives here, and only here, with the Ray behaviour it works around and the
test in tests/test_ray_compat.py that fails if it stops working. On a Ray upgrade: run that test file
first, then revisit each section below (a workaround may no longer be needed, or need a new form).

Importing this module warns (:class:`RayVersionWarning`) when the installed Ray is not 2.60.

Sections: version pin; Ray Data; Ray Train.

Keep this module free of torch: Ray Data's worker processes import it (through
``simsiam.data.batches``), and torch costs seconds of start-up per process.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import ray

# --------------------------------------------------------------------------- version pin

RAY_PINNED = "2.60"  # major.minor every workaround below was written and tested against


class RayVersionWarning(RuntimeWarning):
    """The installed Ray is not the one the workarounds in :mod:`simsiam.ray_compat` were pinned to."""


def ray_version_matches(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed ``ray.__version__``) is the pinned major.minor."""
    version = ray.__version__ if version is None else version
    return version.split(".")[:2] == RAY_PINNED.split(".")


def check_ray_version(version: str | None = None) -> None:
    """Warn (:class:`RayVersionWarning`) when Ray is not the pinned 2.60: the workarounds in this
    module reach into Ray internals that may have moved or changed meaning."""
    version = ray.__version__ if version is None else version
    if not ray_version_matches(version):
        warnings.warn(
            f"simsiam-ray works around Ray internals pinned to Ray {RAY_PINNED}, but Ray {version} is "
            "installed; run tests/test_ray_compat.py to see which workarounds still hold, or install "
            f"ray=={RAY_PINNED}.0", RayVersionWarning, stacklevel=2)


check_ray_version()

# --------------------------------------------------------------------------- Ray Data


@contextmanager
def parquet_reader_v1() -> Iterator[None]:
    """Within this block, ``ray.data.read_parquet`` builds Ray's V1 Parquet reader: one read task per file.

    Works around: Ray 2.60's default V2 reader (``DataContext.use_datasource_v2``, on by default) packs
    a small set of files into one read task and lists the files in an extra task every execution
    (epoch); measured 10x slower here than V1, and one task per file is what lets the reads of a
    multi-shard set run in parallel. ``read_parquet`` picks the reader when it is called, so only the
    call needs to be inside the block; the current DataContext's setting is restored after it.
    """
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        yield
    finally:
        ctx.use_datasource_v2 = saved


def execution_index() -> int:
    """How many times the dataset running this Ray Data task has been executed before (0 for the first
    execution, 1 for the second, ...): the epoch, for a dataset iterated once per epoch.

    Call it inside a Ray Data task (a ``map_batches`` function). Works around: Ray 2.60 has no public
    epoch for a task; it counts executions in the private ``DataContext._execution_idx``, copied to
    every task of an execution and incremented after an execution succeeds (the file shuffle's
    ``reseed_after_execution`` reads the same counter). Returns 0 if the attribute is gone, which
    tests/test_ray_compat.py catches.
    """
    from ray.data.context import DataContext

    return int(getattr(DataContext.get_current(), "_execution_idx", 0))


# --------------------------------------------------------------------------- Ray Train

PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def disable_preemption_watcher() -> None:
    """No preemption watcher in Ray Train runs; call before a local cluster starts (its processes inherit
    the environment). A value the user set wins.

    Works around: Ray 2.60's Train controller starts a preemption-watcher actor for every run, for the
    notices of cloud spot/preemptible nodes. A local cluster has none, and starting the actor logs an
    ``E ... core_worker.cc ... max_restarts > 0`` line that reads like a failure. The only switch is the
    undocumented environment variable ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER`` (named in
    ``ray.train.v2._internal.constants``), read by the controller and propagated to the workers.
    """
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
