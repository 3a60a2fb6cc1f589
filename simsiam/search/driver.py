"""Driving an experiment (a search or an ablation study): its place (local or object storage) and
the claim on it, the cluster it runs on, :func:`fit`, which runs a new Tune experiment or restores an
unfinished one, and :func:`run_command`, the console shell of ``simsiam search`` and ``simsiam ablate``."""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from simsiam import config as C
from simsiam import io as sio
from simsiam.io import atomic_write_text
from simsiam.search.resources import derive_concurrency

EXPERIMENT = "tune"
# Under the Tune experiment: each trial's pretraining run (checkpoints, TensorBoard), named by trial id.
TRIAL_RUNS = "runs"
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


def claim_experiment(out_dir: str | os.PathLike, storage_path: str, name: str, filename: str,
                     spec: Mapping[str, Any]) -> str:
    """Claim ``out_dir`` for the experiment ``spec`` (:func:`claim_out_dir`) and, when it lives under
    ``run.storage_path`` (:func:`experiment_root`), that place too; returns the experiment's root."""
    claim_out_dir(out_dir, filename, spec)
    root = experiment_root(out_dir, storage_path, name)
    if root != sio.absolute(out_dir):
        claim_out_dir(root, filename, spec)
    return root


def connect(cfg: C.Config, address: str | None, max_concurrent: int | None) -> tuple[str, dict, int]:
    """Connect to the Ray cluster at ``address`` ($RAY_ADDRESS, else a new local one); returns (where,
    its total resources, how many trials of ``cfg`` fit at once: :func:`derive_concurrency`)."""
    import ray

    from simsiam import console
    from simsiam.ray_utils import init_ray

    console.say("connecting to Ray" if (address or os.environ.get("RAY_ADDRESS")) else "starting a local Ray cluster")
    where = init_ray(address)
    total = ray.cluster_resources()
    return where, total, derive_concurrency(cfg, total, max_concurrent)


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options of a search or an ablation study about where and how it runs:
    ``--address`` (the Ray cluster) and ``-v/--verbose`` (Ray's own output on the console)."""
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: $RAY_ADDRESS, else start a local cluster)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Ray's and Tune's own output on the console; by default it goes to DIR/ray.log")


def run_command(kind: str, load: Callable[[], tuple[C.Config, Any]], out_dir: str | None, verbose: bool,
                work: Callable[[C.Config, Any, Path], dict], done: Callable[[dict], tuple[str, int]]) -> int:
    """The console shell of ``simsiam search`` and ``simsiam ablate``; returns the exit code.

    ``load()`` reads the base config and checks the other arguments, returning (config, what else the
    work needs): a :class:`ConfigError` there is ``config error: ...`` on stderr and exit code 2, before
    anything starts. Then ``work(config, extra, out)`` runs in a console session on ``out`` (``out_dir``,
    default runs/<kind>-<run.name>; Ray's output goes to its ray.log unless ``verbose``). A config or data
    error there is one line and exit code 2, any other error one line (the traceback in the log) and 1;
    else ``done(summary)`` gives the closing line and the exit code."""
    import sys

    from simsiam import console
    from simsiam.data.schema import DataError

    try:
        base, extra = load()
    except C.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    out = Path(out_dir or os.path.join("runs", f"{kind}-{base.run.name}")).resolve()
    with console.session(out, verbose=verbose) as log:
        console.say(f"{kind} '{base.run.name}' -> {out} "
                    + ("(--verbose: Ray's output on the console)" if verbose else f"(Ray's output: {log})"))
        try:
            summary = work(base, extra, out)
        except (C.ConfigError, DataError) as e:
            console.error(str(e))
            return 2
        except Exception as e:  # noqa: BLE001 - one line here, the traceback in the log
            console.error(f"{console.one_line(e)} (traceback in {console.log_exception(e)})")
            return 1
        line, code = done(summary)
        console.say(line)
    return code


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
        callbacks: Sequence[Any] = (), env: Mapping[str, str] | None = None) -> tuple[Any, bool]:
    """Run the experiment ``out_dir/tune`` (``out_dir``: a local directory or an s3://, gs:// URI) to the
    end, restoring it if a previous driver left it
    unfinished (finished and errored trials are kept as they are; unfinished ones continue, their
    TorchTrainers resuming from their own checkpoints). Returns (ResultGrid, resumed).

    ``tune_config`` is called only for a new experiment: a restored one keeps its pickled searcher and
    scheduler state, and building a fresh searcher would enqueue its first points in the study again.

    ``strict_metrics=False`` lets per-epoch results lack the final objective and the final result
    lack the epoch (Tune otherwise insists every result carry every metric its searcher and scheduler use).
    ``callbacks``: more Tune callbacks (the console's trial lines); a restored experiment keeps those it
    was started with (Tune pickles them with the experiment). ``env``: more environment variables set
    for the duration of the fit (the driver and the searcher it restores read them)."""
    import ray.tune

    from simsiam.tune_plugins import ReleaseStoppedTrials

    root = sio.absolute(out_dir)
    exp = sio.join(root, EXPERIMENT)
    # Tune snapshots the experiment at most every 10 s, and less often as the snapshot grows; a driver
    # killed in between would run a just-finished trial again. A fixed short period keeps that window small.
    snapshot_s = os.environ.get("TUNE_GLOBAL_CHECKPOINT_S", str(SNAPSHOT_PERIOD_S))
    env = {**(env or {}), "TUNE_GLOBAL_CHECKPOINT_S": snapshot_s}
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
