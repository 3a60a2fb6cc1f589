"""The paper's empirical study as one command: each ablation variant a trial of one Tune grid.

    simsiam ablate [CONFIG] [--study NAME ...] [--variant ID ...] [--seeds N] [--out-dir DIR] [--set k=v ...]
    python -m pipelines.ablate [same arguments]

Studies (simsiam/ablations.py): stop_gradient, predictor (learned / none / fixed / constant lr),
batch_size, bn, similarity (cosine vs cross-entropy), symmetry, output_dim, target_refresh (k-step).
Every variant is applied on top of CONFIG and run with seeds train.seed, train.seed+1, ... Variants that
come out identical (the default appears in several studies) run once. Each run pretrains, then
linear-evaluates, collapsed or not: a collapsed variant is a result ("collapsed"), not an error. The
collapse guard is off unless --collapse-guard, so collapse is shown rather than cut short; a run
counts as collapsed when its last epoch's collapse std or effective rank is under the guard's
thresholds, and as collapsing when either is still above but falling steadily (least-squares slope
over the last third of the run, 2 standard errors below 0) fast enough to cross it within as many
more epochs as the run had, so that no verdict depends on where the budget ended. Rerunning the same
command resumes an interrupted study.

Writes, under DIR (default runs/ablate-<run.name>):
  ablations.md     one table per study in the paper's shape (linear top-1 mean +- std over seeds, final
                   collapse std and effective rank, status, the paper's ImageNet figure), then every run
  ablations.csv    one row per variant and seed
  ablations.png    collapse std, effective rank and kNN top-1 against training steps per variant
  tune/            the Tune experiment; tune/runs/<trial id>/ holds checkpoints and TensorBoard logs
                   (with run.storage_path set: STORAGE/ablate-<run.name>/tune/, resumable from any machine)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from simsiam import ablations as A
from simsiam import config as C
from simsiam import io as sio
from simsiam import search as S
from simsiam.io import atomic_write_json, atomic_write_text


def build_parser(prog: str = "python -m pipelines.ablate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default="sample",
                   help="preset name (sample, cifar10, imagenet) or a YAML file (default: sample)")
    p.add_argument("--study", nargs="+", default=None, choices=list(A.STUDIES), metavar="NAME",
                   help=f"studies to run (default: all): {', '.join(A.STUDIES)}")
    p.add_argument("--variant", nargs="+", default=None, metavar="ID",
                   help="only these variants of the selected studies (id or study:id, e.g. no_stop_grad)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per variant (default: 1)")
    p.add_argument("--out-dir", default=None, help="output directory (default: runs/ablate-<run.name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field of the base config by dotted name (repeatable)")
    p.add_argument("--collapse-guard", action="store_true",
                   help="keep the collapse guard on (stops collapsed runs early; default: off)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="at most this many runs at once (default: as many as the cluster fits)")
    S.add_cluster_arguments(p)
    return p


def ablation_config(base: C.Config, guard: bool) -> C.Config:
    """The collapse guard off unless asked for; the kNN monitor on (every epoch if the config has it off),
    since the curves plot it."""
    return base.replace({"train.knn_every": base.train.knn_every or 1, "train.collapse_guard.enabled": bool(guard)})


def run_ablations(base: C.Config, studies: list[str] | None, variants: list[str] | None, seeds: int,
                  out_dir: str | os.PathLike, guard: bool = False, max_concurrent: int | None = None,
                  address: str | None = None) -> dict:
    """Run (or resume) the selected studies and write ablations.md/.csv/.png; returns a summary."""
    from simsiam import console
    from simsiam.data.preflight import preflight

    if seeds < 1:
        raise C.ConfigError(f"--seeds: must be >= 1, got {seeds}")
    t0 = time.time()
    out = Path(out_dir).resolve()
    cfg = ablation_config(base, guard)
    pairs = A.select(studies, variants)
    seed_list = [base.train.seed + i for i in range(seeds)]
    data = preflight(cfg.data)  # bad data fails here, before any Ray process starts
    for w in data.warnings:
        console.warn(w)
    train_path, eval_path = data.train_path, data.eval_path
    grid = A.build_grid(cfg, pairs, data.train_rows)
    spec = {"config": base.to_dict(), "runs": grid.runs, "seeds": seed_list, "collapse_guard": bool(guard)}
    # Under run.storage_path when that is set, so the study resumes from there on any machine.
    root = S.claim_experiment(out, cfg.run.storage_path, f"ablate-{base.run.name}", "ablate.json", spec)

    import ray.tune

    from simsiam.trial_console import TrialLines

    where, total, concurrency = S.connect(cfg, address, max_concurrent)
    console.say(f"ablate: {len(grid.rows)} variants as {len(grid.runs)} distinct runs x {seeds} seed(s) on "
                f"{where}; {concurrency} at a time; out {out}")

    def tune_config():
        return ray.tune.TuneConfig(num_samples=1, max_concurrent_trials=concurrency,
                                   trial_dirname_creator=S.trial_dirname)

    trainable = S.make_trainable(cfg, train_path, eval_path, sio.join(root, S.EXPERIMENT, S.TRIAL_RUNS),
                                 variants=grid.runs, classify_collapse=True, report_history=True)
    param_space = {"variant": ray.tune.grid_search(grid.keys), "seed": ray.tune.grid_search(seed_list)}
    lines = TrialLines(cfg.train.epochs, lambda m, err: S.classify(m, err, cfg.train.epochs), ["variant", "seed"],
                       len(grid.runs) * len(seed_list))
    result_grid, resumed = S.fit(root, trainable, tune_config, param_space=param_space, callbacks=[lines])
    records = S.collect_results(result_grid, cfg.train.epochs)
    release = S.wait_for_release(total)
    by_run = {(r.config.get("variant"), int(r.config.get("seed", -1))): r for r in records}
    agg, per_seed = A.summarize(grid, by_run, seed_list, cfg)

    atomic_write_text(out / "ablations.md", A.markdown(agg, per_seed, cfg, seed_list, guard))
    S.write_csv(per_seed, out / "ablations.csv")
    A.plot_curves(grid, by_run, seed_list, out / "ablations.png", cfg)
    console.text(S.format_table(agg, ["study", "variant", "linear_top1_mean", "linear_top1_std", "collapse_std",
                                      "effective_rank", "trend", "status", "paper_imagenet"]))
    summary = {
        "variants": len(grid.rows), "runs": len(grid.runs) * len(seed_list), "resumed": resumed,
        "by_status": {s: sum(r["status"] == s for r in per_seed) for s in sorted({r["status"] for r in per_seed})},
        "resources": release, "wall_s": round(time.time() - t0, 2),
        "markdown": str(out / "ablations.md"), "csv": str(out / "ablations.csv"), "plot": str(out / "ablations.png"),
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


def main(argv: list[str] | None = None, prog: str = "python -m pipelines.ablate") -> int:
    args = build_parser(prog).parse_args(argv)

    def load() -> tuple[C.Config, None]:
        base = C.load(args.config, args.overrides)
        A.select(args.study, args.variant)  # name errors before any cluster starts
        return base, None

    def work(base: C.Config, _: None, out: Path) -> dict:
        return run_ablations(base, args.study, args.variant, args.seeds, out, guard=args.collapse_guard,
                             max_concurrent=args.max_concurrent, address=args.address)

    def done(summary: dict) -> tuple[str, int]:
        # by_status counts variant rows (a run shared by several studies counts once per study).
        by_status = summary["by_status"]
        statuses = ", ".join(f"{n} {s}" for s, n in by_status.items())
        failed = by_status.get("failed", 0) + by_status.get("missing", 0)
        return (f"ablations done: {sum(by_status.values())} results ({statuses}) from {summary['runs']} runs, "
                f"wall {summary['wall_s']:.0f} s; {summary['markdown']}", 0 if failed == 0 else 1)

    return S.run_command("ablate", load, args.out_dir, args.verbose, work, done)


if __name__ == "__main__":
    sys.exit(main())
