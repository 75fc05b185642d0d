"""Image folders to evaluate: the generated-dataset layout and the BDD100K layout.

A folder (local path or s3:// URI) holds images anywhere below it (`images/<shard>/<i>.png` for
generated sets, `images/<name>.jpg` for real ones) and optionally a BDD100K `labels.json` at its
root. Label `name`s are matched to image files by path relative to `images/`, then relative to the
folder, then as the unique file whose path ends with the name (BDD100K's `images/100k/train/<name>`).
With labels, each frame gets a scenario id from the vocabulary (frames the vocabulary drops are
counted and left out); without, every image is used, unlabelled.
"""
from __future__ import annotations

import io
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps

from drivedit import storage
from drivedit.data.bdd100k import ScenarioVocabulary, load_label_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
LABELS_FILE = "labels.json"


@dataclass
class ImageFolder:
    """The images of one folder that take part in an evaluation, with their scenario ids."""

    root: str
    files: list[str]                     # image URIs, in label order (or sorted when unlabelled)
    scenarios: np.ndarray | None         # (N,) int64 ids into `vocabulary`; None without labels.json
    vocabulary: list[str]
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> frames the vocabulary dropped
    missing: list[str] = field(default_factory=list)       # label names with no image file

    def __len__(self) -> int:
        return len(self.files)

    @property
    def labelled(self) -> bool:
        return self.scenarios is not None

    def counts(self) -> dict[str, int]:
        if self.scenarios is None:
            return {}
        return {name: int((self.scenarios == i).sum()) for i, name in enumerate(self.vocabulary)}

    def load(self, size: int, indices: np.ndarray | list[int] | None = None) -> np.ndarray:
        """uint8 (n, size, size, 3): each image centre-cropped to a square and resized (bicubic)."""
        idx = range(len(self.files)) if indices is None else indices
        out = np.zeros((len(idx), size, size, 3), dtype=np.uint8)
        for j, i in enumerate(idx):
            out[j] = load_image(self.files[i], size)
        return out

    def batches(self, size: int, batch_size: int = 256) -> Iterator[np.ndarray]:
        """The folder's images in order, `batch_size` at a time, so large sets never sit in memory whole."""
        for start in range(0, len(self.files), batch_size):
            yield self.load(size, range(start, min(start + batch_size, len(self.files))))


def load_image(uri: str, size: int) -> np.ndarray:
    """One image file -> uint8 (size, size, 3), centre-cropped to a square then resized."""
    try:
        img = Image.open(io.BytesIO(storage.read_bytes(uri)))
        img.load()
    except (OSError, SyntaxError, ValueError) as err:  # PIL raises these for truncated or unknown data
        raise ValueError(f"cannot decode image {uri} ({err}); remove or replace the file") from err
    return np.asarray(ImageOps.fit(img.convert("RGB"), (size, size), Image.BICUBIC), dtype=np.uint8)


def relative_to_root(uri: str, root: str) -> str:
    return uri[len(root):].lstrip("/") if uri.startswith(root) else uri


def list_images(root: str) -> list[str]:
    """Image URIs below `root` (any depth, hidden folders skipped), in the form of `root`."""
    root = str(root).rstrip("/")
    if not storage.is_dir(root):
        raise FileNotFoundError(f"image folder {root} does not exist (or is not a folder)")
    # list_files returns URIs in the same form as `root`, so paths relative to it are a prefix strip
    files = [f for f in storage.list_files(root, IMAGE_SUFFIXES)
             if not any(part.startswith(".") for part in relative_to_root(f, root).split("/"))]
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return files


def match_names(root: str, files: list[str], names: list[str]) -> tuple[list[str | None], list[str]]:
    """The image URI of each label name (None when no file has it), and the names several files match.

    A name is looked up relative to `images/`, then relative to the folder, then as the unique file
    whose path ends with it (BDD100K's `images/100k/train/<name>`).
    """
    root = str(root).rstrip("/")
    by_rel = {relative_to_root(f, root): f for f in files}
    by_base = defaultdict(list)
    for f in files:
        by_base[f.rsplit("/", 1)[-1]].append(f)
    found, ambiguous = [], []
    for raw in names:
        name = raw.lstrip("/")
        uri = by_rel.get(f"images/{name}") or by_rel.get(name)
        if uri is None:
            candidates = [f for f in by_base.get(name.rsplit("/", 1)[-1], []) if f.endswith("/" + name)]
            if len(candidates) > 1:
                ambiguous.append(raw)
            uri = candidates[0] if len(candidates) == 1 else None
        found.append(uri)
    return found, ambiguous


def index_folder(root: str, vocabulary: ScenarioVocabulary) -> ImageFolder:
    """List the images of `root` and, when `root/labels.json` exists, their scenarios."""
    root = str(root).rstrip("/")
    files = list_images(root)
    labels_uri = storage.join(root, LABELS_FILE)
    if not storage.exists(labels_uri):
        return ImageFolder(root, files, None, list(vocabulary.names))

    kept, dropped = vocabulary.split(load_label_file(labels_uri))
    uris, ambiguous = match_names(root, files, [frame.name for frame, _ in kept])
    if ambiguous:
        raise ValueError(f"{labels_uri}: {len(ambiguous)} label names match several image files "
                         f"(e.g. {ambiguous[0]!r}); write names as paths relative to the folder or to images/")
    matched, scenarios, missing = [], [], []
    for (frame, sid), uri in zip(kept, uris):
        if uri is None:
            missing.append(frame.name)
            continue
        matched.append(uri)
        scenarios.append(sid)
    if not matched:
        raise ValueError(f"{labels_uri}: none of its {len(kept)} usable frames matches an image under {root} "
                         f"(e.g. {missing[0]!r} is missing)" if missing else
                         f"{labels_uri}: no frame maps to a scenario of {vocabulary.names} (dropped: {dropped})")
    return ImageFolder(root, matched, np.asarray(scenarios, dtype=np.int64), list(vocabulary.names),
                       dropped, missing)


def vocabulary_for(names: list[str]) -> ScenarioVocabulary:
    """The scenario rules for a list of names: night wins when the vocabulary has a night scenario."""
    return ScenarioVocabulary(list(names), night="night" if "night" in names else None)
