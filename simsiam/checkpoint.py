"""Checkpoints that resume exactly, load with ``torch.load(weights_only=True)``, and export to torchvision.

A checkpoint is one ``torch.save`` dict: model, optimiser (its param groups carry the current lr, so the
schedule - a pure function of epoch, step and config - resumes where it stopped), epoch, step, config,
RNG states and free-form ``extra``. Only tensors and plain Python containers go in, so loading never
runs pickled code.

``simsiam export CKPT OUT.pt`` writes the backbone as a plain state_dict: for torchvision backbones the
backbone module *is* torchvision's ResNet with ``fc = Identity``, so the keys are torchvision's and
``torchvision.models.resnet50().load_state_dict(sd, strict=False)`` reports only fc missing.
"""
from __future__ import annotations

import argparse
import io
import os
import pickle
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn

from simsiam.config import Config, ConfigError, from_dict
from simsiam.io import atomic_write_bytes

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def rng_state() -> dict[str, Any]:
    """torch (CPU and every CUDA device), numpy and Python ``random`` states as tensors and plain values."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_version), "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss},
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: dict[str, Any]) -> None:
    """Restore the RNG states saved by :func:`state` (pass the checkpoint dict or its ``"rng"`` entry).
    CUDA states are restored only when the device count matches the saving run's."""
    rng = state.get("rng", state)
    torch.set_rng_state(rng["torch"].cpu())
    n = rng["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = rng["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
    cuda = rng.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def state(model: nn.Module, optimizer: torch.optim.Optimizer | None, epoch: int, step: int, cfg: Config,
          extra: dict | None = None) -> dict[str, Any]:
    """Everything a resume needs. ``model`` may be DDP- or compile-wrapped (the bare weights are saved);
    ``extra`` holds other resumable state (e.g. a CollapseGuard's ``state_dict()``) and must itself be
    tensors and plain Python values."""
    return {
        "format": FORMAT_VERSION,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "epoch": int(epoch),
        "step": int(step),
        "config": cfg.to_dict(),
        "rng": rng_state(),
        "extra": dict(extra or {}),
    }


def save(path: str | os.PathLike, state_dict: dict[str, Any]) -> None:
    """Write a checkpoint atomically (temp file, fsync, rename): a crash leaves the old file or the new one."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    atomic_write_bytes(path, buf.getbuffer())


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a directory (a Ray checkpoint) holding ``checkpoint.pt``."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
        if not p.is_file():
            raise FileNotFoundError(f"{path}: directory has no {CHECKPOINT_NAME}")
    elif not p.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
    return p


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint (file or directory holding ``checkpoint.pt``) onto the CPU, with
    ``weights_only=True`` so a tampered file cannot execute code."""
    p = resolve(path)
    try:
        obj = torch.load(p, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise ValueError(f"{p}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict) or "model" not in obj:
        raise ValueError(f"{p}: not a SimSiam checkpoint (no 'model' entry)")
    return obj


def checkpoint_config(ckpt: dict[str, Any], where: str = "checkpoint") -> Config:
    """The validated :class:`Config` stored in a checkpoint."""
    try:
        return from_dict(ckpt["config"])
    except (KeyError, ConfigError) as e:
        raise ValueError(f"{where}: bad or missing config: {e}") from None


def backbone_state_dict(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``backbone.*`` entries of a SimSiam state_dict with that prefix removed."""
    prefix = "backbone."
    return {k[len(prefix):]: v.detach().cpu().contiguous() for k, v in model_state.items() if k.startswith(prefix)}


def _check_torchvision_keys(sd: dict[str, torch.Tensor], cfg: Config, where: str) -> None:
    """Refuse to write an export that torchvision would not load with only fc missing."""
    m = cfg.model
    ref = getattr(torchvision.models, m.backbone)(weights=None).state_dict()
    expected = {k for k in ref if not k.startswith("fc.")}
    missing, unexpected = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"{where}: backbone keys do not match torchvision {m.backbone}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    # A CIFAR stem legitimately changes conv1's kernel (3x3 instead of 7x7); every other shape must agree.
    bad = [k for k in expected if sd[k].shape != ref[k].shape and not (m.cifar_stem and k == "conv1.weight")]
    if bad:
        raise ValueError(f"{where}: backbone shapes differ from torchvision {m.backbone} at {sorted(bad)[:5]}")


def _export(ckpt_path: str | os.PathLike, out_path: str | os.PathLike) -> tuple[list[str], Config]:
    ckpt = load(ckpt_path)
    cfg = checkpoint_config(ckpt, str(ckpt_path))
    sd = backbone_state_dict(ckpt["model"])
    if not sd:
        raise ValueError(f"{ckpt_path}: checkpoint model has no backbone.* weights")
    if cfg.model.backbone != "small":
        _check_torchvision_keys(sd, cfg, str(ckpt_path))
    buf = io.BytesIO()
    torch.save(sd, buf)
    atomic_write_bytes(out_path, buf.getbuffer())
    return list(sd), cfg


def export_backbone(ckpt_path: str | os.PathLike, out_path: str | os.PathLike) -> list[str]:
    """Write the checkpoint's backbone as a plain state_dict to ``out_path`` (atomically); return its keys.

    For torchvision backbones the keys are checked against torchvision's model first. The 'small'
    backbone has no torchvision counterpart; its export uses SimSiam's own module names."""
    return _export(ckpt_path, out_path)[0]


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Export a SimSiam checkpoint's backbone as a plain state_dict. For resnet18/34/50 the keys "
                    "are torchvision's: torchvision.models.resnet50().load_state_dict(torch.load(OUT), "
                    "strict=False) loads it with only fc.weight and fc.bias missing. (A cifar_stem backbone "
                    "needs conv1 replaced by a 3x3 stride-1 conv and maxpool by Identity first.)")
    p.add_argument("ckpt", metavar="CKPT", help=f"checkpoint file, or a Ray checkpoint directory holding "
                                                f"{CHECKPOINT_NAME}")
    p.add_argument("out", metavar="OUT.pt", help="where to write the backbone state_dict (written atomically)")
    return p


def main(argv: list[str] | None = None, prog: str = "simsiam export") -> int:
    """``simsiam export CKPT OUT.pt``."""
    args = _parser(prog).parse_args(argv)
    try:
        keys, cfg = _export(args.ckpt, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    backbone = cfg.model.backbone
    if backbone == "small":
        how = "loads into simsiam.model.SmallResNet with the run's small_width"
    else:
        how = f"loads into torchvision.models.{backbone}() with strict=False, only fc missing"
        if cfg.model.cifar_stem:
            how += ", after swapping in the CIFAR stem (3x3 stride-1 conv1, no max-pool)"
    print(f"wrote {len(keys)} tensors to {args.out} (backbone {backbone}; {how})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
