"""Procedural driving scenes written as a BDD100K-format dataset (`images/<name>.jpg`, `labels.json` and
the semantic segmentation `labels/sem_seg/masks/<name>.png`).

For demos, tests and smoke runs on a new cluster when no real driving data is at hand. A pinhole
camera 1.5 m above a straight road looks at lanes, sidewalks, buildings, trees, street lamps and
labelled objects (cars, trucks, buses, pedestrians, traffic lights, traffic signs) placed from
4 m to 90 m away, so many boxes are small, as in BDD100K. Weather and time of day change the
palette, the grading and the particles strongly enough that simple image statistics separate the
scenarios even at 32x32 (night dark; snowy bright, white ground, desaturated; rainy dark, low
contrast, streaks, wet road; foggy contrast falls off with depth; overcast grey and flat; clear
saturated blue sky; partly cloudy clouds). Frame i is drawn from `default_rng([seed, i])`, so a
dataset is a pure function of (num, size, seed, weathers, timesofday, aspect).

The segmentation mask is drawn with the same shapes as the image (BDD100K train ids), so every box's
object is in the mask under its class inside its box; an object hidden entirely behind nearer ones
gets no box, as BDD100K labels only what shows, and the pixels of objects too small for a box are
ignore (255), so every pixel of a box class lies inside a box of that class.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from drivedit import storage
from drivedit.data.bdd100k import (SEGMENTATION_DIR, SEGMENTATION_IGNORE, Box, Frame, segmentation_name,
                                   write_label_file)
from drivedit.data.scene_objects import (BOX_CLASS, CAM_HEIGHT, LANES, ROAD_HALF, SIDEWALK_OUT, TRAIN_ID, Camera,
                                         Painter, building, lamp, lane_marks, pedestrian, traffic_light, traffic_sign,
                                         tree, vehicle)
from drivedit.data.scene_style import FOG_DISTANCE, GRADE, TIME_GAIN, fog_color, ground_palette, sky_colors

SCENE_WEATHERS = ("clear", "overcast", "partly cloudy", "rainy", "snowy", "foggy")
SCENE_TIMES = ("daytime", "dawn/dusk", "night")


# ---------------------------------------------------------------- background: sky, ground, road


def _background(cam: Camera, weather: str, timeofday: str, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float32 sky gradient and shaded ground (road, sidewalk, verge) in 0..255."""
    h, w = cam.h, cam.w
    img = np.empty((h, w, 3), np.float32)
    top, hor = (np.array(c, np.float32) for c in sky_colors(weather, timeofday))
    hz = int(np.ceil(cam.horizon))
    t = (np.arange(hz, dtype=np.float32) / max(cam.horizon, 1))[:, None]
    img[:hz] = (top * (1 - t) + hor * t)[:, None, :]
    if hz >= h:
        return img
    # ground: per pixel depth z and lateral offset x of the ground point it sees
    v = np.arange(hz, h, dtype=np.float32)[:, None] + 0.5
    z = cam.f * CAM_HEIGHT / np.maximum(v - cam.horizon, 0.5)          # (Hg, 1)
    x = (np.arange(w, dtype=np.float32)[None, :] + 0.5 - cam.cx) * z / cam.f  # (Hg, W)
    pal = ground_palette(weather)
    ax = np.abs(x)
    ground = np.where((ax < ROAD_HALF)[..., None], pal["road"], pal["verge"]).astype(np.float32)
    ground[(ax >= ROAD_HALF) & (ax < SIDEWALK_OUT)] = pal["sidewalk"]
    if weather == "snowy":
        # darker tyre tracks in the snow on the road, two per lane
        for lane in LANES:
            for off in (-0.8, 0.8):
                ground[np.abs(x - lane - off) < 0.28] = pal["track"]
    ground *= 1.0 + rng.normal(0, 0.025, size=(h - hz, 1, 1)).astype(np.float32)  # asphalt texture rows
    ground *= np.asarray(TIME_GAIN[timeofday], np.float32)
    if weather == "rainy":
        # a wet road mirrors the sky, more so at grazing angles (far away)
        sheen = (0.55 * (1 - np.exp(-z / 25.0)) * (ax < ROAD_HALF))[..., None]
        ground = ground * (1 - sheen) + hor * sheen
    fog = (1.0 - np.exp(-z / FOG_DISTANCE[weather]))[..., None]         # (Hg, 1, 1)
    img[hz:] = ground * (1 - fog) + np.asarray(fog_color(weather, timeofday), np.float32) * fog
    return img


def _background_labels(cam: Camera) -> np.ndarray:
    """(H, W) uint8 train ids of the background: sky above the horizon, road / sidewalk / terrain below."""
    h, w = cam.h, cam.w
    labels = np.full((h, w), TRAIN_ID["sky"], np.uint8)
    hz = int(np.ceil(cam.horizon))
    if hz >= h:
        return labels
    # the same ground geometry as _background: lateral offset of the ground point each pixel sees
    v = np.arange(hz, h, dtype=np.float32)[:, None] + 0.5
    z = cam.f * CAM_HEIGHT / np.maximum(v - cam.horizon, 0.5)
    ax = np.abs((np.arange(w, dtype=np.float32)[None, :] + 0.5 - cam.cx) * z / cam.f)
    ground = np.full(ax.shape, TRAIN_ID["terrain"], np.uint8)
    ground[ax < SIDEWALK_OUT] = TRAIN_ID["sidewalk"]
    ground[ax < ROAD_HALF] = TRAIN_ID["road"]
    labels[hz:] = ground
    return labels


def _reconcile(boxes: list[Box], seg: np.ndarray) -> list[Box]:
    """Make boxes and segmentation agree: keep the boxes whose object shows (some pixel of its class
    inside the box; the others are hidden behind nearer objects), and mark as ignore (255) the pixels of
    a box class outside every kept box of that class (objects too small or too hidden to get a box).
    `seg` is changed in place."""
    kept = []
    covered = {cid: np.zeros(seg.shape, bool) for cid in set(BOX_CLASS.values())}
    for b in boxes:
        cid = BOX_CLASS[b.category]
        x0, y0 = int(np.floor(b.x1)), int(np.floor(b.y1))
        x1, y1 = int(np.ceil(b.x2)), int(np.ceil(b.y2))
        if (seg[y0:y1, x0:x1] == cid).any():
            kept.append(b)
            covered[cid][y0:y1, x0:x1] = True
    for cid, cov in covered.items():
        seg[(seg == cid) & ~cov] = SEGMENTATION_IGNORE
    return kept


# ---------------------------------------------------------------- weather overlays


def _grade(img: np.ndarray, weather: str) -> np.ndarray:
    """Saturation, contrast and brightness of the weather: (H, W, 3) float32 in 0..255."""
    sat, contrast, bright = GRADE[weather]
    luma = (img @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    img = luma + sat * (img - luma)
    mean = img.mean()
    return (mean + contrast * (img - mean)) * bright


def _particles(img: np.ndarray, weather: str, timeofday: str, rng, scale: float) -> np.ndarray:
    """Rain streaks or snowflakes blended over the image."""
    h, w, _ = img.shape
    if weather not in ("rainy", "snowy"):
        return img
    layer = Image.new("L", (w, h))
    d = ImageDraw.Draw(layer)
    if weather == "rainy":
        n = int(0.005 * w * h)
        xs, ys = rng.uniform(0, w, n), rng.uniform(-0.1 * h, h, n)
        lens = rng.uniform(0.04, 0.09, n) * h
        for x, y, ln in zip(xs, ys, lens):
            d.line([(x, y), (x + 0.15 * ln, y + ln)], fill=int(rng.uniform(90, 160)), width=max(1, int(scale)))
        color = np.array((205, 210, 220) if timeofday == "daytime" else (90, 95, 110), np.float32)
    else:
        n = int(0.008 * w * h)
        xs, ys = rng.uniform(0, w, n), rng.uniform(0, h, n)
        rs = rng.uniform(0.4, 1.6, n) * scale
        for x, y, r in zip(xs, ys, rs):
            d.ellipse([x - r, y - r, x + r, y + r], fill=int(rng.uniform(150, 255)))
        color = np.array((250, 250, 252) if timeofday == "daytime" else (150, 150, 160), np.float32)
    a = (np.asarray(layer, np.float32) / 255.0)[..., None]
    return img * (1 - a) + color * a


def _clouds(d: ImageDraw.ImageDraw, cam: Camera, rng, color):
    for _ in range(int(rng.integers(3, 7))):
        cx, cy = rng.uniform(0, cam.w), rng.uniform(0.05, 0.75) * cam.horizon
        for _ in range(int(rng.integers(3, 6))):
            rx, ry = rng.uniform(0.06, 0.16) * cam.w, rng.uniform(0.03, 0.07) * cam.h
            ox, oy = rng.uniform(-0.1, 0.1) * cam.w, rng.uniform(-0.03, 0.03) * cam.h
            d.ellipse([cx + ox - rx, cy + oy - ry, cx + ox + rx, cy + oy + ry], fill=color)


# ---------------------------------------------------------------- one frame


def render_scene(rng: np.random.Generator, weather: str, timeofday: str, width: int, height: int
                 ) -> tuple[Image.Image, list[Box]]:
    """One RGB frame and its object boxes."""
    img, boxes, _ = render_scene_with_segmentation(rng, weather, timeofday, width, height)
    return img, boxes


def render_scene_with_segmentation(rng: np.random.Generator, weather: str, timeofday: str, width: int,
                                   height: int) -> tuple[Image.Image, list[Box], np.ndarray]:
    """One RGB frame, its visible object boxes and its (H, W) uint8 segmentation (BDD100K train ids)."""
    if weather not in SCENE_WEATHERS:
        raise ValueError(f"the scene generator draws weathers {SCENE_WEATHERS}, not {weather!r}")
    if timeofday not in SCENE_TIMES:
        raise ValueError(f"the scene generator draws times of day {SCENE_TIMES}, not {timeofday!r}")
    cam = Camera(width, height, rng)
    scale = height / 256
    img = Image.fromarray(np.clip(_background(cam, weather, timeofday, rng), 0, 255).astype(np.uint8))
    seg = Image.fromarray(_background_labels(cam))
    p = Painter(img, weather, timeofday, scale, seg)
    if weather == "partly cloudy" and timeofday != "night":
        _clouds(p.draw, cam, rng, (245, 245, 248) if timeofday == "daytime" else (235, 170, 150))
    if timeofday == "night" and weather in ("clear", "partly cloudy"):
        for _ in range(int(0.002 * width * height)):  # stars: drawn on the image only, the sky stays sky
            sx, sy = rng.uniform(0, width), rng.uniform(0, cam.horizon * 0.8)
            p.draw.point((sx, sy), fill=(200, 200, 220))
    lane_marks(cam, p)
    snowy = weather == "snowy"
    for side in (-1, 1):  # buildings first: they stand behind everything on the sidewalk
        blocks, z = [], rng.uniform(5.0, 12.0)
        while z < 110:
            z1 = z + rng.uniform(8.0, 20.0)
            blocks.append((z, z1))
            z = z1 + rng.uniform(0.0, 6.0)
        for z0, z1 in reversed(blocks):
            building(cam, p, rng, side, z0, z1, snowy)
    items = []  # (depth, draw call) drawn far to near
    for side in (-1, 1):
        for z in np.arange(rng.uniform(6, 20), 100, rng.uniform(18, 30)):
            items.append((z, lambda z=z, s=side: lamp(cam, p, s, z)))
        for z in rng.uniform(6, 90, int(rng.integers(2, 6))):
            tx = side * rng.uniform(7.2, 8.4)
            items.append((z, lambda z=z, tx=tx: tree(cam, p, tx, z, rng, snowy)))
    boxes: list[Box] = []
    clear_sun = weather in ("clear", "partly cloudy") and timeofday == "daytime"
    taken: dict[float, list[float]] = {lane: [] for lane in LANES}
    for _ in range(int(rng.integers(3, 11))):
        lane = LANES[int(rng.integers(len(LANES)))]
        z = float(np.exp(rng.uniform(np.log(6 if lane == 0 else 4), np.log(90))))
        if any(abs(z - o) < 8 for o in taken[lane]):
            continue
        taken[lane].append(z)
        items.append((z, lambda lane=lane, z=z: vehicle(cam, p, rng, lane, z, boxes, clear_sun)))
    for _ in range(int(rng.integers(1, 7))):
        x, z = float(rng.choice([-1, 1]) * rng.uniform(5.8, 8.0)), float(rng.uniform(4, 60))
        items.append((z, lambda x=x, z=z: pedestrian(cam, p, rng, x, z, boxes)))
    for _ in range(int(rng.integers(0, 4))):
        side, z = int(rng.choice([-1, 1])), float(rng.uniform(8, 70))
        items.append((z, lambda side=side, z=z: traffic_light(cam, p, rng, side, z, boxes)))
    for _ in range(int(rng.integers(0, 4))):
        side, z = int(rng.choice([-1, 1])), float(rng.uniform(5, 60))
        items.append((z, lambda side=side, z=z: traffic_sign(cam, p, rng, side, z, boxes)))
    for _, draw in sorted(items, key=lambda item: -item[0]):
        draw()
    arr = _grade(np.asarray(img, np.float32), weather)
    glow = p.glow.filter(ImageFilter.BoxBlur(radius=max(1, round(2 * scale))))
    arr = arr + np.asarray(glow, np.float32) * 1.6 + np.asarray(p.glow, np.float32) * 0.6
    arr = _particles(arr, weather, timeofday, rng, scale)
    arr = arr + rng.normal(0, 2.0, size=(height, width, 1)).astype(np.float32)  # sensor noise
    labels = np.array(seg, np.uint8)
    boxes = _reconcile(boxes, labels)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), boxes, labels


def scenario_plan(num: int, seed: int, weathers, timesofday) -> list[tuple[str, str]]:
    """(weather, timeofday) per frame: the scenarios take turns (a fresh order each round), so every
    scenario gets num / K frames; night frames take any weather, day frames daytime or dawn/dusk."""
    weathers, timesofday = list(weathers), list(timesofday)
    for w in weathers:
        if w not in SCENE_WEATHERS:
            raise ValueError(f"unknown weather {w!r}; the generator draws {', '.join(SCENE_WEATHERS)}")
    for t in timesofday:
        if t not in SCENE_TIMES:
            raise ValueError(f"unknown time of day {t!r}; the generator draws {', '.join(SCENE_TIMES)}")
    if not weathers or not timesofday:
        raise ValueError("give at least one weather and one time of day")
    day_times = [t for t in timesofday if t != "night"]
    slots: list[str | None] = list(weathers) if day_times else []
    if "night" in timesofday:
        slots.append(None)  # None: a night frame
    rng = np.random.default_rng([seed, 1_000_003])
    day_p = np.array([3.0 if t == "daytime" else 1.0 for t in day_times])
    plan = []
    while len(plan) < num:
        for k in rng.permutation(len(slots)):
            w = slots[k]
            if w is None:
                plan.append((weathers[int(rng.integers(len(weathers)))], "night"))
            else:
                plan.append((w, day_times[int(rng.choice(len(day_times), p=day_p / day_p.sum()))]))
    return plan[:num]


def write_scenes_dataset(out_dir: str, num: int, size: int = 256, seed: int = 0, weathers=SCENE_WEATHERS,
                         timesofday=SCENE_TIMES, aspect: float = 1.0, image_format: str = "jpg",
                         quality: int = 92) -> dict:
    """Write `images/<name>.<jpg|png>`, `labels.json` and `labels/sem_seg/masks/<name>.png` (BDD100K format)
    under `out_dir` (a path or s3://). Returns a summary: frames, objects, per-(weather, timeofday) counts,
    seconds."""
    if num < 1:
        raise ValueError(f"num must be at least 1, got {num}")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    if not 0.5 <= aspect <= 3.0:
        raise ValueError(f"aspect (width / height) must be within [0.5, 3], got {aspect}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    width = int(round(size * aspect))
    start = time.perf_counter()
    frames, counts, num_objects = [], {}, 0
    for i, (weather, tod) in enumerate(scenario_plan(num, seed, weathers, timesofday)):
        img, boxes, seg = render_scene_with_segmentation(np.random.default_rng([seed, i]), weather, tod, width, size)
        buf = io.BytesIO()
        if image_format == "jpg":
            img.save(buf, format="JPEG", quality=quality)
        else:
            img.save(buf, format="PNG", compress_level=1)
        name = f"scene-{seed}-{i:06d}.{image_format}"
        storage.write_bytes_atomic(storage.join(out_dir, "images", name), buf.getvalue())
        buf = io.BytesIO()
        Image.fromarray(seg).save(buf, format="PNG", compress_level=1)
        storage.write_bytes_atomic(storage.join(out_dir, SEGMENTATION_DIR, segmentation_name(name)), buf.getvalue())
        frames.append(Frame(name=name, weather=weather, timeofday=tod, scene="city street", boxes=boxes))
        key = f"{weather} / {tod}"
        counts[key] = counts.get(key, 0) + 1
        num_objects += len(boxes)
    write_label_file(frames, storage.join(out_dir, "labels.json"))
    return {"out_dir": out_dir, "frames": num, "width": width, "height": size, "objects": num_objects,
            "counts": dict(sorted(counts.items())), "seconds": round(time.perf_counter() - start, 3)}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="drivedit scenes", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="dataset directory (local path or s3://bucket/prefix)")
    ap.add_argument("--num", type=int, required=True, help="number of frames")
    ap.add_argument("--size", type=int, default=256, help="image height in pixels (default 256)")
    ap.add_argument("--aspect", type=float, default=1.0, help="width / height (BDD100K is 16/9; default 1)")
    ap.add_argument("--seed", type=int, default=0, help="frame i is drawn from seed (seed, i)")
    ap.add_argument("--weathers", nargs="+", default=list(SCENE_WEATHERS), metavar="W",
                    help=f"weathers to draw (default: all of {', '.join(SCENE_WEATHERS)})")
    ap.add_argument("--timesofday", nargs="+", default=list(SCENE_TIMES), metavar="T",
                    help=f"times of day to draw (default: all of {', '.join(SCENE_TIMES)})")
    ap.add_argument("--format", choices=["jpg", "png"], default="jpg", help="image file format")
    args = ap.parse_args(argv)
    try:
        summary = write_scenes_dataset(args.out, args.num, args.size, args.seed, args.weathers,
                                       args.timesofday, args.aspect, args.format)
    except ValueError as e:
        print(f"drivedit scenes: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0
