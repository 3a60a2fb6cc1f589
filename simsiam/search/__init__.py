"""The Ray Tune harness shared by ``simsiam search`` and ``simsiam ablate``, split by concern:

* :mod:`~simsiam.search.space`: search spaces (:func:`load_space`), YAML files mapping dotted config
  names to distributions, validated against the config tree on load.
* :mod:`~simsiam.search.resources`: how many trials fit (:func:`derive_concurrency`), and the
  placement groups of TorchTrainers whose trial was stopped returned to the cluster.
* :mod:`~simsiam.search.trial`: the trial (:func:`run_trial`, wrapped by :func:`make_trainable`) and its
  outcome read back from Tune: one :class:`TrialRecord` per trial with its status (finished |
  stopped_early | collapsed | diverged | failed).
* :mod:`~simsiam.search.report`: the best trial, the CSV/console table, ``best.yaml`` and the plots.
* :mod:`~simsiam.search.study`: the Optuna study (journal storage) and the searcher.
* :mod:`~simsiam.search.driver`: where the experiment lives and the claim on it, the cluster
  (:func:`connect`), :func:`fit`, and the console shell of both commands (:func:`run_command`).

Every public name is re-exported here, so ``from simsiam import search as S; S.load_space(...)`` works
and Tune experiments that pickled ``simsiam.search.run_trial`` (or ``trial_dirname``) still resume.

The Ray Tune subclasses (the Optuna searcher, the callback) live in :mod:`simsiam.tune_plugins`: this
package imports no Ray at import time, so ``simsiam search --help`` is instant.
"""
from __future__ import annotations

from typing import Any

from simsiam.run import final_collapse
from simsiam.search.driver import (
    EXPERIMENT,
    SNAPSHOT_PERIOD_S,
    TRIAL_RUNS,
    add_cluster_arguments,
    claim_experiment,
    claim_out_dir,
    connect,
    experiment_root,
    fit,
    run_command,
    trial_dirname,
)
from simsiam.search.report import (
    MIN_FOR_HISTORY,
    MIN_FOR_IMPORTANCE,
    TABLE_COLUMNS,
    best_record,
    format_table,
    history_figure,
    plot_study,
    table_rows,
    write_best_config,
    write_csv,
)
from simsiam.search.resources import (
    TRIAL_CPU,
    derive_concurrency,
    reap_orphaned_placement_groups,
    trial_budget,
    wait_for_release,
)
from simsiam.search.space import (
    DISTRIBUTIONS,
    RESERVED,
    Param,
    SearchSpace,
    SpaceError,
    check_space_against,
    field_spec,
    load_space,
    parse_space,
)
from simsiam.search.study import (
    JOURNAL_ENV,
    STUDY_FILE,
    STUDY_NAME,
    fail_orphaned_trials,
    fetch_journal,
    load_study,
    make_searcher,
    optuna_numbers,
    publish_journal,
    reset_or_fetch_journal,
    study_storage,
)
from simsiam.search.trial import (
    ASHA_METRIC,
    OBJECTIVE,
    STATUSES,
    TIME_ATTR,
    TrialFailed,
    TrialRecord,
    classify,
    collect_results,
    finite_number,
    make_trainable,
    record_from_result,
    result_uri,
    run_trial,
    trial_overrides,
)

__all__ = [
    "ASHA_METRIC", "DISTRIBUTIONS", "EXPERIMENT", "JOURNAL_ENV", "MIN_FOR_HISTORY", "MIN_FOR_IMPORTANCE",
    "OBJECTIVE", "RESERVED", "SNAPSHOT_PERIOD_S", "STATUSES", "STUDY_FILE", "STUDY_NAME", "TABLE_COLUMNS",
    "TIME_ATTR", "TRIAL_CPU", "TRIAL_RUNS", "Param", "SearchSpace", "SpaceError", "TrialFailed", "TrialRecord",
    "add_cluster_arguments", "best_record", "check_space_against", "claim_experiment", "claim_out_dir", "classify",
    "collect_results", "connect", "derive_concurrency", "experiment_root", "fail_orphaned_trials", "fetch_journal",
    "field_spec", "final_collapse", "finite_number", "fit", "format_table", "history_figure", "load_space",
    "load_study", "make_searcher", "make_trainable", "optuna_numbers", "parse_space", "plot_study",
    "publish_journal", "reap_orphaned_placement_groups", "record_from_result", "reset_or_fetch_journal", "result_uri",
    "run_command", "run_trial", "study_storage", "table_rows", "trial_budget", "trial_dirname", "trial_overrides",
    "wait_for_release", "write_best_config", "write_csv",
]


def __getattr__(name: str) -> Any:
    # Experiments snapshotted by earlier versions pickled these Tune classes under this module's name;
    # resolving them here (importing Ray only then) lets such a search resume.
    legacy = {"FinalObjectiveOptunaSearch": "LinkedOptunaSearch", "ReleaseStoppedTrials": "ReleaseStoppedTrials"}
    if name in legacy:
        from simsiam import tune_plugins

        return getattr(tune_plugins, legacy[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
