"""The Optuna study behind a search: its journal storage (local, published whole to object storage),
orphaned-trial bookkeeping, and the searcher that links Optuna trials to Tune trials."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from simsiam import io as sio
from simsiam.io import atomic_write_bytes
from simsiam.search.space import SearchSpace
from simsiam.search.trial import OBJECTIVE

STUDY_NAME = "simsiam-search"
STUDY_FILE = "optuna_journal.log"
# The driver's local working copy of the journal, for a searcher restored from a snapshot taken on
# another machine (or in another --out-dir): set by the search around Tune's fit.
JOURNAL_ENV = "SIMSIAM_STUDY_JOURNAL"


def study_storage(experiment_dir: str | os.PathLike) -> Any:
    """The Optuna journal storage ``<experiment>/optuna_journal.log``: append-only, so a killed driver
    leaves it readable, and ``optuna.load_study(study_name="simsiam-search", storage=...)`` opens it."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(Path(experiment_dir) / STUDY_FILE)))


def load_study(experiment_dir: str | os.PathLike) -> Any:
    """The search's Optuna study, for inspection and plots."""
    import optuna

    return optuna.load_study(study_name=STUDY_NAME, storage=study_storage(experiment_dir))


def fail_orphaned_trials(study: Any) -> int:
    """Mark study trials still RUNNING after the search as FAIL: they were asked for by a driver that
    was killed before Tune recorded them, and no trial will ever tell their result. Returns how many."""
    from optuna.trial import TrialState

    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "status", "failed")
        study._storage.set_trial_user_attr(t._trial_id, "reason", "asked for by a search driver that was killed "
                                                                    "before Tune recorded the trial; never run")
        study.tell(t.number, state=TrialState.FAIL)
        n += 1
    return n


def optuna_numbers(study: Any) -> dict[str, int]:
    """{Tune trial id: Optuna trial number} from the study's ``tune_trial_id`` user attributes. A Tune
    trial asked for twice (by a driver killed before its searcher state was saved, then again after the
    restore) maps to the Optuna trial that did not fail as an orphan."""
    from optuna.trial import TrialState

    out: dict[str, Any] = {}
    for t in study.get_trials(deepcopy=False):
        tid = t.user_attrs.get("tune_trial_id")
        if tid is not None and (tid not in out or out[tid].state == TrialState.FAIL):
            out[tid] = t
    return {tid: t.number for tid, t in out.items()}


def publish_journal(journal: str | os.PathLike, copy: str) -> None:
    """Upload the local journal ``journal`` to ``copy`` (an object-store URI) in one atomic write. The
    journal is append-only and Optuna locks it with local files, so the driver works on a local copy
    and publishes it whole: a reader (or a driver resuming on another machine) sees a complete journal."""
    atomic_write_bytes(copy, Path(journal).read_bytes())


def fetch_journal(copy: str, journal: str | os.PathLike) -> bool:
    """Download the published journal ``copy`` to ``journal`` when that local copy is missing (a new
    machine or --out-dir resuming a search); True if it did."""
    if Path(journal).exists() or not sio.exists(copy):
        return False
    atomic_write_bytes(journal, sio.read_bytes(copy))
    return True


def reset_or_fetch_journal(restorable: bool, journal: str | os.PathLike, copy: str = "") -> bool:
    """Ready the local journal ``journal`` (and its published ``copy``, a URI or "") before a search's
    fit. With no Tune experiment to restore, remove them: a driver killed before Tune's first experiment
    snapshot leaves an Optuna study no Tune experiment knows about, and starting afresh, its
    asked-but-orphaned trials would only mislead TPE. With one, fetch the published copy when the
    local one is missing (:func:`fetch_journal`). True when it fetched."""
    if not restorable:
        Path(journal).unlink(missing_ok=True)
        if copy:
            sio.remove(copy)
        return False
    return bool(copy) and fetch_journal(copy, journal)


def make_searcher(space: SearchSpace, experiment_dir: str | os.PathLike, seed: int, epochs: int,
                  journal_dir: str | os.PathLike | None = None, journal_copy: str = "") -> Any:
    """A :class:`simsiam.tune_plugins.LinkedOptunaSearch` with a seeded TPE sampler over ``space``; its
    study lives in the local ``journal_dir`` (default: ``experiment_dir``; see :func:`study_storage`),
    so a restored search continues the same study; with ``journal_copy`` (a URI), the searcher publishes
    the journal there after every change. ``experiment_dir``: where Tune keeps the trials (local or URI).
    ``epochs``: the trials' pretraining epochs (to tell a stopped trial's status)."""
    import optuna

    from simsiam.tune_plugins import LinkedOptunaSearch

    journal = Path(journal_dir or experiment_dir).resolve() / STUDY_FILE
    return LinkedOptunaSearch(
        space.to_optuna(), metric=OBJECTIVE, mode="max",
        points_to_evaluate=[dict(p) for p in space.points_to_evaluate] or None,
        sampler=optuna.samplers.TPESampler(seed=seed), study_name=STUDY_NAME,
        storage=study_storage(journal.parent), experiment_dir=sio.absolute(experiment_dir), epochs=epochs,
        journal_path=str(journal), journal_copy=journal_copy)
