"""The search harness: result classification, tables, best.yaml, plots and resources (fast), then real
Tune + Optuna + ASHA runs (slow): nested TorchTrainers released when ASHA stops them, an end-to-end
search on the sample set with a deliberately bad point, and a driver killed mid-search and resumed."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import ray
import ray.tune
import yaml

from simsiam import config as C
from simsiam import io as sio
from simsiam import search as S
from tests.cluster_checks import released_within

ROOT = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------- classification


def test_final_report_status_wins_and_errors_are_failed_with_their_message():
    assert S.classify({"status": "finished", "reason": ""}, None, 5) == ("finished", "")
    assert S.classify({"status": "collapsed", "reason": "rank 3 < 25"}, None, 5) == ("collapsed", "rank 3 < 25")
    assert S.classify({"status": "diverged", "reason": "loss nan"}, None, 5) == ("diverged", "loss nan")
    err = RuntimeError("Traceback (most recent call last):\n  File x\nsimsiam.search.TrialFailed: workers died twice\n")
    assert S.classify({"epoch": 1}, err, 5) == ("failed", "workers died twice")
    assert S.classify({}, ValueError("boom"), 5) == ("failed", "boom")


def test_a_trial_without_final_report_was_stopped_early_by_asha():
    status, reason = S.classify({"epoch": 2, "knn_top1": 40.0}, None, 5)
    assert status == "stopped_early" and "after epoch 2 of 5" in reason and "40.00%" in reason
    # All epochs reported but no final report: it did not conclude normally.
    assert S.classify({"epoch": 5}, None, 5)[0] == "failed"
    assert S.classify({}, None, 5)[0] == "failed"


def _final(top1, status="finished", **kw):
    history = [{"epoch": 1, "step": 3, "collapse_std": 0.04, "effective_rank": 30.0, "knn_top1": 50.0}]
    return {"status": status, "reason": kw.pop("reason", ""), S.OBJECTIVE: top1, "linear_top5": 99.0,
            "epochs_completed": 1, "steps": 3, "final_knn_top1": 50.0, "final_collapse_std": 0.04,
            "final_effective_rank": 30.0, "history_json": json.dumps(history), "tensorboard": "/tb", **kw}


def test_records_carry_params_objective_and_history():
    rec = S.record_from_result("t1", _final(61.5), {"optim.base_lr": 0.05, "model.pred_dim": 64}, None, 1, "/p")
    assert (rec.status, rec.objective, rec.epochs_completed, rec.knn_top1) == ("finished", 61.5, 1, 50.0)
    assert rec.params == {"optim.base_lr": 0.05, "model.pred_dim": 64}
    assert rec.history[0]["effective_rank"] == 30.0
    stopped = S.record_from_result("t2", {"epoch": 1, "knn_top1": 20.0, "collapse_std": 0.03,
                                          "effective_rank": 12.0, "step": 4}, {"optim.base_lr": 0.4}, None, 3)
    assert stopped.status == "stopped_early" and stopped.objective is None
    assert (stopped.epochs_completed, stopped.steps, stopped.knn_top1) == (1, 4, 20.0)


def test_best_record_ignores_unfinished_trials():
    recs = [S.record_from_result("a", _final(50.0), {}, None, 1),
            S.record_from_result("b", _final(None, "collapsed"), {}, None, 1),
            S.record_from_result("c", _final(70.0), {}, None, 1),
            S.record_from_result("d", {}, {}, RuntimeError("x"), 1)]
    assert S.best_record(recs).trial_id == "c"
    assert S.best_record(recs[1:2] + recs[3:]) is None


def test_trial_paths_on_object_storage_keep_their_scheme(tmp_path):
    """Tune gives a trial on s3:// or gs:// as ``bucket/key`` inside its filesystem; trials.csv says the URI."""
    from types import SimpleNamespace

    import pyarrow.fs as pafs

    s3 = pafs.S3FileSystem(endpoint_override="http://127.0.0.1:1", region="us-east-1")
    assert S.result_uri(SimpleNamespace(path="bkt/tune/t1", filesystem=s3)) == "s3://bkt/tune/t1"
    gcs = pafs.GcsFileSystem(anonymous=True)
    assert S.result_uri(SimpleNamespace(path="bkt/tune/t1", filesystem=gcs)) == "gs://bkt/tune/t1"
    local = SimpleNamespace(path=str(tmp_path / "t1"), filesystem=pafs.LocalFileSystem())
    assert S.result_uri(local) == str(tmp_path / "t1")
    assert S.result_uri(SimpleNamespace(path=None, filesystem=s3)) == ""


def test_journal_copy_follows_trials_at_once_and_knn_reports_per_snapshot_period(tmp_path):
    """The searcher publishes its journal (a local copy here) when a trial is asked for and when it ends;
    a kNN report in between waits for the snapshot period (long searches report every epoch)."""
    space = S.parse_space({"params": {"optim.base_lr": {"distribution": "loguniform", "low": 0.01, "high": 0.5}}})
    copy = tmp_path / "copy" / S.STUDY_FILE
    (tmp_path / "exp").mkdir()
    searcher = S.make_searcher(space, tmp_path / "exp", seed=0, epochs=2, journal_copy=str(copy))
    journal = Path(searcher.journal_path)
    searcher.suggest("t1")
    assert copy.read_bytes() == journal.read_bytes()
    searcher.on_trial_result("t1", {S.ASHA_METRIC: 50.0, S.TIME_ATTR: 1})
    assert copy.read_bytes() != journal.read_bytes()  # within the period: not yet
    searcher.on_trial_complete("t1", {S.ASHA_METRIC: 60.0, S.TIME_ATTR: 2, S.OBJECTIVE: 70.0, "status": "finished"})
    assert copy.read_bytes() == journal.read_bytes()
    trial = S.load_study(copy.parent).trials[0]
    assert trial.intermediate_values == {1: 50.0, 2: 60.0} and trial.value == 70.0


def test_a_searcher_restored_from_before_a_trial_was_told_leaves_its_outcome(tmp_path, monkeypatch):
    """A driver killed after telling Optuna how a trial ended, but before Tune saved the searcher: the
    resumed searcher still holds that trial open, and Tune runs it to its end again. Its reports and
    its end must leave the study's outcome as it was, not fail the search (UpdateFinishedTrialError)."""
    space = S.parse_space({"params": {"optim.base_lr": {"distribution": "loguniform", "low": 0.01, "high": 0.5}}})
    (tmp_path / "exp").mkdir()
    searcher = S.make_searcher(space, tmp_path / "exp", seed=0, epochs=2)
    searcher.suggest("t1")
    searcher.save(str(tmp_path / "searcher.pkl"))  # Tune's snapshot, taken while t1 ran
    final = {S.ASHA_METRIC: 60.0, S.TIME_ATTR: 2, S.OBJECTIVE: 70.0, "status": "finished"}
    searcher.on_trial_complete("t1", final)  # then the driver told Optuna, and was killed

    monkeypatch.setenv(S.JOURNAL_ENV, searcher.journal_path)
    resumed = S.make_searcher(space, tmp_path / "exp", seed=0, epochs=2)
    resumed.restore(str(tmp_path / "searcher.pkl"))
    resumed.on_trial_result("t1", {S.ASHA_METRIC: 55.0, S.TIME_ATTR: 2})
    resumed.on_trial_complete("t1", {**final, S.OBJECTIVE: 65.0})
    trial = S.load_study(tmp_path / "exp").trials[0]
    assert trial.state.name == "COMPLETE" and trial.value == 70.0
    assert trial.intermediate_values == {2: 60.0} and trial.user_attrs["status"] == "finished"


def test_table_csv_and_console(tmp_path):
    recs = [S.record_from_result("a", _final(50.0), {"optim.base_lr": 0.05}, None, 1),
            S.record_from_result("b", {"epoch": 1, "knn_top1": 10.0}, {"optim.base_lr": 3.0}, None, 2)]
    rows = S.table_rows(recs, ["optim.base_lr"])
    S.write_csv(rows, tmp_path / "t.csv")
    with open(tmp_path / "t.csv") as f:
        got = list(csv.DictReader(f))
    assert [r["status"] for r in got] == ["finished", "stopped_early"]
    assert got[0]["objective"] == "50.0" and got[1]["objective"] == ""
    assert got[1]["optim.base_lr"] == "3.0" and "stopped by ASHA" in got[1]["reason"]
    text = S.format_table(rows, ["trial_id", "status", "objective", "optim.base_lr"])
    lines = text.splitlines()
    assert lines[0].split() == ["trial_id", "status", "objective", "optim.base_lr"]
    assert lines[2].split() == ["a", "finished", "50", "0.05"] and lines[3].split() == ["b", "stopped_early", "3"]


def test_best_yaml_is_a_runnable_config_with_the_best_params(tmp_path):
    base = C.load("sample", {"train.epochs": 3})
    best = S.record_from_result("abc_00001", _final(72.25), {"optim.base_lr": 0.123, "model.pred_dim": 64}, None, 3)
    S.write_best_config(base, best, tmp_path / "best.yaml")
    cfg = C.load(str(tmp_path / "best.yaml"))
    assert (cfg.optim.base_lr, cfg.model.pred_dim, cfg.train.epochs) == (0.123, 64, 3)
    assert cfg.run.name == "sample-best"
    assert cfg.to_dict() == base.replace({"optim.base_lr": 0.123, "model.pred_dim": 64,
                                          "run.name": "sample-best"}).to_dict()
    assert "72.25" in (tmp_path / "best.yaml").read_text().splitlines()[0]


def test_study_plots_wait_for_enough_trials_and_history_shows_stopped_trials(tmp_path):
    dists = {"optim.base_lr": optuna.distributions.FloatDistribution(0.01, 1.0, log=True),
             "model.pred_dim": optuna.distributions.CategoricalDistribution([32, 64])}
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    t = study.ask(dists)
    study.tell(t, 40.0)
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "optimization_history.png").write_bytes(b"stale")  # from an earlier run: removed
    one = S.plot_study(study, tmp_path / "p")
    assert one == {name: f"skipped: not enough finished trials (1 finished, 0 stopped early with a kNN value; {need})"
                   for name, need in (("optimization_history", "needs 2 with a value"),
                                      ("param_importances", "needs 4 finished"))}
    assert not list((tmp_path / "p").iterdir())
    # A trial ASHA stopped after epoch 2 (kNN 31.5 there) counts for the history, at its last kNN.
    t = study.ask(dists)
    t.report(20.0, 1)
    t.report(31.5, 2)
    study.tell(t, state=optuna.trial.TrialState.PRUNED)
    two = S.plot_study(study, tmp_path / "p")
    assert Path(two["optimization_history"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert two["param_importances"].startswith("skipped: not enough finished trials (1 finished, 1 stopped")
    fig = S.history_figure(study)
    lines = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in fig.axes[0].lines}
    assert lines["finished: linear_top1 (1)"] == ([0], [40.0])
    assert lines["stopped by ASHA: last kNN top-1 (1)"] == ([1], [31.5])
    for i in range(4):
        t = study.ask(dists)
        study.tell(t, 40.0 + 5 * i * t.params["optim.base_lr"])
    many = S.plot_study(study, tmp_path / "many")
    assert all(Path(p).read_bytes()[:4] == b"\x89PNG" for p in many.values()), many


def test_orphaned_running_study_trials_are_failed(tmp_path):
    study = optuna.create_study(storage=S.study_storage(tmp_path), study_name=S.STUDY_NAME, direction="maximize")
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    study.tell(study.ask(dist), 1.0)
    study.ask(dist)  # asked by a driver that was then killed
    assert S.fail_orphaned_trials(S.load_study(tmp_path)) == 1
    trials = S.load_study(tmp_path).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]
    assert trials[1].user_attrs["status"] == "failed" and "killed" in trials[1].user_attrs["reason"]


# ----------------------------------------------------------------------------- resources and settings


def test_concurrency_follows_cluster_and_scaling_config():
    cfg = C.load("sample", {"train.cpus_per_worker": 0.5, "data.data_cpus": 0.25})
    assert S.trial_budget(cfg)["CPU"] == pytest.approx(1.0)
    assert S.derive_concurrency(cfg, {"CPU": 2.0}) == 2
    assert S.derive_concurrency(cfg, {"CPU": 2.0}, requested=1) == 1
    assert S.derive_concurrency(cfg, {"CPU": 16.0}) == 16
    # Uncapped Ray Data asks 1 CPU per task: the trials together must leave one free, or no pipeline starts.
    uncapped = cfg.replace({"data.data_cpus": 0.0})
    assert S.trial_budget(uncapped) == {"CPU": 0.75, "GPU": 0.0, "data_pool": 1.0}
    assert S.derive_concurrency(uncapped, {"CPU": 2.0}) == 1
    assert S.derive_concurrency(uncapped, {"CPU": 16.0}) == 20  # (16 - 1) / 0.75
    two = cfg.replace({"train.num_workers": 2, "train.cpus_per_worker": 1.0})
    assert S.derive_concurrency(two, {"CPU": 16.0}) == 6  # 2.5 CPU per trial
    gpu = C.load("cifar10", {"train.num_workers": 2, "train.cpus_per_worker": 4})
    assert S.derive_concurrency(gpu, {"CPU": 64.0, "GPU": 8.0}) == 4  # GPU-bound
    whole_cpu = C.load("sample", {"train.cpus_per_worker": 1.0, "data.data_cpus": 0.0})
    with pytest.raises(C.ConfigError, match=r"one trial needs 2.25 CPU.*cluster has 2 CPU.*data.data_cpus=0.25"):
        S.derive_concurrency(whole_cpu, {"CPU": 2.0})
    with pytest.raises(C.ConfigError, match="0 GPU"):
        S.derive_concurrency(gpu, {"CPU": 64.0})


def test_out_dir_holds_one_experiment(tmp_path):
    spec = {"trials": 4, "space": {"params": {"a": 1}}}
    assert S.claim_out_dir(tmp_path, "search.json", spec) is False
    assert S.claim_out_dir(tmp_path, "search.json", dict(spec)) is True
    with pytest.raises(C.ConfigError, match=r"different experiment \(search.json differs in: trials\)"):
        S.claim_out_dir(tmp_path, "search.json", {**spec, "trials": 5})
    # A config stored by older code (a field added since) still matches the same config today.
    cfg = C.load("sample").to_dict()
    old = {**cfg, "train": {k: v for k, v in cfg["train"].items() if k != "knn_t"}}
    S.claim_out_dir(tmp_path / "b", "search.json", {"config": old})
    assert S.claim_out_dir(tmp_path / "b", "search.json", {"config": cfg}) is True
    with pytest.raises(C.ConfigError, match="differs in: config"):
        S.claim_out_dir(tmp_path / "b", "search.json", {"config": C.load("sample", {"train.knn_t": 0.5}).to_dict()})


def test_trial_overrides_and_final_collapse():
    assert S.trial_overrides({"optim.base_lr": 0.1, "seed": 3}, None) == {"optim.base_lr": 0.1, "train.seed": 3}
    assert S.trial_overrides({"variant": "v", "seed": 1}, {"v": {"loss.stop_gradient": False}}) == {
        "loss.stop_gradient": False, "train.seed": 1}
    with pytest.raises(S.TrialFailed, match="unknown variant"):
        S.trial_overrides({"variant": "w"}, {"v": {}})
    cfg = C.load("sample", {"model.dim": 512, "optim.batch_size": 64})  # std thr 0.5/sqrt(512) = 0.0221, rank 12.8
    healthy = [{"epoch": 2, "collapse_std": 0.044, "effective_rank": 28.0, "global_batch": 64, "world_size": 1}]
    assert S.final_collapse(healthy, cfg).status == "healthy"
    low_rank = [{**healthy[0], "effective_rank": 10.0}]
    v = S.final_collapse(low_rank, cfg)
    assert v.status == "collapsed" and "effective rank: 10 < 12.8" in v.reason
    assert v.rank.margin == pytest.approx(10 / 12.8) and v.std.margin == pytest.approx(0.044 * 512 ** 0.5 / 0.5)
    low_std = [{**healthy[0], "collapse_std": 0.001}]
    assert "collapse std" in S.final_collapse(low_std, cfg).reason
    # Two workers: each computes the metrics on its own half of the batch, 32 rows (under rank_rows 64).
    assert S.final_collapse([{**low_rank[0], "world_size": 2}], cfg).status == "healthy"  # 10 >= 0.2 x 32


def test_asha_has_no_rung_at_the_last_epoch_and_its_grace_is_a_quarter_of_the_epochs():
    from pipelines.search import default_grace, make_scheduler
    from simsiam.ray_compat import asha_rungs

    assert type(make_scheduler(1, 1, 2)).__name__ == "FIFOScheduler"
    assert [default_grace(e) for e in (1, 2, 4, 5, 15, 100, 800)] == [1, 1, 1, 2, 4, 25, 200]
    assert asha_rungs(make_scheduler(15, default_grace(15), 2)) == [4, 8] and asha_rungs(make_scheduler(1, 1, 2)) == []
    for epochs in (2, 3, 5, 9):
        sched = make_scheduler(epochs, 1, 2)
        rungs = asha_rungs(sched)
        assert rungs and max(rungs) < epochs, (epochs, rungs)


def test_names_pickled_by_experiments_of_earlier_versions_still_resolve():
    """A Tune experiment snapshot pickles the trial function, the trial-directory namer and the searcher
    by module and name; those written when the harness was the module simsiam/search.py (and the
    searcher was FinalObjectiveOptunaSearch) must load from the package, or such a search cannot resume."""
    import pickle

    from simsiam import tune_plugins

    def by_name(module: str, name: str):
        return pickle.loads(f"c{module}\n{name}\n.".encode())  # protocol 0: one GLOBAL, as Tune pickled it

    assert by_name("simsiam.search", "run_trial") is S.trial.run_trial
    assert by_name("simsiam.search", "trial_dirname") is S.driver.trial_dirname
    assert by_name("simsiam.search", "FinalObjectiveOptunaSearch") is tune_plugins.LinkedOptunaSearch
    assert by_name("simsiam.search", "ReleaseStoppedTrials") is tune_plugins.ReleaseStoppedTrials
    with pytest.raises(AttributeError):
        by_name("simsiam.search", "NoSuchThing")


# ----------------------------------------------------------------------------- real Tune (slow)

# The sample preset shrunk (as tests/conftest.py's tiny_config) so a trial is seconds of compute, with
# a collapse guard that acts within the few steps a trial has (healthy runs here keep an effective rank
# ~40, three times the threshold of 0.2 x min(rows 64, d 128)).
TINY = {"model.small_width": 16, "model.dim": 128, "model.pred_dim": 32, "optim.batch_size": 64,
        "train.epochs": 2, "train.max_steps_per_epoch": 3, "train.cpus_per_worker": 0.5, "train.log_every": 1,
        "train.collapse_guard.window_steps": 2, "data.data_cpus": 0.25, "eval.linear.epochs": 5}
# Two deliberately bad points. BN everywhere and a scale-free loss keep SimSiam finite at any sane lr:
# measured on this config, base lr 1e3 collapses (effective rank 42 -> 5 within 4 steps) and only an
# absurd one overflows (1e20: NaN at the second step).
COLLAPSING_LR, DIVERGING_LR = 1e3, 1e20


def _experiment_trials(exp: Path | str) -> dict[str, tuple[str, dict]]:
    """{trial id: (Tune status, last result)} from the newest experiment snapshot the driver wrote
    (``exp``: a local directory or an s3:// URI)."""
    states = sorted(n for n in sio.names(exp) if n.startswith("experiment_state-") and n.endswith(".json"))
    if not states:
        return {}
    try:
        data = json.loads(sio.read_text(sio.join(str(exp), states[-1])))
    except (ValueError, FileNotFoundError):  # caught mid-write by the driver, or replaced meanwhile
        return {}
    out = {}
    for meta, runtime in data["trial_data"]:
        meta, runtime = json.loads(meta), json.loads(runtime)
        out[meta["trial_id"]] = (meta["status"], runtime.get("last_result") or {})
    return out


@pytest.mark.slow
def test_search_end_to_end_survives_a_killed_driver(digits_cache, tmp_path):
    """4 trials, 2 at a time, 2 epochs, real Optuna + ASHA on the sample set, two of them at a huge lr.
    The driver is killed once a trial has ended; rerunning the same command completes the search
    without rerunning the ended trial, and the outputs hold the linear top-1 objective and the best
    params, with the bad trials recorded as diverged / collapsed (or stopped early) and the search going on."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "params": {"optim.base_lr": {"distribution": "loguniform", "low": 0.02, "high": 0.2},
                   "model.pred_dim": {"distribution": "choice", "values": [16, 32]}},
        "points_to_evaluate": [{"optim.base_lr": DIVERGING_LR, "model.pred_dim": 32},
                               {"optim.base_lr": COLLAPSING_LR, "model.pred_dim": 32},
                               {"optim.base_lr": 0.06, "model.pred_dim": 32}]}))
    out = tmp_path / "search"
    cmd = [sys.executable, "-m", "pipelines.search", "sample", "--space", str(space), "--trials", "4",
           "--max-concurrent", "2", "--out-dir", str(out), "--set", f"data.cache_dir={digits_cache}",
           "--address", "local"]  # a cluster of its own, whatever else runs on the host
    cmd += [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "driver1.log"
    with open(log, "wb") as f:
        driver = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        ended: dict = {}
        while True:
            assert driver.poll() is None, f"driver exited before it could be killed:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"no trial ended in time:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
            trials = _experiment_trials(out / S.EXPERIMENT)
            ended = {t for t, (st, r) in trials.items() if st == "TERMINATED" and r.get("status") in S.STATUSES}
            if ended and len(ended) < 4:  # killed mid-search, with a trial recorded as done
                break
    finally:
        # The driver, its local Ray cluster and every worker share the session's process group.
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    before = {t: (out / S.EXPERIMENT / t / "result.json").read_bytes() for t in ended}

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=480)
    assert rerun.returncode == 0, rerun.stdout[-4000:] + rerun.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed"] is True and summary["trials"] == 4
    assert summary["resources"]["released"], summary["resources"]
    for t, content in before.items():  # ended before the kill: not run again
        assert (out / S.EXPERIMENT / t / "result.json").read_bytes() == content

    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["status"] for r in rows} <= set(S.STATUSES)
    by_lr = {float(r["optim.base_lr"]): r for r in rows}
    diverged, collapsed = by_lr[DIVERGING_LR], by_lr[COLLAPSING_LR]
    assert diverged["status"] == "diverged" and "loss became" in diverged["reason"], diverged
    # Collapsed by the guard - unless ASHA stopped it first, at its first epoch's weak kNN.
    assert collapsed["status"] in ("collapsed", "stopped_early"), collapsed
    assert "collapsed" in collapsed["reason"] or "stopped by ASHA" in collapsed["reason"]
    assert diverged["objective"] == collapsed["objective"] == ""
    done = [r for r in rows if r["status"] == "finished"]
    assert done and all(0.0 <= float(r["objective"]) <= 100.0 for r in done)
    best = max(done, key=lambda r: float(r["objective"]))
    cfg = C.load(str(out / "best.yaml"))
    assert cfg.optim.base_lr == pytest.approx(float(best["optim.base_lr"]))
    assert cfg.model.pred_dim == int(best["model.pred_dim"])
    assert summary["best"]["objective"] == pytest.approx(float(best["objective"]))
    assert cfg.train.epochs == 2 and cfg.train.knn_every == C.load("sample").train.knn_every
    assert (out / "plots" / "optimization_history.png").read_bytes()[:4] == b"\x89PNG"
    for r in done:  # per-trial TensorBoard logs
        assert list(Path(r["tensorboard"]).glob("events.out.tfevents.*")), r["tensorboard"]
    # The Optuna study in the experiment directory holds every finished trial's objective. (A PRUNED
    # trial's value is its last intermediate value, the kNN: Optuna's rule.)
    values = sorted(t.value for t in S.load_study(out / S.EXPERIMENT).trials if t.state.name == "COMPLETE")
    assert values == sorted(float(r["objective"]) for r in done)
    assert "[simsiam] ASHA: grace 1 of 2 epochs (a quarter of the epochs, rounded up)" in rerun.stdout
    assert summary["asha"]["rungs"] == [1]

    # The journal, opened with optuna's own JournalStorage, links every trial: Optuna number <-> Tune id,
    # Tune's trial directory and the status trials.csv gives.
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name="simsiam-search", storage=JournalStorage(
        JournalFileBackend(str(out / S.EXPERIMENT / "optuna_journal.log"))))
    by_number = {t.number: t for t in study.trials}
    assert {r["trial_id"] for r in rows} <= {t.user_attrs.get("tune_trial_id") for t in study.trials}
    for r in rows:
        t = by_number[int(r["optuna_trial"])]
        assert t.user_attrs["tune_trial_id"] == r["trial_id"] and t.user_attrs["status"] == r["status"], (r, t)
        assert t.user_attrs["tune_trial_dir"] == r["path"] and Path(r["path"]).is_dir()
        # TensorBoard, read with tensorboard's EventAccumulator, has every epoch the trial reported to
        # Tune (result.json) - stopped, collapsed, diverged and resumed trials included.
        results = [json.loads(line) for line in (Path(r["path"]) / "result.json").read_text().splitlines()]
        reported = {d["epoch"] for d in results if "epoch" in d}
        logged = _tensorboard_steps(Path(t.user_attrs["run_dir"]) / "tensorboard", "epoch/loss")
        assert reported <= set(logged), (r["trial_id"], r["status"], reported, logged)
        if r["status"] == "stopped_early":
            assert reported and t.intermediate_values, (r, t.intermediate_values)






def _tensorboard_steps(logdir: Path, tag: str) -> list[int]:
    """The steps of scalar ``tag`` in a TensorBoard log directory, read with tensorboard's EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not logdir.is_dir():
        return []
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return sorted({e.step for e in acc.Scalars(tag)}) if tag in acc.Tags()["scalars"] else []


def _toy_trial(config: dict) -> None:
    """A trial shaped like run_trial, with a TorchTrainer whose 'kNN' is 100 x lr: which trial ASHA
    stops is known in advance, and it is stopped while its train worker is busy."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    lr, flag = config["optim.base_lr"], Path(config["flag"])

    def loop(cfg):
        from simsiam.train import TensorBoardSync

        tb = TensorBoardSync(ray.train.get_context().get_storage())  # as the real train loop logs
        for epoch in range(1, 4):
            if cfg["lr"] < 0.1 and epoch == 1:
                # The weak trial reaches the first rung only after the strong one is recorded there.
                while not flag.exists():
                    time.sleep(0.2)
                time.sleep(1.0)
            time.sleep(0.6)
            tb.scalars({"epoch/knn_top1": 100 * cfg["lr"]}, epoch)
            tb.sync()
            ray.train.report({"epoch": epoch, "knn_top1": 100 * cfg["lr"], "step": 3 * epoch})
            if cfg["lr"] >= 0.1 and epoch == 1:
                flag.touch()

    trainer = TorchTrainer(
        loop, train_loop_config={"lr": lr},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name=ray.tune.get_context().get_trial_id(),
                                       storage_path=config["storage"], callbacks=[TuneReportCallback()]))
    trainer.fit()
    ray.tune.report({"status": "finished", "reason": "", S.OBJECTIVE: 100 * lr, "epochs_completed": 3})


@pytest.mark.slow
def test_asha_stops_weak_trials_and_their_torchtrainers_release_everything(ray_local, tmp_path):
    """The known weak spot of Tune + Train V2: a stopped trial's TorchTrainer (controller, workers,
    placement group) must not outlive it. Checked on the live cluster after the search."""
    from pipelines.search import make_scheduler

    space = S.parse_space({"params": {"optim.base_lr": {"distribution": "loguniform", "low": 0.01, "high": 0.5}},
                           "points_to_evaluate": [{"optim.base_lr": v} for v in (0.5, 0.01)]})
    exp = tmp_path / S.EXPERIMENT
    exp.mkdir()

    def tune_config():
        return ray.tune.TuneConfig(search_alg=S.make_searcher(space, exp, seed=0, epochs=3),
                                   scheduler=make_scheduler(3, 1, 2), num_samples=2, max_concurrent_trials=2,
                                   trial_dirname_creator=S.trial_dirname)

    trainable = ray.tune.with_resources(ray.tune.with_parameters(_toy_trial), {"CPU": S.TRIAL_CPU})
    grid, resumed = S.fit(tmp_path, trainable, tune_config, strict_metrics=False,
                          param_space={"storage": str(tmp_path / "runs"), "flag": str(tmp_path / "rung1")})
    records = S.collect_results(grid, 3)
    assert released_within(ray.cluster_resources(), 15.0)  # during the run, not by the final sweep
    assert not resumed and len(records) == 2
    by_lr = {r.params["optim.base_lr"]: r for r in records}
    assert by_lr[0.01].status == "stopped_early", [(r.params, r.status, r.reason) for r in records]
    assert by_lr[0.01].epochs_completed == 1 and by_lr[0.01].objective is None
    assert by_lr[0.5].status == "finished" and by_lr[0.5].objective == pytest.approx(50.0)
    # Optuna saw the final objective of finished trials and a pruned state for stopped ones, each Optuna
    # trial linked to its Tune trial, with the kNN per epoch as intermediate values.
    study = S.load_study(exp)
    by = {t.params["optim.base_lr"]: t for t in study.trials}
    assert by[0.5].state.name == "COMPLETE" and by[0.01].state.name == "PRUNED"
    assert max(t.value for t in study.trials if t.value is not None) == pytest.approx(50.0)
    assert {lr: t.user_attrs["tune_trial_id"] for lr, t in by.items()} == {lr: r.trial_id for lr, r in by_lr.items()}
    assert by[0.01].user_attrs["status"] == "stopped_early" and by[0.5].user_attrs["status"] == "finished"
    assert by[0.01].user_attrs["tune_trial_dir"] == str(exp.resolve() / by_lr[0.01].trial_id)
    assert by[0.01].intermediate_values == {1: pytest.approx(1.0)}
    # The stopped trial's TensorBoard, read with TensorBoard's own reader, has the epoch it reported
    # just before Tune stopped it (an asynchronous writer could lose it: the actor died with its queue).
    # It may also hold the next epoch, logged before the stop reached the worker and never reported.
    for lr_, reported in ((0.01, {1}), (0.5, {1, 2, 3})):
        logged = _tensorboard_steps(tmp_path / "runs" / by_lr[lr_].trial_id / "tensorboard", "epoch/knn_top1")
        assert reported <= set(logged), (lr_, logged)


@pytest.mark.slow
def test_search_on_s3_resumes_from_object_storage_alone_after_its_driver_is_killed(digits_cache, s3_bucket, tmp_path):
    """Fault (b) of object storage: a search with run.storage_path on a real S3 endpoint (moto) is
    killed once a trial has ended; the rerun, on "another machine" (the first --out-dir deleted, a new
    one given), resumes from the bucket alone: the Tune experiment and the published Optuna journal.
    Both trials finish once, the ended one is not run again, and the journal on S3 holds every trial."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"params": {"optim.base_lr": {"distribution": "loguniform", "low": 0.02,
                                                                  "high": 0.2}}}))
    storage = f"{s3_bucket}/store"
    tune_exp = sio.join(storage, f"search-{C.load('sample').run.name}", S.EXPERIMENT)
    journal_copy = sio.join(tune_exp, S.STUDY_FILE)
    tiny = {**TINY, "eval.linear.epochs": 2, "run.storage_path": storage, "data.cache_dir": digits_cache}

    def cmd(out: Path) -> list[str]:
        return ([sys.executable, "-m", "pipelines.search", "sample", "--space", str(space), "--trials", "2",
                 "--max-concurrent", "1", "--out-dir", str(out), "--address", "local"]
                + [a for k, v in tiny.items() for a in ("--set", f"{k}={v}")])

    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    first, log = tmp_path / "machine-a", tmp_path / "driver1.log"
    with open(log, "wb") as f:
        driver = subprocess.Popen(cmd(first), cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.time() + 240
        while True:
            assert driver.poll() is None, f"driver exited before it could be killed:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"no trial ended in time:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
            trials = _experiment_trials(tune_exp)
            ended = {t for t, (st, r) in trials.items() if st == "TERMINATED" and r.get("status") in S.STATUSES}
            if ended and len(ended) < 2:
                break
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    assert sio.exists(journal_copy), "the Optuna journal was not published while the search ran"
    before = {t: sio.read_bytes(sio.join(tune_exp, t, "result.json")) for t in ended}
    shutil.rmtree(first)  # nothing of the first machine's local directory is left to resume from

    second = tmp_path / "machine-b"
    rerun = subprocess.run(cmd(second), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-4000:] + rerun.stderr[-4000:]
    assert "Optuna journal fetched from" in rerun.stdout, rerun.stdout[-3000:]
    summary = json.loads((second / "summary.json").read_text())
    assert summary["resumed"] is True and summary["trials"] == 2 and summary["experiment"] == tune_exp
    for t, content in before.items():  # ended before the kill: not run again
        assert sio.read_bytes(sio.join(tune_exp, t, "result.json")) == content

    with open(second / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {r["status"] for r in rows} <= set(S.STATUSES) - {"failed"}, rows
    # The experiment on S3 holds the same two Tune trials, the one ended before the kill among them:
    # the rerun continued the experiment rather than starting trials afresh.
    ids = {r["trial_id"] for r in rows}
    assert len(ids) == 2 and set(before) <= ids and set(_experiment_trials(tune_exp)) == ids, (rows, before)
    assert all(r["path"] == sio.join(tune_exp, r["trial_id"]) for r in rows), rows  # a URI, not bucket/key

    # The journal on S3, alone, holds the whole search: each Tune trial in exactly one Optuna trial that
    # ran (besides any asked for by the killed driver and failed as never run), with trials.csv's status.
    local = tmp_path / "journal"
    local.mkdir()
    (local / S.STUDY_FILE).write_bytes(sio.read_bytes(journal_copy))
    study = S.load_study(local)
    ran = [t for t in study.trials if "never run" not in t.user_attrs.get("reason", "")]
    assert sorted(t.user_attrs["tune_trial_id"] for t in ran) == sorted(r["trial_id"] for r in rows), study.trials
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in ran), [t.state for t in ran]
    by_number = {t.number: t for t in ran}
    for r in rows:
        t = by_number[int(r["optuna_trial"])]
        assert t.user_attrs["tune_trial_id"] == r["trial_id"] and t.user_attrs["status"] == r["status"], (r, t)
        assert t.user_attrs["tune_trial_dir"] == sio.join(tune_exp, r["trial_id"])
    assert not any(t.state.name == "RUNNING" for t in study.trials)
