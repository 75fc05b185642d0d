"""`drivedit new-model`: write a freshly initialised DiT (adaLN-Zero init) as a checkpoint.

It is the starting point of pre-training from scratch: the fine-tuning job with method `full`
takes it as its base (configs/pretrain/tiny.yaml), so pre-training and fine-tuning share one code path.
With `--init-from CHECKPOINT` every tensor whose name and shape match the other checkpoint's is
copied from it (a warm start: the transformer blocks of a model trained on other latents), and the
rest (the patch embedding and the output layer when the latent channels differ) keep the fresh init;
both lists are reported.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch


def write_new_model(name: str, out: str, *, input_size: int, in_channels: int, num_classes: int,
                    posenc: str = "abs", learn_sigma: bool = True, seed: int = 0, init_from: str | None = None) -> dict:
    from drivedit.models.checkpoint import export_official, export_safetensors, read_checkpoint, resolve_model_source
    from drivedit.models.dit import build_dit, count_parameters, dit_config

    cfg = dit_config(name, input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                     posenc=posenc, learn_sigma=learn_sigma)
    torch.manual_seed(seed)
    model = build_dit(cfg)
    warm = None
    if init_from is not None:
        other, _ = read_checkpoint(resolve_model_source(init_from))
        own = model.state_dict()
        copied = sorted(k for k, v in other.items() if k in own and own[k].shape == v.shape)
        if not copied:
            raise ValueError(f"--init-from {init_from}: no tensor has the name and shape of one of {name}'s; "
                             f"give a checkpoint of the same size")
        model.load_state_dict({**own, **{k: other[k] for k in copied}})
        warm = {"source": init_from, "copied": len(copied), "fresh": sorted(set(own) - set(copied))}
    path = export_official(model, out) if out.endswith((".pt", ".pth")) else export_safetensors(model, out)
    return {"model": name, "path": str(path), "parameters": count_parameters(model), "config": cfg.to_dict(),
            **({"init_from": warm} if warm else {})}


def main(argv: list[str]) -> int:
    from drivedit.models.posenc import POSENCS

    p = argparse.ArgumentParser(prog="drivedit new-model", description=__doc__.splitlines()[0])
    p.add_argument("name", help="registry size, e.g. DiT-T/2 (see `drivedit inspect model --all`)")
    p.add_argument("--out", required=True, help="checkpoint to write: .safetensors, or .pt for the official format")
    p.add_argument("--input-size", type=int, required=True, help="side of the latent grid (image size / codec factor)")
    p.add_argument("--in-channels", type=int, default=4, help="latent channels (4 for sd-vae, 3 for the pixel codec)")
    p.add_argument("--num-classes", type=int, required=True, help="number of class labels (a null row is added)")
    p.add_argument("--posenc", choices=POSENCS, default="abs",
                   help="position encoding: abs (official sin-cos table), rope (rotary q, k) or gta (rotary q, k, v "
                        "and its inverse on the output); rope and gta need .safetensors to be reloaded without a config")
    p.add_argument("--no-learn-sigma", action="store_true", help="predict eps only (no variance channels)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="copy every tensor of matching name and shape from this checkpoint (or builtin:NAME)")
    args = p.parse_args(argv)
    try:
        out = write_new_model(args.name, args.out, input_size=args.input_size, in_channels=args.in_channels,
                              num_classes=args.num_classes, posenc=args.posenc,
                              learn_sigma=not args.no_learn_sigma, seed=args.seed, init_from=args.init_from)
    except (ValueError, FileNotFoundError) as e:
        print(f"drivedit new-model: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2))
    return 0
