"""What the SDEdit strength s of a condition transfer does to condition accuracy, on the shipped tiny model.

The shipped tiny DiT (builtin:tiny-dit, 32 px pixel codec, the 14 object classes of drivedit.data.objects)
re-renders unseen object images of one class into another class (source c -> target c + 1 among the
chosen classes) at several strengths, with the generate job's sampler call (DDIM, CFG). A scenario
classifier (drivedit.eval.classifier, trained here on other rendered images of the same classes) judges
each output: the share classified as the target (condition accuracy), the share still classified as
the source, and the mean absolute pixel change. Baseline in the same process: plain sampling of the
targets (no source), whose condition accuracy the transfer's is divided by.

    python bench/transfer_strength.py [--strengths 0.2,0.4,0.6,0.8,1.0] [--per-class 4] [--steps 25]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from drivedit.data.objects import CLASS_NAMES, render_object
from drivedit.eval.classifier import train_scenario_classifier
from drivedit.generate.grid import latents_to_uint8
from drivedit.generate.sampler import DiTSampler, SamplerSettings
from drivedit.models.checkpoint import load_dit

CLASSES = ["snowman", "moon", "umbrella", "sun", "cloud", "owl"]  # a mix of bright, dark and grey scenes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strengths", default="0.2,0.4,0.6,0.8,1.0")
    ap.add_argument("--per-class", type=int, default=4, help="source images per class")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    ids = [CLASS_NAMES.index(c) for c in CLASSES]
    # the judge: trained on 60 rendered images per class (seeds far from the sources' and the model's)
    train = np.stack([render_object(c, 32, 50_000 + 100 * c + i) for c in ids for i in range(60)])
    train_labels = np.repeat(np.arange(len(ids)), 60)
    clf, heldout = train_scenario_classifier(train, train_labels, CLASSES, image_size=32, steps=300, seed=0)

    src = np.repeat(np.arange(len(ids)), args.per_class)  # (N,) position in CLASSES
    tgt = (src + 1) % len(ids)
    images = np.stack([render_object(ids[s], 32, 20_000 + 10 * k) for k, s in enumerate(src)])  # (N, 32, 32, 3)
    x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, 3, 32, 32)
    labels = torch.tensor([ids[t] for t in tgt])
    seeds = list(range(len(src)))
    sampler = DiTSampler(load_dit("builtin:tiny-dit"), amp_dtype=None, clip_x0=1.0)
    settings = SamplerSettings(steps=args.steps, guidance=args.guidance)

    def judge(latents: torch.Tensor) -> tuple[float, float, float]:
        out = latents_to_uint8(latents)  # (N, 32, 32, 3)
        pred = clf.predict(out)
        change = np.abs(out.astype(np.float32) - images.astype(np.float32)).mean() / 255
        return float((pred == tgt).mean()), float((pred == src).mean()), float(change)

    base_acc, _, _ = judge(sampler.sample(labels, seeds, settings))
    src_acc = float((clf.predict(images) == src).mean())
    print(f"tiny-dit 32 px, {len(src)} sources ({args.per_class} per class of {', '.join(CLASSES)}), "
          f"target = next class; DDIM {args.steps} steps, CFG {args.guidance}; judge held-out accuracy "
          f"{heldout:.3f}, on the sources {src_acc:.3f}")
    print(f"baseline (plain sampling of the targets): condition accuracy {base_acc:.3f}")
    print(f"{'s':>5}{'cond.acc':>10}{'still src':>11}{'pixel change':>14}{'ratio to plain':>16}")
    for s in [float(v) for v in args.strengths.split(",")]:
        acc, kept, change = judge(sampler.sample(labels, seeds, settings, init_latents=x0, strength=s))
        print(f"{s:>5.2f}{acc:>10.3f}{kept:>11.3f}{change:>14.3f}{acc / max(base_acc, 1e-9):>16.2f}")
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
