"""The built-in ``shapes`` set: ten shape classes at 32 px where colour, position, scale and clutter are
nuisances, so neither raw pixels nor a random-init encoder can read the class off.

Each image is one object (its class: disk, ring, square, frame, triangle, plus, star, crescent,
half-disk, bar) drawn in a random colour, at a random position and size, over a background of another
colour (with a brightness gradient in a random direction), with thin lines and dots as clutter and a
little pixel noise. Colours come from an 8-colour palette with a small random shift, so colour varies
freely across classes but rarely identifies one image (else two views match on colour alone, a
shortcut short training takes before it learns shape). What separates the classes is the outline
alone; the invariances SimSiam's augmentations teach are the ones needed to find it: random resized
crops (position and scale), colour jitter and grayscale (colour). Measured under the cached linear
protocol: raw pixels ~17%, the small ResNet at random init ~15% (chance 10%).

Generated deterministically from a seed in a few seconds (numpy + PIL, drawn at 4x and downsampled
for anti-aliasing); no download. ``simsiam data convert --builtin shapes DEST`` or ``builtin:shapes``.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["CLASSES", "IMAGE_SIZE", "SPLITS", "VERSION", "render", "shapes_split"]

CLASSES = ("disk", "ring", "square", "frame", "triangle", "plus", "star", "crescent", "half_disk", "bar")
IMAGE_SIZE = 32
SPLITS = {"train": 5000, "test": 1000}   # rows per split, classes balanced
VERSION = 1                               # bump when the drawing changes: part of the dataset's fingerprint
_SUPER = 4                                # drawn at 4x, then box-downsampled (anti-aliasing)
# Rotation is not an invariance SimSiam's augmentations teach (crops, flips, colour), so objects stay
# upright by default; the knobs below are module constants so experiments can vary the design.
ROTATION = 0.0                            # max |rotation| of the object (radians)
RADIUS = (0.3, 0.45)                      # object radius, as a fraction of the image side
CLUTTER = (1, 4)                          # clutter items per image: [low, high)
NOISE = 6.0                               # pixel noise std (0..255 scale)


def _regular(n: int, r: float = 1.0, phase: float = 0.0) -> list[tuple[float, float]]:
    return [(r * math.cos(phase + 2 * math.pi * k / n), r * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _circle(r: float, cx: float = 0.0, cy: float = 0.0, n: int = 48) -> list[tuple[float, float]]:
    return [(cx + x, cy + y) for x, y in _regular(n, r)]


# Each class: (filled polygons, hole polygons) in unit coordinates (the object fits the unit disk).
# Areas are of the same order, so size does not give the class away.
def _outline(name: str) -> tuple[list, list]:
    if name == "disk":
        return [_circle(0.8)], []
    if name == "ring":
        return [_circle(0.95)], [_circle(0.55)]
    if name == "square":
        return [_regular(4, 0.95, math.pi / 4)], []
    if name == "frame":
        return [_regular(4, 1.0, math.pi / 4)], [_regular(4, 0.6, math.pi / 4)]
    if name == "triangle":
        return [_regular(3, 1.0, -math.pi / 2)], []
    if name == "plus":
        a, b = 0.3, 0.95
        return [[(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a),
                 (-a, -a)]], []
    if name == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.42
            ang = -math.pi / 2 + math.pi * k / 5
            pts.append((r * math.cos(ang), r * math.sin(ang)))
        return [pts], []
    if name == "crescent":
        return [_circle(0.9)], [_circle(0.75, 0.45, 0.0)]
    if name == "half_disk":
        return [[(0.95 * math.cos(t), 0.95 * math.sin(t) + 0.3) for t in np.linspace(math.pi, 2 * math.pi, 33)]], []
    if name == "bar":
        return [[(-1.0, -0.3), (1.0, -0.3), (1.0, 0.3), (-1.0, 0.3)]], []
    raise ValueError(f"unknown shape class {name!r}")


_OUTLINES = {name: _outline(name) for name in CLASSES}


PALETTE = np.array([(220, 40, 40), (40, 170, 60), (50, 80, 220), (240, 220, 60), (60, 200, 220), (200, 60, 200),
                    (240, 240, 240), (35, 35, 35)], dtype=np.float64)
COLOURS = "palette"


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """A colour (RGB floats in 0..255): a palette colour with a small random shift, so colour varies
    freely across classes but rarely identifies one image (which would let the views match on colour
    alone, a shortcut that short training takes before it learns shape)."""
    if COLOURS == "palette":
        return np.clip(PALETTE[rng.integers(len(PALETTE))] + rng.uniform(-20, 20, 3), 0, 255)
    import colorsys

    h, s, v = rng.random(), rng.uniform(0.2, 1.0), rng.uniform(0.15, 1.0)
    return np.array(colorsys.hsv_to_rgb(h, s, v)) * 255.0


def _luma(c: np.ndarray) -> float:
    return float(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2])


def render(label: int, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """One (size, size, 3) uint8 image of class ``label``, its nuisances drawn from ``rng``."""
    big = size * _SUPER
    # Background: a linear gradient between two random colours, in a random direction.
    c0 = _random_colour(rng)
    c1 = c0 * rng.uniform(0.6, 1.0) if COLOURS == "palette" else _random_colour(rng)
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:big, 0:big] / (big - 1) - 0.5
    t = np.clip(0.5 + (xx * math.cos(theta) + yy * math.sin(theta)), 0.0, 1.0)[..., None]
    bg = (1 - t) * c0 + t * c1
    canvas = Image.fromarray(bg.astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    # Clutter: thin lines and small dots in random colours, under the object.
    for _ in range(int(rng.integers(*CLUTTER))):
        col = tuple(int(v) for v in _random_colour(rng))
        if rng.random() < 0.6:
            x0, y0 = rng.uniform(0, big, 2)
            length, ang = rng.uniform(0.2, 0.6) * big, rng.uniform(0, 2 * math.pi)
            draw.line([(x0, y0), (x0 + length * math.cos(ang), y0 + length * math.sin(ang))], fill=col,
                      width=int(rng.integers(1, 3)) * _SUPER)
        else:
            x0, y0 = rng.uniform(0, big, 2)
            r = rng.uniform(0.6, 1.6) * _SUPER
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=col)
    # The object: random size, position, rotation, and a colour that stands out from the background.
    mean_bg = bg.reshape(-1, 3).mean(axis=0)
    for _ in range(20):
        colour = _random_colour(rng)
        if abs(_luma(colour) - _luma(mean_bg)) >= 50:
            break
    radius = rng.uniform(*RADIUS) * big
    cx, cy = (rng.uniform(radius * 0.8, big - radius * 0.8) for _ in range(2))
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
