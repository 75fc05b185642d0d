"""Which base makes the demo's samples look like scenes? Two (or more) DiT-T/4 bases, one recipe.

Each base is fine-tuned on the same demo shards with the demo's own job (configs/demo/finetune.yaml:
driveditfit, its default scenario init and schedule), in-process through `drivedit.train.inprocess`
(no Ray: the arms differ only by the base), for the same steps and seeds; then each samples the same
seeds per scenario (DDPM with the learned variance, as the demo's generate job), decoded by the tiny VAE,
and is scored against the real frames by the classifier-free scene check (eval/scene_check.py) and by
the scenario classifier's condition accuracy. The first base named is the baseline; ratios are to it.

    python bench/base_compare.py --run runs/demo-base --bases builtin:tiny-dit runs/pretrain-context-cpu/tiny-dit.pt \
        --steps 400 --out runs/base-compare

`--run` is a finished `drivedit demo` folder: its scenes/, shards/ and, when there, eval/classifier.
Writes <out>/result.json, <out>/table.md and one sample grid per base (<out>/grid-<i>.jpg).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="a finished demo folder (scenes/, shards/)")
    p.add_argument("--bases", nargs="+", required=True, help="DiT-T/4 checkpoints; the first is the baseline")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--per-scenario", type=int, default=12)
    p.add_argument("--sampler-steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--classifier", type=Path, help="a saved scenario classifier (default: the demo's, else trained)")
    p.add_argument("--classifier-steps", type=int, default=400, help="when there is no classifier to load")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def classifier_for(run: Path, given: Path | None, steps: int, save: Path):
    """--classifier, else the demo's own (eval/classifier), else one trained here on the demo's scenes (saved)."""
    from drivedit.config.common import DEFAULT_SCENARIOS
    from drivedit.eval.classifier import ScenarioClassifier, train_scenario_classifier
    from drivedit.eval.folders import index_folder, vocabulary_for

    for folder in (given, run / "eval" / "classifier"):
        if folder is not None and (folder / "classifier.json").exists():
            return ScenarioClassifier.load(folder)
    real = index_folder(str(run / "scenes"), vocabulary_for(list(DEFAULT_SCENARIOS)))
    clf, acc = train_scenario_classifier(real.load(32), real.scenarios, real.vocabulary, image_size=32, steps=steps,
                                         seed=0, log=print)
    print(f"scenario classifier trained here: held-out accuracy {acc:.3f}")
    clf.save(save)
    return clf


def one_arm(base: str, args, real_small: np.ndarray, clf) -> tuple[dict, np.ndarray]:
    from drivedit.config import load_config
    from drivedit.config.finetune import FinetuneJob
    from drivedit.eval.scene_check import scene_likeness
    from drivedit.generate.grid import latents_to_uint8
    from drivedit.generate.sampler import DiTSampler, SamplerSettings
    from drivedit.models.checkpoint import resolve_model_source
    from drivedit.train.grids import codec_for
    from drivedit.train.inprocess import run_in_process

    job = load_config(FinetuneJob, ROOT / "configs" / "demo" / "finetune.yaml", [
        "--layout.kind", "none",  # the bases are compared on the scenario adapter alone, as recorded
        "--data.shards", str(args.run / "shards"), "--optim.total_steps", str(args.steps),
        "--optim.global_batch_size", str(args.batch), "--optim.warmup_steps", str(min(20, args.steps // 4)),
        "--run.checkpoint_every", str(args.steps), "--run.log_every", str(max(1, args.steps // 10)),
        "--sampling.every_steps", "0", "--sampling.at_end", "false", "--model.source", base])
    t0 = time.perf_counter()
    loop = run_in_process(job, str(resolve_model_source(base)), "cpu")
    train_s = time.perf_counter() - t0
    scenarios = list(loop.meta.scenarios)
    labels = torch.arange(len(scenarios)).repeat_interleave(args.per_scenario)  # (S*k,)
    settings = SamplerSettings(sampler="ddpm", steps=args.sampler_steps, guidance=args.guidance)
    codec = codec_for(loop.meta.codec_id, loop.meta.scale_factor)
    with loop._bundle_weights() as model:
        latents = DiTSampler(model, loop.schedule.final_betas(), "cpu").sample(labels, list(range(len(labels))), settings)
    images = latents_to_uint8(codec.decode(latents))  # (S*k, 128, 128, 3) uint8
    small = torch.nn.functional.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2).float(), size=64,
                                            mode="area").round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    pred = clf.predict(images)
    row = {"base": base, "train_seconds": round(train_s, 1), "semantic_init": loop.result.report.get(
        "semantic_init", {}).get("summary"), "condition_accuracy": float((pred == labels.numpy()).mean()),
        "per_scenario_accuracy": {s: float((pred[labels.numpy() == i] == i).mean()) for i, s in enumerate(scenarios)},
        **{f"scene_{k}": v for k, v in scene_likeness(real_small, small).items()}}
    return row, images


def main(argv=None) -> int:
    from PIL import Image

    from drivedit.config.common import DEFAULT_SCENARIOS
    from drivedit.eval.folders import index_folder, vocabulary_for
    from drivedit.eval.scene_check import scene_likeness
    from drivedit.generate.grid import save_grid

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    real = index_folder(str(args.run / "scenes"), vocabulary_for(list(DEFAULT_SCENARIOS))).load(64)
    reference = scene_likeness(real[::2], real[1::2])  # what real frames score against real frames
    clf = classifier_for(args.run, args.classifier, args.classifier_steps, args.out / "classifier")
    result = {"command": "python bench/base_compare.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "real_vs_real": reference, "arms": []}
    for i, base in enumerate(args.bases):
        row, images = one_arm(base, args, real, clf)
        result["arms"].append(row)
        png = save_grid(images, args.out / f"grid-{i}.png", nrow=args.per_scenario, labels=list(DEFAULT_SCENARIOS))
        Image.open(png).convert("RGB").save(args.out / f"grid-{i}.jpg", quality=90)
        Path(png).unlink()
        (args.out / "result.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(row), flush=True)
    base = result["arms"][0]
    lines = [f"| base | cond. acc. | layout agreement | layout FD | train s |", "|---|---|---|---|---|",
             f"| real frames (half vs half) | - | {reference['layout_agreement']:.3f} | {reference['layout_fd']:.2f} | - |"]
    for r in result["arms"]:
        lines.append(f"| {r['base']} | {r['condition_accuracy']:.3f} ({r['condition_accuracy'] / max(base['condition_accuracy'], 1e-9):.2f}×) | "
                     f"{r['scene_layout_agreement']:.3f} | {r['scene_layout_fd']:.2f} ({r['scene_layout_fd'] / base['scene_layout_fd']:.2f}×) | "
                     f"{r['train_seconds']:.0f} |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
