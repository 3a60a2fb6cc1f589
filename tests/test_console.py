"""What a person sees: the console, the run's log, errors before any work, results.json for every
failure, run_summary.png, bad rows failing a run at once."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from simsiam import console
from simsiam.config import DataConfig
from simsiam.data.preflight import preflight
from simsiam.data.schema import SCHEMA, DataError
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parent.parent


def _write_shard(path: Path, ids: list[str], labels: list[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros(16 * 16 * 3, np.uint8).tobytes()
    n = len(ids)
    cols = {"image": [pixels] * n, "label": labels, "id": ids, "height": [16] * n, "width": [16] * n,
            "channels": [3] * n}
    pq.write_table(pa.Table.from_pydict(cols, schema=SCHEMA), path)


def _good(d: Path, prefix: str = "r", n: int = 8) -> str:
    _write_shard(d / "part-00000.parquet", [f"{prefix}{i}" for i in range(n)], [i % 2 for i in range(n)])
    return str(d)


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    return env


# --------------------------------------------------------------------------- the checks before Ray


def test_preflight_names_what_is_wrong_before_any_ray(tmp_path):
    good = _good(tmp_path / "good")
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "notpq").mkdir()
    (tmp_path / "notpq" / "part-00000.parquet").write_text("id,label\n1,2\n")
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    pq.write_table(pa.table({"img": [b"x"], "label": [1]}), wrong / "part-00000.parquet")
    zero = tmp_path / "zero"
    _write_shard(zero / "part-00000.parquet", [], [])
    unlabeled = tmp_path / "unlabeled"
    _write_shard(unlabeled / "part-00000.parquet", ["u0", "u1", "u2"], [0, -1, 1])

    cases = [
        (str(tmp_path / "nope"), good, r"data.path: .*nope does not exist"),
        (str(empty), good, r"data.path: .*empty contains no .parquet shards"),
        (str(tmp_path / "notpq"), good, r"part-00000.parquet: not a readable Parquet file"),
        (str(wrong), good, r"wrong schema: missing column\(s\) image, id"),
        (str(zero), good, r"data.path: .*zero has 0 rows"),
        (good, str(unlabeled), r"data.eval_path: .* 1 unlabeled row\(s\) \(label -1\) \(first: part-00000.parquet, "
                               r"row id 'u1'\).*data.on_bad_image=skip"),
    ]
    for path, eval_path, match in cases:
        with pytest.raises(DataError, match=match):
            preflight(DataConfig(path=path, eval_path=eval_path))
    # Under skip, the unlabeled evaluation rows are a warning (they are skipped and counted).
    got = preflight(DataConfig(path=good, eval_path=str(unlabeled), on_bad_image="skip"))
    assert len(got.warnings) == 1 and "1 of 3 rows are unlabeled" in got.warnings[0]
    # Duplicate ids: a warning naming an example and both shards.
    dup = tmp_path / "dup"
    _good(dup)
    _write_shard(dup / "part-00001.parquet", ["r3", "x"], [0, 1])
    got = preflight(DataConfig(path=str(dup), eval_path=good))
    assert got.train_rows == 10 and got.train_shards == 2
    assert got.warnings == ["data.path: 1 id occurs more than once: 'r3' (part-00000.parquet row 3, part-00001.parquet "
                            "row 0); the schema requires unique ids (errors and skip lists name rows by id)"]
    assert preflight(DataConfig(path=good, eval_path=good)).warnings == []


def test_run_with_bad_data_fails_in_seconds_with_results_json_and_no_traceback(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipelines.pretrain_eval", "--set", f"data.path={tmp_path / 'missing'}",
           "--set", f"data.eval_path={tmp_path / 'missing'}", "--out-dir", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    text = r.stdout + r.stderr
    assert r.returncode == 2, text
    assert "Traceback" not in text and len(text.splitlines()) <= 8, text
    assert all(line.startswith("[simsiam] ") for line in text.splitlines()), text
    assert re.search(rf"error: failed: 0 epochs, linear top-1 n/a, wall \d+ s - data.path: {tmp_path / 'missing'} "
                     "does not exist", r.stderr), r.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "failed" and res["reason"] == f"data.path: {tmp_path / 'missing'} does not exist"
    assert res["failed_in"] == "checks"
    assert res["epochs_completed"] == 0 and res["config"]["data"]["path"] == str(tmp_path / "missing")
    assert (out / "run_summary.png").read_bytes()[:4] == b"\x89PNG"
    # Found before Ray: no cluster was started (Ray logs that it started one, to ray.log).
    assert "Started a local Ray instance" not in (out / "ray.log").read_text()
    # A config error with --out-dir also leaves results.json.
    r = subprocess.run([sys.executable, "-m", "pipelines.pretrain_eval", "--set", "optim.base_lr=-1",
                        "--out-dir", str(tmp_path / "cfg")], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "optim.base_lr" in r.stderr
    res = json.loads((tmp_path / "cfg" / "results.json").read_text())
    assert res["status"] == "failed" and "optim.base_lr" in res["reason"]


def test_skipped_rows_are_listed_by_shard_and_id_for_training_and_evaluation(tmp_path):
    from pipelines.pretrain_eval import list_skipped_rows

    train, held = tmp_path / "train", tmp_path / "held"
    _good(train)
    _good(held, prefix="h")
    for d, bad_id in ((train, "t-bad"), (held, "h-bad")):
        cols = {"image": [b"not an image"], "label": [0], "id": [bad_id], "height": [None], "width": [None],
                "channels": [None]}
        pq.write_table(pa.Table.from_pydict(cols, schema=SCHEMA), d / "part-00001.parquet")
    out = tmp_path / "skipped_rows.json"
    assert list_skipped_rows({"data.path": str(train), "data.eval_path": str(held)}, 10_000, out) == str(out)
    listing = json.loads(out.read_text())
    assert {k: (v["bad_count"], [(b["row"], b["id"]) for b in v["bad"]]) for k, v in listing.items()} == {
        "data.path": (1, [(0, "t-bad")]), "data.eval_path": (1, [(0, "h-bad")])}
    assert listing["data.path"]["bad"][0]["shard"].endswith("train/part-00001.parquet")
    # The same dataset for both is listed once.
    list_skipped_rows({"data.path": str(train), "data.eval_path": str(train)}, 10_000, out)
    assert list(json.loads(out.read_text())) == ["data.path"]


# --------------------------------------------------------------------------- console and log


def test_session_sends_everything_but_our_lines_to_the_log(tmp_path, capfd):
    with console.session(tmp_path) as log:
        print("python noise")
        os.write(1, b"fd-1 noise from C\n")
        os.write(2, b"fd-2 noise\n")
        console.say("epoch 1/2 ...")
        console.warn("careful")
        console.progress("not a terminal: nothing")
        console.text("a | table\n- | -")
        where = console.log_exception(ValueError("boom"))
    out, err = capfd.readouterr()
    assert out == "[simsiam] epoch 1/2 ...\na | table\n- | -\n"
    assert err == "[simsiam] warning: careful\n"
    assert where == str(log) == str(tmp_path / console.LOG_FILE)
    text = log.read_text()
    for needle in ("python noise", "fd-1 noise from C", "fd-2 noise", "[simsiam] epoch 1/2", "warning: careful",
                   "ValueError: boom"):
        assert needle in text
    # Restored after the block.
    print("back")
    assert capfd.readouterr().out == "back\n"


def test_lines_and_run_summary(tmp_path):
    m = {"epoch": 3, "loss": -0.5, "collapse_std": 0.04, "effective_rank": 70.0, "knn_top1": 80.0,
         "pairs_per_s": 300.0, "lr": 0.01, "world_size": 2, "skipped_images": 2}
    assert console.epoch_line(m, 10) == ("epoch 3/10 loss -0.5000 std 0.0400 rank 70.0 knn 80.0% 300 pairs/s "
                                         "lr 0.01 workers 2 skipped 2")
    res = {"status": "finished", "epochs_completed": 3, "linear_top1": 88.0, "knn_top1": 80.0,
           "baselines": {"random_init": {"linear_top1": 60.0, "knn_top1": 55.0},
                         "raw_pixels": {"linear_top1": 70.0, "knn_top1": 65.0}},
           "ssl_gain": 18.0, "config": {"model": {"dim": 512}, "optim": {"batch_size": 128}, "run": {"name": "t"}},
           "history": [{**m, "epoch": e, "knn_top1": None if e == 1 else 70.0 + e} for e in (1, 2, 3)]}
    assert console.baseline_lines(res) == ["baselines: random init linear top-1 60.00%, kNN 55.00%; raw pixels "
                                           "linear top-1 70.00%, kNN 65.00%"]
    assert console.baseline_lines({"status": "finished"}) == []
    from simsiam.run_summary import _outcome_text, plot_run_summary

    text = _outcome_text(res)
    assert "random init: linear 60.00%, kNN 55.00%" in text and "SSL gain: +18.00 points" in text
    path = plot_run_summary(res, tmp_path / "run_summary.png")
    assert Path(path).read_bytes()[:4] == b"\x89PNG"
    # A run that failed before its first epoch still gets its picture, saying so.
    plot_run_summary({"status": "failed", "reason": "data.path: x does not exist"}, tmp_path / "failed.png")
    assert (tmp_path / "failed.png").stat().st_size > 1000
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


# --------------------------------------------------------------------------- with Ray


def test_trial_lines_print_each_start_epoch_and_end_from_the_driver(ray_local, tmp_path, capsys):
    import ray.tune

    from simsiam import search as S
    from simsiam.trial_console import TrialLines

    def trainable(config):
        for e in (1, 2):
            ray.tune.report({"epoch": e, "loss": -0.1 * e, "collapse_std": 0.04, "effective_rank": 50.0,
                             "knn_top1": 40.0 + e, "pairs_per_s": 100.0, "lr": config["lr"], "world_size": 1})
        if config["lr"] > 1:
            raise S.TrialFailed("lr too high for this test")
        ray.tune.report({"status": "finished", "reason": "", "linear_top1": 77.0})

    lines = TrialLines(2, lambda m, err: S.classify(m, err, 2), ["lr"], 2)
    grid, _ = S.fit(tmp_path, ray.tune.with_resources(trainable, {"CPU": 0.1}),
                    lambda: ray.tune.TuneConfig(num_samples=1, max_concurrent_trials=1),
                    param_space={"lr": ray.tune.grid_search([0.5, 2.0])}, strict_metrics=False, callbacks=[lines])
    out = capsys.readouterr().out.splitlines()
    ours = [ln for ln in out if ln.startswith("[simsiam] trial ")]
    by_trial: dict[str, list[str]] = {}
    for ln in ours:
        by_trial.setdefault(ln.split()[2], []).append(" ".join(ln.split()[3:]))
    assert len(by_trial) == 2, out
    got = sorted(by_trial.values(), key=lambda v: v[0])
    assert got[0][0] == "started (1/2): lr=0.5" and got[1][0] == "started (2/2): lr=2"
    for lines_ in got:
        assert lines_[1].startswith("epoch 1/2 loss -0.1000") and lines_[2].startswith("epoch 2/2 loss -0.2000")
    assert got[0][3] == "finished, linear top-1 77.00%"
    assert got[1][3] == "failed - lr too high for this test"


def test_a_bad_row_fails_the_run_at_once_with_a_short_reason(ray_local, digits_cache, tmp_path):
    """A DataError is deterministic: no retry (one worker started although max_failures=3), and the
    reason is one line naming shard and row, not the worker's traceback."""
    from ray.util.state import list_actors

    from simsiam.run import RunSpec
    from simsiam.train import pretrain

    bad = tmp_path / "bad"
    rows = 64
    pixels = np.zeros(16 * 16 * 3, np.uint8).tobytes()
    cols = {"image": [pixels] * rows, "label": [0] * rows, "id": [f"ok{i}" for i in range(rows)],
            "height": [16] * rows, "width": [16] * rows, "channels": [3] * rows}
    cols["image"][5], cols["id"][5] = b"\x00" * 10, "short"  # raw bytes that do not match 16 x 16 x 3
    bad.mkdir()
    pq.write_table(pa.Table.from_pydict(cols, schema=SCHEMA), bad / "part-00000.parquet")
    cfg = tiny_config(digits_cache, **{"data.path": str(bad), "data.eval_path": str(bad), "train.max_failures": 3,
                                       "optim.batch_size": 16, "run.name": "badrow"})

    import ray

    # This session's cluster by its dashboard (others may run on the host).
    dashboard = f"http://{ray._private.worker.get_dashboard_url()}"

    def workers() -> int:
        return len(list_actors(address=dashboard, filters=[("class_name", "=", "RayTrainWorker")], limit=10_000))

    before = workers()
    t0 = time.time()
    res = pretrain(RunSpec(cfg, str(bad), None, str(tmp_path / "ray")))
    assert res.status == "failed"
    assert res.reason.startswith("bad data: ") and "part-00000.parquet: row id='short'" in res.reason, res.reason
    assert "\n" not in res.reason and "Traceback" not in res.reason
    assert workers() - before == 1, "the run was retried"
    print(f"bad row -> failed in {time.time() - t0:.1f} s")


@pytest.mark.slow
def test_sample_pipeline_console_is_ours(digits_cache, tmp_path):
    """`simsiam run` with its output captured (not a terminal): few lines, all ours, the README's result
    lines in order; Ray's output in OUT_DIR/ray.log."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "simsiam.cli", "run", "--set", "train.epochs=2", "--set",
           "train.max_steps_per_epoch=4", "--set", f"data.cache_dir={digits_cache}", "--out-dir", str(out)]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = proc.stdout.readline()
    first_s = time.time() - t0
    rest, _ = proc.communicate(timeout=540)
    lines = (first + rest).splitlines()
    assert proc.returncode == 0, "\n".join(lines[-40:])
    assert first.startswith("[simsiam] run 'sample'") and str(out / "ray.log") in first
    assert len(lines) <= 60, "\n".join(lines)
    assert all(ln.startswith("[simsiam] ") for ln in lines), "\n".join(ln for ln in lines if "[simsiam]" not in ln)
    assert not any("warning" in ln or "error" in ln for ln in lines), "\n".join(lines)
    # The README's sample output, line by line (up to each line's first ':'), in its order; epochs apart.
    readme = (ROOT / "README.md").read_text().split("```\n[simsiam] run 'sample'", 1)[1].split("```", 1)[0]
    readme_lines = ["[simsiam] run 'sample'" + readme.splitlines()[0]] + readme.splitlines()[1:]
    # Measured figures before the first ':' (the last line's "top-1 90.6% vs ...") differ from run to run.
    expected = [re.split(r"\d+\.\d", ln.split(":", 1)[0])[0] if ":" in ln else " ".join(ln.split()[:3])
                for ln in readme_lines if ln.startswith("[simsiam] ") and not ln.startswith("[simsiam] epoch ")]
    assert len(expected) >= 10, readme
    expected.insert(expected.index("[simsiam] linear evaluation (cached, in this run)"), "[simsiam] epoch 2/2 loss ")
    expected.insert(expected.index("[simsiam] epoch 2/2 loss "), "[simsiam] epoch 1/2 loss ")
    at = 0
    for want in expected:
        found = [i for i, ln in enumerate(lines) if ln.startswith(want) and i >= at]
        assert found, f"{want!r} missing or out of order:\n" + "\n".join(lines)
        at = found[0] + 1
    log = (out / "ray.log").read_text()
    assert "RayTrainWorker" in log and "Started a local Ray instance" in log
    assert (out / "run_summary.png").read_bytes()[:4] == b"\x89PNG"
    print(f"{len(lines)} lines; first after {first_s:.1f} s")
