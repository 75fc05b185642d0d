"""Condition transfer (`spec.transfer`): SDEdit from real labelled frames, labels carried over exactly.

A tiny BDD100K-format source (non-square JPEG frames, so the center crop cuts boxes; one frame with a
segmentation mask) re-rendered by the tiny generation models into two target scenarios.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from test_generate_job import _files, _images
from test_generate_models import tiny_models

from drivedit.config.base import ConfigError, load_config
from drivedit.config.generate import GenerateJob
from drivedit.generate import dataset
from drivedit.generate.job import prepare, run_generate
from drivedit.generate.spec import SpecError

from drivedit.config.generate import TransferSection

DOCUMENTED_STRENGTH = TransferSection.model_fields["strength"].default  # the README's and the config's s
W, H = 40, 24  # source frames; the 8 px model crops the centre 8x8 of a 13x8 resize
TARGETS = ["snowy", "night"]
FRAMES = [  # name, weather, boxes (category, x1, y1, x2, y2) in source pixels
    ("a.jpg", "clear", [("car", 10.0, 4.0, 30.0, 20.0), ("pedestrian", 0.0, 0.0, 4.0, 10.0)]),  # 2nd cropped out
    ("b.jpg", "rainy", [("truck", 2.0, 2.0, 22.5, 23.0)]),  # clipped on the left
    ("c.jpg", "clear", [("bus", 12.0, 6.0, 28.0, 18.0)]),
]


def write_source(root, labelled: bool = True) -> None:
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    frames = []
    for name, weather, boxes in FRAMES:
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(root / "images" / name, quality=95)
        labels = [{"id": str(i), "category": c, "box2d": {"x1": x1, "y1": y1, "x2": x2, "y2": y2}}
                  for i, (c, x1, y1, x2, y2) in enumerate(boxes)] if labelled else []
        frames.append({"name": name, "attributes": {"weather": weather, "timeofday": "daytime"}, "labels": labels})
    (root / "labels.json").write_text(json.dumps(frames))
    masks = root / "labels/sem_seg/masks"
    masks.mkdir(parents=True)
    mask = np.zeros((H, W), np.uint8)
    mask[:, W // 2:] = 13  # car on the right half
    Image.fromarray(mask, mode="L").save(masks / "a.png")


def expected_boxes(boxes, out_size: int, res: int = 8) -> list[list]:
    """The encode job's geometry, recomputed: short side to `res`, centre crop, clip, scale to the output."""
    scale = res / min(W, H)
    rw, rh = max(res, round(W * scale)), max(res, round(H * scale))
    sx, sy, left, top = rw / W, rh / H, (rw - res) // 2, (rh - res) // 2
    out = []
    for c, x1, y1, x2, y2 in boxes:
        a1, a2 = [min(max(v * sx - left, 0), res) * out_size / res for v in (x1, x2)]
        b1, b2 = [min(max(v * sy - top, 0), res) * out_size / res for v in (y1, y2)]
        if a2 > a1 and b2 > b1:
            out.append([c, a1, b1, a2, b2])
    return out


def _job(ref: str, source, uri, **transfer) -> GenerateJob:
    spec = {"transfer": {"source": str(source), "targets": TARGETS, "strength": 0.5, **transfer},
            "shard_size": 4, "base_seed": 3}
    return load_config(GenerateJob, data={
        "model": {"ref": ref}, "spec": spec, "sampler": {"steps": 4, "guidance": 3.0, "batch_size": 3},
        "output": {"uri": str(uri), "image_size": 16}, "scaling": {"num_workers": 1}, "tracking": {"enabled": False}})


@pytest.fixture(scope="module")
def models():
    return tiny_models()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("bdd")
    write_source(root)
    return root


def test_bad_transfer_lists_every_problem_before_writing(models, tmp_path):
    unlabelled = tmp_path / "unlabelled"
    write_source(unlabelled, labelled=False)
    out = tmp_path / "out"
    job = _job(str(models.bundle), unlabelled, out, strength=1.5, targets=["snowy", "tornado"])
    with pytest.raises(SpecError) as err:
        prepare(job)
    text = str(err.value)
    assert len(err.value.problems) == 3, text
    assert "strength must lie in (0, 1]" in text and "1.5" in text
    assert "unknown scenario 'tornado'" in text and "rainy" in text  # the vocabulary is listed
    assert "no box2d labels on any of its 3 frames" in text
    assert not out.exists()
    # zero strength and a missing source are reported too
    with pytest.raises(SpecError, match=r"(?s)strength must lie in \(0, 1\].*label file not found"):
        prepare(_job(str(models.bundle), tmp_path / "nowhere", out, strength=0.0))


def test_plan_items_frame_major_with_seeds(models, source, tmp_path):
    prep = prepare(_job(str(models.bundle), source, tmp_path / "out"))
    plan = prep.plan
    assert plan.num_items == 6 and plan.num_shards == 2 and plan.counts() == {"snowy": 3, "night": 3}
    items = plan.shard_items(0) + plan.shard_items(1)
    assert [(it["index"], it["seed"], it["source"], it["scenario"]) for it in items] == [
        (i, 3 + i, FRAMES[i // 2][0], TARGETS[i % 2]) for i in range(6)]
    assert prep.document["transfer"]["strength"] == 0.5
    other = prepare(_job(str(models.bundle), source, tmp_path / "out", strength=0.7))
    assert other.spec_hash != prep.spec_hash  # the strength decides the images
    # the start: noise (the default) keeps the documents and hashes datasets had; inversion is its own dataset
    assert "start" not in prep.document["transfer"] and {it["start"] for it in items} == {"noise"}
    inverted = prepare(_job(str(models.bundle), source, tmp_path / "out", start="inversion"))
    assert inverted.document["transfer"]["start"] == "inversion" and inverted.spec_hash != prep.spec_hash
    assert {it["start"] for it in inverted.plan.shard_items(0)} == {"inversion"}
    ddpm = _job(str(models.bundle), source, tmp_path / "out", start="inversion")
    ddpm.sampler.sampler = "ddpm"
    with pytest.raises(SpecError, match="spec.transfer.start inversion needs sampler.sampler ddim, got ddpm"):
        prepare(ddpm)
    with pytest.raises(ConfigError, match=r"spec\.transfer\.start"):
        _job(str(models.bundle), source, tmp_path / "out", start="invert")


def test_sdedit_strength_zero_is_the_source_and_more_strength_moves_further():
    from drivedit.data.objects import render_object
    from drivedit.generate.sampler import DiTSampler, SamplerSettings
    from drivedit.models.checkpoint import load_dit

    from drivedit.models.codec import load_codec

    # the shipped tiny DiT works on tiny-VAE latents of 128 px images: unclipped, as every latent model
    sampler = DiTSampler(load_dit("builtin:tiny-dit"), amp_dtype=None)
    codec = load_codec("autoencoder_kl", "builtin:tiny-vae")
    images = np.stack([render_object(c, 128, 20_000 + c) for c in range(4)])  # (4, 128, 128, 3)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (4, 3, 128, 128)
    moments = codec.encode(pixels)  # (4, 8, 32, 32)
    x0 = moments[:, :codec.latent_channels] * codec.scale_factor  # posterior mean, scaled: (4, 4, 32, 32)
    labels, seeds = torch.tensor([5, 6, 7, 8]), [0, 1, 2, 3]
    settings = SamplerSettings(steps=10, guidance=3.0)
    same = sampler.sample(labels, seeds, settings, init_latents=x0, strength=0.0)
    assert torch.equal(same, x0)
    distance = [(sampler.sample(labels, seeds, settings, init_latents=x0, strength=s) - x0).abs().mean().item()
                for s in (0.2, 0.5, 0.9)]
    assert 0 < distance[0] < distance[1] < distance[2], distance


def test_inversion_start_follows_the_ddim_ode_and_keeps_the_source(one_thread):
    """spec.transfer.start inversion: one step up is DDIM's update run backwards from the model's label-free eps
    (in float64 against the formula); inverting to s and denoising back under the same (null) label, unguided,
    returns close to the source where the noise start at the same s does not, and the seed plays no part."""
    from drivedit.data.objects import render_object
    from drivedit.generate.sampler import DiTSampler, SamplerSettings, build_scheduler
    from drivedit.generate.transfer import encode_sources
    from drivedit.models.checkpoint import load_dit
    from drivedit.models.codec import load_codec

    sampler = DiTSampler(load_dit("builtin:tiny-dit"), amp_dtype=None)
    codec = load_codec("autoencoder_kl", "builtin:tiny-vae")
    images = np.stack([render_object(c, 128, 20_000 + c) for c in range(3)])  # (3, 128, 128, 3)
    x0 = encode_sources(codec, images, torch.device("cpu"))  # (3, 4, 32, 32)
    settings = SamplerSettings(steps=25, guidance=1.0)
    null = torch.full((3,), sampler.null_label)
    alphas = build_scheduler(settings).alphas_cumprod.double()
    with torch.no_grad():
        up = sampler.invert(x0, torch.tensor([40]), alphas.float(), settings)  # (3, 4, 32, 32)
        eps = sampler.model(x0, torch.zeros(3, dtype=torch.long), null)[:, :4].double()
    want = alphas[40].sqrt() * x0.double() + (1 - alphas[40]).sqrt() * eps  # x0_hat = x0 at the clean start
    np.testing.assert_allclose(up.double().numpy(), want.numpy(), atol=1e-5)

    def error(start: str, seeds: list[int]) -> tuple[torch.Tensor, float]:
        out = sampler.sample(null, seeds, settings, init_latents=x0, strength=0.6, start=start)
        return out, (out - x0).abs().mean().item()

    (inverted, inv_err), (other_seeds, _), (_, noise_err) = (error("inversion", [0, 1, 2]),
                                                             error("inversion", [7, 8, 9]), error("noise", [0, 1, 2]))
    assert torch.equal(inverted, other_seeds)
    assert inv_err < 0.35 * noise_err, (inv_err, noise_err)  # measured 0.09 against 0.42
    with pytest.raises(ValueError, match="start must be one of noise, inversion"):
        sampler.sample(null, [0, 1, 2], settings, init_latents=x0, strength=0.6, start="invert")


def test_transfer_job_carries_labels_and_resumes_byte_identical(models, source, ray_session, tmp_path):
    whole = tmp_path / "whole"
    summary = run_generate(_job(str(models.bundle), source, whole))
    assert summary["complete"] and summary["num_items"] == 6
    labels = json.loads((whole / "labels.json").read_text())
    assert len(labels) == 6
    for i, frame in enumerate(labels):
        name, _, boxes = FRAMES[i // 2]
        got = [[b["category"], *(b["box2d"][k] for k in ("x1", "y1", "x2", "y2"))] for b in frame["labels"]]
        want = expected_boxes(boxes, 16)
        assert [g[0] for g in got] == [w[0] for w in want], name
        np.testing.assert_allclose([g[1:] for g in got], [w[1:] for w in want], atol=1e-3)
        assert (frame["attributes"]["weather"], frame["attributes"]["timeofday"]) == \
            dataset.scenario_attributes(TARGETS[i % 2])
    assert len(labels[0]["labels"]) == 1  # a's pedestrian lies outside the centre crop
    # boxes under one token of the model at the output size are carried as ignore regions, the others as objects
    under = json.loads((whole / "spec.json").read_text())["spec"]["transfer"]["ignore_under"]
    sides = [(np.sqrt((b["box2d"]["x2"] - b["box2d"]["x1"]) * (b["box2d"]["y2"] - b["box2d"]["y1"])),
              b["attributes"].get("ignore") is True) for f in labels for b in f["labels"]]
    assert under == 4.0 and [ignored for _, ignored in sides] == [side < under for side, _ in sides]
    manifest = pq.read_table(whole / "manifest.parquet").to_pylist()
    assert [(r["source_frame"], r["strength"]) for r in manifest] == [(FRAMES[i // 2][0], 0.5) for i in range(6)]
    assert [r["mask"] for r in manifest] == ["labels/sem_seg/masks/00000/00000000.png", "labels/sem_seg/masks/00000/00000001.png"] + [None] * 4
    assert [len(json.loads(r["labels"])) for r in manifest] == [len(f["labels"]) for f in labels]
    # frame a's mask, carried through the same crop and resized to the 16 px output
    masks = sorted(p.relative_to(whole).as_posix() for p in (whole / "labels/sem_seg/masks").rglob("*.png"))
    assert masks == ["labels/sem_seg/masks/00000/00000000.png", "labels/sem_seg/masks/00000/00000001.png"]
    mask = np.asarray(Image.open(whole / masks[0]))
    assert mask.shape == (16, 16) and set(np.unique(mask)) == {0, 13}
    assert (mask[:, -1] == 13).all() and (mask[:, 0] == 0).all()

    broken = tmp_path / "broken"
    job = _job(str(models.bundle), source, broken)
    run_generate(job, stop_after_shards=1)
    done = dataset.complete_shards(str(broken))
    assert done
    (broken / "labels.json").unlink(missing_ok=True)
    for k in done - {min(done)}:  # leave one shard complete, one to redo
        (broken / f"manifest/part-{k:05d}.parquet").unlink()
    second = run_generate(job)
    assert second["complete"] and second["resumed"] and second["shards_written"] == 1
    a, b = _files(str(whole)), _files(str(broken))
    assert _images(a) == _images(b)
    assert a["labels.json"] == b["labels.json"]
    assert {k: v for k, v in a.items() if k.startswith("labels/")} == {k: v for k, v in b.items() if k.startswith("labels/")}
    assert pq.read_table(io.BytesIO(a["manifest.parquet"])).equals(pq.read_table(io.BytesIO(b["manifest.parquet"])))


def test_inverted_transfer_job_is_the_same_whatever_the_seed(models, source, ray_session, tmp_path):
    """The job hands spec.transfer.start to the sampler: with DDIM from an inverted start no seed enters an image,
    so two base seeds make the same pictures (with the noise start each item's seed draws its noise: they would
    differ)."""
    def images(name: str, seed: int, start: str) -> dict:
        job = _job(str(models.bundle), source, tmp_path / name, start=start)
        job.spec.base_seed = seed
        assert run_generate(job)["complete"]
        return _images(_files(str(tmp_path / name)))

    assert images("inv3", 3, "inversion") == images("inv11", 11, "inversion")


def test_parts_of_the_older_transfer_schema_read_into_the_one_schema(tmp_path):
    """A part written before source / boxes were folded into source_frame / labels finalizes as a new one."""
    import pyarrow as pa

    row = {"index": 0, "seed": 3, "scenario": "snowy", "class_id": 4, "shard": 0, "name": "00000/00000000.png",
           "weather": "snowy", "timeofday": "daytime", "width": 16, "height": 16, "model_version": "m",
           "spec_hash": "h", "sampler": "ddim", "steps": 4, "guidance": 3.0, "guidance_kind": "cfg",
           "guide_channels": None, "source_frame": None, "labels": None, "source": "a.jpg", "strength": 0.5,
           "boxes": json.dumps([{"category": "car", "attributes": {"occluded": True}, "box2d": [1.5, 2.0, 9.0, 10.25]}])}
    (tmp_path / "manifest").mkdir()
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "manifest" / "part-00000.parquet")
    table = dataset.finalize(str(tmp_path), 1, 1)
    assert table.schema == dataset.MANIFEST_SCHEMA and "boxes" not in table.column_names
    got = table.to_pylist()[0]
    assert (got["source_frame"], got["strength"], got["mask"]) == ("a.jpg", 0.5, None)
    frame = json.loads((tmp_path / "labels.json").read_text())[0]
    assert frame["labels"][0]["box2d"] == {"x1": 1.5, "y1": 2.0, "x2": 9.0, "y2": 10.25}
    assert frame["labels"][0]["attributes"] == {"occluded": True}
    assert json.loads(got["labels"])[0]["box2d"] == [1.5, 2.0, 9.0, 10.25]  # kept as written; labels.json normalises


def test_transfer_moves_the_classifier_verdict_toward_the_target(one_thread):
    """The shipped tiny DiT re-renders unseen object images of one class into the next (SDEdit from tiny-VAE
    latents, the actor's encode_sources): at s = 0 a classifier trained on other renders still sees the
    source everywhere; at the README's strength the verdict has moved toward the target, and at s = 1 more."""
    from drivedit.data.objects import CLASS_NAMES, render_object
    from drivedit.eval.classifier import train_scenario_classifier
    from drivedit.generate.images import decode_to_uint8
    from drivedit.generate.sampler import DiTSampler, SamplerSettings
    from drivedit.generate.transfer import encode_sources
    from drivedit.models.checkpoint import load_dit
    from drivedit.models.codec import load_codec

    classes = [CLASS_NAMES.index(c) for c in ("snowman", "moon", "umbrella", "sun", "cloud", "owl")]
    renders = np.stack([render_object(c, 32, 50_000 + 100 * c + i) for c in classes for i in range(20)])
    clf, heldout = train_scenario_classifier(renders, np.repeat(np.arange(6), 20), [str(c) for c in classes],
                                             image_size=32, steps=60, seed=0)
    assert heldout >= 0.9
    src = np.repeat(np.arange(6), 2)  # (12,) positions in `classes`
    tgt = (src + 1) % 6
    images = np.stack([render_object(classes[s], 128, 20_000 + 10 * k) for k, s in enumerate(src)])  # (12, 128, 128, 3)
    codec = load_codec("autoencoder_kl", "builtin:tiny-vae")
    x0 = encode_sources(codec, images, torch.device("cpu"))  # (12, 4, 32, 32)
    sampler = DiTSampler(load_dit("builtin:tiny-dit"), amp_dtype=None)
    labels = torch.tensor([classes[t] for t in tgt])

    def verdict(s: float) -> tuple[float, float]:
        latents = sampler.sample(labels, list(range(12)), SamplerSettings(steps=10, guidance=4.0), init_latents=x0,
                                 strength=s)
        with torch.inference_mode():
            pred = clf.predict(decode_to_uint8(codec, latents))
        return float((pred == tgt).mean()), float((pred == src).mean())

    (t0, s0), (t_doc, s_doc), (t1, s1) = verdict(0.0), verdict(DOCUMENTED_STRENGTH), verdict(1.0)
    assert (t0, s0) == (0.0, 1.0)
    assert t_doc > t0 and s_doc < s0, (t_doc, s_doc)
    assert t1 > t_doc and s1 < s_doc, (t1, s1)
