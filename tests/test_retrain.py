"""Scheduled retraining (pipelines/retrain.py, simsiam/registry/) on a real local Ray cluster.

The source of new data is a directory of datasets converted from chunks of the digits train split
(one per "day"); the held-out set is the built-in test split and the linear classifier is always
fitted on the full built-in train split, so scores compare across runs.

The Ray part is one story, run once per module by the ``story`` fixture (each Ray Train run costs tens
of seconds on 2 cores): first run -> promoted; rerun -> nothing to do; a run killed mid-training; the
rerun after it, warm-started -> promoted; a failed run; a run short of the margin -> not promoted. Each
test asserts on one chapter. The registry's crash
safety (journal roll-forward, lock, scan) is also tested directly, without Ray.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from simsiam import config as C
from simsiam import io as sio
from simsiam.data.convert import convert, digits_split
from simsiam.data.schema import DataError
from simsiam.registry import Registry, RegistryBusy, RegistryError, scan_source
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parent.parent
N_CHUNKS = 5


# ----------------------------------------------------------------------------------------- helpers


def add_chunk(src: Path, work: Path, i: int) -> Path:
    """Convert chunk ``i`` of the digits train split into ``src/day{i}`` (a new day's data)."""
    images, labels, _ = digits_split()["train"]
    idx = np.array_split(np.arange(len(images)), N_CHUNKS)[i]
    npz = work / f"chunk{i}.npz"
    np.savez(npz, images=images[idx], labels=labels[idx], class_names=np.array([str(k) for k in range(10)]))
    convert(npz, src / f"day{i}", workers=1)
    return src / f"day{i}"


def retrain_config(cache: str, src: Path, **overrides) -> C.Config:
    base = {"data.path": str(src), "data.eval_path": f"{cache}/digits/test",
            "retrain.eval_train_path": f"{cache}/digits/train", "train.epochs": 1}
    return tiny_config(cache, **{**base, **overrides})


def snapshot(reg: Path) -> dict:
    """The registry's shared state, byte for byte: pointer, manifest and every model file."""
    def read(p: Path) -> bytes | None:
        return p.read_bytes() if p.exists() else None

    models = {str(p.relative_to(reg)): hashlib.sha256(p.read_bytes()).hexdigest()
              for p in sorted((reg / "models").rglob("*")) if p.is_file()}
    return {"promoted": read(reg / "promoted.json"), "manifest": read(reg / "manifest.json"), "models": models}


def temp_files(reg: Path) -> list[Path]:
    """Leftovers of interrupted writes, outside Ray's own storage."""
    return [p for p in reg.rglob("*") if p.name.endswith(".tmp") and "ray" not in p.relative_to(reg).parts]


def run_main(argv: list[str]) -> tuple[int, str]:
    from pipelines.retrain import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv, prog="simsiam retrain")
    return rc, out.getvalue() + err.getvalue()


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (Ray puts its workers in their own process groups)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_when_training(cmd: list[str], reg: Path, log: Path, address: str, timeout: float = 420) -> None:
    """Start the retrain CLI in its own session on the Ray cluster at ``address``; SIGKILL it and
    everything it started once its run's first training checkpoint exists (pretraining is under way)."""
    old = {p.name for p in (reg / "runs").iterdir()}

    def started() -> bool:
        return any(p.name not in old and list(p.glob("ray/*/checkpoint_*")) for p in (reg / "runs").iterdir())

    env = {**os.environ, "RAY_ADDRESS": address, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    ours: set[int] = set()
    try:
        deadline = time.monotonic() + timeout
        while not started():
            if proc.poll() is not None:
                raise AssertionError(f"retrain exited ({proc.returncode}) before training:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no training checkpoint after {timeout} s:\n{log.read_text()[-3000:]}")
            ours |= _descendants(proc.pid)
            time.sleep(0.2)
        ours |= _descendants(proc.pid)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # Anything it started outside its process group must go too (none is expected on a shared cluster).
        deadline = time.monotonic() + 60
        while any(_alive(p) for p in ours) and time.monotonic() < deadline:
            time.sleep(0.5)
        for p in ours:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


# ----------------------------------------------------------------------------------------- the Ray story




@pytest.fixture(scope="module")
def story(ray_local, digits_cache, tmp_path_factory) -> dict:
    from pipelines.retrain import retrain

    work = tmp_path_factory.mktemp("retrain")
    src, reg = work / "incoming", work / "registry"
    cache = digits_cache
    s: dict = {"work": work, "src": src, "reg": reg, "cache": cache}

    def quiet(msg: str) -> None:
        s.setdefault("log", []).append(msg)
        print(msg, flush=True)

    # 1. first run on day 0: promoted (kNN on, so eval_dataset also reads the shard list)
    add_chunk(src, work, 0)
    s["first"] = retrain(retrain_config(cache, src, **{"train.knn_every": 1}), reg, log=quiet)
    s["after_first"] = snapshot(reg)

    # 2. no new data: nothing to do, in a fresh interpreter so we can see it never loaded Ray or torch
    probe = ("import json, sys; from pipelines.retrain import main; "
             f"rc = main([{str(work / 'cfg.yaml')!r}, '--registry', {str(reg)!r}]); "
             "print(json.dumps({'rc': rc, 'ray': 'ray' in sys.modules, 'torch': 'torch' in sys.modules}))")
    C.dump(retrain_config(cache, src), work / "cfg.yaml")
    p = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"})  # any Ray contact would fail
    s["noop"] = {"stdout": p.stdout, "stderr": p.stderr, **json.loads(p.stdout.strip().splitlines()[-1])}
    s["after_noop"] = snapshot(reg)

    # 3. day 1 arrives; a dry run only reports it
    add_chunk(src, work, 1)
    s["dry"] = run_main([str(work / "cfg.yaml"), "--registry", str(reg), "--dry-run"])
    s["after_dry"] = snapshot(reg)

    # 4. a run killed mid-training (enough epochs that it is still training when killed). It joins this
    # module's Ray cluster, as a job's driver would; its job's actors die with it.
    import ray

    C.dump(retrain_config(cache, src, **{"train.epochs": 8}), work / "long.yaml")
    runs_before = {p.name for p in (reg / "runs").iterdir()}
    kill_when_training([sys.executable, "-m", "pipelines.retrain", str(work / "long.yaml"), "--registry", str(reg)],
                       reg, work / "killed.log", ray.get_runtime_context().gcs_address)
    (s["killed_id"],) = {p.name for p in (reg / "runs").iterdir()} - runs_before
    s["killed_record"] = json.loads((reg / "runs" / s["killed_id"] / "record.json").read_text())
    s["after_kill"] = snapshot(reg)
    s["temp_after_kill"] = temp_files(reg)

    # 5. the next scheduled run: recovers, retrains on day 1 warm-started; margin -1000 always promotes.
    # Its checkpoints go to a URI, as on a multi-node cluster (s3://...): the warm start is staged there.
    s["rerun"] = retrain(retrain_config(cache, src, **{"retrain.margin": -1000.0,
                                                       "run.storage_path": f"file://{work}/remote"}), reg, log=quiet)
    s["after_rerun"] = snapshot(reg)

    # 6. day 2 arrives with a shard corrupted in transfer (same size, garbage footer): the run fails and
    # its shards stay new; once the shard is repaired the next run takes them
    day2 = add_chunk(src, work, 2)
    shard = day2 / "part-00000.parquet"
    good = shard.read_bytes()
    shard.write_bytes(good[:-64] + b"\0" * 64)
    s["failed"] = run_main([str(work / "cfg.yaml"), "--registry", str(reg)])
    s["after_failed"] = snapshot(reg)
    shard.write_bytes(good)

    # 7. the next run trains on day 2 but cannot beat the promoted model by 1000 points; its linear
    # protocol differs from the one the promoted model was scored with, so that model is re-scored first
    C.dump(retrain_config(cache, src, **{"retrain.margin": 1000.0, "retrain.train_on": "new",
                                         "eval.linear.epochs": 6}), work / "strict.yaml")
    s["strict"] = run_main([str(work / "strict.yaml"), "--registry", str(reg)])
    s["after_strict"] = snapshot(reg)

    s["registry"] = Registry(reg)
    return s


def _manifest(snap: dict) -> dict:
    return json.loads(snap["manifest"])["shards"] if snap["manifest"] else {}


def _days(snap: dict) -> set[str]:
    return {Path(p).parent.name for p in _manifest(snap)}


@pytest.mark.slow
def test_first_run_promotes(story):
    out, reg = story["first"], story["reg"]
    assert out.decision == "promoted" and out.exit_code == 0, out.reason
    promoted = json.loads(story["after_first"]["promoted"])
    assert promoted["run_id"] == out.run_id and promoted["previous"] is None
    assert promoted["linear_top1"] == pytest.approx(out.linear_top1) and out.linear_top1 > 10.0
    model = reg / promoted["model"]
    assert model == reg / "models" / out.run_id and (model / "checkpoint.pt").is_file()
    meta = json.loads((model / "model.json").read_text())
    assert meta["sha256"] == hashlib.sha256((model / "checkpoint.pt").read_bytes()).hexdigest()
    assert _days(story["after_first"]) == {"day0"}
    rec = out.record
    assert rec["status"] == "completed" and rec["inputs"]["warm_start_from"] is None
    assert rec["metrics"]["knn_top1"] is not None  # the kNN bank read the run's shard list
    run_dir = reg / "runs" / out.run_id
    for name in ("config.yaml", "train.shards.json", "results.json", "record.json"):
        assert (run_dir / name).is_file(), name
    assert C.load(str(run_dir / "config.yaml")).run.name == out.run_id


@pytest.mark.slow
def test_rerun_without_new_data_does_nothing(story):
    noop = story["noop"]
    assert noop["rc"] == 0, noop["stderr"]
    assert "nothing to do" in noop["stdout"] and "no new shards" in noop["stdout"]
    assert not noop["ray"] and not noop["torch"], "a no-op run must not start Ray or load torch"
    assert story["after_noop"] == story["after_first"]
    rc, text = story["dry"]
    assert rc == 0 and "new: " in text and "day1" in text and "dry run - would train on" in text
    assert story["after_dry"] == story["after_first"]


@pytest.mark.slow
def test_killed_run_leaves_the_registry_consistent(story):
    reg = story["reg"]
    assert story["after_kill"] == story["after_first"], "the killed run changed the registry's state"
    assert story["temp_after_kill"] == []
    assert story["killed_record"]["status"] == "running"
    # The next run found it dead and said so; the old model is still in place, untouched.
    crashed = story["registry"].record(story["killed_id"])
    assert crashed["status"] == "crashed" and crashed["decision"] == "failed"
    assert any(story["killed_id"] in m and "crashed" in m for m in story["log"])
    first = story["first"].run_id
    for path, digest in story["after_first"]["models"].items():
        assert story["after_strict"]["models"][path] == digest
    assert (reg / "models" / first / "checkpoint.pt").is_file()


@pytest.mark.slow
def test_new_shards_trigger_warm_started_training(story):
    out, first = story["rerun"], story["first"].run_id
    assert out.decision == "promoted", out.reason
    rec = out.record
    assert rec["inputs"]["new_shards"] and all("/day1/" in p for p in rec["inputs"]["new_shards"])
    assert rec["inputs"]["train_on"] == "all" and rec["inputs"]["train_shards"] == len(_manifest(story["after_rerun"]))
    assert rec["inputs"]["warm_start_from"] == first
    # checkpoints on a URI: the promoted model was staged beside them for the workers, the new one copied back
    assert rec["inputs"]["init_checkpoint"] == f"file://{story['work']}/remote/{out.run_id}-init/{first}"
    assert rec["metrics"]["checkpoint"].startswith(f"file://{story['work']}/remote/{out.run_id}/checkpoint_")
    promoted = json.loads(story["after_rerun"]["promoted"])
    assert promoted["run_id"] == out.run_id and promoted["previous"] == first
    assert _days(story["after_rerun"]) == {"day0", "day1"}
    # both models kept: promotion never deletes or replaces a promoted model
    assert {Path(p).parts[1] for p in story["after_rerun"]["models"]} == {first, out.run_id}


@pytest.mark.slow
def test_failed_run_exits_nonzero_and_leaves_its_shards_new(story):
    rc, text = story["failed"]
    assert rc == 1, text
    assert "failed" in text
    assert story["after_failed"] == story["after_rerun"]
    failed = [r for r in story["registry"].runs() if r["status"] == "failed"]
    assert len(failed) == 1 and "not a readable Parquet file" in failed[0]["reason"]
    assert "day2/part-00000.parquet" in failed[0]["reason"]
    assert all("/day2/" in p for p in failed[0]["inputs"]["new_shards"])


@pytest.mark.slow
def test_worse_model_is_not_promoted(story):
    rc, text = story["strict"]
    assert rc == 0, text
    assert "not promoted" in text and "margin 1000" in text
    assert story["after_strict"]["models"] == story["after_rerun"]["models"]
    # the shards it trained on are used now (the run completed), so the next run will not redo them
    assert _days(story["after_strict"]) == {"day0", "day1", "day2"}
    (rec,) = [r for r in story["registry"].runs() if r["inputs"]["train_on"] == "new"]
    assert rec["decision"] == "not_promoted" and rec["inputs"]["train_on"] == "new"
    assert rec["inputs"]["train_shards"] == len(rec["inputs"]["new_shards"])
    assert rec["baseline"]["run_id"] == story["rerun"].run_id


@pytest.mark.slow
def test_a_changed_eval_protocol_rescores_the_promoted_model(story):
    (rec,) = [r for r in story["registry"].runs() if r["inputs"]["train_on"] == "new"]
    before, after = json.loads(story["after_rerun"]["promoted"]), json.loads(story["after_strict"]["promoted"])
    assert before["eval"]["linear"]["epochs"] == 5 and after["eval"]["linear"]["epochs"] == 6
    # same model, new score under the new protocol; the comparison used that score
    assert {k: after[k] for k in ("run_id", "model")} == {k: before[k] for k in ("run_id", "model")}
    assert after["linear_top1"] == rec["rebaseline"]["linear_top1"] == rec["baseline"]["linear_top1"]
    # an unchanged protocol is not re-scored: the rerun compared against the stored score
    assert "rebaseline" not in story["rerun"].record
    first_score = json.loads(story["after_first"]["promoted"])["linear_top1"]
    assert story["rerun"].record["baseline"]["linear_top1"] == first_score


@pytest.mark.slow
def test_ray_data_pipelines_read_a_shard_list(story):
    from simsiam.data.pipeline import dataset_info, eval_dataset, train_dataset

    lst = story["reg"] / "runs" / story["first"].run_id / "train.shards.json"
    rows = json.loads(lst.read_text())["rows"]
    cfg = retrain_config(story["cache"], story["src"])
    assert dataset_info(str(lst))["num_rows"] == rows
    assert train_dataset(cfg.data, str(lst), 0).count() == rows
    assert eval_dataset(cfg.data, str(lst)).count() == rows


# ----------------------------------------------------------------------------------------- registry, no Ray


@pytest.fixture(scope="module")
def day0(digits_cache, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("day0")
    return add_chunk(work / "src", work, 0)


def test_scan_takes_only_finished_conversions(day0, tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    for p in day0.iterdir():
        (src / "a" / p.name).write_bytes(p.read_bytes())
    (src / "unfinished").mkdir()
    (src / "unfinished" / "part-00000.parquet").write_bytes((day0 / "part-00000.parquet").read_bytes())
    (src / "unfinished" / "_simsiam.convert.json").write_text("{}")
    (src / ".hidden").mkdir()
    (src / ".hidden" / "part-00000.parquet").write_bytes(b"x")
    shutil.copytree(day0, src / "copying")
    shard = src / "copying" / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:100])  # metadata arrived before the whole shard
    scan = scan_source(str(src))
    assert {Path(s.path).parent.name for s in scan.shards} == {"a"}
    meta = json.loads((day0 / "_simsiam.json").read_text())
    assert scan.rows == meta["num_rows"] and len(scan.shards) == len(meta["shards"])
    notes = sorted(scan.notes)
    assert len(notes) == 2 and "copying" in notes[0] and "still being copied" in notes[0]
    assert "unfinished" in notes[1] and "an unfinished conversion" in notes[1]
    with pytest.raises(DataError, match="does not exist"):
        scan_source(str(tmp_path / "nope"))


@pytest.fixture(params=["local", "s3"])
def reg_root(request, tmp_path) -> str:
    """Where a registry lives: a local directory, or a prefix on the test S3 endpoint."""
    if request.param == "local":
        return str(tmp_path / "reg")
    return request.getfixturevalue("s3_bucket") + "/reg"


def test_a_rewritten_shard_counts_as_new(day0, tmp_path, reg_root):
    src = tmp_path / "src"
    shutil.copytree(day0, src / "day0")
    reg = Registry(reg_root)
    with reg.lock():
        reg.init()
        scan = scan_source(str(src))
        reg.commit("r1", {"run_id": "r1", "decision": "not_promoted"}, used=scan.shards)
        assert reg.new_shards(scan.shards) == ([], [])
        target = scan.shards[0]
        st = os.stat(target.path)
        os.utime(target.path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten in place
        fresh, changed = reg.new_shards(scan_source(str(src)).shards)
        assert fresh == [] and [s.path for s in changed] == [target.path]
        assert reg.record("r1")["status"] == "completed"


def test_lock_keeps_a_second_run_out(digits_cache, reg_root):
    reg = Registry(reg_root)
    with reg.lock():
        with pytest.raises(RegistryBusy, match=f"pid.*{os.getpid()}"):
            with Registry(reg_root).lock():
                pass
        rc, text = run_main(["sample", "--registry", reg_root, "--set", f"data.cache_dir={digits_cache}"])
        assert rc == 3 and "another retrain holds the registry" in text
    with reg.lock():  # released on exit
        pass


def test_two_retrains_racing_for_the_lock_one_loses_cleanly(reg_root):
    """Two runs start at the same instant: exactly one holds the registry, the other gets RegistryBusy
    and changes nothing; after the winner ends, the registry is free again."""
    barrier = threading.Barrier(2)
    results: dict[int, str] = {}
    held = threading.Event()

    def run(i: int) -> None:
        reg = Registry(reg_root)
        barrier.wait()
        try:
            with reg.lock():
                results[i] = "won"
                reg.init()
                held.wait(5)  # hold it until the other has tried
        except RegistryBusy as e:
            results[i] = f"busy: {e}"
            held.set()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(v.split(":")[0] for v in results.values()) == ["busy", "won"], results
    assert "another retrain" in next(v for v in results.values() if v.startswith("busy"))
    with Registry(reg_root).lock():
        pass


def test_an_expired_lease_is_taken_over_and_its_holder_commits_nothing(s3_bucket):
    """Object store only: a run whose lease expired (it hung past its time to live) loses the registry to
    the next run, and its commit is refused rather than overwriting the newer run's pointer."""
    root = s3_bucket + "/reg"
    stale = Registry(root, lease_ttl_s=1.5)
    with stale.lock():
        stale.init()
        stale._lease._stop.set()  # simulate a hung process: it stops renewing
        time.sleep(2.0)
        fresh = Registry(root)
        with fresh.lock():
            fresh.commit("r2", {"run_id": "r2", "decision": "not_promoted"})
            with pytest.raises(RegistryError, match="lost the registry lease"):
                stale.commit("r1", {"run_id": "r1", "decision": "not_promoted"})
        assert stale.record("r1") is None and fresh.record("r2")["status"] == "completed"


def _fake_checkpoint(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "checkpoint.pt").write_bytes(b"weights")
    return path


def _leftovers(reg: Registry) -> list[str]:
    """Leftovers of interrupted writes: local temp files, or (object store) model copies without model.json."""
    if reg.remote:
        return [n for n in sio.names(reg.models_dir) if not reg.model_complete(f"models/{n}")]
    return [str(p) for p in temp_files(Path(reg.root))]


def test_a_commit_interrupted_after_its_journal_is_rolled_forward(tmp_path, day0, reg_root):
    reg = Registry(reg_root)
    shards = scan_source(str(day0.parent)).shards
    with reg.lock():
        reg.init()
        model = reg.save_model("r1", str(_fake_checkpoint(tmp_path / "ckpt")))
        promote = {"run_id": "r1", "model": model, "linear_top1": 50.0}
        pending = {"run_id": "r1", "promote": promote, "rebaseline": None, "used": [s.to_json() for s in shards],
                   "at": "2026-01-01T00:00:00Z"}
        # What commit() leaves when killed right after its journal write: nothing applied yet.
        reg.write_record("r1", {"run_id": "r1", "status": "committing", "decision": "promoted", "pending": pending})
        assert reg.promoted() is None and reg.manifest()["shards"] == {}
        if reg.remote:  # and a model copy cut short (no model.json)
            sio.atomic_write_bytes(reg.path("models/r9/checkpoint.pt"), b"half")
        else:  # and an atomic write cut short
            Path(reg.path(".manifest.json.abc.tmp")).write_text("{half")
        notes = reg.recover()
    assert reg.promoted() == promote
    assert set(reg.manifest()["shards"]) == {s.path for s in shards}
    assert reg.record("r1")["status"] == "completed" and "pending" not in reg.record("r1")
    assert any("interrupted commit" in n for n in notes) and _leftovers(reg) == []
    assert sio.names(reg.models_dir) == ["r1"]
    with reg.lock():
        assert reg.recover() == []  # idempotent


def test_recover_marks_dead_runs_crashed_and_model_copies_are_all_or_nothing(tmp_path, reg_root):
    reg = Registry(reg_root)
    with reg.lock():
        reg.init()
        reg.write_record("r0", {"run_id": "r0", "status": "running", "decision": None})
        if reg.remote:
            sio.atomic_write_bytes(reg.path("models/r0/checkpoint.pt"), b"half")  # a model copy cut short
        else:
            os.makedirs(reg.path("models/.r0.1234.tmp"))
        notes = reg.recover()
        assert reg.record("r0")["status"] == "crashed" and len(notes) == 2
        assert sio.names(reg.models_dir) == []
        (tmp_path / "not-a-checkpoint").mkdir()
        with pytest.raises(RegistryError, match="no checkpoint.pt"):
            reg.save_model("r2", str(tmp_path / "not-a-checkpoint"))
        assert sio.names(reg.models_dir) == []


def test_registry_refuses_gcs_and_foreign_directories(tmp_path, s3_bucket):
    with pytest.raises(RegistryError, match="generation preconditions"):
        Registry("gs://bucket/registry")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    sio.atomic_write_text(s3_bucket + "/home/notes.txt", "mine")
    for root in (str(tmp_path / "home"), s3_bucket + "/home"):
        with pytest.raises(RegistryError, match="not a simsiam registry"):
            Registry(root).init()


def test_bad_inputs_fail_before_any_run(tmp_path, day0, digits_cache):
    reg = tmp_path / "reg"
    common = ["--registry", str(reg), "--set", f"data.cache_dir={digits_cache}", "--set", f"data.path={day0.parent}"]
    rc, text = run_main(["sample", *common])
    assert rc == 2 and "retrain.eval_train_path is needed" in text
    # the held-out set inside the source of new data would be trained on
    rc, text = run_main(["sample", *common, "--set", f"retrain.eval_train_path={digits_cache}/digits/train",
                         "--set", f"data.eval_path={day0}"])
    assert rc == 2 and "held-out set would be trained on" in text
    rc, text = run_main(["sample", "--registry", "gs://b/r"])
    assert rc == 2 and "local directory" in text
    assert not list((reg / "runs").iterdir())


def test_a_hand_edited_pointer_is_reported(reg_root):
    reg = Registry(reg_root)
    with reg.lock():
        reg.init()
    sio.atomic_write_text(reg.promoted_path, "{broken")
    with pytest.raises(RegistryError, match="changed by hand"):
        reg.promoted()


def test_models_move_between_the_registry_and_uri_storage(tmp_path, reg_root):
    from pipelines.retrain import _reachable

    reg = Registry(reg_root)
    ckpt = _fake_checkpoint(tmp_path / "remote" / "r1" / "checkpoint_000")
    with reg.lock():
        reg.init()
        # a checkpoint on URI storage is copied into the registry ...
        rel = reg.save_model("r1", f"file://{ckpt}")
        assert sio.read_bytes(reg.path(rel + "/checkpoint.pt")) == b"weights"
        meta = sio.read_json(reg.path(rel + "/model.json"))
        assert meta["source"] == f"file://{ckpt}" and meta["sha256"] == hashlib.sha256(b"weights").hexdigest()
        # ... and a registry model is staged on URI storage for the workers of a warm start, unless the
        # registry is on an object store already (then every worker reads it where it is)
        staged = _reachable(reg, rel, f"file://{tmp_path}/remote", "r2")
        if reg.remote:
            assert staged == reg.path(rel)
        else:
            assert staged == f"file://{tmp_path}/remote/r2-init/r1"
            assert (tmp_path / "remote" / "r2-init" / "r1" / "checkpoint.pt").read_bytes() == b"weights"
        assert _reachable(reg, rel, str(tmp_path / "local"), "r2") == reg.path(rel)
