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
    assert cfg.model.backbone == "small" and cfg.data.image_size == 16 and cfg.optim.batch_size == 64


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


def test_scientific_notation_is_a_number_everywhere(tmp_path, capsys):
    # --set: YAML 1.1 alone would read 1e-3 as the string '1e-3' and refuse it.
    cfg = load("sample", ["optim.base_lr=1e-3", "optim.weight_decay=5E-4", "data.max_pixels=1e6",
                          "train.collapse_guard.std_ratio=+2.5e-1"])
    assert (cfg.optim.base_lr, cfg.optim.weight_decay, cfg.data.max_pixels) == (0.001, 0.0005, 1_000_000)
    assert type(cfg.data.max_pixels) is int and cfg.train.collapse_guard.std_ratio == 0.25
    assert load("sample", ["run.name=1e3"]).run.name == "1e3"  # a string field keeps the text
    with pytest.raises(ConfigError, match=r"train.epochs: expected an integer, got 1500.5"):
        load("sample", ["train.epochs=1.5005e3"])
    # YAML files (and what dump writes reads back the same).
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  base_lr: 3e-2\n  weight_decay: 1.5e-6\ntrain:\n  epochs: 2e2\n")
    cfg = load(str(f))
    assert (cfg.optim.base_lr, cfg.optim.weight_decay, cfg.train.epochs) == (0.03, 1.5e-6, 200)
    C.dump(cfg, tmp_path / "d.yaml")
    assert load(str(tmp_path / "d.yaml")) == cfg
    # The CLI.
    from simsiam.config_cli import main as config_main
    assert config_main(["sample", "--set", "optim.base_lr=1e-3"]) == 0
    assert "base_lr: 0.001" in capsys.readouterr().out


def test_config_list_shows_the_presets_values(capsys):
    from simsiam.config_cli import main as config_main

    def listed(*argv: str) -> dict[str, tuple[bool, str]]:
        assert config_main(["--list", *argv]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith(f"# {argv[0] if argv else 'sample'}")
        rows = {}
        for line in out[1:]:
            name, rest = line.split(None, 1)
            rows[name] = (rest.startswith("*"), rest.lstrip("* ").split()[0])
        return rows

    c10 = listed("cifar10")
    assert c10["model.backbone"] == (True, "'resnet18'") and c10["model.cifar_stem"] == (True, "True")
    assert c10["optim.base_lr"] == (True, "0.03") and c10["loss.symmetric"] == (False, "True")
    assert len(c10) == len(C.describe())
    assert listed()["model.backbone"] == (True, "'small'")  # the sample preset, as `simsiam config` shows
    assert listed("imagenet", "--set", "train.epochs=7")["train.epochs"] == (True, "7")
