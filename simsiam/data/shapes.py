"""The built-in ``shapes`` set: filled silhouettes of five shape classes at 32 px, where colour,
background, position, scale and clutter are nuisances, so neither raw pixels nor a random-init encoder
can read the class off.

Each image is one object (its class: disk, square, triangle, plus, star) filled with a light colour of
random hue, at a random position, size and small tilt, over a darker background of other random hues
(a gradient or smooth blobs), under a few thin lines and dots of clutter, with a little pixel noise.
What separates the classes is the silhouette alone; the invariances SimSiam's augmentations teach are
the ones needed to find it: random resized crops (position and scale), colour jitter and grayscale
(colour). The object is always lighter than its background: with the polarity random too (knob
``DARK_OBJECTS``) or with colours of any brightness, a small supervised network barely learns the task
in a few hundred steps, and no short self-supervised run can then do better. Measured figures: README,
Data; ``tools/ssl_tuning_harness.py`` scores a change of the knobs below.

Generated deterministically from a seed in seconds (numpy + PIL, drawn at 4x and downsampled for
anti-aliasing); no download. ``simsiam data convert --builtin shapes DEST`` or ``builtin:shapes``.
"""
from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["CLASSES", "IMAGE_SIZE", "SPLITS", "VERSION", "render", "shapes_split"]

CLASSES = ("disk", "square", "triangle", "plus", "star")
IMAGE_SIZE = 32
SPLITS = {"train": 5000, "test": 1000}   # rows per split, classes balanced
VERSION = 2                               # bump when the drawing changes: part of the dataset's fingerprint
_SUPER = 4                                # drawn at 4x, then box-downsampled (anti-aliasing)
# Rotation is not an invariance SimSiam's augmentations teach (crops, flips, colour), so objects only
# tilt a little. The knobs are module constants so experiments (tools/ssl_tuning_harness.py) can vary them.
ROTATION = math.radians(15)               # max |tilt| of the object (radians)
RADIUS = (0.18, 0.30)                     # object radius, as a fraction of the image side
CLUTTER = (1, 4)                          # clutter items per image: [low, high)
TEXTURES = ("gradient", "blobs")          # of "gradient", "blobs", "stripes", "checks"
NOISE = 5.0                               # pixel noise std (0..255 scale)
OBJECT_LUMA = (150.0, 245.0)              # the object is lighter than every background colour:
BACKGROUND_LUMA = (15.0, 110.0)           # its silhouette survives grayscale (luma ranges, 0..255)
DARK_OBJECTS = 0.0                        # fraction of images with the two luma ranges swapped


def _regular(n: int, r: float = 1.0, phase: float = 0.0) -> list[tuple[float, float]]:
    return [(r * math.cos(phase + 2 * math.pi * k / n), r * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _circle(r: float, cx: float = 0.0, cy: float = 0.0, n: int = 48) -> list[tuple[float, float]]:
    return [(cx + x, cy + y) for x, y in _regular(n, r)]


# Each class: (filled polygons, hole polygons) in unit coordinates (the object fits the unit disk).
# Areas are of the same order, so size does not give the class away.
def _outline(name: str) -> tuple[list, list]:
    if name == "disk":
        return [_circle(0.85)], []
    if name == "square":
        return [_regular(4, 1.0, math.pi / 4)], []
    if name == "triangle":
        return [[(x, y + 0.15) for x, y in _regular(3, 1.1, -math.pi / 2)]], []
    if name == "plus":
        a, b = 0.32, 1.0
        return [[(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a),
                 (-a, -a)]], []
    if name == "star":
        pts = []
        for k in range(10):
            r = 1.05 if k % 2 == 0 else 0.45
            ang = -math.pi / 2 + math.pi * k / 5
            pts.append((r * math.cos(ang), r * math.sin(ang) + 0.08))
        return [pts], []
    if name == "crescent":
        return [_circle(0.95)], [_circle(0.8, 0.5, -0.15)]
    raise ValueError(f"unknown shape class {name!r}")


_OUTLINES = {name: _outline(name) for name in CLASSES}


def _random_colour(rng: np.random.Generator, luma: tuple[float, float] = (10.0, 245.0)) -> np.ndarray:
    """A colour (RGB floats in 0..255) of any hue and saturation, its luma drawn from ``luma``: hue
    says nothing of the class, brightness only which of object and background is which."""
    c = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 1.0), 1.0)) * 255.0
    target, now = rng.uniform(*luma), _luma(c)
    if target <= now:
        return c * (target / now)
    return c + (target - now) / (255.0 - now + 1e-9) * (255.0 - c)   # towards white: luma is linear in c


def _luma(c: np.ndarray) -> float:
    return float(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2])


def _texture(rng: np.random.Generator, big: int, luma: tuple[float, float]) -> np.ndarray:
    """A (big, big, 3) float background: two random colours mixed by stripes, checks, smooth blobs or
    a gradient, in a random direction and frequency."""
    c0, c1 = _random_colour(rng, luma), _random_colour(rng, luma)
    kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
    yy, xx = np.mgrid[0:big, 0:big] / big
    theta = rng.uniform(0, math.pi)
    if kind == "stripes":
        u = xx * math.cos(theta) + yy * math.sin(theta)
        t = (np.sin(2 * math.pi * rng.uniform(2.0, 6.0) * u + rng.uniform(0, 2 * math.pi)) > 0).astype(float)
    elif kind == "checks":
        f = rng.uniform(2.0, 5.0)
        u, v = xx * math.cos(theta) + yy * math.sin(theta), -xx * math.sin(theta) + yy * math.cos(theta)
        t = ((np.floor(f * u) + np.floor(f * v)) % 2).astype(float)
    elif kind == "blobs":
        n = int(rng.integers(3, 6))
        low = Image.fromarray((rng.random((n, n)) * 255).astype(np.uint8)).resize((big, big), Image.BICUBIC)
        t = np.asarray(low, dtype=float) / 255.0
    else:
        t = np.clip(0.5 + (xx - 0.5) * math.cos(2 * theta) + (yy - 0.5) * math.sin(2 * theta), 0.0, 1.0)
    t = t[..., None]
    return (1 - t) * c0 + t * c1


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, big: int) -> None:
    """Thin lines and small dots in random colours."""
    for _ in range(int(rng.integers(*CLUTTER))):
        col = tuple(int(v) for v in _random_colour(rng))
        x0, y0 = rng.uniform(0, big, 2)
        if rng.random() < 0.6:
            length, ang = rng.uniform(0.2, 0.5) * big, rng.uniform(0, 2 * math.pi)
            draw.line([(x0, y0), (x0 + length * math.cos(ang), y0 + length * math.sin(ang))], fill=col,
                      width=_SUPER)
        else:
            r = rng.uniform(0.6, 1.5) * _SUPER
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=col)


def render(label: int, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """One (size, size, 3) uint8 image of class ``label``, its nuisances drawn from ``rng``."""
    big = size * _SUPER
    dark = rng.random() < DARK_OBJECTS
    bg = _texture(rng, big, OBJECT_LUMA if dark else BACKGROUND_LUMA)
    canvas = Image.fromarray(bg.astype(np.uint8))
    # The object: random size, position, tilt, and colour, lighter than the background.
    colour = _random_colour(rng, BACKGROUND_LUMA if dark else OBJECT_LUMA)
    radius = rng.uniform(*RADIUS) * big
    cx, cy = (rng.uniform(radius * 0.9, big - radius * 0.9) for _ in range(2))
    rot = rng.uniform(-ROTATION, ROTATION)
    cos, sin = math.cos(rot), math.sin(rot)

    def place(poly: list) -> list[tuple[float, float]]:
        return [(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos)) for x, y in poly]

    mask = Image.new("L", (big, big), 0)
    mdraw = ImageDraw.Draw(mask)
    fills, holes = _OUTLINES[CLASSES[label]]
    for poly in fills:
        mdraw.polygon(place(poly), fill=255)
    for poly in holes:
        mdraw.polygon(place(poly), fill=0)
    canvas.paste(Image.new("RGB", (big, big), tuple(int(v) for v in colour)), (0, 0), mask)
    _clutter(ImageDraw.Draw(canvas), rng, big)
    small = np.asarray(canvas.resize((size, size), Image.BOX), dtype=np.float32)
    small = small + rng.normal(0.0, NOISE, small.shape)
    return np.clip(np.round(small), 0, 255).astype(np.uint8)


def shapes_split(seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (images (N, 32, 32, 3) uint8, labels (N,) int64), "test": (...)}, deterministic in ``seed``.

    Each split has its own random stream (so the test set does not change with the train size), labels
    cycle through the classes (balanced) in a shuffled order."""
    sizes = dict(SPLITS if sizes is None else sizes)
    out = {}
    streams = np.random.SeedSequence([VERSION, seed]).spawn(len(sizes))
    for (split, n), stream in zip(sizes.items(), streams, strict=True):
        rng = np.random.default_rng(stream)
        labels = rng.permutation(np.arange(n) % len(CLASSES)).astype(np.int64)
        images = np.stack([render(int(y), rng) for y in labels]) if n else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3),
                                                                                   np.uint8)
        out[split] = (images, labels)
    return out
