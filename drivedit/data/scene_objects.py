"""Scene elements of the procedural driving scenes: the camera, a painter that shades by depth and
time of day, and the things on and beside the road. Labelled objects append their visible box.

The painter also draws every shape into a semantic segmentation image (BDD100K train ids): an
element sets `Painter.label` before drawing, so a pixel's label is the class of whatever was drawn
there last, exactly as the colour image shows it.

Units are metres in the road frame: x lateral (right positive), z forward from the camera, y up
from the ground. Colours are given in daylight and shaded by `Painter` (time-of-day gain, fog).
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from drivedit.data.bdd100k import SEGMENTATION_CLASSES, Box
from drivedit.data.scene_style import FOG_DISTANCE, TIME_GAIN, fog_color

CAM_HEIGHT = 1.5      # metres
ROAD_HALF = 5.3       # metres from the centre line to the road edge
SIDEWALK_OUT = 8.5    # outer edge of the sidewalk
LANES = (-3.5, 0.0, 3.5)  # lateral lane centres; the left lane is oncoming traffic
TRAIN_ID = {name: i for i, name in enumerate(SEGMENTATION_CLASSES)}
# the segmentation class of each labelled box category drawn here
BOX_CLASS = {"car": TRAIN_ID["car"], "truck": TRAIN_ID["truck"], "bus": TRAIN_ID["bus"],
             "pedestrian": TRAIN_ID["person"], "traffic light": TRAIN_ID["traffic light"],
             "traffic sign": TRAIN_ID["traffic sign"]}


class Camera:
    """Pinhole camera: ground point (x lateral, z forward) -> pixel (u, v)."""

    def __init__(self, width: int, height: int, rng: np.random.Generator):
        self.w, self.h = width, height
        self.f = 0.9 * width
        self.cx = width / 2 + rng.uniform(-0.04, 0.04) * width
        self.horizon = height * rng.uniform(0.40, 0.47)

    def u(self, x: float, z: float) -> float:
        return self.cx + self.f * x / z

    def v(self, z: float, y: float = 0.0) -> float:
        # y: height above the ground in metres
        return self.horizon + self.f * (CAM_HEIGHT - y) / z

    def px(self, metres: float, z: float) -> float:
        return self.f * metres / z


class Painter:
    """Draws shaded shapes: colours take the time-of-day gain and the fog of their depth."""

    def __init__(self, img: Image.Image, weather: str, timeofday: str, scale: float, seg: Image.Image):
        self.draw = ImageDraw.Draw(img)
        self.seg_draw = ImageDraw.Draw(seg)  # mode L, train ids
        self.label = TRAIN_ID["road"]        # the class the next shapes are drawn under
        self.glow = Image.new("RGB", img.size)
        self.glow_draw = ImageDraw.Draw(self.glow)
        self.gain = TIME_GAIN[timeofday]
        self.fog = fog_color(weather, timeofday)
        self.fog_dist = FOG_DISTANCE[weather]
        self.lights_on = timeofday != "daytime"
        self.wet = weather == "rainy"
        self.scale = scale  # pixels per pixel at 256 px height: keeps line widths sensible at any size

    def shade(self, color, z: float) -> tuple[int, int, int]:
        # plain floats: this runs for every shape, and numpy's per-call overhead dominated
        fog = 1.0 - math.exp(-z / self.fog_dist)
        return tuple(int(min(255.0, max(0.0, float(c) * g * (1 - fog) + f * fog)))
                     for c, g, f in zip(color, self.gain, self.fog))

    # Opaque shapes also paint black on the glow layer, so a nearer object hides the lights behind it.
    def rect(self, x0, y0, x1, y1, color, z):
        xy = [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]
        self.draw.rectangle(xy, fill=self.shade(color, z))
        self.glow_draw.rectangle(xy, fill=0)
        self.seg_draw.rectangle(xy, fill=self.label)

    def poly(self, pts, color, z):
        xy = [(float(a), float(b)) for a, b in pts]
        self.draw.polygon(xy, fill=self.shade(color, z))
        self.glow_draw.polygon(xy, fill=0)
        self.seg_draw.polygon(xy, fill=self.label)

    def ellipse(self, cx, cy, rx, ry, color, z):
        xy = [cx - rx, cy - ry, cx + rx, cy + ry]
        self.draw.ellipse(xy, fill=self.shade(color, z))
        self.glow_draw.ellipse(xy, fill=0)
        self.seg_draw.ellipse(xy, fill=self.label)

    def light(self, cx, cy, r, color, z, reflect_to: float | None = None):
        """An emissive light: not darkened by night, dimmed by fog, reflected by a wet road."""
        fog = 1.0 - math.exp(-z / self.fog_dist)
        c = tuple(int(v * (1 - 0.8 * fog)) for v in color)
        r = max(r, 0.6 * self.scale)
        self.glow_draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=c)
        if self.wet and reflect_to is not None:
            # a wet road mirrors each light as a vertical smear below it
            depth = max(reflect_to - cy, 2 * r)
            dim = tuple(int(v * 0.3) for v in c)
            self.glow_draw.rectangle([cx - 0.4 * r, reflect_to, cx + 0.4 * r, reflect_to + depth], fill=dim)


def visible_box(cam: Camera, category: str, x0, y0, x1, y1, attributes: dict) -> Box | None:
    """The visible part of an object's extent as a BDD box, or None when (almost) nothing shows."""
    cx0, cy0 = max(0.0, min(x0, x1)), max(0.0, min(y0, y1))
    cx1, cy1 = min(float(cam.w), max(x0, x1)), min(float(cam.h), max(y0, y1))
    if cx1 - cx0 < 2 or cy1 - cy0 < 2:
        return None
    truncated = (cx0, cy0, cx1, cy1) != (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
    return Box(category, cx0, cy0, cx1, cy1, {"occluded": False, "truncated": bool(truncated), **attributes})


def lane_marks(cam: Camera, p: Painter):
    """Solid edge lines, a double yellow centre line and dashed white lane lines, in perspective."""
    wid = 0.12
    p.label = TRAIN_ID["road"]  # BDD100K labels lane markings as road
    for x, color, dashed in ((-ROAD_HALF, (225, 225, 225), False), (ROAD_HALF, (225, 225, 225), False),
                             (-1.75 - 0.12, (220, 180, 40), False), (-1.75 + 0.12, (220, 180, 40), False),
                             (1.75, (235, 235, 235), True)):
        z = 2.5
        while z < 120:
            z1 = z + (3.0 if dashed else 10.0)
            pts = [(cam.u(x - wid, z), cam.v(z)), (cam.u(x + wid, z), cam.v(z)),
                   (cam.u(x + wid, z1), cam.v(z1)), (cam.u(x - wid, z1), cam.v(z1))]
            p.poly(pts, color, (z + z1) / 2)
            z = z1 + (9.0 if dashed else 0.0)




def building(cam: Camera, p: Painter, rng, side: int, z0: float, z1: float, snowy: bool):
    p.label = TRAIN_ID["building"]
    x = side * rng.uniform(9.0, 12.0)
    height = rng.uniform(6.0, 24.0)
    base = np.array([(150, 80, 60), (190, 175, 150), (130, 130, 135), (170, 160, 150), (110, 100, 95),
                     (200, 195, 185)][rng.integers(6)], np.float32) * rng.uniform(0.85, 1.1)
    zm = (z0 + z1) / 2
    # front face toward the camera, then the facade along the road
    p.rect(cam.u(x, z0), cam.v(z0, height), cam.u(x + side * 12, z0), cam.v(z0), base * 0.8, z0)
    p.poly([(cam.u(x, z0), cam.v(z0)), (cam.u(x, z0), cam.v(z0, height)),
            (cam.u(x, z1), cam.v(z1, height)), (cam.u(x, z1), cam.v(z1))], base, zm)
    if snowy:
        p.poly([(cam.u(x, z0), cam.v(z0, height)), (cam.u(x, z1), cam.v(z1, height)),
                (cam.u(x, z1), cam.v(z1, height + 0.6)), (cam.u(x, z0), cam.v(z0, height + 0.6))],
               (240, 242, 246), zm)
    if cam.px(1.0, z0) < 1.5:
        return  # windows would be under a pixel
    floors = int(height // 3.2)
    cols = int((z1 - z0) // 3.0)
    for i in range(floors):
        ya, yb = 3.2 * i + 1.0, 3.2 * i + 2.4
        for j in range(cols):
            za, zb = z0 + 3.0 * j + 0.8, z0 + 3.0 * j + 2.2
            pts = [(cam.u(x, za), cam.v(za, ya)), (cam.u(x, za), cam.v(za, yb)),
                   (cam.u(x, zb), cam.v(zb, yb)), (cam.u(x, zb), cam.v(zb, ya))]
            if p.lights_on and rng.random() < 0.35:
                p.poly(pts, (255, 210, 120), (za + zb) / 2)
                cu, cv = cam.u(x, (za + zb) / 2), cam.v((za + zb) / 2, (ya + yb) / 2)
                p.light(cu, cv, cam.px(0.3, za), (120, 90, 40), za)
            else:
                p.poly(pts, (60, 70, 85), (za + zb) / 2)


def tree(cam: Camera, p: Painter, x: float, z: float, rng, snowy: bool):
    trunk_h, r = rng.uniform(2.0, 3.0), rng.uniform(1.3, 2.0)
    p.label = TRAIN_ID["vegetation"]
    p.rect(cam.u(x - 0.15, z), cam.v(z, trunk_h), cam.u(x + 0.15, z), cam.v(z), (90, 65, 40), z)
    green = np.array((50, 110, 45), np.float32) * rng.uniform(0.8, 1.2)
    p.ellipse(cam.u(x, z), cam.v(z, trunk_h + r), cam.px(r, z), cam.px(r * 1.1, z), green, z)
    if snowy:
        p.ellipse(cam.u(x, z), cam.v(z, trunk_h + 1.5 * r), cam.px(r * 0.8, z), cam.px(r * 0.5, z),
                  (235, 238, 242), z)


def lamp(cam: Camera, p: Painter, side: int, z: float):
    x = side * 6.2
    top = 7.0
    p.label = TRAIN_ID["pole"]
    p.rect(cam.u(x - 0.08, z), cam.v(z, top), cam.u(x + 0.08, z), cam.v(z), (70, 70, 75), z)
    hx = x - side * 1.5
    p.rect(cam.u(hx, z), cam.v(z, top), cam.u(x, z), cam.v(z, top - 0.15), (70, 70, 75), z)
    if p.lights_on:
        p.light(cam.u(hx, z), cam.v(z, top - 0.2), cam.px(0.3, z), (255, 200, 120), z, reflect_to=cam.v(z))


VEHICLES = {  # category: (width, height, probability)
    "car": (1.8, 1.5, 0.7), "truck": (2.5, 3.3, 0.15), "bus": (2.6, 3.2, 0.15)}
PALETTE = [(200, 30, 30), (30, 60, 160), (230, 230, 230), (25, 25, 28), (140, 140, 145), (200, 180, 40),
           (40, 110, 60), (120, 70, 40)]


def vehicle(cam: Camera, p: Painter, rng, lane: float, z: float, boxes: list, clear_sun: bool):
    names = list(VEHICLES)
    kind = names[rng.choice(len(names), p=[VEHICLES[n][2] for n in names])]
    width, height, _ = VEHICLES[kind]
    x = lane + rng.uniform(-0.3, 0.3)
    color = np.array(PALETTE[rng.integers(len(PALETTE))], np.float32)
    x0, x1 = cam.u(x - width / 2, z), cam.u(x + width / 2, z)
    yb, yt = cam.v(z), cam.v(z, height)
    if clear_sun:  # a hard shadow under the car only in direct sun (it lies on the road)
        p.label = TRAIN_ID["road"]
        p.ellipse((x0 + x1) / 2, yb, (x1 - x0) * 0.6, max(1.0, cam.px(0.35, z)), (30, 30, 30), z)
    p.label = BOX_CLASS[kind]
    body_top = cam.v(z, height * (0.55 if kind == "car" else 1.0))
    p.rect(x0, body_top, x1, yb - cam.px(0.25, z), color, z)
    if kind == "car":
        inset = (x1 - x0) * 0.12
        p.rect(x0 + inset, yt, x1 - inset, body_top, color * 0.9, z)
        p.rect(x0 + inset * 1.5, yt + (body_top - yt) * 0.2, x1 - inset * 1.5, body_top, (45, 55, 65), z)
    else:
        p.rect(x0 + (x1 - x0) * 0.08, yt + (yb - yt) * 0.1, x1 - (x1 - x0) * 0.08, yt + (yb - yt) * 0.35,
               (45, 55, 65), z)
    wheel = cam.px(0.35, z)
    for wx in (x0, x1 - (x1 - x0) * 0.2):
        p.rect(wx, yb - wheel, wx + (x1 - x0) * 0.2, yb, (20, 20, 20), z)
    oncoming = lane < 0
    ly = cam.v(z, height * (0.35 if kind == "car" else 0.2))
    for lx in (x0 + (x1 - x0) * 0.12, x1 - (x1 - x0) * 0.12):
        if oncoming:
            p.rect(lx - cam.px(0.15, z), ly - cam.px(0.08, z), lx + cam.px(0.15, z), ly + cam.px(0.08, z),
                   (235, 235, 210), z)
            if p.lights_on:
                p.light(lx, ly, cam.px(0.22, z), (255, 245, 200), z, reflect_to=yb)
        else:
            p.rect(lx - cam.px(0.15, z), ly - cam.px(0.1, z), lx + cam.px(0.15, z), ly + cam.px(0.1, z),
                   (200, 20, 20), z)
            if p.lights_on:
                p.light(lx, ly, cam.px(0.16, z), (220, 30, 20), z, reflect_to=yb)
    box = visible_box(cam, kind, x0, yt, x1, yb, {})
    if box:
        boxes.append(box)


def pedestrian(cam: Camera, p: Painter, rng, x: float, z: float, boxes: list):
    height = rng.uniform(1.6, 1.85)
    half = 0.25
    shirt = PALETTE[rng.integers(len(PALETTE))]
    p.label = BOX_CLASS["pedestrian"]
    x0, x1 = cam.u(x - half, z), cam.u(x + half, z)
    yb, yt = cam.v(z), cam.v(z, height)
    p.rect(cam.u(x - 0.15, z), cam.v(z, 0.9), cam.u(x + 0.15, z), yb, (40, 40, 60), z)       # legs
    p.rect(x0, cam.v(z, 1.45), x1, cam.v(z, 0.85), shirt, z)                                # torso
    p.ellipse(cam.u(x, z), cam.v(z, height - 0.12), cam.px(0.12, z), cam.px(0.13, z), (205, 160, 130), z)
    box = visible_box(cam, "pedestrian", x0, yt, x1, yb, {})
    if box:
        boxes.append(box)


def traffic_light(cam: Camera, p: Painter, rng, side: int, z: float, boxes: list):
    overhead = rng.random() < 0.5
    pole_x = side * rng.uniform(5.6, 6.4)
    x = side * rng.uniform(1.0, 3.0) if overhead else pole_x
    y0 = 5.2 if overhead else 2.4
    p.label = TRAIN_ID["pole"]
    p.rect(cam.u(pole_x - 0.08, z), cam.v(z, y0 + 1.0 if overhead else y0), cam.u(pole_x + 0.08, z), cam.v(z),
           (60, 60, 62), z)
    if overhead:
        p.rect(cam.u(min(x, pole_x), z), cam.v(z, y0 + 1.0), cam.u(max(x, pole_x), z), cam.v(z, y0 + 0.9),
               (60, 60, 62), z)
    x0, x1 = cam.u(x - 0.18, z), cam.u(x + 0.18, z)
    yt, yb = cam.v(z, y0 + 1.0), cam.v(z, y0)
    p.label = BOX_CLASS["traffic light"]
    p.rect(x0, yt, x1, yb, (30, 30, 32), z)
    state = int(rng.integers(3))
    colors = [(255, 40, 30), (255, 190, 30), (40, 230, 90)]
    cy = yt + (yb - yt) * (0.2 + 0.3 * state)
    r = cam.px(0.12, z)
    p.ellipse((x0 + x1) / 2, cy, r, r, colors[state], z)
    p.light((x0 + x1) / 2, cy, r * 1.8, tuple(c // 2 for c in colors[state]), z)
    box = visible_box(cam, "traffic light", x0, yt, x1, yb, {"trafficLightColor": ["red", "yellow", "green"][state]})
    if box:
        boxes.append(box)


def traffic_sign(cam: Camera, p: Painter, rng, side: int, z: float, boxes: list):
    x = side * rng.uniform(5.6, 6.6)
    p.label = TRAIN_ID["pole"]
    p.rect(cam.u(x - 0.05, z), cam.v(z, 2.2), cam.u(x + 0.05, z), cam.v(z), (110, 110, 115), z)
    x0, x1 = cam.u(x - 0.38, z), cam.u(x + 0.38, z)
    yt, yb = cam.v(z, 2.95), cam.v(z, 2.2)
    kind = int(rng.integers(3))
    p.label = BOX_CLASS["traffic sign"]
    if kind == 0:    # round prohibition sign
        p.ellipse((x0 + x1) / 2, (yt + yb) / 2, (x1 - x0) / 2, (yb - yt) / 2, (200, 20, 20), z)
        p.ellipse((x0 + x1) / 2, (yt + yb) / 2, (x1 - x0) * 0.35, (yb - yt) * 0.35, (240, 240, 240), z)
    elif kind == 1:  # blue information board
        p.rect(x0, yt, x1, yb, (20, 70, 170), z)
    else:            # yellow warning diamond
        cx, cy = (x0 + x1) / 2, (yt + yb) / 2
        p.poly([(cx, yt), (x1, cy), (cx, yb), (x0, cy)], (235, 190, 20), z)
    box = visible_box(cam, "traffic sign", x0, yt, x1, yb, {})
    if box:
        boxes.append(box)
