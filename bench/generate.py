"""Dataset generation throughput: the generate job against a plain loop over diffusers' DiTPipeline.

Both sides make the same N images (same weights, labels, seeds; DDIM, classifier-free guidance on
all latent channels; the same random AutoencoderKL) and write them as PNG files, in this one
process's run. Each side is timed end to end: the job from `run_generate` until it returns (its
actors load the model; Ray is already up), the loop from loading the exported transformer until
its last PNG is written. The loop-only time of the baseline is printed too. Images are compared.

Weights are random (no checkpoint download). CPU default: DiT-T/2 at 64 px with a small VAE.
`--preset gpu`: DiT-XL/2 at 256 px with an SD-shaped VAE, bf16, one sampler actor per GPU
decoding on its GPU; it also reports images/s per GPU against the compute bound of a 50-step
guided image (2 x MACs x 2 forwards x steps, about 24 TFLOP at 256 px).

    python bench/generate.py                       # CPU, N=48, 2 sampler actors
    python bench/generate.py --num-images 96 --workers 1
    python bench/generate.py --preset gpu          # CUDA cluster node
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench._common import apply_preset, random_dit, random_vae  # noqa: E402

SCENARIOS = ["clear", "overcast", "partly cloudy", "rainy", "snowy", "night"]
PRESETS = {
    "cpu": dict(model="DiT-T/2", image_size=64, vae_factor=4, num_images=48, batch=8, shard_size=8, steps=25,
                dtype="float32", decode_on="cpu", workers=2),
    "gpu": dict(model="DiT-XL/2", image_size=256, vae_factor=8, num_images=512, batch=32, shard_size=64, steps=50,
                dtype="bfloat16", decode_on="actor", workers=None),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="cpu (default without a GPU) or gpu")
    p.add_argument("--model", help="registry size, e.g. DiT-T/2, DiT-XL/2")
    p.add_argument("--image-size", type=int)
    p.add_argument("--vae-factor", type=int, choices=(2, 4, 8))
    p.add_argument("--num-images", type=int, help="N, the same for both sides")
    p.add_argument("--batch", type=int, help="images per forward (sampler.batch_size; the pipeline's batch)")
    p.add_argument("--shard-size", type=int, help="items per shard of the job")
    p.add_argument("--steps", type=int, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--dtype", choices=("float32", "bfloat16"))
    p.add_argument("--decode-on", choices=("cpu", "actor"), help="where the job decodes latents")
    p.add_argument("--workers", type=int, help="sampler actors (default: 1 on CPU, one per GPU)")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="logical CPUs of the local Ray (default: the machine's, at least workers + 2)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak of one GPU (H100 SXM: 989)")
    p.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    args = p.parse_args(argv)
    apply_preset(args, PRESETS)
    args.use_gpu = torch.cuda.is_available() and (args.preset == "gpu" or args.dtype == "bfloat16")
    if args.dtype == "bfloat16" and not args.use_gpu:
        p.error("--dtype bfloat16 needs a CUDA device; the CPU runs float32")
    if args.image_size % args.vae_factor:
        p.error(f"--image-size {args.image_size} is not a multiple of --vae-factor {args.vae_factor}")
    return args




def run_job(args, ckpt: Path, vae_dir: Path, class_ids: dict[str, int], counts: dict[str, int], out: Path) -> dict:
    from drivedit.config.base import load_config
    from drivedit.config.generate import GenerateJob
    from drivedit.generate.job import run_generate

    job = load_config(GenerateJob, data={
        "model": {"ref": str(ckpt), "class_names": class_ids,
                  "codec": {"kind": "autoencoder_kl", "source": str(vae_dir), "dtype": args.dtype}},
        "spec": {"counts": counts, "shard_size": args.shard_size, "base_seed": 1000},
        "sampler": {"sampler": "ddim", "steps": args.steps, "guidance": args.guidance, "batch_size": args.batch,
                    "dtype": args.dtype},
        "output": {"uri": str(out), "decode_on": args.decode_on},
        "scaling": {"use_gpu": args.use_gpu, "num_workers": args.workers, "cpus_per_worker": 1,
                    "cpus_per_write_task": 1},
        "tracking": {"enabled": False}})
    t0 = time.perf_counter()
    summary = run_generate(job)
    summary["wall_s"] = time.perf_counter() - t0
    return summary


def run_pipeline_loop(args, transformer_dir: Path, vae, items: list[tuple[int, int, int]], out: Path) -> dict:
    """The baseline: load DiTPipeline, then for each batch call it and save its PNGs."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    from drivedit.models.diffusers_format import patch_for_parity

    device = "cuda" if args.use_gpu else "cpu"
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    transformer = DiTTransformer2DModel.from_pretrained(transformer_dir).eval()
    patch_for_parity(transformer)  # the two documented numeric differences, so both sides draw the same images
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                              clip_sample=False, prediction_type="epsilon")
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    t_loop = time.perf_counter()
    for start in range(0, len(items), args.batch):
        chunk = items[start:start + args.batch]
        gens = [torch.Generator("cpu").manual_seed(seed) for _, seed, _ in chunk]
        with torch.inference_mode():
            images = pipe(class_labels=[label for _, _, label in chunk], guidance_scale=args.guidance,
                          num_inference_steps=args.steps, generator=gens, output_type="pil").images
        for (index, _, _), image in zip(chunk, images):
            buf = io.BytesIO()
            image.save(buf, format="PNG", compress_level=6)
            (out / f"{index:08d}.png").write_bytes(buf.getvalue())
    end = time.perf_counter()
    return {"wall_s": end - t0, "loop_s": end - t_loop}


def compare_images(job_out: Path, base_out: Path, n: int, shard_size: int) -> tuple[float, float]:
    from PIL import Image

    diffs = []
    for i in range(n):
        a = np.asarray(Image.open(job_out / "images" / f"{i // shard_size:05d}" / f"{i:08d}.png"), dtype=np.int16)
        b = np.asarray(Image.open(base_out / f"{i:08d}.png").convert("RGB"), dtype=np.int16)
        diffs.append(np.abs(a - b))
    d = np.stack(diffs)
    return float(d.max()), float(d.mean())


def main(argv=None) -> int:
    args = parse_args(argv)
    import ray
    from diffusers.utils import logging as dlogging

    from drivedit.generate.spec import plan_items
    from drivedit.models.checkpoint import export_diffusers, export_safetensors
    from drivedit.models.dit import count_macs

    dlogging.set_verbosity_error()
    latent = args.image_size // args.vae_factor
    model = random_dit(args.model, latent)
    vae = random_vae(args.vae_factor, full=args.use_gpu)
    # six scenarios named onto ImageNet-style class ids; both sides get the same label and seed per item
    class_ids = {s: 100 * i + 7 for i, s in enumerate(SCENARIOS)}
    share, rest = divmod(args.num_images, len(SCENARIOS))
    counts = {s: share + (i < rest) for i, s in enumerate(SCENARIOS)}
    plan = plan_items(counts, base_seed=1000, shard_size=args.shard_size)
    items = [(it["index"], it["seed"], class_ids[it["scenario"]])
             for k in range(plan.num_shards) for it in plan.shard_items(k)]

    # sampler actors and write tasks each reserve a logical CPU; on a 2-core laptop they still share the cores
    num_cpus = args.num_cpus or max(os.cpu_count() or 1, (args.workers or 1) + 2)
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        tmp = Path(tmp)
        ckpt = export_safetensors(model, tmp / "dit.safetensors")
        export_diffusers(model, tmp / "transformer")
        vae.save_pretrained(tmp / "vae")
        (tmp / "baseline").mkdir()
        print(f"bench/generate.py: {args.model} at {args.image_size} px (latent {latent}x{latent}x4, random VAE "
              f"factor {args.vae_factor}), N={args.num_images}, batch {args.batch}, shard {args.shard_size}, "
              f"DDIM {args.steps} steps, guidance {args.guidance}, {'cuda' if args.use_gpu else 'cpu'} {args.dtype}, "
              f"decode on {args.decode_on}, Ray CPUs {int(ray.cluster_resources().get('CPU', 0))}, GPUs {gpus}",
              flush=True)
        summary = run_job(args, ckpt, tmp / "vae", class_ids, counts, tmp / "job")
        base = run_pipeline_loop(args, tmp / "transformer", vae, items, tmp / "baseline")
        max_diff, mean_diff = compare_images(tmp / "job", tmp / "baseline", args.num_images, args.shard_size)
    ray.shutdown()

    n = args.num_images
    job_ips, base_ips, loop_ips = n / summary["wall_s"], n / base["wall_s"], n / base["loop_s"]
    ratio = job_ips / base_ips
    print(f"\n{'':<40}{'seconds':>10}{'images/s':>10}")
    print(f"{'generate job (end to end)':<40}{summary['wall_s']:>10.2f}{job_ips:>10.3f}")
    print(f"{'DiTPipeline loop (load + loop + PNGs)':<40}{base['wall_s']:>10.2f}{base_ips:>10.3f}")
    print(f"{'DiTPipeline loop (loop + PNGs only)':<40}{base['loop_s']:>10.2f}{loop_ips:>10.3f}")
    print(f"\nratio job / DiTPipeline loop (images/s, end to end): {ratio:.3f}")
    print(f"ratio job / DiTPipeline loop-only: {job_ips / loop_ips:.3f}")
    print(f"image agreement: max |difference| {max_diff:.0f} / 255, mean {mean_diff:.4f} (same weights and seeds; "
          f"diffusers patched for parity)")
    result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "job": {k: summary[k] for k in ("wall_s", "seconds", "images_written", "shards_written")},
              "baseline": base, "job_images_per_s": job_ips, "baseline_images_per_s": base_ips,
              "baseline_loop_images_per_s": loop_ips, "ratio": ratio, "max_image_diff": max_diff}
    if args.use_gpu:
        flop = 2 * count_macs(model.config) * (2 if args.guidance != 1.0 else 1) * args.steps  # per image
        per_gpu = job_ips / max(gpus, 1)
        bound = args.peak_tflops * 1e12 / flop
        print(f"per GPU: {per_gpu:.2f} images/s; compute bound at {args.peak_tflops:.0f} TFLOP/s and "
              f"{flop / 1e12:.1f} TFLOP per image: {bound:.1f} images/s ({100 * per_gpu / bound:.1f}% of it)")
        result.update(per_gpu_images_per_s=per_gpu, tflop_per_image=flop / 1e12, bound_images_per_s=bound)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if np.isfinite(ratio) else 1


if __name__ == "__main__":
    sys.exit(main())
