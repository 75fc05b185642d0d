"""Which of a generated frame's boxes the generator can promise: those at least one DiT token across.

A DiT draws its image token by token: one token covers patch_size latent cells, each codec-factor pixels,
so 16 x 16 px of a 128 px image for the tiny DiT (patch 4, factor-4 VAE) and for DiT-XL/2 at 256 px (patch
2, factor-8 VAE). An object smaller than a token has no token of its own, and the layout branch cannot
place it: on the shipped model the real-only detector finds 1-43 % of the generated objects under 16 px
and 92-100 % of those above (BENCHMARKS.md, layout branches). A label for an object the frame does not
show teaches a detector to miss it, so such boxes are written as ignore regions: the box stays in the
labels (category and place, so nothing is lost) with attributes {"ignore": true, "marked_by": ...}, which
the detect job reads as a region that is neither object nor background, in training and in scoring
(COCO's iscrowd), and which the COCO export writes as iscrowd.
"""
from __future__ import annotations

import math
from dataclasses import replace

from drivedit.data.bdd100k import IGNORE_ATTRIBUTE, Box, is_ignore

MARKED_BY = "marked_by"


def token_side(image_size: int, input_size: int, patch_size: int) -> float:
    """Side in pixels of an (image_size, image_size) output of one token of a DiT on an input_size latent grid."""
    return image_size * patch_size / input_size


def resolve_ignore_under(value: float | str, image_size: int, input_size: int, patch_size: int) -> float:
    """A spec's `ignore_under` (a side in output pixels, or `token`) in output pixels."""
    if value == "token":
        return token_side(image_size, input_size, patch_size)
    return float(value)


def mark_undrawable(boxes: list[Box], under: float) -> list[Box]:
    """The boxes with those whose side (sqrt of the area) is under `under` px marked as ignore regions; boxes
    already marked keep their attributes. `under` 0 changes nothing."""
    if under <= 0:
        return boxes
    note = f"generate: side under {under:g} px (one DiT token)"
    return [replace(b, attributes={**b.attributes, IGNORE_ATTRIBUTE: True, MARKED_BY: note})
            if math.sqrt(max(b.width, 0.0) * max(b.height, 0.0)) < under and not is_ignore(b.attributes)
            else b for b in boxes]
