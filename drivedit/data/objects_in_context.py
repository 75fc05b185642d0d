"""The source domain of the shipped tiny DiT: the 14 object classes of objects.py *in context*.

Isolated, centred objects (objects.py) teach a base model shapes but not the structure of a wide view:
a sky over a horizon, a ground plane that recedes to it, a road narrowing to a vanishing point, things
standing on the ground smaller the farther they are. ImageNet photos carry that context for free, and
it is what a base needs to be close to driving frames. Here every image still shows one class (one
label per image; several instances of it at most), now placed by perspective on a ground plane under
its class's sky, with a distant skyline, under varied light (noon, low sun, haze, dimmer or brighter).
The classes keep their palettes and weather (snowmen on snow, umbrellas in rain, owls at night), so
semantic init still finds a snowy class for a snowy scenario. These are not driving scenes: no
scenario labels, no lanes of traffic, no BDD100K layout; roads appear as they do in photos of cars.

`render_in_context(class_id, size, seed)` -> uint8 (size, size, 3); `python -m drivedit.data.objects
--in-context` writes a dataset in the layout of `write_objects_dataset`.
"""
from __future__ import annotations

import numpy as np

from drivedit.data.objects import CLASS_NAMES, CLASSES, GRASS, ROAD, SNOW, Painter, _background, _jitter

# class -> (where it stands, how far below its centre its feet are in units of its scale s (None: it
# floats), how many more instances of it may stand farther away)
PLACEMENT: dict[str, tuple[str, float | None, int]] = {
    "car": ("road", 0.33, 2), "truck": ("road", 0.32, 1), "traffic light": ("roadside", 1.2, 1),
    "tree": ("field", 0.7, 3), "house": ("field", 0.5, 2), "sun": ("sky", None, 0), "cloud": ("sky", None, 1),
    "umbrella": ("roadside", 0.5, 0), "raincoat": ("roadside", 0.6, 0), "snowman": ("field", 0.68, 1),
    "snowplow": ("road", 0.34, 0), "moon": ("sky", None, 0), "streetlamp": ("roadside", 0.9, 2),
    "owl": ("air", None, 0),
}
assert list(PLACEMENT) == CLASS_NAMES

# the weather of each class decides its field, road and light
WEATHER = {"umbrella": "rain", "raincoat": "rain", "snowman": "snow", "snowplow": "snow", "moon": "night",
           "streetlamp": "night", "owl": "night"}
FIELD = {"day": GRASS, "rain": (0.22, 0.3, 0.2), "snow": SNOW, "night": (0.04, 0.05, 0.05)}
ASPHALT = {"day": ROAD, "rain": (0.2, 0.21, 0.23), "snow": (0.72, 0.73, 0.76), "night": (0.07, 0.07, 0.09)}
# how likely a class that need not stand on a road still gets one in its view
ROAD_CHANCE = {"road": 1.0, "roadside": 0.85, "field": 0.35, "sky": 0.5, "air": 0.3}


class Ground:
    """The ground plane of one image: a horizon at `y_h`, maybe a road from a vanishing point at (`vx`, y_h)
    to a bottom edge centred at `bx` with half width `bw` (grid units, y downwards)."""

    def __init__(self, rng: np.random.Generator, has_road: bool):
        self.y_h = float(rng.uniform(-0.35, 0.05))
        self.has_road = has_road
        self.vx = float(rng.uniform(-0.3, 0.3))
        self.bx, self.bw = float(rng.uniform(-0.4, 0.4)), float(rng.uniform(0.7, 1.3))

    def depth(self, y: float) -> float:
        """0 at the horizon, 1 at the bottom edge of the image."""
        return (y - self.y_h) / (1.0 - self.y_h)

    def road_at(self, y: float) -> tuple[float, float]:
        """The road's centre and half width at height y."""
        u = self.depth(y)
        return self.vx + (self.bx - self.vx) * u, self.bw * u


def _paint_ground(p: Painter, rng: np.random.Generator, g: Ground, weather: str, sky_low) -> None:
    below = p.y > g.y_h                                                           # (S, S)
    field = _jitter(rng, FIELD[weather], 0.05)
    # haze: the ground fades into the sky's lowest colour towards the horizon
    fade = np.clip((p.y - g.y_h) / 0.5, 0.0, 1.0)[..., None] ** 0.6               # (S, S, 1)
    ground = field * fade + np.asarray(sky_low, np.float32) * 0.6 * (1 - fade) + field * 0.4 * (1 - fade)
    p.img[:] = np.where(below[..., None], ground, p.img)
    if not g.has_road:
        return
    asphalt = _jitter(rng, ASPHALT[weather], 0.03)
    top, bottom = g.y_h + 0.004, 1.1
    (lx, lw), (rx, rw) = g.road_at(top), g.road_at(bottom)
    p.fill(p.polygon([(lx - lw - 0.01, top), (lx + lw + 0.01, top), (rx + rw, bottom), (rx - rw, bottom)]), asphalt)
    paint = (0.9, 0.9, 0.85) if weather != "snow" else (0.55, 0.55, 0.58)
    if rng.random() < 0.7:  # a dashed centre line, dashes longer as they come closer
        u = 0.05
        while u < 1.0:
            y0, y1 = g.y_h + (1 - g.y_h) * u, g.y_h + (1 - g.y_h) * min(1.0, u * 1.25)
            (x0, w0), (x1, _) = g.road_at(y0), g.road_at(y1)
            p.fill(p.segment(x0, y0, x1, y1, max(0.012 * w0, p.px * 0.6)), paint, alpha=0.85)
            u *= 1.55
    if rng.random() < 0.5:  # edge lines
        for side in (-1, 1):
            p.fill(p.segment(lx + side * lw, top, rx + side * rw, bottom, 0.02), paint, alpha=0.7)


def _paint_skyline(p: Painter, rng: np.random.Generator, g: Ground, sky_low) -> None:
    """Far trees or buildings along the horizon, tinted towards the sky (they are far away)."""
    dark = np.asarray(sky_low, np.float32) * 0.55
    x = -1.1
    while x < 1.1:
        w, h = rng.uniform(0.05, 0.2), rng.uniform(0.02, 0.12)
        if rng.random() < 0.5:
            p.fill(p.box(x, g.y_h - h, x + w, g.y_h + 0.005), _jitter(rng, dark, 0.04))
        else:
            p.fill(p.ellipse(x + w / 2, g.y_h, w / 2, h), _jitter(rng, dark * 0.9, 0.04))
        x += w * rng.uniform(0.7, 1.6)


def _stand(rng: np.random.Generator, g: Ground, where: str, foot: float | None, near: tuple[float, float]):
    """A position (cx, cy) and scale s for one instance; `near` is the range of depths to stand at."""
    if where == "sky":
        s = rng.uniform(0.3, 0.55)
        return rng.uniform(-0.7, 0.7), rng.uniform(-0.85, max(-0.8, g.y_h - 0.3 * s)), s
    if where == "air":
        s = rng.uniform(0.35, 0.6)
        return rng.uniform(-0.5, 0.5), rng.uniform(g.y_h - 0.3, g.y_h + 0.15), s
    u = rng.uniform(*near)
    y_foot = g.y_h + (1 - g.y_h) * u
    s = max(0.16, 0.85 * (y_foot - g.y_h))  # perspective: size grows with distance below the horizon
    centre, half = g.road_at(y_foot)
    if where == "road" and g.has_road:
        x = centre + rng.uniform(-0.55, 0.55) * half
    elif where in ("roadside", "road") and g.has_road:
        x = centre + rng.choice([-1, 1]) * (half + rng.uniform(0.15, 0.4) * s)
    else:
        x = rng.uniform(-0.85, 0.85)
    return float(np.clip(x, -0.9, 0.9)), y_foot - foot * s, s


def _light(rng: np.random.Generator, img: np.ndarray, weather: str) -> np.ndarray:
    """Global light: noon, a low warm sun, haze, or just dimmer / brighter (the night stays dark)."""
    gain = rng.uniform(0.85, 1.1)
    kind = rng.integers(3) if weather == "day" else 0
    if kind == 1:  # low sun
        img = img * np.asarray([1.05, 0.9, 0.72], np.float32)
    elif kind == 2:  # haze
        img = img * 0.8 + 0.2 * img.mean(axis=2, keepdims=True) + 0.06
    return np.clip(img * gain, 0.0, 1.0)


def render_in_context(class_id: int, size: int, seed: int) -> np.ndarray:
    """One image of class `class_id` in context as uint8 (size, size, 3); deterministic per (class, size, seed)."""
    if not 0 <= class_id < len(CLASS_NAMES):
        raise ValueError(f"class_id must be in [0, {len(CLASS_NAMES)}), got {class_id}")
    if size < 16:
        raise ValueError(f"size must be at least 16 px, got {size}")
    name = CLASS_NAMES[class_id]
    rng = np.random.default_rng([seed, class_id, 7])
    backdrop, paint = CLASSES[name]
    where, foot, extra = PLACEMENT[name]
    weather = WEATHER.get(name, "day")
    g = Ground(rng, has_road=rng.random() < ROAD_CHANCE[where])
    p = Painter(_background(rng, size, backdrop.top, backdrop.bottom, None, backdrop.texture * 0.6))
    if rng.random() < 0.6:
        _paint_skyline(p, rng, g, backdrop.bottom)
    _paint_ground(p, rng, g, weather, backdrop.bottom)
    # farther instances first (painter's order), then the main one, nearer and larger
    for _ in range(int(rng.integers(0, extra + 1))):
        paint(p, rng, *_stand(rng, g, where, foot, (0.08, 0.4)))
    paint(p, rng, *_stand(rng, g, where, foot, (0.4, 0.85)))
    img = _light(rng, p.img, weather)
    if rng.random() < 0.5:  # orientation is not part of a class
        img = img[:, ::-1]
    return (img * 255.0 + 0.5).astype(np.uint8)


def render_many(items: list[tuple[int, int]], size: int, in_context: bool = True) -> np.ndarray:
    """[(class_id, seed)] -> uint8 (N, size, size, 3), in context or alone (objects.py): one pool task."""
    from drivedit.data.objects import render_object

    render = render_in_context if in_context else render_object
    return np.stack([render(c, size, seed) for c, seed in items])
