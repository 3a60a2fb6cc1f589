"""What a trial holds and how many fit the cluster, and returning the placement groups of
TorchTrainers whose trial was stopped."""
from __future__ import annotations

import math
import time
from collections.abc import Mapping

from simsiam import config as C

# The Tune function itself only waits on its TorchTrainers; its share is small and fixed.
TRIAL_CPU = 0.25


def trial_budget(cfg: C.Config) -> dict[str, float]:
    """What one trial holds while it runs: CPU/GPU for its Tune function, its train workers (the larger
    of the pretraining and linear-eval worker groups; they run one after the other) and, when
    ``data.data_cpus`` caps it, its Ray Data pipeline; ``data_pool`` is the free CPU that uncapped Ray
    Data needs somewhere on the cluster (one whole CPU: what each of its read/augment tasks asks for)."""
    t, lin = cfg.train, cfg.eval.linear
    workers = max(t.num_workers, lin.num_workers if lin.protocol == "full" else 1)
    capped = cfg.data.data_cpus > 0
    cpu = TRIAL_CPU + workers * t.cpus_per_worker + (cfg.data.data_cpus if capped else 0.0)
    return {"CPU": cpu, "GPU": float(workers if t.use_gpu else 0), "data_pool": 0.0 if capped else 1.0}


def derive_concurrency(cfg: C.Config, resources: Mapping[str, float], requested: int | None = None) -> int:
    """How many trials fit the cluster at once (never more than ``requested``, if given).

    Packing trials tighter hangs them: on 2 CPUs two uncapped trials at 0.75 CPU each left 0.5 CPU
    free, and Ray Data's 1-CPU read tasks never started. Capped pipelines fit beside each other;
    uncapped ones share whatever the trials leave free, which must be at least one CPU."""
    need = trial_budget(cfg)
    have_cpu = float(resources.get("CPU", 0.0))
    n = math.floor((have_cpu - need["data_pool"]) / need["CPU"] + 1e-9)
    if need["GPU"]:
        n = min(n, math.floor(float(resources.get("GPU", 0.0)) / need["GPU"] + 1e-9))
    if n < 1:
        raise C.ConfigError(
            f"one trial needs {need['CPU'] + need['data_pool']:g} CPU and {need['GPU']:g} GPU (train.num_workers "
            f"x train.cpus_per_worker + {TRIAL_CPU} for the trial + Ray Data: data.data_cpus, or 1 CPU when "
            f"that is 0), but the cluster has {have_cpu:g} CPU and {float(resources.get('GPU', 0)):g} GPU; "
            "lower train.cpus_per_worker or cap Ray Data (e.g. --set train.cpus_per_worker=0.5 "
            "--set data.data_cpus=0.25 on 2 CPUs)")
    return min(n, requested) if requested else n


def reap_orphaned_placement_groups() -> int:
    """Remove the placement groups of dead creators (:func:`simsiam.ray_compat.orphaned_placement_groups`:
    those of TorchTrainers whose trial was stopped); returns how many. Never raises: this is a safety
    net, and a Ray whose internals moved on should not fail a search that Train's cleaner already serves
    (tests/test_ray_compat.py is what catches that)."""
    from ray.util import remove_placement_group

    from simsiam.ray_compat import orphaned_placement_groups

    try:
        groups = orphaned_placement_groups()
    except Exception:  # noqa: BLE001
        return 0
    n = 0
    for pg in groups:
        try:
            remove_placement_group(pg)
            n += 1
        except Exception:  # noqa: BLE001 - removed meanwhile by Train's own cleaner
            pass
    return n


def wait_for_release(total: Mapping[str, float], timeout_s: float = 30.0) -> dict:
    """Poll (reaping orphaned groups) until no placement group is PENDING/CREATED/RESCHEDULING and the
    free CPU is back to ``total``; returns what it saw (``released`` says whether it got there)."""
    import ray
    from ray.util import placement_group_table

    deadline = time.time() + timeout_s
    while True:
        reap_orphaned_placement_groups()
        live = [pg for pg in placement_group_table().values()
                if pg.get("state") in ("CREATED", "PENDING", "RESCHEDULING")]
        free = ray.available_resources().get("CPU", 0.0)
        released = not live and free >= float(total.get("CPU", 0.0)) - 1e-6
        if released or time.time() > deadline:
            return {"released": released, "live_placement_groups": len(live), "free_cpu": free,
                    "total_cpu": float(total.get("CPU", 0.0))}
        time.sleep(0.5)
