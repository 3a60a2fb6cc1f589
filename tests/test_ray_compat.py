"""Each workaround in simsiam.ray_compat still works on the installed Ray (run these first after a Ray
upgrade): the version pin, the Ray Data ones on a real local Ray cluster, the Ray Train ones."""
from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from simsiam import ray_compat

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
