"""``run_summary.png``: one picture of a pretraining run, drawn from its ``results.json``.

Per epoch: the loss; the collapse std of the l2-normalised projections against 1/sqrt(d) (what a
non-collapsed, roughly isotropic output has; the paper's Figure 2 middle panel); the effective rank;
both against the collapse guard's thresholds the run was judged by; kNN accuracy, with the final linear
top-1 and, when results.json has them, the random-init and raw-pixel baselines as reference lines; the
learning rate. The last panel states the outcome in words.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping
from typing import Any

from simsiam.io import atomic_save_figure

FILE = "run_summary.png"


def _series(history: list[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(int(h["epoch"]), float(h[key])) for h in history
           if h.get(key) is not None and math.isfinite(float(h[key]))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _outcome_text(results: Mapping[str, Any]) -> str:
    def pct(v: Any) -> str:
        return f"{v:.2f}%" if isinstance(v, (int, float)) else "n/a"

    lines = [f"status: {results.get('status')}", f"epochs: {results.get('epochs_completed', 0)}",
             f"linear top-1: {pct(results.get('linear_top1'))}", f"kNN top-1: {pct(results.get('knn_top1'))}"]
    for name, vals in (results.get("baselines") or {}).items():
        if isinstance(vals, Mapping):
            lines.append(f"{name.replace('_', ' ')}: linear {pct(vals.get('linear_top1'))}, "
                         f"kNN {pct(vals.get('knn_top1'))}")
    gain = results.get("ssl_gain")
    if isinstance(gain, (int, float)):
        lines.append(f"SSL gain: {gain:+.2f} points")
    elif isinstance(gain, Mapping):
        lines += [f"SSL gain ({k.replace('_', ' ')}): {v:+.2f} points" for k, v in gain.items()
                  if isinstance(v, (int, float))]
    if results.get("reason"):
        reason = str(results["reason"])
        lines.append("reason: " + "\n  ".join(reason[i:i + 48] for i in range(0, min(len(reason), 240), 48)))
    return "\n".join(lines)


def plot_run_summary(results: Mapping[str, Any], path: str | os.PathLike) -> str:
    """Draw ``results`` (the dict written as results.json) into ``path`` atomically; return the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from simsiam import config as C
    from simsiam.run import final_collapse

    history = [h for h in results.get("history") or [] if isinstance(h, Mapping) and "epoch" in h]
    cfg = results.get("config") or {}
    dim = (cfg.get("model") or {}).get("dim")
    batch = (cfg.get("optim") or {}).get("batch_size")
    name = (cfg.get("run") or {}).get("name", "run")

    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    ax_loss, ax_std, ax_rank, ax_knn, ax_lr, ax_text = axes.flat

    from matplotlib.ticker import MaxNLocator

    last_epoch = max((int(h["epoch"]) for h in history), default=1)

    def line(ax: Any, key: str, title: str, **kw: Any) -> None:
        x, y = _series(history, key)
        ax.plot(x, y, marker="o", ms=3, **kw)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_xlim(0.5, last_epoch + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)

    line(ax_loss, "loss", "loss (-cos; -1 is the minimum)")
    verdict = None  # the thresholds the run was judged by, from its own config (run.final_collapse)
    if dim and batch:
        with contextlib.suppress(C.ConfigError):  # a results.json from another version: no threshold lines
            verdict = final_collapse(history, C.from_dict(cfg))
    line(ax_std, "collapse_std", "collapse std of l2-normalised z")
    if dim:
        ax_std.axhline(1 / math.sqrt(dim), color="gray", ls="--", label=f"1/sqrt(d), d={dim}")
        if verdict is not None:
            ax_std.axhline(verdict.std.threshold, color="red", ls="--", label="collapse threshold")
        ax_std.axhline(0, color="red", lw=0.8, ls=":", label="collapsed")
        ax_std.legend(fontsize=8)
    line(ax_rank, "effective_rank", "effective rank (RankMe)")
    if verdict is not None:
        ax_rank.axhline(verdict.rank.threshold, color="red", ls="--", label="collapse threshold")
        ax_rank.legend(fontsize=8)
    line(ax_knn, "knn_top1", "kNN top-1 (%) per epoch", label="kNN (this run)")
    if results.get("linear_top1") is not None and history:
        ax_knn.axhline(results["linear_top1"], color="C2", ls="-", lw=1, label="linear top-1 (final)")
    for i, (bname, vals) in enumerate((results.get("baselines") or {}).items()):
        if not isinstance(vals, Mapping):
            continue
        for key, style in (("linear_top1", "--"), ("knn_top1", ":")):
            if vals.get(key) is not None:
                ax_knn.axhline(vals[key], color=f"C{3 + i}", ls=style, lw=1,
                               label=f"{bname.replace('_', ' ')} {key.split('_')[0]}")
    ax_knn.legend(fontsize=7)
    line(ax_lr, "lr", "learning rate (end of epoch)")
    ax_text.axis("off")
    ax_text.text(0.0, 1.0, _outcome_text(results), va="top", family="monospace", fontsize=9,
                 transform=ax_text.transAxes)
    if not history:
        for ax in (ax_loss, ax_std, ax_rank, ax_knn, ax_lr):
            ax.text(0.5, 0.5, "no epoch finished", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"{name}: {results.get('status')}")
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)
    return str(path)
