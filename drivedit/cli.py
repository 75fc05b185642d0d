"""The `drivedit` command: one subcommand per job plus inspection tools.

Each subcommand lives in the module that owns it and is imported only when called, so
`drivedit inspect model` does not pay for importing Ray, and a job's `main(argv)` is what
`jobs/<job>.py` calls under `ray job submit`.
"""
from __future__ import annotations

import importlib
import sys

# name -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "scenes": ("drivedit.data.scenes", "main", "write a procedural driving dataset in the BDD100K format"),
    "encode": ("drivedit.data.encode", "main", "encode a BDD100K, Ithaca365 or COCO dataset into latent shards"),
    "finetune": ("drivedit.train.trainer", "main", "fine-tune a DiT on latent shards (Ray Train), register the bundle"),
    "generate": ("drivedit.generate.job", "main", "generate a labelled synthetic dataset (Ray Data)"),
    "serve": ("drivedit.serve.app", "main", "start the sampling endpoint (Ray Serve)"),
    "detect": ("drivedit.detect.job", "main", "train a 2-D detector (Ray Train) and score it per scenario / size; "
                                              "--eval-only scores one"),
    "mark-unlabelled": ("drivedit.detect.unlabelled", "main",
                        "mark a generated set's objects its labels miss (a real-trained detector's) as ignore regions"),
    "eval": ("drivedit.eval.cli", "main", "FID / KID / precision / recall and condition accuracy of two folders"),
    "convert": ("drivedit.generate.label_formats", "main",
                "write COCO JSON / YOLO labels beside a BDD100K-format folder's labels.json"),
    "export": ("drivedit.export", "main", "merge an adapter bundle into its base; write official / diffusers files"),
    "new-model": ("drivedit.new_model", "main", "write a freshly initialised DiT checkpoint (pre-training from scratch)"),
    "inspect": ("drivedit.inspect_cli", "main", "inspect a model size, a method's trainable set, or shards"),
    "demo": ("drivedit.demo", "main", "the whole platform on this machine, end to end"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: drivedit <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "`drivedit <command> --help` describes each command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"drivedit: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    from drivedit.raylocal import prefer_short_openmp_spins

    prefer_short_openmp_spins()  # before the job imports torch (the demo's eval: 102 s beside two busy loops)
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
