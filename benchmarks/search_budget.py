"""Search budget: pretraining epochs spent by a search with ASHA + the collapse guard, against the
same trials run at full budget (FIFO, guard off), and the best objective each finds.

    python -m benchmarks.search_budget --out benchmarks/results/search_budget.json [--quick]

The trials are fixed up front (drawn from the space by a seeded Optuna sampler) and given to both
searches as ``points_to_evaluate``, so both see exactly the same configurations; only the early
stopping differs. The space spans a wide lr range and the predictor on/off, so it holds trials ASHA
should drop (poor kNN) and trials the collapse guard should stop (no predictor).

Epoch accounting: a trial's completed epochs, plus one for the epoch it was in when the collapse guard
or a divergence stopped it (counted whole, which favours the baseline). ASHA stops a trial right after
an epoch report, so its last reported epoch is what it spent.

JSON keys: name, metric, ours (epochs with ASHA + guard), baseline (epochs at full budget), ratio
(ours / baseline, lower is better), target (the ratio to stay under), config; plus best_objective
(linear top-1 each search found), trials (per-trial status and epochs) and wall_s.
"""
from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

from simsiam import config as C
from simsiam import search as S
from simsiam.io import atomic_write_json

TARGET_RATIO = 0.75

SPACE = {
    "params": {
        "optim.base_lr": {"distribution": "loguniform", "low": 0.003, "high": 3.0},
        "model.predictor": {"distribution": "choice", "values": ["learned", "none"]},
    }
}


def settings(quick: bool) -> dict:
    """Config overrides and search size: --quick fits a 2-core machine in a few minutes."""
    over = {
        "model.small_width": 16, "model.dim": 128, "model.pred_dim": 32, "optim.batch_size": 64,
        "train.cpus_per_worker": 0.5, "data.data_cpus": 0.25, "train.log_every": 5,
        "train.collapse_guard.window_steps": 5,
        "eval.linear.epochs": 20,
    }
    if quick:
        over.update({"train.epochs": 4, "train.max_steps_per_epoch": 6})
        return {"overrides": over, "trials": 4}
    over.update({"train.epochs": 8, "train.max_steps_per_epoch": 0})
    return {"overrides": over, "trials": 12}


def fixed_points(space: S.SearchSpace, n: int, seed: int) -> list[dict]:
    """``n`` configurations drawn from ``space`` with a seeded random sampler (the shared trial list)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [study.ask(space.to_optuna()).params for _ in range(n)]


def epochs_spent(row: dict) -> float:
    done = int(row["epochs_completed"] or 0)
    return done + (1 if row["status"] in ("collapsed", "diverged", "failed") else 0)


def _rows(out_dir: Path) -> list[dict]:
    with open(out_dir / "trials.csv") as f:
        return list(csv.DictReader(f))


def run(quick: bool, seed: int = 0, work_dir: str | None = None, address: str | None = "local") -> dict:
    """Both searches on the sample set; returns the benchmark record. ``address="local"`` starts a
    cluster of its own rather than joining one that happens to run on the host."""
    from pipelines.search import run_search
    from simsiam.ray_utils import init_ray

    init_ray(address)

    st = settings(quick)
    base = C.load("sample", st["overrides"])
    space = S.parse_space(SPACE, "search_budget")
    points = fixed_points(space, st["trials"], seed)
    space = S.parse_space({**SPACE, "points_to_evaluate": points}, "search_budget", base)
    work = Path(work_dir or tempfile.mkdtemp(prefix="simsiam-search-budget-"))
    epochs = base.train.epochs

    t0 = time.time()
    ours = run_search(base, space, len(points), work / "ours", seed=seed, grace=1, reduction_factor=2.0)
    t_ours = time.time() - t0
    full = base.replace({"train.collapse_guard.enabled": False})
    t0 = time.time()
    # grace = epochs leaves ASHA no rung, so the baseline is plain FIFO at full budget.
    baseline = run_search(full, space, len(points), work / "baseline", seed=seed, grace=epochs)
    t_base = time.time() - t0

    rows_ours, rows_base = _rows(work / "ours"), _rows(work / "baseline")
    spent_ours = sum(map(epochs_spent, rows_ours))
    spent_base = sum(map(epochs_spent, rows_base))
    keys = [*space.names, "status", "epochs_completed", "objective"]
    return {
        "name": "search_budget",
        "metric": "pretraining epochs spent by a search (ASHA + collapse guard vs the same trials at full budget)",
        "ours": spent_ours,
        "baseline": spent_base,
        "ratio": round(spent_ours / spent_base, 4) if spent_base else None,
        "target": TARGET_RATIO,
        "passed": bool(spent_base) and spent_ours / spent_base <= TARGET_RATIO,
        "best_objective": {"ours": (ours["best"] or {}).get("objective"),
                           "baseline": (baseline["best"] or {}).get("objective")},
        "trials": {"ours": [{k: r[k] for k in keys} for r in rows_ours],
                   "baseline": [{k: r[k] for k in keys} for r in rows_base]},
        "wall_s": {"ours": round(t_ours, 1), "baseline": round(t_base, 1)},
        "config": {"preset": "sample", "overrides": st["overrides"], "trials": len(points), "epochs": epochs,
                   "space": SPACE, "asha": {"grace_epochs": 1, "reduction_factor": 2.0}, "quick": quick,
                   "seed": seed, "work_dir": str(work)},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.search_budget", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--quick", action="store_true", help="fewer trials and epochs (a few minutes on 2 cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shared trial list and of TPE")
    p.add_argument("--work-dir", default=None, help="where the two searches write (default: a temp dir)")
    p.add_argument("--address", default="local",
                   help="Ray cluster (default: local, a fresh one; 'auto' or host:port to join one)")
    args = p.parse_args(argv)
    record = run(args.quick, args.seed, args.work_dir, args.address)
    atomic_write_json(args.out, record)
    print(f"[search_budget] epochs: {record['ours']} with ASHA + guard vs {record['baseline']} at full budget "
          f"(ratio {record['ratio']}, target <= {record['target']}); best linear top-1 "
          f"{record['best_objective']['ours']} vs {record['best_objective']['baseline']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
