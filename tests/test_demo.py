"""The demo in its reduced size, as `make demo` runs it: every artifact it claims to write exists and
is consistent (datasets, shards, bundle, MLflow run and registered version, generated set, served
samples, evaluation)."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_small_demo_writes_everything_it_reports(tmp_path, ray_session):
    import mlflow
    from mlflow.tracking import MlflowClient

    from drivedit.demo import SIZES, run_demo

    out = tmp_path / "demo"
    summary = run_demo(out, size="small")
    size = SIZES["small"]

    # 1. the procedural real dataset
    labels = json.loads((out / "scenes" / "labels.json").read_text())
    assert len(labels) == size.num_scenes
    # 2. shards: every kept frame once
    enc = summary["encode"]
    assert enc["encoded"] == enc["rows_total"] > 0
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in (out / "shards").glob("shard-*.parquet"))
    assert rows == enc["rows_total"]
    # 3. fine-tune: bundle files, checkpoint at the final step, MLflow run with params/metrics/artifacts
    ft = summary["finetune"]
    scenarios = ft["scenarios"]
    assert scenarios == ["clear", "overcast", "partly cloudy", "rainy", "snowy", "night"]
    assert ft["step"] == size.finetune_steps
    bundle = Path(ft["bundle_uri"])
    assert (bundle / "adapter.safetensors").is_file() and (bundle / "bundle.json").is_file()
    info = json.loads((bundle / "bundle.json").read_text())
    assert info["scenarios"] == scenarios and info["spec"]["method"] == "driveditfit"
    client = MlflowClient(tracking_uri=ft["tracking_uri"])
    run = client.get_run(ft["mlflow_run_id"])
    assert run.data.params["method.name"] == "driveditfit"
    assert "loss" in run.data.metrics
    name, version = ft["model_uri"][len("models:/"):].split("/")
    mv = client.get_model_version(name, version)
    assert mv.run_id == ft["mlflow_run_id"]
    grids = sorted(Path(ft["run_dir"]).rglob("*.png"))
    assert grids, "no sample grid was written"
    # 4. the generated dataset: images, labels and manifest agree
    gen = summary["generate"]
    total = size.per_scenario * len(scenarios)
    assert gen["images_written"] == total
    pngs = sorted((out / "synthetic" / "images").rglob("*.png"))
    assert len(pngs) == total
    with Image.open(pngs[0]) as im:
        assert im.size == (128, 128)
    gen_labels = json.loads((out / "synthetic" / "labels.json").read_text())
    assert sorted(f["attributes"]["weather"] if f["attributes"]["timeofday"] != "night" else "night"
                  for f in gen_labels) == sorted(s for s in scenarios for _ in range(size.per_scenario))
    manifest = pq.read_table(out / "synthetic" / "manifest.parquet").to_pydict()
    assert sorted(manifest["index"]) == list(range(total))
    # drawn from the layouts of the first real frames: each one's boxes under every scenario, in labels.json
    real = {f["name"]: f for f in labels[:size.per_scenario]}
    assert sorted(manifest["source_frame"]) == sorted(n for n in real for _ in scenarios)
    by_name = {f["name"]: f for f in gen_labels}
    for name, source in zip(manifest["name"], manifest["source_frame"]):
        boxes = [lab["category"] for lab in by_name[name].get("labels", [])]
        assert sorted(boxes) == sorted(lab["category"] for lab in real[source].get("labels", [])
                                       if lab["category"] in info["spec"]["layout"]["box_categories"])
    assert Path(gen["preview"]).is_file()
    # 5. one served PNG per scenario
    served = summary["serve"]["samples"]
    assert sorted(served) == sorted(scenarios)
    for path in served.values():
        with Image.open(path) as im:
            assert im.size == (128, 128)
    assert summary["serve"]["health"]["model_version"] == ft["model_uri"]
    # ... each drawn to the first real frame's boxes, which come back as its labels
    layout = summary["serve"]["layout"]
    assert layout["boxes"] and summary["serve"]["layout_frame"] == labels[0]["name"]
    for scenario, got in summary["serve"]["labels"].items():
        assert [(g["category"], g["box2d"]["x1"], g["box2d"]["y2"]) for g in got] == [
            (b["category"], pytest.approx(b["x1"]), pytest.approx(b["y2"])) for b in layout["boxes"]]
    # 6. evaluation report per scenario
    report = json.loads((out / "eval" / "report.json").read_text())
    assert set(report["per_scenario"]) == set(scenarios)
    assert report["overall"]["num_fake"] == total
    assert report["classifier"]["heldout_accuracy"] > 0.5
    written = json.loads((out / "demo.json").read_text())
    steps = written["step_seconds"]  # where the minutes went, step by step, in the order they started
    assert list(steps) == ["scenes", "encode", "fine-tune", "generate", "serve", "eval"]
    assert written["side_by_side"] == [["serve", "eval"]]
    # serve and eval overlap: the demo took at least the one after the other of the rest and the longer of the two
    one_after_another = sum(v for k, v in steps.items() if k not in ("serve", "eval"))
    assert all(v > 0 for v in steps.values())
    assert one_after_another + max(steps["serve"], steps["eval"]) <= written["seconds"] + 0.5
    started = written["step_started"]
    one_by_one = ["scenes", "encode", "fine-tune", "generate", "serve"]
    for before, after in zip(one_by_one, one_by_one[1:]):
        assert started[before] + steps[before] <= started[after] + 0.1
    assert abs(started["eval"] - started["serve"]) < 1.0  # ... and those two started together
