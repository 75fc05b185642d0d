"""Train the shipped tiny VAE (`builtin:tiny-vae`): a diffusers AutoencoderKL, factor 4, 4 latent channels.

    python -m drivedit.train.vae --data runs/vae/scenes runs/vae/objects --out runs/vae/tiny --steps 1500

Images of every folder given (BDD100K-layout `images/`, or any tree of .png/.jpg) are loaded once at
their size into memory (uint8); each step draws random square crops (a conv net without attention is
translation-equivariant, so crops teach it what whole frames would at a fraction of the cost) mirrored
at random, and minimises L1 + MSE of the reconstruction plus a small KL term (Stable Diffusion's VAE
recipe without its perceptual and adversarial terms). The learning rate is constant after a warm-up
(and decays linearly to 0 from `--decay-from` to `--steps` when given) and the exported weights are
an EMA, so a run can be stopped at any saved step and finished later with a decay: rerunning with
the same `--out` resumes from `state.pt`, drawing its crops from (seed, step). `--out` receives `state.pt` (resumable) every `--save-every` steps and, at the end, `vae/`:
the diffusers directory whose `scaling_factor` is 1 / std of the training latents, as Stable
Diffusion's was computed.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from drivedit import storage
from drivedit.models.tiny_vae import build_tiny_vae

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_image_folder(folder: str | Path, size: int) -> torch.Tensor:
    """Every image under `folder` (its `images/` subfolder when there is one), resized to size x size
    when it is not already -> uint8 (N, 3, size, size)."""
    root = Path(folder)
    if (root / "images").is_dir():
        root = root / "images"
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no .png/.jpg images under {root}; write some with `drivedit scenes` or "
                                f"`python -m drivedit.data.objects`")
    out = np.empty((len(files), size, size, 3), np.uint8)
    for i, path in enumerate(files):
        img = Image.open(path).convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BICUBIC)
        out[i] = np.asarray(img)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def load_training_images(data: list[str], size: int, cache: Path | None = None) -> torch.Tensor:
    """All folders' images as one uint8 (N, 3, size, size) tensor; decoding thousands of PNGs costs more
    than a few training steps, so a run keeps them in `cache` (an .npy next to its state) for a restart."""
    key = json.dumps({"data": [str(Path(d).resolve()) for d in data], "size": size})
    if cache is not None and cache.is_file() and cache.with_suffix(".json").is_file() \
            and cache.with_suffix(".json").read_text() == key:
        return torch.from_numpy(np.load(cache))
    images = torch.cat([load_image_folder(d, size) for d in data])
    if cache is not None:
        np.save(cache, images.numpy())
        cache.with_suffix(".json").write_text(key)
    return images


def to_model_range(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float (N, 3, H, W) in [-1, 1], the range every drivedit codec takes."""
    return images_u8.float().div(127.5).sub(1.0)


def random_crops(images_u8: torch.Tensor, count: int, crop: int, gen: torch.Generator) -> torch.Tensor:
    """`count` random crop x crop windows of random images, half mirrored -> float (count, 3, crop, crop)."""
    n, _, h, w = images_u8.shape
    idx = torch.randint(0, n, (count,), generator=gen)
    ys = torch.randint(0, h - crop + 1, (count,), generator=gen)
    xs = torch.randint(0, w - crop + 1, (count,), generator=gen)
    flips = torch.rand(count, generator=gen) < 0.5
    out = torch.stack([images_u8[i, :, y:y + crop, x:x + crop] for i, y, x in zip(idx, ys, xs)])
    out[flips] = out[flips].flip(-1)
    return to_model_range(out)


def vae_loss(vae, x: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, dict]:
    """x: (N, 3, h, w) in [-1, 1]; returns the loss and its parts (floats)."""
    posterior = vae.encode(x).latent_dist  # float32: bf16 autocast was 30% faster per step but learned slower
    recon = vae.decode(posterior.sample()).sample
    l1 = (recon - x).abs().mean()
    mse = F.mse_loss(recon, x)
    kl = posterior.kl().mean() / x[0].numel()  # per pixel-channel, so the weight does not depend on crop size
    loss = l1 + mse + kl_weight * kl
    return loss, {"l1": l1.item(), "mse": mse.item(), "kl": kl.item()}


@torch.no_grad()
def psnr(vae, images_u8: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Per-image reconstruction PSNR (dB, on [0, 255]) of the posterior mean: (N,)."""
    out = []
    for i in range(0, len(images_u8), batch):
        x = to_model_range(images_u8[i:i + batch])
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        mse = ((recon - x) * 127.5).pow(2).flatten(1).mean(1)
        out.append(10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10)))
    return torch.cat(out)


@torch.no_grad()
def latent_scaling_factor(vae, images_u8: torch.Tensor, batch: int = 32) -> float:
    """1 / std of latents sampled from the posterior of `images_u8` (Stable Diffusion's 0.18215 rule)."""
    gen = torch.Generator().manual_seed(0)
    samples = []
    for i in range(0, len(images_u8), batch):
        dist = vae.encode(to_model_range(images_u8[i:i + batch])).latent_dist
        samples.append(dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen))
    return float(1.0 / torch.cat(samples).std())


def _save_state(path: Path, step: int, vae, ema, opt, args: dict, log: list) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"step": step, "model": vae.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "args": args, "log": log}, tmp)
    tmp.replace(path)  # atomic: a run killed while saving keeps the previous state


def train(data: list[str], out: str, steps: int, size: int = 128, crop: int = 48, batch: int = 24,
          lr: float = 1e-3, warmup: int = 50, kl_weight: float = 1e-5, ema_decay: float = 0.995,
          block_out_channels=(16, 32, 64), norm_num_groups: int = 8, seed: int = 0, threads: int = 2,
          save_every: int = 100, log_every: int = 10, scale_images: int = 512, decay_from: int | None = None) -> dict:
    torch.set_num_threads(threads)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    args = dict(data=[str(d) for d in data], steps=steps, size=size, crop=crop, batch=batch, lr=lr, warmup=warmup,
                kl_weight=kl_weight, ema_decay=ema_decay, block_out_channels=list(block_out_channels),
                norm_num_groups=norm_num_groups, seed=seed, decay_from=decay_from)
    images = load_training_images(data, size, out_dir / "images.npy")  # (N, 3, size, size) uint8
    print(f"[vae] {len(images)} training images at {size} px from {', '.join(map(str, data))}", flush=True)
    torch.manual_seed(seed)
    vae = build_tiny_vae(block_out_channels, norm_num_groups, sample_size=size)
    with torch.no_grad():
        # the posterior starts nearly deterministic (std e^-4): with a small KL weight the encoder would
        # otherwise spend its first thousand steps walking logvar down out of unit-variance noise
        latent = vae.config.latent_channels
        vae.quant_conv.bias[latent:].fill_(-8.0)
    vae.to(memory_format=torch.channels_last)  # oneDNN's fast convolution layout on CPU
    ema = copy.deepcopy(vae).requires_grad_(False)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    state_path, log, step = out_dir / "state.pt", [], 0
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        vae.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step, log = state["step"], state["log"]
        gen.manual_seed(seed * 1_000_003 + step)  # a resumed run draws fresh crops, deterministically
        print(f"[vae] resumed from {state_path} at step {step}", flush=True)
    t0, seen = time.perf_counter(), 0
    while step < steps:
        scale = min(1.0, (step + 1) / max(1, warmup))
        if decay_from is not None and step >= decay_from:
            scale *= (steps - step) / max(1, steps - decay_from)
        for group in opt.param_groups:
            group["lr"] = lr * scale
        x = random_crops(images, batch, crop, gen).contiguous(memory_format=torch.channels_last)  # (B, 3, crop, crop)
        loss, parts = vae_loss(vae, x, kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), vae.parameters()):
                pe.lerp_(p, 1.0 - ema_decay)
        step, seen = step + 1, seen + batch
        if step % log_every == 0 or step == steps:
            rate = seen * crop * crop / (size * size) / (time.perf_counter() - t0)
            entry = {"step": step, "loss": round(loss.item(), 5), **{k: round(v, 5) for k, v in parts.items()},
                     "psnr_crop": round(10 * math.log10(4.0 / max(parts["mse"], 1e-10)), 2)}
            log.append(entry)
            print(f"[vae] {json.dumps(entry)} ({rate:.2f} {size}px-images/s)", flush=True)
        if step % save_every == 0 or step == steps:
            _save_state(state_path, step, vae, ema, opt, args, log)
    return export(out_dir, images, scale_images)


def export(out_dir: str | Path, images_u8: torch.Tensor | None = None, scale_images: int = 512) -> dict:
    """Write `<out_dir>/vae/` (diffusers AutoencoderKL directory) from the EMA weights in `state.pt`, with
    its scaling factor measured on (up to `scale_images` of) the training images."""
    out_dir = Path(out_dir)
    state = torch.load(out_dir / "state.pt", map_location="cpu", weights_only=True)
    args = state["args"]
    vae = build_tiny_vae(args["block_out_channels"], args["norm_num_groups"], sample_size=args["size"])
    vae.load_state_dict(state["ema"])
    vae.eval()
    if images_u8 is None:
        images_u8 = load_training_images(args["data"], args["size"], out_dir / "images.npy")
    pick = torch.randperm(len(images_u8), generator=torch.Generator().manual_seed(0))[:scale_images]
    scale = latent_scaling_factor(vae, images_u8[pick])
    vae.register_to_config(scaling_factor=scale)
    target = out_dir / "vae"
    tmp = out_dir / ".vae.tmp"
    vae.save_pretrained(tmp, safe_serialization=True)
    if target.exists():
        for f in target.iterdir():
            f.unlink()
        target.rmdir()
    tmp.replace(target)
    summary = {"step": state["step"], "scaling_factor": scale, "final": state["log"][-1] if state["log"] else None,
               "parameters": sum(p.numel() for p in vae.parameters()), "dir": str(target)}
    storage.write_text_atomic(str(out_dir / "summary.json"), json.dumps(summary, indent=2))
    print(f"[vae] exported {target}: {json.dumps(summary)}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m drivedit.train.vae", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", required=True, help="image folders (BDD100K layout or any image tree)")
    ap.add_argument("--out", required=True, help="run folder: state.pt, summary.json and vae/ are written here")
    ap.add_argument("--steps", type=int, required=True, help="optimizer steps")
    ap.add_argument("--size", type=int, default=128, help="image side the folders are loaded at (default 128)")
    ap.add_argument("--crop", type=int, default=48, help="training crop side, a multiple of 4 (default 48)")
    ap.add_argument("--batch", type=int, default=24, help="crops per step (default 24)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--decay-from", type=int, default=None, help="decay the lr linearly to 0 from this step")
    ap.add_argument("--kl-weight", type=float, default=1e-5, help="weight of the per-element KL term")
    ap.add_argument("--ema-decay", type=float, default=0.995)
    ap.add_argument("--channels", type=int, nargs=3, default=[16, 32, 64], help="block_out_channels (3: factor 4)")
    ap.add_argument("--groups", type=int, default=8, help="GroupNorm groups")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--export-only", action="store_true", help="only write vae/ from an existing state.pt")
    a = ap.parse_args(argv)
    if a.decay_from is not None and not 0 <= a.decay_from < a.steps:
        ap.error(f"--decay-from must lie in [0, --steps), got {a.decay_from}")
    if a.crop % 4 or a.crop > a.size:
        ap.error(f"--crop must be a multiple of 4 and at most --size ({a.size}), got {a.crop}")
    if a.export_only:
        export(a.out)
        return 0
    train(a.data, a.out, a.steps, a.size, a.crop, a.batch, a.lr, kl_weight=a.kl_weight, ema_decay=a.ema_decay,
          block_out_channels=tuple(a.channels), norm_num_groups=a.groups, seed=a.seed, threads=a.threads,
          save_every=a.save_every, decay_from=a.decay_from)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
