"""The one storage layer of every stage: local paths and object-store URIs (s3://, gs://) behind the same calls.

Every file the project writes goes through here, so an interrupted run never leaves half a file:

- local paths are written to a temp name beside the target, fsynced, then renamed over it;
- on an object store a single PUT (or a completed multipart upload) is atomic: readers see the old
  object or the whole new one, never a part. Temp names are not needed there (and rename is a copy).

Object stores lack rename and locks, so two more primitives serve the places that need
compare-and-swap (the retraining registry's pointer and lease): :func:`put_if_absent` (write-once
objects: ``If-None-Match: *``) and :func:`put_if_version` (replace only the version read before:
``If-Match: <etag>``). On S3 and S3-compatible stores they use boto3 (imported on first use); on local
paths they use ``link(2)``, which fails if the target exists, and a short ``flock`` around compare and
replace. GCS has the same semantics (``ifGenerationMatch``), but pyarrow's GcsFileSystem does not expose
it: conditional writes on gs:// raise :class:`StorageError` saying so.

Endpoints and credentials come from the environment, read the same way by pyarrow and boto3:
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (or an instance profile / IRSA role), ``AWS_REGION``, and
``AWS_ENDPOINT_URL`` for an S3-compatible store (MinIO, Ceph, a test server); for gs:// the Google
application-default credentials. Ray workers inherit them from the driver's environment or the job's
``runtime_env``.
"""
from __future__ import annotations

import contextlib
import json
import os
import posixpath
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

OBJECT_STORE_SCHEMES = ("s3", "gs", "gcs")


class StorageError(OSError):
    """A location that cannot be read or written as asked: the message names it and says what to do."""


class PreconditionFailed(StorageError):
    """A conditional write lost: the object exists (put_if_absent) or changed (put_if_version)."""


# ----------------------------------------------------------------------------------------- locations


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def scheme(path: str | os.PathLike) -> str:
    """``"s3"``, ``"gs"``, ... for a URI; ``"file"`` for a local path."""
    return str(path).split("://", 1)[0].lower() if is_uri(path) else "file"


def is_object_store(path: str | os.PathLike) -> bool:
    return scheme(path) in OBJECT_STORE_SCHEMES


def absolute(path: str | os.PathLike) -> str:
    """A local path made absolute (Ray tasks do not share the caller's working directory); URIs as given."""
    return str(path) if is_uri(path) else os.path.abspath(os.path.expanduser(str(path)))


def join(base: str | os.PathLike, *names: str) -> str:
    """Join names onto a local path or URI with '/'."""
    out = str(base).rstrip("/")
    for n in names:
        out += "/" + n.strip("/")
    return out


def bucket(path: str) -> str:
    """The bucket of an object-store URI (``s3://bucket/key`` -> ``bucket``)."""
    return str(path).split("://", 1)[1].split("/", 1)[0]


def filesystem(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or a URI (s3://, gs://, file://, ...)."""
    path = str(path)
    if is_uri(path):
        try:
            return pafs.FileSystem.from_uri(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise StorageError(f"{path}: cannot open this URI: {e}") from None
    return pafs.LocalFileSystem(), absolute(path)


def describe_error(path: str, e: BaseException) -> str:
    """A storage failure in words that name the location and, for the usual causes, what to do."""
    text = str(e)
    low = text.lower()
    if is_object_store(path):
        where = f"{scheme(path)}://{bucket(path)}"
        squashed = low.replace("_", "").replace(" ", "")
        if any(k in squashed for k in ("accessdenied", "invalidaccesskeyid", "signaturedoesnotmatch",
                                       "credentials", "forbidden", "403")):
            return (f"{path}: access to bucket {where} denied ({text.splitlines()[0]}); check the credentials "
                    "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the instance role for s3://, "
                    "GOOGLE_APPLICATION_CREDENTIALS for gs://) and the bucket's permissions")
        if "nosuchbucket" in low or "bucket does not exist" in low:
            return f"{path}: bucket {where} does not exist; create it first"
        if any(k in low for k in ("timeout", "timed out", "connect", "unreachable", "resolve")):
            endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
            return (f"{path}: storage {where} unreachable{f' at {endpoint}' if endpoint else ''} "
                    f"({text.splitlines()[0]}); check the network and AWS_ENDPOINT_URL")
    return f"{path}: {text.splitlines()[0] if text else type(e).__name__}"


def check_access(path: str, what: str, *, write: bool = False) -> None:
    """Fail fast, before any work, when ``path`` cannot be reached: the error names ``what`` (the setting),
    the bucket and the likely fix. ``write``: also prove that objects can be created (and removed) there."""
    if not is_uri(path):
        return
    fs, inner = filesystem(path)
    try:
        fs.get_file_info(inner)
        if write:
            probe = join(inner, f".simsiam-write-check-{os.getpid()}-{os.urandom(3).hex()}")
            with fs.open_output_stream(probe) as f:
                f.write(b"ok")
            fs.delete_file(probe)
    except (OSError, pa.ArrowException) as e:
        raise StorageError(f"{what}: {describe_error(path, e)}") from None


def check_locations(reads: dict[str, str], writes: dict[str, str] | None = None) -> None:
    """:func:`check_access` for every object-store location a run will use, keyed by the setting that names
    it (``{"data.path": "s3://..."}``); ``writes`` are also checked for creating objects. Call before
    starting Ray, so wrong credentials fail in a second, not after the cluster and workers are up."""
    for what, loc in reads.items():
        if loc and is_object_store(loc):
            check_access(loc, what)
    for what, loc in (writes or {}).items():
        if loc and is_object_store(loc):
            check_access(loc, what, write=True)


# ----------------------------------------------------------------------------------------- reading


def exists(path: str | os.PathLike) -> bool:
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def is_file(path: str | os.PathLike) -> bool:
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type == pafs.FileType.File


def is_dir(path: str | os.PathLike) -> bool:
    """A local directory, or an object-store prefix that has objects under it (or a bucket)."""
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type == pafs.FileType.Directory


def list_dir(path: str | os.PathLike, *, recursive: bool = False) -> list[pafs.FileInfo]:
    """What is under a directory or prefix (files and subdirectories; [] when it does not exist), sorted by
    path. ``FileInfo.path`` is inside the filesystem; :func:`names` gives the names relative to ``path``."""
    fs, inner = filesystem(path)
    infos = fs.get_file_info(pafs.FileSelector(inner.rstrip("/"), allow_not_found=True, recursive=recursive))
    return sorted(infos, key=lambda f: f.path)


def names(path: str | os.PathLike) -> list[str]:
    """The names directly under a directory or prefix, sorted ([] when it does not exist)."""
    return [posixpath.basename(f.path.rstrip("/")) for f in list_dir(path)]


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole file; FileNotFoundError when it is absent."""
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as f:
        return f.read()


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode()


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """Parsed JSON, or ``default`` when the file is absent (a malformed file raises ValueError)."""
    try:
        return json.loads(read_bytes(path))
    except FileNotFoundError:
        return default


@contextlib.contextmanager
def open_input(path: str | os.PathLike) -> Iterator[Any]:
    """A seekable binary file to read (e.g. for pyarrow.parquet or torch.load)."""
    fs, inner = filesystem(path)
    with fs.open_input_file(inner) as f:
        yield f


# ----------------------------------------------------------------------------------------- writing


def _local_temp_write(path: Path, data: bytes | memoryview) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Replace ``path`` with ``data`` so that readers see the old content or all of the new, never a part:
    locally a temp file beside it, fsynced and renamed over it; on an object store one upload."""
    if is_uri(path):
        fs, inner = filesystem(path)
        try:
            with fs.open_output_stream(inner) as f:
                f.write(data)
        except (OSError, pa.ArrowException) as e:
            raise StorageError(describe_error(str(path), e)) from e
        return
    path = Path(path)
    tmp = _local_temp_write(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def dumps_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, dumps_json(obj))


def remove(path: str | os.PathLike, *, missing_ok: bool = True) -> None:
    """Delete one file or object."""
    fs, inner = filesystem(path)
    try:
        fs.delete_file(inner)
    except FileNotFoundError:
        if not missing_ok:
            raise


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a directory or prefix and everything under it (absent: nothing to do)."""
    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type == pafs.FileType.NotFound:
        return
    fs.delete_dir(inner)


def make_dirs(path: str | os.PathLike) -> None:
    """Create a local directory (and parents); on an object store nothing: prefixes exist through objects."""
    if not is_uri(path):
        os.makedirs(path, exist_ok=True)


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy every file under ``src`` to the same relative path under ``dst`` (either side local or URI).
    Each file lands whole (one upload, or a local write), but the tree appears file by file: callers that
    need all-or-nothing publish a marker or pointer after this returns."""
    sfs, sin = filesystem(src)
    dfs, din = filesystem(dst)
    if not is_object_store(dst):  # object stores have no directories; other filesystems need them
        dfs.create_dir(din, recursive=True)
    try:
        pafs.copy_files(sin, din, source_filesystem=sfs, destination_filesystem=dfs)
    except (OSError, pa.ArrowException) as e:
        raise StorageError(f"copying {src} to {dst}: {describe_error(str(dst), e)}") from e


# ----------------------------------------------------------------------------------------- conditional writes


def _s3_client():
    import boto3  # lazily: only conditional writes on s3:// need it (pyarrow has no conditional headers)
    from botocore.config import Config

    return boto3.client("s3", config=Config(retries={"mode": "standard", "max_attempts": 5},
                                            connect_timeout=5, read_timeout=30))


def _split(uri: str) -> tuple[str, str]:
    b, _, key = uri.split("://", 1)[1].partition("/")
    return b, key


def _no_conditional(path: str) -> StorageError:
    return StorageError(f"{path}: conditional writes on {scheme(path)}:// are not available through pyarrow "
                        "(GCS has them as generation preconditions, but pyarrow's GcsFileSystem does not expose "
                        "them); use s3:// (or an S3-compatible endpoint) or a local directory here")


def _s3_call(path: str, fn):
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn()
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or \
                e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412:
            raise PreconditionFailed(f"{path}: changed by someone else ({code})") from None
        if code in ("NoSuchKey", "404"):
            raise FileNotFoundError(path) from None
        raise StorageError(describe_error(path, e)) from e
    except BotoCoreError as e:
        raise StorageError(describe_error(path, e)) from e


@contextlib.contextmanager
def _local_guard(path: Path) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent / f".{path.name}.cas", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _require_local_version(path: Path, version: str) -> None:
    """The local half of a compare-and-swap; call it under :func:`_local_guard`."""
    if _local_version(path) != version:
        raise PreconditionFailed(f"{path}: changed by someone else")


def _local_version(path: Path) -> str | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return f"{st.st_ino}-{st.st_mtime_ns}-{st.st_size}"


def read_versioned(path: str | os.PathLike) -> tuple[bytes | None, str | None]:
    """(content, version) of a file or object; (None, None) when absent. The version (an S3 ETag, a local
    inode/mtime) is what :func:`put_if_version` compares against."""
    path = str(path)
    if scheme(path) == "s3":
        b, key = _split(path)
        try:
            r = _s3_call(path, lambda: _s3_client().get_object(Bucket=b, Key=key))
        except FileNotFoundError:
            return None, None
        return r["Body"].read(), r["ETag"]
    if is_uri(path):
        raise _no_conditional(path)
    p = Path(path)
    with _local_guard(p):
        v = _local_version(p)
        try:
            return p.read_bytes(), v
        except FileNotFoundError:
            return None, None


def put_if_absent(path: str | os.PathLike, data: bytes) -> str:
    """Create ``path`` with ``data`` only if nothing is there (a write-once object); returns its version.
    Raises :class:`PreconditionFailed` when it exists, whoever wrote it."""
    path = str(path)
    if scheme(path) == "s3":
        b, key = _split(path)
        r = _s3_call(path, lambda: _s3_client().put_object(Bucket=b, Key=key, Body=data, IfNoneMatch="*"))
        return r["ETag"]
    if is_uri(path):
        raise _no_conditional(path)
    p = Path(path)
    tmp = _local_temp_write(p, data)
    try:
        os.link(tmp, p)  # fails with FileExistsError when the target exists: no window for a second writer
    except FileExistsError:
        raise PreconditionFailed(f"{path}: already exists") from None
    finally:
        os.unlink(tmp)
    return _local_version(p) or ""


def put_if_version(path: str | os.PathLike, data: bytes, version: str | None) -> str:
    """Replace ``path`` with ``data`` only if it is still at ``version`` (None: only if absent); returns the
    new version. Raises :class:`PreconditionFailed` when someone changed it in between. On S3 the version
    is the content's ETag, so a write of identical bytes in between leaves it, and the swap, valid."""
    path = str(path)
    if version is None:
        return put_if_absent(path, data)
    if scheme(path) == "s3":
        b, key = _split(path)
        r = _s3_call(path, lambda: _s3_client().put_object(Bucket=b, Key=key, Body=data, IfMatch=version))
        return r["ETag"]
    if is_uri(path):
        raise _no_conditional(path)
    p = Path(path)
    with _local_guard(p):
        _require_local_version(p, version)
        tmp = _local_temp_write(p, data)
        os.replace(tmp, p)
        return _local_version(p) or ""


def delete_if_version(path: str | os.PathLike, version: str) -> None:
    """Delete ``path`` only if it is still at ``version`` (S3 conditional DELETE); PreconditionFailed otherwise."""
    path = str(path)
    if scheme(path) == "s3":
        b, key = _split(path)
        _s3_call(path, lambda: _s3_client().delete_object(Bucket=b, Key=key, IfMatch=version))
        return
    if is_uri(path):
        raise _no_conditional(path)
    p = Path(path)
    with _local_guard(p):
        _require_local_version(p, version)
        p.unlink()


def atomic_save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> None:
    """Save a matplotlib figure as PNG without ever leaving half an image at ``path``."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
