"""A COCO detection JSON plus a scenario per image -> frames in the BDD100K shape.

The JSON has `images` (`id`, `file_name` relative to the images folder, `width`, `height`),
`annotations` (`image_id`, `category_id`, `bbox` = [x, y, w, h] in pixels) and `categories`
(`id`, `name`). COCO has no weather: each image's scenario comes from a field of its `images` entry
(`data.scenario_attribute`, e.g. `weather`) or from a mapping file (`data.scenario_map`: a JSON
object from file_name or image id to scenario name; it wins over the field). The scenario goes into
the frame's weather, so the scenario vocabulary keeps, drops and counts frames as for BDD100K.

Every reference that cannot be resolved is listed in `problems` and the job goes on: an image without
a scenario, a duplicate image id, an annotation of an image that is not in `images`. An annotation whose
category is not in `categories`, or whose bbox is not a box, makes its frame's labels broken: the
frame is skipped and listed like a BDD100K frame with a broken box.
"""
from __future__ import annotations

import json

from drivedit import storage
from drivedit.data.bdd100k import Box, Frame, LabelFileError, SourceFrames, box_from_corners


def _load_json(uri: str, what: str):
    try:
        return json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        raise LabelFileError(f"coco: {what} not found: {uri}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LabelFileError(f"coco: {uri} is not valid JSON ({e})") from None


def _problem(frame_id: str, reason: str) -> dict:
    return {"frame_id": frame_id, "source_uri": "", "reason": f"bad reference: {reason}"}


def _box(ann: dict, categories: dict) -> tuple[Box | None, str | None]:
    """(box, None) or (None, why it is broken). COCO's [x, y, w, h] becomes corners."""
    token = ann.get("id", "?")
    name = categories.get(ann.get("category_id"))
    if name is None:
        return None, f"annotation {token}: category_id {ann.get('category_id')!r} is not in categories"
    bbox = ann.get("bbox")
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None, f"{name} {token}: bbox must be four numbers x, y, w, h, got {bbox!r}"
    attrs = {"iscrowd": int(ann["iscrowd"])} if ann.get("iscrowd") else {}
    return box_from_corners(name, (x, y, x + w, y + h), f"{name} {token} bbox (x, y, w, h = {bbox})", attrs)


def read_coco(annotations: str, images: str, scenario_attribute: str | None = None,
              scenario_map: str | None = None) -> SourceFrames:
    """Frames of the COCO JSON at `annotations`, image names relative to `images`. Raises LabelFileError
    for an unreadable file or one without COCO's three lists; bad references go to `problems`."""
    data = _load_json(annotations, "annotation file")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations",
                                                                                      "categories")):
        raise LabelFileError(f"coco: {annotations} must be a COCO detection JSON: an object with lists `images`, "
                             "`annotations` and `categories`")
    mapping = {}
    if scenario_map:
        mapping = _load_json(scenario_map, "scenario map")
        if not isinstance(mapping, dict):
            raise LabelFileError(f"coco: {scenario_map} must be a JSON object {{file_name or image id: scenario}}")
    problems: list[dict] = []
    categories = {c.get("id"): str(c.get("name")) for c in data["categories"] if isinstance(c, dict)}
    frames: dict = {}
    for i, img in enumerate(data["images"]):
        name = img.get("file_name") if isinstance(img, dict) else None
        if not isinstance(name, str) or not name:
            problems.append(_problem("", f"images[{i}] has no file_name"))
            continue
        if img.get("id") in frames:
            problems.append(_problem(name, f"image id {img.get('id')!r} appears twice in images"))
            continue
        scenario = mapping.get(name, mapping.get(str(img.get("id"))))
        if scenario is None and scenario_attribute:
            scenario = img.get(scenario_attribute)
        if not isinstance(scenario, str) or not scenario:
            where = " or ".join(w for w in (f"field {scenario_attribute!r}" if scenario_attribute else "",
                                            f"an entry in {scenario_map}" if scenario_map else "") if w)
            problems.append(_problem(name, f"image {img.get('id')!r} has no scenario ({where})"))
            continue
        frames[img.get("id")] = Frame(name=name, weather=scenario,
                                      timeofday="night" if scenario == "night" else "undefined")
    listed = {img.get("id") for img in data["images"] if isinstance(img, dict)}
    for ann in data["annotations"]:
        if not isinstance(ann, dict):
            problems.append(_problem("", f"annotation {ann!r} is not an object"))
            continue
        frame = frames.get(ann.get("image_id"))
        if frame is None:
            if ann.get("image_id") not in listed:  # (an image that is listed was reported above)
                problems.append(_problem("", f"annotation {ann.get('id', '?')}: image_id {ann.get('image_id')!r} is "
                                         "not in images"))
            continue
        frame.add_box(*_box(ann, categories))
    return SourceFrames(list(frames.values()), images, [], problems, annotations)
