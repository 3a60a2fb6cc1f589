"""The geometric half of the augmentation: per image, on CPU, inside the Ray Data pipeline.

Random resized crop to a fixed size and horizontal flip on uint8 arrays, so what travels to the trainer
is a fixed-size uint8 tensor (4x smaller than float, and batchable); plus the deterministic eval view.
Only numpy and PIL: Ray Data's worker processes import this module, and not importing torch there
saves seconds of start-up per process.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

__all__ = ["GeometricAugment", "eval_transform", "to_rgb_array"]


def to_rgb_array(img: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 -> (H, W, 3) uint8 (gray replicated, alpha dropped)."""
    if img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {img.dtype}")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an (H, W, 3) image, got shape {tuple(img.shape)}")
    if img.shape[2] == 1:
        return np.repeat(img, 3, axis=2)
    if img.shape[2] == 4:
        return img[:, :, :3]
    return img


def _as_pil(img: np.ndarray | Image.Image) -> Image.Image:
    if isinstance(img, Image.Image):
        return img if img.mode == "RGB" else img.convert("RGB")
    return Image.fromarray(to_rgb_array(np.asarray(img)))


class GeometricAugment:
    """Random resized crop to ``image_size`` (scale in [min_scale, 1], aspect in [3/4, 4/3]) + random flip.

    The crop follows torchvision's ``RandomResizedCrop.get_params`` (10 tries, then a centre crop),
    drawn from a numpy Generator so Ray Data tasks stay seedable; the resize is PIL's antialiased
    bilinear, as in the reference implementation.
    """

    def __init__(self, image_size: int, min_scale: float, flip_prob: float = 0.5,
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
        self.image_size = int(image_size)
        self.scale = (float(min_scale), 1.0)
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.ratio = ratio
        self.flip_prob = flip_prob

    def crop_params(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(top, left, h, w) of a random crop, as torchvision's RandomResizedCrop draws it."""
        area = height * width
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*self.log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def draw(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int, bool]:
        """(top, left, h, w, flip) of one view, in the order :meth:`__call__` draws them.

        The device-decode path (:mod:`simsiam.data.device_decode`) draws its boxes here too, so the
        same seed gives both paths the same crops and flips."""
        top, left, h, w = self.crop_params(height, width, rng)
        return top, left, h, w, bool(rng.random() < self.flip_prob)

    def __call__(self, img: np.ndarray | Image.Image, rng: np.random.Generator) -> np.ndarray:
        """One augmented view: (H, W, 3) uint8 array (or a PIL image) -> (3, S, S) uint8, CHW."""
        pil = _as_pil(img)
        top, left, h, w, flip = self.draw(pil.height, pil.width, rng)
        s = self.image_size
        # resize(box=...) crops and resizes in one pass (no intermediate crop image).
        out = np.asarray(pil.resize((s, s), Image.BILINEAR, box=(left, top, left + w, top + h)))
        if flip:
            out = out[:, ::-1]
        return np.ascontiguousarray(out.transpose(2, 0, 1))


def eval_transform(img: np.ndarray | Image.Image, image_size: int, resize_ratio: float) -> np.ndarray:
    """Deterministic eval view: resize the short side to round(S x ratio), centre-crop S -> (3, S, S) uint8."""
    pil = _as_pil(img)
    s = int(image_size)
    short = max(s, int(round(s * resize_ratio)))
    w, h = pil.size
    if w <= h:
        nw, nh = short, max(short, int(short * h / w))
    else:
        nw, nh = max(short, int(short * w / h)), short
    if (nw, nh) != (w, h):
        pil = pil.resize((nw, nh), Image.BILINEAR)
    # torchvision's center_crop rounds the offsets the same way.
    top, left = int(round((nh - s) / 2.0)), int(round((nw - s) / 2.0))
    out = np.asarray(pil.crop((left, top, left + s, top + s)))
    return np.ascontiguousarray(out.transpose(2, 0, 1))
