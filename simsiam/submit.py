"""``simsiam submit``: run a pipeline on a Ray cluster through the Jobs API.

It is ``ray job submit --working-dir . -- python -m pipelines.NAME ARGS`` with the project's defaults:
the working directory is uploaded without run outputs or VCS data, a token for a cluster with
``RAY_AUTH_MODE=token`` is taken from ``RAY_AUTH_TOKEN`` (or the file named by ``RAY_AUTH_TOKEN_PATH``)
and sent as a bearer header, the job id is printed, and the command exits with the job's outcome:

    0    the job SUCCEEDED (or --no-wait: it was accepted)
    1    the job FAILED or was STOPPED
    2    it could not be submitted (bad arguments, cluster unreachable, authentication refused)
    3    contact with the cluster was lost while waiting (the job may still be running)
    124  --timeout passed before the job finished (the job keeps running)
    130  interrupted while waiting (the job keeps running)

The dashboard address is ``--address``, else ``RAY_API_SERVER_ADDRESS`` / ``RAY_ADDRESS``, else
``http://127.0.0.1:8265`` - where ``ray dashboard cluster/aws.yaml`` (an SSH tunnel) and
``kubectl port-forward`` put it; the dashboard itself is never exposed publicly.
"""
from __future__ import annotations

import argparse
import asyncio
import difflib
import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import yaml

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
PIPELINE_ALIASES = {"run": "pretrain_eval"}
KNOWN_PIPELINES = ("pretrain_eval", "search", "ablate", "retrain")
# Anchored gitignore-style patterns (Ray matches them relative to the working dir). Run outputs and
# VCS data are large and useless on the cluster; the 'data' package under simsiam/ must stay, hence '/data/'.
DEFAULT_EXCLUDES = (
    "/.git/", "/runs/", "/results/", "/benchmarks/results/", "/data/", "/build/", "/dist/", "/.venv/",
    "__pycache__/", "*.egg-info/", ".pytest_cache/", ".ruff_cache/", "*.pyc",
)

EXIT_OK, EXIT_JOB_FAILED, EXIT_SUBMIT_ERROR, EXIT_LOST, EXIT_TIMEOUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 124, 130
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class SubmitError(ValueError):
    """Bad input to ``simsiam submit``: the message names the argument, file or value."""


# --------------------------------------------------------------------------- building the request


def resolve_address(address: str | None = None) -> str:
    """The Jobs API address: the argument, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else the default."""
    return (address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
            or DEFAULT_ADDRESS)


def auth_headers() -> dict[str, str]:
    """A bearer ``Authorization`` header from RAY_AUTH_TOKEN or the file named by RAY_AUTH_TOKEN_PATH.

    Empty when neither is set; the Jobs SDK then falls back to its own lookup (``~/.ray/auth_token``
    when ``RAY_AUTH_MODE=token``). The token only ever travels in this header - it is never put in
    the job's runtime environment, whose contents the dashboard shows to anyone who can see the job.
    """
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if not token and path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as e:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token file: {e.strerror}") from None
        if not token:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path}: the token file is empty")
    return {"Authorization": f"Bearer {token}"} if token else {}


def pipeline_names(working_dir: str | os.PathLike | None = None) -> list[str]:
    """Pipelines that ``simsiam submit NAME`` expands to ``python -m pipelines.NAME``."""
    names = set(KNOWN_PIPELINES)
    for root in ([Path(working_dir)] if working_dir else []) + [Path(__file__).resolve().parent.parent]:
        folder = root / "pipelines"
        if folder.is_dir():
            names.update(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))
    return sorted(names)


def build_entrypoint(command: list[str], working_dir: str | os.PathLike | None = None) -> str:
    """The shell command the job runs.

    ``NAME ARGS`` for a pipeline (or its CLI alias, ``run``) becomes ``python -m pipelines.NAME ARGS``;
    anything else is run as given: a single argument is taken as a shell command line, several as argv.
    """
    if not command:
        raise SubmitError("no command: give a pipeline and its arguments after '--', "
                          "e.g. simsiam submit -- pretrain_eval imagenet")
    head, rest = command[0], command[1:]
    known = pipeline_names(working_dir)
    name = PIPELINE_ALIASES.get(head, head)
    if name in known:
        return shlex.join(["python", "-m", f"pipelines.{name}", *rest])
    if len(command) == 1 and any(c.isspace() for c in head):
        return head
    # A misspelt pipeline would otherwise start a job that dies with 'command not found'.
    close = difflib.get_close_matches(head, known + list(PIPELINE_ALIASES), n=1, cutoff=0.75)
    if _NAME.match(head) and close and shutil.which(head) is None:
        raise SubmitError(f"{head!r} is not a pipeline; did you mean {close[0]}? (pipelines: {', '.join(known)})")
    return shlex.join(command)


def load_runtime_env(path: str | os.PathLike) -> dict[str, Any]:
    """Read a runtime-environment YAML file (a mapping, e.g. cluster/runtime_env.yaml)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise SubmitError(f"--runtime-env {p}: cannot read it: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise SubmitError(f"--runtime-env {p}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SubmitError(f"--runtime-env {p}: expected a mapping of runtime_env fields, got {type(data).__name__}")
    return data


def build_runtime_env(runtime_env_file: str | os.PathLike | None = None, working_dir: str | None = ".",
                      upload: bool = True) -> dict[str, Any]:
    """The job's runtime environment: the file's fields, the working directory, and the excludes.

    ``working_dir`` overrides the file's; with ``upload=False`` nothing is uploaded (the cluster's
    image already holds the code, as on KubeRay).
    """
    env = load_runtime_env(runtime_env_file) if runtime_env_file else {}
    if not upload:
        env.pop("working_dir", None)
        env.pop("excludes", None)
        return env
    wd = working_dir if working_dir is not None else env.get("working_dir", ".")
    if not isinstance(wd, str) or not wd:
        raise SubmitError(f"working_dir: expected a directory or URI, got {wd!r}")
    if "://" not in wd:
        if not Path(wd).is_dir():
            raise SubmitError(f"--working-dir {wd}: no such directory")
        wd = str(Path(wd).resolve())
    env["working_dir"] = wd
    extra = env.get("excludes") or []
    if not isinstance(extra, list) or not all(isinstance(x, str) for x in extra):
        raise SubmitError(f"excludes: expected a list of patterns, got {extra!r}")
    env["excludes"] = list(dict.fromkeys([*DEFAULT_EXCLUDES, *extra]))
    return env


# --------------------------------------------------------------------------- talking to the cluster


def make_client(address: str, headers: dict[str, str] | None = None) -> Any:
    """A JobSubmissionClient for exactly ``address``.

    The SDK lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override its ``address`` argument; an explicit
    ``--address`` must win, so the override variable is pinned to it while the client resolves it.
    """
    from ray.job_submission import JobSubmissionClient

    saved = {k: os.environ.get(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")}
    os.environ["RAY_API_SERVER_ADDRESS"] = address
    os.environ.pop("RAY_ADDRESS", None)
    try:
        return JobSubmissionClient(address, headers=headers or None)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


async def _tail(client: Any, job_id: str, out: TextIO) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def wait_for_job(client: Any, job_id: str, *, follow: bool = False, timeout: float | None = None,
                 poll_s: float = 1.0, out: TextIO | None = None, max_poll_failures: int = 10) -> Any:
    """Wait until the job is terminal and return its JobStatus, or None if ``timeout`` seconds pass.

    With ``follow`` the job's output is streamed to ``out`` while it runs. Status queries that fail
    are retried with backoff; after ``max_poll_failures`` in a row the last error is raised.
    """
    out = out or sys.stdout
    deadline = None if timeout is None else time.monotonic() + timeout
    if follow:
        try:
            asyncio.run(asyncio.wait_for(_tail(client, job_id, out), timeout=timeout))
        except TimeoutError:
            return None
        except RuntimeError as e:  # the log stream broke (e.g. a proxy dropped it); keep waiting without it
            print(f"simsiam submit: log stream ended early ({e}); still waiting for the job", file=sys.stderr)
    failures = 0
    while True:
        try:
            status = client.get_job_status(job_id)
            failures = 0
        except Exception:  # a dropped tunnel or a restarting dashboard: retry for a while, then give up
            failures += 1
            if failures > max_poll_failures:
                raise
            status = None
        if status is not None and status.is_terminal():
            return status
        if deadline is not None and time.monotonic() >= deadline:
            return None
        time.sleep(poll_s if failures == 0 else min(30.0, poll_s * 2 ** failures))


def _summary(message: str | None, limit: int = 600) -> str:
    text = (message or "").strip()
    first = text.split(", last available logs", 1)[0]
    return first if len(first) <= limit else first[:limit] + " ..."


def _log_tail(client: Any, job_id: str, lines: int = 30) -> str:
    try:
        logs = client.get_job_logs(job_id)
    except Exception:  # the summary is a courtesy; the status already says what happened
        return ""
    return "\n".join(logs.rstrip().splitlines()[-lines:])


# --------------------------------------------------------------------------- command line


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Submit a pipeline (or any command) to a Ray cluster with the Jobs API and wait for it.",
        epilog="examples:\n"
               "  simsiam submit -- pretrain_eval imagenet --set train.epochs=100\n"
               "  simsiam submit --follow -- search cifar10 --space tune_spaces/cifar10.yaml --trials 32\n"
               "  simsiam submit --no-wait -- python -c 'import ray; print(ray.cluster_resources())'\n\n"
               "A first word that names a pipeline (pretrain_eval, search, ablate, retrain; 'run' = pretrain_eval)\n"
               "runs as 'python -m pipelines.NAME ARGS'; anything else runs as given.\n"
               "Auth: with RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) set, the token is sent as a bearer header.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--address", default=None,
                   help=f"Jobs API (dashboard) URL; default RAY_API_SERVER_ADDRESS, RAY_ADDRESS or {DEFAULT_ADDRESS}")
    p.add_argument("--working-dir", default=None, metavar="DIR",
                   help="directory (or remote zip URI) uploaded as the job's working dir; default '.' "
                        "(or the runtime env file's working_dir)")
    p.add_argument("--no-upload", action="store_true",
                   help="upload nothing: the cluster's image already holds the code (e.g. KubeRay)")
    p.add_argument("--runtime-env", default=None, metavar="FILE",
                   help="runtime environment YAML merged in, e.g. cluster/runtime_env.yaml (pinned pip packages)")
    p.add_argument("--submission-id", default=None, help="job id to use (must be new on the cluster)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    mode.add_argument("--no-wait", action="store_true", help="print the job id and return once it is accepted")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="stop waiting after S seconds (exit 124; the job keeps running)")
    p.add_argument("command", nargs="*", help="PIPELINE ARGS... or a command (put it after '--')")
    return p


def main(argv: list[str] | None = None, prog: str = "simsiam submit") -> int:
    """Entry point of ``simsiam submit``; returns the exit code described in the module docstring."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        own, command = argv[:i], argv[i + 1:]
    else:
        own, command = argv, None
    p = _parser(prog)
    args, unknown = p.parse_known_args(own)
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)} (put the pipeline and its arguments after '--')")
    if command is None:
        command = args.command
    elif args.command:
        p.error(f"unexpected arguments before '--': {' '.join(args.command)}")
    if args.timeout is not None and args.timeout <= 0:
        p.error(f"--timeout: {args.timeout} must be > 0")

    address = resolve_address(args.address)
    try:
        runtime_env = build_runtime_env(args.runtime_env, working_dir=args.working_dir, upload=not args.no_upload)
        upload_dir = runtime_env.get("working_dir")
        code_dir = upload_dir if upload_dir and "://" not in upload_dir else None
        entrypoint = build_entrypoint(command, code_dir)
        headers = auth_headers()
    except SubmitError as e:
        print(f"simsiam submit: {e}", file=sys.stderr)
        return EXIT_SUBMIT_ERROR

    try:
        client = make_client(address, headers)
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                   submission_id=args.submission_id,
                                   metadata={"submitted_by": "simsiam submit"})
    except Exception as e:  # connection, authentication, validation: all end the same way, with Ray's message
        print(f"simsiam submit: could not submit to {address}: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_SUBMIT_ERROR

    print(job_id, flush=True)
    print(f"simsiam submit: job {job_id} submitted to {address}: {entrypoint}\n"
          f"  logs: ray job logs -f {job_id} --address {address}\n"
          f"  stop: ray job stop {job_id} --address {address}", file=sys.stderr)
    if args.no_wait:
        return EXIT_OK
    try:
        status = wait_for_job(client, job_id, follow=args.follow, timeout=args.timeout)
    except KeyboardInterrupt:
        print(f"\nsimsiam submit: stopped waiting; job {job_id} keeps running "
              f"(ray job stop {job_id} --address {address})", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        print(f"simsiam submit: lost contact with {address} while waiting ({type(e).__name__}: {e}); job {job_id} "
              f"may still be running: ray job status {job_id} --address {address}", file=sys.stderr)
        return EXIT_LOST
    if status is None:
        print(f"simsiam submit: job {job_id} still running after {args.timeout:g}s; it keeps running",
              file=sys.stderr)
        return EXIT_TIMEOUT
    if str(status) == "SUCCEEDED":
        print(f"simsiam submit: job {job_id} SUCCEEDED", file=sys.stderr)
        return EXIT_OK
    info = client.get_job_info(job_id)
    if not args.follow:
        tail = _log_tail(client, job_id)
        if tail:
            print(f"--- last lines of job {job_id} ---\n{tail}\n---", file=sys.stderr)
    print(f"simsiam submit: job {job_id} {status}: {_summary(info.message)}", file=sys.stderr)
    return EXIT_JOB_FAILED


if __name__ == "__main__":
    sys.exit(main())
