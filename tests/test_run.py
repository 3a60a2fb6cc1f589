"""The run contract (simsiam/run.py): results.json is the outcome serialised, with the README's keys."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from simsiam import config as C
from simsiam.run import EpochRecord, RunOutcome, RunSpec, Status, failed

ROOT = Path(__file__).resolve().parent.parent


def _record(epoch: int, knn: float | None) -> EpochRecord:
    return EpochRecord(epoch=epoch, step=10 * epoch, loss=-0.5, collapse_std=0.04 + epoch / 100, effective_rank=20.0,
                       lr=0.1, pairs_per_s=100.0 + epoch, skipped_images=epoch, world_size=1, global_batch=128,
                       knn_top1=knn)


def test_status_serialises_as_the_documented_strings():
    assert json.loads(json.dumps({"status": Status.COLLAPSED})) == {"status": "collapsed"}
    assert Status("diverged") is Status.DIVERGED and Status.FINISHED == "finished" and f"{Status.FAILED}" == "failed"


def test_results_carry_every_key_the_readme_documents_and_derive_the_final_values():
    linear = {"top1": 80.0, "top5": 99.0, "in_run": True,
              "baselines": {"random_init": {"linear_top1": 30.0, "knn_top1": 25.0},
                            "raw_pixels": {"linear_top1": 60.0, "knn_top1": 55.0}}}
    out = RunOutcome(Status.FINISHED, "", (_record(1, 50.0), _record(2, None)), "/ckpt", "/runs/x", linear)
    res = json.loads(json.dumps(out.results()))
    readme = (ROOT / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `results.json` |"))
    documented = set(re.findall(r"`(\w+)`", row)) - {"results", "json", "checks"}
    # Written by the pipeline itself rather than the outcome: the config, the wall time, its own files.
    by_pipeline = {"config", "wall_s", "run_summary", "skipped_rows", "failed_in"}
    assert documented - by_pipeline <= set(res), documented - by_pipeline - set(res)
    assert res["status"] == "finished" and res["epochs_completed"] == 2
    assert res["knn_top1"] == 50.0  # the last epoch the monitor ran, not the last epoch
    assert res["collapse_std"] == pytest.approx(0.06) and res["effective_rank"] == 20.0
    assert res["skipped_images"] == 3 and res["pairs_per_s"] == 102.0
    assert res["ssl_gain"] == pytest.approx(20.0) and res["linear_top1"] == 80.0 and res["linear_top5"] == 99.0
    assert res["tensorboard"] == "/runs/x/tensorboard" and res["linear_eval"] == linear
    assert [EpochRecord.from_dict(h) for h in res["history"]] == list(out.history)


def test_a_run_that_never_started_serialises_with_empty_values():
    res = failed("bad data").results()
    assert res["status"] == "failed" and res["reason"] == "bad data" and res["history"] == []
    assert res["epochs_completed"] == 0 and res["skipped_images"] == 0
    assert all(res[k] is None for k in ("linear_top1", "knn_top1", "collapse_std", "checkpoint", "ssl_gain"))


def test_a_spec_is_named_by_its_config_unless_told():
    cfg = C.load("sample", {"run.name": "abc"})
    spec = RunSpec(cfg, "/data/train", None, "s3://bucket/runs/")
    assert spec.name == "abc" and spec.run_path == "s3://bucket/runs/abc" and spec.linear_fit_path is None
    assert RunSpec(cfg, "/t", "/h", "/s", name="trial_1").name == "trial_1"
    with pytest.raises(AttributeError):
        spec.train_path = "/elsewhere"  # frozen
