"""The augmentation: geometric half on uint8 arrays, batched photometric half against torchvision's
per-image functional ops for the same parameters."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from simsiam.augment import (
    GeometricAugment,
    Normalize,
    PhotometricAugment,
    blur_enabled,
    blur_kernel_size,
    eval_transform,
    normalize,
)
from simsiam.config import ConfigError, DataConfig

OPS = (
    lambda x, p, i: TF.adjust_brightness(x, p.brightness[i].item()),
    lambda x, p, i: TF.adjust_contrast(x, p.contrast[i].item()),
    lambda x, p, i: TF.adjust_saturation(x, p.saturation[i].item()),
    lambda x, p, i: TF.adjust_hue(x, p.hue[i].item()),
)


def reference(x_uint8: torch.Tensor, p, data_cfg: DataConfig, normalized: bool) -> torch.Tensor:
    """torchvision's functional ops, one image at a time, in MoCo v2's order."""
    k = blur_kernel_size(data_cfg.image_size)
    out = []
    for i in range(x_uint8.shape[0]):
        x = x_uint8[i].float() / 255
        if p.jitter[i]:
            for op in p.order[i].tolist():
                x = OPS[op](x, p, i)
        if p.grayscale[i]:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if p.blur[i]:
            x = TF.gaussian_blur(x, [k, k], [p.sigma[i].item()] * 2)
        if normalized:
            x = TF.normalize(x, data_cfg.mean, data_cfg.std)
        out.append(x)
    return torch.stack(out)


def natural_batch(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Random images plus the hue edge cases: gray pixels, pure primaries, ties between channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    x[0] = 128                                 # all gray: max == min everywhere
    x[1, :, : size // 2] = torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1)
    x[1, :, size // 2:] = torch.tensor([0, 255, 255], dtype=torch.uint8).view(3, 1, 1)
    x[2, 0], x[2, 1] = x[2, 1], x[2, 1]        # r == g ties
    x[3, 2] = x[3, 1]                          # g == b ties
    return x


# --------------------------------------------------------------------------- photometric


@pytest.mark.parametrize("strategy", ["grouped", "stepwise"])
@pytest.mark.parametrize("size,blur", [(64, "auto"), (32, "on"), (24, "off")])
def test_photometric_matches_torchvision_per_image(size, blur, strategy):
    # Both code paths (grouped: CPU default; stepwise: accelerator default) are checked here on CPU.
    cfg = DataConfig(image_size=size, blur=blur, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])
    aug = PhotometricAugment(cfg)
    aug.strategy = strategy
    n = 64 if size < 64 else 24
    x = natural_batch(n, size)
    p = aug.sample_params(n, "cpu", torch.Generator().manual_seed(1))
    p.jitter[: n - 4] = True  # most images jittered, so many op orders are exercised
    ours = aug.apply(x, p, normalize=False)
    ref = reference(x, p, cfg, normalized=False)
    assert ours.dtype == torch.float32 and ours.shape == x.shape
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    # Normalised output: same check, scaled by 1/std.
    torch.testing.assert_close(aug.apply(x, p), reference(x, p, cfg, normalized=True), atol=1e-5 / 0.2, rtol=0)


def test_photometric_params_are_independent_per_image():
    cfg = DataConfig(image_size=32)
    aug = PhotometricAugment(cfg)
    p = aug.sample_params(256, "cpu", torch.Generator().manual_seed(0))
    for name in ("brightness", "contrast", "saturation", "hue", "sigma"):
        assert torch.unique(getattr(p, name)).numel() == 256, name
    assert 0.72 < p.jitter.float().mean() < 0.88          # p = 0.8
    assert 0.12 < p.grayscale.float().mean() < 0.28       # p = 0.2
    assert len({tuple(o) for o in p.order.tolist()}) > 12  # many of the 24 op orders
    assert all(sorted(o) == [0, 1, 2, 3] for o in p.order.tolist())
    lo, hi = 1 - cfg.color_jitter, 1 + cfg.color_jitter
    assert p.brightness.min() >= lo and p.brightness.max() <= hi
    assert p.hue.abs().max() <= cfg.color_jitter / 4
    # One image repeated across a batch comes out differently in every slot.
    x = natural_batch(8, 32)[5:6].expand(16, -1, -1, -1).contiguous()
    y = aug(x, torch.Generator().manual_seed(3))
    flat = y.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(16) * 1e9).min() > 1e-3


def test_photometric_seeded_and_device_preserving():
    aug = PhotometricAugment(DataConfig(image_size=16))
    x = natural_batch(8, 16)
    a = aug(x, torch.Generator().manual_seed(5))
    b = aug(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.device == x.device and a.dtype == torch.float32


def test_blur_presets_by_image_size():
    assert not blur_enabled(DataConfig(image_size=32, blur="auto"))
    assert blur_enabled(DataConfig(image_size=64, blur="auto"))
    assert blur_enabled(DataConfig(image_size=224, blur="auto"))
    assert not blur_enabled(DataConfig(image_size=224, blur="off"))
    assert blur_enabled(DataConfig(image_size=32, blur="on"))
    assert blur_kernel_size(224) == 23 and blur_kernel_size(64) == 7 and blur_kernel_size(16) == 3
    p = PhotometricAugment(DataConfig(image_size=32)).sample_params(500)
    assert not p.blur.any()  # off at 32 px under auto
    p = PhotometricAugment(DataConfig(image_size=224)).sample_params(500)
    assert 0.4 < p.blur.float().mean() < 0.6


def test_jitter_strength_limits():
    with pytest.raises(ConfigError, match="data.color_jitter"):
        PhotometricAugment(DataConfig(color_jitter=2.5))
    # Strength 0 switches jitter off entirely.
    aug = PhotometricAugment(DataConfig(image_size=16, color_jitter=0.0, grayscale_prob=0.0))
    x = natural_batch(4, 16)
    torch.testing.assert_close(aug.apply(x, aug.sample_params(4), normalize=False), x.float() / 255)


def test_normalize_matches_torchvision():
    cfg = DataConfig(mean=[0.1, 0.2, 0.3], std=[0.5, 0.6, 0.7])
    x = natural_batch(4, 8)
    ref = torch.stack([TF.normalize(x[i].float() / 255, cfg.mean, cfg.std) for i in range(4)])
    torch.testing.assert_close(normalize(x, cfg), ref)
    torch.testing.assert_close(Normalize(cfg)(x), ref)
    with pytest.raises(ValueError, match="N, 3, H, W"):
        normalize(x[0], cfg)


# --------------------------------------------------------------------------- geometric


@pytest.mark.parametrize("shape", [(8, 8), (8, 8, 1), (40, 90, 3), (300, 200, 3), (5, 7, 4)])
def test_geometric_shape_and_dtype(shape):
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    out = GeometricAugment(24, 0.2)(img, np.random.default_rng(1))
    assert out.shape == (3, 24, 24) and out.dtype == np.uint8 and out.flags.c_contiguous


def test_geometric_crop_follows_random_resized_crop():
    geo = GeometricAugment(32, 0.2)
    rng = np.random.default_rng(0)
    for _ in range(500):
        top, left, h, w = geo.crop_params(120, 160, rng)
        assert 0 <= top and top + h <= 120 and 0 <= left and left + w <= 160
        assert 0.2 * 0.9 <= h * w / (120 * 160) <= 1.0
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


def test_geometric_full_crop_is_resize_or_its_mirror():
    # min_scale 1 on a square image: the crop is the whole image, so a view is the resize or its flip.
    img = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    resized = np.asarray(Image.fromarray(img).resize((16, 16), Image.BILINEAR)).transpose(2, 0, 1)
    geo = GeometricAugment(16, 1.0, ratio=(1.0, 1.0))
    rng = np.random.default_rng(0)
    flips = 0
    for _ in range(40):
        out = geo(img, rng)
        if np.array_equal(out, resized[:, :, ::-1]) and not np.array_equal(out, resized):
            flips += 1
        else:
            assert np.array_equal(out, resized)
    assert 8 < flips < 32  # p = 0.5


def test_geometric_accepts_gray_and_pil():
    gray = np.random.default_rng(0).integers(0, 256, (10, 10), dtype=np.uint8)
    out = GeometricAugment(10, 1.0, flip_prob=0.0, ratio=(1.0, 1.0))(gray, np.random.default_rng(0))
    assert np.array_equal(out, np.stack([gray] * 3))
    out2 = GeometricAugment(10, 1.0, flip_prob=0.0, ratio=(1.0, 1.0))(Image.fromarray(gray), np.random.default_rng(0))
    assert np.array_equal(out, out2)
    with pytest.raises(ValueError, match="uint8"):
        GeometricAugment(10, 0.5)(gray.astype(np.float32), np.random.default_rng(0))


@pytest.mark.parametrize("hw,size,ratio", [((64, 80), 32, 1.0), ((64, 80), 32, 256 / 224), ((300, 200), 224, 256 / 224),
                                           ((32, 32), 32, 1.0)])
def test_eval_transform_is_resize_then_center_crop(hw, size, ratio):
    img = np.random.default_rng(0).integers(0, 256, (*hw, 3), dtype=np.uint8)
    pil = Image.fromarray(img)
    short = int(round(size * ratio))
    ref = TF.center_crop(TF.resize(pil, short, interpolation=TF.InterpolationMode.BILINEAR), [size, size])
    out = eval_transform(img, size, ratio)
    assert out.shape == (3, size, size) and out.dtype == np.uint8
    assert np.array_equal(out, np.asarray(ref).transpose(2, 0, 1))
    if hw == (size, size) and ratio == 1.0:
        assert np.array_equal(out, img.transpose(2, 0, 1))  # identity at native size: exact round trips


def test_the_ray_data_side_imports_no_torch():
    """Every Ray Data worker imports the row functions; torch there costs seconds per process start."""
    import subprocess
    import sys

    code = ("import sys, simsiam.data.batches, simsiam.augment; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "simsiam.augment.PhotometricAugment; assert 'torch' in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
