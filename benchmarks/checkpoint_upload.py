"""Checkpoint upload to S3: how long one epoch's checkpoint of the cifar10 preset's model (ResNet-18) takes
to upload, and whether ``ray.train.report``'s asynchronous upload (Ray 2.60:
``checkpoint_upload_mode=CheckpointUploadMode.ASYNC``) takes that time off the training loop.

    python -m benchmarks.checkpoint_upload --out benchmarks/results/checkpoint_upload.json [--endpoint URL]

Without ``--endpoint`` a moto S3 server is started on 127.0.0.1 (loopback: no network limit, so the
upload figure is the client and server cost floor; against AWS S3 add size / bandwidth).

1. The checkpoint file exactly as train.py writes it (model, SGD momentum, RNG and config), uploaded with
   ``pyarrow.fs.copy_files`` as Ray Train does; median seconds over ``--repeats`` uploads.
2. A 1-worker TorchTrainer whose loop "trains" a fixed ``--work-s`` per epoch (a sleep, so the figure is
   not the machine's load) and then reports that checkpoint, once with SYNC and once with ASYNC upload:
   the median time ``ray.train.report`` blocks the loop, and the median epoch time.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from simsiam import config as C
from simsiam.checkpoint import CHECKPOINT_FILE
from simsiam.io import atomic_write_json


def checkpoint_dir(cfg: C.Config) -> str:
    """A checkpoint directory of the preset's model as train.py saves it (after one optimiser step, so
    the momentum buffers exist)."""
    import torch

    from simsiam import checkpoint as ckpt_io
    from simsiam.model import SimSiam
    from simsiam.optim import build_optimizer

    net = SimSiam(cfg.model)
    opt = build_optimizer(net, cfg.optim, cfg.optim.batch_size)
    x = torch.randn(4, 3, cfg.data.image_size, cfg.data.image_size)
    out = net(x, x)
    loss = sum(v.float().mean() for v in (out.values() if isinstance(out, dict) else out) if torch.is_tensor(v))
    loss.backward()
    opt.step()
    d = tempfile.mkdtemp(prefix="ckpt-bench-")
    ckpt_io.save(Path(d) / CHECKPOINT_FILE, ckpt_io.state(net, opt, 0, 1, cfg))
    return d


def upload_seconds(src: str, dest_uri: str, repeats: int) -> list[float]:
    import pyarrow.fs as pafs

    fs, inner = pafs.FileSystem.from_uri(dest_uri)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        pafs.copy_files(src, f"{inner}/{i}", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        times.append(time.perf_counter() - t0)
    return times


def _loop(config: dict) -> None:
    import ray.train
    from ray.train import CheckpointUploadMode

    mode = CheckpointUploadMode[config["mode"]]
    blocked, epochs = [], []
    for epoch in range(config["epochs"]):
        t0 = time.perf_counter()
        time.sleep(config["work_s"])
        d = tempfile.mkdtemp(prefix="ckpt-")
        shutil.copy(Path(config["src"]) / CHECKPOINT_FILE, Path(d) / CHECKPOINT_FILE)
        t1 = time.perf_counter()
        ray.train.report({"epoch": epoch}, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_upload_mode=mode)
        blocked.append(time.perf_counter() - t1)
        epochs.append(time.perf_counter() - t0)
        if mode == CheckpointUploadMode.SYNC:
            shutil.rmtree(d, ignore_errors=True)  # ASYNC deletes it itself once uploaded
    Path(config["out"]).write_text(json.dumps({"blocked": blocked, "epochs": epochs}))


def report_seconds(src: str, storage: str, mode: str, epochs: int, work_s: float) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    out = tempfile.mktemp(suffix=".json")
    trainer = TorchTrainer(
        _loop, train_loop_config={"mode": mode, "epochs": epochs, "work_s": work_s, "src": src, "out": out},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=f"bench-{mode.lower()}-{int(time.time())}", storage_path=storage))
    t0 = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - t0
    res = json.loads(Path(out).read_text())
    os.unlink(out)
    # The first epoch pays for the S3 client's start; the steady state is what a long run sees.
    steady = slice(1, None)
    return {"report_blocked_s": round(statistics.median(res["blocked"][steady]), 3),
            "epoch_s": round(statistics.median(res["epochs"][steady]), 3), "fit_wall_s": round(wall, 1),
            "per_epoch_blocked_s": [round(x, 3) for x in res["blocked"]]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/checkpoint_upload.json")
    p.add_argument("--preset", default="cifar10")
    p.add_argument("--endpoint", default=None, help="an S3 endpoint (AWS_ENDPOINT_URL); default: start moto")
    p.add_argument("--bucket", default="simsiam-bench")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--work-s", type=float, default=2.0)
    args = p.parse_args(argv)

    server = None
    if args.endpoint is None:
        from tests.s3_server import S3Server, free_port

        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
                          AWS_EC2_METADATA_DISABLED="true")
        server = S3Server(free_port(), os.path.join(tempfile.gettempdir(), "bench-moto.log")).start()
        args.endpoint = server.endpoint
    os.environ["AWS_ENDPOINT_URL"] = args.endpoint  # before Ray starts: the workers inherit it
    try:
        if server is not None:
            server.create_bucket(args.bucket)
        cfg = C.load(args.preset)
        src = checkpoint_dir(cfg)
        size = os.path.getsize(Path(src) / CHECKPOINT_FILE)
        up = upload_seconds(src, f"s3://{args.bucket}/upload", args.repeats)
        print(f"checkpoint {size / 1e6:.1f} MB, upload s: {[round(x, 3) for x in up]}", flush=True)

        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False)
        try:
            modes = {m: report_seconds(src, f"s3://{args.bucket}/ray", m, args.epochs, args.work_s)
                     for m in ("SYNC", "ASYNC")}
        finally:
            ray.shutdown()
        shutil.rmtree(src, ignore_errors=True)
    finally:
        if server is not None:
            server.stop()
    sync, async_ = modes["SYNC"], modes["ASYNC"]
    result = {
        "name": "checkpoint_upload",
        "metric": "seconds ray.train.report blocks the loop per checkpointed epoch (median, epochs after the first)",
        "ours": async_["report_blocked_s"], "baseline": sync["report_blocked_s"],
        "ratio": round(async_["report_blocked_s"] / max(sync["report_blocked_s"], 1e-9), 4),
        "target": "ASYNC < SYNC: the upload leaves the step time",
        "checkpoint_bytes": size, "upload_s_median": round(statistics.median(up), 3),
        "upload_s": [round(x, 3) for x in up], "upload_MB_per_s": round(size / 1e6 / statistics.median(up), 1),
        "modes": modes,
        "config": {"preset": args.preset, "backbone": cfg.model.backbone, "endpoint": "moto on 127.0.0.1"
                   if server is not None else args.endpoint, "epochs": args.epochs, "work_s": args.work_s,
                   "repeats": args.repeats, "cpus": os.cpu_count()},
    }
    atomic_write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("checkpoint_bytes", "upload_s_median", "ours", "baseline", "ratio")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
