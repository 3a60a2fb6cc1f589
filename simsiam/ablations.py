"""The paper's empirical study (Chen & He 2021, sections 4-5) as data: study -> variants -> config
overrides, each with the ImageNet linear top-1 the paper reports (100 epochs) for reference.

A variant's overrides are applied on top of whatever config the study runs on (``simsiam ablate
CONFIG``), so on the sample preset the "default" row is the sample's own setting. Variants that end up
with the same effective config (the default appears in several studies) run once and fill every row
they stand for. The value :data:`STEPS_PER_EPOCH` stands for "one epoch's worth of steps" and is
resolved against the data and the variant's batch before the grid is built.
"""
from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from simsiam import config as C

STEPS_PER_EPOCH = "@steps_per_epoch"


@dataclass(frozen=True)
class Variant:
    """One row of a study: ``id`` (short, for ``--variant``), a label, overrides and the paper's figure."""

    id: str
    label: str
    overrides: Mapping[str, Any]
    paper: str


@dataclass(frozen=True)
class Study:
    name: str
    title: str
    variants: tuple[Variant, ...]
    note: str = ""


def _v(id_: str, label: str, paper: str, **overrides: Any) -> Variant:
    return Variant(id_, label, {k.replace("__", "."): v for k, v in overrides.items()}, paper)


STUDIES: dict[str, Study] = {s.name: s for s in (
    Study("stop_gradient", "Stop-gradient (Figure 2)", (
        _v("default", "with stop-gradient", "67.7 +- 0.1", loss__stop_gradient=True),
        _v("no_stop_grad", "without stop-gradient", "0.1 (collapse)", loss__stop_gradient=False),
    ), "Without the stop-gradient the paper sees the std of l2-normalised z drop to 0 at once."),
    Study("predictor", "Predictor MLP (Table 1)", (
        _v("lr_decayed", "learned, lr decayed with the cosine schedule", "67.7",
           model__predictor="learned", optim__fix_pred_lr=False),
        _v("none", "no predictor (identity)", "0.1 (collapse)", model__predictor="none"),
        _v("fixed", "fixed at random init", "1.5", model__predictor="fixed"),
        _v("constant_lr", "learned, constant lr", "68.1", model__predictor="learned", optim__fix_pred_lr=True),
    )),
    Study("batch_size", "Batch size, SGD (Table 2)", tuple(
        _v(f"b{b}", f"batch {b}", paper, optim__batch_size=b)
        for b, paper in ((64, "66.1"), (128, "67.3"), (256, "68.1"), (512, "68.1"), (1024, "68.0"),
                         (2048, "67.9"), (4096, "64.0"))
    ), "lr = base_lr x batch / 256 for every batch. Batches larger than the training set cannot run an epoch."),
    Study("bn", "Batch normalisation in the MLPs (Table 3)", (
        _v("none", "no BN", "34.6", model__bn="none"),
        _v("hidden", "BN on hidden layers only", "67.4", model__bn="hidden"),
        _v("default", "hidden + projector output (default)", "68.1", model__bn="default"),
        _v("pred_output", "also on the predictor's output", "unstable (training fails)", model__bn="pred_output"),
    )),
    Study("similarity", "Similarity function (Table 4)", (
        _v("cosine", "cosine", "68.1", loss__similarity="cosine"),
        _v("cross_entropy", "cross-entropy, softmax over channels", "63.2", loss__similarity="cross_entropy"),
    )),
    Study("symmetry", "Symmetrisation (Table 5)", (
        _v("symmetric", "symmetric: D(p1,z2)/2 + D(p2,z1)/2", "68.1", loss__symmetric=True),
        _v("asymmetric", "asymmetric: D(p1,z2) only", "64.8", loss__symmetric=False),
    ), "The paper's 'asym. 2x' (two pairs per image, 67.3) is not a switch here."),
    Study("output_dim", "Output dimension d, predictor hidden d/4", tuple(
        _v(f"d{d}", f"d = {d}", paper, model__dim=d, model__pred_dim=d // 4)
        for d, paper in ((256, "65.3"), (512, "67.2"), (1024, "67.5"), (2048, "68.1"))
    )),
    Study("target_refresh", "k-step targets (section 5, Table 7)", (
        _v("k1", "refreshed every step (SimSiam)", "68.1", loss__target_refresh_steps=1),
        _v("k10", "every 10 steps", "68.7", loss__target_refresh_steps=10),
        _v("k100", "every 100 steps", "68.9", loss__target_refresh_steps=100),
        _v("epoch", "every epoch", "67.0", loss__target_refresh_steps=STEPS_PER_EPOCH),
    ), "k-step variants fix the targets for k SGD steps: an EM-like alternation, not a momentum encoder."),
)}


def select(studies: Sequence[str] | None = None, variants: Sequence[str] | None = None) -> list[tuple[Study, Variant]]:
    """(study, variant) pairs to run: all studies unless named; ``variants`` keeps only those ids
    (``id`` or ``study:id``). Unknown names raise :class:`ConfigError` listing the known ones."""
    names = list(studies or STUDIES)
    unknown = [n for n in names if n not in STUDIES]
    if unknown:
        raise C.ConfigError(f"--study: unknown {', '.join(unknown)}; known: {', '.join(STUDIES)}")
    pairs = [(STUDIES[n], v) for n in dict.fromkeys(names) for v in STUDIES[n].variants]
    if variants:
        wanted = set(variants)
        known = {v.id for _, v in pairs} | {f"{s.name}:{v.id}" for s, v in pairs}
        missing = sorted(wanted - known)
        if missing:
            raise C.ConfigError(f"--variant: {', '.join(missing)} not in the selected studies; known: "
                                f"{', '.join(sorted(known))}")
        pairs = [(s, v) for s, v in pairs if v.id in wanted or f"{s.name}:{v.id}" in wanted]
    return pairs


def steps_per_epoch(cfg: C.Config, num_rows: int) -> int:
    """SGD steps in one epoch of ``cfg`` on ``num_rows`` training rows (as the trainer counts them)."""
    steps = max(1, num_rows // cfg.optim.batch_size)
    return min(steps, cfg.train.max_steps_per_epoch) if cfg.train.max_steps_per_epoch else steps


def resolve_overrides(base: C.Config, overrides: Mapping[str, Any], num_rows: int | None) -> dict:
    """``overrides`` with :data:`STEPS_PER_EPOCH` replaced by the variant's steps per epoch."""
    out = dict(overrides)
    marked = [k for k, v in out.items() if v == STEPS_PER_EPOCH]
    if marked:
        if num_rows is None:
            raise C.ConfigError(f"{', '.join(marked)}: 'one epoch' needs the training set's size")
        plain = {k: v for k, v in out.items() if v != STEPS_PER_EPOCH}
        steps = steps_per_epoch(base.replace(plain) if plain else base, num_rows)
        out.update({k: steps for k in marked})
    return out


@dataclass(frozen=True)
class Row:
    """One table row: a study's variant and the grid key of the run that stands for it."""

    study: str
    variant: str
    label: str
    paper: str
    key: str


@dataclass
class Grid:
    """Unique runs (``runs``: key -> overrides) and the table rows that refer to them."""

    runs: dict[str, dict] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)

    @property
    def keys(self) -> list[str]:
        return list(self.runs)


def build_grid(base: C.Config, pairs: Iterable[tuple[Study, Variant]], num_rows: int | None = None) -> Grid:
    """Resolve and validate every variant on ``base``; variants with the same effective config share
    one run (keyed by the first such ``study:id``). An invalid variant raises :class:`ConfigError`
    naming it, before anything runs."""
    grid = Grid()
    by_config: dict[str, str] = {}
    for study, variant in pairs:
        where = f"{study.name}:{variant.id}"
        try:
            overrides = resolve_overrides(base, variant.overrides, num_rows)
            effective = base.replace(overrides)
        except C.ConfigError as e:
            raise C.ConfigError(f"ablation variant {where} ({variant.label}) is invalid on this config: {e}") from None
        canon = json.dumps(effective.to_dict(), sort_keys=True, default=str)
        key = by_config.setdefault(canon, where)
        if key == where:
            grid.runs[key] = overrides
        grid.rows.append(Row(study.name, variant.id, variant.label, variant.paper, key))
    return grid


# ----------------------------------------------------------------------------- summarising results


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample std (0 for one value); (None, None) for no values."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def status_summary(statuses: Sequence[str]) -> str:
    """'finished' when all seeds agree, else counts such as 'collapsed 1/2, finished 1/2'."""
    if not statuses:
        return "missing"
    if len(set(statuses)) == 1:
        return statuses[0]
    n = len(statuses)
    return ", ".join(f"{s} {statuses.count(s)}/{n}" for s in sorted(set(statuses)))


def _f(v: float | None, digits: int = 2) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def _trend_text(verdict: Any) -> str:
    """'std -0.0012/ep, rank -3.1/ep falling' over the verdict's trend window; '' without one."""
    parts = []
    for short, m in (("std", verdict.std), ("rank", verdict.rank)):
        if m.slope is not None:
            parts.append(f"{short} {m.slope:+.2g}/ep" + (" falling" if m.falling else ""))
    return ", ".join(parts)


def _verdict(base: C.Config | None, overrides: Mapping[str, Any], rec: Any) -> Any:
    from simsiam.run import final_collapse

    if base is None or rec is None or not rec.history:
        return None
    return final_collapse(rec.history, base.replace(dict(overrides)) if overrides else base)


def summarize(grid: Grid, records: Mapping[tuple[str, int], Any], seeds: Sequence[int],
              base: C.Config | None = None) -> tuple[list[dict], list[dict]]:
    """(aggregate rows, per-seed rows) from ``records[(key, seed)]`` (objects with ``status``,
    ``objective``, ``collapse_std``, ``effective_rank``, ``knn_top1``, ``reason``, ``trial_id``,
    ``history``). With ``base`` (the config the grid was built on), each row also carries its collapse
    thresholds, how far the final std and rank are from them (value / threshold) and their trend."""
    agg, per_seed = [], []
    for row in grid.rows:
        recs = [records.get((row.key, s)) for s in seeds]
        verdicts = [_verdict(base, grid.runs.get(row.key, {}), r) for r in recs]
        for s, r, v in zip(seeds, recs, verdicts, strict=True):
            per_seed.append({
                "study": row.study, "variant": row.variant, "label": row.label, "seed": s,
                "status": r.status if r else "missing", "linear_top1": r.objective if r else None,
                "knn_top1": r.knn_top1 if r else None, "collapse_std": r.collapse_std if r else None,
                "effective_rank": r.effective_rank if r else None, "epochs_completed": r.epochs_completed if r else 0,
                "std_threshold": v.std.threshold if v else None, "rank_threshold": v.rank.threshold if v else None,
                "std_margin": v.std.margin if v else None, "rank_margin": v.rank.margin if v else None,
                "trend": _trend_text(v) if v else "",
                "paper_imagenet": row.paper, "run": row.key, "trial_id": r.trial_id if r else "",
                "reason": r.reason if r else "no result",
            })
        present = [r for r in recs if r is not None]
        judged = [v for v in verdicts if v is not None]
        m, sd = mean_std([r.objective for r in present if r.objective is not None])
        agg.append({
            "study": row.study, "variant": row.variant, "label": row.label,
            "linear_top1_mean": m, "linear_top1_std": sd,
            "n_evaluated": sum(r.objective is not None for r in present), "n_seeds": len(seeds),
            "collapse_std": mean_std([r.collapse_std for r in present if r.collapse_std is not None])[0],
            "effective_rank": mean_std([r.effective_rank for r in present if r.effective_rank is not None])[0],
            "status": status_summary([r.status for r in recs if r] + ["missing"] * recs.count(None)),
            "std_threshold": judged[0].std.threshold if judged else None,
            "rank_threshold": judged[0].rank.threshold if judged else None,
            "trend": " / ".join(t for t in (_trend_text(v) for v in judged) if t),
            "paper_imagenet": row.paper, "run": row.key,
        })
    return agg, per_seed


def paper_figure(text: str) -> float | None:
    """The paper's ImageNet top-1 as a number: '67.7 +- 0.1' -> 67.7, '0.1 (collapse)' -> 0.1, a
    variant whose training fails -> 0.0; None when the paper gives no figure."""
    if "fail" in text:
        return 0.0
    m = re.match(r"\s*(\d+(?:\.\d+)?)", text)
    return float(m.group(1)) if m else None


def ordering_note(rows: Sequence[Mapping[str, Any]]) -> str:
    """Whether one study's measured linear top-1 orders its variants as the paper's figures do, and
    if not, which pairs are swapped and by how much (pairs the paper ties are not compared)."""
    pts = [(r, paper_figure(r["paper_imagenet"]), r["linear_top1_mean"]) for r in rows]
    pts = [(r, p, m) for r, p, m in pts if p is not None and m is not None]
    if len(pts) < 2:
        return ""
    paper_order = " > ".join(f"{r['variant']} ({p:g})" for r, p, _ in sorted(pts, key=lambda t: -t[1]))
    swapped = [f"{lo['variant']} above {hi['variant']} by {mlo - mhi:.2f} points"
               for hi, phi, mhi in pts for lo, plo, mlo in pts if phi > plo and mlo > mhi]
    if not swapped:
        return f"Paper's order {paper_order}: reproduced."
    return f"Paper's order {paper_order}: not reproduced at this budget ({'; '.join(swapped)})."


def _vs(value: float | None, threshold: float | None, digits: int) -> str:
    """'0.0443 (thr 0.0221, 2.0x)': a final value beside its collapse threshold."""
    if value is None:
        return ""
    if not threshold:
        return _f(value, digits)
    return f"{value:.{digits}f} (thr {threshold:.{digits}f}, {value / threshold:.2f}x)"


def markdown(agg: Sequence[Mapping[str, Any]], per_seed: Sequence[Mapping[str, Any]], base: C.Config,
             seeds: Sequence[int], guard_on: bool) -> str:
    """ablations.md: one table per study in the paper's shape, then every run."""
    from simsiam.metrics import healthy_std, rank_threshold

    d, g = base.model.dim, base.train.collapse_guard
    guard = ("on (a run under a threshold for its window of steps stops early)" if guard_on
             else "off (collapse is shown, not stopped)")
    lines = [
        "# SimSiam ablations",
        "",
        f"Config: {base.model.backbone} backbone, d = {d}, batch {base.optim.batch_size}, {base.train.epochs} "
        f"epochs, data {base.data.path}; seeds {', '.join(map(str, seeds))}. Collapse guard "
        f"{guard}. Linear top-1 is mean +- std over "
        "seeds; collapse std (of l2-normalised z, healthy ~ 1/sqrt(d) = "
        f"{healthy_std(d):.4f}) and effective rank are the last epoch's means. A run counts as collapsed when "
        f"either is under the collapse guard's thresholds (std < {g.std_ratio:g}/sqrt(d), "
        f"rank < {rank_threshold(g, base.per_worker_batch, d)[1]}, the rank measured on the first "
        "rows of each batch); each is shown beside its threshold "
        "with value / threshold (under 1.00x is collapsed). The trend column is the least-squares change "
        "per epoch over the last third of the run (at least 3 epochs), marked `falling` when it is at least "
        "2 standard errors below 0. A run above both thresholds with a falling std or rank that, at that "
        "rate, crosses its threshold within as many more epochs as it ran is `collapsing`: otherwise its "
        "verdict would depend on where the budget happened to end. The paper's column is its ImageNet "
        "result (ResNet-50, 100 epochs), for reference only.",
    ]
    for name in dict.fromkeys(r["study"] for r in agg):
        study = STUDIES[name]
        lines += ["", f"## {study.title}", ""]
        if study.note:
            lines += [study.note, ""]
        lines += ["| variant | linear top-1 | collapse std | effective rank | trend (last third) | status | "
                  "paper (ImageNet) |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in (r for r in agg if r["study"] == name):
            if r["linear_top1_mean"] is None:
                top1 = "n/a"
            elif r["n_evaluated"] > 1:
                top1 = f"{r['linear_top1_mean']:.2f} +- {r['linear_top1_std']:.2f}"
            else:
                top1 = f"{r['linear_top1_mean']:.2f}"
            lines.append(f"| {r['label']} | {top1} | {_vs(r['collapse_std'], r.get('std_threshold'), 4)} | "
                         f"{_vs(r['effective_rank'], r.get('rank_threshold'), 1)} | {r.get('trend', '')} | "
                         f"{r['status']} | {r['paper_imagenet']} |")
        note = ordering_note([r for r in agg if r["study"] == name])
        if note:
            lines += ["", note]
    lines += ["", "## Every run", "",
              "| study | variant | seed | status | linear top-1 | kNN top-1 | collapse std | effective rank | reason |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in per_seed:
        reason = str(r["reason"]).replace("|", "/")
        lines.append(f"| {r['study']} | {r['variant']} | {r['seed']} | {r['status']} | {_f(r['linear_top1'])} | "
                     f"{_f(r['knn_top1'])} | {_f(r['collapse_std'], 4)} | {_f(r['effective_rank'], 1)} | {reason} |")
    return "\n".join(lines) + "\n"


def plot_curves(grid: Grid, records: Mapping[tuple[str, int], Any], seeds: Sequence[int], path: Any,
                base: C.Config | None = None) -> None:
    """The paper's Figure 2 in kind: collapse std, effective rank and kNN top-1 against training steps,
    one row of panels per study, one colour per variant (one line per seed). With ``base``, the healthy
    std 1/sqrt(d) and the collapse thresholds are drawn as reference lines."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from simsiam.io import atomic_write_bytes
    from simsiam.metrics import CollapseGuard

    def thresholds(overrides: Mapping[str, Any]) -> tuple[float, float]:
        cfg = base.replace(dict(overrides)) if overrides else base
        return CollapseGuard(cfg.train.collapse_guard, cfg.model.dim).thresholds(cfg.per_worker_batch)

    ref_thr = thresholds({}) if base is not None else None

    studies = list(dict.fromkeys(r.study for r in grid.rows))
    metrics = (("collapse_std", "collapse std (l2-normalised z)"), ("effective_rank", "effective rank"),
               ("knn_top1", "kNN top-1 (%)"))
    fig, axes = plt.subplots(len(studies), 3, figsize=(15, 3.6 * len(studies)), squeeze=False)
    for i, name in enumerate(studies):
        rows = [r for r in grid.rows if r.study == name]
        # One reference line per panel only where every variant is judged by the base's thresholds.
        ref = ref_thr is not None and all(thresholds(grid.runs.get(r.key, {})) == ref_thr for r in rows)
        for j, (key, title) in enumerate(metrics):
            ax = axes[i][j]
            for c, row in enumerate(rows):
                color = f"C{c % 10}"
                for k, s in enumerate(seeds):
                    rec = records.get((row.key, s))
                    pts = [(h["step"], h[key]) for h in (rec.history if rec else []) if h.get(key) is not None]
                    if pts:
                        xs, ys = zip(*pts, strict=True)
                        ax.plot(xs, ys, color=color, marker="o", ms=3, lw=1.2,
                                label=row.label if k == 0 else None, alpha=0.9 if k == 0 else 0.6)
            if ref and key != "knn_top1":
                std_thr, rank_thr = ref_thr
                if key == "collapse_std":
                    ax.axhline(1 / math.sqrt(base.model.dim), color="grey", ls=":", lw=1, label="healthy 1/sqrt(d)")
                ax.axhline(std_thr if key == "collapse_std" else rank_thr, color="red", ls="--", lw=1,
                           label="collapse threshold")
            ax.set_title(f"{STUDIES[name].title}: {title}", fontsize=9)
            ax.set_xlabel("training step")
            ax.grid(alpha=0.3)
            if j < 2 and ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
