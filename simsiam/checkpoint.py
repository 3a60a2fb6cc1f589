"""Checkpoints that resume exactly, load with ``torch.load(weights_only=True)``, and export to torchvision.

A checkpoint is one ``torch.save`` dict: model, optimiser (its param groups carry the current lr, so the
schedule - a pure function of epoch, step and config - resumes where it stopped), epoch, step, config,
RNG states and free-form ``extra``. Only tensors and plain Python containers go in, so loading never
runs pickled code.

:func:`export_backbone` (``simsiam export``, :mod:`simsiam.export_cli`) writes the backbone as a plain
state_dict: for torchvision backbones the backbone module *is* torchvision's ResNet with ``fc =
Identity``, so the keys are torchvision's and ``torchvision.models.resnet50().load_state_dict(sd,
strict=False)`` reports only fc missing; the small backbone's keys are :class:`simsiam.model.SmallResNet`'s.

torch is imported inside the functions that need it: :data:`CHECKPOINT_FILE` and :func:`resolve` serve
torch-free modules too (the registry, ``simsiam export --help``), which should start in milliseconds.
"""
from __future__ import annotations

import io
import os
import pickle
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from simsiam.config import Config, ConfigError, from_dict
from simsiam.io import atomic_write_bytes

if TYPE_CHECKING:
    import torch
    from torch import nn

CHECKPOINT_FILE = "checkpoint.pt"  # the file in each checkpoint directory a run writes
FORMAT_VERSION = 1


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    from torch import nn

    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def rng_state() -> dict[str, Any]:
    """torch (CPU and every CUDA device), numpy and Python ``random`` states as tensors and plain values."""
    import torch

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
    import torch

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
    import torch

    buf = io.BytesIO()
    torch.save(state_dict, buf)
    atomic_write_bytes(path, buf.getbuffer())


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a directory (a Ray checkpoint) holding ``checkpoint.pt``."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_FILE
        if not p.is_file():
            raise FileNotFoundError(f"{path}: directory has no {CHECKPOINT_FILE}")
    elif not p.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
    return p


EXPECTED = (f"expected a SimSiam checkpoint: the {CHECKPOINT_FILE} of a run's checkpoint directory "
            "(<storage>/<run name>/checkpoint_*/), a dict with model (a state_dict), optimizer, epoch, step, config")

_MAGIC = ((b"\x93NUMPY", "a NumPy .npy array"), (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
          (b"PAR1", "a Parquet file"), (b"GIF8", "a GIF image"), (b"\x1f\x8b", "a gzip file"),
          (b"PK\x03\x04", "a zip archive"), (b"\x80", "a Python pickle"))


def _what_file(p: Path) -> str:
    """A few words on what a file that failed to load looks like, from its first bytes."""
    with open(p, "rb") as f:
        head = f.read(512)
    if not head:
        return "an empty file (0 bytes)"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "a binary file of unknown format"


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint (file or directory holding ``checkpoint.pt``) onto the CPU, with
    ``weights_only=True`` so a tampered file cannot execute code. Anything else - an empty file, another
    format, a torch file holding something else - is a ``ValueError`` saying what the file is."""
    import torch

    p = resolve(path)
    try:
        obj = torch.load(p, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        # torch's message here is a page on weights_only; one of its lines names the offending object.
        detail = [ln.strip() for ln in str(e).splitlines()
                  if ln.strip().startswith(("WeightsUnpickler", "Unsupported"))]
        why = detail[-1] if detail else "refused by torch.load(weights_only=True)"
        raise ValueError(f"{p}: {_what_file(p)} that holds objects other than tensors and plain values ({why}); "
                         f"{EXPECTED}") from None
    except Exception as e:  # noqa: BLE001 - torch.load fails with Index/Key/EOF/Runtime errors on non-torch files
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{p}: {_what_file(p)}, not a torch checkpoint (torch.load: {type(e).__name__}"
                         f"{': ' + first if first else ''}); {EXPECTED}") from None
    if not isinstance(obj, dict) or "model" not in obj:
        kind = f"a dict with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise ValueError(f"{p}: a torch file holding {kind}, not a SimSiam checkpoint (no 'model' entry); "
                         f"{EXPECTED}")
    model = obj["model"]
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        kind = type(model).__name__ if not isinstance(model, dict) else "a dict whose values are not all tensors"
        raise ValueError(f"{p}: its 'model' entry is {kind}, not a state_dict (parameter name -> tensor); "
                         f"{EXPECTED}")
    return obj


def checkpoint_config(ckpt: dict[str, Any], where: str = "checkpoint") -> Config:
    """The validated :class:`Config` stored in a checkpoint."""
    if "config" not in ckpt:
        raise ValueError(f"{where}: has no 'config' entry (needed to know the backbone); {EXPECTED}")
    try:
        return from_dict(ckpt["config"])
    except ConfigError as e:
        raise ValueError(f"{where}: its config is not valid for this version of simsiam: {e}") from None


def backbone_state_dict(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``backbone.*`` entries of a SimSiam state_dict with that prefix removed."""
    prefix = "backbone."
    return {k[len(prefix):]: v.detach().cpu().contiguous() for k, v in model_state.items() if k.startswith(prefix)}


def _check_torchvision_keys(sd: dict[str, torch.Tensor], cfg: Config, where: str) -> None:
    """Refuse to write an export that torchvision would not load with only fc missing."""
    import torchvision

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


def export(ckpt_path: str | os.PathLike, out_path: str | os.PathLike) -> tuple[list[str], Config]:
    """:func:`export_backbone`, also returning the run's config (which says how to load the export)."""
    import torch

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
    return export(ckpt_path, out_path)[0]


def how_to_load(cfg: Config) -> str:
    """One line on how to load an export of a run with config ``cfg`` (what the README shows)."""
    m = cfg.model
    if m.backbone == "small":
        return (f"load it strictly into simsiam.model.SmallResNet(width={m.small_width}): "
                f"net.load_state_dict(torch.load(OUT, weights_only=True))")
    how = (f"load it into torchvision.models.{m.backbone}() with load_state_dict(torch.load(OUT, weights_only=True), "
           "strict=False): only fc.weight and fc.bias are missing")
    if m.cifar_stem:
        how += (" - after swapping in the CIFAR stem: net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False); "
                "net.maxpool = nn.Identity()")
    return how
