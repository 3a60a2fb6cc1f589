"""A search's results for people: the best trial, the CSV and console table, ``best.yaml`` and the
Optuna plots."""
from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from simsiam import config as C
from simsiam.io import atomic_write_bytes, atomic_write_text
from simsiam.search.trial import OBJECTIVE, TrialRecord


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


def history_figure(study: Any) -> Any:
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
             f"needs {MIN_FOR_HISTORY} with a value", lambda: history_figure(study)),
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
