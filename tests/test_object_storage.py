"""Data, checkpoints and results on s3:// end to end, against a real S3 endpoint (a moto server process).

Every byte goes over HTTP to 127.0.0.1: the Ray workers of the shared test cluster reach the endpoint
through the AWS_ENDPOINT_URL they inherited (tests/conftest.py). The endpoint is paused (SIGSTOP) for
longer than a request timeout while the run uploads checkpoints, then resumed.
"""
from __future__ import annotations

import contextlib
import datetime
import glob
import io
import json
import os
import re
import tempfile
import threading
import time

import numpy as np
import pytest

from simsiam.data.cli import main as data_main
from simsiam.data.schema import METADATA_FILE, PLAN_FILE
from tests.conftest import tiny_config

CHECKPOINT_DIR = re.compile(r"checkpoint_\d{4}-\d\d-\d\d_[\d.-]+")  # Ray's name for a checkpoint directory
OUTAGE_S = 8.0  # pyarrow's S3 client gives up on a request after ~3 s without a byte; it retries for ~100 s


def cli(fn, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = fn(argv)
        except SystemExit as e:
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def s3_digits(s3) -> str:
    """The built-in digits converted straight onto the endpoint: s3://<bucket>/digits/{train,test}."""
    root = s3.create_bucket("object-storage-data") + "/digits"
    rc, _, err = cli(data_main, ["convert", "--builtin", "digits", root, "--quiet"])
    assert rc == 0, err
    return root


def test_convert_and_inspect_on_s3(s3, s3_digits, tmp_path):
    keys = s3.keys_of(s3_digits)
    train = [k for k in keys if "/train/" in k]
    assert any(k.endswith("train/" + METADATA_FILE) for k in train)
    assert not any(k.endswith(PLAN_FILE) or k.endswith(".tmp") for k in keys), keys
    meta = json.loads(s3._client("s3").get_object(Bucket="object-storage-data",
                                                  Key=f"digits/train/{METADATA_FILE}")["Body"].read())
    shard_keys = sorted(k.rsplit("/", 1)[1] for k in train if k.endswith(".parquet"))
    assert shard_keys == [s["file"] for s in meta["shards"]]

    # The same conversion again is a no-op; another one onto it needs --overwrite (as on disk).
    rc, out, _ = cli(data_main, ["convert", "--builtin", "digits", s3_digits, "--quiet"])
    assert rc == 0 and "nothing to do" in out, out
    npz = tmp_path / "other.npz"
    np.savez(npz, images=np.zeros((4, 8, 8), np.uint8), labels=np.arange(4))
    rc, _, err = cli(data_main, ["convert", str(npz), s3_digits + "/train", "--quiet"])
    assert rc != 0 and "s3://object-storage-data/digits/train: already holds a converted dataset" in err, err
    assert s3.keys_of(s3_digits) == keys  # untouched

    rc, out, err = cli(data_main, ["inspect", s3_digits + "/train", "--json", "--out", str(tmp_path / "inspect")])
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["num_rows"] == meta["num_rows"] and summary["num_shards"] == len(meta["shards"])
    assert all(s["file"].startswith("s3://object-storage-data/digits/train/") for s in summary["shards"])


class Outage:
    """Once the run's first checkpoint is on the endpoint, waits for the worker to stage its next one
    (train.py writes each checkpoint to a ``simsiam-ckpt-*`` temp directory, hands it to Ray's background
    upload, and Ray deletes the directory once uploaded) and pauses the endpoint at that moment, for
    OUTAGE_S (more than one request timeout). ``upload_cut`` says the staged checkpoint was still not
    uploaded when the endpoint came back: its upload met the outage."""

    def __init__(self, s3, storage: str):
        self.s3, self.storage = s3, storage
        self.started = self.ended = None
        self.upload_cut = False
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    @staticmethod
    def _staged() -> set[str]:
        return set(glob.glob(os.path.join(tempfile.gettempdir(), "simsiam-ckpt-*")))

    def _watch(self) -> None:
        while not self.stop.is_set() and not any(CHECKPOINT_DIR.search(k) for k in self.s3.keys_of(self.storage)):
            time.sleep(0.1)
        seen = self._staged()
        while not self.stop.is_set():
            new = self._staged() - seen
            if new:
                self.s3.pause()
                self.started, self.started_wall = time.monotonic(), time.time()
                time.sleep(OUTAGE_S)
                self.upload_cut = bool(new & self._staged())
                self.s3.resume()
                self.ended, self.ended_wall = time.monotonic(), time.time()
                return
            time.sleep(0.02)

    def join(self) -> None:
        self.stop.set()
        self.thread.join()
        if self.s3.paused:
            self.s3.resume()


@pytest.mark.slow
def test_run_with_data_checkpoints_and_results_on_s3_rides_out_an_outage(s3, s3_digits, digits_cache, ray_local,
                                                                          tmp_path):
    from pipelines.pretrain_eval import run

    storage = s3.create_bucket("object-storage-runs") + "/ray"
    # A wide projector makes the checkpoint ~90 MB, so its upload takes long enough to be cut.
    cfg = tiny_config(digits_cache, **{"data.path": s3_digits + "/train", "data.eval_path": s3_digits + "/test",
                                       "run.storage_path": storage, "run.name": "s3run", "train.epochs": 3,
                                       "model.dim": 2048, "model.pred_dim": 512})
    outage = Outage(s3, storage)
    t0 = time.monotonic()
    try:
        res = run(cfg, tmp_path / "out")
    finally:
        outage.join()
    wall = time.monotonic() - t0
    assert outage.started is not None and outage.ended is not None, "the endpoint was never paused"
    assert outage.upload_cut, "no checkpoint upload met the outage"
    assert outage.ended - t0 < wall  # the outage happened during the run
    assert res["status"] == "finished", res["reason"]
    assert res["epochs_completed"] == 3
    assert [h["epoch"] for h in res["history"]] == [1, 2, 3]  # every epoch recorded once
    assert res["checkpoint"].startswith(storage + "/s3run/checkpoint_")
    assert res["linear_top1"] is not None

    keys = s3.keys_of(storage + "/s3run")
    # keys: ray/s3run/<entry>/...; the newest train.keep_checkpoints of one per epoch, each one whole
    ckpt_dirs = {k.split("/")[2] for k in keys if CHECKPOINT_DIR.fullmatch(k.split("/")[2])}
    assert len(ckpt_dirs) == cfg.train.keep_checkpoints == 2, sorted(ckpt_dirs)
    for d in ckpt_dirs:
        assert f"ray/s3run/{d}/checkpoint.pt" in keys, (d, keys)
    assert "ray/s3run/results.json" in keys
    assert any("/tensorboard/" in k and "tfevents" in k for k in keys), keys
    # Ray names a checkpoint directory by the time its report began: one began after the endpoint stopped.
    started = [datetime.datetime.strptime(d[len("checkpoint_"):], "%Y-%m-%d_%H-%M-%S.%f").timestamp()
               for d in ckpt_dirs]
    during = [round(t - outage.started_wall, 1) for t in started if outage.started_wall <= t <= outage.ended_wall]
    assert during, "no checkpoint report began while the endpoint was down"
    print(f"outage {outage.ended - outage.started:.1f} s during a {wall:.1f} s run; checkpoint reports begun "
          f"during it at +{during} s")


@pytest.mark.slow
def test_retrain_with_its_registry_on_s3(s3, s3_digits, digits_cache, ray_local):
    """`simsiam retrain --registry s3://...`: the first run is promoted through the lease and the
    compare-and-swap pointer; its records, model and Ray storage all live on the endpoint."""
    from pipelines.retrain import retrain
    from simsiam.registry import Registry

    reg_root = s3.create_bucket("object-storage-registry") + "/reg"
    cfg = tiny_config(digits_cache, **{"data.path": s3_digits + "/train", "data.eval_path": s3_digits + "/test",
                                       "retrain.eval_train_path": s3_digits + "/train", "train.epochs": 1})
    out = retrain(cfg, reg_root, log=print)
    assert out.decision == "promoted", out.reason
    reg = Registry(reg_root)
    promoted = reg.promoted()
    assert promoted["run_id"] == out.run_id and reg.model_complete(promoted["model"])
    keys = s3.keys_of(reg_root)
    assert f"reg/models/{out.run_id}/checkpoint.pt" in keys and "reg/.lease.json" not in keys
    assert any(k.startswith(f"reg/runs/{out.run_id}/ray/{out.run_id}/checkpoint_") for k in keys)
    assert set(reg.manifest()["shards"]) == {r for r in out.record["inputs"]["new_shards"]}
    again = retrain(cfg, reg_root, log=print)
    assert again.decision == "nothing_to_do" and reg.promoted() == promoted


def test_run_with_wrong_credentials_stops_before_ray_naming_the_bucket(tmp_path):
    """`simsiam run` against a store that checks signatures, with wrong keys: exit 2 within seconds, the
    message names the setting and the bucket, and no Ray cluster was started."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.s3_server import S3Server, free_port

    server = S3Server(free_port(), str(tmp_path / "moto.log"), auth=True).start()
    try:
        bucket = server.create_bucket("private-runs")
        env = {**os.environ, "AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG1",
               "AWS_SECRET_ACCESS_KEY": "nope", "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
               "RAY_ADDRESS": "127.0.0.1:1"}  # any attempt to reach Ray would fail differently
        t0 = time.monotonic()
        sets = [f"data.path={bucket}/digits/train", f"data.eval_path={bucket}/digits/test",
                f"run.storage_path={bucket}/runs"]
        cmd = [sys.executable, "-m", "pipelines.pretrain_eval", "sample", "--out-dir", str(tmp_path / "o")]
        for kv in sets:
            cmd += ["--set", kv]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        took = time.monotonic() - t0
    finally:
        server.stop()
    assert r.returncode == 2, r.stdout + r.stderr
    assert "data.path: s3://private-runs/digits/train: access to bucket s3://private-runs denied" in r.stderr, r.stderr
    assert "check the credentials" in r.stderr and "[simsiam] running" not in r.stdout
    print(f"refused in {took:.1f} s")
