"""Checkpoints: exact resume, weights_only loading, atomic writes, DDP unwrapping, torchvision export."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torchvision
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from simsiam import checkpoint as ck
from simsiam.config import load as load_config
from simsiam.loss import simsiam_loss
from simsiam.metrics import CollapseGuard
from simsiam.model import SimSiam, SmallResNet
from simsiam.optim import build_optimizer


def tiny_cfg(**model):
    overrides = {"model.small_width": 4, "model.dim": 16, "model.pred_dim": 4, "optim.batch_size": 8}
    overrides.update({f"model.{k}": v for k, v in model.items()})
    return load_config("sample", overrides)


def train_steps(model, opt, cfg, n):
    for _ in range(n):
        x1, x2 = torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8)  # drawn from the global RNG on purpose
        loss = simsiam_loss(*model(x1, x2), cfg.loss)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_state_has_everything_and_loads_weights_only(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = SimSiam(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    train_steps(model, opt, cfg, 1)
    guard = CollapseGuard(cfg.train.collapse_guard, cfg.model.dim)
    s = ck.state(model, opt, epoch=3, step=42, cfg=cfg, extra={"guard": guard.state_dict(), "history": [{"a": 1.0}]})
    assert {"model", "optimizer", "epoch", "step", "config", "rng", "extra"} <= s.keys()
    ck.save(tmp_path / "c.pt", s)
    # the public loader uses weights_only=True; check torch's own strict loader accepts it too
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert raw["epoch"] == 3 and raw["step"] == 42 and raw["config"] == cfg.to_dict()
    got = ck.load(tmp_path / "c.pt")
    assert ck.checkpoint_config(got) == cfg
    for k, v in model.state_dict().items():
        assert torch.equal(got["model"][k], v), k
    assert got["extra"]["history"] == [{"a": 1.0}]
    assert got["optimizer"]["param_groups"][1]["name"] == "predictor"


def test_resume_continues_bit_exactly(tmp_path):
    """Train 2 steps, checkpoint, train 2 more -> A. Load the checkpoint into fresh objects, restore the
    RNG, train 2 more -> B. Model, optimiser (momentum) and RNG state must make A == B."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = SimSiam(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    train_steps(model, opt, cfg, 2)
    ck.save(tmp_path / "ckpt" / "checkpoint.pt", ck.state(model, opt, 0, 2, cfg))
    train_steps(model, opt, cfg, 2)
    a = model.state_dict()

    torch.manual_seed(123)  # different RNG position: the restore must undo it
    model2 = SimSiam(cfg.model)
    opt2 = build_optimizer(model2, cfg.optim)
    s = ck.load(tmp_path / "ckpt")  # a Ray-style checkpoint directory
    model2.load_state_dict(s["model"])
    opt2.load_state_dict(s["optimizer"])
    ck.restore_rng(s)
    train_steps(model2, opt2, cfg, 2)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, a[k]), k


def test_rng_state_covers_torch_numpy_and_python():
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn()  # leave a cached gaussian in numpy's state
    saved = ck.rng_state()
    expected = (torch.rand(3), np.random.rand(3), np.random.randn(), [random.random() for _ in range(3)],
                random.gauss(0, 1))
    torch.manual_seed(9)
    np.random.seed(9)
    random.seed(9)
    ck.restore_rng({"rng": saved})
    got = (torch.rand(3), np.random.rand(3), np.random.randn(), [random.random() for _ in range(3)],
           random.gauss(0, 1))
    assert torch.equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2:] == expected[2:]


def test_state_unwraps_ddp(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        cfg = tiny_cfg()
        net = SimSiam(cfg.model)
        ddp = DistributedDataParallel(net)
        s = ck.state(ddp, build_optimizer(ddp, cfg.optim), 0, 0, cfg)
        assert set(s["model"]) == set(net.state_dict())
        assert not any(k.startswith("module.") for k in s["model"])
    finally:
        dist.destroy_process_group()


def test_save_is_atomic(tmp_path):
    path = tmp_path / "c.pt"
    ck.save(path, {"model": {"w": torch.ones(2)}})
    with pytest.raises(Exception):  # noqa: B017 - any pickling error; what matters is the file afterwards
        ck.save(path, {"model": {"w": torch.zeros(2)}, "bad": lambda: None})
    assert torch.equal(ck.load(path)["model"]["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]  # no temp files left behind


class Payload:
    """An arbitrary class: weights_only loading must refuse to construct it."""


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        ck.load(tmp_path / "nope.pt")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(FileNotFoundError, match="checkpoint.pt"):
        ck.load(tmp_path / "emptydir")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        ck.load(tmp_path / "garbage.pt")
    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt"):
        ck.load(tmp_path / "evil.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a SimSiam checkpoint"):
        ck.load(tmp_path / "other.pt")


def test_export_cifar_stem_and_small_backbones(tmp_path):
    cfg = load_config("cifar10", {"model.dim": 32, "model.pred_dim": 8})
    model = SimSiam(cfg.model)
    ck.save(tmp_path / "c18.pt", ck.state(model, build_optimizer(model, cfg.optim), 0, 0, cfg))
    keys = ck.export_backbone(tmp_path / "c18.pt", tmp_path / "r18.pt")
    assert "conv1.weight" in keys and not any(k.startswith("fc.") for k in keys)
    net = torchvision.models.resnet18()
    net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    assert set(net.load_state_dict(torch.load(tmp_path / "r18.pt", weights_only=True), strict=False)
               .missing_keys) == {"fc.weight", "fc.bias"}

    cfg = tiny_cfg()
    model = SimSiam(cfg.model)
    ck.save(tmp_path / "small.pt", ck.state(model, None, 0, 0, cfg))
    ck.export_backbone(tmp_path / "small.pt", tmp_path / "small_bb.pt")
    SmallResNet(cfg.model.small_width).load_state_dict(torch.load(tmp_path / "small_bb.pt", weights_only=True))


def test_export_command_help_and_errors(tmp_path, capsys):
    from simsiam.export_cli import main as export_main

    with pytest.raises(SystemExit) as e:
        export_main(["--help"], prog="simsiam export")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "simsiam export" in out and "CKPT" in out and "torchvision" in out and "SmallResNet" in out
    assert export_main([str(tmp_path / "missing"), str(tmp_path / "out.pt")]) == 2
    assert "missing" in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()


def _bad_files(d):
    """Files that are not SimSiam checkpoints, and the words the export's error must use for each."""
    (d / "empty.pt").write_bytes(b"")
    (d / "notes.txt").write_text("hello, not a checkpoint\n")
    np.save(d / "arr.npy", np.zeros(3))
    torch.save([1, 2, 3], d / "list.pt")
    torch.save({"model": "weights.bin", "config": {}}, d / "str_model.pt")
    torch.save({"state_dict": {"w": torch.zeros(1)}}, d / "other_dict.pt")
    cfg = tiny_cfg()
    torch.save({"model": SimSiam(cfg.model).state_dict()}, d / "no_config.pt")
    return {"empty.pt": "an empty file (0 bytes), not a torch checkpoint",
            "notes.txt": "a text file, not a torch checkpoint",
            "arr.npy": "a NumPy .npy array that holds objects other than tensors",
            "list.pt": "a torch file holding a list, not a SimSiam checkpoint (no 'model' entry)",
            "str_model.pt": "its 'model' entry is str, not a state_dict",
            "other_dict.pt": "a torch file holding a dict with keys ['state_dict'], not a SimSiam checkpoint",
            "no_config.pt": "has no 'config' entry"}


def test_export_of_a_file_that_is_not_a_checkpoint_says_what_it_is(tmp_path, capsys):
    """No raw KeyError / IndexError / AttributeError: one line naming the file, what it is, what was expected."""
    from simsiam.export_cli import main as export_main

    for name, words in _bad_files(tmp_path).items():
        assert export_main([str(tmp_path / name), str(tmp_path / "out.pt")]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith(f"simsiam export: error: {tmp_path / name}: {words}"), err
        assert "expected a SimSiam checkpoint" in err and "Traceback" not in err and err.count("\n") == 1, err
        assert not (tmp_path / "out.pt").exists()


def _readme_export_blocks() -> list[str]:
    """The python blocks of the README's Export section, in order."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("## Export", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_export_recipes_load_each_backbone_exactly_as_written(tmp_path, monkeypatch, capsys):
    """Export through the CLI, then run the README's own code: the torchvision recipe for ResNet-50, the
    strict SmallResNet one for the sample preset (same features as the SimSiam backbone, BN buffers
    included); and each recipe refuses the other backbone's export."""
    from simsiam.cli import main as cli_main

    torchvision_block, small_block = _readme_export_blocks()
    monkeypatch.chdir(tmp_path)
    exports = {}
    for name, cfg in (("resnet50", load_config("imagenet", {"model.dim": 64, "model.pred_dim": 16})),
                      ("small", load_config("sample"))):
        torch.manual_seed(0)
        model = SimSiam(cfg.model)
        with torch.no_grad():  # non-default BN buffers, so that their travel is checked too
            for m in model.backbone.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_()
        ck.save(tmp_path / name / "checkpoint.pt", ck.state(model, None, 0, 0, cfg))
        assert cli_main(["export", str(tmp_path / name), "backbone.pt"]) == 0
        printed = capsys.readouterr().out
        assert ("SmallResNet(width=32)" if name == "small" else "torchvision.models.resnet50()") in printed
        exports[name] = ((tmp_path / "backbone.pt").read_bytes(), model.backbone.eval())

    for name, block, other in (("resnet50", torchvision_block, small_block), ("small", small_block, torchvision_block)):
        (tmp_path / "backbone.pt").write_bytes(exports[name][0])
        scope: dict = {}
        exec(block, scope)  # noqa: S102 - the README's code, verbatim
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(scope["net"].eval()(x), exports[name][1](x))
        with pytest.raises((AssertionError, RuntimeError)):  # the other recipe fails loudly on this export
            exec(other, {})  # noqa: S102


def test_export_help_is_fast(tmp_path):
    """--help imports no torch: measured in a fresh interpreter (the figure is printed; the bound is generous)."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "simsiam.cli", "export", "--help"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - t0
    print(f"simsiam export --help: {seconds:.2f} s")
    assert proc.returncode == 0 and "CKPT" in proc.stdout
    assert seconds < 10.0
    check = subprocess.run([sys.executable, "-c", "import sys, simsiam.export_cli; print('torch' in sys.modules)"],
                           cwd=root, env=env, capture_output=True, text=True)
    assert check.stdout.strip() == "False"
