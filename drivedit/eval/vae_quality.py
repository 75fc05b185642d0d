"""How much of a driving frame survives a VAE round trip: PSNR overall, per scenario and inside small
boxes, and whether a scenario classifier still tells the scenarios apart on the reconstructions.

    python -m drivedit.eval.vae_quality --vae builtin:tiny-vae --scenes runs/vae/heldout \
        --classifier-scenes runs/vae/scenes --out runs/vae/quality.json

`--scenes` is a held-out dataset (BDD100K layout, e.g. `drivedit scenes --seed 2`) whose frames the
VAE never saw. Frames are read at their stored size (square, a multiple of the codec factor) and go
through `load_codec` (the path encode and generate take): encode to the posterior mean, decode.
PSNR is on [0, 255] per frame and averaged; the small-box PSNR pools the squared error of every pixel
inside boxes smaller than `--small-box` px on both sides. The classifier (drivedit.eval.classifier) is
trained on `--classifier-scenes` (other frames than the held-out ones) and scored on the held-out
originals and on their reconstructions: a VAE that keeps what tells scenarios apart scores the same.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import time

import numpy as np
import torch
from PIL import Image

from drivedit import storage
from drivedit.config.common import DEFAULT_SCENARIOS
from drivedit.data.bdd100k import ScenarioVocabulary, load_label_file
from drivedit.eval.folders import load_image

# every weather the scene generator draws, foggy included (the demo drops it; a codec must not)
SCENARIOS = [*DEFAULT_SCENARIOS[:-1], "foggy", DEFAULT_SCENARIOS[-1]]


def load_scenes(root: str) -> tuple[np.ndarray, list[str], list[list[tuple[float, float, float, float]]]]:
    """uint8 (N, H, W, 3) frames of a BDD100K-layout folder, their scenario names and box corners."""
    vocab = ScenarioVocabulary(SCENARIOS, night="night", drop=("undefined",))
    kept, _ = vocab.split(load_label_file(storage.join(root, "labels.json")))
    if not kept:
        raise ValueError(f"{root}/labels.json has no frame of the scenarios {SCENARIOS}")
    with Image.open(io.BytesIO(storage.read_bytes(storage.join(root, "images", kept[0][0].name)))) as first:
        size = min(first.size)  # frames are read square at their stored size
    images = np.stack([load_image(storage.join(root, "images", f.name), size) for f, _ in kept])
    boxes = [[(b.x1, b.y1, b.x2, b.y2) for b in f.boxes] for f, _ in kept]
    return images, [SCENARIOS[s] for _, s in kept], boxes


@torch.no_grad()
def reconstruct(codec, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """uint8 (N, H, W, 3) -> uint8 (N, H, W, 3) through encode (posterior mean) and decode."""
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W)
        mean = codec.encode(x).chunk(2, dim=1)[0]                                                  # (B, C, h, w)
        y = codec.decode(mean * codec.scale_factor)                                                # (B, 3, H, W)
        out.append(((y + 1.0) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def psnr_db(mse: float | np.ndarray) -> float | np.ndarray:
    return 10.0 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))


def small_box_mask(boxes, size: int, limit: float) -> np.ndarray:
    """bool (size, size): pixels inside any box narrower and lower than `limit` px."""
    mask = np.zeros((size, size), bool)
    for x1, y1, x2, y2 in boxes:
        if x2 - x1 < limit and y2 - y1 < limit:
            mask[max(0, math.floor(y1)):math.ceil(y2), max(0, math.floor(x1)):math.ceil(x2)] = True
    return mask


def reconstruction_report(originals: np.ndarray, recons: np.ndarray, scenarios: list[str], boxes,
                          small_box: float = 16.0) -> dict:
    """PSNR overall (mean of per-frame PSNR), per scenario, and pooled inside small boxes."""
    err = (originals.astype(np.float64) - recons.astype(np.float64)) ** 2  # (N, H, W, 3)
    per_frame = psnr_db(err.reshape(len(err), -1).mean(1))
    per_scenario = {s: {"frames": int(sum(1 for x in scenarios if x == s)),
                        "psnr": round(float(np.mean([p for p, x in zip(per_frame, scenarios) if x == s])), 2)}
                    for s in SCENARIOS if s in scenarios}
    size = originals.shape[1]
    masks = np.stack([small_box_mask(b, size, small_box) for b in boxes])  # (N, H, W)
    small_pixels = int(masks.sum())
    small = round(float(psnr_db(err[masks].mean())), 2) if small_pixels else None
    return {"frames": len(originals), "psnr": round(float(per_frame.mean()), 2),
            "psnr_min": round(float(per_frame.min()), 2), "per_scenario": per_scenario,
            f"psnr_boxes_under_{int(small_box)}px": small, "small_box_pixels": small_pixels,
            "small_boxes": int(sum(1 for bs in boxes for x1, y1, x2, y2 in bs
                                   if x2 - x1 < small_box and y2 - y1 < small_box))}


def classifier_agreement(train_images: np.ndarray, train_scenarios: list[str], originals: np.ndarray,
                         recons: np.ndarray, scenarios: list[str], image_size: int = 64, steps: int = 300,
                         seed: int = 0) -> dict:
    """Accuracy of a scenario classifier (trained on other frames) on the originals and the reconstructions."""
    from drivedit.eval.classifier import train_scenario_classifier

    names = [s for s in SCENARIOS if s in set(train_scenarios)]
    clf, heldout = train_scenario_classifier(train_images, [names.index(s) for s in train_scenarios], names,
                                             image_size=image_size, steps=steps, seed=seed)
    truth = np.array([names.index(s) if s in names else -1 for s in scenarios])
    acc_orig = float((clf.predict(originals) == truth).mean())
    acc_recon = float((clf.predict(recons) == truth).mean())
    return {"image_size": image_size, "train_frames": len(train_images), "classifier_heldout_accuracy": heldout,
            "accuracy_originals": round(acc_orig, 4), "accuracy_reconstructions": round(acc_recon, 4),
            "difference_points": round(100 * (acc_orig - acc_recon), 2)}


def evaluate_vae(vae: str, scenes: str, classifier_scenes: str | None = None, small_box: float = 16.0,
                 classifier_steps: int = 300) -> dict:
    from drivedit.models.codec import load_codec

    torch.manual_seed(0)
    codec = load_codec("autoencoder_kl", vae)
    images, scenarios, boxes = load_scenes(scenes)
    t0 = time.perf_counter()
    recons = reconstruct(codec, images)
    seconds = time.perf_counter() - t0
    report = {"vae": vae, "scenes": scenes, "image_size": int(images.shape[1]), "factor": codec.factor,
              "latent_channels": codec.latent_channels, "scale_factor": codec.scale_factor,
              **reconstruction_report(images, recons, scenarios, boxes, small_box),
              "round_trip_images_per_s": round(len(images) / seconds, 2)}
    if classifier_scenes:
        train_images, train_scenarios, _ = load_scenes(classifier_scenes)
        report["classifier"] = classifier_agreement(train_images, train_scenarios, images, recons, scenarios,
                                                    steps=classifier_steps)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m drivedit.eval.vae_quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--vae", default="builtin:tiny-vae", help="diffusers AutoencoderKL dir, hub id or builtin:NAME")
    ap.add_argument("--scenes", required=True, help="held-out frames (BDD100K layout) the VAE never saw")
    ap.add_argument("--classifier-scenes", default=None, help="frames to train the scenario classifier on")
    ap.add_argument("--classifier-steps", type=int, default=300)
    ap.add_argument("--small-box", type=float, default=16.0, help="boxes under this many px on both sides")
    ap.add_argument("--out", default=None, help="write the report here as JSON")
    a = ap.parse_args(argv)
    report = evaluate_vae(a.vae, a.scenes, a.classifier_scenes, a.small_box, a.classifier_steps)
    text = json.dumps(report, indent=2)
    if a.out:
        storage.write_text_atomic(a.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
