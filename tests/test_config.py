"""The typed config tree: presets load, and every invalid input fails up front naming the field."""
from __future__ import annotations

import pytest
import yaml

from simsiam import config as C
from simsiam.config import Config, ConfigError, from_dict, load


@pytest.mark.parametrize("preset", C.PRESETS)
def test_presets_load_and_validate(preset):
    cfg = load(preset)
    assert isinstance(cfg, Config)
    assert from_dict(cfg.to_dict()) == cfg


def test_sample_preset_is_the_small_cpu_model():
    cfg = load("sample")
    assert cfg.model.backbone == "small" and cfg.data.image_size == 16 and cfg.optim.batch_size == 128


def test_overrides_are_typed_against_the_field():
    cfg = load("sample", ["optim.base_lr=0.1", "loss.stop_gradient=false", "model.predictor=none",
                          "data.mean=[0.1, 0.2, 0.3]"])
    assert cfg.optim.base_lr == 0.1 and cfg.loss.stop_gradient is False and cfg.model.predictor == "none"
    assert cfg.data.mean == [0.1, 0.2, 0.3]
    assert load("sample", {"optim.batch_size": 64}).optim.batch_size == 64
    assert isinstance(load("sample", ["optim.base_lr=1"]).optim.base_lr, float)


@pytest.mark.parametrize("overrides, field, words", [
    ({"model.bakbone": "resnet18"}, "model.bakbone", "unknown config key"),
    ({"optim.batch_size": "many"}, "optim.batch_size", "expected an integer"),
    ({"optim.batch_size": 2.5}, "optim.batch_size", "expected an integer"),
    ({"loss.stop_gradient": 1}, "loss.stop_gradient", "expected true or false"),
    ({"optim.base_lr": -0.1}, "optim.base_lr", "out of range"),
    ({"optim.momentum": 1.0}, "optim.momentum", "out of range"),
    ({"optim.base_lr": float("nan")}, "optim.base_lr", "finite"),
    ({"model.backbone": "resnet101"}, "model.backbone", "not allowed"),
    ({"loss.similarity": "l2"}, "loss.similarity", "not allowed"),
    ({"train.collapse_guard.window_steps": 0}, "train.collapse_guard.window_steps", "out of range"),
    ({"data.mean": "gray"}, "data.mean", "list of numbers"),
])
def test_invalid_overrides_name_the_field(overrides, field, words):
    with pytest.raises(ConfigError) as e:
        load("sample", overrides)
    assert field in str(e.value) and words in str(e.value)


def test_unknown_key_suggests_the_close_name():
    with pytest.raises(ConfigError, match="did you mean model.backbone"):
        from_dict({"model": {"bakbone": "resnet18"}})
    with pytest.raises(ConfigError, match="nosuch"):
        from_dict({"nosuch": {}})


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="optim.batch_size.*divisible by train.num_workers"):
        from_dict({"optim": {"batch_size": 130}, "train": {"num_workers": 4}})
    with pytest.raises(ConfigError, match="train.min_workers"):
        from_dict({"train": {"num_workers": 2, "min_workers": 3}})
    with pytest.raises(ConfigError, match="model.bn"):
        from_dict({"model": {"predictor": "none", "bn": "pred_output"}})
    with pytest.raises(ConfigError, match="data.mean"):
        from_dict({"data": {"mean": [0.5, 0.5]}})


def test_bad_yaml_file_names_the_file_and_the_field(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"optim": {"base_lr": 0.05, "weight_decay": -1}}))
    with pytest.raises(ConfigError) as e:
        load(p)
    assert str(p) in str(e.value) and "optim.weight_decay" in str(e.value)
    with pytest.raises(ConfigError, match="no such file"):
        load(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(tmp_path / "broken.yaml")


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="dotted.name=value"):
        load("sample", ["optim.base_lr"])
    with pytest.raises(ConfigError, match="nosection"):
        load("sample", ["nosection.x=1"])


def test_dump_round_trips(tmp_path):
    cfg = load("cifar10", ["optim.base_lr=0.03"])
    C.dump(cfg, tmp_path / "c.yaml")
    assert load(tmp_path / "c.yaml") == cfg


def test_config_command_fails_before_any_work_naming_the_field(capsys):
    from simsiam import config_cli
    assert config_cli.main(["sample", "--set", "optim.batch_size=0"]) == 2
    assert "optim.batch_size" in capsys.readouterr().err
    assert config_cli.main(["sample", "--set", "model.dim=8"]) == 0
    assert "dim: 8" in capsys.readouterr().out


def test_describe_lists_every_leaf_with_help():
    rows = C.describe()
    names = [r[0] for r in rows]
    assert "train.collapse_guard.rank_ratio" in names and "eval.linear.optimizer" in names
    assert all(help_ for _, _, help_ in rows)
