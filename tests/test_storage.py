"""The storage layer (simsiam/io.py) on both backends: a local directory and a real S3 endpoint (moto)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from simsiam import io as sio
from tests.s3_server import S3Server, free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path) -> str:
    """A fresh root location on each backend."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/root"


def test_write_read_list_remove(base):
    f = sio.join(base, "a", "x.json")
    assert not sio.exists(f) and sio.read_json(f) is None and sio.names(base) == []
    sio.atomic_write_json(f, {"k": 1})
    sio.atomic_write_bytes(sio.join(base, "a", "y.bin"), b"\x00" * 10)
    assert sio.read_json(f) == {"k": 1} and sio.is_file(f) and sio.is_dir(sio.join(base, "a"))
    assert sio.names(sio.join(base, "a")) == ["x.json", "y.bin"]
    assert sio.names(base) == ["a"]
    sio.atomic_write_json(f, {"k": 2})  # replaced whole
    assert sio.read_json(f) == {"k": 2}
    with pytest.raises(FileNotFoundError):
        sio.read_bytes(sio.join(base, "missing"))
    with sio.open_input(sio.join(base, "a", "y.bin")) as fh:
        fh.seek(5)
        assert fh.read() == b"\x00" * 5
    sio.remove(f)
    assert not sio.exists(f) and sio.names(sio.join(base, "a")) == ["y.bin"]
    sio.remove_tree(sio.join(base, "a"))
    assert not sio.exists(sio.join(base, "a", "y.bin"))


def test_copy_tree_between_backends(base, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("A")
    (src / "sub" / "b.txt").write_text("B")
    sio.copy_tree(str(src), sio.join(base, "copy"))
    assert sio.read_text(sio.join(base, "copy", "sub", "b.txt")) == "B"
    back = tmp_path / "back"
    sio.copy_tree(sio.join(base, "copy"), str(back))
    assert (back / "a.txt").read_text() == "A" and (back / "sub" / "b.txt").read_text() == "B"


def test_write_once_and_compare_and_swap(base):
    p = sio.join(base, "pointer.json")
    v1 = sio.put_if_absent(p, b"one")
    with pytest.raises(sio.PreconditionFailed):
        sio.put_if_absent(p, b"two")
    data, v = sio.read_versioned(p)
    assert data == b"one" and v == v1
    v2 = sio.put_if_version(p, b"three", v1)
    with pytest.raises(sio.PreconditionFailed):  # a writer holding the old version loses
        sio.put_if_version(p, b"stale", v1)
    assert sio.read_versioned(p) == (b"three", v2)
    with pytest.raises(sio.PreconditionFailed):
        sio.delete_if_version(p, v1)
    sio.delete_if_version(p, v2)
    assert sio.read_versioned(p) == (None, None)


def test_concurrent_compare_and_swap_has_one_winner(base):
    """Eight writers read the same version and swap at once: exactly one succeeds. Every payload differs
    from the first content: an S3 version is the content's MD5, so a writer storing the same bytes would
    leave it unchanged and a second swap from it would rightly succeed."""
    p = sio.join(base, "counter")
    v0 = sio.put_if_absent(p, b"start")
    wins, losses = [], []
    barrier = threading.Barrier(8)

    def writer(i: int) -> None:
        barrier.wait()
        try:
            sio.put_if_version(p, f"writer {i}".encode(), v0)
            wins.append(i)
        except sio.PreconditionFailed:
            losses.append(i)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(losses) == 7
    assert sio.read_versioned(p)[0] == f"writer {wins[0]}".encode()


def test_gcs_conditional_writes_are_refused_with_a_reason():
    with pytest.raises(sio.StorageError, match="generation preconditions"):
        sio.put_if_absent("gs://some-bucket/x", b"1")


@pytest.mark.parametrize("keys", ["wrong", "missing"])
def test_bad_credentials_fail_fast_naming_the_bucket(tmp_path, keys):
    """A server that checks signatures: wrong or missing keys give one clear error naming the bucket,
    from a fresh process that only has the environment (as a Ray job would)."""
    server = S3Server(free_port(), str(tmp_path / "moto.log"), auth=True).start()
    try:
        uri = server.create_bucket("private-bucket")
        env = {**os.environ, "AWS_ENDPOINT_URL": server.endpoint, "PYTHONPATH": str(ROOT)}
        if keys == "wrong":
            env.update(AWS_ACCESS_KEY_ID="AKIAWRONGWRONGWRONG1", AWS_SECRET_ACCESS_KEY="nope")
        else:
            env.pop("AWS_ACCESS_KEY_ID")
            env.pop("AWS_SECRET_ACCESS_KEY")
        code = f"from simsiam import io; io.check_access({uri + '/data'!r}, 'data.path')"
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode != 0
        last = r.stderr.strip().splitlines()[-1]
        assert "StorageError: data.path: s3://private-bucket/data" in last and "s3://private-bucket" in last, last
        # The right keys pass.
        env.update(AWS_ACCESS_KEY_ID=server.keys[0], AWS_SECRET_ACCESS_KEY=server.keys[1])
        r = subprocess.run([sys.executable, "-c", code.replace("')", "', write=True)")], env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    finally:
        server.stop()
