"""The model registry of scheduled retraining: which shards were used, every run, the promoted model.

A registry is a local directory (or a mounted POSIX volume) or an object-store prefix (s3://, or an
S3-compatible store through AWS_ENDPOINT_URL; see simsiam/io.py). The layout is the same on both::

    ROOT/
      registry.json              format marker, written once
      promoted.json              THE pointer: run id, model dir, its linear top-1/top-5, eval fingerprint
      manifest.json              shards already used: path -> size, mtime_ns, rows, dataset, run_id, used_at
      models/<run_id>/           a copy of each model ever promoted (checkpoint.pt, then model.json); never deleted
      runs/<run_id>/             one per run: config.yaml, train.shards.json, results.json, record.json,
                                 ray/ (Ray Train storage when run.storage_path is empty; safe to delete)
      .lock                      local: held (flock) for a run's whole life, so two runs never overlap
      .lease.json                object store: the lease that stands in for the lock (see lock.py)

Modules: :mod:`~simsiam.registry.model_registry` (the :class:`Registry`: layout, state, saved models and
the journalled commit that makes a run's end crash safe), :mod:`~simsiam.registry.lock` (one retrain at a
time: ``flock`` locally, a lease on an object store), :mod:`~simsiam.registry.store` (its files: strict
JSON reads, compare-and-swap replacement, run ids), :mod:`~simsiam.registry.scan` (the shards under a
source root that a run may train on). gs:// registries are refused: pyarrow's GCS filesystem does not
expose generation preconditions (GCS's compare-and-swap), so neither the lease nor the pointer could be
safe there.
"""
from simsiam.registry.errors import RegistryBusy, RegistryError
from simsiam.registry.lock import LEASE_TTL_S, Lease
from simsiam.registry.model_registry import Registry
from simsiam.registry.scan import Scan, Shard, scan_source
from simsiam.registry.store import new_run_id, now

__all__ = ["LEASE_TTL_S", "Lease", "Registry", "RegistryBusy", "RegistryError", "Scan", "Shard", "new_run_id",
           "now", "scan_source"]
