"""Checks on a live Ray cluster shared by test modules. Free of side effects on import (unlike
conftest.py, which edits the environment): Ray workers import the test modules whose functions they
run, and with them this one."""
from __future__ import annotations


def released_within(total: dict, seconds: float) -> bool:
    """Whether, within ``seconds``, no placement group holds resources and every CPU of ``total`` is free
    again (public Ray API only: independent of the search harness's own check)."""
    import time

    import ray
    from ray.util import placement_group_table

    deadline = time.time() + seconds
    while time.time() < deadline:
        live = [p for p in placement_group_table().values() if p["state"] in ("CREATED", "PENDING", "RESCHEDULING")]
        if not live and ray.available_resources().get("CPU", 0.0) >= total["CPU"] - 1e-6:
            return True
        time.sleep(0.5)
    return False
