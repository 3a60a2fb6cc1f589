"""Each workaround in simsiam.ray_compat still works on the installed Ray (run these first after a Ray
upgrade): the version pin, the Ray Data ones on a real local Ray cluster, the Ray Train ones, and the
Ray Tune ones (placement groups of stopped trials on a real local cluster, ASHA's rungs)."""
from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from simsiam import ray_compat
from tests.cluster_checks import released_within

# --------------------------------------------------------------------------- version pin


def test_installed_ray_is_the_pinned_version():
    assert ray_compat.ray_version_matches(), (
        f"Ray {ray.__version__} installed, workarounds pinned to {ray_compat.RAY_PINNED}")


def test_version_check_warns_only_for_another_major_minor():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ray_compat.check_ray_version("2.60.3")
    with pytest.warns(ray_compat.RayVersionWarning, match=r"pinned to Ray 2\.60, but Ray 2\.61\.0"):
        ray_compat.check_ray_version("2.61.0")
    with pytest.warns(ray_compat.RayVersionWarning):
        ray_compat.check_ray_version("3.0.0")


# --------------------------------------------------------------------------- Ray Data


def _shards(tmp_path, n: int) -> list[str]:
    paths = []
    for i in range(n):
        paths.append(str(tmp_path / f"s{i}.parquet"))
        pq.write_table(pa.table({"x": np.arange(10) + 10 * i}), paths[-1])
    return paths


def _paths_per_block(ds: ray.data.Dataset) -> list[frozenset[str]]:
    blocks = ray.get(ds.materialize().to_arrow_refs())
    return [frozenset(b["path"].to_pylist()) for b in blocks]


@pytest.mark.usefixtures("ray_local")
def test_parquet_reader_v1_reads_one_task_per_file(tmp_path):
    files = _shards(tmp_path, 4)
    ctx = ray.data.DataContext.get_current()
    saved = ctx.use_datasource_v2
    ctx.use_datasource_v2 = True  # Ray 2.60's default, whatever RAY_DATA_USE_DATASOURCE_V2 says here
    try:
        with ray_compat.parquet_reader_v1():
            v1 = ray.data.read_parquet(files, include_paths=True)
        assert ctx.use_datasource_v2 is True  # the caller's setting is back
        # One read task per file: each file its own block, no block mixing files.
        assert sorted(_paths_per_block(v1), key=sorted) == [frozenset([f]) for f in files]
        # What it works around: the default reader packs the small files into one read task.
        packed = _paths_per_block(ray.data.read_parquet(files, include_paths=True))
        assert len(packed) < len(files) and any(len(p) > 1 for p in packed)
    finally:
        ctx.use_datasource_v2 = saved


def _with_execution_index(batch: dict) -> dict:
    return {"idx": np.full(len(batch["x"]), ray_compat.execution_index())}


@pytest.mark.usefixtures("ray_local")
def test_execution_index_counts_executions_of_one_dataset():
    ds = ray.data.range(40, override_num_blocks=4).rename_columns({"id": "x"}).map_batches(_with_execution_index)
    seen = [{int(r["idx"]) for r in ds.take_all()} for _ in range(3)]
    # Constant within one execution (every task agrees), one more per execution: an epoch counter.
    assert seen == [{0}, {1}, {2}]


# --------------------------------------------------------------------------- Ray Train


def test_disable_preemption_watcher_sets_the_switch_ray_train_reads(monkeypatch):
    from ray._private import ray_constants
    from ray.train.v2._internal import constants
    from ray.train.v2._internal.execution.controller import controller

    monkeypatch.delenv(ray_compat.PREEMPTION_WATCHER_ENV, raising=False)
    ray_compat.disable_preemption_watcher()
    # The controller decides with exactly this read; the variable reaches the workers too.
    assert controller.ENABLE_PREEMPTION_WATCHER_ENV_VAR == ray_compat.PREEMPTION_WATCHER_ENV
    assert ray_constants.env_bool(controller.ENABLE_PREEMPTION_WATCHER_ENV_VAR,
                                  controller.DEFAULT_ENABLE_PREEMPTION_WATCHER) is False
    assert ray_compat.PREEMPTION_WATCHER_ENV in constants.ENV_VARS_TO_PROPAGATE
    # A user's own setting is kept.
    monkeypatch.setenv(ray_compat.PREEMPTION_WATCHER_ENV, "1")
    ray_compat.disable_preemption_watcher()
    assert ray_constants.env_bool(ray_compat.PREEMPTION_WATCHER_ENV, False) is True


# --------------------------------------------------------------------------- Ray Tune


def test_placement_groups_of_killed_creators_are_orphaned_and_reaped(ray_local):
    """A group whose creating actor was killed (as a stopped trial's TorchTrainer controller is) is
    listed, and the search's safety net removes it; groups of live creators and of the driver are left
    alone. What it works around: Ray's public table does not say who created a group."""
    import time

    from ray.util import placement_group, placement_group_table, remove_placement_group

    from simsiam import search as S

    @ray.remote(num_cpus=0)
    class Creator:
        def make(self) -> str:
            pg = placement_group([{"CPU": 0.5}])
            ray.get(pg.ready())
            return pg.id.hex()

    doomed, alive = Creator.remote(), Creator.remote()
    doomed_pg, alive_pg = ray.get(doomed.make.remote()), ray.get(alive.make.remote())
    own = placement_group([{"CPU": 0.25}])
    ray.get(own.ready())
    assert not any("creator" in key for key in placement_group_table()[doomed_pg])
    ray.kill(doomed)
    deadline = time.time() + 20
    while doomed_pg not in {p.id.hex() for p in ray_compat.orphaned_placement_groups()}:
        assert time.time() < deadline, "the killed creator's group was never listed as orphaned"
        time.sleep(0.3)
    assert {p.id.hex() for p in ray_compat.orphaned_placement_groups()} == {doomed_pg}
    assert S.reap_orphaned_placement_groups() == 1
    table = placement_group_table()
    assert table[doomed_pg]["state"] == "REMOVED"
    assert table[alive_pg]["state"] == "CREATED" and table[own.id.hex()]["state"] == "CREATED"
    ray.kill(alive)
    remove_placement_group(own)
    deadline = time.time() + 20
    while S.reap_orphaned_placement_groups() == 0 and time.time() < deadline:
        time.sleep(0.3)
    assert released_within(ray.cluster_resources(), 10.0)


def test_asha_rungs_are_the_milestones_asha_stops_trials_at():
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

    sched = ASHAScheduler(time_attr="epoch", metric="knn", mode="max", max_t=14, grace_period=4,
                          reduction_factor=2, stop_last_trials=False)
    assert ray_compat.asha_rungs(sched) == [4, 8] and ray_compat.asha_rungs(FIFOScheduler()) == []

    class Trial:  # what ASHA reads of a trial
        def __init__(self, tid: str):
            self.trial_id, self.config = tid, {}

    # Behaviour behind the numbers: at rung 4 the weaker of two trials stops, at epoch 3 none does.
    good, weak = Trial("good"), Trial("weak")
    for t in (good, weak):
        sched.on_trial_add(None, t)
    assert sched.on_trial_result(None, weak, {"epoch": 3, "knn": 1.0}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, good, {"epoch": 4, "knn": 50.0}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, weak, {"epoch": 4, "knn": 1.0}) == TrialScheduler.STOP


def test_optuna_search_keeps_its_trials_where_the_accessors_read_them(tmp_path):
    """OptunaSearch's private per-trial state, read by LinkedOptunaSearch through ray_compat: the live
    Optuna trial of a Tune trial, whether it was told, and the journal a restored searcher writes to."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from ray.tune.search.optuna import OptunaSearch

    first, second = tmp_path / "first.log", tmp_path / "second.log"
    searcher = OptunaSearch({"x": optuna.distributions.FloatDistribution(0.0, 1.0)}, metric="m", mode="max",
                            study_name="s", storage=JournalStorage(JournalFileBackend(str(first))))
    assert ray_compat.optuna_trial(searcher, "t1") is None
    config = searcher.suggest("t1")
    trial = ray_compat.optuna_trial(searcher, "t1")
    assert isinstance(trial, optuna.Trial) and trial.params == config
    trial.set_user_attr("tune_trial_id", "t1")
    assert not ray_compat.optuna_trial_completed(searcher, "t1")
    searcher.on_trial_complete("t1", {"m": 0.5})
    assert ray_compat.optuna_trial_completed(searcher, "t1")

    first.rename(second)  # as if restored on another machine, whose local copy of the journal is here
    assert ray_compat.repoint_optuna_journal(searcher, str(second))
    searcher.suggest("t2")
    study = optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(second))))
    assert [t.user_attrs.get("tune_trial_id") for t in study.trials] == ["t1", None]
    assert study.trials[0].value == 0.5 and not first.exists()
    assert not ray_compat.repoint_optuna_journal(object(), str(second))
