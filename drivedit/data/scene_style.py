"""Palettes and grading of the procedural scenes, per weather and time of day.

The numbers are chosen so that scenarios separate in simple statistics even at 32x32: mean
brightness (night << dawn/dusk < rainy < overcast < clear < snowy), saturation (clear and partly
cloudy high; overcast, rainy, snowy, foggy low) and contrast (foggy and rainy low).
"""
from __future__ import annotations

# multiplies every reflected colour (emissive lights are added after it)
TIME_GAIN = {
    "daytime": (1.0, 1.0, 1.0),
    "dawn/dusk": (0.78, 0.55, 0.45),
    "night": (0.13, 0.14, 0.2),
}

# metres at which fog hides 63% of a surface: dense in fog, a faint haze otherwise
FOG_DISTANCE = {"clear": 400.0, "partly cloudy": 350.0, "overcast": 200.0, "rainy": 90.0, "snowy": 120.0,
                "foggy": 14.0}

# (saturation, contrast, brightness) applied to the whole frame after drawing
GRADE = {
    "clear": (1.2, 1.05, 1.0),
    "partly cloudy": (1.05, 1.0, 1.0),
    "overcast": (0.5, 0.8, 0.95),
    "rainy": (0.45, 0.65, 0.82),
    "snowy": (0.4, 0.85, 1.08),
    "foggy": (0.5, 0.7, 1.0),
}

_DAY_SKY = {  # (top, horizon)
    "clear": ((55, 115, 215), (160, 198, 240)),
    "partly cloudy": ((75, 130, 210), (170, 202, 235)),
    "overcast": ((148, 151, 156), (192, 193, 196)),
    "rainy": ((78, 82, 90), (122, 125, 131)),
    "snowy": ((200, 203, 210), (228, 230, 233)),
    "foggy": ((196, 198, 201), (204, 206, 209)),
}


def sky_colors(weather: str, timeofday: str) -> tuple[tuple, tuple]:
    """(top, horizon) sky colours, final (no gain applied afterwards)."""
    if timeofday == "night":
        if weather in ("clear", "partly cloudy"):
            return (3, 5, 16), (16, 20, 38)
        if weather == "foggy":
            return (26, 27, 32), (34, 35, 42)
        return (10, 10, 14), (26, 26, 32)
    if timeofday == "dawn/dusk":
        if weather in ("clear", "partly cloudy"):
            return (55, 55, 115), (245, 145, 85)
        if weather == "foggy":
            return (150, 130, 125), (170, 145, 130)
        if weather == "snowy":
            return (150, 140, 150), (200, 170, 160)
        return (70, 66, 80), (160, 120, 100)
    return _DAY_SKY[weather]


def fog_color(weather: str, timeofday: str) -> tuple:
    """The colour distant surfaces fade into: the sky at the horizon."""
    return sky_colors(weather, timeofday)[1]


def ground_palette(weather: str) -> dict[str, tuple]:
    """Ground colours before the time-of-day gain: road, sidewalk, verge (and tyre tracks in snow)."""
    if weather == "snowy":
        return {"road": (178, 180, 186), "sidewalk": (228, 231, 236), "verge": (240, 242, 246),
                "track": (115, 115, 120)}
    if weather == "rainy":
        return {"road": (52, 54, 59), "sidewalk": (105, 105, 102), "verge": (55, 80, 45)}
    return {"road": (88, 88, 93), "sidewalk": (155, 153, 148), "verge": (85, 125, 60)}
