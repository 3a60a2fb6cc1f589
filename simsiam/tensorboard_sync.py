"""TensorBoard logging of a run: one event file on rank 0 that lands in ``<run dir>/tensorboard``."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any


class TensorBoardSync:
    """TensorBoard event file on rank 0 that lands in ``<run dir>/tensorboard`` on the run's storage.

    Events are written synchronously: :meth:`sync` puts everything logged so far on disk before it
    returns. (tensorboardX's SummaryWriter queues events for a background thread and its ``flush``
    does not wait for that queue, so a trial that Tune stops right after its report - ASHA does - lost
    its last epoch.) Local storage is written in place; for s3:// or gs:// storage the event file is
    written locally and copied up at each sync, so logs survive the worker."""

    def __init__(self, storage: Any | None):
        from tensorboardX.event_file_writer import EventsWriter

        self._fs, self._remote = None, None
        local = None
        if storage is not None:
            import pyarrow.fs as pafs
            target = f"{storage.experiment_fs_path}/tensorboard"
            if isinstance(storage.storage_filesystem, pafs.LocalFileSystem):
                local = target
            else:
                self._fs, self._remote = storage.storage_filesystem, target
        self.dir = local or tempfile.mkdtemp(prefix="simsiam-tb-")
        os.makedirs(self.dir, exist_ok=True)
        # One file per writer; the pid keeps a worker restarted within the same second off the old file.
        self._writer = EventsWriter(os.path.join(self.dir, "events"), filename_suffix=f".{os.getpid()}")

    def scalars(self, values: dict[str, float], step: int) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        now = time.time()
        for k, v in values.items():
            if v is not None:
                self._writer.write_event(Event(wall_time=now, step=int(step), summary=scalar(k, float(v))))

    def sync(self) -> None:
        self._writer.flush()
        if self._fs is not None:
            import pyarrow.fs as pafs
            pafs.copy_files(self.dir, self._remote, destination_filesystem=self._fs)

    def close(self) -> None:
        """Last sync; a local staging copy of remote logs is then removed (the node's disk keeps nothing)."""
        self.sync()
        self._writer.close()
        if self._fs is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
