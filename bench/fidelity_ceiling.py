"""The ceiling the codec sets on layout fidelity: the real-only detector on the held-out real frames' own VAE
round trips, against the same frames as they are.

A generator in latent space can at best produce the latents of a real frame; what the decoder makes of those is
what the detector sees. So the layout fidelity of the held-out frames' round trips (encode to the posterior mean,
decode: `drivedit.eval.vae_quality.reconstruct`, the codec the shards were encoded with) bounds what any DiT on
this codec can reach, per object size. bench/layout.py's pieces: its held-out real frames (`real_data`) and its
real-only detector (`detector`, reused from --out), the fidelity of bench/layout.py and
bench/guidance_interval_layouts.py (`drivedit.eval.fidelity.layout_fidelity`), on the boxes of at least
--ignore-under px (the generate job's `token` rule for the tiny DiT: patch 4 on a factor-4 VAE) and on every box.

    python bench/fidelity_ceiling.py --out runs/bench-layout --reuse

Writes <out>/reconstructed/ (the round trips as a BDD100K folder, PNG like the generate job's frames, the
originals' labels) and <out>/fidelity_ceiling.json, and prints the table BENCHMARKS.md records, beside the
generated sets' figures where <out>/guidance_interval.json holds them.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.layout import _f, detector, detector_scores, real_data, shared_args, start  # noqa: E402


def write_round_trips(real: Path, dest: Path, codec_kind: str, codec_source: str | None) -> dict:
    """`real`'s frames through the codec into `dest` (images/<stem>.png, labels.json naming them, the
    segmentation masks copied): {frames, image_size, codec_seconds}."""
    import shutil

    import numpy as np
    from PIL import Image

    from drivedit.eval.folders import load_image
    from drivedit.eval.vae_quality import reconstruct
    from drivedit.models.codec import load_codec

    labels = json.loads((real / "labels.json").read_text())
    with Image.open(real / "images" / labels[0]["name"]) as first:
        size = min(first.size)  # square frames at their stored size
    images = np.stack([load_image(str(real / "images" / f["name"]), size) for f in labels])  # (N, H, W, 3)
    t = time.perf_counter()
    recons = reconstruct(load_codec(codec_kind, codec_source), images)  # uint8 (N, H, W, 3)
    seconds = time.perf_counter() - t
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "images").mkdir(parents=True)
    for frame, image in zip(labels, recons):
        frame["name"] = Path(frame["name"]).stem + ".png"
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG", compress_level=1)
        (dest / "images" / frame["name"]).write_bytes(buf.getvalue())
    if (real / "labels" / "sem_seg").is_dir():
        shutil.copytree(real / "labels" / "sem_seg", dest / "labels" / "sem_seg")
    (dest / "labels.json").write_text(json.dumps(labels))
    return {"frames": len(labels), "image_size": size, "codec_seconds": round(seconds, 2)}


def table(rows: dict[str, dict]) -> str:
    """Markdown: one column per scored set (its layout_fidelity result)."""
    lines = ["| | " + " | ".join(rows) + " |", "|---" * (len(rows) + 1) + "|"]

    def row(name, get):
        lines.append(f"| {name} | " + " | ".join(get(r) for r in rows.values()) + " |")

    def size(r, z):
        return (r.get("per_size", {}).get(z) or {}).get("fidelity")

    row("fidelity, boxes >= the token side", lambda r: _f(r["fidelity"]))
    row("– medium / large", lambda r: f"{_f(size(r, 'medium'))} / {_f(size(r, 'large'))}")
    row("fidelity, every box", lambda r: _f(r["all_boxes"]["fidelity"]))
    row("– small / medium / large", lambda r: " / ".join(_f(size(r["all_boxes"], z)) for z in ("small", "medium", "large")))
    row("AP50 (every box), set / real", lambda r: f"{_f(r['all_boxes']['ap50_generated'])} / {_f(r['all_boxes']['ap50_real'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shared_args(ap)
    ap.add_argument("--codec-kind", default="autoencoder_kl")
    ap.add_argument("--codec-source", default="builtin:tiny-vae", help="the codec the shards were encoded with")
    ap.add_argument("--ignore-under", type=float, default=16.0,
                    help="px of the 128 px frame under which boxes are ignore regions (one tiny-DiT token: 16)")
    args = ap.parse_args(argv)
    import ray

    from drivedit.eval.fidelity import layout_fidelity

    out, t0 = start(args)
    try:
        real_data(out, args)
        det = detector(out, args)
        round_trips = write_round_trips(out / "scenes-val", out / "reconstructed", args.codec_kind, args.codec_source)
        real_scores = detector_scores(det, out / "scenes-val", out)
        recon_scores = detector_scores(det, out / "reconstructed", out)
    finally:
        ray.shutdown()
    ceiling = layout_fidelity(recon_scores, real_scores, args.ignore_under)
    rows = {f"round trips ({args.codec_source})": ceiling}
    generated = out / "guidance_interval.json"
    if generated.is_file():  # bench/guidance_interval_layouts.py's sets, scored by the same detector
        rows.update({arm: r["fidelity"] for arm, r in json.loads(generated.read_text())["arms"].items()})
    result = {"command": "python bench/fidelity_ceiling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "codec": [args.codec_kind, args.codec_source], **round_trips, "ignore_under": args.ignore_under,
              "ceiling": ceiling, "seconds": round(time.perf_counter() - t0, 1)}
    (out / "fidelity_ceiling.json").write_text(json.dumps(result, indent=2, default=str))
    print(table(rows))
    print(f"the codec's round trips keep {_f(ceiling['fidelity'])} of the real frames' AP50 on boxes of "
          f"{args.ignore_under:g} px and more, {_f(ceiling['all_boxes']['fidelity'])} over every box: the most a "
          "generator on this codec can reach")
    return 0


if __name__ == "__main__":
    sys.exit(main())
