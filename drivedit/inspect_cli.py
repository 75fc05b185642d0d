"""`drivedit inspect`: look at a model size, a method's trainable set, or latent shards.

`inspect model` builds the DiT on the meta device, so even DiT-XL/2 at 512 px is counted without
allocating a weight. Parameters include `pos_embed`, as the official DiT counts them
(DiT-XL/2 at 256 px: 675,129,632); GMACs are multiply-accumulates of one forward at batch 1
(the paper's "Gflops": 118.6 for DiT-XL/2 at 256 px).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, function): owned elsewhere, imported only when asked for
DISPATCH = {
    "method": ("drivedit.train.inspect_method", "main"),
    "shards": ("drivedit.data.shards", "inspect_main"),
}
USAGE = """usage: drivedit inspect <what> ...

  model NAME|--all [--image-size 256] [--latent-factor 8] ...   parameters and GMACs of a DiT size
  method ...                                                  a fine-tuning method's trainable set
  shards ...                                                  latent shard files"""


def _model_parser() -> argparse.ArgumentParser:
    from drivedit.models.dit import DIT_MODELS
    from drivedit.models.posenc import POSENCS

    p = argparse.ArgumentParser(
        prog="drivedit inspect model",
        description="Parameter count and GMACs per forward of a DiT, built on the meta device (no weights).")
    p.add_argument("name", nargs="?",
                   help=f"a registry size ({', '.join(DIT_MODELS)}), a checkpoint path, or builtin:<name>")
    p.add_argument("--all", action="store_true", help="a table of every registry size")
    p.add_argument("--image-size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--latent-factor", type=int, default=8,
                   help="codec downsampling factor: 8 for the SD VAE, 1 for the pixel codec (default 8)")
    p.add_argument("--in-channels", type=int, default=4, help="latent channels (default 4)")
    p.add_argument("--num-classes", type=int, default=1000, help="label table size without the null row")
    p.add_argument("--posenc", choices=POSENCS, default="abs", help="position encoding (default abs)")
    return p


def model_stats(cfg) -> dict:
    """Counts of one config, from a meta-device build."""
    from drivedit.models.dit import build_dit, count_macs, count_parameters, model_name

    model = build_dit(cfg, device="meta")
    return {
        "name": model_name(cfg) or "custom",
        "params": count_parameters(model),
        "trainable": count_parameters(model, trainable_only=True),
        "gmacs": count_macs(cfg) / 1e9,
        "tokens": cfg.num_tokens,
        "cfg": cfg,
    }


def _gmacs(g: float) -> str:
    return f"{g:.2f}" if g >= 1 else f"{g:.4f}"  # tiny test sizes would all print 0.00


def _row(s: dict, image_size: int | None) -> str:
    c = s["cfg"]
    size = f"{image_size}px" if image_size else f"{c.input_size} latent"
    return (f"{s['name']:<10} {size:>10} {c.depth:>5} {c.hidden_size:>6} {c.num_heads:>5} {s['tokens']:>6} "
            f"{s['params']:>15,} {_gmacs(s['gmacs']):>10}")


HEADER = f"{'model':<10} {'size':>10} {'depth':>5} {'hidden':>6} {'heads':>5} {'tokens':>6} {'parameters':>15} {'GMACs':>10}"


def inspect_model(argv: list[str]) -> int:
    from drivedit.models.dit import DIT_MODELS, dit_config

    args = _model_parser().parse_args(argv)
    problems = []
    if args.image_size < 1 or args.latent_factor < 1 or args.image_size % args.latent_factor:
        problems.append(f"--image-size {args.image_size} must be a positive multiple of --latent-factor "
                        f"{args.latent_factor}")
    if args.in_channels < 1 or args.num_classes < 1:
        problems.append("--in-channels and --num-classes must be positive")
    if not args.all and not args.name:
        problems.append("give a model name (e.g. DiT-XL/2), a checkpoint, or --all")
    if problems:
        print("drivedit inspect model: " + "; ".join(problems), file=sys.stderr)
        return 2
    latent = args.image_size // args.latent_factor
    overrides = dict(in_channels=args.in_channels, num_classes=args.num_classes, posenc=args.posenc)

    if args.all:
        print(HEADER)
        for name in DIT_MODELS:
            try:
                cfg = dit_config(name, input_size=latent, **overrides)
            except ValueError as e:  # e.g. a latent grid the patch size does not divide
                print(f"{name:<10} skipped: {e}")
                continue
            print(_row(model_stats(cfg), args.image_size))
        return 0

    if args.name in DIT_MODELS:
        try:
            cfg = dit_config(args.name, input_size=latent, **overrides)
        except ValueError as e:
            print(f"drivedit inspect model: {e}", file=sys.stderr)
            return 2
        image_size = args.image_size
    else:
        from drivedit.models.checkpoint import read_dit_config

        try:
            cfg = read_dit_config(args.name)
        except (ValueError, FileNotFoundError) as e:
            print(f"drivedit inspect model: {args.name!r} is neither a registry size ({', '.join(DIT_MODELS)}) "
                  f"nor a readable checkpoint: {e}", file=sys.stderr)
            return 2
        image_size = None
    s = model_stats(cfg)
    c = s["cfg"]
    where = f"{image_size} px (latent {c.input_size}x{c.input_size}x{c.in_channels})" if image_size \
        else f"latent {c.input_size}x{c.input_size}x{c.in_channels}"
    print(f"{s['name']} at {where}")
    print(f"  depth {c.depth}, hidden {c.hidden_size}, heads {c.num_heads}, patch {c.patch_size}, "
          f"tokens {s['tokens']}, classes {c.num_classes}, posenc {c.posenc}, learn_sigma {c.learn_sigma}")
    print(f"  parameters: {s['params']:,} ({s['trainable']:,} trainable; pos_embed is a frozen parameter)")
    print(f"  GMACs per forward: {_gmacs(s['gmacs'])} (batch 1; FLOPs = 2 x MACs)")
    return 0


def main(argv: list[str]) -> int:
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    what, rest = argv[0], argv[1:]
    if what == "model":
        return inspect_model(rest)
    if what in DISPATCH:
        module, func = DISPATCH[what]
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    print(f"drivedit inspect: unknown target {what!r}\n\n{USAGE}", file=sys.stderr)
    return 2
