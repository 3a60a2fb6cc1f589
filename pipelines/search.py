"""Hyperparameter search over pretrain-then-linear-eval: Ray Tune with Optuna (seeded TPE) and ASHA.

    simsiam search [CONFIG] --space tune_spaces/default.yaml --trials N [--out-dir DIR] [--set k=v ...]
    python -m pipelines.search [same arguments]

Each trial is a Tune function that pretrains (a TorchTrainer), then linear-evaluates the frozen
backbone (with eval.linear.protocol=cached inside the same workers after the last epoch, with full a
second TorchTrainer), and reports the linear top-1 as the objective. ASHA compares trials
on the kNN monitor (the search sets train.knn_every=1) from a quarter of the epochs on (its grace
period, printed at the start; --grace-epochs to change) and stops the weak ones; the
collapse guard stops collapsed runs inside the workers. Collapsed, diverged and crashed trials are
recorded with their reason and the search goes on. As many trials run at once as the cluster fits
(each needs its train workers' CPUs/GPUs plus a little for the trial and Ray Data); --max-concurrent
lowers that.

Rerunning the same command resumes an interrupted search: finished trials are kept, unfinished ones
continue from their last pretraining checkpoint. With run.storage_path on object storage (s3://, gs://)
the Tune experiment lives under STORAGE/search-<run.name>/tune/ (trials, checkpoints, and a copy of the
Optuna journal published after every change), so the search resumes from there on any machine, with an
empty or new --out-dir. Trials stopped by ASHA have no objective (they are
not linear-evaluated: ASHA judged them not worth it).

Writes, under DIR (default runs/search-<run.name>):
  trials.csv           one row per trial: Tune trial id, Optuna trial number, status, objective,
                       parameters, reason, TensorBoard dir, trial dir
  best.yaml            the config of the best trial; `simsiam run DIR/best.yaml` runs it as is
  plots/*.png          objective history (stopped trials at their last kNN) and parameter importances,
                       each drawn once enough trials finished
  summary.json         best trial, counts by status, whether every placement group was released
  tune/                the Tune experiment; tune/optuna_journal.log is the Optuna study
                       (optuna.load_study(study_name="simsiam-search", storage=JournalStorage(...)));
                       each Optuna trial's user_attrs hold tune_trial_id, tune_trial_dir, run_dir and
                       status, its intermediate values the per-epoch kNN top-1;
                       tune/runs/<trial id>/ holds each trial's checkpoints and TensorBoard logs
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from simsiam import config as C
from simsiam import io as sio
from simsiam import search as S
from simsiam.io import atomic_write_json


def build_parser(prog: str = "python -m pipelines.search") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default="sample",
                   help="preset name (sample, cifar10, imagenet) or a YAML file (default: sample)")
    p.add_argument("--space", default=str(Path(__file__).resolve().parent.parent / "tune_spaces" / "default.yaml"),
                   help="search-space YAML (default: tune_spaces/default.yaml)")
    p.add_argument("--trials", type=int, default=8, help="number of trials (default: 8)")
    p.add_argument("--out-dir", default=None, help="experiment directory (default: runs/search-<run.name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field of the base config by dotted name (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of Optuna's TPE sampler (default: 0)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="at most this many trials at once (default: as many as the cluster fits)")
    p.add_argument("--grace-epochs", type=int, default=None,
                   help="ASHA: epochs every trial runs before it can be stopped, i.e. the first rung (default: "
                        "a quarter of train.epochs, rounded up: early kNN scores mostly reflect the initialisation)")
    p.add_argument("--reduction-factor", type=float, default=2.0,
                   help="ASHA: keep the top 1/factor of trials at each rung (default: 2)")
    S.add_cluster_arguments(p)
    return p


def search_config(base: C.Config) -> C.Config:
    """The config trials start from: the kNN monitor every epoch, since ASHA decides on it each epoch."""
    return base.replace({"train.knn_every": 1})


def default_grace(epochs: int) -> int:
    """ASHA's grace period (its first rung) when not given: a quarter of the trial's epochs, rounded up.
    A rung at epoch 1 judges trials on a kNN that mostly reflects the initialisation (seen: 3 of 4 trials
    cut there); a quarter of the budget scales with any run length (15 epochs: rungs at 4 and 8)."""
    return max(1, math.ceil(epochs / 4))


def make_scheduler(epochs: int, grace: int, reduction_factor: float):
    """ASHA on the per-epoch kNN top-1 with our own ``epoch`` as the time attribute; FIFO when the
    runs are too short for any rung. No rung sits at the last epoch (max_t = epochs - 1 and trials are
    not stopped at max_t): a trial that trained every epoch is always linear-evaluated."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if epochs <= grace:
        return FIFOScheduler()
    return ASHAScheduler(time_attr=S.TIME_ATTR, metric=S.ASHA_METRIC, mode="max", max_t=epochs - 1,
                         grace_period=grace, reduction_factor=reduction_factor, stop_last_trials=False)


def asha_plan(epochs: int, grace: int | None, reduction_factor: float) -> tuple[Any, dict]:
    """ASHA for trials of ``epochs`` (:func:`make_scheduler`; ``grace`` None = :func:`default_grace`),
    said on the console; returns (scheduler, its description for summary.json)."""
    from simsiam import console
    from simsiam.ray_compat import asha_rungs

    grace_from = "given" if grace is not None else "a quarter of the epochs, rounded up"
    grace = default_grace(epochs) if grace is None else grace
    scheduler = make_scheduler(epochs, grace, reduction_factor)
    rungs = asha_rungs(scheduler)
    console.say(f"ASHA: grace {grace} of {epochs} epochs ({grace_from}); "
                + (f"compares trials on kNN top-1 at epoch(s) {', '.join(map(str, rungs))}, keeping the top "
                   f"1/{reduction_factor:g}" if rungs else "no rung fits: every trial runs all its epochs"))
    return scheduler, {"grace_epochs": grace, "grace_from": grace_from, "reduction_factor": reduction_factor,
                       "rungs": rungs}


def run_search(base: C.Config, space: S.SearchSpace, trials: int, out_dir: str | os.PathLike, seed: int = 0,
               max_concurrent: int | None = None, grace: int | None = None, reduction_factor: float = 2.0,
               address: str | None = None) -> dict:
    """Run (or resume) the search and write its outputs; returns the summary (also DIR/summary.json).
    ``grace``: ASHA's grace period in epochs; None = :func:`default_grace` of the trials' epochs."""
    from simsiam import console
    from simsiam.data.preflight import preflight

    if trials < 1:
        raise C.ConfigError(f"--trials: must be >= 1, got {trials}")
    grace_epochs = default_grace(base.train.epochs) if grace is None else grace
    if grace_epochs < 1 or reduction_factor <= 1:
        raise C.ConfigError(f"--grace-epochs must be >= 1 and --reduction-factor > 1, got {grace_epochs}, "
                            f"{reduction_factor}")
    t0 = time.time()
    out = Path(out_dir).resolve()
    cfg = search_config(base)
    S.check_space_against(space, cfg)
    spec = {"config": base.to_dict(), "space": space.to_dict(), "trials": trials, "seed": seed,
            "grace_epochs": grace_epochs, "reduction_factor": reduction_factor}
    # With run.storage_path, the Tune experiment (trials, checkpoints, searcher snapshots) and a published
    # copy of the Optuna journal live there, keyed by the run name, so a driver on another machine (any
    # --out-dir) resumes the search from object storage alone. The journal itself is worked on locally.
    root = S.claim_experiment(out, cfg.run.storage_path, f"search-{base.run.name}", "search.json", spec)
    exp, journal = out / S.EXPERIMENT, out / S.EXPERIMENT / S.STUDY_FILE
    tune_exp = sio.join(root, S.EXPERIMENT)
    journal_copy = sio.join(tune_exp, S.STUDY_FILE) if root != str(out) else ""
    data = preflight(cfg.data)  # bad data fails here, before any Ray process starts
    for w in data.warnings:
        console.warn(w)

    import ray.tune

    from simsiam.trial_console import TrialLines

    where, total, concurrency = S.connect(cfg, address, max_concurrent)
    console.say(f"search: {trials} trials over {', '.join(space.names)} on {where}; {concurrency} at a time; "
                f"out {out}")
    exp.mkdir(parents=True, exist_ok=True)
    if S.reset_or_fetch_journal(ray.tune.Tuner.can_restore(tune_exp), journal, journal_copy):
        console.say(f"resuming the search from {tune_exp}: Optuna journal fetched from {journal_copy}")
    scheduler, asha = asha_plan(cfg.train.epochs, grace, reduction_factor)

    def tune_config():
        return ray.tune.TuneConfig(
            search_alg=S.make_searcher(space, tune_exp, seed, cfg.train.epochs, journal_dir=exp,
                                       journal_copy=journal_copy),
            scheduler=scheduler,
            num_samples=trials, max_concurrent_trials=concurrency, trial_dirname_creator=S.trial_dirname)

    trainable = S.make_trainable(cfg, data.train_path, data.eval_path, sio.join(tune_exp, S.TRIAL_RUNS))
    lines = TrialLines(cfg.train.epochs, lambda m, err: S.classify(m, err, cfg.train.epochs), space.names, trials)
    # JOURNAL_ENV: where a restored searcher finds the study (tune_plugins).
    grid, resumed = S.fit(root, trainable, tune_config, strict_metrics=False, callbacks=[lines],
                          env={S.JOURNAL_ENV: str(journal)})
    records = S.collect_results(grid, cfg.train.epochs)
    release = S.wait_for_release(total)
    summary = write_outputs(base, space, records, out, exp, resumed, release, time.time() - t0, asha, tune_exp)
    if journal_copy:  # with the orphaned trials failed by write_outputs
        S.publish_journal(journal, journal_copy)
    return summary


def write_outputs(base: C.Config, space: S.SearchSpace, records: list[S.TrialRecord], out: Path, exp: Path,
                  resumed: bool, release: dict, wall_s: float, asha: dict | None = None,
                  experiment: str | None = None) -> dict:
    """trials.csv (each Tune trial with its Optuna trial number and directory), the console table,
    best.yaml, plots and summary.json. ``exp``: the local directory holding the Optuna journal;
    ``experiment``: where the Tune experiment lives (default ``exp``; a URI with run.storage_path)."""
    from simsiam import console

    try:
        study = S.load_study(exp)
        S.fail_orphaned_trials(study)
        numbers = S.optuna_numbers(study)
    except Exception as e:  # noqa: BLE001 - the study is a convenience; the table and best.yaml stand
        study, numbers = None, {}
        console.warn(f"the Optuna study in {exp} could not be read: {type(e).__name__}: {e}")
    rows = S.table_rows(records, space.names, numbers)
    S.write_csv(rows, out / "trials.csv")
    console.text(S.format_table(rows, [*S.TABLE_COLUMNS[:5], *space.names, "reason"]))
    best = S.best_record(records)
    if best is not None:
        S.write_best_config(base, best, out / "best.yaml")
        console.say(f"best: trial {best.trial_id}, linear top-1 {best.objective:.2f}%, "
                    f"params {best.params}; config {out / 'best.yaml'}")
    else:
        (out / "best.yaml").unlink(missing_ok=True)
        console.say("no trial finished with an objective: no best.yaml")
    plots = {"study": "skipped: the Optuna study could not be read"}
    if study is not None:
        try:
            plots = S.plot_study(study, out / "plots")
        except Exception as e:  # noqa: BLE001 - plots are a convenience; the table and best.yaml stand
            plots = {"study": f"skipped: {type(e).__name__}: {e}"}
    for name, where in plots.items():
        console.say(f"plot {name}: {where}")
    if not release["released"]:
        console.warn(f"resources not released after the search: {release}")
    summary = {
        "trials": len(records),
        "by_status": {s: sum(r.status == s for r in records) for s in S.STATUSES},
        "best": None if best is None else {"trial_id": best.trial_id, "objective": best.objective,
                                           "params": best.params},
        "resumed": resumed,
        "asha": asha,
        "resources": release,
        "plots": plots,
        "wall_s": round(wall_s, 2),
        "table": str(out / "trials.csv"),
        "best_config": str(out / "best.yaml") if best is not None else None,
        "experiment": str(experiment or exp),
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


def main(argv: list[str] | None = None, prog: str = "python -m pipelines.search") -> int:
    args = build_parser(prog).parse_args(argv)

    def load() -> tuple[C.Config, S.SearchSpace]:
        base = C.load(args.config, args.overrides)
        return base, S.load_space(args.space, search_config(base))

    def work(base: C.Config, space: S.SearchSpace, out: Path) -> dict:
        return run_search(base, space, args.trials, out, seed=args.seed, max_concurrent=args.max_concurrent,
                          grace=args.grace_epochs, reduction_factor=args.reduction_factor, address=args.address)

    def done(summary: dict) -> tuple[str, int]:
        counts = ", ".join(f"{n} {s}" for s, n in summary["by_status"].items() if n)
        return (f"search done: {summary['trials']} trials ({counts}), wall {summary['wall_s']:.0f} s; "
                f"table {summary['table']}", 0 if summary["best"] is not None else 1)

    return S.run_command("search", load, args.out_dir, args.verbose, work, done)


if __name__ == "__main__":
    sys.exit(main())
