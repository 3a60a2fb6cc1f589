"""A real S3 endpoint for tests: moto's standalone server as a subprocess on 127.0.0.1.

The project reaches it exactly as it reaches AWS: pyarrow's S3 filesystem and boto3 both read
``AWS_ENDPOINT_URL`` (and the usual credential variables) from the environment, which
tests/conftest.py sets before any Ray process starts, so Ray workers inherit it. Bytes go over HTTP;
nothing is patched in-process.

moto keeps its objects in memory, so an outage is simulated by pausing the process (SIGSTOP: the
kernel still accepts connections, nothing answers - a stalled endpoint) and resuming it (SIGCONT).
The server is stopped by its pid, never by name.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """One moto server process. ``auth=True`` enforces IAM credentials (for tests of wrong keys): the first
    requests create a user whose keys :meth:`start` returns in ``keys``."""

    def __init__(self, port: int, log_path: str, *, auth: bool = False):
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.auth = auth
        self.proc: subprocess.Popen | None = None
        self.keys: tuple[str, str] | None = None
        self.paused = False

    def start(self, timeout: float = 30.0) -> S3Server:
        env = dict(os.environ)
        if self.auth:
            # moto checks signatures only after this many unauthenticated calls: the setup below.
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process for its life
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not start on {self.endpoint}; see {self.log_path}") from None
                time.sleep(0.2)
        if self.auth:
            self.keys = self._make_user()
        return self

    def _client(self, service: str, keys: tuple[str, str] | None = None):
        import boto3

        key, secret = keys or ("testing", "testing")
        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=key, aws_secret_access_key=secret)

    def _make_user(self) -> tuple[str, str]:
        iam = self._client("iam")
        iam.create_user(UserName="tester")
        iam.put_user_policy(UserName="tester", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        k = iam.create_access_key(UserName="tester")["AccessKey"]
        return k["AccessKeyId"], k["SecretAccessKey"]

    def create_bucket(self, name: str) -> str:
        """Create a bucket (if new); return its ``s3://`` URI."""
        s3 = self._client("s3", self.keys)
        try:
            s3.create_bucket(Bucket=name)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass
        return f"s3://{name}"

    def keys_of(self, uri: str) -> list[str]:
        """Every object key under ``s3://bucket/prefix``, sorted."""
        b, _, prefix = uri.split("://", 1)[1].partition("/")
        s3 = self._client("s3", self.keys)
        out, token = [], None
        while True:
            kw = {"Bucket": b, "Prefix": prefix.rstrip("/") + "/" if prefix else ""}
            if token:
                kw["ContinuationToken"] = token
            r = s3.list_objects_v2(**kw)
            out += [o["Key"] for o in r.get("Contents", [])]
            if not r.get("IsTruncated"):
                return sorted(out)
            token = r["NextContinuationToken"]

    def pause(self) -> None:
        """The endpoint stops answering (connections are accepted by the kernel and then hang)."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.paused:
            self.resume()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
