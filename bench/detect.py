"""Detector training on the demo data: training images/s per worker and validation AP50 at the same step
budget, the DiT-feature backbone against the torchvision ResNet-18 FPN baseline (same head, data, seed,
batch); `--archs` compares the heads on the ResNet the same way.

Every variant runs `drivedit.detect.loop.DetectLoop` (the job's own worker loop: build, train_step,
score) in this process on one worker. The training frames are decoded before the clock starts, and the
first steps (allocations, kernel choice) are left out, so images/s is the training step's own rate.
AP50 is pycocotools' on the held-out frames after the last step. The DiT is the shipped demo DiT
(`builtin:tiny-dit` on `builtin:tiny-vae`, trained on the procedural scenes) unless --dit-source names
another; `--dit-source random` takes a random DiT of --dit's size on a random factor-4 VAE (its speed is
the real one, its AP50 only what an untrained feature extractor gives).

    python bench/detect.py                              # CPU: 128 px demo scenes, batch 8
    python bench/detect.py --archs fasterrcnn fcos retinanet --backbones resnet18
    python bench/detect.py --backbones dit --timesteps 50 200 --block-sets -1 2 1,3,5
    python bench/detect.py --preset gpu                 # CUDA: batch 64, bf16

`suite_part(dry_run, emit)` is the GPU suite's `detect` part (bench/gpu_suite.py): throughput of each
backbone first, then AP50 of each at one step budget sized to the part's time cap (DRIVEDIT_PART_CAP_S).
It needs no Ray, MLflow or data files (it draws its scenes); without pycocotools it reports throughput only.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench._common import apply_preset, random_dit, random_vae  # noqa: E402

PRESETS = {
    "cpu": dict(dit="DiT-N/2", full_vae=False, batch=8, steps=150, frames=400, val_frames=100, device="cpu",
                threads=2),
    "gpu": dict(dit="DiT-B/2", full_vae=True, batch=64, steps=1500, frames=4000, val_frames=500, device="cuda",
                threads=8),
}
DEMO_CATEGORIES = ["car", "truck", "bus", "pedestrian", "traffic light", "traffic sign"]  # configs/demo/detect.yaml
SCENARIOS = ["clear", "overcast", "partly cloudy", "rainy", "snowy", "night"]
WARMUP_STEPS = 2  # not timed: allocations, cuDNN / oneDNN kernel choice


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="cpu (default without a GPU) or gpu")
    p.add_argument("--backbones", nargs="+", default=["resnet18", "dit"], choices=["resnet18", "resnet34", "dit"],
                   help="the first is the baseline")
    p.add_argument("--archs", nargs="+", default=None, choices=["fasterrcnn", "fcos", "retinanet"],
                   help="detection heads (default: the job's default)")
    p.add_argument("--dit-source", default="builtin:tiny-dit",
                   help="DiT / bundle / models:/ ref, or `random` for a random DiT of --dit's size")
    p.add_argument("--dit-codec", help="AutoencoderKL directory of --dit-source (default: the DiT's own)")
    p.add_argument("--dit", help="registry size of the random DiT (--dit-source random)")
    p.add_argument("--full-vae", type=bool, default=None, help="random VAE at sd-vae width (else narrow)")
    p.add_argument("--timesteps", type=int, nargs="+", default=None, help="DiT timesteps (default: the job's)")
    p.add_argument("--block-sets", nargs="+", default=None,
                   help="DiT feature blocks, one comma-separated set per variant (default: the job's)")
    p.add_argument("--train-from-block", type=int, default=None,
                   help="first trained DiT block (default: the job's; -1: the whole DiT frozen)")
    p.add_argument("--batch", type=int, help="images per step")
    p.add_argument("--steps", type=int, help="optimizer steps per variant")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the job's)")
    p.add_argument("--fpn-channels", type=int, default=None, help="pyramid channels (default: the job's)")
    p.add_argument("--anchor-sizes", type=int, nargs=5, default=None,
                   help="anchor side per pyramid level at 128 px (default: drivedit.detect.models.ANCHOR_SIZES)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="the job's optim.precision")
    p.add_argument("--frames", type=int, help="procedural training frames (without --train)")
    p.add_argument("--val-frames", type=int, help="procedural validation frames (without --val)")
    p.add_argument("--train", help="BDD100K-format training folder (default: procedural scenes)")
    p.add_argument("--val", help="BDD100K-format validation folder")
    p.add_argument("--categories", nargs="+", default=DEMO_CATEGORIES)
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    apply_preset(args, PRESETS)
    return args


# ----------------------------------------------------------------------------- variants


def dit_section(source: str, work: Path, dit_size: str = "DiT-N/2", full_vae: bool = False,
                codec: str | None = None) -> dict:
    """model.dit's source / codec / class_names for a named DiT, or for a random one written under `work`."""
    if source != "random":
        return {"source": source, **({"codec": {"kind": "autoencoder_kl", "source": codec}} if codec else {})}
    from drivedit.models.checkpoint import export_safetensors

    tag = f"{dit_size.replace('/', '-')}-{'full' if full_vae else 'narrow'}"
    if not (work / f"dit-{tag}.safetensors").is_file():
        random_vae(4, full_vae).save_pretrained(str(work / f"vae-{tag}"))
        export_safetensors(random_dit(dit_size, 32), work / f"dit-{tag}.safetensors")
    return {"source": str(work / f"dit-{tag}.safetensors"), "class_names": SCENARIOS,
            "codec": {"kind": "autoencoder_kl", "source": str(work / f"vae-{tag}")}}


def variants(args, work: Path) -> dict[str, dict]:
    """name -> the job's model section, baseline first."""
    from drivedit.config.detect import DetectorSection, DiTBackboneSection

    archs = args.archs or [DetectorSection().arch]
    defaults = DiTBackboneSection()
    out = {}
    width = {"fpn_channels": args.fpn_channels} if args.fpn_channels else {}
    for backbone in args.backbones:
        for arch in archs:
            name = f"{backbone}/{arch}" if len(archs) > 1 else backbone
            if backbone != "dit":
                out[name] = {"arch": arch, "backbone": backbone, **width}
                continue
            base = dit_section(args.dit_source, work, args.dit, args.full_vae, args.dit_codec)
            if args.train_from_block is not None:
                base["train_from_block"] = None if args.train_from_block < 0 else args.train_from_block
            for t in args.timesteps or [defaults.timestep]:
                for blocks in args.block_sets or [",".join(map(str, defaults.feature_blocks))]:
                    tag = ("" if args.timesteps is None else f" t={t}") + \
                          ("" if args.block_sets is None else f" blocks={blocks}")
                    out[name + tag] = {"arch": arch, "backbone": "dit", **width,
                                       "dit": {**base, "timestep": t,
                                               "feature_blocks": [int(b) for b in blocks.split(",")]}}
    return out


# ----------------------------------------------------------------------------- one training


def detect_job(model: dict, train: str, val: str, categories: list[str], steps: int, batch: int, work: Path,
               lr: float | None = None, precision: str = "auto"):
    from drivedit.config.detect import DetectJob, DetectOptimSection

    warmup = min(DetectOptimSection().warmup_steps, steps // 5)  # the job's warm-up, shortened for short runs
    optim = {"total_steps": steps, "global_batch_size": batch, "warmup_steps": warmup, "precision": precision,
             **({"lr": lr} if lr else {})}
    return DetectJob.model_validate({
        "model": model, "data": {"train": [{"uri": train}], "val": val, "categories": categories},
        "optim": optim, "run": {"name": "bench", "storage_path": str(work / "runs")},
        "tracking": {"enabled": False}})


def build_loop(job, device: torch.device, stores=None):
    """The job's worker loop, built (detector, optimizer, data); `stores` = (train, mix, val) of an earlier
    loop on the same folders, already decoded. The training frames are decoded here, off the clock."""
    from drivedit.detect.loop import DetectContext, DetectLoop, Edges

    loop = DetectLoop(job, DetectContext(run_dir=job.run.storage_path),
                      Edges(0, 1, device, None, lambda *a: None, lambda m, ignore: m))
    loop.build()
    if stores is not None:
        loop.train_store, loop.mix, loop.val_store = stores
    for i in range(len(loop.train_store.frames)):
        loop.train_store.get(i)
    return loop


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_steps(loop, n: int, cpu: list | None = None) -> float:
    """Seconds for the next `n` training steps; appends the process's CPU seconds for them to `cpu` (on a
    shared machine the wall time depends on the load, the CPU time much less)."""
    _sync(loop.e.device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        loop.train_step()
    _sync(loop.e.device)
    if cpu is not None:
        cpu.append(time.process_time() - c0)
    return time.perf_counter() - t0


def train_and_score(loop, work: Path) -> dict:
    """Train `loop` to its total_steps, timing every step after the warm-up ones, then score."""
    from drivedit.train.state import peak_memory_gib

    job = loop.job
    t_start = time.perf_counter()
    timed_steps(loop, min(WARMUP_STEPS, job.optim.total_steps))
    timed, cpu = job.optim.total_steps - loop.step, []
    seconds = timed_steps(loop, timed, cpu) if timed else float("nan")
    train_s = time.perf_counter() - t_start
    result = {"steps": loop.step, "images_per_s_per_worker": timed * job.micro_batch_size / seconds if timed else None,
              "cpu_s_per_image": cpu[0] / (timed * job.micro_batch_size) if timed else None,
              "train_s": train_s, "trainable": sum(p.numel() for p in loop.params),
              "peak_mem_gib": peak_memory_gib(loop.e.device)}
    if importlib.util.find_spec("pycocotools") is None:
        return {**result, "AP50": None, "mAP": None, "note": "pycocotools is not installed: no AP"}
    t0 = time.perf_counter()
    metrics = loop.score(work / "scores")
    return {**result, "AP50": metrics["AP50"], "mAP": metrics["mAP"], "AP_small": metrics["AP_small"],
            "per_category_AP50": {k: v["AP50"] for k, v in metrics["per_category"].items()},
            "score_s": time.perf_counter() - t0}


def scenes(work: Path, frames: int, val_frames: int) -> tuple[str, str]:
    from drivedit.data.scenes import write_scenes_dataset

    train, val = str(work / "train"), str(work / "val")
    write_scenes_dataset(train, frames, size=128, seed=0)
    write_scenes_dataset(val, val_frames, size=128, seed=1)
    return train, val


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.anchor_sizes:
        from drivedit.detect import models

        models.ANCHOR_SIZES = tuple(args.anchor_sizes)  # read by build_head when each detector is built
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-detect-") as tmp:
        work = Path(tmp)
        train, val = (args.train, args.val) if args.train and args.val else scenes(work, args.frames, args.val_frames)
        stores = None
        for name, model in variants(args, work).items():
            job = detect_job(model, train, val, args.categories, args.steps, args.batch, work, args.lr, args.precision)
            loop = build_loop(job, device, stores)
            stores = loop.train_store, loop.mix, loop.val_store
            results[name] = train_and_score(loop, work / name.replace("/", "-").replace(" ", "_"))
            r = results[name]
            print(f"  {name}: {r['images_per_s_per_worker']:.2f} img/s/worker | AP50 {r['AP50']} | "
                  f"{r['train_s']:.0f} s", flush=True)
            del loop
    names = list(results)
    base = results[names[0]]
    print(f"\n{args.steps} steps of {args.batch} images, {len(args.categories)} categories, device {args.device}, "
          f"{args.threads} threads, load average {os.getloadavg()[0]:.1f}; baseline {names[0]}")
    for name, r in results.items():
        ap = "-" if r["AP50"] is None else f"{r['AP50']:.4f}"
        print(f"  {name:28s} {r['images_per_s_per_worker']:7.2f} img/s/worker "
              f"({r['images_per_s_per_worker'] / base['images_per_s_per_worker']:.2f}x) | "
              f"{r['cpu_s_per_image']:.3f} CPU-s/img ({r['cpu_s_per_image'] / base['cpu_s_per_image']:.2f}x) | "
              f"AP50 {ap} | {r['trainable']:,} trainable | {r['train_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "json"},
                                         "load_average": os.getloadavg(), "results": results}, indent=1,
                                        default=str))
    return 0


# ----------------------------------------------------------------------------- the GPU suite's part

SUITE = {  # sizes of the suite's part; "dry" runs the same code on the CPU in seconds
    "gpu": dict(device="cuda", batch=64, frames=384, val_frames=128, max_steps=600, min_ap_steps=30,
                throughput_steps=10, random_dit="DiT-B/2", full_vae=True, threads=8, default_cap_s=120),
    "dry": dict(device="cpu", batch=2, frames=12, val_frames=6, max_steps=3, min_ap_steps=0, throughput_steps=1,
                random_dit="DiT-N/2", full_vae=False, threads=1, default_cap_s=600),
}


def suite_part(dry_run: bool, emit) -> None:
    """Throughput rows for the ResNet-18 FPN, the shipped demo DiT and a random DiT-B/2 (sd-vae-sized VAE),
    then AP50 of the ResNet and the demo DiT at one step budget that fits the part's cap; every figure is
    emitted as soon as it is measured."""
    from bench.gpu_parts import _device_info
    from drivedit.config.detect import DetectorSection
    from drivedit.train.state import peak_memory_gib

    s = SUITE["dry" if dry_run else "gpu"]
    t0 = time.perf_counter()
    cap = float(os.environ.get("DRIVEDIT_PART_CAP_S") or s["default_cap_s"])
    torch.set_num_threads(s["threads"])
    device = torch.device(s["device"])
    arch = DetectorSection().arch
    with tempfile.TemporaryDirectory(prefix="gpu-suite-detect-") as tmp:
        work = Path(tmp)
        train, val = scenes(work, s["frames"], s["val_frames"])
        models = {"resnet18": lambda: {"arch": arch, "backbone": "resnet18"},  # built when reached (a random
                  "dit-demo": lambda: {"arch": arch, "backbone": "dit",            # DiT-B/2 takes seconds)
                                       "dit": dit_section("builtin:tiny-dit", work)},
                  f"dit-random-{s['random_dit']}": lambda: {
                      "arch": arch, "backbone": "dit", "dit": dit_section("random", work, s["random_dit"],
                                                                          s["full_vae"])}}
        emit("config", arch=arch, batch=s["batch"], frames=s["frames"], val_frames=s["val_frames"],
             categories=DEMO_CATEGORIES, cap_s=cap, setup_s=round(time.perf_counter() - t0, 1), **_device_info())
        stores, step_s = None, {}
        for name, model in models.items():  # 1. throughput
            loop = build_loop(detect_job(model(), train, val, DEMO_CATEGORIES, 10 ** 6, s["batch"], work), device,
                              stores)
            stores = loop.train_store, loop.mix, loop.val_store
            timed_steps(loop, WARMUP_STEPS)
            seconds = timed_steps(loop, s["throughput_steps"])
            step_s[name] = seconds / s["throughput_steps"]
            emit("throughput", backbone=name, batch=s["batch"], step_s=step_s[name],
                 images_per_s_per_worker=s["batch"] / step_s[name], trainable=sum(p.numel() for p in loop.params),
                 peak_mem_gib=peak_memory_gib(device))
            del loop
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if importlib.util.find_spec("pycocotools") is None:
            emit("skip", reason="pycocotools is not installed on this machine: throughput only, no AP50")
            return
        # 2. AP50 at one step budget: what is left of the cap, less a margin for building and scoring
        ap_models = ["resnet18", "dit-demo"]
        left = cap - (time.perf_counter() - t0) - (10 if dry_run else 25)
        steps = int(min(s["max_steps"], max(0, left / sum(step_s[m] for m in ap_models))))
        if steps < s["min_ap_steps"]:
            emit("note", text=f"AP50 not measured: {max(left, 0):.0f} s left of the {cap:.0f} s cap fit {steps} "
                              f"steps, under the {s['min_ap_steps']} an AP50 comparison needs (give the part a longer "
                              f"cap: --cap detect=120)")
            return
        steps = max(steps, 1)
        emit("plan", steps=steps, seconds_left=round(left, 1))
        for name in ap_models:
            job = detect_job(models[name](), train, val, DEMO_CATEGORIES, steps, s["batch"], work)
            r = train_and_score(build_loop(job, device, stores), work / name)
            emit("ap", backbone=name, **{k: v for k, v in r.items() if k != "per_category_AP50"},
                 per_category_AP50=r.get("per_category_AP50"))


if __name__ == "__main__":
    sys.exit(main())
