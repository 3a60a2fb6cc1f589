"""The photometric half of the augmentation: a whole uint8 batch, on whatever device it is on.

Colour jitter (the four ops in a random order per image), random grayscale, Gaussian blur and
normalisation, with independent random parameters per image (on the GPU during training).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from simsiam.config import ConfigError, DataConfig

__all__ = ["PhotometricAugment", "PhotometricParams", "Normalize", "normalize", "blur_enabled", "blur_kernel_size"]

# ColorJitter's ops, in the index order used by PhotometricParams.order.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
SIGMA_RANGE = (0.1, 2.0)
BLUR_PROB = 0.5
# CPU elementwise kernels are memory-bound: on a whole batch of 224 px floats every op streams
# hundreds of MB through RAM (and each fresh temporary is page-faulted in). Chunks of a few MB stay in
# cache and run 3-4x faster. Accelerators get the whole batch at once.
_CPU_CHUNK_BYTES = 4 << 20
_SMALL_IMAGE_PIXELS = 40 * 40


def blur_enabled(data_cfg: DataConfig) -> bool:
    """Whether the recipe blurs at this image size (``auto``: only from 64 px up, as on ImageNet)."""
    return data_cfg.blur == "on" or (data_cfg.blur == "auto" and data_cfg.image_size >= 64)


def blur_kernel_size(image_size: int) -> int:
    """An odd kernel about 10% of the image side (23 at 224 px), at least 3."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


@dataclass
class PhotometricParams:
    """Per-image random parameters of one photometric pass; every field has a leading batch dim N.

    ``order[i]`` is the permutation in which image i's colour-jitter ops run
    (0 brightness, 1 contrast, 2 saturation, 3 hue), as torchvision's ColorJitter draws it per call.
    """

    jitter: torch.Tensor       # bool (N,): colour jitter applied
    brightness: torch.Tensor   # float (N,)
    contrast: torch.Tensor     # float (N,)
    saturation: torch.Tensor   # float (N,)
    hue: torch.Tensor          # float (N,), in [-0.5, 0.5]
    order: torch.Tensor        # int64 (N, 4)
    grayscale: torch.Tensor    # bool (N,)
    blur: torch.Tensor         # bool (N,)
    sigma: torch.Tensor        # float (N,)

    def to(self, device: torch.device | str) -> PhotometricParams:
        return PhotometricParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __len__(self) -> int:
        return int(self.jitter.shape[0])

    def index(self, idx: torch.Tensor | slice) -> PhotometricParams:
        """The parameters of a subset (or reordering) of the images."""
        return PhotometricParams(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})


# The photometric kernels work in place on a planar (3, N, H, W) layout: each colour plane is one
# contiguous block, so the per-channel arithmetic runs several times faster on CPU than on strided
# channel views of an (N, 3, H, W) batch. Temporaries come from a reusable scratch buffer: on CPU a
# fresh large tensor costs a page fault per 4 KiB the first time it is written, which measured as much
# as the arithmetic itself.


class _Scratch:
    """Reusable float memory (CPU); on accelerators the caching allocator already does this."""

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def get(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An uninitialised contiguous tensor; valid until the next get() on this scratch."""
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        n = math.prod(shape)
        if self._buf is None or self._buf.numel() < n or self._buf.dtype != dtype:
            self._buf = torch.empty(n, dtype=dtype)
        return self._buf[:n].view(shape)

    def planes(self, k: int, like: torch.Tensor) -> torch.Tensor:
        """(k, N, H, W) planes for a planar ``like`` (3, N, H, W)."""
        return self.get((k, *like.shape[1:]), like.device, like.dtype)


def _gray_into(y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma with torchvision's coefficients: planar (3, N, H, W) -> ``out`` (N, H, W)."""
    return torch.mul(y[0], 0.2989, out=out).add_(y[1], alpha=0.587).add_(y[2], alpha=0.114)


def _brightness_(y: torch.Tensor, f: torch.Tensor) -> None:
    """torchvision's adjust_brightness: clamp(f y, 0, 1), per-image f (N,)."""
    y.mul_(f.view(1, -1, 1, 1)).clamp_(0.0, 1.0)


def _contrast_(y: torch.Tensor, f: torch.Tensor, scratch: _Scratch) -> None:
    """torchvision's adjust_contrast: clamp(f y + (1 - f) mean(gray(y)), 0, 1), per image."""
    mean = _gray_into(y, scratch.planes(1, y)[0]).mean(dim=(-2, -1))
    y.mul_(f.view(1, -1, 1, 1)).add_(((1.0 - f) * mean).view(1, -1, 1, 1)).clamp_(0.0, 1.0)


def _saturation_(y: torch.Tensor, f: torch.Tensor, scratch: _Scratch) -> None:
    """torchvision's adjust_saturation: clamp(f y + (1 - f) gray(y), 0, 1), per image."""
    gray = _gray_into(y, scratch.planes(1, y)[0]).mul_((1.0 - f).view(-1, 1, 1))
    y.mul_(f.view(1, -1, 1, 1)).add_(gray.unsqueeze(0)).clamp_(0.0, 1.0)


def _hue_(y: torch.Tensor, factor: torch.Tensor, scratch: _Scratch) -> None:
    """Rotate the hue by ``factor`` (N,) turns, in place; equal to torchvision's adjust_hue.

    Instead of building HSV and the six-way piecewise HSV->RGB it uses the closed form
    c = min + C x_c(6H), C = max - min, with x_R = clamp(|6H - 3| - 1, 0, 1),
    x_G = clamp(2 - |6H - 2|, 0, 1), x_B = clamp(2 - |6H - 4|, 0, 1): the same function in a third of
    the passes over memory. Branch masks come from sign() rather than comparisons and where(), which
    measured several times slower per element on CPU.
    """
    r, g, b = y[0], y[1], y[2]
    maxc, minc, cr, is_r, is_g, h, tmp = scratch.planes(7, y).unbind(0)
    torch.maximum(torch.maximum(r, g, out=maxc), b, out=maxc)
    torch.minimum(torch.minimum(r, g, out=minc), b, out=minc)
    torch.sub(maxc, minc, out=cr)
    # torchvision's _rgb2hsv branch selection: red if max == r, else green if max == g, else blue.
    torch.sub(maxc, r, out=is_r).sign_().neg_().add_(1.0)
    torch.sub(maxc, g, out=is_g).sign_().neg_().add_(1.0)
    is_g.addcmul_(is_g, is_r, value=-1.0)
    # 6H before wrapping: (g-b)/C if red, 2 + (b-r)/C if green, else 4 + (r-g)/C.
    torch.sub(g, b, out=h).mul_(is_r)
    h.addcmul_(torch.sub(b, r, out=tmp), is_g)
    is_b = torch.add(is_r, is_g, out=is_r).neg_().add_(1.0)  # is_r is not needed after this
    h.addcmul_(torch.sub(r, g, out=tmp), is_b)
    # Where max == min every numerator is 0, and 0/0 becomes torchvision's h = 0.
    h.div_(cr).nan_to_num_(0.0).add_(is_g, alpha=2.0).add_(is_b, alpha=4.0)
    # fmod(h / 6 + 1, 1) as torchvision, then (h + f) mod 1 with f in [-0.5, 0.5]: both arguments are
    # positive, where frac() is fmod.
    h.div_(6.0).add_(1.0).frac_()
    h.add_(factor.view(-1, 1, 1)).add_(1.0).frac_().mul_(6.0)
    # r, g, b are read no more: write the result over them.
    r.copy_(h).sub_(3.0).abs_().sub_(1.0).clamp_(0.0, 1.0).mul_(cr).add_(minc)
    for plane, centre in ((g, 2.0), (b, 4.0)):
        plane.copy_(h).sub_(centre).abs_().sub_(2.0).clamp_(-1.0, 0.0).mul_(cr)
        torch.sub(minc, plane, out=plane)


def _reflect_pad(z: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    """Reflect-pad one spatial dim (as F.pad mode="reflect"): a plain copy plus two flipped strips,
    several times cheaper on CPU than the generic reflection-pad kernel."""
    size = z.shape[dim]
    shape = list(z.shape)
    shape[dim] = size + 2 * pad
    out = z.new_empty(shape)
    out.narrow(dim, pad, size).copy_(z)
    out.narrow(dim, 0, pad).copy_(z.narrow(dim, 1, pad).flip(dim))
    out.narrow(dim, pad + size, pad).copy_(z.narrow(dim, size - pad - 1, pad).flip(dim))
    return out


def _gaussian_blur(y: torch.Tensor, sigma: torch.Tensor, kernel_size: int,
                   apply: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image Gaussian blur as torchvision's gaussian_blur (its kernel, reflect padding), computed as
    two separable grouped convolutions on planar (3, N, H, W) images.

    Without ``apply`` every image is blurred, and taps beyond 5 sigma of the largest sigma are dropped:
    torchvision's weights there sum to under 6e-7, so the result moves by less than 1.2e-6 of the pixel
    range while a small-sigma blur costs a fraction of the full kernel (this reads sigma on the host).
    With ``apply`` (bool (N,)) the full kernel is used and images not selected get a unit impulse,
    which copies them exactly: no host synchronisation, for accelerators.
    """
    c, n, h, w = y.shape
    half = (kernel_size - 1) * 0.5
    t = torch.linspace(-half, half, steps=kernel_size, dtype=y.dtype, device=y.device)
    pdf = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1).to(y.dtype)).pow(2))
    kernel = pdf / pdf.sum(dim=1, keepdim=True)  # exactly torchvision's normalised 1D kernel
    centre = kernel_size // 2
    if apply is None:
        pad = min(centre, math.ceil(5.0 * float(sigma.max())))
        kernel = kernel[:, centre - pad: centre + pad + 1]
    else:
        pad = centre
        impulse = torch.zeros_like(kernel)
        impulse[:, centre] = 1.0
        kernel = torch.where(apply.view(-1, 1), kernel, impulse)
    kernel = kernel.repeat(c, 1)  # (C*N, k), channel-major like y
    k = 2 * pad + 1
    # TF32 would round the weights to 10 bits; the blur must match torchvision's float32 result.
    cudnn = torch.backends.cudnn
    with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                     allow_tf32=False):
        z = _reflect_pad(y, pad, 3).view(1, c * n, h, w + 2 * pad)  # y may be a strided slice; z is not
        z = torch.nn.functional.conv2d(z, kernel.view(c * n, 1, 1, k), groups=c * n)
        z = _reflect_pad(z, pad, 2)
        z = torch.nn.functional.conv2d(z, kernel.view(c * n, 1, k, 1), groups=c * n)
    return z.view(c, n, h, w)


def _mean_std(data_cfg: DataConfig, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(data_cfg.mean, dtype=dtype, device=device).view(1, 3, 1, 1)
    std = torch.tensor(data_cfg.std, dtype=dtype, device=device).view(1, 3, 1, 1)
    return mean, std


def _check_batch(x: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a (N, 3, H, W) image batch, got shape {tuple(x.shape)}")


def normalize(x: torch.Tensor, data_cfg: DataConfig) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32, scaled to [0, 1], then (x - data.mean) / data.std; same device."""
    _check_batch(x)
    mean, std = _mean_std(data_cfg, x.device, torch.float32)
    return x.to(torch.float32).div_(255.0).sub_(mean).div_(std)


class Normalize(torch.nn.Module):
    """Module form of :func:`normalize`, for eval batches."""

    def __init__(self, data_cfg: DataConfig) -> None:
        super().__init__()
        mean, std = _mean_std(data_cfg, torch.device("cpu"), torch.float32)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_batch(x)
        return x.to(torch.float32).div_(255.0).sub_(self.mean.to(x.device)).div_(self.std.to(x.device))


class PhotometricAugment(torch.nn.Module):
    """Batched colour jitter, grayscale, blur and normalisation, with independent parameters per image.

    ``forward(x)`` draws fresh parameters; ``sample_params`` + ``apply`` split that in two so the
    exact parameters can be inspected or replayed (the test checks them against torchvision's
    per-image functional ops).
    """

    def __init__(self, data_cfg: DataConfig) -> None:
        super().__init__()
        s = float(data_cfg.color_jitter)
        if s / 4 > 0.5:
            raise ConfigError(f"data.color_jitter: {s} gives a hue range of +-{s / 4}, over torchvision's 0.5 "
                              "limit; use <= 2.0")
        self.brightness = (max(0.0, 1.0 - s), 1.0 + s)
        self.contrast = self.brightness
        self.saturation = self.brightness
        self.hue = (-s / 4, s / 4)
        self.jitter_active = s > 0
        self.jitter_prob = float(data_cfg.jitter_prob) if self.jitter_active else 0.0
        self.grayscale_prob = float(data_cfg.grayscale_prob)
        self.blur_on = blur_enabled(data_cfg)
        self.kernel_size = blur_kernel_size(data_cfg.image_size)
        mean, std = _mean_std(data_cfg, torch.device("cpu"), torch.float32)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        # "grouped" (work-efficient: each image runs only its own ops; best for larger images on CPU)
        # or "stepwise" (launch-efficient: whole-batch kernels, no per-group loop, almost no host
        # syncs; best on accelerators and for small images, where launches cost more than arithmetic).
        # "auto" picks by the batch's device and image size.
        self.strategy = "auto"

    def sample_params(self, n: int, device: torch.device | str = "cpu",
                      generator: torch.Generator | None = None) -> PhotometricParams:
        """Draw parameters for n images on the generator's device, returned on ``device``."""
        gen_device = generator.device if generator is not None else torch.device("cpu")

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return torch.rand(n, generator=generator, device=gen_device) * (hi - lo) + lo

        def coin(p: float) -> torch.Tensor:
            return torch.rand(n, generator=generator, device=gen_device) < p

        params = PhotometricParams(
            jitter=coin(self.jitter_prob),
            brightness=uniform(*self.brightness),
            contrast=uniform(*self.contrast),
            saturation=uniform(*self.saturation),
            hue=uniform(*self.hue),
            order=torch.argsort(torch.rand(n, 4, generator=generator, device=gen_device), dim=1),
            grayscale=coin(self.grayscale_prob),
            blur=coin(BLUR_PROB if self.blur_on else 0.0),
            sigma=uniform(*SIGMA_RANGE),
        )
        return params.to(device)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 (N, 3, S, S) on any device -> normalised float32 (N, 3, S, S) on the same device."""
        return self.apply(x, self.sample_params(x.shape[0], x.device, generator))

    @torch.no_grad()
    def apply(self, x: torch.Tensor, params: PhotometricParams, normalize: bool = True) -> torch.Tensor:
        """Apply given per-image parameters to a uint8 batch; ``normalize=False`` returns [0, 1] floats."""
        _check_batch(x)
        n = x.shape[0]
        if len(params) != n:
            raise ValueError(f"params are for {len(params)} images, the batch has {n}")
        params = params.to(x.device)
        strategy = self.strategy
        if strategy == "auto":
            # Measured on CPU: per-group kernel launches dominate below ~48 px, arithmetic above.
            small = x.shape[-2] * x.shape[-1] <= _SMALL_IMAGE_PIXELS
            strategy = "grouped" if x.device.type == "cpu" and not small else "stepwise"
        if strategy not in ("grouped", "stepwise"):
            raise ValueError(f"strategy {self.strategy!r}: choose auto, grouped or stepwise")
        if strategy == "stepwise":
            return self._apply_stepwise(x, params, normalize)
        # Sort the images so those sharing a jitter op order (then grayscale, then blur) sit together:
        # each group is then a slice processed in place, not a gather and a scatter.
        key = (self._order_code(params) + 1) * 4 + params.grayscale.long() * 2 + params.blur.long()
        perm = torch.argsort(key, stable=True)
        ps = params.index(perm)
        key = key[perm].tolist()
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        if x.device.type == "cpu":
            chunk = max(1, _CPU_CHUNK_BYTES // (3 * x.shape[-2] * x.shape[-1] * 4))
        else:
            chunk = max(1, n)
        mean = self.mean.to(x.device).view(3, 1, 1, 1)
        std = self.std.to(x.device).view(3, 1, 1, 1)
        planes, scratch, staging = _Scratch(), _Scratch(), _Scratch()
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            y = planes.get((3, stop - start, *x.shape[2:]), x.device)
            y.copy_(x.index_select(0, perm[start:stop]).permute(1, 0, 2, 3)).div_(255.0)
            self._apply_planar(y, ps.index(slice(start, stop)), key[start:stop], scratch)
            # Back to (N, 3, H, W) in a contiguous staging chunk (index_copy_ is slow from strided
            # sources), normalising on the way, then into the images' original positions.
            res = staging.get((stop - start, *x.shape[1:]), x.device)
            dst = res.permute(1, 0, 2, 3)
            if normalize:
                torch.sub(y, mean, out=dst).div_(std)
            else:
                dst.copy_(y)
            out.index_copy_(0, perm[start:stop], res)
        return out

    def _apply_stepwise(self, x: torch.Tensor, p: PhotometricParams, normalize: bool) -> torch.Tensor:
        """Whole-batch version: at jitter step k every image runs its k-th op. Brightness, contrast and
        saturation run on the whole batch with factor 1 for the images not due (an exact identity),
        hue on the images due; grayscale is a select, blur uses unit impulses for images not blurred."""
        y = torch.empty((3, x.shape[0], *x.shape[2:]), dtype=torch.float32, device=x.device)
        y.copy_(x.permute(1, 0, 2, 3)).div_(255.0)
        scratch = _Scratch()
        if self.jitter_active:
            one = torch.ones((), dtype=torch.float32, device=x.device)
            for k in range(4):
                due = [p.jitter & (p.order[:, k] == op) for op in range(4)]
                _brightness_(y, torch.where(due[BRIGHTNESS], p.brightness, one))
                _contrast_(y, torch.where(due[CONTRAST], p.contrast, one), scratch)
                _saturation_(y, torch.where(due[SATURATION], p.saturation, one), scratch)
                idx = due[HUE].nonzero().squeeze(1)
                if idx.numel():
                    ys = y.index_select(1, idx)
                    _hue_(ys, p.hue[idx], scratch)
                    y.index_copy_(1, idx, ys)
        gray = _gray_into(y, scratch.planes(1, y)[0])
        y = torch.where(p.grayscale.view(1, -1, 1, 1), gray.unsqueeze(0), y)
        if self.blur_on:
            y = _gaussian_blur(y, p.sigma, self.kernel_size, apply=p.blur)
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        dst = out.permute(1, 0, 2, 3)
        if normalize:
            torch.sub(y, self.mean.to(x.device).view(3, 1, 1, 1), out=dst).div_(self.std.to(x.device).view(3, 1, 1, 1))
        else:
            dst.copy_(y)
        return out

    @staticmethod
    def _order_code(p: PhotometricParams) -> torch.Tensor:
        """The jitter op order as one integer in [0, 256) (base 4), -1 for images not jittered."""
        code = (p.order * torch.tensor([64, 16, 4, 1], device=p.order.device)).sum(dim=1)
        return torch.where(p.jitter, code, torch.full_like(code, -1))

    def _apply_planar(self, y: torch.Tensor, p: PhotometricParams, key: list[int], scratch: _Scratch) -> None:
        """Augment a planar float chunk (3, N, H, W) in [0, 1] in place; ``key`` is each image's sort key."""
        for a, b in _runs([k // 4 for k in key]):
            code = key[a] // 4 - 1
            if code >= 0 and self.jitter_active:
                ys = y[:, a:b]
                for op in (code // 64, code // 16 % 4, code // 4 % 4, code % 4):
                    if op == BRIGHTNESS:
                        _brightness_(ys, p.brightness[a:b])
                    elif op == CONTRAST:
                        _contrast_(ys, p.contrast[a:b], scratch)
                    elif op == SATURATION:
                        _saturation_(ys, p.saturation[a:b], scratch)
                    else:
                        _hue_(ys, p.hue[a:b], scratch)
        for a, b in _runs([k >> 1 & 1 for k in key], value=1):
            ys = y[:, a:b]
            ys.copy_(_gray_into(ys, scratch.planes(1, ys)[0]).unsqueeze(0).expand_as(ys))
        if self.blur_on:
            for a, b in _runs([k & 1 for k in key], value=1):
                y[:, a:b] = _gaussian_blur(y[:, a:b], p.sigma[a:b], self.kernel_size)


def _runs(values: list[int], value: int | None = None) -> list[tuple[int, int]]:
    """[start, stop) of each run of equal consecutive values (only runs equal to ``value`` if given)."""
    runs, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            if value is None or values[start] == value:
                runs.append((start, i))
            start = i
    return runs
