"""Detector training on the demo data: images/s per worker and validation AP50 at the same step budget,
the DiT-feature backbone against the torchvision ResNet-18 FPN baseline (same head, data, seed, batch).

Both run `drivedit.detect.loop.DetectLoop` (the job's own worker loop) in this process, one after the
other, on one worker. images/s is the median over the logged intervals after the first (which holds
start-up and image decoding); AP50 is pycocotools' on the held-out frames after the last step.
Without --dit-source the DiT is a random DiT (and a random factor-4 VAE) of the tiny world's shape:
its speed is the real one, its AP50 only shows what an untrained feature extractor gives; name a
trained DiT or bundle (with --dit-codec for its VAE) to compare features.

    python bench/detect.py                               # CPU: 128 px, DiT-N/2 on 4x32x32 latents, batch 8
    python bench/detect.py --preset gpu                  # CUDA: DiT-B/2 on 4x32x32 latents, batch 64, bf16
    python bench/detect.py --train runs/demo/scenes-train --val runs/demo/scenes-val --steps 300
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench._common import apply_preset, random_dit, random_vae  # noqa: E402

PRESETS = {
    "cpu": dict(dit="DiT-N/2", full_vae=False, batch=8, steps=120, frames=200, val_frames=60, device="cpu"),
    "gpu": dict(dit="DiT-B/2", full_vae=True, batch=64, steps=1500, frames=4000, val_frames=500, device="cuda"),
}
SCENARIOS = ["clear", "overcast", "partly cloudy", "rainy", "snowy", "night"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="cpu (default without a GPU) or gpu")
    p.add_argument("--dit", help="registry size of the random DiT (without --dit-source)")
    p.add_argument("--dit-source", help="a trained DiT / bundle / models:/ ref instead of a random one")
    p.add_argument("--dit-codec", help="AutoencoderKL directory of --dit-source (default: the bundle's)")
    p.add_argument("--full-vae", type=bool, default=None, help="random VAE at sd-vae width (else narrow)")
    p.add_argument("--batch", type=int, help="images per step")
    p.add_argument("--steps", type=int, help="optimizer steps per backbone")
    p.add_argument("--frames", type=int, help="procedural training frames (without --train)")
    p.add_argument("--val-frames", type=int, help="procedural validation frames (without --val)")
    p.add_argument("--train", help="BDD100K-format training folder (default: procedural scenes)")
    p.add_argument("--val", help="BDD100K-format validation folder")
    p.add_argument("--categories", nargs="+", default=["car", "truck", "bus", "pedestrian", "traffic light",
                                                       "traffic sign"])
    p.add_argument("--timestep", type=int, default=50)
    p.add_argument("--feature-blocks", type=int, nargs="+", default=[-1])
    p.add_argument("--train-from-block", type=int, default=0, help="-1: the whole DiT frozen")
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    apply_preset(args, PRESETS)
    return args


def _dit_section(args, work: Path) -> dict:
    section = {"timestep": args.timestep, "feature_blocks": args.feature_blocks,
               "train_from_block": None if args.train_from_block < 0 else args.train_from_block}
    if args.dit_source:
        codec = {"kind": "autoencoder_kl", "source": args.dit_codec} if args.dit_codec else None
        return {**section, "source": args.dit_source, "codec": codec}
    from drivedit.models.checkpoint import export_safetensors

    random_vae(4, args.full_vae).save_pretrained(str(work / "vae"))
    export_safetensors(random_dit(args.dit, 32), work / "dit.safetensors")
    return {**section, "source": str(work / "dit.safetensors"), "class_names": SCENARIOS,
            "codec": {"kind": "autoencoder_kl", "source": str(work / "vae")}}


def run_one(args, model: dict, train: str, val: str, work: Path) -> dict:
    from drivedit.config.detect import DetectJob
    from drivedit.detect.loop import DetectContext, DetectLoop, Edges

    job = DetectJob.model_validate({
        "model": model, "data": {"train": [{"uri": train}], "val": val, "categories": args.categories},
        "optim": {"total_steps": args.steps, "global_batch_size": args.batch, "lr": 2e-3, "warmup_steps": 10},
        "run": {"name": "bench", "storage_path": str(work / "runs"), "checkpoint_every": 10 ** 9,
                "log_every": max(1, args.steps // 6)}, "tracking": {"enabled": False}})
    logged, final = [], {}

    def report(metrics, directory, name):
        if directory:
            final.update(json.loads((Path(directory) / "scores" / "metrics.json").read_text()))

    loop = DetectLoop(job, DetectContext(run_dir=str(work / "runs" / "bench")),
                      Edges(0, 1, torch.device(args.device), None, report, lambda m, ignore: m))
    log_line = loop.log_line
    loop.log_line = lambda m: (logged.append(m["images_per_s_per_worker"]), log_line(m))
    start = time.perf_counter()
    loop.run()
    return {"images_per_s_per_worker": statistics.median(logged[1:] or logged), "AP50": final["AP50"],
            "mAP": final["mAP"], "seconds": time.perf_counter() - start,
            "trainable": sum(p.numel() for p in loop.params)}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-detect-") as tmp:
        work = Path(tmp)
        train, val = args.train, args.val
        if not train or not val:
            from drivedit.data.scenes import write_scenes_dataset

            train, val = str(work / "train"), str(work / "val")
            write_scenes_dataset(train, args.frames, size=128, seed=0)
            write_scenes_dataset(val, args.val_frames, size=128, seed=1)
        results = {
            "resnet18": run_one(args, {"arch": "fasterrcnn", "backbone": "resnet18"}, train, val, work),
            "dit": run_one(args, {"arch": "fasterrcnn", "backbone": "dit", "dit": _dit_section(args, work)},
                           train, val, work),
        }
    base, dit = results["resnet18"], results["dit"]
    print(f"\nfasterrcnn, {args.steps} steps of {args.batch} images, device {args.device}, "
          f"load average {os.getloadavg()[0]:.1f}")
    for name, r in results.items():
        print(f"  {name:9s} {r['images_per_s_per_worker']:7.1f} img/s/worker | AP50 {r['AP50']:.4f} | "
              f"mAP {r['mAP']:.4f} | {r['trainable']:,} trainable | {r['seconds']:.0f} s")
    print(f"  dit / resnet18: {dit['images_per_s_per_worker'] / base['images_per_s_per_worker']:.2f}x images/s, "
          f"AP50 {dit['AP50']:.4f} vs {base['AP50']:.4f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "json"},
                                         "results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
