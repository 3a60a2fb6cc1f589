"""Pretrain SimSiam, then linear-evaluate the frozen backbone: the main job.

    simsiam run [CONFIG] [--set k=v ...] [--out-dir DIR] [--address ADDR]
    python -m pipelines.pretrain_eval [same arguments]
    ray job submit --working-dir . -- python -m pipelines.pretrain_eval configs/cifar10.yaml

With no arguments it runs the `sample` preset (built-in digits, small ResNet) on a local Ray cluster it
starts itself, or on the cluster in $RAY_ADDRESS (as under `ray job submit`). Rerunning with the same
run name and out-dir resumes from the latest checkpoint.

The console shows only the run's own lines (data, Ray, one line per epoch, the evaluation, where the
results are); Ray's output goes to OUT_DIR/ray.log (--verbose shows it). The data is checked before
Ray starts. Writes OUT_DIR/results.json (status finished | collapsed | diverged | failed, with the
reason, for every outcome) and OUT_DIR/run_summary.png. Exit status: 0 finished, 2 bad input found
by the checks before any work (config, data, storage), 1 any other outcome.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from simsiam import config as C
from simsiam import io as sio
from simsiam.io import atomic_write_json
from simsiam.run import RunOutcome, RunSpec, failed


def build_parser(prog: str = "python -m pipelines.pretrain_eval") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default="sample",
                   help="preset name (sample, cifar10, imagenet) or a YAML file (default: sample)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field by dotted name, e.g. --set optim.base_lr=0.1 (repeatable); "
                        "'simsiam config --list' lists every field")
    p.add_argument("--out-dir", default=None,
                   help="where results.json, run_summary.png, ray.log, the TensorBoard logs and (by default) "
                        "checkpoints go (default: runs/<run.name>)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: $RAY_ADDRESS, else start a local cluster)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show Ray's own output (progress bars, INFO lines, worker logs) on the console; by "
                        "default it goes to OUT_DIR/ray.log")
    return p


def run(cfg: C.Config, out_dir: str | os.PathLike, address: str | None = None) -> dict:
    """Check the data, pretrain, evaluate; write and return ``out_dir/results.json`` (and
    ``run_summary.png``). Never raises for a failed run, whatever failed - bad data found before Ray
    starts, training, evaluation: results.json has status 'failed' and the reason."""
    from simsiam import console
    from simsiam.config import ConfigError
    from simsiam.data.schema import DataError

    t0 = time.time()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    C.dump(cfg, out_dir / "config.yaml")
    results = {**failed("").results(), "config": cfg.to_dict()}
    storage = cfg.run.storage_path or str(out_dir / "ray")
    try:
        _run(cfg, out_dir, storage, address, results)
    except (DataError, ConfigError, sio.StorageError) as e:  # found before any work: the message says what to fix
        results.update(status="failed", reason=str(e), failed_in="checks")
    except Exception as e:  # noqa: BLE001 - recorded in results.json; the traceback goes to the log
        where = console.log_exception(e)
        results.update(status="failed", reason=f"{console.one_line(e)} (traceback in {where})")
    results["wall_s"] = round(time.time() - t0, 2)
    try:
        from simsiam.run_summary import FILE, plot_run_summary

        results["run_summary"] = plot_run_summary(results, out_dir / FILE)
    except Exception as e:  # noqa: BLE001 - a picture that cannot be drawn does not fail the run
        console.warn(f"run_summary.png not drawn: {type(e).__name__}: {e} (traceback in {console.log_exception(e)})")
    atomic_write_json(out_dir / "results.json", results)
    if sio.is_uri(storage) and results.get("run_path"):
        # On a cluster the out-dir is the head's local disk (gone with a KubeRay pod): keep a copy by the run.
        atomic_write_json(sio.join(storage, cfg.run.name, "results.json"), results)
    return results


def _run(cfg: C.Config, out_dir: Path, storage: str, address: str | None, results: dict) -> None:
    from simsiam import console
    from simsiam.data.preflight import preflight

    sio.check_locations({"data.path": cfg.data.path, "data.eval_path": cfg.data.eval_path},
                        {"run.storage_path": cfg.run.storage_path})
    data = preflight(cfg.data, labeled_eval=bool(cfg.train.knn_every or cfg.eval.enabled))
    console.say(f"data: train {data.train_path} ({data.train_rows} rows, {data.train_shards} shard(s)), "
                f"eval {data.eval_path} ({data.eval_rows} rows)")
    for w in data.warnings:
        console.warn(w)

    from simsiam.ray_utils import init_ray
    from simsiam.run import pretrain_and_evaluate

    console.say("connecting to Ray" if (address or os.environ.get("RAY_ADDRESS")) else "starting a local Ray cluster")
    console.say(f"Ray: {init_ray(address)}")
    console.say(f"starting {cfg.train.num_workers} training worker(s) and the data pipeline; "
                f"checkpoints in {storage}/{cfg.run.name}")
    progress = _Progress(cfg.train.epochs)
    spec = RunSpec(cfg, data.train_path, data.eval_path, storage, linear_fit_path=data.train_path)
    outcome = pretrain_and_evaluate(spec, on_report=progress.on_report, on_idle=progress.on_idle,
                                    before_evaluation=lambda pre: _say_evaluation_start(pre, cfg))
    results.update(outcome.results())
    if outcome.linear is not None:
        _say_evaluation(outcome, cfg)
    if results["skipped_images"] or (outcome.linear or {}).get("skipped"):
        results["skipped_rows"] = list_skipped_rows({"data.path": data.train_path, "data.eval_path": data.eval_path},
                                                    cfg.data.max_pixels, out_dir / SKIPPED_ROWS_FILE)
        console.say(f"skipped rows, by shard and row id: {results['skipped_rows']}")


class _Progress:
    """The console while the run trains: each epoch's line as it is reported, a progress line between."""

    def __init__(self, epochs: int):
        self.epochs, self.t, self.epoch, self.first = epochs, time.time(), 0, True

    def on_report(self, m: dict) -> None:
        from simsiam import console

        if self.first and int(m.get("epoch", 1)) > 1:
            console.say(f"resumed from the epoch {int(m['epoch']) - 1} checkpoint")
        self.t, self.epoch, self.first = time.time(), int(m.get("epoch", 0)), False
        console.say(console.epoch_line(m, self.epochs))

    def on_idle(self) -> None:
        from simsiam import console

        waited = time.time() - self.t
        if self.first:
            console.progress(f"waiting for the workers and the first batches ... {waited:.0f} s")
        elif self.epoch < self.epochs:
            console.progress(f"epoch {self.epoch + 1}/{self.epochs} running ... {waited:.0f} s")
        else:
            console.progress(f"linear evaluation running ... {waited:.0f} s")


def _say_evaluation_start(pretrained: RunOutcome, cfg: C.Config) -> None:
    from simsiam import console

    if pretrained.linear is None and pretrained.evaluation_error is None:  # the evaluation runs on its own
        console.say(f"linear evaluation ({cfg.eval.linear.protocol} protocol) of {pretrained.checkpoint}")


def _say_evaluation(outcome: RunOutcome, cfg: C.Config) -> None:
    from simsiam import console

    ev = outcome.linear
    how = "cached, in this run" if ev.get("in_run") else f"{cfg.eval.linear.protocol} protocol"
    skipped = f", {ev['skipped']} bad rows skipped" if ev.get("skipped") else ""
    console.say(f"linear evaluation ({how}): top-1 {ev['top1']:.2f}%, top-5 {ev['top5']:.2f}%{skipped}")


SKIPPED_ROWS_FILE = "skipped_rows.json"


def list_skipped_rows(paths: dict[str, str | None], max_pixels: int, out: Path) -> str:
    """Write every row that ``data.on_bad_image=skip`` drops, by shard, row and id, to ``out``.

    Whether a row is skipped depends on its bytes alone (the decoder and ``max_pixels``), never on the
    epoch or the worker, so the rows training and evaluation skipped are exactly those a full decode of
    each dataset refuses: found once here, after the run, instead of threading ids through every batch."""
    from simsiam.data.inspect import check_rows

    listing: dict[str, dict] = {}
    for setting, path in paths.items():
        if path and path not in {v["path"] for v in listing.values()}:
            listing[setting] = {"path": path, **check_rows(path, max_pixels).to_dict()}
    atomic_write_json(out, listing)
    return str(out)


def _final_lines(res: dict, out_dir: Path, verbose: bool = False) -> None:
    from simsiam import console

    for line in console.baseline_lines(res):
        console.say(line)
    top1 = f"{res['linear_top1']:.2f}%" if res["linear_top1"] is not None else "n/a"
    skipped = f", {res['skipped_images']} bad images skipped" if res.get("skipped_images") else ""
    summary = (f"{res['status']}: {res['epochs_completed']} epochs, linear top-1 {top1}{skipped}, "
               f"wall {res['wall_s']:.0f} s")
    if res["status"] == "failed":
        console.error(summary + (f" - {res['reason']}" if res["reason"] else ""))
    else:
        console.say(summary + (f" ({res['reason']})" if res["reason"] else ""))
    console.say(f"results: {out_dir / 'results.json'}")
    if res.get("run_summary"):
        console.say(f"summary plot: {res['run_summary']}")
    if res.get("tensorboard"):
        console.say(f"TensorBoard: tensorboard --logdir {res['tensorboard']}")
    if console.log_path() is not None:
        what = "this run's lines and tracebacks" if verbose else "Ray's output and tracebacks"
        console.say(f"{what}: {console.log_path()}")
    if res.get("ssl_gain") is not None:  # last: what the run proves, in words
        console.say(baseline_sentence(res))


def baseline_sentence(results: dict) -> str:
    """The result in words: trained linear top-1 against both baselines, and the gain over the better one."""
    b = results["baselines"]
    return (f"linear top-1 {results['linear_top1']:.1f}% vs raw pixels {b['raw_pixels']['linear_top1']:.1f}%, "
            f"random init {b['random_init']['linear_top1']:.1f}%: {results['ssl_gain']:+.1f} points from "
            "self-supervision")


def main(argv: list[str] | None = None, prog: str = "python -m pipelines.pretrain_eval") -> int:
    from simsiam import console

    args = build_parser(prog).parse_args(argv)
    try:
        cfg = C.load(args.config, args.overrides)
    except C.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        if args.out_dir:  # every failure leaves results.json where the user asked for it
            atomic_write_json(Path(args.out_dir) / "results.json", {"status": "failed", "reason": f"config error: {e}"})
        return 2
    out_dir = Path(args.out_dir or os.path.join("runs", cfg.run.name)).resolve()
    with console.session(out_dir, verbose=args.verbose) as log:
        source = f" ({args.config})" if args.config != cfg.run.name else ""
        console.say(f"run '{cfg.run.name}'{source}: {cfg.train.epochs} epochs -> {out_dir} "
                    + ("(--verbose: Ray's output on the console)" if args.verbose else f"(Ray's output: {log})"))
        res = run(cfg, out_dir, args.address)
        _final_lines(res, out_dir, args.verbose)
    if res["status"] == "finished":
        return 0
    return 2 if res.get("failed_in") == "checks" else 1


if __name__ == "__main__":
    sys.exit(main())
