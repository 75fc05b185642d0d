"""The material of `bench/posenc.py`: training shards, held-out images and the feature classifier.

Two folders:
  --data (small, prepared once on a CPU; `.devdata/posenc` travels to a GPU machine): the feature classifier,
      the encode job's shard metadata, and the encode job's moments of the first image of every class
      (`reference.npz`), against which shards made elsewhere are checked;
  --work (large, never carried): the rendered 128 px object images and the encode job's shards
      (`prepare`, here), or the same shards rendered and encoded in-process (`synthesize_shards`, on a machine
      without Ray: the encode job's own image-to-moments stage, `encode_stages.CodecEncoder`, on the tiny VAE),
      and the held-out images with their moments.

The training set is the shipped tiny DiT's source domain (configs/pretrain/encode-objects.yaml:
`python -m drivedit.data.objects --num-per-class 400 --size 128 --seed 0`, builtin:tiny-vae, 32x32x4 latents).
The held-out images are the same generator with another seed (1), so no held-out image is a training image.
Ray-free: the GPU machine has no Ray.
"""
from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ENCODE_CONFIG = ROOT / "configs" / "pretrain" / "encode-objects.yaml"
TRAIN_SEED, HELDOUT_SEED = 0, 1
MANIFEST, SHARD_META, REFERENCE, HELDOUT = "manifest.json", "shard_meta.json", "reference.npz", "heldout.npz"


def encode_job():
    from drivedit.config import load_config
    from drivedit.config.encode import EncodeJob

    return load_config(EncodeJob, ENCODE_CONFIG, [])


def _frame(c: int, i: int) -> str:
    return f"{c:02d}/{i:05d}.png"  # the frame id write_objects_dataset gives image i of class c


def _render_one(spec: tuple[int, int, int]) -> np.ndarray:
    from drivedit.data.objects import render_object

    c, size, seed = spec
    return render_object(c, size, seed)


def render(per_class: int, seed: int, size: int, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """The images write_objects_dataset(per_class, size, seed) writes, in its order, in memory:
    (N, size, size, 3) uint8 and their class ids (N,)."""
    from drivedit.data.objects import CLASS_NAMES

    specs = [(c, size, seed * 1_000_003 + i) for c in range(len(CLASS_NAMES)) for i in range(per_class)]
    if workers > 1:  # numpy only, before any CUDA: fork is safe here
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            images = pool.map(_render_one, specs, chunksize=32)
    else:
        images = [_render_one(s) for s in specs]
    return np.stack(images), np.repeat(np.arange(len(CLASS_NAMES)), per_class)


# ----------------------------------------------------------------------------- here, on the CPU (Ray)


def prepare(data: Path, work: Path, per_class: int, feature_size: int, classifier_steps: int) -> dict:
    """Objects and their shards (the encode job) under `work`; classifier, shard metadata and reference
    moments under `data`. Each piece is made once and reused."""
    from drivedit.data.objects import CLASS_NAMES, write_objects_dataset
    from drivedit.data.shards import read_shard_metadata, shard_files
    from drivedit.eval.classifier import train_scenario_classifier
    from drivedit.eval.folders import index_folder, vocabulary_for

    objects, shards = work / "objects", work / "shards"
    if not (objects / "labels.json").exists():
        write_objects_dataset(objects, num_per_class=per_class, size=128, seed=TRAIN_SEED)
    if not (shards / "encode.json").exists() or not shard_files(str(shards)) or \
            json.loads((shards / "encode.json").read_text()).get("encoded") != 14 * per_class:
        subprocess.run([sys.executable, "-m", "drivedit.cli", "encode", "--config", str(ENCODE_CONFIG),
                        "--data.input", str(objects), "--data.output", str(shards)], check=True)
    data.mkdir(parents=True, exist_ok=True)
    meta = read_shard_metadata(str(shards))
    (data / SHARD_META).write_text(json.dumps(meta.to_json(), indent=1))
    if not (data / REFERENCE).exists():
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        table = pa.concat_tables([pq.read_table(f, columns=["frame_id", "moments", "moments_flip"])
                                  for f in shard_files(str(shards))])
        wanted = [_frame(c, 0) for c in range(len(CLASS_NAMES))]
        rows = table.filter(pc.is_in(table["frame_id"], pa.array(wanted)))
        order = np.argsort([wanted.index(f) for f in rows["frame_id"].to_pylist()])
        np.savez_compressed(data / REFERENCE, frame_id=np.array(wanted), **{
            c: np.stack(rows[c].to_numpy(zero_copy_only=False))[order] for c in ("moments", "moments_flip")})
    manifest_path = data / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if not (data / "classifier" / "classifier.json").exists():
        real = index_folder(str(objects), vocabulary_for(CLASS_NAMES))
        clf, acc = train_scenario_classifier(real.load(feature_size), real.scenarios, real.vocabulary,
                                             image_size=feature_size, steps=classifier_steps, seed=0, log=print)
        clf.save(data / "classifier")
        manifest["classifier"] = {"heldout_accuracy": round(float(acc), 4), "image_size": feature_size,
                                  "steps": classifier_steps, "trained_on": f"{len(real)} training images"}
        print(f"feature classifier: held-out accuracy {acc:.3f} on its own split of the training images")
    manifest.update({"train": {"per_class": per_class, "size": 128, "seed": TRAIN_SEED},
                     "heldout_seed": HELDOUT_SEED, "encode_config": str(ENCODE_CONFIG.relative_to(ROOT)),
                     "rows": meta.num_rows})
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return manifest


# ----------------------------------------------------------------------------- anywhere (no Ray)


def _encoder(meta):
    from drivedit.data.encode_stages import CodecEncoder

    job = encode_job()
    return CodecEncoder(job.codec.model_dump(mode="json"), list(meta.latent_shape), threads=2)


def _encode(encoder, images: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    parts = [encoder.encode_images(images[i:i + batch]) for i in range(0, len(images), batch)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])  # (N, 2Chw) float16 x2


def shard_meta(data: Path):
    from drivedit.data.shards import ShardMetadata

    d = json.loads((data / SHARD_META).read_text())
    return ShardMetadata(**{**d, "latent_shape": tuple(d["latent_shape"])})


def build_material(data: Path, work: Path, train_per_class: int, heldout_per_class: int, workers: int) -> dict:
    """What the runs read from `work`, made where missing: the training shards (synthesize_shards) and the
    held-out images with their moments (work/heldout.npz). Everything is rendered before anything is encoded:
    the render pool forks, which must happen before the encoder initialises CUDA."""
    from drivedit.data.shards import shard_files

    meta = shard_meta(data)
    need_shards = not shard_files(str(work / "shards"))
    path = work / HELDOUT
    need_heldout = True
    if path.exists():
        with np.load(path) as f:
            need_heldout = len(f["labels"]) != heldout_per_class * 14
    t0 = time.perf_counter()
    train = render(train_per_class, TRAIN_SEED, meta.resolution, workers) if need_shards else None
    held = render(heldout_per_class, HELDOUT_SEED, meta.resolution, workers) if need_heldout else None
    report = {"render_s": round(time.perf_counter() - t0, 1)}
    encoder = _encoder(meta) if need_shards or need_heldout else None
    if need_shards:
        report["shards"] = synthesize_shards(data, work, *train, encoder)
    if need_heldout:
        moments, _ = _encode(encoder, held[0])
        work.mkdir(parents=True, exist_ok=True)
        np.savez(path, images=held[0], labels=held[1], moments=moments)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    return report


def synthesize_shards(data: Path, work: Path, images: np.ndarray, labels: np.ndarray, encoder) -> dict:
    """The encode job's shards of the rendered training objects, made in-process: image and mirror encoded
    by the encode job's CodecEncoder (on CUDA where there is one), written in its shard layout. Returns how
    far its moments of the first image of every class lie from the encode job's (reference.npz)."""
    from drivedit.data.objects import CLASS_NAMES
    from drivedit.data.shards import build_shard_table, shard_name, write_shard

    meta = shard_meta(data)
    if list(meta.scenarios) != list(CLASS_NAMES):
        raise SystemExit(f"{data / SHARD_META} has scenarios {meta.scenarios}, not the object classes; "
                         "rerun --prepare-only")
    t0 = time.perf_counter()
    moments, moments_flip = _encode(encoder, images)
    n, (c, h, w) = len(images), meta.latent_shape
    per_class = n // len(CLASS_NAMES)
    frames = [_frame(int(k), i % per_class) for i, k in enumerate(labels)]
    rows = {"frame_id": frames, "source_uri": [f"rendered:{f}" for f in frames], "scenario": labels,
            "weather": [CLASS_NAMES[k] for k in labels], "timeofday": ["daytime"] * n,
            "moments": moments, "moments_flip": moments_flip, "object_mask": np.zeros((n, h * w), np.uint8),
            "num_objects": np.zeros(n, np.int16)}
    shards = work / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    per_shard = encode_job().shards.rows_per_shard
    for s, i in enumerate(range(0, n, per_shard)):
        write_shard(str(shards / shard_name(s)), build_shard_table({k: v[i:i + per_shard] for k, v in rows.items()},
                                                                   meta))
    ref = np.load(data / REFERENCE)
    first = np.arange(len(CLASS_NAMES)) * per_class
    diff = max(float(np.abs(moments[first].astype(np.float32) - ref["moments"].astype(np.float32)).max()),
               float(np.abs(moments_flip[first].astype(np.float32) - ref["moments_flip"].astype(np.float32)).max()))
    return {"rows": n, "encode_s": round(time.perf_counter() - t0, 1), "encoder_device": encoder.device_type,
            "reference_max_abs_diff": round(diff, 4),
            "reference_max_abs": round(float(np.abs(ref["moments"].astype(np.float32)).max()), 3)}


def load_heldout(work: Path) -> dict:
    with np.load(work / HELDOUT) as f:
        return {k: f[k] for k in f.files}
