"""The run contract: what one pretraining run is given (:class:`RunSpec`) and what it ends with
(:class:`RunOutcome`), and the one orchestrator every pipeline uses, :func:`pretrain_and_evaluate`.

``simsiam run`` (pipelines/pretrain_eval.py), every search and ablation trial and scheduled retraining
all run the same sequence: pretrain on Ray Train, then the linear evaluation of the final weights - the
result computed inside the pretraining run (cached protocol) or, failing that, the full evaluation as
its own Ray Train run - then the summary. results.json is :meth:`RunOutcome.results` serialised.

Nothing here imports Ray: the contract is plain data, readable (and testable) anywhere.
"""
from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from simsiam.config import Config


class Status(enum.StrEnum):
    """How a run ended; str-valued, so it serialises (and compares) as the plain strings of results.json."""

    FINISHED = "finished"      # every epoch ran (and, in the orchestrator, the evaluation succeeded)
    COLLAPSED = "collapsed"    # the collapse guard stopped it, or (ablations) the end-of-run verdict
    COLLAPSING = "collapsing"  # ablations only: above the thresholds at the end but falling towards them
    DIVERGED = "diverged"      # a non-finite loss or metric stopped it; the last good checkpoint is kept
    FAILED = "failed"          # a crash, bad data, or a failed evaluation; ``reason`` says which


@dataclass(frozen=True)
class EpochRecord:
    """One finished epoch, as reported to Ray Train each epoch and kept in the checkpoint's history.

    Per-step values are means over the epoch's steps (and over workers); ``lr`` is the last step's;
    ``pairs_per_s`` is over all workers; ``knn_top1`` (percent) only on epochs the monitor ran."""

    epoch: int
    step: int
    loss: float
    collapse_std: float
    effective_rank: float
    lr: float
    pairs_per_s: float
    skipped_images: int
    world_size: int
    global_batch: int
    knn_top1: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Every field, ``knn_top1`` None included (the checkpoint's and results.json's history rows)."""
        return dataclasses.asdict(self)

    def metrics(self) -> dict[str, Any]:
        """What ``ray.train.report`` carries: the fields that have a value."""
        return {k: v for k, v in self.to_dict().items() if v is not None}

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> EpochRecord:
        """A history row read back from a checkpoint (keys it does not know are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in names})


@dataclass(frozen=True)
class RunSpec:
    """Everything one run needs, resolved: the config, where its data lives, where its state goes.

    ``train_path`` is what pretraining reads (``data.path`` resolved; a shard list for retraining);
    ``heldout_path`` the labelled held-out set (kNN queries, linear top-1), None for none;
    ``linear_fit_path`` the labelled set the linear classifier is fitted on, None to skip the linear
    evaluation; ``storage_path`` where Ray Train keeps checkpoints (a directory or s3:// / gs:// URI);
    ``name`` the run's name there (rerunning a name resumes it; default ``config.run.name``)."""

    config: Config
    train_path: str
    heldout_path: str | None
    storage_path: str
    linear_fit_path: str | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.config.run.name)

    @property
    def run_path(self) -> str:
        """The run's directory under the storage (checkpoints, TensorBoard, a remote results.json copy)."""
        return f"{self.storage_path.rstrip('/')}/{self.name}"


@dataclass(frozen=True)
class RunOutcome:
    """What a run ended with. ``checkpoint`` is the latest checkpoint (a directory or URI),
    ``linear`` the linear evaluation's result (``top1``, ``top5``, ``baselines``, ... as
    :func:`simsiam.evaluate.linear_eval` returns it), ``replicas`` the per-rank parameter hashes
    gathered when :func:`simsiam.train.pretrain` is asked to (``check_replicas``). ``evaluation_error``
    says why the evaluation failed; the pretraining's own outcome (status, history, checkpoint) is kept beside it."""

    status: Status
    reason: str = ""
    history: tuple[EpochRecord, ...] = ()
    checkpoint: str | None = None
    run_path: str | None = None
    linear: dict | None = None
    evaluation_error: str | None = None
    replicas: tuple[dict, ...] = field(default=(), repr=False)

    @property
    def epochs_completed(self) -> int:
        return len(self.history)

    @property
    def last(self) -> EpochRecord | None:
        return self.history[-1] if self.history else None

    @property
    def steps(self) -> int:
        return self.last.step if self.last else 0

    @property
    def knn_top1(self) -> float | None:
        """The last kNN top-1 measured (the monitor does not run every epoch)."""
        return next((r.knn_top1 for r in reversed(self.history) if r.knn_top1 is not None), None)

    @property
    def collapse_std(self) -> float | None:
        return self.last.collapse_std if self.last else None

    @property
    def effective_rank(self) -> float | None:
        return self.last.effective_rank if self.last else None

    @property
    def skipped_images(self) -> int:
        return sum(r.skipped_images for r in self.history)

    @property
    def linear_top1(self) -> float | None:
        return self.linear.get("top1") if self.linear else None

    @property
    def linear_top5(self) -> float | None:
        return self.linear.get("top5") if self.linear else None

    @property
    def ssl_gain(self) -> float | None:
        """Linear top-1 minus the better baseline's (percentage points), when the baselines ran."""
        from simsiam.evaluate import ssl_gain

        baselines = (self.linear or {}).get("baselines")
        return ssl_gain(self.linear_top1, baselines) if baselines and self.linear_top1 is not None else None

    @property
    def tensorboard(self) -> str | None:
        return f"{self.run_path}/tensorboard" if self.run_path else None

    def history_dicts(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.history]

    def results(self) -> dict[str, Any]:
        """The outcome as results.json's keys (README: "What a run writes"); the pipeline adds
        ``config``, ``wall_s`` and its own files."""
        out = {
            "status": str(self.status), "reason": self.reason, "epochs_completed": self.epochs_completed,
            "linear_top1": self.linear_top1, "linear_top5": self.linear_top5,
            "baselines": (self.linear or {}).get("baselines"), "ssl_gain": self.ssl_gain,
            "knn_top1": self.knn_top1, "collapse_std": self.collapse_std, "effective_rank": self.effective_rank,
            "pairs_per_s": self.last.pairs_per_s if self.last else None, "skipped_images": self.skipped_images,
            "checkpoint": self.checkpoint, "run_path": self.run_path, "tensorboard": self.tensorboard,
            "history": self.history_dicts(),
        }
        if self.linear is not None:
            out["linear_eval"] = self.linear
        return out


def failed(reason: str) -> RunOutcome:
    """The outcome of a run that failed before it started (bad config or data found by the checks)."""
    return RunOutcome(Status.FAILED, reason)


def final_collapse(history: Sequence[EpochRecord | Mapping[str, Any]], cfg: Config):
    """The end-of-run collapse verdict (:func:`simsiam.metrics.collapse_verdict`) of a history (records,
    or their dicts as Tune results carry them), judged at the per-worker batch the metrics were measured on."""
    from simsiam.metrics import collapse_verdict

    rows = [r.to_dict() if isinstance(r, EpochRecord) else dict(r) for r in history]
    return collapse_verdict(rows, cfg.model.dim, cfg.per_worker_batch,
                            cfg.train.collapse_guard)


# ----------------------------------------------------------------------------- the orchestrator


def pretrain_and_evaluate(spec: RunSpec, callbacks: Sequence[Any] = (), *,
                          on_report: Callable[[dict], None] | None = None,
                          on_idle: Callable[[], None] | None = None,
                          before_evaluation: Callable[[RunOutcome], None] | None = None,
                          judge_collapse: bool = False) -> RunOutcome:
    """Pretrain (or resume) ``spec``, linear-evaluate the final weights, return the outcome.

    Never raises for a failed run: a crash in training or evaluation is ``Status.FAILED`` with its reason
    (a failed evaluation keeps the pretraining's history and checkpoint, and says so in
    ``evaluation_error``). ``callbacks`` are Ray Train UserCallbacks (Tune's TuneReportCallback in a
    trial); ``on_report``/``on_idle`` are :func:`simsiam.train.pretrain`'s.

    The evaluation runs when ``eval.enabled``, ``spec.linear_fit_path`` and a checkpoint exist and the run
    finished: the cached protocol's result from inside the pretraining run, else
    :func:`simsiam.evaluate.linear_eval` as its own Ray Train run. ``before_evaluation`` sees the
    pretraining's outcome first. ``judge_collapse`` (ablations, guard off) replaces a finished run's status
    by the end-of-run collapse verdict when that is not healthy, and evaluates collapsed runs too: there,
    collapse is the result being measured."""
    from simsiam.train import pretrain

    outcome = pretrain(spec, callbacks, on_report=on_report, on_idle=on_idle)
    if judge_collapse and outcome.status == Status.FINISHED:
        verdict = final_collapse(outcome.history, spec.config)
        if verdict.status != "healthy":
            outcome = dataclasses.replace(outcome, status=Status(verdict.status), reason=verdict.reason)
    evaluable = {Status.FINISHED, Status.COLLAPSED, Status.COLLAPSING} if judge_collapse else {Status.FINISHED}
    cfg = spec.config
    if outcome.status not in evaluable or not (cfg.eval.enabled and outcome.checkpoint and spec.linear_fit_path):
        return outcome
    if before_evaluation is not None:
        before_evaluation(outcome)
    return _evaluate(spec, outcome)


def _evaluate(spec: RunSpec, outcome: RunOutcome) -> RunOutcome:
    """``outcome`` with the linear evaluation's result, or FAILED with the evaluation's error."""
    from simsiam import console

    error = outcome.evaluation_error  # the in-run evaluation's, if it failed
    linear = outcome.linear
    if error is None and linear is None:
        from simsiam.evaluate import linear_eval

        try:
            linear = linear_eval(spec.config, outcome.checkpoint, spec.linear_fit_path, spec.heldout_path,
                                 spec.storage_path)
        except Exception as e:  # noqa: BLE001 - the pretraining stands; the failed evaluation is the outcome
            console.log_exception(e)
            error = console.one_line(e)
    if error is not None:
        return dataclasses.replace(outcome, status=Status.FAILED, reason=f"linear evaluation failed: {error}",
                                   evaluation_error=error, linear=None)
    return dataclasses.replace(outcome, linear=linear)
