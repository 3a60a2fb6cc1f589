"""The Ray Tune subclasses the search harness (:mod:`simsiam.search`) plugs into Tune: the Optuna
searcher that links each Optuna trial to its Tune trial, and the callback that returns a stopped
trial's resources. Kept apart because importing them imports Ray Tune (most of a second), which
``simsiam search --help`` and the search-space checks do not need."""
from __future__ import annotations

import logging
import os
import time
from typing import Any

from optuna.exceptions import UpdateFinishedTrialError
from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch

from simsiam import io as sio
from simsiam import ray_compat
from simsiam import search as S


class LinkedOptunaSearch(OptunaSearch):
    """OptunaSearch whose study is readable on its own, with no Tune state at hand:

    * each Optuna trial carries user attributes ``tune_trial_id``, ``tune_trial_dir`` (Tune's trial
      directory: result.json, error.txt), ``run_dir`` (its pretraining run: checkpoints, TensorBoard),
      set when the trial is asked for, and ``status`` / ``reason`` (finished | stopped_early |
      collapsed | diverged | failed, as in trials.csv), set when it ends;
    * the per-epoch kNN top-1 is the trial's intermediate value at step = epoch, so a trial ASHA stopped
      (PRUNED) still shows how far it got;
    * Optuna is told only the final objective (``linear_top1``) as the trial's value; per-epoch results
      without it are ASHA's business, and Optuna's ``tell`` fails on a missing value;
    * with ``journal_copy`` (an object-store URI), the local journal ``journal_path`` is published there
      when a trial is asked for or ends, after kNN reports at most once per Tune snapshot period
      (:func:`simsiam.search.publish_journal`; the driver publishes it at the end), and a searcher
      restored from a Tune snapshot reopens the journal at the path in ``$SIMSIAM_STUDY_JOURNAL`` (the resuming driver's
      local copy), not at the path pickled on the machine that took the snapshot;
    * a trial the study already has the end of is left as it is: a driver killed after telling Optuna
      how a trial ended but before Tune saved this searcher resumes with that trial still open here,
      and Tune runs it to its end again (its reports and its end are then no-ops, not a failed search).
    """

    # Class-level defaults: a searcher pickled by an older version (as simsiam.search's
    # FinalObjectiveOptunaSearch) and restored with a resumed search has none of these attributes.
    experiment_dir = ""
    epochs = 0
    journal_path = ""
    journal_copy = ""

    def __init__(self, *args: Any, experiment_dir: str, epochs: int, journal_path: str = "",
                 journal_copy: str = "", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.experiment_dir = str(experiment_dir)
        self.epochs = int(epochs)
        self.journal_path, self.journal_copy = str(journal_path), str(journal_copy)
        self._reported: set[tuple[str, int]] = set()

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        local = os.environ.get(S.JOURNAL_ENV)
        if local and ray_compat.repoint_optuna_journal(self, local):
            self.journal_path = local

    def _publish(self, force: bool = True) -> None:
        """Upload the journal to ``journal_copy``. Trials asked for and ended always go up at once (a
        resumed search must find every trial Tune's snapshot knows); per-epoch kNN reports, the bulk
        of a long search, at most once per Tune snapshot period (a killed driver loses at most those)."""
        if not (self.journal_copy and self.journal_path):
            return
        now = time.monotonic()
        if not force and now - self.__dict__.get("_published_at", 0.0) < S.SNAPSHOT_PERIOD_S:
            return
        self._published_at = now
        try:
            S.publish_journal(self.journal_path, self.journal_copy)
        except OSError as e:  # the next change (or the search's end) publishes it again
            logging.getLogger(__name__).warning("could not publish the Optuna journal to %s: %s",
                                                self.journal_copy, e)

    def suggest(self, trial_id: str) -> Any:
        out = super().suggest(trial_id)
        ot = ray_compat.optuna_trial(self, trial_id)
        if isinstance(out, dict) and ot is not None and self.experiment_dir:
            exp = self.experiment_dir
            ot.set_user_attr("tune_trial_id", trial_id)
            ot.set_user_attr("tune_trial_dir", sio.join(exp, trial_id))  # see S.trial_dirname
            ot.set_user_attr("run_dir", sio.join(exp, S.TRIAL_RUNS, trial_id))
            self._publish()
        return out

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._report_knn(trial_id, result)

    def _report_knn(self, trial_id: str, result: dict) -> None:
        knn, epoch = S.finite_number(result.get(S.ASHA_METRIC)), result.get(S.TIME_ATTR)
        ot = ray_compat.optuna_trial(self, trial_id)
        reported = self.__dict__.setdefault("_reported", set())
        if ot is None or knn is None or epoch is None or (trial_id, int(epoch)) in reported:
            return
        reported.add((trial_id, int(epoch)))
        try:
            ot.report(knn, int(epoch))
        except UpdateFinishedTrialError:  # told before this searcher was restored (class docstring)
            return
        self._publish(force=False)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot = ray_compat.optuna_trial(self, trial_id)
        if ot is not None and not ray_compat.optuna_trial_completed(self, trial_id):
            # The result that made ASHA stop a trial reaches the searcher only here, not in on_trial_result.
            self._report_knn(trial_id, result or {})
            if error:
                status, reason = "failed", "the trial raised an error: see trials.csv and <tune_trial_dir>/error.txt"
            else:
                status, reason = S.classify(result or {}, None, self.epochs)
            try:
                ot.set_user_attr("status", status)
                ot.set_user_attr("reason", reason[:1000])
            except UpdateFinishedTrialError:  # told before this searcher was restored (class docstring)
                pass
        super().on_trial_complete(trial_id, result=result, error=error)
        self._publish()


class ReleaseStoppedTrials(Callback):
    """Tune callback (driver side): every ``interval_s`` while trials run, and whenever one ends,
    return the placement groups of TorchTrainers whose trial is gone (see
    :func:`simsiam.ray_compat.orphaned_placement_groups`)."""

    def __init__(self, interval_s: float = 2.0):
        self.interval_s = interval_s
        self.released = 0
        self._last = 0.0

    def _reap(self) -> None:
        self._last = time.time()
        self.released += S.reap_orphaned_placement_groups()

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if time.time() - self._last >= self.interval_s:
            self._reap()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._reap()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._reap()
