"""Small datasets written in exactly the layouts of Ithaca365 (v2.2 tables) and COCO, with the bad
references the readers must report. Shared by test_readers.py and test_encode_formats.py."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

ITHACA_W, ITHACA_H = 1920, 1208


def _jpeg(w: int, h: int, value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def write_ithaca365(root: Path) -> dict:
    """An Ithaca365 dataroot: `v2.2/*.json` tables and camera images under `cam0/`. Returns what a reader
    must find: frames by file name (scenario, boxes), the bad references, the missing image."""
    tables = root / "v2.2"
    tables.mkdir(parents=True)
    weathers = [{"token": f"w-{d}", "description": d} for d in ("snow", "rain", "night", "sunny", "cloud")]
    scenes = [{"token": "sc-a", "name": "2021-11-22-snow", "weather_token": "w-snow", "log_token": "l0"},
              {"token": "sc-b", "name": "2021-12-02-night", "weather_token": "w-night", "log_token": "l1"},
              {"token": "sc-c", "name": "2021-06-15-sunny", "weather_token": "w-sunny", "log_token": "l2"},
              {"token": "sc-d", "name": "2021-07-01-fog", "weather_token": "w-fog",  # not in weather.json
               "log_token": "l3"}]
    samples, sample_data = [], []

    def frame(i: int, scene: str, key: str | None = None, image: bool = True) -> str:
        sd = f"sd-{i}"
        name = f"cam0/16375968{i:08d}.jpg"
        samples.append({"token": f"s-{i}", "scene_token": scene, "timestamp": 1637596800000000 + i,
                        "key_camera_token": key or sd, "prev": "", "next": ""})
        sample_data.append({"token": sd, "sample_token": f"s-{i}", "filename": name, "fileformat": "jpg",
                            "width": ITHACA_W, "height": ITHACA_H, "is_key_frame": True, "timestamp": 0})
        if image:
            (root / "cam0").mkdir(exist_ok=True)
            (root / name).write_bytes(_jpeg(ITHACA_W, ITHACA_H, 40 * i))
        return name

    snow = frame(1, "sc-a")
    night = frame(2, "sc-b")
    broken = frame(3, "sc-c")
    frame(4, "sc-d")                     # its scene's weather token is not in weather.json
    frame(5, "sc-zzz")                   # its scene is not in scene.json
    frame(6, "sc-a", key="sd-missing")   # its key camera frame is not in sample_data.json
    missing = frame(7, "sc-c", image=False)
    sample_data.append({"token": "sd-sweep", "sample_token": "s-1", "filename": "cam0/sweep.jpg",
                        "is_key_frame": False})  # not a key camera frame: its boxes are not a frame's
    anns = [{"token": "a1", "sample_data_token": "sd-1", "class": "car", "bbox": [100, 600, 500, 900]},
            {"token": "a2", "sample_data_token": "sd-1", "class": "bus", "bbox": [10, 10, 50, 40]},  # < 2 cells
            {"token": "a3", "sample_data_token": "sd-1", "class": "pedestrian", "bbox": [0, 0, 100, 300]},
            {"token": "a4", "sample_data_token": "sd-2", "class": "truck", "bbox": [960, 300, 1920, 1208]},
            {"token": "a5", "sample_data_token": "sd-3", "class": "car", "bbox": [500, 500, 400, 600]},  # inverted
            {"token": "a6", "sample_data_token": "sd-nowhere", "class": "car", "bbox": [0, 0, 10, 10]},
            {"token": "a7", "sample_data_token": "sd-sweep", "class": "car", "bbox": [0, 0, 10, 10]},
            {"token": "a8", "sample_data_token": "sd-7", "class": "bus", "bbox": [0, 0, 600, 600]}]
    for name, records in (("weather", weathers), ("scene", scenes), ("sample", samples),
                          ("sample_data", sample_data), ("object_ann", anns)):
        (tables / f"{name}.json").write_text(json.dumps(records))
    return {"frames": {snow: ("snow", [("car", 100, 600, 500, 900), ("bus", 10, 10, 50, 40),
                                       ("pedestrian", 0, 0, 100, 300)]),
                       night: ("night", [("truck", 960, 300, 1920, 1208)]),
                       broken: ("sunny", []), missing: ("sunny", [("bus", 0, 0, 600, 600)])},
            "broken": broken, "missing": missing,
            "bad_references": ["sample s-4", "sample s-5", "sample s-6", "object_ann a6"]}


def write_coco(root: Path) -> dict:
    """A COCO detection JSON (`annotations.json`) with 64x48 images under `images/`, each image's scenario
    in a `weather` field, and the bad references a reader must report."""
    (root / "images").mkdir(parents=True)
    images = [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48, "weather": "rainy"},
              {"id": 2, "file_name": "b.jpg", "width": 64, "height": 48, "weather": "night"},
              {"id": 3, "file_name": "c.jpg", "width": 64, "height": 48},               # no scenario
              {"id": 4, "file_name": "d.jpg", "width": 64, "height": 48, "weather": "clear"},
              {"id": 2, "file_name": "b2.jpg", "width": 64, "height": 48, "weather": "clear"}]  # id twice
    for img in images:
        (root / "images" / img["file_name"]).write_bytes(_jpeg(64, 48, 30 * img["id"]))
    anns = [{"id": 10, "image_id": 1, "category_id": 3, "bbox": [8, 8, 24, 16], "area": 384, "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 1, "bbox": [40, 20, 20, 28], "area": 560, "iscrowd": 0},
            {"id": 12, "image_id": 2, "category_id": 3, "bbox": [0, 24, 64, 24], "area": 1536, "iscrowd": 0},
            {"id": 13, "image_id": 3, "category_id": 3, "bbox": [0, 0, 8, 8], "area": 64, "iscrowd": 0},
            {"id": 14, "image_id": 4, "category_id": 77, "bbox": [0, 0, 8, 8], "area": 64, "iscrowd": 0},
            {"id": 15, "image_id": 99, "category_id": 3, "bbox": [0, 0, 8, 8], "area": 64, "iscrowd": 0}]
    categories = [{"id": 1, "name": "person", "supercategory": "person"},
                  {"id": 3, "name": "car", "supercategory": "vehicle"}]
    (root / "annotations.json").write_text(json.dumps({"info": {}, "licenses": [], "images": images,
                                                       "annotations": anns, "categories": categories}))
    return {"frames": {"a.jpg": ("rainy", [("car", 8, 8, 32, 24), ("person", 40, 20, 60, 48)]),
                       "b.jpg": ("night", [("car", 0, 24, 64, 48)]), "d.jpg": ("clear", [])},
            "broken": "d.jpg", "bad_references": ["c.jpg", "b2.jpg", "annotation 15"]}
