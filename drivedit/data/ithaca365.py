"""Ithaca365 (v2.2, nuScenes-devkit style tables) -> frames in the BDD100K shape.

The tables are JSON lists of records keyed by `token`, in one folder (`<dataroot>/v2.2`):
- `scene.json`: `name`, `weather_token`;
- `weather.json`: `description`, one of snow, rain, night, sunny, cloud: the frame's scenario;
- `sample.json`: `scene_token`, `timestamp`, `key_camera_token` (the sample_data of its camera frame);
- `sample_data.json`: `filename` (relative to the dataroot), `sample_token`;
- `object_ann.json`: `sample_data_token`, `class` (or a `category_token` into `category.json`), and
  `bbox` = [x1, y1, x2, y2] in pixels of the 1920x1208 image.

A frame is a sample's key camera image; its weather is the scene's weather description and its time
of day `night` when that description is night (so BDD100K's night rule agrees). A record whose token
points at nothing (a sample of a missing scene, a scene of a missing weather, a key camera frame
missing from sample_data, a box on a sample_data that does not exist) is listed in `problems` and
the job goes on; a missing image is found, counted and listed when the encode job reads it.
"""
from __future__ import annotations

import json

from drivedit import storage
from drivedit.data.bdd100k import Box, Frame, LabelFileError, SourceFrames, box_from_corners

TABLES = ("scene", "weather", "sample", "sample_data", "object_ann")
IMAGE_SIZE = (1920, 1208)  # every Ithaca365 camera frame
SCENARIOS = ["snow", "rain", "night", "sunny", "cloud"]


def _table(folder: str, name: str, required: bool = True) -> list[dict]:
    uri = storage.join(folder, f"{name}.json")
    try:
        data = json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        if not required:
            return []
        raise LabelFileError(f"ithaca365: no {name}.json in {folder}; data.labels must be the folder of the v2.2 "
                             f"tables ({', '.join(t + '.json' for t in TABLES)})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LabelFileError(f"ithaca365: {uri} is not valid JSON ({e})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise LabelFileError(f"ithaca365: {uri} must be a JSON list of records (objects with a token)")
    return data


def _by_token(records: list[dict], table: str, problems: list[dict]) -> dict[str, dict]:
    out = {}
    for i, r in enumerate(records):
        token = r.get("token")
        if not isinstance(token, str) or not token:
            problems.append({"frame_id": "", "source_uri": "", "reason": f"bad reference: {table}.json record #{i} "
                             "has no token"})
        else:
            out[token] = r
    return out


def _problem(what: str, reason: str, frame_id: str = "") -> dict:
    return {"frame_id": frame_id, "source_uri": "", "reason": f"bad reference: {what}: {reason}"}


def _box(ann: dict, categories: dict[str, dict]) -> tuple[Box | None, str | None]:
    """(box, None) or (None, why it is broken)."""
    name = ann.get("class")
    if name is None and "category_token" in ann:
        name = categories.get(ann["category_token"], {}).get("name")
    token = ann.get("token", "?")
    if not isinstance(name, str) or not name:
        return None, f"object_ann {token}: no class (and no category_token in category.json)"
    return box_from_corners(name, ann.get("bbox") or (), f"{name} {token} bbox", {"token": token})


def read_ithaca365(tables: str, images: str) -> SourceFrames:
    """Frames of the Ithaca365 tables in the folder `tables`, image names relative to `images` (the
    dataroot). Raises LabelFileError for a missing or unreadable table; bad references go to `problems`."""
    problems: list[dict] = []
    recs = {t: _table(tables, t) for t in TABLES}
    scenes = _by_token(recs["scene"], "scene", problems)
    weathers = _by_token(recs["weather"], "weather", problems)
    sample_data = _by_token(recs["sample_data"], "sample_data", problems)
    categories = _by_token(_table(tables, "category", required=False), "category", problems)
    frames: dict[str, Frame] = {}  # by key camera sample_data token
    for sample in recs["sample"]:
        token = sample.get("token", "?")
        scene = scenes.get(sample.get("scene_token"))
        camera = sample_data.get(sample.get("key_camera_token"))
        if camera is None:
            problems.append(_problem(f"sample {token}", f"key_camera_token {sample.get('key_camera_token')!r} is "
                                     "not in sample_data.json"))
            continue
        name = camera.get("filename")
        if not isinstance(name, str) or not name:
            problems.append(_problem(f"sample_data {camera['token']}", "no filename"))
            continue
        if scene is None:
            problems.append(_problem(f"sample {token}", f"scene_token {sample.get('scene_token')!r} is not in "
                                     "scene.json", name))
            continue
        weather = weathers.get(scene.get("weather_token"))
        if weather is None or not isinstance(weather.get("description"), str):
            problems.append(_problem(f"scene {scene['token']} ({scene.get('name', '?')})",
                                     f"weather_token {scene.get('weather_token')!r} is not in weather.json", name))
            continue
        description = weather["description"]
        frames[camera["token"]] = Frame(name=name, weather=description,
                                        timeofday="night" if description == "night" else "undefined",
                                        scene=str(scene.get("name", "undefined")))
    for ann in recs["object_ann"]:
        sd_token = ann.get("sample_data_token")
        frame = frames.get(sd_token)
        if frame is None:
            if sd_token not in sample_data:
                problems.append(_problem(f"object_ann {ann.get('token', '?')}",
                                         f"sample_data_token {sd_token!r} is not in sample_data.json"))
            continue  # a box on a frame that is not a sample's key camera frame (or was reported above)
        frame.add_box(*_box(ann, categories))
    return SourceFrames(list(frames.values()), images, [], problems, tables)
