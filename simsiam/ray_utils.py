"""Joining or starting the Ray cluster a pipeline runs on."""
from __future__ import annotations

import os
import sys

import ray

from simsiam import ray_compat

_OWNED = False  # whether init_ray connected this process (and so may disconnect it)


def init_ray(address: str | None = None, **kwargs) -> str:
    """Connect to ``address`` (or $RAY_ADDRESS, as under ``ray job submit``), else start a local cluster.

    A local cluster keeps its dashboard on 127.0.0.1: Tune's resource cleaner needs the state API, and
    nothing here should listen on a public interface. Returns a short description for the logs."""
    global _OWNED
    if ray.is_initialized():
        return "an already-initialised Ray session"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
        _OWNED = True
        return f"the Ray cluster at {address}"
    ray_compat.disable_preemption_watcher()  # a local cluster has no spot nodes to watch
    # address="local": always a new cluster, never one left running on this machine by someone else.
    ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)
    _OWNED = True
    res = ray.cluster_resources()
    return f"a local Ray cluster ({res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU; {auth_mode()})"


def release_ray() -> None:
    """Disconnect (and stop a local cluster) if :func:`init_ray` connected this process; a session that
    was already initialised is left alone. A console session (simsiam.console.session) calls it before
    it ends, so Ray's last forwarded worker lines land in the run's log, not on the console at exit."""
    global _OWNED
    if _OWNED and ray.is_initialized():
        ray.shutdown()
    _OWNED = False


def auth_mode() -> str:
    """The auth mode of the cluster this process started, in words.

    Ray 2.60 turns token auth on for a new local cluster when RAY_AUTH_MODE is unset (and logs a
    WARNING saying so, to ray.log): it sets RAY_AUTH_MODE=token in this process and uses
    ~/.ray/auth_token, made if missing. RAY_AUTH_MODE=disabled before the command opts out."""
    mode = os.environ.get("RAY_AUTH_MODE", "disabled").lower()
    if mode == "token":
        return "token auth, token in ~/.ray/auth_token; RAY_AUTH_MODE=disabled turns it off"
    return f"auth mode '{mode}' (RAY_AUTH_MODE)"


def worker_print(msg: str) -> None:
    """A line from a Ray Train worker for the run's log (ray.log; the console with --verbose).

    The console's lines about training are printed by the driver from reported metrics
    (:mod:`simsiam.console`); this is for what only the worker knows.

    Train V2 replaces ``print`` in its workers with one that writes to the Train logger and, when
    ``sys.stdout`` is wrapped (as under Ray), also to stdout: both copies reach the driver. The
    process's real stdout is what Ray streams to the driver, once."""
    print(msg, file=sys.__stdout__, flush=True)

