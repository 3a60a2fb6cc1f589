"""The driver's side of a pretraining run on Ray Train: the controller callbacks, the relay that brings
each epoch's report to the driver, and what a run that Ray Train gave up on ended with.

:func:`simsiam.train.pretrain` composes these around ``TorchTrainer.fit``.
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import ray
import ray.train

from simsiam import checkpoint as ckpt_io
from simsiam.data.schema import DataError
from simsiam.run import EpochRecord, RunOutcome, RunSpec, Status


def data_error_in(exc: BaseException | None) -> DataError | None:
    """Our DataError inside the wrappers Ray Train puts around a worker's exception, if any."""
    seen = 0
    while exc is not None and seen < 16:
        if type(exc) is DataError:
            return exc
        exc = getattr(exc, "_base_exc", None) or getattr(exc, "controller_failure", None) or exc.__cause__
        seen += 1
    return None


class FailFastOnDataError(ray.train.UserCallback):
    """A bad row is a deterministic error: retrying it (``train.max_failures`` times, each restarting the
    worker group) only fails later with the same row. Raising it here, in the Train controller, makes it a
    controller error, which Ray Train's failure policy does not retry: the run ends at once, its reason
    the one-line DataError naming shard and row."""

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for exc in worker_exceptions.values():
            found = data_error_in(exc)
            if found is not None:
                raise DataError(str(found).splitlines()[0])


class ReportRelay(ray.train.UserCallback):
    """Sends rank 0's reported metrics from the Train controller to the driver, through a Ray queue, so
    the driver prints each epoch's line itself (intact, in order, none lost at exit)."""

    def __init__(self, queue: Any):
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
        if metrics:
            self.queue.put(dict(metrics[0]))


def _relay(queue: Any, on_report: Callable[[dict], None], done: threading.Event,
           on_idle: Callable[[], None] | None) -> None:
    from queue import Empty

    while True:
        try:
            item = queue.get(timeout=0.5)
        except Empty:
            if done.is_set():
                return
            if on_idle is not None:
                on_idle()
            continue
        except (Exception, SystemExit):  # noqa: BLE001 - the queue's actor is gone (Ray shut down under
            return                       # the run, e.g. a node lost): no report can come any more
        on_report(item)


@contextlib.contextmanager
def relayed_reports(on_report: Callable[[dict], None] | None,
                    on_idle: Callable[[], None] | None = None) -> Iterator[list]:
    """The callbacks (none without ``on_report``) that deliver every report to ``on_report`` on this
    process, in order, all of them before the block ends; ``on_idle`` about twice a second in between."""
    if on_report is None:
        yield []
        return
    from ray.util.queue import Queue

    queue = Queue(actor_options={"num_cpus": 0})
    done = threading.Event()
    relay = threading.Thread(target=_relay, args=(queue, on_report, done, on_idle), daemon=True,
                             name="simsiam-report-relay")
    relay.start()
    try:
        yield [ReportRelay(queue)]
    finally:
        done.set()  # every report was queued before fit() returned: the relay drains, then stops
        relay.join()
        ray.kill(queue.actor)


def with_scheme(path: str | None, storage_path: str) -> str | None:
    """Ray gives checkpoint paths on remote storage without their scheme (``bucket/key``); put it back so
    the path means the same thing to the next TorchTrainer (linear evaluation, warm starts)."""
    if path and "://" in storage_path and "://" not in path:
        return f"{storage_path.split('://', 1)[0]}://{path}"
    return path


def failure_reason(e: BaseException) -> str:
    """A failed run's reason in one line: bad data named by shard and row, else the first failing
    worker's (or the controller's) exception, without the tracebacks Ray Train puts in its message."""
    from simsiam.console import one_line

    bad = data_error_in(e)
    if bad is not None:
        return f"bad data: {str(bad).splitlines()[0]}"
    failures = getattr(e, "worker_failures", None)
    if failures:
        rank, exc = min(failures.items(), key=lambda kv: kv[0])
        return f"training failed: worker rank {rank}: {one_line(exc)}"
    return f"training failed: {one_line(getattr(e, 'controller_failure', None) or e)}"


def failed_run(spec: RunSpec, e: BaseException) -> RunOutcome:
    """The outcome of a run Ray Train gave up on: its reason, and the history and latest checkpoint it
    left (so a rerun resumes there). The traceback goes to the run's log."""
    from simsiam import console

    if console.log_path() is not None:
        console.log_exception(e)
    latest = with_scheme(_latest_checkpoint(spec), spec.storage_path)
    history: tuple[EpochRecord, ...] = ()
    if latest:
        ckpt = ray.train.Checkpoint(latest)
        with ckpt.as_directory() as d:
            rows = ckpt_io.load(d)["extra"].get("history", [])
        history = tuple(EpochRecord.from_dict(r) for r in rows)
    return RunOutcome(Status.FAILED, failure_reason(e), history, latest, os.path.join(spec.storage_path, spec.name))


def _latest_checkpoint(spec: RunSpec) -> str | None:
    try:
        res = ray.train.Result.from_path(os.path.join(spec.storage_path, spec.name))
    except Exception:  # noqa: BLE001 - no run directory yet means no checkpoint
        return None
    return res.checkpoint.path if res.checkpoint is not None else None
