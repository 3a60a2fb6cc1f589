"""Search spaces: the shipped YAML files load against their presets, and every kind of mistake in a
space file fails on load with the file, the parameter and the problem named."""
from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml

from simsiam import config as C
from simsiam import search as S

SPACES = Path(__file__).resolve().parent.parent / "tune_spaces"


def _write(tmp_path: Path, data) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def _space(**params) -> dict:
    return {"params": {k.replace("__", "."): v for k, v in params.items()}}


@pytest.mark.parametrize("name,preset", [("default", "sample"), ("cifar10", "cifar10"), ("imagenet", "imagenet")])
def test_shipped_spaces_load_against_their_presets(name, preset):
    space = S.load_space(SPACES / f"{name}.yaml", C.load(preset))
    assert {"optim.base_lr", "model.pred_dim", "optim.weight_decay"} <= set(space.names)
    assert space.params["optim.base_lr"].distribution == "loguniform"
    assert space.params["optim.weight_decay"].distribution == "loguniform"
    assert space.params["model.pred_dim"].distribution == "choice"
    dists = space.to_optuna()
    assert dists["optim.base_lr"].log and dists["optim.weight_decay"].log
    assert isinstance(dists["model.pred_dim"], optuna.distributions.CategoricalDistribution)


@pytest.mark.parametrize("name,preset,lr,wd,pred", [("cifar10", "cifar10", 0.03, 5e-4, 512),
                                                     ("imagenet", "imagenet", 0.05, 1e-4, 512)])
def test_paper_spaces_are_centred_on_the_paper_and_try_it_first(name, preset, lr, wd, pred):
    space = S.load_space(SPACES / f"{name}.yaml", C.load(preset))
    p = space.params
    assert p["optim.base_lr"].low < lr < p["optim.base_lr"].high
    assert p["optim.weight_decay"].low < wd < p["optim.weight_decay"].high
    assert pred in p["model.pred_dim"].values
    first = space.points_to_evaluate[0]
    assert (first["optim.base_lr"], first["optim.weight_decay"], first["model.pred_dim"]) == (lr, wd, pred)


def test_any_config_field_can_be_searched_by_dotted_name(tmp_path):
    data = _space(train__collapse_guard__rank_ratio={"distribution": "uniform", "low": 0.1, "high": 0.3},
                  loss__similarity={"distribution": "choice", "values": ["cosine", "cross_entropy"]},
                  loss__stop_gradient={"distribution": "choice", "values": [True, False]},
                  optim__batch_size={"distribution": "logint", "low": 32, "high": 256},
                  train__epochs={"distribution": "int", "low": 2, "high": 10, "step": 2},
                  optim__warmup_epochs={"distribution": "uniform", "low": 0.0, "high": 2.0, "step": 0.5})
    space = S.load_space(_write(tmp_path, data), C.load("sample"))
    d = space.to_optuna()
    assert isinstance(d["optim.batch_size"], optuna.distributions.IntDistribution) and d["optim.batch_size"].log
    assert d["train.epochs"].step == 2 and d["optim.warmup_epochs"].step == 0.5
    # Every sample from the space gives a valid config.
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask(fixed_distributions=d)
        cfg = C.load("sample").replace(trial.params)
        assert cfg.loss.similarity in ("cosine", "cross_entropy")
        assert 32 <= cfg.optim.batch_size <= 256


def test_round_trip_through_to_dict(tmp_path):
    space = S.load_space(SPACES / "imagenet.yaml")
    again = S.parse_space(yaml.safe_load(yaml.safe_dump(space.to_dict())), "again")
    assert again.params == space.params and again.points_to_evaluate == space.points_to_evaluate


BAD = [
    (_space(optim__base_rate={"distribution": "loguniform", "low": 0.01, "high": 0.1}),
     ["optim.base_rate", "unknown config field", "did you mean optim.base_lr"]),
    (_space(optim={"distribution": "choice", "values": [1]}), ["optim", "config section"]),
    (_space(optim__base_lr={"distribution": "gaussian", "low": 0.01, "high": 0.1}),
     ["optim.base_lr.distribution", "'gaussian'", "loguniform"]),
    (_space(optim__base_lr={"distribution": "loguniform", "low": 0.1, "high": 0.01}),
     ["optim.base_lr", "bad range", "low (0.1) must be < high (0.01)"]),
    (_space(optim__base_lr={"distribution": "loguniform", "low": 0.0, "high": 0.1}),
     ["optim.base_lr", "low must be > 0"]),
    (_space(optim__base_lr={"distribution": "uniform", "low": -1.0, "high": 0.1}),
     ["optim.base_lr.low", "out of range", "> 0.0"]),
    (_space(optim__momentum={"distribution": "uniform", "low": 0.5, "high": 1.5}),
     ["optim.momentum.high", "out of range"]),
    (_space(optim__base_lr={"distribution": "loguniform", "low": "a lot", "high": 0.1}),
     ["optim.base_lr.low", "expected a finite number"]),
    (_space(optim__base_lr={"distribution": "loguniform", "high": 0.1}), ["optim.base_lr", "needs 'low'"]),
    (_space(optim__base_lr={"distribution": "loguniform", "low": 0.01, "high": 0.1, "mean": 3}),
     ["optim.base_lr", "unknown key(s) mean"]),
    (_space(optim__base_lr={"distribution": "loguniform", "low": 0.01, "high": 0.1, "step": 0.01}),
     ["optim.base_lr.step", "cannot have a step"]),
    (_space(optim__batch_size={"distribution": "uniform", "low": 32, "high": 256}),
     ["optim.batch_size", "integer field", "int, logint or choice"]),
    (_space(optim__batch_size={"distribution": "int", "low": 32.5, "high": 256}),
     ["optim.batch_size.low", "expected an integer"]),
    (_space(model__bn={"distribution": "uniform", "low": 0, "high": 1}), ["model.bn", "only be searched with",
                                                                           "choice"]),
    (_space(model__bn={"distribution": "choice", "values": ["default", "sideways"]}),
     ["model.bn.values", "'sideways' is not allowed"]),
    (_space(model__pred_dim={"distribution": "choice", "values": []}), ["model.pred_dim.values", "non-empty"]),
    (_space(model__pred_dim={"distribution": "choice", "values": [64, 64]}), ["model.pred_dim.values",
                                                                               "duplicates"]),
    (_space(loss__stop_gradient={"distribution": "choice", "values": [True, "yes"]}),
     ["loss.stop_gradient.values", "true or false"]),
    (_space(data__mean={"distribution": "choice", "values": [1]}), ["data.mean", "list-valued"]),
    (_space(run__name={"distribution": "choice", "values": ["a", "b"]}), ["run.name", "search sets it"]),
    (_space(optim__base_lr=[0.01, 0.1]), ["optim.base_lr", "expected a mapping"]),
    ({"optim.base_lr": {"distribution": "loguniform", "low": 0.01, "high": 0.1}}, ["'params' section"]),
    ({"params": {}}, ["params", "non-empty"]),
    ({**_space(optim__base_lr={"distribution": "loguniform", "low": 0.01, "high": 0.1}), "trials": 5},
     ["unknown top-level key(s) trials"]),
    ({**_space(optim__base_lr={"distribution": "loguniform", "low": 0.01, "high": 0.1}),
      "points_to_evaluate": [{"optim.weight_decay": 0.1}]}, ["points_to_evaluate[0]", "optim.weight_decay",
                                                              "not in the space"]),
    ({**_space(optim__base_lr={"distribution": "loguniform", "low": 0.01, "high": 0.1},
               model__pred_dim={"distribution": "choice", "values": [32, 64]}),
      "points_to_evaluate": [{"optim.base_lr": 0.05}]}, ["points_to_evaluate[0]", "missing model.pred_dim"]),
    ({**_space(model__pred_dim={"distribution": "choice", "values": [32, 64]}),
      "points_to_evaluate": [{"model.pred_dim": 128}]}, ["points_to_evaluate[0]", "128 is not one of [32, 64]"]),
    ({**_space(optim__base_lr={"distribution": "loguniform", "low": 0.01, "high": 0.1}),
      "points_to_evaluate": [{"optim.base_lr": -5.0}]}, ["points_to_evaluate[0]", "optim.base_lr", "out of range"]),
]


@pytest.mark.parametrize("data,needles", BAD)
def test_bad_spaces_fail_with_a_clear_message(tmp_path, data, needles):
    path = _write(tmp_path, data)
    with pytest.raises(S.SpaceError) as err:
        S.load_space(path)
    msg = str(err.value)
    assert str(path) in msg
    for needle in needles:
        assert needle in msg, msg


def test_space_is_checked_against_the_whole_config(tmp_path):
    # batch 100 is a valid integer, but not divisible by 8 workers: a rule spanning two fields.
    path = _write(tmp_path, _space(optim__batch_size={"distribution": "choice", "values": [64, 100]}))
    S.load_space(path)  # alone it is fine
    base = C.load("sample", {"train.num_workers": 8})
    with pytest.raises(S.SpaceError, match=r"optim.batch_size: value 100 is invalid with this config.*divisible"):
        S.load_space(path, base)


def test_space_errors_are_config_errors_and_name_missing_or_broken_files(tmp_path):
    with pytest.raises(C.ConfigError, match="no such file"):
        S.load_space(tmp_path / "nope.yaml")
    with pytest.raises(S.SpaceError, match="not valid YAML"):
        S.load_space(_write(tmp_path, "params: [unclosed"))


def test_points_may_probe_outside_the_numeric_range_but_stay_valid_configs(tmp_path):
    data = {**_space(optim__base_lr={"distribution": "loguniform", "low": 0.01, "high": 0.1},
                     model__pred_dim={"distribution": "choice", "values": [32, 64]}),
            "points_to_evaluate": [{"optim.base_lr": 1000.0, "model.pred_dim": 32}]}
    space = S.load_space(_write(tmp_path, data), C.load("sample"))
    assert space.points_to_evaluate == ({"optim.base_lr": 1000.0, "model.pred_dim": 32},)


def test_field_spec_walks_nested_sections():
    tp, meta = S.field_spec("train.collapse_guard.window_steps")
    assert tp is int and meta["ge"] == 1
    with pytest.raises(C.ConfigError, match="unknown config field"):
        S.field_spec("train.collapse_guard.nope")


def test_scientific_notation_in_a_space_file(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("params:\n  optim.base_lr: {distribution: loguniform, low: 1e-3, high: 1E-1}\n"
                 "  data.max_pixels: {distribution: int, low: 1e5, high: 1e6}\n"
                 "points_to_evaluate:\n  - {optim.base_lr: 5e-2, data.max_pixels: 5e5}\n")
    space = S.load_space(f, C.load("sample"))
    lr, px = space.params["optim.base_lr"], space.params["data.max_pixels"]
    assert (lr.low, lr.high, px.low, px.high) == (0.001, 0.1, 100_000, 1_000_000) and type(px.low) is int
    point = space.points_to_evaluate[0]
    assert point == {"optim.base_lr": 0.05, "data.max_pixels": 500_000} and type(point["data.max_pixels"]) is int
