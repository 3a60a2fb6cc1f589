"""Write a stand-in for an unseen image set, to check that the `sample` recipe is not tuned to one
generator: class folders of 32 px PNGs (DEST/train/<class>/*.png, DEST/val/<class>/*.png), objects on
cluttered backgrounds with colour and position as nuisances.

Drawn independently of ``simsiam/data/shapes.py`` (other classes, other background, other clutter,
outlined as well as filled objects, any rotation), so a recipe that only fits ``shapes`` shows here:

    python tools/heldout_proxy.py /tmp/proxy --seed 1
    simsiam data convert /tmp/proxy data/proxy
    simsiam run sample --set data.path=data/proxy/train --set data.eval_path=data/proxy/val \\
        --set data.image_size=32

Classes: ring, hexagon, arrow, crescent, cross (an X), bars (two parallel bars). The background is a
flat random colour under 6-14 random rectangles, ellipses and lines in other random colours; the object
is a saturated colour of random hue, brighter than the background's mean, at a random position, size
and angle. Not part of the package: a measurement tool (README, Data).
"""
from __future__ import annotations

import argparse
import colorsys
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from simsiam.io import atomic_write_bytes

CLASSES = ("ring", "hexagon", "arrow", "crescent", "cross", "bars")
SIZE = 32
SUPER = 4  # drawn at 4x, then downsampled (anti-aliasing)


Points = list[tuple[float, float]]


def _rotate(points: Points, angle: float, cx: float, cy: float, r: float) -> Points:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in points]


def _polygon(cls: str) -> list[Points]:
    """Unit-radius outline(s) of a polygonal class, centred on the origin."""
    if cls == "hexagon":
        return [[(math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)) for k in range(6)]]
    if cls == "arrow":
        return [[(-1, -0.25), (0.2, -0.25), (0.2, -0.7), (1, 0), (0.2, 0.7), (0.2, 0.25), (-1, 0.25)]]
    if cls == "cross":
        w = 0.22
        bar = [(-1, -w), (1, -w), (1, w), (-1, w)]
        return [_rotate(bar, math.pi / 4, 0, 0, 1), _rotate(bar, -math.pi / 4, 0, 0, 1)]
    if cls == "bars":
        return [[(-1, -0.75), (1, -0.75), (1, -0.2), (-1, -0.2)], [(-1, 0.2), (1, 0.2), (1, 0.75), (-1, 0.75)]]
    raise ValueError(cls)


def _colour(rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*sat), rng.uniform(*val))
    return int(r * 255), int(g * 255), int(b * 255)


def render(cls: str, rng: np.random.Generator) -> Image.Image:
    """One image of class ``cls``."""
    n = SIZE * SUPER
    img = Image.new("RGB", (n, n), _colour(rng, (0.2, 0.9), (0.15, 0.55)))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(6, 15)):  # clutter: other colours, shapes and sizes
        col = _colour(rng, (0.0, 1.0), (0.1, 0.7))
        x0, y0 = rng.uniform(-0.1, 1.0, 2) * n
        w, h = rng.uniform(0.05, 0.35, 2) * n
        kind = rng.integers(3)
        if kind == 0:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=col)
        elif kind == 1:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=col)
        else:
            draw.line([x0, y0, x0 + w, y0 + h], fill=col, width=int(rng.integers(2, 6)))
    r = rng.uniform(0.22, 0.38) * n
    cx, cy = rng.uniform(r, n - r, 2)
    angle = rng.uniform(0, 2 * math.pi)
    # The object is drawn as a mask, then filled, so a crescent's bite shows the clutter behind it.
    mask = Image.new("L", (n, n), 0)
    m = ImageDraw.Draw(mask)
    if cls == "ring":
        m.ellipse([cx - r, cy - r, cx + r, cy + r], outline=255, width=int(0.35 * r))
    elif cls == "crescent":
        m.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        dx, dy = 0.5 * r * math.cos(angle), 0.5 * r * math.sin(angle)
        m.ellipse([cx + dx - 0.85 * r, cy + dy - 0.85 * r, cx + dx + 0.85 * r, cy + dy + 0.85 * r], fill=0)
    else:
        for poly in _polygon(cls):
            m.polygon(_rotate(poly, angle, cx, cy, r), fill=255)
    img.paste(_colour(rng, (0.6, 1.0), (0.85, 1.0)), mask=mask)
    img = img.resize((SIZE, SIZE), Image.Resampling.BOX)
    noisy = np.asarray(img, np.float32) + rng.normal(0, 6.0, (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write(dest: Path, per_class: dict[str, int], seed: int) -> None:
    """Write ``per_class[split]`` images of every class under dest/split/class/, each file whole or absent."""
    for s, (split, count) in enumerate(per_class.items()):
        rng = np.random.default_rng([seed, s])
        for cls in CLASSES:
            folder = dest / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                png = io.BytesIO()
                render(cls, rng).save(png, format="PNG")
                atomic_write_bytes(folder / f"{cls}_{i:05d}.png", png.getbuffer())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dest", type=Path, help="output folder (gets train/ and val/)")
    p.add_argument("--train-per-class", type=int, default=600)
    p.add_argument("--val-per-class", type=int, default=150)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    write(a.dest, {"train": a.train_per_class, "val": a.val_per_class}, a.seed)
    print(f"wrote {len(CLASSES)} classes x ({a.train_per_class} train + {a.val_per_class} val) under {a.dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
