"""A small scenario classifier trained on real frames: the offline feature extractor and the judge
of condition accuracy.

It is trained on a stratified part of the real frames and scored on the rest, and that held-out
accuracy travels with it (in its JSON) so that every report can say how far its judgement of
generated frames can be trusted. Saved as `classifier.safetensors` + `classifier.json` in a folder.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from drivedit import storage

FORMAT = "drivedit-scenario-classifier"
WEIGHTS_FILE = "classifier.safetensors"
META_FILE = "classifier.json"


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ScenarioCNN(nn.Module):
    """Five 3x3 conv blocks (two stride-2), global average pool, linear head. `features` is the pooled
    vector (4 * width): the embedding FID / KID / precision / recall are computed on."""

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(
            _block(3, width, 1), _block(width, 2 * width, 2), _block(2 * width, 2 * width, 1),
            _block(2 * width, 4 * width, 2), _block(4 * width, 4 * width, 1),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """x (N, 3, S, S) in [-1, 1] -> (N, 4 * width)."""
        return self.body(x).mean(dim=(2, 3))  # (N, 4w, S/4, S/4) -> (N, 4w)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))  # (N, num_classes)


def to_tensor(images: np.ndarray, size: int, device: torch.device | str = "cpu") -> Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, size, size) in [-1, 1], area-resized when H, W differ."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float()  # (N, 3, H, W)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x / 127.5 - 1.0


@dataclass
class ScenarioClassifier:
    """A trained ScenarioCNN with its vocabulary, input size and held-out accuracy."""

    model: ScenarioCNN
    vocabulary: list[str]
    image_size: int
    width: int
    heldout_accuracy: float
    num_heldout: int
    num_train: int
    heldout_per_scenario: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    batch_size: int = 256

    name = "scenario-classifier"

    @property
    def dim(self) -> int:
        return 4 * self.width

    @torch.no_grad()
    def embed(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, 3) -> features (N, 4w) float64 and predicted scenario ids (N,)."""
        self.model.eval()
        feats, preds = [np.zeros((0, self.dim))], [np.zeros(0, dtype=np.int64)]
        for start in range(0, len(images), self.batch_size):
            x = to_tensor(images[start:start + self.batch_size], self.image_size, self.device)
            f = self.model.features(x)                        # (B, 4w)
            feats.append(f.double().cpu().numpy())
            preds.append(self.model.head(f).argmax(1).cpu().numpy())
        return np.concatenate(feats), np.concatenate(preds)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Feature-extractor interface: uint8 (N, H, W, 3) -> (N, 4w)."""
        return self.embed(images)[0]

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.embed(images)[1]

    def metadata(self) -> dict:
        return {"format": FORMAT, "version": 1, "vocabulary": self.vocabulary, "image_size": self.image_size,
                "width": self.width, "heldout_accuracy": self.heldout_accuracy, "num_heldout": self.num_heldout,
                "num_train": self.num_train, "heldout_per_scenario": self.heldout_per_scenario}

    def save(self, path: str | Path) -> Path:
        """Write the folder `path` (weights + JSON) atomically: a complete new folder replaces any old one."""
        path = Path(path)
        with storage.atomic_local_dir(path) as tmp:
            state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_FILE))
            (tmp / META_FILE).write_text(json.dumps(self.metadata(), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "ScenarioClassifier":
        path = Path(path)
        meta_path, weights_path = path / META_FILE, path / WEIGHTS_FILE
        if not meta_path.is_file() or not weights_path.is_file():
            raise FileNotFoundError(f"{path} is not a scenario classifier folder (needs {META_FILE} and "
                                    f"{WEIGHTS_FILE}); train one with `drivedit eval --train-classifier "
                                    "--save-classifier PATH`")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path} has format {meta.get('format')!r}, expected {FORMAT!r}")
        model = ScenarioCNN(len(meta["vocabulary"]), meta["width"])
        model.load_state_dict(load_file(str(weights_path)), strict=True)
        return cls(model=model.to(device).eval(), vocabulary=list(meta["vocabulary"]),
                   image_size=int(meta["image_size"]), width=int(meta["width"]),
                   heldout_accuracy=float(meta["heldout_accuracy"]), num_heldout=int(meta["num_heldout"]),
                   num_train=int(meta["num_train"]), heldout_per_scenario=dict(meta.get("heldout_per_scenario", {})),
                   device=device)


def stratified_split(labels: np.ndarray, heldout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, heldout): each class gives round(fraction * n) of its frames, at least one, to
    the held-out set (so every class is scored), but always keeps at least one for training."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_held = min(max(int(round(heldout_fraction * len(idx))), 1), len(idx) - 1)
        held.append(idx[:n_held])
        train.append(idx[n_held:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def _augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random horizontal flips and shifts of up to 2 px (reflect-padded): scenarios are about weather
    and light, not where things are, so the classifier should not key on exact positions."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")       # (N, 3, H+4, W+4)
    dy, dx = torch.randint(0, 5, (2,), generator=generator).tolist()
    return padded[:, :, dy:dy + h, dx:dx + w]


def train_scenario_classifier(
    images: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    scenarios: Sequence[str],
    *,
    image_size: int = 32,
    width: int = 16,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 3e-3,
    heldout_fraction: float = 0.2,
    seed: int = 0,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> tuple[ScenarioClassifier, float]:
    """Train a ScenarioCNN on real frames and score it on a stratified held-out part of them.

    images: uint8 (N, H, W, 3); labels: scenario ids (N,) indexing `scenarios`. Returns the
    classifier (held-out accuracy recorded in it) and the held-out accuracy.
    """
    images, labels = np.asarray(images), np.asarray(labels, dtype=np.int64)
    scenarios = list(scenarios)
    problems = []
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        problems.append(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if labels.shape != (len(images),):
        problems.append(f"labels must have one id per image ({len(images)}), got shape {labels.shape}")
    elif len(labels) and (labels.min() < 0 or labels.max() >= len(scenarios)):
        problems.append(f"labels must be ids in [0, {len(scenarios)}) indexing scenarios {scenarios}")
    if not 0.0 < heldout_fraction < 1.0:
        problems.append(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if not problems and len(np.unique(labels)) < 2:
        problems.append("the real frames cover fewer than 2 scenarios; a classifier needs at least 2")
    if problems:
        raise ValueError("cannot train the scenario classifier:\n  - " + "\n  - ".join(problems))

    train_idx, held_idx = stratified_split(labels, heldout_fraction, seed)
    if len(held_idx) == 0:
        raise ValueError(f"no frames left for the held-out set ({len(images)} frames); give more real frames")
    with torch.random.fork_rng(devices=[]):  # a seeded weight init that leaves the caller's RNG alone
        torch.manual_seed(seed)
        model = ScenarioCNN(len(scenarios), width).to(device)
    gen = torch.Generator().manual_seed(seed)  # batches and augmentation
    x_train = to_tensor(images[train_idx], image_size, device)              # (Nt, 3, S, S)
    y_train = torch.from_numpy(labels[train_idx]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    # balance classes: scenario frequencies in driving data are very skewed (clear >> snowy)
    counts = np.bincount(labels[train_idx], minlength=len(scenarios)).astype(np.float64)
    sample_w = torch.from_numpy(1.0 / counts[labels[train_idx]])
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        idx = torch.multinomial(sample_w, min(batch_size, len(train_idx)), replacement=True, generator=gen)
        loss = F.cross_entropy(model(_augment(x_train[idx.to(device)], gen)), y_train[idx.to(device)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log and (step + 1) % max(steps // 5, 1) == 0:
            log(f"classifier step {step + 1}/{steps} loss {loss.item():.3f} ({time.perf_counter() - t0:.1f}s)")

    clf = ScenarioClassifier(model=model.eval(), vocabulary=scenarios, image_size=image_size, width=width,
                             heldout_accuracy=0.0, num_heldout=len(held_idx), num_train=len(train_idx), device=device)
    pred = clf.predict(images[held_idx])
    truth = labels[held_idx]
    clf.heldout_accuracy = float((pred == truth).mean())
    clf.heldout_per_scenario = {scenarios[c]: float((pred[truth == c] == c).mean()) for c in np.unique(truth)}
    return clf, clf.heldout_accuracy
