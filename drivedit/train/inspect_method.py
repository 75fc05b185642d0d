"""`drivedit inspect method`: what a fine-tuning method trains, counted on the meta device.

    drivedit inspect method --model DiT-XL/2 --method driveditfit --rank 4 --scenarios 5
    drivedit inspect method --method finediffusion --num-classes 10000 --superclasses 11
    drivedit inspect method --all --scenarios 6

No weights are allocated, so DiT-XL/2 at 512 px counts in a second. The fraction is of the adapted
model's parameters (the new label table in place of the base one, `pos_embed` included, as the
official DiT counts).
"""
from __future__ import annotations

import argparse
import json
import sys

from drivedit.config.base import ConfigError, format_validation_error
from drivedit.config.method import MethodConfig

METHOD_NAMES = ("full", "bitfit", "difffit", "finediffusion", "lora", "driveditfit")


def _parser() -> argparse.ArgumentParser:
    from drivedit.models.dit import DIT_MODELS

    p = argparse.ArgumentParser(prog="drivedit inspect method",
                                description="Trainable parameters of a fine-tuning method, per group, in total "
                                            "and as a fraction of the model (meta device: no weights).")
    p.add_argument("--model", default="DiT-XL/2", choices=DIT_MODELS, help="DiT size (default DiT-XL/2)")
    p.add_argument("--method", choices=METHOD_NAMES, help="the method to count")
    p.add_argument("--all", action="store_true", help="count every method")
    p.add_argument("--rank", type=int, default=4, help="modulator / LoRA rank (default 4)")
    p.add_argument("--scenarios", type=int, default=None, help="number of scenarios (target labels; default 6)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="number of target classes: the same as --scenarios, for class-based datasets")
    p.add_argument("--superclasses", type=int, default=None, help="finediffusion: number of superclasses (default 1)")
    p.add_argument("--difffit-blocks", type=int, default=None, help="difffit: blocks with gammas (default: half)")
    p.add_argument("--image-size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--latent-factor", type=int, default=8, help="codec downsampling factor (default 8; 1 = pixel)")
    p.add_argument("--in-channels", type=int, default=4, help="latent channels (default 4)")
    p.add_argument("--base-classes", type=int, default=1000, help="classes of the pretrained model (default 1000)")
    p.add_argument("--layout", choices=("none", "controlnet", "light"), default="none",
                   help="add a layout branch of this kind (default none)")
    p.add_argument("--layout-depth", type=int, default=None,
                   help="layout branch depth (default: controlnet 13/28 of the blocks, light all)")
    p.add_argument("--layout-width", type=int, default=None, help="light branch width (default hidden / 4)")
    p.add_argument("--box-categories", type=int, default=10, help="layout box categories (default 10, BDD100K's)")
    p.add_argument("--segmentation-classes", type=int, default=0,
                   help="segmentation classes the layout branch reads (default 0: boxes only)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def _method_config(name: str, args) -> MethodConfig:
    from pydantic import ValidationError

    data = {"name": name}
    if name in ("driveditfit", "lora"):
        data["rank"] = args.rank
    if name == "difffit" and args.difffit_blocks is not None:
        data["difffit_blocks"] = args.difffit_blocks
    try:
        return MethodConfig(**data)
    except ValidationError as e:
        raise ConfigError("command line", format_validation_error(e)) from None


def _format(r: dict) -> str:
    extra = f", rank {r['rank']}" if "rank" in r else ""
    if "num_superclasses" in r:
        extra += f", {r['num_superclasses']} superclass{'es' * (r['num_superclasses'] > 1)}"
    lines = [f"{r['method']} on {r['model']} at {r['image_size']} px, {r['num_scenarios']} scenarios{extra}"]
    for group, n in sorted(r["groups"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {group:<16} {n:>15,}")
    lines.append(f"  {'trainable':<16} {r['trainable']:>15,}  ({100 * r['fraction']:.2f} % of {r['total']:,})")
    if r["adapted_modules"]:
        lines.append(f"  {'adapted modules':<16} {r['adapted_modules']:>15,}")
    if "layout" in r:
        lay = r["layout"]
        lines.append(f"  layout branch: {lay['kind']}, depth {lay['depth']}, {lay['in_channels']} input channels: "
                     f"{lay['params']:,} parameters ({100 * lay['param_fraction']:.2f} % of the base DiT), "
                     f"{lay['macs'] / 1e9:.3f} GMACs per forward ({100 * lay['mac_fraction']:.2f} % of the base DiT)")
    return "\n".join(lines)


def _layout_spec(args):
    """(LayoutSpec or None, a problem or None) from the --layout* arguments."""
    from pydantic import ValidationError

    from drivedit.config.finetune import LayoutSection
    from drivedit.models.dit import DIT_SIZES
    from drivedit.train.method_adapters import layout_spec

    if args.layout == "none":
        return None, None
    if args.box_categories < 1 or args.segmentation_classes < 0:
        return None, "--box-categories must be >= 1 and --segmentation-classes >= 0"
    try:
        section = LayoutSection(kind=args.layout, depth=args.layout_depth, width=args.layout_width,
                                use_segmentation=args.segmentation_classes > 0)
    except ValidationError as e:
        return None, "; ".join(format_validation_error(e))
    blocks = DIT_SIZES[args.model.split("/")[0]][0]
    spec = layout_spec(section, blocks, [f"box {i}" for i in range(args.box_categories)],
                       [f"class {i}" for i in range(args.segmentation_classes)])
    return spec, None


def main(argv: list[str]) -> int:
    from drivedit.train.method_adapters import count_method

    args = _parser().parse_args(argv)
    problems = []
    layout, layout_problem = _layout_spec(args)
    if layout_problem:
        problems.append(layout_problem)
    if args.all == (args.method is not None):
        problems.append("give either --method NAME or --all")
    if args.scenarios is not None and args.num_classes is not None and args.scenarios != args.num_classes:
        problems.append("--scenarios and --num-classes both set the number of target labels; give one")
    n = args.scenarios or args.num_classes or 6
    if n < 1:
        problems.append(f"the number of scenarios must be >= 1, got {n}")
    if args.superclasses is not None and not 1 <= args.superclasses <= n:
        problems.append(f"--superclasses must be between 1 and the number of classes ({n})")
    if args.image_size < 1 or args.latent_factor < 1 or args.image_size % args.latent_factor:
        problems.append(f"--image-size {args.image_size} must be a positive multiple of --latent-factor "
                        f"{args.latent_factor}")
    if problems:
        print("drivedit inspect method: " + "; ".join(problems), file=sys.stderr)
        return 2
    names = METHOD_NAMES if args.all else (args.method,)
    try:
        results = [count_method(args.model, _method_config(name, args), n, image_size=args.image_size,
                                num_superclasses=args.superclasses if name == "finediffusion" else None,
                                base_num_classes=args.base_classes, latent_factor=args.latent_factor,
                                in_channels=args.in_channels, layout=layout) for name in names]
    except (ConfigError, ValueError) as e:
        print(f"drivedit inspect method: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results if args.all else results[0], indent=1))
    else:
        print("\n\n".join(_format(r) for r in results))
    return 0
