"""Pretrain SimSiam, then linear-evaluate the frozen backbone: the main job.

    simsiam run [CONFIG] [--set k=v ...] [--out-dir DIR] [--address ADDR]
    python -m pipelines.pretrain_eval [same arguments]
    ray job submit --working-dir . -- python -m pipelines.pretrain_eval configs/cifar10.yaml

With no arguments it runs the `sample` preset (built-in digits, small ResNet) on a local Ray cluster it
starts itself, or on the cluster in $RAY_ADDRESS (as under `ray job submit`). Rerunning with the same
run name and out-dir resumes from the latest checkpoint. Writes DIR/results.json.
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


def build_parser(prog: str = "python -m pipelines.pretrain_eval") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default="sample",
                   help="preset name (sample, cifar10, imagenet) or a YAML file (default: sample)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field by dotted name, e.g. --set optim.base_lr=0.1 (repeatable); "
                        "'simsiam config --list' lists every field")
    p.add_argument("--out-dir", default=None,
                   help="where results.json, the TensorBoard logs and (by default) checkpoints go "
                        "(default: runs/<run.name>)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: $RAY_ADDRESS, else start a local cluster)")
    return p


def run(cfg: C.Config, out_dir: str | os.PathLike, address: str | None = None) -> dict:
    """Pretrain then evaluate; write and return ``out_dir/results.json``. Never raises for a failed run:
    the failure is in the results with status 'failed' and its reason."""
    from simsiam.data import resolve_paths
    from simsiam.evaluate import linear_eval
    from simsiam.ray_utils import init_ray
    from simsiam.train import pretrain

    t0 = time.time()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    storage = cfg.run.storage_path or str(out_dir / "ray")
    C.dump(cfg, out_dir / "config.yaml")
    sio.check_locations({"data.path": cfg.data.path, "data.eval_path": cfg.data.eval_path},
                        {"run.storage_path": cfg.run.storage_path})
    where = init_ray(address)
    print(f"[simsiam] running '{cfg.run.name}' on {where}", flush=True)
    train_path, eval_path = resolve_paths(cfg.data)
    print(f"[simsiam] data: train {train_path}, eval {eval_path}; checkpoints in {storage}/{cfg.run.name}",
          flush=True)

    pre = pretrain(cfg, train_path, eval_path, storage, linear_fit_path=train_path)
    last = pre.last
    results: dict = {
        "status": pre.status,
        "reason": pre.reason,
        "epochs_completed": len(pre.history),
        "linear_top1": None,
        "linear_top5": None,
        "knn_top1": next((h["knn_top1"] for h in reversed(pre.history) if h.get("knn_top1") is not None), None),
        "collapse_std": last.get("collapse_std"),
        "effective_rank": last.get("effective_rank"),
        "pairs_per_s": last.get("pairs_per_s"),
        "skipped_images": sum(h.get("skipped_images", 0) for h in pre.history),
        "checkpoint": pre.checkpoint,
        "run_path": pre.run_path,
        "tensorboard": f"{pre.run_path}/tensorboard" if pre.run_path else None,
        "history": pre.history,
        "config": cfg.to_dict(),
    }
    if pre.status == "finished" and cfg.eval.enabled and pre.checkpoint:
        try:
            ev = pre.linear_result()
            if ev is None:  # the full protocol runs as its own Ray Train run
                print(f"[simsiam] linear evaluation ({cfg.eval.linear.protocol} protocol) of {pre.checkpoint}",
                      flush=True)
                ev = linear_eval(cfg, pre.checkpoint, train_path, eval_path, storage)
            results.update(linear_top1=ev["top1"], linear_top5=ev["top5"], linear_eval=ev)
        except Exception as e:  # noqa: BLE001 - a failed evaluation is recorded, the pretraining result kept
            results.update(status="failed", reason=f"linear evaluation failed: {type(e).__name__}: {e}")
    results["wall_s"] = round(time.time() - t0, 2)
    atomic_write_json(out_dir / "results.json", results)
    if sio.is_uri(storage):
        # On a cluster the out-dir is the head's local disk (gone with a KubeRay pod): keep a copy by the run.
        atomic_write_json(sio.join(storage, cfg.run.name, "results.json"), results)
    return results


def main(argv: list[str] | None = None, prog: str = "python -m pipelines.pretrain_eval") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        cfg = C.load(args.config, args.overrides)
    except C.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    out_dir = args.out_dir or os.path.join("runs", cfg.run.name)
    try:
        res = run(cfg, out_dir, args.address)
    except sio.StorageError as e:
        print(f"storage error: {e}", file=sys.stderr)
        return 2
    top1 = f"{res['linear_top1']:.2f}%" if res["linear_top1"] is not None else "n/a"
    print(f"[simsiam] {res['status']}: {res['epochs_completed']} epochs, linear top-1 {top1}, "
          f"wall {res['wall_s']:.0f} s" + (f" ({res['reason']})" if res["reason"] else ""))
    print(f"[simsiam] results: {Path(out_dir).resolve() / 'results.json'}")
    if res["tensorboard"]:
        print(f"[simsiam] TensorBoard: tensorboard --logdir {res['tensorboard']}")
    return 0 if res["status"] == "finished" else 1


if __name__ == "__main__":
    sys.exit(main())
