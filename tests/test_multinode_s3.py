"""Two Ray nodes that share nothing but the S3 endpoint: data, checkpoints, TensorBoard and results all on
s3://, and each node with its own temp directory, TMPDIR and working directory, so that no byte can
travel through a local path that happens to exist on both (on one machine every path does)."""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from simsiam.data.cli import main as data_main
from tests.conftest import free_port, start_local_ray, tiny_config

pytestmark = pytest.mark.slow

# What a run writes; none of it may land on a node's local disk when everything lives on s3://.
RUN_ARTIFACTS = ("checkpoint.pt", "results.json", ".parquet", "tfevents")


@contextlib.contextmanager
def _cwd(path: Path):
    home = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(home)


@pytest.fixture(scope="module")
def isolated_nodes():
    """A head and a worker node, one CPU each, each started from its own working directory with its own
    Ray temp dir and TMPDIR (its raylet passes both on to every worker process it spawns)."""
    shared = ray.is_initialized()  # the session's one-node cluster (conftest.ray_local): set it aside
    ray.shutdown()
    # Short paths: Ray's socket names live under the temp dir and Unix sockets allow ~107 characters
    # (under pytest's tmp_path the dashboard's module sockets do not fit).
    base = Path(tempfile.mkdtemp(prefix="sim2n-", dir="/tmp"))
    dirs = {}
    for name in ("head", "worker"):
        d = dirs[name] = base / name
        (d / "tmp").mkdir(parents=True)
        (d / "cwd").mkdir()
    node_args = {name: {"num_cpus": 1, "temp_dir": str(d / "tmp" / "ray"), "env_vars": {"TMPDIR": str(d / "tmp")}}
                 for name, d in dirs.items()}
    with _cwd(dirs["head"] / "cwd"):
        cluster = Cluster(initialize_head=True, head_node_args={
            **node_args["head"], "include_dashboard": True, "dashboard_host": "127.0.0.1",
            "dashboard_port": free_port()})
    with _cwd(dirs["worker"] / "cwd"):
        cluster.add_node(**node_args["worker"])
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield dirs
    ray.shutdown()
    cluster.shutdown()
    shutil.rmtree(base, ignore_errors=True)
    if shared:
        start_local_ray()


@ray.remote(num_cpus=0)
def _where() -> tuple[str, str]:
    return os.getcwd(), tempfile.gettempdir()


def _local_artifacts(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and any(a in p.name for a in RUN_ARTIFACTS))


def test_run_across_two_nodes_with_everything_on_s3(isolated_nodes, s3, digits_cache, tmp_path):
    from pipelines.pretrain_eval import run

    # The nodes really are apart: each worker process runs in its node's own directories.
    seen = ray.get([_where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                    .remote() for n in ray.nodes() if n["Alive"]])
    want = {(str(d / "cwd"), str(d / "tmp")) for d in isolated_nodes.values()}
    assert set(seen) == want, seen

    data = s3.create_bucket("two-nodes-data") + "/digits"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = data_main(["convert", "--builtin", "digits", data, "--quiet"])
    assert rc == 0, err.getvalue()
    storage = s3.create_bucket("two-nodes-runs") + "/ray"
    # One worker per node (0.75 + 0.25 CPU for Ray Data on each one-CPU node): a world of two spans both.
    cfg = tiny_config(digits_cache, **{
        "data.path": data + "/train", "data.eval_path": data + "/test", "run.storage_path": storage,
        "run.name": "apart", "train.num_workers": 2, "train.placement_strategy": "SPREAD",
        "train.cpus_per_worker": 0.75, "data.data_cpus": 0.25})
    res = run(cfg, tmp_path / "out")

    assert res["status"] == "finished", res["reason"]
    assert [h["epoch"] for h in res["history"]] == [1, 2]
    assert {h["world_size"] for h in res["history"]} == {2}
    assert res["checkpoint"].startswith(storage + "/apart/checkpoint_")
    assert res["run_path"] == storage + "/apart" and res["tensorboard"] == storage + "/apart/tensorboard"
    assert res["linear_top1"] is not None
    keys = s3.keys_of(storage + "/apart")
    assert "ray/apart/results.json" in keys
    assert any(k.endswith("/checkpoint.pt") for k in keys) and any("tfevents" in k for k in keys), keys
    # Nothing of the run on either node's disk: checkpoints were staged and uploaded, then removed.
    for name, d in isolated_nodes.items():
        assert _local_artifacts(d) == [], (name, _local_artifacts(d))
