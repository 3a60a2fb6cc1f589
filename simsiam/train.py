"""Distributed SimSiam pretraining on Ray Train V2.

``train_loop_per_worker`` runs in every TorchTrainer worker, in the shape of Ray's own examples: restore
or warm start; for each epoch, train it (:class:`simsiam.epoch.EpochTrainer`, free of Ray) and end it
with a report and a checkpoint; then the final evaluation. :func:`build_trainer` and :func:`pretrain`,
at the end of the module, build the trainer around it on the driver.

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

import dataclasses
import hashlib
import os
import tempfile
from collections.abc import Callable, Sequence
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
from simsiam.epoch import EpochTrainer, RunStopped
from simsiam.evaluate import knn_monitor, linear_eval_cached_on_shards
from simsiam.model import SimSiam
from simsiam.ray_compat import train_run_storage
from simsiam.ray_utils import worker_print
from simsiam.run import EpochRecord, RunOutcome, RunSpec, Status
from simsiam.tensorboard_sync import TensorBoardSync
from simsiam.train_driver import FailFastOnDataError, failed_run, relayed_reports, with_scheme

__all__ = ["TensorBoardSync", "build_trainer", "pretrain", "train_loop_per_worker"]


def train_loop_per_worker(loop_config: dict) -> RunOutcome:
    """One TorchTrainer worker. Returns (from every rank; Ray keeps rank 0's) the run's outcome, without
    the checkpoint and run paths, which the driver fills in."""
    cfg = from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    tb = TensorBoardSync(train_run_storage(ctx)) if rank == 0 else None
    trainer = EpochTrainer(_prepare_model(cfg, device, world), cfg, device, rank, world, loop_config["num_rows"], tb)
    start_epoch, history = _restore_or_warm_start(trainer)
    shard = ray.train.get_dataset_shard("train")
    try:
        for epoch in range(start_epoch, cfg.train.epochs):
            batches = data_pipeline.iter_train_batches(shard, cfg.data, trainer.per_worker_batch, cfg.train.seed,
                                                       epoch, device, decode=loop_config.get("decode", "cpu"))
            history.append(_with_knn(trainer.run_epoch(epoch, batches), trainer))
            _end_epoch(trainer, epoch, history)
    except RunStopped as stop:
        outcome = RunOutcome(stop.status, stop.reason, tuple(history))
    else:
        outcome = _final_evaluation(trainer, history, loop_config.get("linear_num_classes"))
    if tb is not None:
        tb.close()
    replicas = _replica_report(trainer.net, world) if loop_config.get("check_replicas") else []
    return dataclasses.replace(outcome, replicas=tuple(replicas))


# ----------------------------------------------------------------------------- the worker's steps


def _prepare_model(cfg: Config, device: torch.device, world: int) -> nn.Module:
    """SimSiam with the same init on every rank (DDP also broadcasts rank 0's weights), DDP-wrapped."""
    on_gpu = device.type == "cuda"
    if on_gpu:
        # Every step has the same shapes: let cuDNN pick its fastest kernels once (gpu_step measures so).
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.train.seed)
    net = SimSiam(cfg.model)
    if world > 1 and cfg.train.sync_bn and on_gpu:
        # torch's SyncBatchNorm runs on accelerators only; on CPU (gloo) each worker keeps its own stats.
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    if on_gpu and cfg.train.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return ray.train.torch.prepare_model(net)


def _restore_or_warm_start(trainer: EpochTrainer) -> tuple[int, list[EpochRecord]]:
    """Resume from the run's last checkpoint (weights, optimiser, schedule, RNG, guard, history), or
    warm-start the weights from ``train.init_checkpoint`` (scheduled retraining: optimiser, schedule and
    epoch start fresh). Returns (first epoch to train, history so far)."""
    cfg = trainer.cfg
    resumed = ray.train.get_checkpoint()
    if resumed is None:
        if cfg.train.init_checkpoint:
            with ray.train.Checkpoint(cfg.train.init_checkpoint).as_directory() as d:
                trainer.net.load_state_dict(ckpt_io.load(d)["model"])
        return 0, []
    with resumed.as_directory() as d:
        start_epoch, history = trainer.load_state(ckpt_io.load(d))
    if trainer.rank == 0:
        worker_print(f"[simsiam] resumed from epoch {start_epoch} checkpoint; {trainer.world} worker(s), "
                     f"global batch {trainer.global_batch}, lr {trainer.init_lr:.4g}")
    return start_epoch, history


def _with_knn(record: EpochRecord, trainer: EpochTrainer) -> EpochRecord:
    """The epoch's record with the kNN monitor's top-1 (rank 0, every ``train.knn_every`` epochs and the
    last) when the run has labelled data for it."""
    cfg = trainer.cfg
    last = record.epoch == cfg.train.epochs
    if trainer.rank != 0 or not cfg.train.knn_every or not (record.epoch % cfg.train.knn_every == 0 or last):
        return record
    bank, queries = ray.train.get_dataset_shard("knn_bank"), ray.train.get_dataset_shard("knn_test")
    if bank is None or queries is None:
        return record
    device = trainer.device
    top1 = knn_monitor(trainer.net.backbone, data_pipeline.iter_eval_batches(bank, 256, device),
                       data_pipeline.iter_eval_batches(queries, 256, device), lambda x: normalize(x, cfg.data),
                       device, k=cfg.train.knn_k, t=cfg.train.knn_t)
    return dataclasses.replace(record, knn_top1=100.0 * top1)


def _end_epoch(trainer: EpochTrainer, epoch: int, history: list[EpochRecord]) -> None:
    """TensorBoard, then the report every epoch; with a checkpoint every ``train.checkpoint_every``
    epochs and at the last. The console's epoch line is the driver's, from this report."""
    record, tb, cfg = history[-1], trainer.tb, trainer.cfg
    if tb is not None:
        tb.scalars({f"epoch/{k}": getattr(record, k) for k in ("loss", "collapse_std", "effective_rank",
                                                               "knn_top1", "pairs_per_s", "skipped_images")},
                   record.epoch)
        tb.sync()
    if record.epoch % cfg.train.checkpoint_every and record.epoch != cfg.train.epochs:
        ray.train.report(record.metrics())
        return
    checkpoint = None
    if trainer.rank == 0:
        d = tempfile.mkdtemp(prefix="simsiam-ckpt-")
        ckpt_io.save(Path(d) / ckpt_io.CHECKPOINT_FILE, trainer.state(epoch, history))
        checkpoint = ray.train.Checkpoint.from_directory(d)
    # Uploaded in the background: the next epoch starts at once instead of waiting for the upload
    # (3.5 s per epoch for the cifar10 preset's 148 MB checkpoint; benchmarks/checkpoint_upload.py).
    # Ray registers the checkpoint only once uploaded, deletes the local copy then, and flushes
    # pending uploads before the run ends; a failed upload fails the step like a sync one.
    ray.train.report(record.metrics(), checkpoint=checkpoint,
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)


def _final_evaluation(trainer: EpochTrainer, history: list[EpochRecord], num_classes: int | None) -> RunOutcome:
    """A finished run's outcome, with the cached linear evaluation of its final weights when the trainer
    was given the datasets for it: on rank 0 (the others wait at a barrier); its result on rank 0 only."""
    linear = error = None
    if num_classes and trainer.rank == 0:
        try:
            linear = {**linear_eval_cached_on_shards(trainer.net.backbone, trainer.cfg, num_classes, trainer.device,
                                                     "linear_fit", "linear_test"), "in_run": True}
        except Exception as e:  # noqa: BLE001 - the pretraining stands; the orchestrator records the failure
            error = f"{type(e).__name__}: {e}"
        if trainer.tb is not None and linear is not None:
            trainer.tb.scalars({"eval/linear_top1": linear["top1"], "eval/linear_top5": linear["top5"]},
                               trainer.step)
    if num_classes and trainer.world > 1:
        dist.barrier()
    return RunOutcome(Status.FINISHED, "", tuple(history), linear=linear, evaluation_error=error)


def _replica_report(net: nn.Module, world: int) -> list[dict]:
    """Per rank: node id, pid and a checksum of the parameters. DDP must leave every replica identical,
    so a mismatch is a real bug; gathered only when asked (``check_replicas``: the multi-worker tests)."""
    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten().cpu() for p in net.parameters()])
    mine = {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
            "param_sum": float(flat.sum()), "param_hash": hashlib.sha256(flat.numpy().tobytes()).hexdigest()}
    if world == 1:
        return [mine]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    return gathered


# ----------------------------------------------------------------------------- the trainer (driver side)


def build_trainer(spec: RunSpec, callbacks: Sequence[Any] = (), check_replicas: bool = False):
    """The TorchTrainer for one pretraining run; rerunning with the same ``spec.name`` resumes it.
    ``callbacks`` are Ray Train UserCallbacks (e.g. Tune's TuneReportCallback inside a trial). With
    ``spec.linear_fit_path`` (and ``eval.enabled``, the cached protocol, labelled data) the run ends with
    the in-run linear evaluation. ``check_replicas`` gathers every rank's parameter hash at the end."""
    from ray.train.torch import TorchTrainer

    cfg, train_path, heldout = spec.config, spec.train_path, spec.heldout_path
    meta = data_pipeline.dataset_info(train_path)
    decode = device_decode.resolve(cfg.data, train_path, cfg.train.use_gpu)
    datasets = {"train": data_pipeline.train_dataset(cfg.data, train_path, cfg.train.seed, decode)}
    if cfg.train.knn_every and heldout and meta["labeled"]:
        datasets["knn_bank"] = data_pipeline.eval_dataset(cfg.data, train_path)
        datasets["knn_test"] = data_pipeline.eval_dataset(cfg.data, heldout)
    linear_classes = None
    fit_path = spec.linear_fit_path
    if fit_path and heldout and cfg.eval.enabled and cfg.eval.linear.protocol == "cached":
        fit = meta if fit_path == train_path else data_pipeline.dataset_info(fit_path)
        if fit["labeled"]:  # else the separate evaluation reports what is wrong
            datasets["linear_fit"] = data_pipeline.eval_dataset(cfg.data, fit_path)
            datasets["linear_test"] = data_pipeline.eval_dataset(cfg.data, heldout)
            linear_classes = fit["num_classes"]
    t = cfg.train
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "num_rows": meta["num_rows"], "linear_num_classes": linear_classes,
                           "decode": decode, "check_replicas": check_replicas},
        scaling_config=ray.train.ScalingConfig(
            num_workers=(t.min_workers, t.num_workers) if t.min_workers else t.num_workers, use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})},
            placement_strategy=t.placement_strategy),
        run_config=ray.train.RunConfig(
            name=spec.name, storage_path=spec.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
            callbacks=[FailFastOnDataError(), *callbacks]),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"],
                                            execution_options=data_pipeline.ingest_options(cfg.data)),
    )


def pretrain(spec: RunSpec, callbacks: Sequence[Any] = (), *, on_report: Callable[[dict], None] | None = None,
             on_idle: Callable[[], None] | None = None, check_replicas: bool = False) -> RunOutcome:
    """Run (or resume) pretraining to the end; never raises for a failed run - its status is 'failed'.

    A finished run's ``linear`` is the in-run linear evaluation's result when it ran (see
    :func:`build_trainer`); :func:`simsiam.run.pretrain_and_evaluate` completes the evaluation otherwise.
    ``on_report`` is called on this (the driver's) process with each epoch's reported metrics, in order,
    all of them before this returns; ``on_idle`` about twice a second in between (progress display)."""
    with relayed_reports(on_report, on_idle) as relay:
        trainer = build_trainer(spec, [*callbacks, *relay], check_replicas)
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as e:
            return failed_run(spec, e)
    outcome, run_path = result.return_value, with_scheme(result.path, spec.storage_path)
    if not isinstance(outcome, RunOutcome):
        return RunOutcome(Status.FAILED, "no outcome returned by the workers", run_path=run_path)
    checkpoint = with_scheme(result.checkpoint.path, spec.storage_path) if result.checkpoint is not None else None
    return dataclasses.replace(outcome, checkpoint=checkpoint, run_path=run_path)
