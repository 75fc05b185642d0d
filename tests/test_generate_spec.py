"""Generation specs without Ray: counts, balance arithmetic, item plan, spec hash, config errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from drivedit import storage
from drivedit.config.base import ConfigError, load_config
from drivedit.config.common import DEFAULT_SCENARIOS
from drivedit.config.generate import GenerateJob, SpecSection
from drivedit.generate.spec import (SpecError, counts_for_balance, counts_for_fractions, existing_scenario_counts,
                                    plan_items, resolve_counts, spec_document, spec_hash)

VOCAB = list(DEFAULT_SCENARIOS)  # clear, overcast, partly cloudy, rainy, snowy, night


def _frame(name, weather, timeofday="daytime"):
    return {"name": name, "attributes": {"weather": weather, "timeofday": timeofday, "scene": "city street"},
            "labels": [{"id": "0", "category": "car", "box2d": {"x1": 1, "y1": 2, "x2": 30, "y2": 40}}]}


@pytest.fixture
def label_file(tmp_path):
    """clear 7 (one of them at dawn/dusk), overcast 3, rainy 2, night 4 (whatever the weather), and frames
    the BDD100K rule drops: foggy 2, undefined 1."""
    frames = [_frame(f"c{i}.jpg", "clear") for i in range(6)] + [_frame("c6.jpg", "clear", "dawn/dusk")]
    frames += [_frame(f"o{i}.jpg", "overcast") for i in range(3)]
    frames += [_frame(f"r{i}.jpg", "rainy") for i in range(2)]
    frames += [_frame("n0.jpg", "clear", "night"), _frame("n1.jpg", "rainy", "night"),
               _frame("n2.jpg", "undefined", "night"), _frame("n3.jpg", "foggy", "night")]
    frames += [_frame("f0.jpg", "foggy"), _frame("f1.jpg", "foggy"), _frame("u0.jpg", "undefined")]
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(frames))
    return str(path)


def test_balance_arithmetic_on_a_label_file(label_file):
    existing = existing_scenario_counts(label_file, VOCAB)
    assert existing == {"clear": 7, "overcast": 3, "rainy": 2, "night": 4}
    # default target: the most common scenario's count (clear, 7)
    spec = SpecSection(balance={"source": label_file})
    counts = resolve_counts(spec, VOCAB, existing)
    assert counts == {"overcast": 4, "partly cloudy": 7, "rainy": 5, "snowy": 7, "night": 3}
    assert all(existing.get(s, 0) + counts.get(s, 0) == 7 for s in VOCAB)
    # an explicit target below some counts never asks for negative images
    spec = SpecSection(balance={"source": label_file, "target": 4, "scenarios": ["rainy", "night", "snowy", "clear"]})
    assert resolve_counts(spec, VOCAB, existing) == {"rainy": 2, "snowy": 4}
    assert counts_for_balance({"a": 3}, ["a", "b"]) == {"a": 0, "b": 3}


def test_balance_from_latent_shards_matches_scenarios_by_name(tmp_path):
    from drivedit.data.shards import ShardMetadata, build_shard_table, shard_name, write_shard

    # the shards' own vocabulary orders (and names) scenarios differently from the model's
    meta = ShardMetadata("pixel", 1.0, 2, (3, 2, 2), ["night", "rainy", "foggy", "clear"])
    for k, ids in enumerate([[0, 1, 3, 3, 2], [3, 3, 3, 2, 2, 2, 2, 2]]):
        n = len(ids)
        rows = {"frame_id": [f"f{k}-{i}" for i in range(n)], "source_uri": ["x"] * n, "scenario": ids,
                "weather": ["clear"] * n, "timeofday": ["daytime"] * n, "moments": np.zeros((n, 24)),
                "moments_flip": np.zeros((n, 24)), "object_mask": np.zeros((n, 4)), "num_objects": [0] * n}
        write_shard(str(tmp_path / shard_name(k)), build_shard_table(rows, meta))
    existing = existing_scenario_counts(str(tmp_path), VOCAB)
    # foggy (6 rows, the most) is not the model's to generate, so clear (5) sets the target, not foggy
    assert existing == {"night": 1, "rainy": 1, "clear": 5}
    counts = resolve_counts(SpecSection(balance={"source": str(tmp_path)}), VOCAB, existing)
    assert counts == {"overcast": 5, "partly cloudy": 5, "rainy": 4, "snowy": 5, "night": 4}


def test_balance_that_is_already_met_is_an_error(label_file):
    spec = SpecSection(balance={"source": label_file, "target": 2, "scenarios": ["clear", "rainy"]})
    with pytest.raises(SpecError, match="already balanced"):
        resolve_counts(spec, VOCAB, existing_scenario_counts(label_file, VOCAB))


def test_fractions_use_largest_remainder_and_sum_exactly():
    assert counts_for_fractions(10, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, ["a", "b", "c"]) == {"a": 4, "b": 3, "c": 3}
    # 7 * (.2, .3, .5) = 1.4, 2.1, 3.5: floors sum to 6, the one left goes to the largest remainder (c)
    assert counts_for_fractions(7, {"a": .2, "b": .3, "c": .5}, ["a", "b", "c"]) == {"a": 1, "b": 2, "c": 4}
    # 9 * (.2, .3, .5) = 1.8, 2.7, 4.5: two left, to a (.8) and b (.7)
    assert counts_for_fractions(9, {"a": .2, "b": .3, "c": .5}, ["a", "b", "c"]) == {"a": 2, "b": 3, "c": 4}
    for total in (1, 9, 1000, 12345):
        got = counts_for_fractions(total, {"rainy": .25, "snowy": .25, "night": .5}, VOCAB)
        assert sum(got.values()) == total
    spec = SpecSection(total=100, fractions={"night": .5, "rainy": .3, "snowy": .2})
    assert resolve_counts(spec, VOCAB) == {"rainy": 30, "snowy": 20, "night": 50}  # vocabulary order


def test_unknown_scenarios_are_all_named_before_sampling():
    spec = SpecSection(counts={"rainy": 3, "sunny": 2, "fog": 1})
    with pytest.raises(SpecError) as e:
        resolve_counts(spec, VOCAB)
    assert "'sunny', 'fog'" in str(e.value) and "clear, overcast" in str(e.value)


def test_config_lists_every_problem_at_once():
    # field errors of every section together
    data = {"model": {"ref": "x"}, "spec": {"counts": {"rainy": 1}, "shard_size": 0},
            "sampler": {"steps": 0, "sampler": "euler"}, "output": {"uri": "out"}, "surprise": 1}
    with pytest.raises(ConfigError) as e:
        load_config(GenerateJob, data=data)
    assert len(e.value.problems) == 4
    for needle in ("spec.shard_size", "sampler.steps", "sampler.sampler", "surprise: unknown field"):
        assert needle in str(e.value), needle
    # cross-field errors of a section together
    with pytest.raises(ConfigError) as e:
        load_config(GenerateJob, data={"model": {"ref": "x"}, "output": {"uri": "o"},
                                       "spec": {"counts": {"rainy": -1}, "fractions": {"rainy": .5, "night": .4}}})
    text = str(e.value)
    for needle in ("exactly one of", "counts must be >= 0, got rainy=-1", "`fractions` and `total` go together",
                   "fractions must sum to 1, they sum to 0.9 (rainy=0.5 + night=0.4)"):
        assert needle in text, needle
    with pytest.raises(ConfigError) as e:
        load_config(GenerateJob, data={"model": {"ref": "models:/d/1", "class_names": ["x"]}, "output": {"uri": "o"},
                                       "spec": {"counts": {"x": 1}}, "sampler": {"dtype": "float16"}})
    assert "class_names is for checkpoints" in str(e.value) and "float16 needs scaling.use_gpu" in str(e.value)
    for dtype in ("bfloat16", "auto"):  # CPU actors autocast to bfloat16
        job = load_config(GenerateJob, data={"model": {"ref": "models:/d/1"}, "output": {"uri": "o"},
                                             "spec": {"counts": {"x": 1}}, "sampler": {"dtype": dtype}})
        assert job.sampler.dtype == dtype and job.scaling.use_gpu is not True


def test_plan_interleaves_seeds_and_shards():
    plan = plan_items({"rainy": 6, "snowy": 3, "night": 1}, base_seed=1000, shard_size=4)
    assert plan.num_items == 10 and plan.num_shards == 3
    assert plan.counts() == {"rainy": 6, "snowy": 3, "night": 1}
    items = [it for k in range(plan.num_shards) for it in plan.shard_items(k)]
    assert [it["index"] for it in items] == list(range(10))
    assert [it["seed"] for it in items] == list(range(1000, 1010))
    names = [it["scenario"] for it in items]
    # keys (k + .5) / c: rainy .08 .25 .42 .58 .75 .92, snowy .17 .5 .83, night .5 (after snowy's .5)
    assert names == ["rainy", "snowy", "rainy", "rainy", "snowy", "night", "rainy", "rainy", "snowy", "rainy"]
    # so every prefix holds each scenario within one image of its share
    for n in range(1, 11):
        for s, c in (("rainy", 6), ("snowy", 3), ("night", 1)):
            assert abs(names[:n].count(s) - n * c / 10) <= 1
    assert [len(plan.shard_items(k)) for k in range(3)] == [4, 4, 2]


def test_spec_hash_covers_what_decides_the_images():
    plan = plan_items({"rainy": 4, "night": 2}, base_seed=0, shard_size=3)
    sampler = {"sampler": "ddim", "steps": 10, "guidance": 4.0, "guidance_kind": "cfg", "guide_channels": None}
    base = spec_hash(spec_document(plan, model_digest="m@1", sampler=sampler, image_size=32, codec="pixel"))
    assert base == spec_hash(spec_document(plan, model_digest="m@1", sampler=dict(reversed(sampler.items())),
                                           image_size=32, codec="pixel"))
    variants = [
        spec_document(plan, model_digest="m@2", sampler=sampler, image_size=32, codec="pixel"),
        spec_document(plan, model_digest="m@1", sampler={**sampler, "steps": 11}, image_size=32, codec="pixel"),
        spec_document(plan, model_digest="m@1", sampler=sampler, image_size=64, codec="pixel"),
        spec_document(plan_items({"rainy": 4, "night": 2}, 1, 3), model_digest="m@1", sampler=sampler,
                      image_size=32, codec="pixel"),
        spec_document(plan_items({"rainy": 4, "night": 2}, 0, 4), model_digest="m@1", sampler=sampler,
                      image_size=32, codec="pixel"),
        spec_document(plan_items({"rainy": 5, "night": 2}, 0, 3), model_digest="m@1", sampler=sampler,
                      image_size=32, codec="pixel"),
    ]
    hashes = {spec_hash(d) for d in variants}
    assert len(hashes) == len(variants) and base not in hashes
    assert len(base) == 64 and int(base, 16) >= 0
    assert np.array_equal(plan.scenario_pos, plan_items({"rainy": 4, "night": 2}, 0, 3).scenario_pos)


def test_a_guidance_interval_enters_the_spec_only_when_set():
    """Datasets sampled with guidance at every step keep their hashes; an interval makes another dataset."""
    from drivedit.config.generate import SamplerSection
    from drivedit.generate.dataset import manifest_settings, spec_settings

    plain, limited = SamplerSection(), SamplerSection(guidance_interval=(0.28, 5.42))
    assert spec_settings(plain) == manifest_settings(plain) and "guidance_interval" not in spec_settings(plain)
    assert spec_settings(limited) == {**manifest_settings(limited), "guidance_interval": [0.28, 5.42]}
    plan = plan_items({"rainy": 2}, base_seed=0, shard_size=2)
    docs = [spec_document(plan, model_digest="m", sampler=spec_settings(s), image_size=32, codec="pixel")
            for s in (plain, limited)]
    assert spec_hash(docs[0]) != spec_hash(docs[1])


def test_a_rerun_started_right_after_a_kill_is_safe_from_the_old_writers(tmp_path):
    """A killed execution's writer lives on: once a rerun has begun, it must neither clear a shard folder the
    rerun is writing into (deleting its in-flight temporary files) nor commit a manifest part."""
    from drivedit.generate import dataset
    from drivedit.generate.writer import write_shard

    uri = str(tmp_path / "ds")
    job = load_config(GenerateJob, data={"model": {"ref": "x"}, "output": {"uri": uri},
                                         "spec": {"counts": {"clear": 2}, "shard_size": 2},
                                         "tracking": {"enabled": False}})
    items = [{"index": i, "seed": i, "scenario": "clear"} for i in range(2)]
    pixels = np.full((2, 8, 8, 3), 127, np.uint8)  # (N, H, W, 3)
    context = {"spec_hash": "h", "model_version": "v", "image_size": 8, "class_ids": {"clear": 0}}
    killed = dataset.begin_attempt(uri)
    write_shard(job, {**context, "attempt": killed}, 0, items, pixels)  # before the kill: its shard 0 is fine
    assert dataset.complete_shards(uri) == {0}

    rerun = dataset.begin_attempt(uri)  # the rerun starts right after the kill ...
    in_flight = tmp_path / "ds" / "images" / "00001" / f".00000002.png{storage.TMP_MARKER}rerun"
    in_flight.parent.mkdir(parents=True)
    in_flight.write_bytes(b"the rerun is writing this")  # ... and is mid-way through shard 1
    with pytest.raises(dataset.SupersededError, match="replaced by a rerun"):
        write_shard(job, {**context, "attempt": killed}, 1, [{**it, "index": it["index"] + 2} for it in items], pixels)
    assert in_flight.read_bytes() == b"the rerun is writing this"  # the old writer deleted nothing
    assert dataset.complete_shards(uri) == {0} and not (tmp_path / "ds" / "images" / "00001" / "00000002.png").exists()
    in_flight.unlink()
    write_shard(job, {**context, "attempt": rerun}, 1, [{**it, "index": it["index"] + 2} for it in items], pixels)
    assert dataset.complete_shards(uri) == {0, 1}


def test_cli_lists_field_and_file_problems_together(tmp_path, capsys):
    """A field error does not hide an unusable model: one run of the command lists them all."""
    import yaml

    from drivedit.generate.job import main

    cfg = tmp_path / "generate.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"ref": str(tmp_path / "missing.safetensors"), "class_names": ["a"]},
                                   "spec": {"counts": {"a": 2}, "shard_size": 0}, "output": {"uri": str(tmp_path / "o")},
                                   "tracking": {"enabled": False}}))
    assert main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "spec.shard_size" in err and "model.ref: " in err and "missing.safetensors" in err, err
    assert "(2 problems)" in err, err
