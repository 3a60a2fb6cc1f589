"""`simsiam submit` and `ray job submit` against a real local Ray head.

The head is `ray start --head --block` with token auth on, its dashboard on 127.0.0.1, every listening
port chosen free, in a short temporary directory; it runs in its own session and is stopped by
signalling that process group (never by name). Fast tests of the request building come first.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from simsiam import submit as S

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- building the request


def test_pipeline_names_become_module_runs_and_other_commands_run_as_given():
    assert S.build_entrypoint(["pretrain_eval", "imagenet", "--set", "train.epochs=2"]) == \
        "python -m pipelines.pretrain_eval imagenet --set train.epochs=2"
    assert S.build_entrypoint(["run", "--out-dir", "/tmp/a b"]) == \
        "python -m pipelines.pretrain_eval --out-dir '/tmp/a b'"
    assert S.build_entrypoint(["search", "cifar10", "--trials", "4"]) == "python -m pipelines.search cifar10 --trials 4"
    assert S.build_entrypoint(["python", "-c", "import sys; sys.exit(3)"]) == "python -c 'import sys; sys.exit(3)'"
    assert S.build_entrypoint(["echo hi && exit 3"]) == "echo hi && exit 3"


def test_pipelines_are_discovered_in_the_working_dir(tmp_path):
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "nightly_report.py").write_text("")
    assert "nightly_report" in S.pipeline_names(tmp_path)
    assert S.build_entrypoint(["nightly_report", "x"], tmp_path) == "python -m pipelines.nightly_report x"


@pytest.mark.parametrize("bad, match", [([], "no command"),
                                        (["pretrain_evl", "imagenet"], "did you mean pretrain_eval"),
                                        (["serch"], "did you mean search")])
def test_bad_commands_are_refused_before_submitting(bad, match):
    with pytest.raises(S.SubmitError, match=match):
        S.build_entrypoint(bad)


def test_address_precedence(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert S.resolve_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.1:8265")
    assert S.resolve_address(None) == "http://10.0.0.1:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://10.0.0.2:8265")
    assert S.resolve_address(None) == "http://10.0.0.2:8265"
    assert S.resolve_address("http://127.0.0.1:9999") == "http://127.0.0.1:9999"


def test_token_comes_from_the_environment_or_a_file(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert S.auth_headers() == {}
    token_file = tmp_path / "tok"
    token_file.write_text("from-file\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert S.auth_headers() == {"Authorization": "Bearer from-file"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert S.auth_headers() == {"Authorization": "Bearer from-env"}
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    token_file.write_text("  \n")
    with pytest.raises(S.SubmitError, match="empty"):
        S.auth_headers()
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(S.SubmitError, match="RAY_AUTH_TOKEN_PATH"):
        S.auth_headers()


def test_runtime_env_merges_the_file_the_working_dir_and_the_excludes(tmp_path):
    env_file = tmp_path / "env.yaml"
    env_file.write_text(yaml.safe_dump({"excludes": ["/big/"], "env_vars": {"A": "1"}, "working_dir": "/nope"}))
    env = S.build_runtime_env(env_file, working_dir=str(tmp_path))
    assert env["working_dir"] == str(tmp_path.resolve())
    assert env["env_vars"] == {"A": "1"}
    assert "/big/" in env["excludes"] and "/.git/" in env["excludes"] and "/runs/" in env["excludes"]
    assert "working_dir" not in S.build_runtime_env(env_file, upload=False)
    assert S.build_runtime_env(None, working_dir="s3://bucket/code.zip")["working_dir"] == "s3://bucket/code.zip"
    with pytest.raises(S.SubmitError, match="no such directory"):
        S.build_runtime_env(None, working_dir=str(tmp_path / "absent"))
    env_file.write_text("- a\n- b\n")
    with pytest.raises(S.SubmitError, match="expected a mapping"):
        S.build_runtime_env(env_file)
    env_file.write_text("pip: [unclosed\n")
    with pytest.raises(S.SubmitError, match="not valid YAML"):
        S.build_runtime_env(env_file)


def test_usage_errors_exit_2_without_contacting_a_cluster(capsys, tmp_path):
    assert S.main(["--address", "http://127.0.0.1:1", "--"]) == S.EXIT_SUBMIT_ERROR
    assert "no command" in capsys.readouterr().err
    assert S.main(["--runtime-env", str(tmp_path / "none.yaml"), "--", "pretrain_eval"]) == S.EXIT_SUBMIT_ERROR
    assert "cannot read" in capsys.readouterr().err


def test_unreachable_cluster_exits_2_with_the_address(capsys, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    port = _free_ports(1)[0]
    code = S.main(["--address", f"http://127.0.0.1:{port}", "--working-dir", str(ROOT / "configs"),
                   "--", "python", "-c", "pass"])
    assert code == S.EXIT_SUBMIT_ERROR
    assert f"127.0.0.1:{port}" in capsys.readouterr().err


# --------------------------------------------------------------------------- a real head


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stop_group(proc: subprocess.Popen) -> None:
    """TERM the head's process group, then KILL what is left (Ray drains for up to 30 s on TERM)."""
    for sig, wait_s in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            try:  # the leader is gone; its children may still be draining
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return


class Head:
    def __init__(self, url: str, token: str, temp_dir: str):
        self.url, self.token, self.temp_dir = url, token, temp_dir

    def client_env(self, **extra: str) -> dict[str, str]:
        """Environment for a client process: token auth on, this head's token, no stray address."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, PYTHONPATH=str(ROOT), **extra)
        return env

    def client(self):
        return S.make_client(self.url, {"Authorization": f"Bearer {self.token}"})


@pytest.fixture(scope="module")
def head():
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's Unix socket paths must fit 107 bytes
    gcs, dash, client_port, agent = _free_ports(4)
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
    cmd = ["ray", "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={agent}",
           "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    log = open(Path(temp_dir) / "head.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_jobs_api(url, token, proc, Path(temp_dir) / "head.log")
        yield Head(url, token, temp_dir)
    finally:
        _stop_group(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_jobs_api(url: str, token: str, proc: subprocess.Popen, log: Path, timeout_s: float = 90) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            r = requests.get(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=2)
            if r.status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the Jobs API at {url} did not answer in {timeout_s}s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def project_dir(tmp_path):
    """A small working dir laid out like the repository: a pipeline package, outputs that must not ship."""
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "__init__.py").write_text("")
    (tmp_path / "pipelines" / "probe.py").write_text(textwrap.dedent("""
        import os, sys
        # Uploaded: the code. Not uploaded: VCS data and run outputs.
        missing = [p for p in ("runs", ".git", "results") if os.path.exists(p)]
        print("probe args", sys.argv[1:], "shipped outputs", missing, flush=True)
        sys.exit(5 if missing else int(os.environ.get("PROBE_EXIT", "0")))
    """))
    for d in ("runs", ".git", "results"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "blob.bin").write_bytes(b"x" * 1024)
    return tmp_path


@pytest.mark.slow
def test_submit_runs_a_pipeline_from_the_working_dir_and_follows_its_logs(head, project_dir, monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_TOKEN", head.token)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")  # --address must win over the environment
    code = S.main(["--address", head.url, "--working-dir", str(project_dir), "--follow",
                   "--", "probe", "alpha", "--beta", "two words"])
    out, err = capsys.readouterr()
    assert code == S.EXIT_OK, err
    job_id = out.splitlines()[0].strip()
    assert job_id.startswith("raysubmit_")
    assert "probe args ['alpha', '--beta', 'two words'] shipped outputs []" in out
    assert "SUCCEEDED" in err
    info = head.client().get_job_info(job_id)
    assert str(info.status) == "SUCCEEDED" and info.entrypoint.startswith("python -m pipelines.probe")
    assert "Bearer" not in json.dumps(info.runtime_env or {})


@pytest.mark.slow
def test_a_failing_job_makes_the_cli_exit_nonzero(head, project_dir):
    env = head.client_env()
    r = subprocess.run([sys.executable, "-m", "simsiam.cli", "submit", "--address", head.url,
                        "--working-dir", str(project_dir), "--", "python", "-c", "import sys; sys.exit(3)"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == S.EXIT_JOB_FAILED, r.stderr
    assert "FAILED" in r.stderr and "exit code 3" in r.stderr
    assert r.stdout.strip().startswith("raysubmit_")


@pytest.mark.slow
def test_no_wait_timeout_and_a_refused_token(head, project_dir, monkeypatch, capsys):
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    base = ["--address", head.url, "--working-dir", str(project_dir)]

    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    assert S.main([*base, "--", "python", "-c", "pass"]) == S.EXIT_SUBMIT_ERROR
    assert "Authentication" in capsys.readouterr().err
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    assert S.main([*base, "--", "python", "-c", "pass"]) == S.EXIT_SUBMIT_ERROR
    assert "Authentication" in capsys.readouterr().err

    monkeypatch.setenv("RAY_AUTH_TOKEN", head.token)
    t0 = time.monotonic()
    assert S.main([*base, "--timeout", "3", "--", "python", "-c", "import time; time.sleep(120)"]) == S.EXIT_TIMEOUT
    slow_id = capsys.readouterr().out.split()[0]
    client = head.client()
    assert not client.get_job_status(slow_id).is_terminal()
    client.stop_job(slow_id)

    assert S.main([*base, "--no-wait", "--", "python", "-c", "print('quick')"]) == S.EXIT_OK
    quick_id = capsys.readouterr().out.split()[0]
    assert time.monotonic() - t0 < 90
    final = S.wait_for_job(client, quick_id, timeout=60)
    assert str(final) == "SUCCEEDED" and "quick" in client.get_job_logs(quick_id)
    assert str(S.wait_for_job(client, slow_id, timeout=60)) == "STOPPED"
    # Status queries that keep failing are retried, then the error surfaces.
    t1 = time.monotonic()
    with pytest.raises(RuntimeError, match="raysubmit_no_such_job"):
        S.wait_for_job(client, "raysubmit_no_such_job", poll_s=0.05, max_poll_failures=2)
    assert time.monotonic() - t1 < 10


@pytest.mark.slow
def test_ray_job_submit_runs_the_sample_pipeline_and_writes_results(head, tmp_path):
    if not (ROOT / "pipelines" / "pretrain_eval.py").exists():
        pytest.skip("pipelines/pretrain_eval.py is not in the tree yet")
    out_dir = tmp_path / "out"
    cmd = ["ray", "job", "submit", "--address", head.url, "--working-dir", str(ROOT),
           "--runtime-env-json", json.dumps({"excludes": list(S.DEFAULT_EXCLUDES)}),
           "--", "python", "-m", "pipelines.pretrain_eval", "sample",
           "--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=2", "--set", "train.knn_every=0",
           "--set", "train.cpus_per_worker=0.5", "--set", "eval.linear.epochs=1",
           "--set", "train.collapse_guard.enabled=false",
           "--set", f"data.cache_dir={tmp_path / 'cache'}", "--out-dir", str(out_dir)]
    r = subprocess.run(cmd, env=head.client_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    results = json.loads((out_dir / "results.json").read_text())
    assert results["status"] == "finished", results
    assert results["epochs_completed"] == 1
    # Every cached-protocol result carries its baselines (same data, same protocol) and the gain over them.
    base = results["baselines"]
    assert {k: set(v) for k, v in base.items()} == {"random_init": {"linear_top1", "knn_top1"},
                                                      "raw_pixels": {"linear_top1", "knn_top1"}}
    assert results["ssl_gain"] == pytest.approx(results["linear_top1"] - max(v["linear_top1"] for v in base.values()))
    assert "points from self-supervision" in r.stdout  # the run's last line (Ray's job status follows it)
