"""The source domain of the shipped tiny pretrained DiT: procedural object-centric images.

Fourteen classes "in the spirit of ImageNet": one centred object per image on a varied background,
deterministic per seed. The classes are chosen to relate to the driving scenarios (snowman and
snowplow on white snow; moon, streetlamp and owl in the dark; umbrella and raincoat in grey rain
streaks; sun under a clear blue sky; cloud in a grey-blue sky; plus everyday street things), and
their colours carry that relation, because semantic init picks, for each scenario, the source class
under which the pretrained model denoises that scenario's latents best: a bright snowy scenario
should land near a bright snowy class, a night scenario near a dark one.

Images are drawn with signed-distance masks on a normalised grid ([-1, 1]^2), so the same scene
renders at any size; a 32-64 px dataset of thousands of images takes seconds.

`write_objects_dataset(out_dir, num_per_class, size, seed)` writes `images/<class_id>/<i>.png`,
`labels.json` (BDD100K-like frames with `attributes.class`, `attributes.class_id`, and the class name
also as `attributes.weather` with `timeofday: daytime`, so a BDD100K reader given the vocabulary
`CLASS_NAMES` maps each frame to its class) and `classes.json` (the ordered class names).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

CLASS_NAMES: list[str] = [
    "car", "truck", "traffic light", "tree", "house",   # everyday street things, daylight
    "sun", "cloud",                                      # clear / overcast / partly cloudy skies
    "umbrella", "raincoat",                              # rain
    "snowman", "snowplow",                               # snow
    "moon", "streetlamp", "owl",                         # night
]

Canvas = np.ndarray  # float32 (S, S, 3) in [0, 1]


# ---------------------------------------------------------------- drawing primitives (signed distances)

def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1]: x to the right, y downwards, each (S, S)."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    return np.meshgrid(c, c)


class Painter:
    """Paints shapes onto a canvas with anti-aliased edges (one pixel of soft coverage)."""

    def __init__(self, canvas: Canvas):
        self.img = canvas
        self.x, self.y = _grid(canvas.shape[0])
        self.px = 2.0 / canvas.shape[0]  # width of one pixel in grid units

    def fill(self, sdf: np.ndarray, color, alpha: float = 1.0) -> None:
        cover = np.clip(0.5 - sdf / self.px, 0.0, 1.0)[..., None] * alpha  # (S, S, 1)
        self.img[:] = self.img * (1.0 - cover) + np.asarray(color, np.float32) * cover

    def ellipse(self, cx, cy, rx, ry) -> np.ndarray:
        # scaled-circle distance: exact for circles, a good approximation for mild ellipses
        return (np.hypot((self.x - cx) / rx, (self.y - cy) / ry) - 1.0) * min(rx, ry)

    def box(self, x0, y0, x1, y1) -> np.ndarray:
        hx, hy = (x1 - x0) / 2, (y1 - y0) / 2
        dx = np.abs(self.x - (x0 + x1) / 2) - hx
        dy = np.abs(self.y - (y0 + y1) / 2) - hy
        return np.hypot(np.maximum(dx, 0), np.maximum(dy, 0)) + np.minimum(np.maximum(dx, dy), 0)

    def segment(self, x0, y0, x1, y1, width) -> np.ndarray:
        px, py, vx, vy = self.x - x0, self.y - y0, x1 - x0, y1 - y0
        t = np.clip((px * vx + py * vy) / (vx * vx + vy * vy + 1e-12), 0.0, 1.0)
        return np.hypot(px - t * vx, py - t * vy) - width / 2

    def polygon(self, pts) -> np.ndarray:
        """Convex polygon (vertices in either winding): the max over its edges' outward half-planes."""
        mx, my = np.mean([p[0] for p in pts]), np.mean([p[1] for p in pts])
        d = np.full_like(self.x, -np.inf)
        for (ax, ay), (bx, by) in zip(pts, pts[1:] + pts[:1]):
            nx, ny = by - ay, ax - bx
            if nx * (mx - ax) + ny * (my - ay) > 0:  # points at the centroid: turn it outwards
                nx, ny = -nx, -ny
            n = np.hypot(nx, ny) + 1e-12
            d = np.maximum(d, ((self.x - ax) * nx + (self.y - ay) * ny) / n)
        return d


# ---------------------------------------------------------------- backgrounds

def _jitter(rng: np.random.Generator, color, amount: float = 0.06) -> np.ndarray:
    return np.clip(np.asarray(color, np.float32) + rng.uniform(-amount, amount, 3), 0.0, 1.0)


def _low_freq_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth texture (S, S) in about [-1, 1]: a coarse random grid, bilinearly upsampled."""
    coarse = Image.fromarray(rng.uniform(0, 255, (cells, cells)).astype(np.uint8))
    return np.asarray(coarse.resize((size, size), Image.BILINEAR), np.float32) / 127.5 - 1.0


def _background(rng: np.random.Generator, size: int, top, bottom, ground=None, texture: float = 0.05) -> Canvas:
    """Vertical sky gradient from `top` to `bottom`; below a random horizon, an optional `ground` colour;
    then a smooth texture and fine grain so no two backgrounds are alike."""
    x, y = _grid(size)
    t = ((y + 1.0) / 2.0)[..., None]                                   # (S, S, 1), 0 at the top
    img = _jitter(rng, top) * (1 - t) + _jitter(rng, bottom) * t
    if ground is not None:
        horizon = rng.uniform(0.2, 0.55)
        img = np.where((y > horizon)[..., None], _jitter(rng, ground), img)
    img = img + texture * _low_freq_noise(rng, size, int(rng.integers(3, 7)))[..., None]
    img = img + rng.normal(0.0, 0.015, img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _rain(p: Painter, rng: np.random.Generator, n: int = 40) -> None:
    slant = rng.uniform(0.05, 0.2)
    for _ in range(n):
        x0, y0 = rng.uniform(-1.1, 1.0), rng.uniform(-1.1, 1.0)
        p.fill(p.segment(x0, y0, x0 + slant, y0 + 0.25, p.px * 0.8), (0.75, 0.78, 0.85), alpha=0.45)


def _flakes(p: Painter, rng: np.random.Generator, n: int = 30) -> None:
    for _ in range(n):
        r = rng.uniform(0.012, 0.03)
        p.fill(p.ellipse(rng.uniform(-1, 1), rng.uniform(-1, 1), r, r), (0.98, 0.98, 1.0), alpha=0.9)


def _stars(p: Painter, rng: np.random.Generator, n: int = 25) -> None:
    for _ in range(n):
        r = rng.uniform(0.006, 0.015)
        p.fill(p.ellipse(rng.uniform(-1, 1), rng.uniform(-1, 0.6), r, r), (0.9, 0.9, 0.75), alpha=0.8)


DAY_SKY = ((0.35, 0.6, 0.95), (0.7, 0.85, 1.0))
NIGHT_SKY = ((0.01, 0.02, 0.08), (0.06, 0.08, 0.18))
RAIN_SKY = ((0.32, 0.34, 0.38), (0.45, 0.47, 0.5))
SNOW_SKY = ((0.78, 0.82, 0.88), (0.9, 0.92, 0.95))
GRASS, ROAD, SNOW = (0.3, 0.55, 0.22), (0.35, 0.35, 0.37), (0.95, 0.96, 0.98)
PAINT = [(0.8, 0.1, 0.1), (0.1, 0.25, 0.8), (0.95, 0.8, 0.1), (0.1, 0.6, 0.25), (0.9, 0.9, 0.9), (0.1, 0.1, 0.1)]


# ---------------------------------------------------------------- the classes' figures: (painter, rng, cx, cy, s)

def _wheels(p, xs, y, r):
    for x in xs:
        p.fill(p.ellipse(x, y, r, r), (0.05, 0.05, 0.05))
        p.fill(p.ellipse(x, y, r * 0.45, r * 0.45), (0.6, 0.6, 0.6))


def paint_car(p: Painter, rng, cx, cy, s) -> None:
    body = _jitter(rng, PAINT[rng.integers(len(PAINT))], 0.08)
    p.fill(p.box(cx - 0.3 * s, cy - 0.38 * s, cx + 0.3 * s, cy - 0.08 * s) - 0.06 * s, body)  # cabin
    p.fill(p.box(cx - 0.26 * s, cy - 0.33 * s, cx + 0.26 * s, cy - 0.12 * s), (0.6, 0.8, 0.95))  # windows
    p.fill(p.box(cx - 0.6 * s, cy - 0.12 * s, cx + 0.6 * s, cy + 0.18 * s) - 0.05 * s, body)
    _wheels(p, (cx - 0.35 * s, cx + 0.35 * s), cy + 0.2 * s, 0.13 * s)


def paint_truck(p: Painter, rng, cx, cy, s) -> None:
    p.fill(p.box(cx - 0.7 * s, cy - 0.45 * s, cx + 0.25 * s, cy + 0.15 * s), _jitter(rng, (0.85, 0.85, 0.8)))
    cab = _jitter(rng, PAINT[rng.integers(4)], 0.08)
    p.fill(p.box(cx + 0.28 * s, cy - 0.25 * s, cx + 0.68 * s, cy + 0.15 * s) - 0.03 * s, cab)
    p.fill(p.box(cx + 0.42 * s, cy - 0.2 * s, cx + 0.62 * s, cy - 0.05 * s), (0.6, 0.8, 0.95))
    _wheels(p, (cx - 0.5 * s, cx - 0.25 * s, cx + 0.45 * s), cy + 0.2 * s, 0.12 * s)


def paint_traffic_light(p: Painter, rng, cx, cy, s) -> None:
    p.fill(p.box(cx - 0.04 * s, cy + 0.3 * s, cx + 0.04 * s, cy + 1.2 * s), (0.25, 0.25, 0.25))  # pole
    p.fill(p.box(cx - 0.18 * s, cy - 0.6 * s, cx + 0.18 * s, cy + 0.35 * s) - 0.04 * s, (0.08, 0.08, 0.08))
    lit = rng.integers(3)
    for i, color in enumerate([(0.95, 0.1, 0.1), (0.95, 0.75, 0.1), (0.1, 0.9, 0.3)]):
        dim = 1.0 if i == lit else 0.3
        p.fill(p.ellipse(cx, cy + (-0.38 + 0.3 * i) * s, 0.11 * s, 0.11 * s), np.asarray(color) * dim)


def paint_tree(p: Painter, rng, cx, cy, s) -> None:
    p.fill(p.box(cx - 0.07 * s, cy, cx + 0.07 * s, cy + 0.7 * s), _jitter(rng, (0.4, 0.25, 0.1)))
    leaf = _jitter(rng, (0.12, 0.45, 0.12), 0.08)
    for dx, dy, r in ((0, -0.35, 0.4), (-0.25, -0.1, 0.3), (0.25, -0.1, 0.3)):
        p.fill(p.ellipse(cx + dx * s, cy + dy * s, r * s, r * s), leaf)


def paint_house(p: Painter, rng, cx, cy, s) -> None:
    wall = _jitter(rng, ((0.9, 0.8, 0.6), (0.8, 0.5, 0.4), (0.85, 0.85, 0.8))[rng.integers(3)])
    p.fill(p.box(cx - 0.45 * s, cy - 0.15 * s, cx + 0.45 * s, cy + 0.5 * s), wall)
    p.fill(p.polygon([(cx - 0.58 * s, cy - 0.13 * s), (cx + 0.58 * s, cy - 0.13 * s), (cx, cy - 0.62 * s)]),
           _jitter(rng, (0.6, 0.15, 0.1)))
    p.fill(p.box(cx - 0.08 * s, cy + 0.15 * s, cx + 0.08 * s, cy + 0.5 * s), (0.35, 0.2, 0.1))
    for dx in (-0.28, 0.28):
        p.fill(p.box(cx + (dx - 0.09) * s, cy, cx + (dx + 0.09) * s, cy + 0.17 * s), (0.55, 0.75, 0.95))


def paint_sun(p: Painter, rng, cx, cy, s) -> None:
    color = _jitter(rng, (1.0, 0.85, 0.2), 0.05)
    for a in np.linspace(0, 2 * np.pi, 12, endpoint=False) + rng.uniform(0, 0.5):
        p.fill(p.segment(cx + 0.38 * s * np.cos(a), cy + 0.38 * s * np.sin(a),
                         cx + 0.6 * s * np.cos(a), cy + 0.6 * s * np.sin(a), 0.06 * s), color)
    p.fill(p.ellipse(cx, cy, 0.3 * s, 0.3 * s), color)


def paint_cloud(p: Painter, rng, cx, cy, s) -> None:
    color = _jitter(rng, (0.92, 0.92, 0.94), 0.05)
    p.fill(p.ellipse(cx, cy + 0.08 * s, 0.6 * s, 0.2 * s), color * 0.92)
    for dx, dy, r in ((-0.3, 0.0, 0.24), (0.0, -0.15, 0.32), (0.3, -0.02, 0.25)):
        p.fill(p.ellipse(cx + dx * s, cy + dy * s, r * s, r * s), color)


def paint_umbrella(p: Painter, rng, cx, cy, s) -> None:
    _rain(p, rng)
    canopy = _jitter(rng, PAINT[rng.integers(4)], 0.08)
    p.fill(np.maximum(p.ellipse(cx, cy - 0.05 * s, 0.6 * s, 0.45 * s), p.y - (cy - 0.05 * s)), canopy)
    p.fill(p.segment(cx, cy - 0.05 * s, cx, cy + 0.5 * s, 0.05 * s), (0.15, 0.15, 0.15))
    p.fill(p.segment(cx, cy + 0.5 * s, cx + 0.12 * s, cy + 0.5 * s, 0.05 * s), (0.15, 0.15, 0.15))


def paint_raincoat(p: Painter, rng, cx, cy, s) -> None:
    _rain(p, rng)
    coat = _jitter(rng, ((0.95, 0.8, 0.1), (0.9, 0.3, 0.1), (0.2, 0.5, 0.85))[rng.integers(3)], 0.05)
    p.fill(p.polygon([(cx - 0.22 * s, cy - 0.35 * s), (cx - 0.42 * s, cy + 0.6 * s),
                      (cx + 0.42 * s, cy + 0.6 * s), (cx + 0.22 * s, cy - 0.35 * s)]), coat)
    p.fill(p.ellipse(cx, cy - 0.45 * s, 0.2 * s, 0.2 * s), coat * 0.9)
    for i in range(3):
        p.fill(p.ellipse(cx, cy + (-0.15 + 0.2 * i) * s, 0.035 * s, 0.035 * s), (0.15, 0.15, 0.15))


def paint_snowman(p: Painter, rng, cx, cy, s) -> None:
    _flakes(p, rng)
    white = _jitter(rng, (0.99, 0.99, 1.0), 0.02)
    for dy, r in ((0.38, 0.3), (0.0, 0.22), (-0.32, 0.16)):
        p.fill(p.ellipse(cx, cy + dy * s, r * s, r * s) + 0.01, white * 0.85)  # faint outline
        p.fill(p.ellipse(cx, cy + dy * s, r * s, r * s), white)
    for dx in (-0.06, 0.06):
        p.fill(p.ellipse(cx + dx * s, cy - 0.36 * s, 0.025 * s, 0.025 * s), (0.05, 0.05, 0.05))
    p.fill(p.polygon([(cx, cy - 0.33 * s), (cx, cy - 0.28 * s), (cx + 0.15 * s, cy - 0.3 * s)]), (1.0, 0.5, 0.1))


def paint_snowplow(p: Painter, rng, cx, cy, s) -> None:
    _flakes(p, rng)
    body = _jitter(rng, (0.95, 0.6, 0.05), 0.05)
    p.fill(p.box(cx - 0.55 * s, cy - 0.15 * s, cx + 0.3 * s, cy + 0.18 * s), body)
    p.fill(p.box(cx - 0.4 * s, cy - 0.42 * s, cx + 0.05 * s, cy - 0.12 * s), body)
    p.fill(p.box(cx - 0.33 * s, cy - 0.36 * s, cx - 0.02 * s, cy - 0.2 * s), (0.6, 0.8, 0.95))
    p.fill(p.polygon([(cx + 0.35 * s, cy - 0.2 * s), (cx + 0.35 * s, cy + 0.3 * s),
                      (cx + 0.7 * s, cy + 0.3 * s), (cx + 0.55 * s, cy - 0.2 * s)]), (0.3, 0.3, 0.32))  # blade
    _wheels(p, (cx - 0.38 * s, cx + 0.12 * s), cy + 0.22 * s, 0.12 * s)


def paint_moon(p: Painter, rng, cx, cy, s) -> None:
    _stars(p, rng)
    r = 0.35 * s
    off = rng.uniform(0.12, 0.22) * s
    crescent = np.maximum(p.ellipse(cx, cy, r, r), -p.ellipse(cx + off, cy - off * 0.5, r * 0.9, r * 0.9))
    p.fill(crescent, _jitter(rng, (0.95, 0.93, 0.75), 0.04))


def paint_streetlamp(p: Painter, rng, cx, cy, s) -> None:
    glow = np.clip(1.0 - np.hypot(p.x - cx, p.y - (cy - 0.4 * s)) / (0.7 * s), 0.0, 1.0) ** 2  # (S, S)
    p.img[:] = np.clip(p.img + 0.45 * glow[..., None] * np.array([1.0, 0.85, 0.5], np.float32), 0, 1)
    p.fill(p.box(cx - 0.035 * s, cy - 0.4 * s, cx + 0.035 * s, cy + 0.9 * s), (0.15, 0.15, 0.17))
    p.fill(p.box(cx - 0.16 * s, cy - 0.5 * s, cx + 0.16 * s, cy - 0.4 * s), (0.15, 0.15, 0.17))
    p.fill(p.ellipse(cx, cy - 0.36 * s, 0.12 * s, 0.07 * s), (1.0, 0.92, 0.6))


def paint_owl(p: Painter, rng, cx, cy, s) -> None:
    _stars(p, rng, 12)
    p.fill(p.segment(-1.0, cy + 0.5 * s, 1.0, cy + 0.45 * s, 0.08 * s), (0.2, 0.12, 0.06))  # branch
    body = _jitter(rng, (0.35, 0.25, 0.15), 0.05)
    p.fill(p.ellipse(cx, cy + 0.05 * s, 0.32 * s, 0.45 * s), body)
    for side in (-1, 1):
        p.fill(p.polygon([(cx + side * 0.3 * s, cy - 0.3 * s), (cx + side * 0.12 * s, cy - 0.3 * s),
                          (cx + side * 0.26 * s, cy - 0.5 * s)]), body)
        p.fill(p.ellipse(cx + side * 0.13 * s, cy - 0.12 * s, 0.11 * s, 0.11 * s), (0.95, 0.8, 0.2))
        p.fill(p.ellipse(cx + side * 0.13 * s, cy - 0.12 * s, 0.05 * s, 0.05 * s), (0.02, 0.02, 0.02))


@dataclass(frozen=True)
class Backdrop:
    """A class's surroundings: the sky gradient from `top` to `bottom`, an optional `ground` colour below
    the horizon, and how much smooth texture lies over them. objects_in_context.py reuses the palettes."""

    top: tuple
    bottom: tuple
    ground: tuple | None = None
    texture: float = 0.05


NIGHT_GROUND = (0.04, 0.04, 0.06)
WET_ROAD = (0.25, 0.26, 0.28)
# class name -> (its backdrop, the painter of its figure onto a canvas: (painter, rng, cx, cy, s) -> None)
CLASSES: dict[str, tuple[Backdrop, Callable]] = {
    "car": (Backdrop(*DAY_SKY, ground=ROAD), paint_car),
    "truck": (Backdrop(*DAY_SKY, ground=ROAD), paint_truck),
    "traffic light": (Backdrop(*DAY_SKY, ground=GRASS), paint_traffic_light),
    "tree": (Backdrop(*DAY_SKY, ground=GRASS), paint_tree),
    "house": (Backdrop(*DAY_SKY, ground=GRASS), paint_house),
    "sun": (Backdrop((0.2, 0.5, 0.95), (0.55, 0.8, 1.0), texture=0.02), paint_sun),
    "cloud": (Backdrop((0.45, 0.55, 0.7), (0.65, 0.7, 0.78), texture=0.06), paint_cloud),
    "umbrella": (Backdrop(*RAIN_SKY, ground=WET_ROAD), paint_umbrella),
    "raincoat": (Backdrop(*RAIN_SKY, ground=WET_ROAD), paint_raincoat),
    "snowman": (Backdrop(*SNOW_SKY, ground=SNOW, texture=0.03), paint_snowman),
    "snowplow": (Backdrop(*SNOW_SKY, ground=SNOW, texture=0.03), paint_snowplow),
    "moon": (Backdrop(*NIGHT_SKY, texture=0.02), paint_moon),
    "streetlamp": (Backdrop(*NIGHT_SKY, ground=NIGHT_GROUND, texture=0.02), paint_streetlamp),
    "owl": (Backdrop(*NIGHT_SKY, texture=0.02), paint_owl),
}
assert list(CLASSES) == CLASS_NAMES


def render_object(class_id: int, size: int, seed: int) -> np.ndarray:
    """One image of class `class_id` as uint8 (size, size, 3); the same (class, size, seed) always
    gives the same image. The object is centred with a small random offset and scale."""
    if not 0 <= class_id < len(CLASS_NAMES):
        raise ValueError(f"class_id must be in [0, {len(CLASS_NAMES)}), got {class_id}")
    if size < 8:
        raise ValueError(f"size must be at least 8 px, got {size}")
    rng = np.random.default_rng([seed, class_id])
    cx, cy = rng.uniform(-0.08, 0.08, 2)
    s = rng.uniform(1.0, 1.3)
    backdrop, paint = CLASSES[CLASS_NAMES[class_id]]
    p = Painter(_background(rng, size, backdrop.top, backdrop.bottom, backdrop.ground, backdrop.texture))
    paint(p, rng, cx, cy, s)
    img = p.img
    if rng.random() < 0.5:  # mirror half of them: orientation is not part of a class
        img = img[:, ::-1]
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_objects_dataset(out_dir: str | Path, num_per_class: int, size: int = 32, seed: int = 0,
                          in_context: bool = False) -> dict:
    """Write `num_per_class` images of every class to `out_dir` (see the module docstring for the layout).

    Image i of class c is `render_object(c, size, seed * 1_000_003 + i)` (`render_in_context` with
    `in_context`: objects_in_context.py), so a dataset is reproducible
    from (num_per_class, size, seed). Everything is written to a temporary folder first and moved into
    place at the end, so an interrupted run leaves no half-written dataset. Returns a summary dict.
    """
    out_dir = Path(out_dir)
    if num_per_class < 1:
        raise ValueError(f"num_per_class must be >= 1, got {num_per_class}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new folder or delete it")
    if in_context:
        from drivedit.data.objects_in_context import render_in_context as render
    else:
        render = render_object
    t0 = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        frames = []
        for c, name in enumerate(CLASS_NAMES):
            (tmp / "images" / f"{c:02d}").mkdir(parents=True)
            for i in range(num_per_class):
                rel = f"{c:02d}/{i:05d}.png"
                Image.fromarray(render(c, size, seed * 1_000_003 + i)).save(tmp / "images" / rel)
                frames.append({"name": rel, "attributes": {
                    "class": name, "class_id": c, "weather": name, "timeofday": "daytime", "scene": "object"},
                    "labels": []})
        (tmp / "labels.json").write_text(json.dumps(frames))
        (tmp / "classes.json").write_text(json.dumps(CLASS_NAMES))
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    return {"out_dir": str(out_dir), "num_images": len(frames), "num_classes": len(CLASS_NAMES),
            "num_per_class": num_per_class, "size": size, "seed": seed, "in_context": in_context, "classes": list(CLASS_NAMES),
            "seconds": round(seconds, 3), "images_per_s": round(len(frames) / max(seconds, 1e-9), 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m drivedit.data.objects",
                                 description="write the procedural object-centric source dataset")
    ap.add_argument("--out", required=True, help="output folder (must be new or empty)")
    ap.add_argument("--num-per-class", type=int, default=200)
    ap.add_argument("--size", type=int, default=32, help="image side in pixels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--in-context", action="store_true",
                    help="the objects on a ground plane under a sky with a horizon (objects_in_context.py)")
    args = ap.parse_args(argv)
    print(json.dumps(write_objects_dataset(args.out, args.num_per_class, args.size, args.seed, args.in_context),
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
