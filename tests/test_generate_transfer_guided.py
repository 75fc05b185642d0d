"""Layout-guided condition transfer (`spec.transfer.layout_guidance`): the layout branch is steered by the very
boxes (and mask) each output carries; the labels stay exactly those of plain transfer; a model without a branch
refuses the field. The source and the geometry are test_generate_transfer's."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from layout_support import write_layout_bundle
from test_generate_job import _files, _images
from test_generate_models import SCENARIOS
from test_generate_transfer import FRAMES, TARGETS, _job, expected_boxes
from test_generate_transfer import models, source  # noqa: F401  (the fixtures: the tiny models, the source)

from drivedit.config.base import ConfigError
from drivedit.data.bdd100k import SEGMENTATION_CLASSES
from drivedit.data.layout import rasterise_layout
from drivedit.generate import dataset
from drivedit.generate.job import absolute_local_paths, prepare, run_generate
from drivedit.generate.spec import SpecError
from drivedit.generate.workers import ShardSampler

BRANCH_CATS = ["car", "truck", "pedestrian"]  # no bus: frame c's bus is labelled but left out of its layout
RES = 8  # the tiny models' resolution (pixel codec: the latent grid is the image)


@pytest.fixture(scope="module")
def bundles(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("branches")
    return {"boxes": write_layout_bundle(models.base, root / "boxes", SCENARIOS, BRANCH_CATS, depth=2),
            "segmentation": write_layout_bundle(models.base, root / "seg", SCENARIOS, BRANCH_CATS, depth=2,
                                                segmentation_classes=SEGMENTATION_CLASSES)}


def _actor_run(job) -> tuple[torch.Tensor, list, torch.Tensor | None]:
    """(latents, carried boxes per item, the layout the sampler was given for all items or None) of every item of
    `job`, sampled by a ShardSampler in this process (the actor's code, without Ray)."""
    prep = prepare(absolute_local_paths(job))
    actor = ShardSampler(absolute_local_paths(job).model_dump(mode="json"), prep.model.digest)
    seen = []
    sample = actor.sampler.sample

    def spy(*args, **kwargs):
        seen.append(kwargs.get("layout"))
        return sample(*args, **kwargs)

    actor.sampler.sample = spy
    items = [it for k in range(prep.plan.num_shards) for it in prep.plan.shard_items(k)]
    latents = actor.sample_items(items)
    carried, _ = actor.carried_labels(items)
    layout = None if all(s is None for s in seen) else torch.cat(seen).cpu()
    return latents, [c["boxes"] for c in json.loads(carried)], layout


def _reference_layout(categories: list[str]) -> torch.Tensor:
    """(6, K, 8, 8): per item (frame f = i // 2), its carried boxes recomputed from the source geometry and
    rasterised with the branch's category ids; categories outside the branch left out."""
    maps = []
    for i in range(len(FRAMES) * len(TARGETS)):
        boxes = expected_boxes(FRAMES[i // 2][2], RES)
        placed = [[categories.index(c), *(v / RES for v in xy)] for c, *xy in boxes if c in categories]
        maps.append(rasterise_layout(placed, len(categories), RES)[0])
    return torch.from_numpy(np.stack(maps).astype(np.float32))


def test_guidance_is_refused_without_a_branch_with_the_other_problems(models, source, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SpecError) as err:
        prepare(_job(str(models.bundle), source, out, layout_guidance=4.0, strength=1.5))
    text = str(err.value)
    assert len(err.value.problems) == 2, text
    assert "spec.transfer.layout_guidance is 4 but bundle:" in text and "has no layout branch" in text
    assert "leave spec.transfer.layout_guidance out (null)" in text and "layout.kind controlnet or light" in text
    assert "strength must lie in (0, 1]" in text
    assert not out.exists()
    with pytest.raises(ConfigError, match=r"spec\.transfer\.layout_guidance"):
        _job(str(models.bundle), source, out, layout_guidance=0.5)
    # a branch that knows none of the source's categories would steer with empty layouts
    blind = write_layout_bundle(models.base, tmp_path / "blind", SCENARIOS, ["traffic light"], depth=2)
    with pytest.raises(SpecError, match=r"(?s)layout_guidance: none of the source's box categories \(bus, car, "
                                        r"pedestrian, truck\).*traffic light"):
        prepare(_job(str(blind), source, out, layout_guidance=2.0))


def test_guided_transfer_feeds_the_branch_the_carried_boxes_and_keeps_them(bundles, source, tmp_path, one_thread):
    guided, plain = (_actor_run(_job(str(bundles["boxes"]), source, tmp_path / "o", **extra))
                     for extra in ({"layout_guidance": 4.0}, {}))
    latents, boxes, layout = guided
    assert plain[2] is None  # unguided: the branch stays silent, as before
    want = _reference_layout(BRANCH_CATS)
    assert layout.shape == (6, 3, RES, RES) and torch.equal(layout, want)
    assert layout[4:].sum() == 0 and layout[:4].sum() > 0  # frame c holds only a bus: an empty layout
    assert boxes == plain[1]  # the labels are those of plain transfer, exactly
    for i, item_boxes in enumerate(boxes):
        np.testing.assert_allclose([b["box2d"] for b in item_boxes],
                                   [xy for _, *xy in expected_boxes(FRAMES[i // 2][2], RES)], atol=1e-9)
    diff = (latents - plain[0]).abs().amax(dim=(1, 2, 3))  # (6,)
    assert (diff[:4] > 1e-3).all(), diff  # the trained branch moved the frames it had boxes for


def test_segmentation_branch_reads_the_source_mask_and_ignore_elsewhere(bundles, source, tmp_path, one_thread):
    _, _, layout = _actor_run(_job(str(bundles["segmentation"]), source, tmp_path / "o", layout_guidance=2.0))
    k = len(BRANCH_CATS)
    assert layout.shape == (6, k + len(SEGMENTATION_CLASSES), RES, RES)
    assert torch.equal(layout[:, :k], _reference_layout(BRANCH_CATS))
    seg = layout[:, k:]  # one-hot train ids; a cell of "ignore" is all zero
    road, car = seg[:2, 0], seg[:2, SEGMENTATION_CLASSES.index("car")]  # frame a's mask: road left, car right
    assert torch.equal(seg[:2].sum(1), torch.ones(2, RES, RES))
    assert (car[:, :, -1] == 1).all() and (road[:, :, 0] == 1).all()
    assert torch.equal(car + road, torch.ones(2, RES, RES))
    assert seg[2:].sum() == 0  # frames b and c have no mask: ignore everywhere


def test_guided_transfer_job_carries_labels_and_resumes_byte_identical(bundles, source, ray_session, tmp_path):
    job = _job(str(bundles["boxes"]), source, tmp_path / "whole", layout_guidance=4.0)
    unguided = prepare(_job(str(bundles["boxes"]), source, tmp_path / "u"))
    assert "layout_guidance" not in unguided.document["transfer"]  # plain transfer's spec hash is what it was
    guided = prepare(job)
    assert guided.document["transfer"]["layout_guidance"] == 4.0 and guided.spec_hash != unguided.spec_hash
    summary = run_generate(job)
    assert summary["complete"] and summary["num_items"] == 6
    whole = tmp_path / "whole"
    labels = json.loads((whole / "labels.json").read_text())
    for i, frame in enumerate(labels):
        got = [[b["category"], *(b["box2d"][c] for c in ("x1", "y1", "x2", "y2"))] for b in frame["labels"]]
        want = expected_boxes(FRAMES[i // 2][2], 16)
        assert [g[0] for g in got] == [w[0] for w in want]
        np.testing.assert_allclose([g[1:] for g in got], [w[1:] for w in want], atol=1e-3)

    broken = tmp_path / "broken"
    job = _job(str(bundles["boxes"]), source, broken, layout_guidance=4.0)
    run_generate(job, stop_after_shards=1)
    done = dataset.complete_shards(str(broken))
    assert done
    (broken / "labels.json").unlink(missing_ok=True)
    for k in done - {min(done)}:
        (broken / f"manifest/part-{k:05d}.parquet").unlink()
    second = run_generate(job)
    assert second["complete"] and second["resumed"] and second["shards_written"] == 1
    a, b = _files(str(whole)), _files(str(broken))
    assert _images(a) == _images(b) and a["labels.json"] == b["labels.json"]
    assert pq.read_table(io.BytesIO(a["manifest.parquet"])).equals(pq.read_table(io.BytesIO(b["manifest.parquet"])))
