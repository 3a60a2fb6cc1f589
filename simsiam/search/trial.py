"""The trial: a Tune *function* that runs pretraining as a TorchTrainer (its per-epoch reports reach
Tune through ``TuneReportCallback``, so ASHA sees the kNN monitor each epoch, keyed by the ``epoch`` we
report), then linear evaluation of the frozen backbone (with the cached protocol inside the same
workers after the last epoch, else a TorchTrainer of its own: :func:`simsiam.evaluate.linear_eval`),
and reports the final result with ``status`` and ``linear_top1``;
and its outcome read back from Tune (:func:`classify`, :class:`TrialRecord`).

Each trial trains under its own run name (the Tune trial id) in ``<experiment>/runs``, so a trial
restarted after a driver crash resumes *its* pretraining checkpoint and never another trial's."""
from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simsiam import config as C
from simsiam.search.resources import TRIAL_CPU

STATUSES = ("finished", "stopped_early", "collapsed", "collapsing", "diverged", "failed")
OBJECTIVE = "linear_top1"
TIME_ATTR = "epoch"
ASHA_METRIC = "knn_top1"


class TrialFailed(RuntimeError):
    """Raised inside a trial that crashed (as opposed to one that collapsed or diverged, which report)."""


def trial_overrides(tune_config: Mapping[str, Any], variants: Mapping[str, Mapping[str, Any]] | None) -> dict:
    """Config overrides for one trial: the dotted keys Tune sampled, plus (ablations) the overrides of
    ``tune_config['variant']`` and ``train.seed`` from ``tune_config['seed']``."""
    out: dict = {}
    if "variant" in tune_config:
        if not variants or tune_config["variant"] not in variants:
            raise TrialFailed(f"unknown variant {tune_config['variant']!r}")
        out.update(variants[tune_config["variant"]])
    if "seed" in tune_config:
        out["train.seed"] = int(tune_config["seed"])
    out.update({k: v for k, v in tune_config.items() if "." in k})
    return out


def run_trial(tune_config: dict, *, base: dict, train_path: str, eval_path: str | None, train_storage: str,
              variants: Mapping[str, Mapping[str, Any]] | None = None, classify_collapse: bool = False,
              report_history: bool = False) -> None:
    """One Tune trial: pretrain (per-epoch reports go to Tune), then linear-evaluate, then report.

    Never raises for a run that collapsed or diverged: those are results, reported with their status
    and reason (no objective). A crash (bad config, worker failures past train.max_failures, a failed
    evaluation) raises :class:`TrialFailed`, which Tune records as an errored trial.

    With ``classify_collapse`` (ablations: guard off), a run whose last epoch is under the collapse
    thresholds is reported as ``collapsed`` and is still evaluated: there, collapse is the result.
    ``report_history`` adds every epoch's metrics to the final result (for the ablation curves; a
    search leaves it out, since Tune copies each trial's last result into every experiment snapshot)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from simsiam.run import RunSpec, Status, pretrain_and_evaluate

    t0 = time.time()
    trial_id = ray.tune.get_context().get_trial_id()
    overrides = trial_overrides(tune_config, variants)
    try:
        cfg = C.from_dict(base).replace({**overrides, "run.name": trial_id})
    except C.ConfigError as e:
        raise TrialFailed(f"invalid config for this trial: {e}") from None

    spec = RunSpec(cfg, train_path, eval_path, train_storage, linear_fit_path=train_path)
    out = pretrain_and_evaluate(spec, [TuneReportCallback()], judge_collapse=classify_collapse)
    if out.status == Status.FAILED:  # a crash in training or evaluation; collapsed or diverged runs report
        raise TrialFailed(out.reason or "pretraining failed")
    # No 'epoch' key here: ASHA acts only on results carrying its time attribute, so this final result
    # can never stop the trial it concludes. The final_* keys are the search CSV's names.
    ray.tune.report({
        "status": str(out.status),
        "reason": out.reason,
        OBJECTIVE: out.linear_top1,
        "linear_top5": out.linear_top5,
        "epochs_completed": out.epochs_completed,
        "steps": out.steps,
        "final_knn_top1": out.knn_top1,
        "final_collapse_std": out.collapse_std,
        "final_effective_rank": out.effective_rank,
        "history_json": json.dumps(out.history_dicts()) if report_history else "",
        "overrides_json": json.dumps(overrides, default=str),
        "checkpoint": out.checkpoint or "",
        "tensorboard": out.tensorboard or "",
        "trial_wall_s": round(time.time() - t0, 2),
    })


def make_trainable(base: C.Config, train_path: str, eval_path: str | None, train_storage: str,
                   variants: Mapping[str, Mapping[str, Any]] | None = None, classify_collapse: bool = False,
                   report_history: bool = False):
    """:func:`run_trial` bound to its fixed arguments, with the trial function's own small CPU share
    (its TorchTrainers reserve their workers themselves)."""
    import ray.tune

    fn = ray.tune.with_parameters(run_trial, base=base.to_dict(), train_path=train_path, eval_path=eval_path,
                                  train_storage=train_storage, variants=dict(variants or {}),
                                  classify_collapse=classify_collapse, report_history=report_history)
    return ray.tune.with_resources(fn, {"CPU": TRIAL_CPU})


@dataclass
class TrialRecord:
    """One trial's outcome, from its last Tune result (or its error)."""

    trial_id: str
    status: str
    reason: str = ""
    objective: float | None = None
    linear_top5: float | None = None
    epochs_completed: int = 0
    steps: int = 0
    knn_top1: float | None = None
    collapse_std: float | None = None
    effective_rank: float | None = None
    params: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    tensorboard: str = ""
    path: str = ""


def _error_reason(error: Any) -> str:
    """The message of our TrialFailed (or the last line of any other error), without the traceback."""
    text = str(error)
    for line in text.splitlines():
        if "TrialFailed:" in line:
            return line.split("TrialFailed:", 1)[1].strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else type(error).__name__


def classify(metrics: Mapping[str, Any], error: Any, epochs: int) -> tuple[str, str]:
    """(status, reason) of a trial from its last result and error. Our final report carries
    ``status``; a trial without it that was not an error was stopped by the scheduler (ASHA)."""
    if error is not None:
        return "failed", _error_reason(error)
    if metrics.get("status") in STATUSES:
        return metrics["status"], str(metrics.get("reason") or "")
    done = metrics.get(TIME_ATTR)
    if done is not None and int(done) < epochs:
        knn = metrics.get(ASHA_METRIC)
        knn_s = f" (kNN top-1 {knn:.2f}%)" if isinstance(knn, (int, float)) else ""
        return "stopped_early", f"stopped by ASHA after epoch {int(done)} of {epochs}{knn_s}"
    return "failed", "the trial ended without a final report"


def finite_number(v: Any) -> float | None:
    """``v`` as a float when it is a finite int or float (not a bool), else None: a metric Tune may
    hand back as NaN, missing or of another type."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def record_from_result(trial_id: str, metrics: Mapping[str, Any], config: Mapping[str, Any], error: Any,
                       epochs: int, path: str = "") -> TrialRecord:
    """A :class:`TrialRecord` from one trial's last metrics, its Tune config and its error (if any)."""
    status, reason = classify(metrics, error, epochs)
    final = "status" in metrics
    try:
        history = json.loads(metrics.get("history_json") or "[]")
    except (TypeError, ValueError):
        history = []
    return TrialRecord(
        trial_id=trial_id,
        status=status,
        reason=reason,
        objective=finite_number(metrics.get(OBJECTIVE)) if final else None,
        linear_top5=finite_number(metrics.get("linear_top5")) if final else None,
        epochs_completed=int(metrics.get("epochs_completed", metrics.get(TIME_ATTR, 0)) or 0),
        steps=int(metrics.get("steps", metrics.get("step", 0)) or 0),
        knn_top1=finite_number(metrics.get("final_knn_top1" if final else ASHA_METRIC)),
        collapse_std=finite_number(metrics.get("final_collapse_std" if final else "collapse_std")),
        effective_rank=finite_number(metrics.get("final_effective_rank" if final else "effective_rank")),
        params={k: v for k, v in config.items() if "." in k},
        config=dict(config),
        history=history,
        tensorboard=str(metrics.get("tensorboard") or ""),
        path=path,
    )


def result_uri(result: Any) -> str:
    """Where a Tune ``Result`` lives, as a path or URI: Tune gives a trial on s3:// or gs:// storage as a
    path inside that filesystem (``bucket/key``), which means nothing to a reader of trials.csv."""
    path = str(result.path or "")
    kind = getattr(getattr(result, "filesystem", None), "type_name", "local")
    scheme = {"s3": "s3", "gcs": "gs"}.get(kind)
    return f"{scheme}://{path}" if scheme and path and "://" not in path else path


def collect_results(grid: Any, epochs: int) -> list[TrialRecord]:
    """Records for every trial of a Tune ``ResultGrid``, in trial-creation order."""
    out = []
    for r in grid:
        metrics = dict(r.metrics or {})
        path = result_uri(r)
        trial_id = str(metrics.get("trial_id") or Path(path).name)
        out.append(record_from_result(trial_id, metrics, dict(r.config or {}), r.error, epochs, path))
    return sorted(out, key=lambda rec: rec.trial_id)
