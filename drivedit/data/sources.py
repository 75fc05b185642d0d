"""One reader interface over the dataset formats the encode job takes, selected by `data.format`.

Every reader returns `SourceFrames` (drivedit.data.bdd100k): frames in the BDD100K shape (a name
relative to `images`, weather / timeofday that the scenario vocabulary maps, boxes in source pixels,
a segmentation mask URI where the dataset has one) and the references it could not resolve, each
listed with its reason instead of stopping the job.

- bdd100k: `read_bdd100k` (labels JSON, images/, labels/sem_seg/masks/)
- ithaca365: `read_ithaca365` (the v2.2 nuScenes-devkit tables; the weather description is the scenario)
- coco: `read_coco` (a COCO detection JSON plus a scenario per image)
"""
from __future__ import annotations

from drivedit import storage
from drivedit.data.bdd100k import SourceFrames, read_bdd100k

FORMATS = ("bdd100k", "ithaca365", "coco")


def default_labels(fmt: str, root: str) -> str:
    """Where a format's labels are when `data.labels` is not set."""
    return {"bdd100k": storage.join(root, "labels.json"), "ithaca365": storage.join(root, "v2.2"),
            "coco": storage.join(root, "annotations.json")}[fmt]


def default_images(fmt: str, root: str) -> str:
    """The folder image names are relative to when `data.images` is not set."""
    return root if fmt == "ithaca365" else storage.join(root, "images")


def read_source(fmt: str, root: str, labels: str | None = None, images: str | None = None,
                segmentation: str | None = None, scenario_attribute: str | None = None,
                scenario_map: str | None = None) -> SourceFrames:
    """Read a dataset of format `fmt` (one of FORMATS). Raises LabelFileError for labels that cannot be read
    at all; bad references inside readable labels come back in `problems`."""
    labels = labels or default_labels(fmt, root)
    images = images or default_images(fmt, root)
    if fmt == "bdd100k":
        return read_bdd100k(root, labels, images, segmentation)
    if fmt == "ithaca365":
        from drivedit.data.ithaca365 import read_ithaca365

        return read_ithaca365(labels, images)
    if fmt == "coco":
        from drivedit.data.coco import read_coco

        return read_coco(labels, images, scenario_attribute, scenario_map)
    raise ValueError(f"unknown dataset format {fmt!r}; use one of {', '.join(FORMATS)}")
