"""Sampling throughput: our DiTSampler against diffusers' DiTPipeline on the same weights.

Both sides generate the same batch from the same seeds with DDIM (50 steps by default),
classifier-free guidance 4 on all latent channels, and decode with the same VAE, in this one
process, alternating runs so that a busy machine slows both alike. The diffusers side gets our
model through `export_diffusers`, patched for the two documented numeric differences
(timestep frequency shift, norm3 eps), so both produce the same images; the script checks that.

Weights are random (no checkpoint download); the VAE is a randomly initialised AutoencoderKL
built here. CPU default: a tiny DiT on a small latent. GPU: `--preset gpu` (DiT-XL/2 at 256 px,
bf16, SD-VAE shape) also reports the fraction of the GPU's bf16 peak the DiT forward reached.

    python bench/sampling.py                      # CPU, DiT-T/2, 64 px, batch 8
    python bench/sampling.py --preset gpu         # CUDA, DiT-XL/2, 256 px, batch 32, bf16
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench._common import apply_preset, random_dit, random_vae  # noqa: E402

PRESETS = {
    "cpu": dict(model="DiT-T/2", image_size=64, vae_factor=4, batch=8, dtype="float32", device="cpu"),
    "gpu": dict(model="DiT-XL/2", image_size=256, vae_factor=8, batch=32, dtype="bfloat16", device="cuda"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="cpu (default when no GPU) or gpu; explicit flags below override it")
    p.add_argument("--model", help="registry size, e.g. DiT-T/2, DiT-XL/2")
    p.add_argument("--image-size", type=int)
    p.add_argument("--vae-factor", type=int, choices=(2, 4, 8), help="VAE downsampling factor")
    p.add_argument("--batch", type=int, help="images per call")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="bfloat16 only on CUDA")
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak of the GPU (H100 SXM: 989)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--compile", default=None, metavar="BACKEND",
                   help="torch.compile our sampler's forwards with this backend (inductor on a GPU)")
    p.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    args = p.parse_args(argv)
    apply_preset(args, PRESETS)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is visible")
    if args.dtype == "bfloat16" and args.device != "cuda":
        p.error("--dtype bfloat16 is for CUDA; the CPU runs float32")
    if args.image_size % args.vae_factor:
        p.error(f"--image-size {args.image_size} is not a multiple of --vae-factor {args.vae_factor}")
    return args




def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build_sides(args, diffusers: bool = True, compile_backend: str | None = None) -> dict:
    """Our DiTSampler + codec and (when `diffusers`) DiTPipeline on the same random weights and VAE.
    Returns {"ours": fn, "diffusers": fn or None, "model", "latent"}: each fn makes the images (N, 3, H, W)
    in [0, 1] for the same labels and seeds. `compile_backend` torch.compiles our sampler's forwards and
    adds "ours eager", the same sampler uncompiled."""
    from diffusers import DDIMScheduler, DiTPipeline
    from diffusers.utils import logging as dlogging

    from drivedit.generate.sampler import DiTSampler, SamplerSettings
    from drivedit.models.checkpoint import diffusers_transformer
    from drivedit.models.codec import AutoencoderKLCodec
    from drivedit.models.diffusers_format import patch_for_parity

    dlogging.set_verbosity_error()
    device, dtype = args.device, getattr(torch, args.dtype)
    latent = args.image_size // args.vae_factor
    model = random_dit(args.model, latent)
    vae = random_vae(args.vae_factor, full=device == "cuda")

    # ours: the sampler (bf16 autocast on CUDA) and the codec wrapper over the same VAE; with a compile
    # backend also an eager sampler over the same model, the compiled one's baseline
    amp = dtype if device == "cuda" else None
    samplers = {"ours": DiTSampler(model, device=device, amp_dtype=amp, compile=compile_backend or False)}
    if compile_backend:
        samplers["ours eager"] = DiTSampler(model, device=device, amp_dtype=amp)
    codec = AutoencoderKLCodec(vae, "bench-random", dtype=dtype).to(device)
    settings = SamplerSettings(sampler="ddim", steps=args.steps, guidance=args.guidance)
    labels = [(37 * i + 11) % 1000 for i in range(args.batch)]
    seeds = list(range(1000, 1000 + args.batch))

    def side(sampler):
        def ours() -> torch.Tensor:
            latents = sampler.sample(torch.tensor(labels), seeds, settings)  # (N, 4, h, w)
            return (codec.decode(latents).float() + 1) / 2  # (N, 3, H, W) in [0, 1]
        return ours

    theirs = None
    if diffusers:
        # theirs: the same weights by export_diffusers' key mapping, the same scheduler configuration
        transformer = diffusers_transformer(model)
        patch_for_parity(transformer)
        scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                                  beta_end=0.02, clip_sample=False, prediction_type="epsilon")
        pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler).to(device, dtype)
        pipe.set_progress_bar_config(disable=True)

        def theirs() -> torch.Tensor:
            gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            out = pipe(class_labels=labels, guidance_scale=args.guidance, num_inference_steps=args.steps,
                       generator=gens, output_type="pt")
            return out.images.float()

    return {**{name: side(sampler) for name, sampler in samplers.items()}, "diffusers": theirs, "model": model,
            "latent": latent}


def timed(fn, device: str) -> tuple[float, torch.Tensor]:
    """Wall time of fn() with the device idle before and drained after."""
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def dit_flop(model, args) -> float:
    """FLOP of the DiT forwards of one call: 2 x MACs x batch x (2 with guidance) x steps."""
    from drivedit.models.dit import count_macs

    return 2 * count_macs(model.config) * args.batch * (2 if args.guidance != 1.0 else 1) * args.steps


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    sides = build_sides(args, compile_backend=args.compile)
    model, latent = sides["model"], sides["latent"]
    ours, theirs = sides["ours"], sides["diffusers"]

    print(f"bench/sampling.py: {args.model} at {args.image_size} px (latent {latent}x{latent}x4, random VAE "
          f"factor {args.vae_factor}), batch {args.batch}, DDIM {args.steps} steps, guidance {args.guidance}, "
          f"{device} {args.dtype}, torch threads {torch.get_num_threads()}", flush=True)
    for _ in range(args.warmup):
        timed(ours, device)
        timed(theirs, device)
    times = {"ours": [], "diffusers": []}
    img = {}
    for _ in range(args.repeats):  # alternate so background load hits both sides alike
        t, img["ours"] = timed(ours, device)
        times["ours"].append(t)
        t, img["diffusers"] = timed(theirs, device)
        times["diffusers"].append(t)

    flop = dit_flop(model, args)  # DiT forwards only
    diff = (img["ours"].cpu() - img["diffusers"].cpu()).abs().max().item()
    rows = {}
    print(f"\n{'':<24}{'median s':>10}{'min s':>9}{'images/s':>10}{'DiT TFLOP/s':>13}"
          + (f"{'% bf16 peak':>13}" if device == "cuda" else ""))
    for name, label in (("ours", "ours (DiTSampler)"), ("diffusers", "diffusers DiTPipeline")):
        med = statistics.median(times[name])
        tflops = flop / med / 1e12
        rows[name] = {"median_s": med, "min_s": min(times[name]), "images_per_s": args.batch / med,
                      "dit_tflops": tflops, "times_s": times[name]}
        line = f"{label:<24}{med:>10.3f}{min(times[name]):>9.3f}{args.batch / med:>10.2f}{tflops:>13.4f}"
        if device == "cuda":
            rows[name]["peak_fraction"] = tflops / args.peak_tflops
            line += f"{100 * tflops / args.peak_tflops:>12.1f}%"
        print(line)
    ratio = rows["ours"]["images_per_s"] / rows["diffusers"]["images_per_s"]
    print(f"\nratio ours / diffusers (images/s): {ratio:.3f}")
    print(f"max |image difference| in [0, 1]: {diff:.2e} (same weights; diffusers patched for parity)")
    print("DiT TFLOP/s = 2 x MACs of the DiT forwards (cond + uncond) / wall time of the whole call, VAE "
          "decode included" + (f"; peak taken as {args.peak_tflops} TFLOP/s" if device == "cuda" else ""))
    if args.json:
        args.json.write_text(json.dumps({"config": {k: (str(v) if isinstance(v, Path) else v)
                                                    for k, v in vars(args).items()},
                                         "results": rows, "ratio": ratio, "max_image_diff": diff}, indent=2))
    return 0 if np.isfinite(ratio) else 1


if __name__ == "__main__":
    sys.exit(main())
