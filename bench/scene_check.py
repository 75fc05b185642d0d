"""Does the classifier-free scene check (drivedit/eval/scene_check.py) separate scenes from non-scenes?

Baseline: one half of the real frames against the other half (what the same world scores). Against the
first half it then scores sets that keep the real frames' colours but not their layout (their patches
shuffled 4x4 and 2x2, a patchwork of their pixels in 4x4 blocks, their mean image every time) and,
with --fake, a generated folder (e.g. a demo's synthetic/), printing each layout FD as a ratio to the
baseline's.

    python bench/scene_check.py --num 240                         # procedural scenes written here (128 px)
    python bench/scene_check.py --real runs/demo/scenes --fake runs/demo/synthetic
    python bench/scene_check.py --real runs/demo/scenes --fake-grid runs/demo/finetune/demo/samples/step_00000800.png
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def controls(b: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Sets with the colours of `b` (uint8 (N, S, S, 3)) and not its layout."""
    from drivedit.eval.scene_check import shuffle_patches

    n, s = len(b), b.shape[1]
    rng = np.random.default_rng(seed)
    colours = b.reshape(-1, 3)[rng.integers(0, n * s * s, (n, 4, 4))]            # (n, 4, 4, 3) real pixels
    patchwork = np.repeat(np.repeat(colours, s // 4, axis=1), s // 4, axis=2)    # (n, s, s, 3) blocks
    return {"patches shuffled 4x4": shuffle_patches(b, 4, seed), "patches shuffled 2x2": shuffle_patches(b, 2, seed),
            "patchwork of real pixels": patchwork,
            "mean image every time": np.repeat(b.mean(0, keepdims=True).round().astype(np.uint8), n, 0)}


def grid_tiles(path: str, cols: int, tile: int) -> np.ndarray:
    """The images of a sample grid that drivedit wrote (generate/grid.py: labels on the left, PAD between
    tiles), e.g. a fine-tune's samples/step_*.png -> uint8 (N, tile, tile, 3)."""
    from PIL import Image

    from drivedit.generate.grid import PAD

    g = np.asarray(Image.open(path).convert("RGB"))
    rows = (g.shape[0] - PAD) // (tile + PAD)
    left = g.shape[1] - (cols * (tile + PAD) + PAD)  # the label column's width
    return np.stack([g[PAD + r * (tile + PAD):][:tile, left + PAD + c * (tile + PAD):][:, :tile]
                     for r in range(rows) for c in range(cols)])


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(x).resize((size, size), Image.BOX)) for x in images])


def main(argv=None) -> int:
    from drivedit.config.common import DEFAULT_SCENARIOS
    from drivedit.data.scenes import write_scenes_dataset
    from drivedit.eval.folders import index_folder, vocabulary_for
    from drivedit.eval.scene_check import IMAGE_SIZE, scene_likeness

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--real", help="a folder of real frames (default: procedural scenes written here)")
    p.add_argument("--fake", help="a generated folder to score as well")
    p.add_argument("--fake-grid", help="a sample grid PNG (a fine-tune's samples/step_*.png) to score as well")
    p.add_argument("--grid-cols", type=int, default=4, help="images per row of --fake-grid")
    p.add_argument("--grid-tile", type=int, default=128, help="image size in --fake-grid")
    p.add_argument("--num", type=int, default=240, help="procedural scenes to write when --real is not given")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    vocab = vocabulary_for(list(DEFAULT_SCENARIOS))
    with tempfile.TemporaryDirectory() as tmp:
        real_dir = args.real or write_scenes_dataset(str(Path(tmp) / "scenes"), args.num, size=128, seed=0)["out_dir"]
        real = index_folder(str(real_dir), vocab).load(IMAGE_SIZE)
        a, b = real[::2], real[1::2]
        rows = {"real half vs real half (baseline)": scene_likeness(a, b)}
        rows.update({name: scene_likeness(a, x) for name, x in controls(b).items()})
        if args.fake:
            rows["generated (--fake)"] = scene_likeness(a, index_folder(args.fake, vocab).load(IMAGE_SIZE))
        if args.fake_grid:
            tiles = _resize(grid_tiles(args.fake_grid, args.grid_cols, args.grid_tile), IMAGE_SIZE)
            # a grid holds few images: the same number of real frames is the like-for-like reference
            pick = np.random.default_rng(0).choice(len(b), min(len(tiles), len(b)), replace=False)
            rows[f"{len(pick)} real frames (second half)"] = scene_likeness(a, b[pick])
            rows[f"{len(tiles)} samples of --fake-grid"] = scene_likeness(a, tiles)
    base = rows["real half vs real half (baseline)"]["layout_fd"]
    print(f"{'set, against the first half of the real frames':<42} {'agreement':>9} {'mean map':>8} {'std map':>8} "
          f"{'layout FD':>9} {'FD / baseline':>13}")
    for name, m in rows.items():
        print(f"{name:<42} {m['layout_agreement']:>9.3f} {m['mean_map_corr']:>8.3f} {m['std_map_corr']:>8.3f} "
              f"{m['layout_fd']:>9.2f} {m['layout_fd'] / base:>12.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
