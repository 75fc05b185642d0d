"""The generation job: checks before sampling, a small job on the shared local Ray, resume, S3.

Three pipeline runs in all: the reference run (a registered bundle, local output, MLflow on), and an
interrupted-then-resumed run to S3 with the same weights loaded as a plain checkpoint, whose images
must be byte-identical to the reference.
"""
from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_generate_models import SCENARIOS, tiny_models

from drivedit import storage
from drivedit.config.base import load_config
from drivedit.config.generate import GenerateJob
from drivedit.generate import dataset
from drivedit.generate.job import main, prepare, run_generate
from drivedit.generate.spec import SpecError

COUNTS = {"rainy": 5, "night": 4, "snowy": 2, "clear": 1}  # 12 items -> shards of 4: 3 shards
SAMPLER = {"steps": 4, "guidance": 3.0, "batch_size": 3}


def _job(ref: str, uri: str, **sections) -> GenerateJob:
    data = {"model": {"ref": ref}, "spec": {"counts": COUNTS, "shard_size": 4, "base_seed": 7},
            "sampler": SAMPLER, "output": {"uri": uri}, "scaling": {"num_workers": 1},
            "tracking": {"enabled": False}}
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v}
    return load_config(GenerateJob, data=data)


def _files(uri: str) -> dict[str, bytes]:
    """Relative path -> bytes of every file of a dataset (hidden temporary files included)."""
    fs, root = storage.filesystem_for(uri)
    import pyarrow.fs as pafs

    out = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                out[info.path[len(root):].lstrip("/")] = f.read()
    return out


def _images(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if k.startswith("images/")}


@pytest.fixture(scope="module")
def models():
    return tiny_models()


@pytest.fixture(scope="module")
def reference(models, ray_session, tmp_path_factory):
    """An uninterrupted run from the registered bundle, with MLflow on."""
    out = tmp_path_factory.mktemp("reference") / "data"
    job = _job(models.registered, str(out), tracking={"enabled": True, "tracking_uri": models.tracking_uri,
                                                      "experiment": "generate-test"})
    summary = run_generate(job)
    return out, summary


# ----------------------------------------------------------------------------- before sampling


def test_bad_requests_fail_before_anything_is_written(models, tmp_path):
    out = tmp_path / "out"
    # a scenario the model's vocabulary lacks
    job = _job(str(models.base), str(out), model={"class_names": {"rainy": 1, "night": 4}})
    with pytest.raises(SpecError, match=r"unknown scenarios 'snowy', 'clear'; the model's vocabulary is: rainy, night"):
        run_generate(job)
    assert not out.exists()
    # superclass guidance on a model without a tiered embedder
    job = _job(str(models.bundle), str(out), sampler={"guidance_kind": "superclass"})
    with pytest.raises(SpecError, match="has no tiered"):
        prepare(job)
    # an output holding another dataset (another spec hash) is refused, and left as it was
    prep = prepare(_job(str(models.bundle), str(out)))
    dataset.claim_output(str(out), prep.document, prep.spec_hash)
    before = _files(str(out))
    with pytest.raises(dataset.OutputConflictError, match=r"holds a different dataset .* differ in: sampler"):
        run_generate(_job(str(models.bundle), str(out), sampler={"steps": 5}))
    with pytest.raises(dataset.OutputConflictError, match="differ in: base_seed"):
        run_generate(_job(str(models.bundle), str(out), spec={"base_seed": 8}))
    assert _files(str(out)) == before
    # a directory that is not a generated dataset
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(dataset.OutputConflictError, match="has no spec.json"):
        run_generate(_job(str(models.bundle), str(tmp_path / "other")))


def test_cli_reports_config_errors_and_help(tmp_path, capsys):
    assert main(["--help"]) == 0
    assert "--spec.balance" in capsys.readouterr().out
    cfg = tmp_path / "g.yaml"
    cfg.write_text("model: {ref: x}\nspec: {total: 10, fractions: {rainy: 0.5}}\noutput: {uri: o}\n")
    assert main(["--config", str(cfg), "--sampler.steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "sampler.steps" in err
    assert main(["--config", str(cfg), "--sampler.guidance_interval", "[5.4, 0.3]"]) == 2
    assert "sampler.guidance_interval" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the job


def test_small_job_counts_files_labels_manifest(reference, models):
    out, summary = reference
    assert summary["complete"] and summary["images_written"] == 12 and summary["shards_written"] == 3
    assert summary["per_scenario"] == {"clear": 1, "rainy": 5, "snowy": 2, "night": 4}
    assert summary["per_scenario_written"] == COUNTS and summary["images_per_s"] > 0
    assert summary["model_version"] == "models:/tiny-drive/1"
    files = _files(str(out))
    pngs = sorted(_images(files))
    assert pngs == [f"images/{i // 4:05d}/{i:08d}.png" for i in range(12)]
    assert not [k for k in files if storage.TMP_MARKER in k]
    for name in pngs:
        img = Image.open(io.BytesIO(files[name]))
        assert img.size == (8, 8) and img.mode == "RGB"
    # images differ across items (seeds and scenarios), they are not one constant image
    assert len({files[n] for n in pngs}) == 12

    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [r["index"] for r in manifest] == list(range(12))
    assert [r["seed"] for r in manifest] == [7 + i for i in range(12)]
    assert {r["scenario"] for r in manifest} == set(COUNTS)
    assert {s: sum(r["scenario"] == s for r in manifest) for s in COUNTS} == COUNTS
    for r in manifest:
        assert r["class_id"] == SCENARIOS.index(r["scenario"])
        assert r["model_version"] == "models:/tiny-drive/1" and r["spec_hash"] == summary["spec_hash"]
        assert (r["sampler"], r["steps"], r["guidance"], r["guidance_kind"]) == ("ddim", 4, 3.0, "cfg")
        assert f"images/{r['name']}" in files

    labels = json.loads((out / "labels.json").read_text())
    assert [f["name"] for f in labels] == [r["name"] for r in manifest]
    for frame, row in zip(labels, manifest):
        attrs = frame["attributes"]
        if row["scenario"] == "night":
            assert attrs["timeofday"] == "night"
        else:
            assert (attrs["weather"], attrs["timeofday"]) == (row["scenario"], "daytime")
        assert frame["labels"] == []
    # the label file reads back with the encode job's scenario rule, and counts what was asked
    from drivedit.generate.spec import existing_scenario_counts

    assert existing_scenario_counts(str(out / "labels.json"), SCENARIOS) == COUNTS

    spec = json.loads((out / "spec.json").read_text())
    assert spec["spec_hash"] == summary["spec_hash"] and spec["spec"]["counts"] == summary["per_scenario"]

    # the MLflow run names the model version it sampled and holds the summary
    from mlflow import MlflowClient

    run = MlflowClient(models.tracking_uri).get_run(summary["mlflow_run_id"])
    assert run.data.tags["drivedit.model_version"] == "models:/tiny-drive/1"
    assert run.data.tags["drivedit.spec_hash"] == summary["spec_hash"]
    assert run.data.metrics["images_written"] == 12 and run.data.metrics["count.rainy"] == 5
    assert run.data.params["spec.shard_size"] == "4" and run.info.status == "FINISHED"
    artifacts = {f.path for f in MlflowClient(models.tracking_uri).list_artifacts(run.info.run_id, "generate")}
    assert {"generate/preview.png", "generate/summary-0.json"} <= artifacts


def test_rerun_of_a_complete_dataset_samples_nothing(reference, models):
    out, summary = reference
    before = _files(str(out))
    # attempt.json names the execution now writing the dataset (issue 20, item 9): each rerun claims it anew
    # with a fresh id; every other byte of the dataset stays as it was
    first_attempt = json.loads(before.pop(dataset.ATTEMPT_FILE))["attempt"]
    again = run_generate(_job(models.registered, str(out), tracking={"tracking_uri": models.tracking_uri}))
    assert again["complete"] and again["resumed"] and again["shards_skipped"] == 3 and again["images_written"] == 0
    now = _files(str(out))
    assert json.loads(now.pop(dataset.ATTEMPT_FILE))["attempt"] != first_attempt
    assert now == before
    # asked again with label formats: they are written from the manifest, nothing else changes
    third = run_generate(_job(models.registered, str(out), tracking={"tracking_uri": models.tracking_uri},
                              output={"label_formats": ["yolo"]}))
    assert third["images_written"] == 0
    after = _files(str(out))
    after.pop(dataset.ATTEMPT_FILE)
    added = sorted(set(after) - set(before))
    assert added == ["dataset.yaml"] + [f"labels/{i // 4:05d}/{i:08d}.txt" for i in range(12)]
    assert all(after[k] == b"" for k in added[1:]) and {k: after[k] for k in before} == before
    for k in added:
        (out / k).unlink()  # the reference dataset stays as the first run wrote it


def test_killed_run_resumes_on_s3_byte_identical(reference, models, s3_bucket):
    ref_out, ref_summary = reference
    uri = f"s3://{s3_bucket}/synthetic/tiny"
    # the same weights as the registered bundle, loaded as a plain checkpoint with class names
    job = _job(str(models.merged), uri, model={"class_names": SCENARIOS})
    first = run_generate(job, stop_after_shards=1)  # the driver walks away after the first shard
    assert first["shards_written"] >= 1
    # whatever the abandoned tasks still finished, leave the worst a kill can: shard 0 complete but its
    # marker gone, shard 2 with a truncated image under its final name, a missing image, a stray
    # temporary object, no marker; no final manifest or labels
    # (which shard finished first depends on scheduling: keep one complete, damage the other two)
    done = dataset.complete_shards(uri)
    assert done, "the first run completed no shard"
    keep = min(done)
    others = [s for s in (0, 1, 2) if s != keep]
    for name in ("manifest.parquet", "labels.json"):
        storage.delete(storage.join(uri, name))
    for s in others:
        storage.delete(dataset.part_uri(uri, s))
    bad = others[-1]  # 4 items per shard: shard k holds items 4k .. 4k+3
    storage.write_bytes_atomic(storage.join(uri, "images", dataset.image_name(bad, 4 * bad)), b"\x89PNG truncated")
    storage.delete(storage.join(uri, "images", dataset.image_name(bad, 4 * bad + 1)))
    storage.write_bytes_atomic(storage.join(uri, f"images/{bad:05d}/.{4 * bad + 2:08d}.png.tmp-dead"), b"half")
    assert dataset.complete_shards(uri) == {keep}

    # the resumed run also asks for COCO / YOLO labels: written on S3 once the dataset is complete
    second = run_generate(_job(str(models.merged), uri, model={"class_names": SCENARIOS},
                               output={"label_formats": ["coco", "yolo"]}))
    assert second["complete"] and second["resumed"]
    assert (second["shards_written"], second["shards_skipped"]) == (2, 1)
    assert dataset.complete_shards(uri) == {0, 1, 2}
    files, ref = _files(uri), _files(str(ref_out))
    assert _images(files) == _images(ref)  # every image byte-identical to the uninterrupted run
    assert json.loads(files["labels.json"]) == json.loads(ref["labels.json"])
    manifest = pq.read_table(io.BytesIO(files["manifest.parquet"])).to_pylist()
    ref_manifest = pq.read_table(ref_out / "manifest.parquet").to_pylist()
    assert [r["index"] for r in manifest] == list(range(12))  # each index exactly once
    keep = ("index", "seed", "scenario", "class_id", "name", "weather", "timeofday")
    assert [{k: r[k] for k in keep} for r in manifest] == [{k: r[k] for k in keep} for r in ref_manifest]
    assert {r["model_version"] for r in manifest} == {f"checkpoint:{models.merged}"}
    coco = json.loads(files["coco.json"])
    assert [i["file_name"] for i in coco["images"]] == [r["name"] for r in manifest]
    assert {(i["width"], i["height"]) for i in coco["images"]} == {(8, 8)} and coco["annotations"] == []
    assert sorted(k for k in files if k.startswith("labels/")) == [
        f"labels/{r['name'][:-4]}.txt" for r in manifest]
    assert "names:" in files["dataset.yaml"].decode()


def test_stages_in_process_superclass_guidance_actor_decode_resize(models, tmp_path):
    """The two stages called directly (no Ray): superclass guidance, decoding on the sampler, resizing."""
    import numpy as np
    import torch

    from drivedit.generate.grid import latents_to_uint8
    from drivedit.generate.model_ref import load_sampling_model
    from drivedit.generate.sampler import DiTSampler, SamplerSettings
    from drivedit.models.codec import sample_clip_range
    from drivedit.generate.workers import ShardSampler
    from drivedit.generate.writer import write_shards

    out = tmp_path / "out"
    job = _job(str(models.tiered_bundle), str(out), sampler={"guidance_kind": "superclass"},
               output={"decode_on": "actor", "image_size": 16})
    prep = prepare(job)
    assert prep.image_size == 16
    items = prep.plan.shard_items(1)
    batch = {"shard": np.array([1]), "items": np.array([json.dumps(items)], dtype=object)}
    sampled = ShardSampler(job.model_dump(mode="json"), prep.model.digest)(batch)
    assert sampled["kind"] == ["images"] and json.loads(sampled["shape"][0]) == [4, 8, 8, 3]

    # the same images from the sampler directly, guided against each scenario's superclass row
    sm = load_sampling_model(str(models.tiered_bundle))
    clip = sample_clip_range(sm.codec_kind)  # the job clips x0 for pixel models
    labels = sm.labels([it["scenario"] for it in items])
    settings = SamplerSettings(steps=4, guidance=3.0, guidance_kind="superclass")
    latents = DiTSampler(sm.model, betas=sm.betas, clip_x0=clip).sample(labels, [it["seed"] for it in items], settings,
                                                            uncond_labels=sm.superclass_of(labels))
    expected = latents_to_uint8(sm.load_codec().decode(latents))
    got = np.frombuffer(sampled["payload"][0], dtype=np.uint8).reshape(4, 8, 8, 3)
    np.testing.assert_array_equal(got, expected)
    unguided = DiTSampler(sm.model, betas=sm.betas, clip_x0=clip).sample(labels, [it["seed"] for it in items],
                                                           SamplerSettings(steps=4, guidance=1.0))
    assert not torch.equal(unguided, latents)

    written = write_shards({k: np.array(v, dtype=object) for k, v in sampled.items()},
                           job.model_dump(mode="json"), prep.writer_context)
    assert written["shard"] == [1] and written["num_images"] == [4]
    for it in items:
        img = Image.open(out / "images" / dataset.image_name(1, it["index"]))
        assert img.size == (16, 16)
    assert dataset.complete_shards(str(out)) == {1}
    rows = pq.read_table(dataset.part_uri(str(out), 1)).to_pylist()
    assert [r["index"] for r in rows] == [it["index"] for it in items]
    assert {(r["width"], r["height"], r["guidance_kind"]) for r in rows} == {(16, 16, "superclass")}
