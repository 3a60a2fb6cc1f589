"""Pretraining across several Ray nodes on one machine (ray.cluster_utils.Cluster): DDP over two
nodes, and an elastic run that loses a node and carries on with the workers left."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from simsiam.data import resolve_paths
from simsiam.run import RunSpec
from simsiam.train import pretrain
from tests.conftest import free_port, start_local_ray, tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes():
    """One two-node cluster for the module (each start costs ~10 s). The elastic test removes the worker
    node, so it comes last in this file."""
    # Right after a node dies Ray still counts its CPUs for a moment, so Train's first restart may ask for
    # two workers again; a short start timeout makes that attempt give up quickly and retry with one.
    saved = os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S")
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "15"
    shared = ray.is_initialized()  # the session's one-node cluster (conftest.ray_local): set it aside
    ray.shutdown()
    # One CPU per node and 0.75 CPU per train worker: each node holds exactly one worker (plus 0.25 CPU
    # for Ray Data), so losing a node must shrink the run. Fast health checks notice a dead node in ~3 s.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": free_port(),
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()
    if saved is None:
        os.environ.pop("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", None)
    else:
        os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = saved
    if shared:
        start_local_ray()


def test_ddp_spans_two_nodes(two_nodes, digits_cache, tmp_path):
    cfg = tiny_config(digits_cache, **{"train.num_workers": 2, "train.placement_strategy": "SPREAD",
                                       "train.cpus_per_worker": 0.75, "data.data_cpus": 0.25,
                                       "run.name": "twonodes"})
    res = pretrain(RunSpec(cfg, *resolve_paths(cfg.data), str(tmp_path)), check_replicas=True)
    assert res.status == "finished", res.reason
    assert len({r["node_id"] for r in res.replicas}) == 2
    assert res.replicas[0]["param_hash"] == res.replicas[1]["param_hash"]


def test_elastic_run_continues_after_losing_a_node(two_nodes, digits_cache, tmp_path):
    cluster, worker = two_nodes
    cfg = tiny_config(digits_cache, **{"train.num_workers": 2, "train.min_workers": 1,
                                       "train.placement_strategy": "SPREAD", "train.epochs": 4,
                                       "train.cpus_per_worker": 0.75, "data.data_cpus": 0.25,
                                       "train.max_steps_per_epoch": 5, "train.max_failures": 3,
                                       "run.name": "elastic"})

    def drop_node():
        run_dir = Path(tmp_path, "elastic")
        deadline = time.time() + 120
        # The second checkpoint's folder appearing means the first one is committed: resume starts after it.
        while time.time() < deadline and len(list(run_dir.glob("checkpoint_*"))) < 2:
            time.sleep(0.2)
        cluster.remove_node(worker, allow_graceful=False)

    th = threading.Thread(target=drop_node, daemon=True)
    th.start()
    res = pretrain(RunSpec(cfg, *resolve_paths(cfg.data), str(tmp_path)))
    th.join(timeout=5)
    assert res.status == "finished", res.reason
    assert [h.epoch for h in res.history] == [1, 2, 3, 4]
    sizes = [h.world_size for h in res.history]
    assert sizes[0] == 2 and sizes[-1] == 1, sizes
    # The lr follows the global batch of the live workers (per-worker batch fixed at 32).
    assert res.history[-1].global_batch == 32
