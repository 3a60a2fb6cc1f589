"""Search spaces: YAML files mapping dotted config names to distributions, validated against the config
tree on load, so a typo or an impossible range fails in milliseconds with the file and parameter named."""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from simsiam import config as C

DISTRIBUTIONS = ("uniform", "loguniform", "int", "logint", "choice")
# Fields the harness sets per trial: searching them would make trials resume each other's runs.
RESERVED = ("run.name", "run.storage_path")


class SpaceError(C.ConfigError):
    """An invalid search space: the message names the file, the parameter and what is wrong."""


@dataclass(frozen=True)
class Param:
    """One searched config field: ``distribution`` with ``low``/``high`` (and ``step``) or ``values``."""

    name: str
    distribution: str
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    values: tuple = ()

    def to_optuna(self) -> Any:
        """The equivalent ``optuna.distributions`` object."""
        from optuna import distributions as D

        if self.distribution == "choice":
            return D.CategoricalDistribution(list(self.values))
        if self.distribution in ("int", "logint"):
            return D.IntDistribution(int(self.low), int(self.high), log=self.distribution == "logint",
                                     step=int(self.step or 1))
        return D.FloatDistribution(float(self.low), float(self.high), log=self.distribution == "loguniform",
                                   step=self.step)


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space: parameters by dotted name, and points to try first (in order)."""

    params: dict[str, Param]
    points_to_evaluate: tuple[dict, ...] = ()
    source: str = "<space>"

    @property
    def names(self) -> list[str]:
        return list(self.params)

    def to_optuna(self) -> dict[str, Any]:
        """``{dotted name: optuna distribution}``, the form OptunaSearch takes directly."""
        return {n: p.to_optuna() for n, p in self.params.items()}

    def to_dict(self) -> dict:
        """The YAML form (what :func:`parse_space` reads back)."""
        out: dict = {"params": {}}
        for n, p in self.params.items():
            d: dict = {"distribution": p.distribution}
            if p.distribution == "choice":
                d["values"] = list(p.values)
            else:
                d.update(low=p.low, high=p.high)
                if p.step is not None:
                    d["step"] = p.step
            out["params"][n] = d
        if self.points_to_evaluate:
            out["points_to_evaluate"] = [dict(p) for p in self.points_to_evaluate]
        return out


def field_spec(name: str) -> tuple[Any, Mapping[str, Any]]:
    """(Python type, validation rules) of the config field ``name`` (dotted), or :class:`ConfigError`."""
    parts = name.split(".")
    tp: Any = C.Config
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(tp):
            break
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        if part not in fields:
            break
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(hints[part]):
                raise C.ConfigError(f"{name}: is a config section, not a field; search one of its fields, "
                                    f"e.g. {name}.{dataclasses.fields(hints[part])[0].name}")
            return hints[part], fields[part].metadata
        tp = hints[part]
    import difflib
    close = difflib.get_close_matches(name, C.known_keys(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else " ('simsiam config --list' lists every field)"
    raise C.ConfigError(f"{name}: unknown config field{hint}")


def _number(src: str, name: str, key: str, value: Any, integer: bool) -> float | int:
    if integer and isinstance(value, float) and value.is_integer():  # 1e3 reads as a float
        value = int(value)
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or (isinstance(value, float) and not math.isfinite(value)):
        kind = "an integer" if integer else "a finite number"
        raise SpaceError(f"{src}: {name}.{key}: expected {kind}, got {value!r}")
    return value


def _parse_param(src: str, name: str, spec: Any) -> Param:
    if not isinstance(spec, Mapping):
        raise SpaceError(f"{src}: {name}: expected a mapping like {{distribution: loguniform, low: 0.01, "
                         f"high: 0.1}}, got {spec!r}")
    if name in RESERVED:
        raise SpaceError(f"{src}: {name}: cannot be searched; the search sets it per trial")
    try:
        tp, meta = field_spec(name)
    except C.ConfigError as e:
        raise SpaceError(f"{src}: {e}") from None
    dist = spec.get("distribution")
    if dist not in DISTRIBUTIONS:
        raise SpaceError(f"{src}: {name}.distribution: {dist!r} is not allowed; choose one of "
                         f"{', '.join(DISTRIBUTIONS)}")
    allowed = {"distribution", "values"} if dist == "choice" else {"distribution", "low", "high", "step"}
    extra = sorted(set(spec) - allowed)
    if extra:
        raise SpaceError(f"{src}: {name}: unknown key(s) {', '.join(map(str, extra))} for a {dist} "
                         f"distribution; allowed: {', '.join(sorted(allowed))}")
    if tp is list:
        raise SpaceError(f"{src}: {name}: list-valued fields cannot be searched")
    if dist == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise SpaceError(f"{src}: {name}.values: expected a non-empty list, got {values!r}")
        if len(set(map(repr, values))) != len(values):
            raise SpaceError(f"{src}: {name}.values: duplicates in {values!r}")
        checked = []
        for v in values:
            try:
                checked.append(C.check_value(name, v, tp, meta))
            except C.ConfigError as e:
                raise SpaceError(f"{src}: {name}.values: {e}") from None
        return Param(name, dist, values=tuple(checked))
    if tp in (bool, str):
        raise SpaceError(f"{src}: {name}: a {tp.__name__} field can only be searched with distribution: choice")
    integer = dist in ("int", "logint")
    if tp is int and not integer:
        raise SpaceError(f"{src}: {name}: an integer field; use distribution int, logint or choice, not {dist}")
    for key in ("low", "high"):
        if key not in spec:
            raise SpaceError(f"{src}: {name}: {dist} needs '{key}'")
    low = _number(src, name, "low", spec["low"], integer)
    high = _number(src, name, "high", spec["high"], integer)
    step = spec.get("step")
    if step is not None:
        step = _number(src, name, "step", step, integer)
        if step <= 0:
            raise SpaceError(f"{src}: {name}.step: must be > 0, got {step!r}")
        if dist in ("loguniform", "logint") and not (dist == "logint" and step == 1):
            raise SpaceError(f"{src}: {name}.step: a {dist} distribution cannot have a step")
    if not low < high:
        raise SpaceError(f"{src}: {name}: bad range, low ({low!r}) must be < high ({high!r})")
    if dist in ("loguniform", "logint") and low <= 0:
        raise SpaceError(f"{src}: {name}: bad range for {dist}, low must be > 0, got {low!r}")
    for key, v in (("low", low), ("high", high)):
        try:
            C.check_value(name, v, tp, meta)
        except C.ConfigError as e:
            raise SpaceError(f"{src}: {name}.{key}: {e}") from None
    return Param(name, dist, low=low, high=high, step=step)


def _check_point(src: str, i: int, point: Any, params: Mapping[str, Param]) -> dict:
    if not isinstance(point, Mapping):
        raise SpaceError(f"{src}: points_to_evaluate[{i}]: expected a mapping of parameter: value, got {point!r}")
    unknown = sorted(set(point) - set(params))
    missing = sorted(set(params) - set(point))
    if unknown:
        raise SpaceError(f"{src}: points_to_evaluate[{i}]: {', '.join(unknown)} not in the space's params")
    if missing:
        raise SpaceError(f"{src}: points_to_evaluate[{i}]: give every parameter; missing {', '.join(missing)}")
    out = {}
    for name, value in point.items():
        p = params[name]
        tp, meta = field_spec(name)
        try:
            value = out[name] = C.check_value(name, value, tp, meta)
        except C.ConfigError as e:
            raise SpaceError(f"{src}: points_to_evaluate[{i}]: {e}") from None
        # Numeric points may lie outside [low, high] on purpose (to probe a known-bad region);
        # a categorical value outside its choices has no meaning to the sampler.
        if p.distribution == "choice" and value not in p.values:
            raise SpaceError(f"{src}: points_to_evaluate[{i}]: {name}: {value!r} is not one of {list(p.values)}")
    return out


def parse_space(data: Any, source: str = "<space>", base: C.Config | None = None) -> SearchSpace:
    """Validate a space given as a mapping (the YAML's content). With ``base``, also check each range's
    ends and each choice against the whole config (rules spanning fields, e.g. batch vs workers)."""
    src = source
    if not isinstance(data, Mapping) or "params" not in data:
        raise SpaceError(f"{src}: expected a mapping with a 'params' section (dotted config name -> "
                         "distribution)")
    extra = sorted(set(data) - {"params", "points_to_evaluate", "description"})
    if extra:
        raise SpaceError(f"{src}: unknown top-level key(s) {', '.join(map(str, extra))}; allowed: params, "
                         "points_to_evaluate, description")
    raw = data["params"]
    if not isinstance(raw, Mapping) or not raw:
        raise SpaceError(f"{src}: params: expected a non-empty mapping, got {raw!r}")
    params = {str(n): _parse_param(src, str(n), spec) for n, spec in raw.items()}
    points = data.get("points_to_evaluate") or []
    if not isinstance(points, list):
        raise SpaceError(f"{src}: points_to_evaluate: expected a list of mappings, got {points!r}")
    checked = tuple(_check_point(src, i, p, params) for i, p in enumerate(points))
    space = SearchSpace(params, checked, src)
    if base is not None:
        check_space_against(space, base)
    return space


def check_space_against(space: SearchSpace, base: C.Config) -> None:
    """Each parameter's extremes (or every choice) and each point must give a valid config with ``base``."""
    for p in space.params.values():
        candidates = p.values if p.distribution == "choice" else (p.low, p.high)
        for v in candidates:
            try:
                base.replace({p.name: v})
            except C.ConfigError as e:
                raise SpaceError(f"{space.source}: {p.name}: value {v!r} is invalid with this config: {e}") from None
    for i, point in enumerate(space.points_to_evaluate):
        try:
            base.replace(point)
        except C.ConfigError as e:
            raise SpaceError(f"{space.source}: points_to_evaluate[{i}]: invalid with this config: {e}") from None


def load_space(path: str | os.PathLike, base: C.Config | None = None) -> SearchSpace:
    """Read and validate a search-space YAML file; errors are :class:`SpaceError` naming the file."""
    p = Path(path)
    if not p.is_file():
        raise SpaceError(f"search space {str(path)!r}: no such file (see tune_spaces/ for examples)")
    try:
        data = C.yaml_load(p.read_text())
    except yaml.YAMLError as e:
        raise SpaceError(f"{p}: not valid YAML: {e}") from None
    return parse_space(data, str(p), base)
