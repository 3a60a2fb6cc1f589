"""The console lines of a Tune experiment (``simsiam search``, ``simsiam ablate``), printed by the driver.

A Tune callback runs on the driver and sees every result the trials report (each epoch's metrics reach
Tune through Ray Train's TuneReportCallback), so the lines are whole and in order: one when a trial
starts, one per reported epoch, one when it ends (finished, stopped by ASHA, collapsed, failed).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ray.tune import Callback

from simsiam import console


def _params(config: Mapping[str, Any], names: list[str] | None) -> str:
    keys = names if names is not None else sorted(config)
    return ", ".join(f"{k}={_fmt(config[k])}" for k in keys if k in config)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class TrialLines(Callback):
    """One console line per trial start, reported epoch and end.

    ``epochs``: the trials' epoch budget; ``param_names``: the config keys that tell trials apart (all of
    a trial's config when None); ``classify``: (last result, error) -> (status, reason), the pipeline's
    reading of how a trial ended."""

    def __init__(self, epochs: int, classify: Callable[[Mapping[str, Any], Any], tuple[str, str]],
                 param_names: list[str] | None = None, total: int | None = None):
        self.epochs, self.classify, self.param_names, self.total = epochs, classify, param_names, total
        self.started = 0
        self.t0 = time.time()

    def _name(self, trial: Any) -> str:
        return f"trial {trial.trial_id}"

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.started += 1
        of = f" ({self.started}/{self.total})" if self.total else ""
        console.say(f"{self._name(trial)} started{of}: {_params(trial.config, self.param_names)}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if "epoch" in result and "loss" in result:
            console.say(f"{self._name(trial)} {console.epoch_line(result, self.epochs)}")

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        running = sum(1 for t in trials if t.status == "RUNNING")
        done = sum(1 for t in trials if t.status in ("TERMINATED", "ERROR"))
        console.progress(f"{running} trial(s) running, {done} done, {time.time() - self.t0:.0f} s")

    def _end(self, trial: Any, error: Any) -> None:
        status, reason = self.classify(trial.last_result or {}, error)
        top1 = (trial.last_result or {}).get("linear_top1")
        score = f", linear top-1 {top1:.2f}%" if isinstance(top1, (int, float)) and status != "failed" else ""
        if status == "stopped_early" and reason:
            console.say(f"{self._name(trial)} {reason}")  # "stopped by ASHA after epoch ..."
            return
        why = f" - {reason}" if reason else ""
        console.say(f"{self._name(trial)} {status}{score}{why}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # Tune has just written the error to the trial's local error file; the copy on storage comes later.
        path = trial.error_file
        try:
            error = Path(path).read_text() if path else ""
        except OSError:
            error = ""
        self._end(trial, error or "error (see the trial's error.txt)")
