"""Scheduled retraining: pretrain on new shards, evaluate, promote only a better model.

    simsiam retrain [CONFIG] --registry DIR [--set k=v ...] [--address ADDR] [--force] [--dry-run]
    python -m pipelines.retrain [same arguments]

Each run, under an exclusive lock on the registry DIR (see simsiam/registry/ for its layout):

1. finds the shards under ``data.path`` (a directory of datasets converted with ``simsiam data convert``,
   e.g. one per day, searched recursively; ``builtin:digits`` = its train split) that the manifest does
   not list, or that changed since. None: it says so and exits 0 without starting Ray;
2. pretrains on them (``retrain.train_on: new``) or on every shard found (``all``), warm-started from
   the promoted model (``retrain.warm_start``), as its own Ray Train run named by the run id;
3. linear-evaluates with the config's protocol on fixed sets - fitted on ``retrain.eval_train_path``,
   scored on ``data.eval_path`` - so scores compare across runs (when those sets or the protocol
   changed since the promoted model was scored, it is re-scored first);
4. promotes the new model only when its top-1 >= the promoted top-1 + ``retrain.margin`` (the first
   model is promoted when it trained without collapse), and commits: model copy, ``promoted.json``
   (atomic rename) and the manifest. A collapsed or diverged run completes as "not promoted".

Exit codes: 0 promoted, not promoted, or nothing to do; 1 the run failed (its shards stay new and the
next run retries them); 2 bad config, data or registry; 3 another retrain holds the registry.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from simsiam import config as C
from simsiam import io as sio
from simsiam.data import BUILTIN_PREFIX, resolve_paths
from simsiam.data.schema import DataError, is_uri, list_shards, validate_shards
from simsiam.io import atomic_write_json
from simsiam.registry import Registry, RegistryBusy, RegistryError, Scan, Shard, new_run_id, now, scan_source
from simsiam.run import RunOutcome, RunSpec, Status

EXIT_OK, EXIT_FAILED, EXIT_ERROR, EXIT_BUSY = 0, 1, 2, 3


@dataclass
class Outcome:
    """What one ``retrain`` call decided (promoted, not_promoted, nothing_to_do, dry_run or failed).
    ``record`` is the run's record.json content (no run: empty)."""

    decision: str
    reason: str
    run_id: str | None = None
    linear_top1: float | None = None
    baseline_top1: float | None = None
    new_shards: int = 0
    record: dict = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return EXIT_FAILED if self.decision == "failed" else EXIT_OK

    def line(self) -> str:
        """The one-line decision (a multi-line reason, e.g. a remote traceback, shows its first and last line)."""
        head = f"[simsiam] retrain {self.run_id}: " if self.run_id else "[simsiam] retrain: "
        lines = [ln.strip() for ln in self.reason.splitlines() if ln.strip()]
        why = lines[0] if len(lines) <= 1 else f"{lines[0]} ... {lines[-1]}"
        return head + self.decision.replace("_", " ") + (f" - {why}" if why else "")


def build_parser(prog: str = "python -m pipelines.retrain") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default="sample",
                   help="preset name (sample, cifar10, imagenet) or a YAML file (default: sample)")
    p.add_argument("--registry", required=True, metavar="DIR",
                   help="the model registry, created on first use: a local directory, a mounted volume, or an "
                        "s3:// prefix (lease + compare-and-swap pointer; see simsiam/registry/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set retrain.margin=1.0 or --set data.path=/data/incoming "
                        "(repeatable); 'simsiam config --list' lists every field")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: $RAY_ADDRESS, else start a local cluster)")
    p.add_argument("--force", action="store_true",
                   help="retrain even when no shard is new (on every shard under data.path)")
    p.add_argument("--dry-run", action="store_true",
                   help="only report what a run would train on; change nothing, start no Ray")
    return p


# ----------------------------------------------------------------------------------------- inputs


def source_root(cfg: C.Config) -> str:
    """Where new shards appear: data.path, or a built-in set's train split."""
    path = cfg.data.path.strip()
    if path.startswith(BUILTIN_PREFIX):
        return resolve_paths(dataclasses.replace(cfg.data, eval_path=""))[0]
    return path


def eval_sets(cfg: C.Config) -> tuple[str, str]:
    """(fixed set the linear classifier is fitted on, held-out set it is scored on)."""
    d = cfg.data
    fit = cfg.retrain.eval_train_path.strip()
    if not fit:
        if not d.path.strip().startswith(BUILTIN_PREFIX):
            raise C.ConfigError(f"retrain.eval_train_path is needed: data.path ({d.path}) is where new shards "
                                "arrive, not a fixed labelled set, and scores only compare on fixed sets")
        fit = d.path.strip()
    if not d.eval_path.strip() and not fit.startswith(BUILTIN_PREFIX):
        raise C.ConfigError("data.eval_path is needed: the fixed held-out set the linear top-1 is measured on")
    try:
        return resolve_paths(dataclasses.replace(d, path=fit))
    except DataError as e:
        raise DataError(str(e).replace("data.path", "retrain.eval_train_path", 1)) from None


def eval_fingerprint(cfg: C.Config, fit: str, heldout: str) -> dict:
    """Everything a linear top-1 depends on besides the weights: scores compare only when these agree."""
    sets = {}
    for name, path in (("fit", fit), ("heldout", heldout)):
        found = validate_shards(path, "retrain.eval_train_path" if name == "fit" else "data.eval_path")
        sets[name] = {"path": path, "rows": found.num_rows, "bytes": found.num_bytes}
    d = cfg.data
    return {**sets, "linear": dataclasses.asdict(cfg.eval.linear), "image_size": d.image_size,
            "eval_resize": d.eval_resize, "mean": d.mean, "std": d.std, "seed": cfg.train.seed}


def _reachable(reg: Registry, model_rel: str, storage: str, run_id: str) -> str:
    """A path to a registry model that every Ray worker can read: on an object-store registry the model
    itself; on a local registry with remote storage (a multi-node cluster) a copy next to the run's
    checkpoints, since the registry's disk is the driver's."""
    model = reg.path(model_rel)
    if reg.remote or not is_uri(storage):
        return model
    dest = sio.join(storage, f"{run_id}-init", model_rel.rstrip("/").rsplit("/", 1)[-1])
    sio.copy_tree(model, dest)
    return dest


# ----------------------------------------------------------------------------------------- the run


def retrain(cfg: C.Config, registry: str | os.PathLike, address: str | None = None, *, force: bool = False,
            dry_run: bool = False, log: Callable[[str], Any] = print) -> Outcome:
    """One scheduled retraining run against ``registry`` (see the module docstring).

    Never raises for a failed run: the outcome says 'failed' and the record why. Raises
    :class:`RegistryBusy` when another run holds the registry, and :class:`~simsiam.config.ConfigError`,
    :class:`~simsiam.data.schema.DataError` or :class:`RegistryError` for bad input found before a run starts.
    """
    def say(msg: str) -> None:
        log(f"[simsiam] retrain: {msg}")

    reg = Registry(registry)
    if dry_run:
        return _plan(cfg, reg, force, say)
    with reg.lock():
        reg.init()
        for note in reg.recover():
            say(note)
        root = source_root(cfg)
        scan = scan_source(root)
        for note in scan.notes:
            say(note)
        fresh, changed = reg.new_shards(scan.shards)
        new = fresh + changed
        say(f"{len(scan.shards)} shard(s) ({scan.rows} rows) under {root}; {len(fresh)} new, {len(changed)} changed "
            "since used")
        if not new and not force:
            known = len(reg.manifest()["shards"])
            out = Outcome("nothing_to_do", f"no new shards under {root} ({known} already used)")
            log(out.line())
            return out
        if not scan.shards:
            raise DataError(f"data.path: {root} holds no finished converted dataset to train on")
        train = new if cfg.retrain.train_on == "new" and new else scan.shards
        fit, heldout, fingerprint = _check_eval_sets(cfg, train)
        promoted = reg.promoted()
        if promoted is not None and cfg.retrain.warm_start and promoted.get("model_config") != cfg.to_dict()["model"]:
            diff = [k for k, v in cfg.to_dict()["model"].items() if promoted.get("model_config", {}).get(k) != v]
            raise C.ConfigError(f"retrain.warm_start: the promoted model (run {promoted['run_id']}) has other "
                                f"model settings ({', '.join('model.' + k for k in diff)}); set "
                                "retrain.warm_start=false to train this architecture from scratch")
        return _run(cfg, reg, scan, new, train, (fit, heldout, fingerprint), promoted, address, say, log)


def _check_eval_sets(cfg: C.Config, train: list[Shard]) -> tuple[str, str, dict]:
    """Resolve and check the fixed evaluation sets before any work: (fit set, held-out set, fingerprint)."""
    from simsiam.data.pipeline import dataset_info

    fit, heldout = eval_sets(cfg)
    held = set(list_shards(heldout, "data.eval_path"))
    leaked = [s.path for s in train if s.path in held]
    if leaked:
        raise DataError(f"data.eval_path: {heldout} lies under data.path ({leaked[0]}, ...): the held-out set "
                        "would be trained on; keep it outside the source of new shards")
    if not dataset_info(fit)["labeled"]:
        raise DataError(f"retrain.eval_train_path: {fit} has unlabelled rows; the linear classifier needs labels")
    return fit, heldout, eval_fingerprint(cfg, fit, heldout)


def _plan(cfg: C.Config, reg: Registry, force: bool, say: Callable[[str], None]) -> Outcome:
    root = source_root(cfg)
    scan = scan_source(root)
    for note in scan.notes:
        say(note)
    fresh, changed = reg.new_shards(scan.shards) if reg.exists() else (scan.shards, [])
    new = fresh + changed
    for s in new:
        say(f"{'new' if s in fresh else 'changed'}: {s.path} ({s.rows} rows)")
    promoted = reg.promoted() if reg.exists() else None
    if not new and not force:
        out = Outcome("nothing_to_do", f"no new shards under {root} (dry run)")
    else:
        train = new if cfg.retrain.train_on == "new" and new else scan.shards
        start = f"warm start from run {promoted['run_id']}" if promoted and cfg.retrain.warm_start else "no warm start"
        out = Outcome("dry_run", f"would train on {len(train)} shard(s), {sum(s.rows for s in train)} rows "
                                 f"({len(new)} new), {start}; nothing changed", new_shards=len(new))
    say(out.line().split(": ", 1)[1])
    return out


def _run(cfg: C.Config, reg: Registry, scan: Scan, new: list[Shard], train: list[Shard],
         eval_spec: tuple[str, str, dict], promoted: dict | None, address: str | None,
         say: Callable[[str], None], log: Callable[[str], Any]) -> Outcome:
    t0 = time.time()
    run_id = new_run_id()
    run_dir = reg.run_dir(run_id)
    sio.make_dirs(run_dir)
    storage = cfg.run.storage_path.strip() or sio.join(run_dir, "ray")
    train_list = sio.join(run_dir, "train.shards.json")
    atomic_write_json(train_list, {"shards": [s.path for s in train], "rows": sum(s.rows for s in train),
                                   "new": [s.path for s in new]})
    record: dict = {
        "run_id": run_id, "status": "running", "started": now(), "decision": None, "reason": "",
        "inputs": {
            "source": scan.root, "new_shards": [s.path for s in new], "new_rows": sum(s.rows for s in new),
            "train_on": cfg.retrain.train_on, "train_shards": len(train), "train_rows": sum(s.rows for s in train),
            "train_list": f"runs/{run_id}/train.shards.json", "config": f"runs/{run_id}/config.yaml",
            "storage": storage, "warm_start_from": None, "init_checkpoint": cfg.train.init_checkpoint or None,
            "promoted_before": promoted["run_id"] if promoted else None, "margin": cfg.retrain.margin,
        },
        "eval": eval_spec[2], "metrics": {}, "baseline": None,
    }
    C.dump(cfg, sio.join(run_dir, "config.yaml"))  # replaced by the run's own config once it is complete
    reg.write_record(run_id, record)
    say(f"run {run_id}: training on {len(train)} shard(s), {record['inputs']['train_rows']} rows "
        f"({len(new)} new); records in {run_dir}")
    promote = None
    try:
        out = _train_evaluate_decide(cfg, reg, run_id, record, storage, eval_spec, promoted, address, say)
        if out.decision == "promoted":
            model_rel = reg.save_model(run_id, record["metrics"]["checkpoint"])
            promote = {"run_id": run_id, "model": model_rel, "linear_top1": out.linear_top1,
                       "linear_top5": record["metrics"].get("linear_top5"), "eval": eval_spec[2],
                       "model_config": cfg.to_dict()["model"], "trained_on": record["inputs"]["train_list"],
                       "previous": promoted["run_id"] if promoted else None, "promoted_at": now()}
    except Exception as e:  # noqa: BLE001 - any failure ends the run as 'failed'; the registry is untouched
        record.update(status="failed", decision="failed", reason=f"{type(e).__name__}: {e}")
        out = Outcome("failed", record["reason"], run_id, new_shards=len(new))
    record.update(finished=now(), wall_s=round(time.time() - t0, 2))
    if record["status"] == "failed":
        reg.write_record(run_id, record)
    else:
        record = reg.commit(run_id, record, promote=promote, rebaseline=record.get("rebaseline"), used=new)
    out.record = record
    log(out.line())
    return out


def _train_evaluate_decide(cfg: C.Config, reg: Registry, run_id: str, record: dict, storage: str,
                           eval_spec: tuple[str, str, dict], promoted: dict | None, address: str | None,
                           say: Callable[[str], None]) -> Outcome:
    """Pretrain, evaluate, compare; fills ``record`` (metrics, decision, reason) and returns the outcome.
    Raises on failure; writes nothing to the registry's shared state."""
    from simsiam.ray_utils import init_ray

    say(f"Ray: {init_ray(address)}; checkpoints in {storage}/{run_id}")
    run_cfg = _run_config(cfg, reg, run_id, record, storage, eval_spec[1], promoted, say)
    out = _pretrain_and_score(run_cfg, reg.run_dir(run_id), record, storage, eval_spec, say)
    n_new = len(record["inputs"]["new_shards"])
    if out.status != Status.FINISHED:  # collapsed or diverged: a completed run whose model is not worth scoring
        record.update(decision="not_promoted", reason=f"pretraining {out.status}: {out.reason}")
        return Outcome("not_promoted", record["reason"], run_id, new_shards=n_new)
    top1 = float(out.linear_top1)
    record["metrics"].update(linear_top1=top1, linear_top5=out.linear_top5)
    if promoted is None:
        record.update(decision="promoted", reason=f"first model: linear top-1 {top1:.2f}%")
        return Outcome("promoted", record["reason"], run_id, top1, None, n_new)
    base = _baseline_top1(run_cfg, reg, run_id, record, storage, eval_spec, promoted, say)
    versus = f"{base:.2f}% (run {promoted['run_id']}) + margin {cfg.retrain.margin:g}"
    if top1 >= base + cfg.retrain.margin:
        record.update(decision="promoted", reason=f"linear top-1 {top1:.2f}% >= {versus}")
    else:
        record.update(decision="not_promoted",
                      reason=f"linear top-1 {top1:.2f}% < {versus}; run {promoted['run_id']} stays promoted")
    return Outcome(record["decision"], record["reason"], run_id, top1, base, n_new)


def _run_config(cfg: C.Config, reg: Registry, run_id: str, record: dict, storage: str, heldout: str,
                promoted: dict | None, say: Callable[[str], None]) -> C.Config:
    """The run's own config (its shard list, held-out set, warm start), saved beside its record."""
    run_dir = reg.run_dir(run_id)
    # Every retrained model is scored (eval.enabled or not): the decision rests on its linear top-1.
    overrides: dict[str, Any] = {"run.name": run_id, "data.path": sio.join(run_dir, "train.shards.json"),
                                 "data.eval_path": heldout, "eval.enabled": True}
    if promoted is not None and cfg.retrain.warm_start:
        overrides["train.init_checkpoint"] = _reachable(reg, promoted["model"], storage, run_id)
        record["inputs"].update(warm_start_from=promoted["run_id"], init_checkpoint=overrides["train.init_checkpoint"])
        say(f"warm start from the promoted model of run {promoted['run_id']}")
    run_cfg = cfg.replace(overrides)
    C.dump(run_cfg, sio.join(run_dir, "config.yaml"))
    reg.write_record(run_id, record)
    return run_cfg


def _pretrain_and_score(run_cfg: C.Config, run_dir: str, record: dict, storage: str,
                        eval_spec: tuple[str, str, dict], say: Callable[[str], None]) -> RunOutcome:
    """Pretrain and linear-evaluate through the one orchestrator, writing results.json (before the
    evaluation too: a crash there keeps it). Raises when no model worth deciding on came out."""
    from simsiam.console import epoch_line
    from simsiam.run import pretrain_and_evaluate

    fit, heldout, _ = eval_spec
    results_file = sio.join(run_dir, "results.json")

    def pretrained(pre: RunOutcome) -> None:
        _record_pretraining(record, pre)
        atomic_write_json(results_file, {**pre.results(), "config": run_cfg.to_dict()})
        say(f"linear evaluation ({run_cfg.eval.linear.protocol} protocol): fitted on {fit}, scored on {heldout}"
            + (" (in the pretraining run)" if pre.linear else ""))

    spec = RunSpec(run_cfg, run_cfg.data.path, heldout, storage, linear_fit_path=fit)
    out = pretrain_and_evaluate(spec, on_report=lambda m: say(epoch_line(m, run_cfg.train.epochs)),
                                before_evaluation=pretrained)
    _record_pretraining(record, out)
    atomic_write_json(results_file, {**out.results(), "config": run_cfg.to_dict()})
    if out.evaluation_error is not None:
        raise RuntimeError(out.reason)
    if out.status == Status.FAILED or (out.status == Status.FINISHED and not out.checkpoint):
        raise RuntimeError(f"pretraining failed: {out.reason or 'no checkpoint was written'}")
    return out


def _baseline_top1(run_cfg: C.Config, reg: Registry, run_id: str, record: dict, storage: str,
                   eval_spec: tuple[str, str, dict], promoted: dict, say: Callable[[str], None]) -> float:
    """The promoted model's linear top-1 to beat: as recorded, or re-scored when the eval sets or the
    protocol changed since it was scored (then kept in ``record['rebaseline']``)."""
    from simsiam.evaluate import linear_eval

    fit, heldout, fingerprint = eval_spec
    base = promoted.get("linear_top1")
    if promoted.get("eval") != fingerprint or base is None:
        say(f"the eval sets or protocol changed since run {promoted['run_id']} was scored; re-scoring it")
        d = run_cfg.to_dict()
        base_cfg = C.from_dict({**d, "model": promoted["model_config"],
                                "run": {**d["run"], "name": f"{run_id}-baseline"}})
        base_ev = linear_eval(base_cfg, _reachable(reg, promoted["model"], storage, run_id), fit, heldout, storage)
        base = float(base_ev["top1"])
        record["rebaseline"] = {"run_id": promoted["run_id"], "linear_top1": base,
                                "linear_top5": base_ev.get("top5"), "eval": fingerprint}
    record["baseline"] = {"run_id": promoted["run_id"], "linear_top1": base}
    return float(base)


def _record_pretraining(record: dict, pre: RunOutcome) -> None:
    """The pretraining's part of the run's record (its metrics), from the outcome."""
    status = Status.FINISHED if pre.evaluation_error is not None else pre.status
    record["metrics"].update(
        pretrain_status=str(status), pretrain_reason="" if pre.evaluation_error is not None else pre.reason,
        epochs_completed=pre.epochs_completed, checkpoint=pre.checkpoint, loss=pre.last.loss if pre.last else None,
        collapse_std=pre.collapse_std, effective_rank=pre.effective_rank, knn_top1=pre.knn_top1)


def main(argv: list[str] | None = None, prog: str = "python -m pipelines.retrain") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        cfg = C.load(args.config, args.overrides)
        out = retrain(cfg, args.registry, args.address, force=args.force, dry_run=args.dry_run)
    except RegistryBusy as e:
        print(f"[simsiam] retrain: busy - {e}", file=sys.stderr)
        return EXIT_BUSY
    except (C.ConfigError, DataError, RegistryError) as e:
        print(f"[simsiam] retrain: error - {e}", file=sys.stderr)
        return EXIT_ERROR
    if out.record:
        print(f"[simsiam] record: {sio.join(Registry(args.registry).run_dir(out.run_id), 'record.json')}")
    return out.exit_code


if __name__ == "__main__":
    sys.exit(main())
