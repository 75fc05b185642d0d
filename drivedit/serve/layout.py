"""A request's layout: checked against the image it describes and the served branch's categories, then
turned into the sampler's normalised boxes and the response's labels (in the output image's pixels).

The request gives boxes in the pixels of an image of its own `width` x `height`; the served images are
square (`image_size`), so a box maps by x * image_size / width, y * image_size / height (a stretch, as
`resize: stretch` encodes): a layout drawn at the output size comes back unchanged as the labels.
"""
from __future__ import annotations


def layout_problems(layout, categories: list[str]) -> list[dict]:
    """Every problem of a validated `layout` field as error items ({loc, msg, type}), [] when it is usable."""
    if not categories:
        return [{"loc": ["layout"], "type": "no_layout_branch",
                 "msg": "the served model has no layout branch, so it cannot follow a layout; leave `layout` out or "
                        "serve a bundle fine-tuned with layout.kind controlnet or light"}]
    problems = []
    w, h = layout.width, layout.height
    for i, b in enumerate(layout.boxes):
        at = ["layout", "boxes", i]
        if b.category not in categories:
            problems.append({"loc": [*at, "category"], "type": "unknown_category",
                             "msg": f"boxes[{i}].category {b.category!r} is not a category of the served layout "
                                    f"branch; use one of: {', '.join(categories)}"})
        for lo, hi, side, name in ((b.x1, b.x2, w, "x"), (b.y1, b.y2, h, "y")):
            if not 0 <= lo < hi <= side:
                problems.append({"loc": [*at, f"{name}2" if lo >= 0 else f"{name}1"], "type": "invalid_box",
                                 "msg": f"boxes[{i}] needs 0 <= {name}1 < {name}2 <= {'width' if name == 'x' else 'height'}"
                                        f" ({side}), got {name}1 {lo:g}, {name}2 {hi:g}"})
    return problems


def normalised_boxes(layout, categories: list[str]) -> tuple[tuple, ...]:
    """((category id, x1, y1, x2, y2) in [0, 1], ...) of a checked layout."""
    w, h = layout.width, layout.height
    return tuple((categories.index(b.category), b.x1 / w, b.y1 / h, b.x2 / w, b.y2 / h) for b in layout.boxes)


def pixel_labels(layout, image_size: int, ignore_under: float = 0.0) -> list[dict]:
    """The layout's boxes as labels of the output image: {category, box2d: {x1, y1, x2, y2}} in its pixels; a box
    with a side under `ignore_under` px (one token of the served model) is labelled an ignore region, as the
    generate job labels it (generate/undrawable.py): the model cannot promise an object smaller than a token."""
    from drivedit.data.bdd100k import Box
    from drivedit.generate.undrawable import mark_undrawable

    sx, sy = image_size / layout.width, image_size / layout.height
    boxes = [Box(b.category, round(b.x1 * sx, 3), round(b.y1 * sy, 3), round(b.x2 * sx, 3), round(b.y2 * sy, 3))
             for b in layout.boxes]
    return [{"category": b.category, "box2d": {"x1": b.x1, "y1": b.y1, "x2": b.x2, "y2": b.y2},
             **({"attributes": b.attributes} if b.attributes else {})} for b in mark_undrawable(boxes, ignore_under)]
