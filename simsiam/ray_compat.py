"""Every workaround for a Ray internal, in one place, pinned to Ray 2.60.

simsiam-ray is built and tested against Ray 2.60 (setup.cfg pins ``ray==2.60.0``). A few things it
needs are not public API there: a private attribute, an undocumented toggle, a module under
``ray._private``. Each one lives here, and only here, with the Ray behaviour it works around and the
test in tests/test_ray_compat.py that fails if it stops working. On a Ray upgrade: run that test file
first, then revisit each section below (a workaround may no longer be needed, or need a new form).

Importing this module warns (:class:`RayVersionWarning`) when the installed Ray is not 2.60.

Sections: version pin; Ray Data; Ray Train; Ray Tune (placement groups of stopped trials, ASHA's rungs,
OptunaSearch's per-trial state).

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


def train_run_storage(ctx: object) -> object | None:
    """The run's storage context (``experiment_fs_path``, ``storage_filesystem``) from a Train worker's
    ``ray.train.get_context()``, or None where Ray does not offer it.

    Works around: Ray 2.60 has no public way for a worker to find its run directory on the configured
    storage (local, s3://, gs://); ``TrainContext.get_storage`` is a DeveloperAPI whose interface "may
    change without notice between minor versions". The TensorBoard logs use it to land next to the
    checkpoints; without it they go to a local temporary directory, which tests/test_train.py's DDP test
    catches (it asserts the event files under the run directory).
    """
    get_storage = getattr(ctx, "get_storage", None)
    return get_storage() if get_storage is not None else None


# --------------------------------------------------------------------------- Ray Tune


def orphaned_placement_groups() -> list:
    """Placement groups still holding (or waiting for) resources whose creating actor is dead.

    Works around: when Tune stops a trial (ASHA), the trial's actor is killed and its TorchTrainer's
    controller actor with it; the controller created its workers' placement group, and Ray 2.60 ties a
    non-detached group to its creator's job as well as its actor, so the group stays reserved until the
    driver exits. Train's own PlacementGroupCleaner removes it, but finds the cluster through the state
    API, which fails whenever two Ray instances run on one host ("Found multiple active Ray instances",
    seen here), so the search driver checks too. Ray's public ``placement_group_table()`` omits the
    creator, so this reads the GCS table through the private ``ray._private.state.state`` accessor and
    ``gcs_pb2.PlacementGroupTableData`` (``creator_actor_id``, ``creator_actor_dead``, ``is_detached``).
    Groups created by the driver itself (Tune's trial groups) have no creator actor and are never listed.
    """
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup

    data = gcs_pb2.PlacementGroupTableData
    live = (data.PENDING, data.PREPARED, data.CREATED, data.RESCHEDULING)
    nil = ray.ActorID.nil().binary()
    out = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = data.FromString(raw)
        if pg.state in live and not pg.is_detached and pg.creator_actor_dead and pg.creator_actor_id not in (b"", nil):
            out.append(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
    return out


def asha_rungs(scheduler: object) -> list[int]:
    """The epochs (milestones of the time attribute) at which an ``ASHAScheduler`` compares trials;
    [] for a scheduler without rungs (FIFO).

    Works around: Ray 2.60's ASHAScheduler computes its rungs from grace period, max_t and reduction
    factor but does not expose them; they sit in the private ``_brackets[0]._rungs`` as
    (milestone, recorded) pairs. Read rather than recomputed, so the search prints the rungs Ray uses.
    """
    brackets = getattr(scheduler, "_brackets", None)
    return sorted(int(m) for m, _ in brackets[0]._rungs) if brackets else []


def optuna_trial(searcher: object, trial_id: str) -> object | None:
    """The live ``optuna.Trial`` an ``OptunaSearch`` asked for on behalf of Tune trial ``trial_id`` (None
    once told, or if unknown).

    Works around: Ray 2.60's OptunaSearch keeps its Tune-trial -> Optuna-trial map in the private
    ``_ot_trials`` and offers no hook to annotate the Optuna trial (user attributes, intermediate values),
    which :class:`simsiam.tune_plugins.LinkedOptunaSearch` needs to make the study readable on its own.
    """
    return getattr(searcher, "_ot_trials", {}).get(trial_id)


def optuna_trial_completed(searcher: object, trial_id: str) -> bool:
    """Whether an ``OptunaSearch`` has already told Optuna how Tune trial ``trial_id`` ended (its
    private ``_completed_trials``: Tune may call ``on_trial_complete`` twice for one trial)."""
    return trial_id in getattr(searcher, "_completed_trials", ())


def repoint_optuna_journal(searcher: object, journal_path: str) -> bool:
    """Point a restored ``OptunaSearch``'s journal storage at ``journal_path``; False if it has none.

    Works around: a searcher restored from a Tune snapshot holds the ``JournalStorage`` pickled on the
    machine that took the snapshot (Ray 2.60 keeps it in the private ``_storage``), whose file backend
    names that machine's path; the study, its trials and the searcher share that one object, so replacing
    its backend (Optuna's private ``_backend``; its replay state is fresh after unpickling) moves them all.
    """
    storage = getattr(searcher, "_storage", None)
    if storage is None:
        return False
    from optuna.storages.journal import JournalFileBackend

    storage._backend = JournalFileBackend(journal_path)
    return True
