"""Joining or starting the Ray cluster a pipeline runs on."""
from __future__ import annotations

import os
import sys

import ray


def init_ray(address: str | None = None, **kwargs) -> str:
    """Connect to ``address`` (or $RAY_ADDRESS, as under ``ray job submit``), else start a local cluster.

    A local cluster keeps its dashboard on 127.0.0.1: Tune's resource cleaner needs the state API, and
    nothing here should listen on a public interface. Returns a short description for the logs."""
    if ray.is_initialized():
        return "an already-initialised Ray session"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
        return f"the Ray cluster at {address}"
    # address="local": always a new cluster, never one left running on this machine by someone else.
    ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)
    res = ray.cluster_resources()
    return f"a local Ray cluster ({res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU)"


def worker_print(msg: str) -> None:
    """One progress line from a Ray Train worker, shown once on the driver.

    Train V2 replaces ``print`` in its workers with one that writes to the Train logger and, when
    ``sys.stdout`` is wrapped (as under Ray), also to stdout: both copies reach the driver. The
    process's real stdout is what Ray streams to the driver, once."""
    print(msg, file=sys.__stdout__, flush=True)

