"""What a person sees: the project's lines on the console, everything else in a log file.

A pipeline opens a :func:`session` on its run directory. Inside it this process's stdout and stderr
(file descriptors 1 and 2, so Ray's C++ core, its log monitor forwarding worker output, Ray Data and
Tune all included) go to ``<run dir>/ray.log``; only lines written with :func:`say`, :func:`warn`
and :func:`error` reach the terminal (and the log too, so the log is the whole story). ``--verbose``
leaves the descriptors alone: Ray's output comes back on the console as Ray prints it.

The lines about training are printed here, by the driver, from the metrics the workers report
(:func:`epoch_line`), not forwarded from worker stdout: forwarded output arrives late, can be lost
when the driver exits, and once interleaved with the driver's own lines.

On a terminal, :func:`progress` keeps one updating line (what is running, for how long); when the
output is not a terminal it prints nothing.

Importing this module stays light (no Ray, no torch): the CLI prints its first line at once.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

PREFIX = "[simsiam]"
LOG_FILE = "ray.log"

# Ray knobs that only make output: set before Ray starts, so a local cluster's processes inherit them.
# Ray Data's progress bars (and its "new progress UI" notice) are cursor codes in a log file.
QUIET_ENV = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


class _Console:
    def __init__(self) -> None:
        self.out: TextIO | None = None  # None: sys.stdout as it is now
        self.err: TextIO | None = None
        self.log: TextIO | None = None
        self.log_path: Path | None = None
        self.tty = False
        self.progress_shown = False
        self.progress_line = ""
        self.verbose = False
        self.lock = threading.Lock()


_C = _Console()


def _stream(err: bool = False) -> TextIO:
    s = _C.err if err else _C.out
    return s if s is not None else (sys.stderr if err else sys.stdout)


def _emit(line: str, err: bool = False) -> None:
    with _C.lock:
        stream = _stream(err)
        if _C.progress_shown:
            _stream().write("\r\x1b[K")
            _C.progress_shown = False
        # --verbose: Ray's progress bars end without a newline; start ours on a line of its own.
        lead = ("\r\x1b[K" if stream.isatty() else "\n") if _C.verbose else ""
        stream.write(lead + line + "\n")
        stream.flush()
        if _C.log is not None:  # the log is the whole story: the project's lines beside Ray's
            _C.log.write(line + "\n")
            _C.log.flush()


def say(msg: str) -> None:
    """One project line on the console: ``[simsiam] msg``."""
    _emit(f"{PREFIX} {msg}")


def warn(msg: str) -> None:
    """A warning that needs the user: ``[simsiam] warning: msg`` on stderr."""
    _emit(f"{PREFIX} warning: {msg}", err=True)


def error(msg: str) -> None:
    """An error the user can act on: ``[simsiam] error: msg`` on stderr (no traceback: see :func:`log_exception`)."""
    _emit(f"{PREFIX} error: {msg}", err=True)


def text(block: str) -> None:
    """Lines shown as they are (a results table), without the prefix."""
    for line in block.rstrip("\n").splitlines():
        _emit(line)


def progress(msg: str) -> None:
    """Replace the single progress line on a terminal; nothing when output is not a terminal."""
    if not _C.tty:
        return
    with _C.lock:
        width = shutil.get_terminal_size((100, 20)).columns - 1
        line = f"{PREFIX} {msg}"[:width]
        if _C.progress_shown and line == _C.progress_line:
            return
        _stream().write("\r" + line + "\x1b[K")
        _stream().flush()
        _C.progress_shown, _C.progress_line = True, line


def one_line(exc: BaseException, limit: int = 400) -> str:
    """``Type: first line of the message``, cut at ``limit``: a reason for results.json and the console
    (the whole message and traceback belong in the log)."""
    base = getattr(exc, "_base_exc", None) or exc  # Ray Train's wrapper of a worker's exception
    line = next((ln.strip() for ln in str(base).splitlines() if ln.strip()), "")
    text = f"{type(base).__name__}: {line}" if line else type(base).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def log_path() -> Path | None:
    """The log file of the open session, if any."""
    return _C.log_path


def log_exception(exc: BaseException) -> str:
    """Write ``exc``'s traceback to the log (or stderr without a session); return where it went."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if _C.log is not None:
        _C.log.write(text)
        _C.log.flush()
        return str(_C.log_path)
    sys.stderr.write(text)
    return "stderr"


def quiet_ray_env(verbose: bool = False) -> None:
    """Set the output-only Ray knobs (unless the user set them, or asked for Ray's output)."""
    if verbose:
        return
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    if "ray.data" in sys.modules:  # a DataContext made before the variable was set keeps its bars
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False


@contextlib.contextmanager
def session(run_dir: str | os.PathLike, verbose: bool = False) -> Iterator[Path]:
    """Send this process's stdout/stderr to ``run_dir/ray.log`` (appending) and keep the console for
    the project's lines, until the block ends. With ``verbose`` only the project's lines (and
    tracebacks) are logged and Ray's output stays on the console. Yields the log's path."""
    path = Path(run_dir).resolve() / LOG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    quiet_ray_env(verbose)
    sys.stdout.flush()
    sys.stderr.flush()
    log = open(path, "a", buffering=1)  # noqa: SIM115 - closed below
    saved = (_C.out, _C.err, _C.log, _C.log_path, _C.tty, _C.verbose)
    dups: tuple[int, int] | None = None
    try:
        _C.log, _C.log_path, _C.verbose = log, path, verbose
        if verbose:
            _C.tty = False  # Ray writes to the same terminal: an updating line would break into its output
        else:
            dups = (os.dup(1), os.dup(2))
            _C.out = os.fdopen(os.dup(dups[0]), "w", buffering=1, closefd=True)
            _C.err = os.fdopen(os.dup(dups[1]), "w", buffering=1, closefd=True)
            _C.tty = _C.out.isatty()
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            # Python-level writes too, where something (a notebook, a test runner) replaced sys.stdout.
            py_streams = (sys.stdout, sys.stderr)
            sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
            sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
        yield path
    finally:
        if "simsiam.ray_utils" in sys.modules:
            # A Ray this session connected to is released inside it: the log monitor's last forwarded
            # lines and the shutdown's own land in the log, not on the console at exit.
            sys.modules["simsiam.ray_utils"].release_ray()
        with _C.lock:
            if _C.progress_shown:
                _stream().write("\r\x1b[K")
                _C.progress_shown = False
        sys.stdout.flush()
        sys.stderr.flush()
        if dups is not None:
            sys.stdout, sys.stderr = py_streams
            os.dup2(dups[0], 1)
            os.dup2(dups[1], 2)
            for fd in dups:
                os.close(fd)
            for s in (_C.out, _C.err):
                if s is not None:
                    s.close()
        _C.out, _C.err, _C.log, _C.log_path, _C.tty, _C.verbose = saved
        log.close()


# ------------------------------------------------------------------------------------------ lines


def epoch_line(m: Mapping[str, Any], epochs: int) -> str:
    """The per-epoch line from one epoch's reported metrics (the keys train.py reports)."""
    knn = f" knn {m['knn_top1']:.1f}%" if m.get("knn_top1") is not None else ""
    skipped = f" skipped {m['skipped_images']}" if m.get("skipped_images") else ""
    return (f"epoch {m['epoch']}/{epochs} loss {m['loss']:.4f} std {m['collapse_std']:.4f} "
            f"rank {m['effective_rank']:.1f}{knn} {m['pairs_per_s']:.0f} pairs/s lr {m['lr']:.4g} "
            f"workers {m.get('world_size', 1)}{skipped}")


def baseline_lines(results: Mapping[str, Any]) -> list[str]:
    """Lines comparing the run with its baselines, when results.json has them (random init, raw pixels)."""
    base = results.get("baselines") or {}
    if not isinstance(base, Mapping) or not base:
        return []
    parts = []
    for name, vals in base.items():
        if isinstance(vals, Mapping) and vals.get("linear_top1") is not None:
            knn = f", kNN {vals['knn_top1']:.2f}%" if vals.get("knn_top1") is not None else ""
            parts.append(f"{name.replace('_', ' ')} linear top-1 {vals['linear_top1']:.2f}%{knn}")
    return [f"baselines: {'; '.join(parts)}"] if parts else []
