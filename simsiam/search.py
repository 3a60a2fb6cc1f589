"""The Ray Tune harness shared by ``simsiam search`` and ``simsiam ablate``.

Three parts:

* **Search spaces** (:func:`load_space`): YAML files mapping dotted config names to distributions,
  validated against the config tree on load, so a typo or an impossible range fails in milliseconds
  with the file and parameter named.
* **The trial** (:func:`run_trial`, wrapped by :func:`make_trainable`): a Tune *function* that runs
  pretraining as a TorchTrainer (its per-epoch reports reach Tune through ``TuneReportCallback``, so
  ASHA sees the kNN monitor each epoch, keyed by the ``epoch`` we report), then linear evaluation as a
  second TorchTrainer, and reports the final result with ``status`` and ``linear_top1``.
* **Resources** (:func:`derive_concurrency`, :func:`reap_orphaned_placement_groups`): how many trials
  fit, and the placement groups of TorchTrainers whose trial was stopped returned to the cluster.
* **Results** (:func:`collect_results` and the writers): one :class:`TrialRecord` per trial with its
  status (finished | stopped_early | collapsed | diverged | failed), the CSV/console table, ``best.yaml``
  and the Optuna plots.

Each trial trains under its own run name (the Tune trial id) in ``<experiment>/runs``, so a trial
restarted after a driver crash resumes *its* pretraining checkpoint and never another trial's.

The Ray Tune subclasses (the Optuna searcher, the callback) live in :mod:`simsiam.tune_plugins`: this
module imports no Ray at import time, so ``simsiam search --help`` is instant.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import time
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from simsiam import config as C
from simsiam import io as sio
from simsiam.io import atomic_write_bytes, atomic_write_text

STATUSES = ("finished", "stopped_early", "collapsed", "collapsing", "diverged", "failed")
DISTRIBUTIONS = ("uniform", "loguniform", "int", "logint", "choice")
OBJECTIVE = "linear_top1"
TIME_ATTR = "epoch"
ASHA_METRIC = "knn_top1"
# The Tune function itself only waits on its TorchTrainers; its share is small and fixed.
TRIAL_CPU = 0.25
# Fields the harness sets per trial: searching them would make trials resume each other's runs.
RESERVED = ("run.name", "run.storage_path")
STUDY_NAME = "simsiam-search"
STUDY_FILE = "optuna_journal.log"
# The driver's local working copy of the journal, for a searcher restored from a snapshot taken on
# another machine (or in another --out-dir): set by the search around Tune's fit.
JOURNAL_ENV = "SIMSIAM_STUDY_JOURNAL"


def __getattr__(name: str) -> Any:
    # Experiments snapshotted by earlier versions pickled these Tune classes under this module's name;
    # resolving them here (importing Ray only then) lets such a search resume.
    legacy = {"FinalObjectiveOptunaSearch": "LinkedOptunaSearch", "ReleaseStoppedTrials": "ReleaseStoppedTrials"}
    if name in legacy:
        from simsiam import tune_plugins

        return getattr(tune_plugins, legacy[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class SpaceError(C.ConfigError):
    """An invalid search space: the message names the file, the parameter and what is wrong."""


class TrialFailed(RuntimeError):
    """Raised inside a trial that crashed (as opposed to one that collapsed or diverged, which report)."""


# ============================================================================ search spaces


@dataclass(frozen=True)
class Param:
    """One searched config field: ``distribution`` with ``low``/``high`` (and ``step``) or ``values``."""

    name: str
    distribution: str
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    values: tuple = ()

    def to_optuna(self) -> Any:
        """The equivalent ``optuna.distributions`` object."""
        from optuna import distributions as D

        if self.distribution == "choice":
            return D.CategoricalDistribution(list(self.values))
        if self.distribution in ("int", "logint"):
            return D.IntDistribution(int(self.low), int(self.high), log=self.distribution == "logint",
                                     step=int(self.step or 1))
        return D.FloatDistribution(float(self.low), float(self.high), log=self.distribution == "loguniform",
                                   step=self.step)

    def describe(self) -> str:
        if self.distribution == "choice":
            return f"choice {list(self.values)}"
        step = f" step {self.step}" if self.step else ""
        return f"{self.distribution} [{self.low}, {self.high}]{step}"


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space: parameters by dotted name, and points to try first (in order)."""

    params: dict[str, Param]
    points_to_evaluate: tuple[dict, ...] = ()
    source: str = "<space>"

    @property
    def names(self) -> list[str]:
        return list(self.params)

    def to_optuna(self) -> dict[str, Any]:
        """``{dotted name: optuna distribution}``, the form OptunaSearch takes directly."""
        return {n: p.to_optuna() for n, p in self.params.items()}

    def to_dict(self) -> dict:
        """The YAML form (what :func:`parse_space` reads back)."""
        out: dict = {"params": {}}
        for n, p in self.params.items():
            d: dict = {"distribution": p.distribution}
            if p.distribution == "choice":
                d["values"] = list(p.values)
            else:
                d.update(low=p.low, high=p.high)
                if p.step is not None:
                    d["step"] = p.step
            out["params"][n] = d
        if self.points_to_evaluate:
            out["points_to_evaluate"] = [dict(p) for p in self.points_to_evaluate]
        return out


def field_spec(name: str) -> tuple[Any, Mapping[str, Any]]:
    """(Python type, validation rules) of the config field ``name`` (dotted), or :class:`ConfigError`."""
    parts = name.split(".")
    tp: Any = C.Config
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(tp):
            break
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        if part not in fields:
            break
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(hints[part]):
                raise C.ConfigError(f"{name}: is a config section, not a field; search one of its fields, "
                                    f"e.g. {name}.{dataclasses.fields(hints[part])[0].name}")
            return hints[part], fields[part].metadata
        tp = hints[part]
    import difflib
    close = difflib.get_close_matches(name, C._known_keys(C.Config), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else " ('simsiam config --list' lists every field)"
    raise C.ConfigError(f"{name}: unknown config field{hint}")


def _number(src: str, name: str, key: str, value: Any, integer: bool) -> float | int:
    if integer and isinstance(value, float) and value.is_integer():  # 1e3 reads as a float
        value = int(value)
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or (isinstance(value, float) and not math.isfinite(value)):
        kind = "an integer" if integer else "a finite number"
        raise SpaceError(f"{src}: {name}.{key}: expected {kind}, got {value!r}")
    return value


def _parse_param(src: str, name: str, spec: Any) -> Param:
    if not isinstance(spec, Mapping):
        raise SpaceError(f"{src}: {name}: expected a mapping like {{distribution: loguniform, low: 0.01, "
                         f"high: 0.1}}, got {spec!r}")
    if name in RESERVED:
        raise SpaceError(f"{src}: {name}: cannot be searched; the search sets it per trial")
    try:
        tp, meta = field_spec(name)
    except C.ConfigError as e:
        raise SpaceError(f"{src}: {e}") from None
    dist = spec.get("distribution")
    if dist not in DISTRIBUTIONS:
        raise SpaceError(f"{src}: {name}.distribution: {dist!r} is not allowed; choose one of "
                         f"{', '.join(DISTRIBUTIONS)}")
    allowed = {"distribution", "values"} if dist == "choice" else {"distribution", "low", "high", "step"}
    extra = sorted(set(spec) - allowed)
    if extra:
        raise SpaceError(f"{src}: {name}: unknown key(s) {', '.join(map(str, extra))} for a {dist} "
                         f"distribution; allowed: {', '.join(sorted(allowed))}")
    if tp is list:
        raise SpaceError(f"{src}: {name}: list-valued fields cannot be searched")
    if dist == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise SpaceError(f"{src}: {name}.values: expected a non-empty list, got {values!r}")
        if len(set(map(repr, values))) != len(values):
            raise SpaceError(f"{src}: {name}.values: duplicates in {values!r}")
        checked = []
        for v in values:
            try:
                checked.append(C._check_value(name, v, tp, meta))
            except C.ConfigError as e:
                raise SpaceError(f"{src}: {name}.values: {e}") from None
        return Param(name, dist, values=tuple(checked))
    if tp in (bool, str):
        raise SpaceError(f"{src}: {name}: a {tp.__name__} field can only be searched with distribution: choice")
    integer = dist in ("int", "logint")
    if tp is int and not integer:
        raise SpaceError(f"{src}: {name}: an integer field; use distribution int, logint or choice, not {dist}")
    for key in ("low", "high"):
        if key not in spec:
            raise SpaceError(f"{src}: {name}: {dist} needs '{key}'")
    low = _number(src, name, "low", spec["low"], integer)
    high = _number(src, name, "high", spec["high"], integer)
    step = spec.get("step")
    if step is not None:
        step = _number(src, name, "step", step, integer)
        if step <= 0:
            raise SpaceError(f"{src}: {name}.step: must be > 0, got {step!r}")
        if dist in ("loguniform", "logint") and not (dist == "logint" and step == 1):
            raise SpaceError(f"{src}: {name}.step: a {dist} distribution cannot have a step")
    if not low < high:
        raise SpaceError(f"{src}: {name}: bad range, low ({low!r}) must be < high ({high!r})")
    if dist in ("loguniform", "logint") and low <= 0:
        raise SpaceError(f"{src}: {name}: bad range for {dist}, low must be > 0, got {low!r}")
    for key, v in (("low", low), ("high", high)):
        try:
            C._check_value(name, v, tp, meta)
        except C.ConfigError as e:
            raise SpaceError(f"{src}: {name}.{key}: {e}") from None
    return Param(name, dist, low=low, high=high, step=step)


def _check_point(src: str, i: int, point: Any, params: Mapping[str, Param]) -> dict:
    if not isinstance(point, Mapping):
        raise SpaceError(f"{src}: points_to_evaluate[{i}]: expected a mapping of parameter: value, got {point!r}")
    unknown = sorted(set(point) - set(params))
    missing = sorted(set(params) - set(point))
    if unknown:
        raise SpaceError(f"{src}: points_to_evaluate[{i}]: {', '.join(unknown)} not in the space's params")
    if missing:
        raise SpaceError(f"{src}: points_to_evaluate[{i}]: give every parameter; missing {', '.join(missing)}")
    out = {}
    for name, value in point.items():
        p = params[name]
        tp, meta = field_spec(name)
        try:
            value = out[name] = C._check_value(name, value, tp, meta)
        except C.ConfigError as e:
            raise SpaceError(f"{src}: points_to_evaluate[{i}]: {e}") from None
        # Numeric points may lie outside [low, high] on purpose (to probe a known-bad region);
        # a categorical value outside its choices has no meaning to the sampler.
        if p.distribution == "choice" and value not in p.values:
            raise SpaceError(f"{src}: points_to_evaluate[{i}]: {name}: {value!r} is not one of {list(p.values)}")
    return out


def parse_space(data: Any, source: str = "<space>", base: C.Config | None = None) -> SearchSpace:
    """Validate a space given as a mapping (the YAML's content). With ``base``, also check each range's
    ends and each choice against the whole config (rules spanning fields, e.g. batch vs workers)."""
    src = source
    if not isinstance(data, Mapping) or "params" not in data:
        raise SpaceError(f"{src}: expected a mapping with a 'params' section (dotted config name -> "
                         "distribution)")
    extra = sorted(set(data) - {"params", "points_to_evaluate", "description"})
    if extra:
        raise SpaceError(f"{src}: unknown top-level key(s) {', '.join(map(str, extra))}; allowed: params, "
                         "points_to_evaluate, description")
    raw = data["params"]
    if not isinstance(raw, Mapping) or not raw:
        raise SpaceError(f"{src}: params: expected a non-empty mapping, got {raw!r}")
    params = {str(n): _parse_param(src, str(n), spec) for n, spec in raw.items()}
    points = data.get("points_to_evaluate") or []
    if not isinstance(points, list):
        raise SpaceError(f"{src}: points_to_evaluate: expected a list of mappings, got {points!r}")
    checked = tuple(_check_point(src, i, p, params) for i, p in enumerate(points))
    space = SearchSpace(params, checked, src)
    if base is not None:
        check_space_against(space, base)
    return space


def check_space_against(space: SearchSpace, base: C.Config) -> None:
    """Each parameter's extremes (or every choice) and each point must give a valid config with ``base``."""
    for p in space.params.values():
        candidates = p.values if p.distribution == "choice" else (p.low, p.high)
        for v in candidates:
            try:
                base.replace({p.name: v})
            except C.ConfigError as e:
                raise SpaceError(f"{space.source}: {p.name}: value {v!r} is invalid with this config: {e}") from None
    for i, point in enumerate(space.points_to_evaluate):
        try:
            base.replace(point)
        except C.ConfigError as e:
            raise SpaceError(f"{space.source}: points_to_evaluate[{i}]: invalid with this config: {e}") from None


def load_space(path: str | os.PathLike, base: C.Config | None = None) -> SearchSpace:
    """Read and validate a search-space YAML file; errors are :class:`SpaceError` naming the file."""
    p = Path(path)
    if not p.is_file():
        raise SpaceError(f"search space {str(path)!r}: no such file (see tune_spaces/ for examples)")
    try:
        data = C.yaml_load(p.read_text())
    except yaml.YAMLError as e:
        raise SpaceError(f"{p}: not valid YAML: {e}") from None
    return parse_space(data, str(p), base)


# ============================================================================ resources


def trial_budget(cfg: C.Config) -> dict[str, float]:
    """What one trial holds while it runs: CPU/GPU for its Tune function, its train workers (the larger
    of the pretraining and linear-eval worker groups; they run one after the other) and, when
    ``data.data_cpus`` caps it, its Ray Data pipeline; ``data_pool`` is the free CPU that uncapped Ray
    Data needs somewhere on the cluster (one whole CPU: what each of its read/augment tasks asks for)."""
    t, lin = cfg.train, cfg.eval.linear
    workers = max(t.num_workers, lin.num_workers if lin.protocol == "full" else 1)
    capped = cfg.data.data_cpus > 0
    cpu = TRIAL_CPU + workers * t.cpus_per_worker + (cfg.data.data_cpus if capped else 0.0)
    return {"CPU": cpu, "GPU": float(workers if t.use_gpu else 0), "data_pool": 0.0 if capped else 1.0}


def derive_concurrency(cfg: C.Config, resources: Mapping[str, float], requested: int | None = None) -> int:
    """How many trials fit the cluster at once (never more than ``requested``, if given).

    Packing trials tighter hangs them: on 2 CPUs two uncapped trials at 0.75 CPU each left 0.5 CPU
    free, and Ray Data's 1-CPU read tasks never started. Capped pipelines fit beside each other;
    uncapped ones share whatever the trials leave free, which must be at least one CPU."""
    need = trial_budget(cfg)
    have_cpu = float(resources.get("CPU", 0.0))
    n = math.floor((have_cpu - need["data_pool"]) / need["CPU"] + 1e-9)
    if need["GPU"]:
        n = min(n, math.floor(float(resources.get("GPU", 0.0)) / need["GPU"] + 1e-9))
    if n < 1:
        raise C.ConfigError(
            f"one trial needs {need['CPU'] + need['data_pool']:g} CPU and {need['GPU']:g} GPU (train.num_workers "
            f"x train.cpus_per_worker + {TRIAL_CPU} for the trial + Ray Data: data.data_cpus, or 1 CPU when "
            f"that is 0), but the cluster has {have_cpu:g} CPU and {float(resources.get('GPU', 0)):g} GPU; "
            "lower train.cpus_per_worker or cap Ray Data (e.g. --set train.cpus_per_worker=0.5 "
            "--set data.data_cpus=0.25 on 2 CPUs)")
    return min(n, requested) if requested else n


# ============================================================================ the trial


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


def final_collapse(history: Sequence[Mapping[str, Any]], cfg: C.Config):
    """The collapse verdict (:func:`simsiam.metrics.collapse_verdict`) of a run from its per-epoch
    history: ``collapsed`` when the LAST epoch's mean std or rank is under the collapse guard's
    thresholds, ``collapsing`` when one is still above but falling steadily towards it, else
    ``healthy``. How ablations, which run with the guard off, tell a collapsed variant from a healthy
    one without the verdict hinging on the budget."""
    from simsiam.metrics import collapse_verdict

    return collapse_verdict(list(history), cfg.model.dim, cfg.optim.batch_size // cfg.train.num_workers,
                            cfg.train.collapse_guard)


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

    from simsiam.train import pretrain

    t0 = time.time()
    trial_id = ray.tune.get_context().get_trial_id()
    overrides = trial_overrides(tune_config, variants)
    try:
        cfg = C.from_dict(base).replace({**overrides, "run.name": trial_id})
    except C.ConfigError as e:
        raise TrialFailed(f"invalid config for this trial: {e}") from None

    pre = pretrain(cfg, train_path, eval_path, train_storage, callbacks=[TuneReportCallback()],
                   linear_fit_path=train_path)
    status, reason = pre.status, pre.reason
    if status == "failed":
        raise TrialFailed(reason or "pretraining failed")
    if classify_collapse and status == "finished":
        verdict = final_collapse(pre.history, cfg)
        if verdict.status != "healthy":
            status, reason = verdict.status, verdict.reason
    evaluate = cfg.eval.enabled and pre.checkpoint and (
        status == "finished" or (classify_collapse and status in ("collapsed", "collapsing")))
    top1 = top5 = None
    if evaluate:
        from simsiam.evaluate import linear_eval

        try:
            ev = pre.linear_result() or linear_eval(cfg, pre.checkpoint, train_path, eval_path, train_storage)
        except Exception as e:  # noqa: BLE001 - recorded as this trial's failure; the search goes on
            raise TrialFailed(f"linear evaluation failed: {type(e).__name__}: {e}") from e
        top1, top5 = ev.get("top1"), ev.get("top5")
    last = pre.last
    knn = next((h["knn_top1"] for h in reversed(pre.history) if h.get("knn_top1") is not None), None)
    # No 'epoch' key here: ASHA acts only on results carrying its time attribute, so this final result
    # can never stop the trial it concludes.
    ray.tune.report({
        "status": status,
        "reason": reason,
        OBJECTIVE: top1,
        "linear_top5": top5,
        "epochs_completed": len(pre.history),
        "steps": last.get("step", 0),
        "final_knn_top1": knn,
        "final_collapse_std": last.get("collapse_std"),
        "final_effective_rank": last.get("effective_rank"),
        "history_json": json.dumps(pre.history) if report_history else "",
        "overrides_json": json.dumps(overrides, default=str),
        "checkpoint": pre.checkpoint or "",
        "tensorboard": f"{pre.run_path}/tensorboard" if pre.run_path else "",
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


# ============================================================================ releasing stopped trials


def orphaned_placement_groups() -> list:
    """Placement groups still holding (or waiting for) resources whose creating actor is dead.

    A TorchTrainer's controller actor creates its workers' placement group. When Tune stops a trial
    (ASHA), the trial's actor is killed, the controller with it, and its group would stay reserved
    until the driver exits: Ray ties a non-detached group to its creator's job as well as its actor.
    Train's own PlacementGroupCleaner removes it, but finds the cluster through the state API, which
    fails whenever two Ray instances run on one host ("Found multiple active Ray instances", seen
    here), so the driver checks too. Groups created by the driver itself (Tune's trial groups) have no
    creator actor and are never listed. Reads the GCS table directly: Ray's public placement-group
    table omits the creator."""
    import ray
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


def reap_orphaned_placement_groups() -> int:
    """Remove :func:`orphaned_placement_groups`; returns how many. Never raises: this is a safety net,
    and a Ray whose internals moved on should not fail a search that Train's cleaner already serves."""
    from ray.util import remove_placement_group

    try:
        groups = orphaned_placement_groups()
    except Exception:  # noqa: BLE001
        return 0
    n = 0
    for pg in groups:
        try:
            remove_placement_group(pg)
            n += 1
        except Exception:  # noqa: BLE001 - removed meanwhile by Train's own cleaner
            pass
    return n


def wait_for_release(total: Mapping[str, float], timeout_s: float = 30.0) -> dict:
    """Poll (reaping orphaned groups) until no placement group is PENDING/CREATED/RESCHEDULING and the
    free CPU is back to ``total``; returns what it saw (``released`` says whether it got there)."""
    import ray
    from ray.util import placement_group_table

    deadline = time.time() + timeout_s
    while True:
        reap_orphaned_placement_groups()
        live = [pg for pg in placement_group_table().values()
                if pg.get("state") in ("CREATED", "PENDING", "RESCHEDULING")]
        free = ray.available_resources().get("CPU", 0.0)
        released = not live and free >= float(total.get("CPU", 0.0)) - 1e-6
        if released or time.time() > deadline:
            return {"released": released, "live_placement_groups": len(live), "free_cpu": free,
                    "total_cpu": float(total.get("CPU", 0.0))}
        time.sleep(0.5)


# ============================================================================ results


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


def _num(v: Any) -> float | None:
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
        objective=_num(metrics.get(OBJECTIVE)) if final else None,
        linear_top5=_num(metrics.get("linear_top5")) if final else None,
        epochs_completed=int(metrics.get("epochs_completed", metrics.get(TIME_ATTR, 0)) or 0),
        steps=int(metrics.get("steps", metrics.get("step", 0)) or 0),
        knn_top1=_num(metrics.get("final_knn_top1" if final else ASHA_METRIC)),
        collapse_std=_num(metrics.get("final_collapse_std" if final else "collapse_std")),
        effective_rank=_num(metrics.get("final_effective_rank" if final else "effective_rank")),
        params={k: v for k, v in config.items() if "." in k},
        config=dict(config),
        history=history,
        tensorboard=str(metrics.get("tensorboard") or ""),
        path=path,
    )


def collect_results(grid: Any, epochs: int) -> list[TrialRecord]:
    """Records for every trial of a Tune ``ResultGrid``, in trial-creation order."""
    out = []
    for r in grid:
        metrics = dict(r.metrics or {})
        path = str(r.path or "")
        trial_id = str(metrics.get("trial_id") or Path(path).name)
        out.append(record_from_result(trial_id, metrics, dict(r.config or {}), r.error, epochs, path))
    return sorted(out, key=lambda rec: rec.trial_id)


def best_record(records: Iterable[TrialRecord]) -> TrialRecord | None:
    """The finished trial with the highest objective, or None."""
    done = [r for r in records if r.status == "finished" and r.objective is not None]
    return max(done, key=lambda r: r.objective) if done else None


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


TABLE_COLUMNS = ("trial_id", "status", "objective", "linear_top5", "epochs_completed", "knn_top1",
                 "collapse_std", "effective_rank")


def table_rows(records: Sequence[TrialRecord], param_names: Sequence[str],
               optuna_trials: Mapping[str, int] | None = None) -> list[dict]:
    """One flat dict per trial: the fixed columns, each parameter, then reason and log paths. With
    ``optuna_trials`` ({Tune trial id: Optuna trial number}), an ``optuna_trial`` column follows ``trial_id``."""
    rows = []
    for r in records:
        row = {c: getattr(r, c) for c in TABLE_COLUMNS}
        if optuna_trials is not None:
            row = {"trial_id": row.pop("trial_id"), "optuna_trial": optuna_trials.get(r.trial_id), **row}
        row.update({n: r.params.get(n) for n in param_names})
        row.update(reason=r.reason, tensorboard=r.tensorboard, path=r.path)
        rows.append(row)
    return rows


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Write dict rows as CSV (atomically); columns are the first row's keys."""
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A fixed-width text table of ``rows`` (for the console)."""
    if not rows:
        return "(no trials)"
    columns = list(columns or rows[0])
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def write_best_config(base: C.Config, best: TrialRecord, path: str | os.PathLike,
                      run_name: str | None = None) -> C.Config:
    """``base`` with the best trial's parameters, written as a YAML config that ``simsiam run`` takes
    as is. The run gets its own name, so it never resumes a trial's checkpoints."""
    cfg = base.replace({**best.params, "run.name": run_name or f"{base.run.name}-best"})
    header = (f"# Best trial {best.trial_id} of the search: linear top-1 {best.objective:.2f}%.\n"
              f"# Parameters: {json.dumps(best.params, default=str)}\n# Run it with: simsiam run {path}\n")
    atomic_write_text(path, header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return cfg


def _save_figure(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


MIN_FOR_HISTORY = 2      # trials with a value (finished, or stopped with a kNN) to draw the history
MIN_FOR_IMPORTANCE = 4   # finished trials before parameter importances mean anything


def _history_figure(study: Any) -> Any:
    """Optimisation history: each finished trial's objective with the best so far, and each trial ASHA
    stopped at its last kNN top-1 (its last intermediate value), marked apart."""
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    fig, ax = plt.subplots(figsize=(7, 4))
    done = [t for t in study.trials if t.state == TrialState.COMPLETE and t.value is not None]
    stopped = [t for t in study.trials if t.state == TrialState.PRUNED and t.intermediate_values]
    if done:
        xs = [t.number for t in done]
        ax.plot(xs, [t.value for t in done], "o", color="tab:blue", label=f"finished: {OBJECTIVE} ({len(done)})")
        best, run = [], -math.inf
        for t in done:
            run = max(run, t.value)
            best.append(run)
        ax.step(xs, best, where="post", color="tab:red", label="best so far")
    if stopped:
        last = [(t.number, t.intermediate_values[max(t.intermediate_values)], max(t.intermediate_values))
                for t in stopped]
        ax.plot([n for n, _, _ in last], [v for _, v, _ in last], "v", color="tab:gray", mfc="none",
                label=f"stopped by ASHA: last kNN top-1 ({len(stopped)})")
        for n, v, epoch in last:
            ax.annotate(f"ep {epoch}", (n, v), textcoords="offset points", xytext=(4, -10), fontsize=7, color="gray")
    ax.set_xlabel("Optuna trial number")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("optimisation history")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_study(study: Any, out_dir: str | os.PathLike) -> dict[str, str]:
    """Optimisation history and parameter importances of an Optuna study as PNGs under ``out_dir``.
    Returns {name: path, or 'skipped: why'}: a plot with too few trials to mean anything is not drawn
    (and an older one of the same name is removed), rather than drawn as one dot."""
    import warnings

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm
    from optuna.trial import TrialState

    out = Path(out_dir)
    n_done = sum(t.state == TrialState.COMPLETE and t.value is not None for t in study.trials)
    n_stopped = sum(t.state == TrialState.PRUNED and bool(t.intermediate_values) for t in study.trials)
    counts = f"{n_done} finished, {n_stopped} stopped early with a kNN value"
    done = {}
    for name, enough, need, draw in (
            ("optimization_history", n_done + n_stopped >= MIN_FOR_HISTORY,
             f"needs {MIN_FOR_HISTORY} with a value", lambda: _history_figure(study)),
            ("param_importances", n_done >= MIN_FOR_IMPORTANCE, f"needs {MIN_FOR_IMPORTANCE} finished",
             lambda: ovm.plot_param_importances(study))):
        path = out / f"{name}.png"
        if not enough:
            path.unlink(missing_ok=True)
            done[name] = f"skipped: not enough finished trials ({counts}; {need})"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna's ExperimentalWarning for the matplotlib backend
                ax = draw()
            fig = ax if hasattr(ax, "savefig") else ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            _save_figure(fig, path)
            plt.close(fig)
            done[name] = str(path)
        except Exception as e:  # noqa: BLE001 - a plot that cannot be drawn yet is reported, not fatal
            plt.close("all")
            done[name] = f"skipped: {type(e).__name__}: {e}"
    return done


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


# ============================================================================ driving Tune


EXPERIMENT = "tune"
SNAPSHOT_PERIOD_S = 5


def trial_dirname(trial: Any) -> str:
    """Short, stable trial directories (the trial id) instead of Tune's parameter-laden names."""
    return str(trial.trial_id)


def experiment_root(out_dir: str | os.PathLike, storage_path: str, name: str) -> str:
    """Where a search's or an ablation's Tune experiment (``<root>/tune``: trials, their checkpoints,
    the searcher's snapshots) lives: ``<run.storage_path>/<name>`` when that is set, keyed by ``name``
    rather than by the --out-dir, so a driver on another machine finds it; else ``out_dir``."""
    storage = storage_path.strip()
    return sio.join(sio.absolute(storage), name) if storage else sio.absolute(out_dir)


def claim_out_dir(out_dir: str | os.PathLike, filename: str, spec: Mapping[str, Any]) -> bool:
    """Record what this experiment is (``spec``; its ``config``, if any, a full config dict) in
    ``out_dir/filename``; True when the directory already holds the same experiment (a resume). A
    different experiment there is a :class:`ConfigError`: resuming it with other settings would mix
    two searches in one study."""
    path = sio.join(sio.absolute(out_dir), filename)
    want = json.loads(json.dumps(spec, sort_keys=True, default=str))
    if sio.exists(path):
        try:
            have = json.loads(sio.read_text(path))
        except ValueError:
            have = None
        if isinstance(have, dict) and isinstance(have.get("config"), dict):
            # Read the stored config with today's code, so fields added since (at their defaults) match.
            try:
                have["config"] = json.loads(json.dumps(C.from_dict(have["config"]).to_dict(), sort_keys=True,
                                                       default=str))
            except C.ConfigError:
                pass
        if have != want:
            diff = sorted(k for k in set(want) | set(have or {}) if (have or {}).get(k) != want.get(k))
            raise C.ConfigError(f"{out_dir} already holds a different experiment ({filename} differs in: "
                                f"{', '.join(diff) or 'format'}); rerun with the same arguments to resume it, "
                                "or choose another --out-dir")
        return True
    atomic_write_text(path, json.dumps(want, indent=2, sort_keys=True) + "\n")
    return False


class _env:
    """Set environment variables for the duration of a block, then restore them."""

    def __init__(self, **values: str):
        self.values, self.saved = values, {}

    def __enter__(self) -> None:
        for k, v in self.values.items():
            self.saved[k] = os.environ.get(k)
            os.environ[k] = v

    def __exit__(self, *exc: Any) -> None:
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def fit(out_dir: str | os.PathLike, trainable: Any, tune_config: Callable[[], Any],
        param_space: Mapping[str, Any] | None = None, strict_metrics: bool = True,
        callbacks: Sequence[Any] = ()) -> tuple[Any, bool]:
    """Run the experiment ``out_dir/tune`` (``out_dir``: a local directory or an s3://, gs:// URI) to the
    end, restoring it if a previous driver left it
    unfinished (finished and errored trials are kept as they are; unfinished ones continue, their
    TorchTrainers resuming from their own checkpoints). Returns (ResultGrid, resumed).

    ``tune_config`` is called only for a new experiment: a restored one keeps its pickled searcher and
    scheduler state, and building a fresh searcher would enqueue its first points in the study again.

    ``strict_metrics=False`` lets per-epoch results lack the final objective and the final result
    lack the epoch (Tune otherwise insists every result carry every metric its searcher and scheduler use).
    ``callbacks``: more Tune callbacks (the console's trial lines); a restored experiment keeps those it
    was started with (Tune pickles them with the experiment)."""
    import ray.tune

    from simsiam.tune_plugins import ReleaseStoppedTrials

    root = sio.absolute(out_dir)
    exp = sio.join(root, EXPERIMENT)
    # Tune snapshots the experiment at most every 10 s, and less often as the snapshot grows; a driver
    # killed in between would run a just-finished trial again. A fixed short period keeps that window small.
    env = {"TUNE_GLOBAL_CHECKPOINT_S": os.environ.get("TUNE_GLOBAL_CHECKPOINT_S", str(SNAPSHOT_PERIOD_S))}
    if not strict_metrics:
        env["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    with _env(**env):
        if ray.tune.Tuner.can_restore(exp):
            tuner = ray.tune.Tuner.restore(exp, trainable, resume_unfinished=True, resume_errored=False)
            resumed = True
        else:
            tuner = ray.tune.Tuner(
                trainable, param_space=dict(param_space or {}), tune_config=tune_config(),
                run_config=ray.tune.RunConfig(name=EXPERIMENT, storage_path=root,
                                              failure_config=ray.tune.FailureConfig(max_failures=0),
                                              callbacks=[ReleaseStoppedTrials(), *callbacks]))
            resumed = False
        return tuner.fit(), resumed
