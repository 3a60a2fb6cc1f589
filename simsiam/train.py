"""Distributed SimSiam pretraining on Ray Train V2.

``train_loop_per_worker`` runs in every TorchTrainer worker: DDP SimSiam with the photometric
augmentation on the worker's device, both collapse metrics every step, the kNN monitor every few
epochs, and a checkpoint + report each epoch. :func:`pretrain` builds the trainer around it.

With the cached linear-evaluation protocol, the evaluation of the final weights runs at the end of the
same run (rank 0 extracts the features and fits the classifier): the numbers are those of
:func:`simsiam.evaluate.linear_eval`, without starting, scheduling and loading a second worker group,
which cost ~25 s per run on the 2-core sample setup.

Elastic rule: the per-worker batch is fixed (``optim.batch_size / train.num_workers``); when the run
continues with fewer (or more) workers, the global batch is per-worker batch x live workers and the lr
follows it by the paper's rule, lr = base_lr x global batch / 256. The cosine schedule keeps its
position by epoch, so a resize neither restarts nor skips the schedule.
"""
from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from simsiam import checkpoint as ckpt_io
from simsiam.augment import normalize
from simsiam.config import Config, from_dict
from simsiam.data import device_decode
from simsiam.data import pipeline as data_pipeline
from simsiam.data.schema import DataError
from simsiam.evaluate import linear_eval_cached_on_shards
from simsiam.metrics import CollapseGuard, knn_accuracy
from simsiam.model import SimSiam
from simsiam.optim import build_optimizer, cosine_lr, scaled_lr, set_lr
from simsiam.ray_utils import worker_print
from simsiam.step import SimSiamStep, StepMetrics

CHECKPOINT_FILE = "checkpoint.pt"
STATUSES = ("finished", "collapsed", "diverged", "failed")


def _seed(*parts: Any) -> int:
    """A stable 63-bit seed from any parts (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


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


def _all_min(value: int, device: torch.device, world: int) -> int:
    t = torch.tensor([value], device=device)
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def _all_mean(values: list[float], device: torch.device, world: int) -> list[float]:
    """Average per-worker scalars over all workers, so every rank takes the same decisions."""
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    if world > 1:
        dist.all_reduce(t)
        t /= world
    return t.tolist()


@torch.no_grad()
def _knn_monitor(backbone: nn.Module, cfg: Config, device: torch.device) -> float | None:
    """Weighted kNN top-1 (percent) of the frozen backbone: train set as the bank, held-out set as queries."""
    bank_it, test_it = ray.train.get_dataset_shard("knn_bank"), ray.train.get_dataset_shard("knn_test")
    if bank_it is None or test_it is None:
        return None
    was_training = backbone.training
    backbone.eval()

    def feats(it):
        fs, ls = [], []
        for images, labels in data_pipeline.iter_eval_batches(it, 256, device):
            fs.append(nn.functional.normalize(backbone(normalize(images, cfg.data)).float(), dim=1))
            ls.append(labels)
        return torch.cat(fs), torch.cat(ls)

    bank_f, bank_l = feats(bank_it)
    test_f, test_l = feats(test_it)
    backbone.train(was_training)
    return 100.0 * knn_accuracy(bank_f, bank_l, test_f, test_l, k=cfg.train.knn_k, t=cfg.train.knn_t)


def _linear_eval_in_run(backbone: nn.Module, cfg: Config, num_classes: int, device: torch.device, rank: int,
                        world: int) -> dict | None:
    """The cached linear evaluation of the final weights on rank 0 (the others wait at a barrier);
    returns its result on rank 0, None elsewhere."""
    result = None
    if rank == 0:
        try:
            result = {**linear_eval_cached_on_shards(backbone, cfg, num_classes, device, "linear_fit", "linear_test"),
                      "in_run": True}
        except Exception as e:  # noqa: BLE001 - the pretraining stands; its caller records the failed evaluation
            result = {"error": f"{type(e).__name__}: {e}"}
    if world > 1:
        dist.barrier()
    return result


def train_loop_per_worker(loop_config: dict) -> dict:
    """One TorchTrainer worker. Returns (from every rank; Ray keeps rank 0's) the run summary."""
    cfg = from_dict(loop_config["config"])
    num_rows: int = loop_config["num_rows"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    if on_gpu:
        # Every step has the same shapes: let cuDNN pick its fastest kernels once (gpu_step measures so).
        torch.backends.cudnn.benchmark = True

    # ---- model and optimiser (same init on every rank; DDP also broadcasts rank 0's weights)
    torch.manual_seed(cfg.train.seed)
    net = SimSiam(cfg.model)
    if world > 1 and cfg.train.sync_bn and on_gpu:
        # torch's SyncBatchNorm runs on accelerators only; on CPU (gloo) each worker keeps its own stats.
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    if on_gpu and cfg.train.channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(net)
    net = getattr(model, "module", model)

    per_worker_batch = cfg.optim.batch_size // cfg.train.num_workers
    global_batch = per_worker_batch * world
    init_lr = scaled_lr(cfg.optim.base_lr, global_batch)
    optimizer = build_optimizer(net, cfg.optim, global_batch)
    steps_per_epoch = max(1, num_rows // global_batch)
    if cfg.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
    guard = CollapseGuard(cfg.train.collapse_guard, cfg.model.dim)
    step_fn = SimSiamStep(model, cfg, device)

    if cfg.train.init_checkpoint and ray.train.get_checkpoint() is None:
        # Warm start (scheduled retraining): weights only; optimiser, schedule and epoch start fresh.
        with ray.train.Checkpoint(cfg.train.init_checkpoint).as_directory() as d:
            net.load_state_dict(ckpt_io.load(Path(d) / CHECKPOINT_FILE)["model"])

    # ---- resume: model, optimiser, schedule position, RNG, guard and history from the last checkpoint
    start_epoch, step, history = 0, 0, []
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as d:
            state = ckpt_io.load(Path(d) / CHECKPOINT_FILE)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step = state["epoch"] + 1, state["step"]
        history = list(state["extra"].get("history", []))
        guard.load_state_dict(state["extra"].get("guard", {}))
        ckpt_io.restore_rng(state)
        if rank == 0:
            worker_print(f"[simsiam] resumed from epoch {state['epoch'] + 1} checkpoint; {world} worker(s), "
                         f"global batch {global_batch}, lr {init_lr:.4g}")

    tb = TensorBoardSync(ctx.get_storage() if hasattr(ctx, "get_storage") else None) if rank == 0 else None
    train_it = ray.train.get_dataset_shard("train")
    gen = torch.Generator(device=device)
    window = StepMetrics(device, world)
    status, reason = "finished", ""

    def consume(rows: list[dict], sums: dict, epoch: int) -> tuple[str, str]:
        """Account read-back steps; the first non-finite or collapsed one ends the run."""
        for r in rows:
            if not all(math.isfinite(r[k_]) for k_ in ("loss", "collapse_std", "effective_rank")):
                return "diverged", (f"loss became {r['loss']} at epoch {epoch + 1}, step {r['step']}: the run "
                                    f"stopped and its last good checkpoint is kept (try a lower optim.base_lr "
                                    f"than {cfg.optim.base_lr})")
            for k_ in sums:
                sums[k_] += r[k_]
            if tb is not None:
                tb.scalars({f"train/{k_}": r[k_] for k_ in ("loss", "collapse_std", "effective_rank", "lr")},
                           r["step"])
            if guard.update(r["collapse_std"], r["effective_rank"], r["batch"]):
                return "collapsed", guard.reason
        return "finished", ""

    for epoch in range(start_epoch, cfg.train.epochs):
        model.train()
        # Photometric randomness keyed by (seed, rank, epoch): a resumed epoch draws what it would have.
        gen.manual_seed(_seed(cfg.train.seed, rank, epoch))
        sums = {"loss": 0.0, "collapse_std": 0.0, "effective_rank": 0.0}
        n_steps, pairs, skipped = 0, 0, 0

        t0 = time.perf_counter()
        batches = data_pipeline.iter_train_batches(train_it, cfg.data, per_worker_batch, cfg.train.seed, epoch, device,
                                                   decode=loop_config.get("decode", "cpu"))
        for i, (v1, v2, n_skip) in enumerate(batches):
            if cfg.train.max_steps_per_epoch and i >= cfg.train.max_steps_per_epoch:
                break
            if cfg.data.on_bad_image == "skip" and _all_min(v1.shape[0], device, world) < 2:
                # Skipped images left a batch too small for BN somewhere: every rank skips it, as DDP needs.
                skipped += n_skip
                continue
            lr = cosine_lr(init_lr, epoch + min(i / steps_per_epoch, 1.0), cfg.train.epochs, cfg.optim.warmup_epochs)
            set_lr(optimizer, lr, init_lr)
            loss, z1 = step_fn(v1, v2, gen, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            n_steps += 1
            pairs += v1.shape[0]
            skipped += n_skip
            window.add(step, loss, z1, lr)
            if step % cfg.train.log_every == 0:
                status, reason = consume(window.flush(), sums, epoch)
                if status != "finished":
                    break
        if status == "finished":
            status, reason = consume(window.flush(), sums, epoch)
        elapsed = time.perf_counter() - t0
        if status != "finished" or n_steps == 0:
            if n_steps == 0 and status == "finished":
                status, reason = "failed", f"epoch {epoch + 1} produced no batch: fewer rows than one batch?"
            break

        pairs_total, skipped_total = _all_mean([float(pairs), float(skipped)], device, world)
        record = {
            "epoch": epoch + 1,
            "step": step,
            "loss": sums["loss"] / n_steps,
            "collapse_std": sums["collapse_std"] / n_steps,
            "effective_rank": sums["effective_rank"] / n_steps,
            "lr": lr,
            "pairs_per_s": pairs_total * world / max(elapsed, 1e-9),
            "skipped_images": int(round(skipped_total * world)),
            "world_size": world,
            "global_batch": global_batch,
            "knn_top1": None,
        }
        last = epoch + 1 == cfg.train.epochs
        if rank == 0 and cfg.train.knn_every and ((epoch + 1) % cfg.train.knn_every == 0 or last):
            record["knn_top1"] = _knn_monitor(net.backbone, cfg, device)
        history.append(record)
        if tb is not None:
            tb.scalars({"epoch/loss": record["loss"], "epoch/collapse_std": record["collapse_std"],
                        "epoch/effective_rank": record["effective_rank"], "epoch/knn_top1": record["knn_top1"],
                        "epoch/pairs_per_s": record["pairs_per_s"], "epoch/skipped_images": record["skipped_images"]},
                       epoch + 1)
            tb.sync()
        # The console's epoch line is the driver's, from this report (simsiam.console.epoch_line).
        metrics = {k_: v for k_, v in record.items() if v is not None}
        if (epoch + 1) % cfg.train.checkpoint_every == 0 or last:
            checkpoint = None
            if rank == 0:
                d = tempfile.mkdtemp(prefix="simsiam-ckpt-")
                ckpt_io.save(Path(d) / CHECKPOINT_FILE, ckpt_io.state(
                    net, optimizer, epoch, step, cfg, extra={"history": history, "guard": guard.state_dict()}))
                checkpoint = ray.train.Checkpoint.from_directory(d)
            # Uploaded in the background: the next epoch starts at once instead of waiting for the upload
            # (3.5 s per epoch for the cifar10 preset's 148 MB checkpoint; benchmarks/checkpoint_upload.py).
            # Ray registers the checkpoint only once uploaded, deletes the local copy then, and flushes
            # pending uploads before the run ends; a failed upload fails the step like a sync one.
            ray.train.report(metrics, checkpoint=checkpoint,
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
        else:
            ray.train.report(metrics)

    linear = None
    if status == "finished" and loop_config.get("linear_num_classes"):
        linear = _linear_eval_in_run(net.backbone, cfg, loop_config["linear_num_classes"], device, rank, world)
        if tb is not None and "top1" in linear:
            tb.scalars({"eval/linear_top1": linear["top1"], "eval/linear_top5": linear["top5"]}, step)
    if tb is not None:
        tb.close()
    return {"status": status, "reason": reason, "history": history, "world_size": world,
            "replicas": _replica_report(net, world), "linear": linear}


def _replica_report(net: nn.Module, world: int) -> list[dict]:
    """Per rank: node id and a checksum of the parameters. DDP must leave every replica identical,
    so a mismatch here is a real bug (and what the multi-worker tests assert on)."""
    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten().cpu() for p in net.parameters()])
    mine = {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
            "param_sum": float(flat.sum()), "param_hash": hashlib.sha256(flat.numpy().tobytes()).hexdigest()}
    if world == 1:
        return [mine]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    return gathered


# ----------------------------------------------------------------------------- driver side


@dataclass
class PretrainResult:
    """What a pretraining run ended with. ``checkpoint`` is the latest checkpoint directory (or URI)."""

    status: str
    reason: str
    history: list[dict] = field(default_factory=list)
    checkpoint: str | None = None
    run_path: str | None = None
    replicas: list[dict] = field(default_factory=list)
    linear: dict | None = None  # the in-run linear evaluation (cached protocol), when it ran

    @property
    def last(self) -> dict:
        return self.history[-1] if self.history else {}

    def linear_result(self) -> dict | None:
        """The in-run linear evaluation's result, None if it did not run; raises if it failed."""
        if self.linear and "error" in self.linear:
            raise RuntimeError(self.linear["error"])
        return self.linear


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


def build_trainer(cfg: Config, train_path: str, eval_path: str | None, storage_path: str,
                  callbacks: list | None = None, linear_fit_path: str | None = None):
    """The TorchTrainer for one pretraining run; rerunning with the same run.name resumes it.
    ``callbacks`` are Ray Train UserCallbacks (e.g. Tune's TuneReportCallback inside a trial).
    ``linear_fit_path``: labeled data to fit the in-run linear classifier on (cached protocol only)."""
    from ray.train.torch import TorchTrainer

    meta = data_pipeline.dataset_info(train_path)
    decode = device_decode.resolve(cfg.data, train_path, cfg.train.use_gpu)
    datasets = {"train": data_pipeline.train_dataset(cfg.data, train_path, cfg.train.seed, decode)}
    if cfg.train.knn_every and eval_path and meta["labeled"]:
        datasets["knn_bank"] = data_pipeline.eval_dataset(cfg.data, train_path)
        datasets["knn_test"] = data_pipeline.eval_dataset(cfg.data, eval_path)
    linear_classes = None
    if linear_fit_path and eval_path and cfg.eval.enabled and cfg.eval.linear.protocol == "cached":
        fit = meta if linear_fit_path == train_path else data_pipeline.dataset_info(linear_fit_path)
        if fit["labeled"]:  # else the separate evaluation reports what is wrong
            datasets["linear_fit"] = data_pipeline.eval_dataset(cfg.data, linear_fit_path)
            datasets["linear_test"] = data_pipeline.eval_dataset(cfg.data, eval_path)
            linear_classes = fit["num_classes"]
    t = cfg.train
    scaling = ray.train.ScalingConfig(
        num_workers=(t.min_workers, t.num_workers) if t.min_workers else t.num_workers,
        use_gpu=t.use_gpu,
        resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})},
        placement_strategy=t.placement_strategy,
    )
    run_config = ray.train.RunConfig(
        name=cfg.run.name,
        storage_path=storage_path,
        failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
        callbacks=[FailFastOnDataError(), *(callbacks or [])],
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "num_rows": meta["num_rows"], "linear_num_classes": linear_classes,
                           "decode": decode},
        scaling_config=scaling,
        run_config=run_config,
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"],
                                            execution_options=data_pipeline.ingest_options(cfg.data)),
    )


def pretrain(cfg: Config, train_path: str, eval_path: str | None, storage_path: str,
             callbacks: list | None = None, linear_fit_path: str | None = None,
             on_report: Callable[[dict], None] | None = None,
             on_idle: Callable[[], None] | None = None) -> PretrainResult:
    """Run (or resume) pretraining to the end; never raises for a failed run - it returns status 'failed'.

    With ``linear_fit_path`` (and ``eval.enabled``, the cached protocol, labeled data) a finished run
    also linear-evaluates its final weights before its workers stop: ``result.linear``.
    ``on_report`` is called on this (the driver's) process with each epoch's reported metrics, in order,
    all of them before this returns; ``on_idle`` about twice a second in between (progress display)."""
    callbacks = list(callbacks or [])
    relay = None
    if on_report is not None:
        from ray.util.queue import Queue

        queue = Queue(actor_options={"num_cpus": 0})
        callbacks.append(ReportRelay(queue))
        done = threading.Event()
        relay = threading.Thread(target=_relay, args=(queue, on_report, done, on_idle), daemon=True,
                                 name="simsiam-report-relay")
        relay.start()
    trainer = build_trainer(cfg, train_path, eval_path, storage_path, callbacks, linear_fit_path)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        latest = _with_scheme(_latest_checkpoint_path(storage_path, cfg.run.name), storage_path)
        history = _history_from_checkpoint(latest)
        from simsiam import console

        if console.log_path() is not None:
            console.log_exception(e)
        bad = data_error_in(e)
        reason = (f"bad data: {str(bad).splitlines()[0]}" if bad is not None
                  else f"training failed: {_failure_reason(e)}")
        return PretrainResult("failed", reason, history, latest, os.path.join(storage_path, cfg.run.name))
    finally:
        if relay is not None:
            done.set()  # every report was queued before fit() returned: the relay drains, then stops
            relay.join()
            ray.kill(queue.actor)
    summary = result.return_value or {}
    ckpt = _with_scheme(result.checkpoint.path, storage_path) if result.checkpoint is not None else None
    return PretrainResult(summary.get("status", "failed"), summary.get("reason", "no summary returned"),
                          summary.get("history", []), ckpt, result.path, summary.get("replicas", []),
                          summary.get("linear"))


def _failure_reason(e: BaseException) -> str:
    """A failed run's reason in one line: the first failing worker's (or the controller's) exception,
    without the tracebacks Ray Train puts in its message (those go to the run's log)."""
    from simsiam.console import one_line

    failures = getattr(e, "worker_failures", None)
    if failures:
        rank, exc = min(failures.items(), key=lambda kv: kv[0])
        return f"worker rank {rank}: {one_line(exc)}"
    return one_line(getattr(e, "controller_failure", None) or e)


def _with_scheme(path: str | None, storage_path: str) -> str | None:
    """Ray gives checkpoint paths on remote storage without their scheme (``bucket/key``); put it back so
    the path means the same thing to the next TorchTrainer (linear evaluation, warm starts)."""
    if path and "://" in storage_path and "://" not in path:
        return f"{storage_path.split('://', 1)[0]}://{path}"
    return path


def _latest_checkpoint_path(storage_path: str, name: str) -> str | None:
    try:
        res = ray.train.Result.from_path(os.path.join(storage_path, name))
    except Exception:  # noqa: BLE001 - no run directory yet means no checkpoint
        return None
    return res.checkpoint.path if res.checkpoint is not None else None


def _history_from_checkpoint(path: str | None) -> list[dict]:
    if not path:
        return []
    ckpt = ray.train.Checkpoint(path)
    with ckpt.as_directory() as d:
        return list(ckpt_io.load(Path(d) / CHECKPOINT_FILE)["extra"].get("history", []))
