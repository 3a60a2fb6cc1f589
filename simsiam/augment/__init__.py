"""The MoCo v2 augmentation SimSiam uses, split where it is cheapest to run.

- :class:`GeometricAugment` - random resized crop to a fixed size and horizontal flip, per image, on
  uint8 arrays. It runs on CPU inside the Ray Data pipeline, so what travels to the trainer is a
  fixed-size uint8 tensor (4x smaller than float, and batchable).
- :class:`PhotometricAugment` - colour jitter (the four ops in a random order per image), random
  grayscale, Gaussian blur and normalisation, on a whole uint8 batch on whatever device it is on (the
  GPU during training), with independent random parameters per image.

Flipping commutes with every photometric op (they are pointwise, and the blur kernel is symmetric with
reflect padding), so moving it before the photometric part changes nothing in distribution.

The recipe (ImageNet): RandomResizedCrop(224, scale=(0.2, 1)); ColorJitter(0.4, 0.4, 0.4, 0.1) with
p=0.8; RandomGrayscale(p=0.2); GaussianBlur(sigma in [0.1, 2]) with p=0.5; RandomHorizontalFlip;
normalise. Blur is dropped for small images (``data.blur: auto`` turns it off below 64 px).

The geometric half lives in :mod:`simsiam.augment.geometric` (numpy + PIL only) and the photometric
half in :mod:`simsiam.augment.photometric` (torch). The photometric names are imported on first use, so
that Ray Data's workers, which import the geometric half, never pay for importing torch.
"""
from __future__ import annotations

import importlib
from typing import Any

from simsiam.augment.geometric import GeometricAugment, eval_transform, to_rgb_array

_PHOTOMETRIC = {"PhotometricAugment", "PhotometricParams", "Normalize", "normalize", "blur_enabled",
                "blur_kernel_size"}

__all__ = ["GeometricAugment", "eval_transform", "to_rgb_array", *sorted(_PHOTOMETRIC)]


def __getattr__(name: str) -> Any:
    if name in _PHOTOMETRIC:
        return getattr(importlib.import_module("simsiam.augment.photometric"), name)
    raise AttributeError(f"module 'simsiam.augment' has no attribute {name!r}")
