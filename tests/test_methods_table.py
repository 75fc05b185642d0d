"""bench/methods_table.py, reduced: two methods, one seed, a few steps, through the same code as the full table."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.e2e

STEPS, BATCH = 3, 8


@pytest.fixture(scope="module")
def table_run(tmp_path_factory):
    from bench import methods_table

    d = tmp_path_factory.mktemp("methods-table")
    args = ["--data", str(d / "data"), "--out", str(d / "out"), "--num-scenes", "36", "--classifier-steps", "4",
            "--arms", "lora", "bitfit-published", "--seeds", "0", "--lrs", "2e-3", "--steps", str(STEPS),
            "--batch", str(BATCH), "--per-scenario", "3", "--sampler-steps", "2", "--timing-steps", "0",
            "--jobs", "0", "--device", "cpu"]
    assert methods_table.main(["run", *args]) == 0
    rows = [json.loads(x) for x in (d / "out" / "results.jsonl").read_text().splitlines()]
    return d, rows


def test_every_arm_trained_and_saw_the_same_steps_and_images(table_run):
    _, rows = table_run
    assert [r.get("error") for r in rows] == [None, None]
    by = {r["arm"]: r for r in rows}
    assert set(by) == {"lora", "bitfit-published"}
    for r in rows:
        assert r["steps"] == STEPS and r["images_seen"] == STEPS * BATCH and r["global_batch"] == BATCH
        assert r["settings"]["steps"] == STEPS
        assert r["overall"]["num_fake"] == 3 * 6 and 0.0 <= r["overall"]["condition_accuracy"] <= 1.0
        assert r["overall"]["fid"] > 0 and r["overall"]["fid_vae"] > 0 and r["heldout_mse"] > 0
        assert set(r["per_scenario"]) == {"clear", "overcast", "partly cloudy", "rainy", "snowy", "night"}
    # lora trains its scenario table and the rows moved; bitfit as published keeps them at their init
    assert by["lora"]["table_trained"] and by["lora"]["table_max_change"] > 0
    assert not by["bitfit-published"]["table_trained"] and by["bitfit-published"]["table_max_change"] == 0
    assert by["lora"]["trainable_params"] > by["bitfit-published"]["trainable_params"]


def test_report_and_resume(table_run):
    from bench import methods_table

    d, rows = table_run
    text = (d / "out" / "table.md").read_text()
    assert "| lora | 0.002 | 1 |" in text and "| bitfit-published | 0.002 | 1 |" in text
    # a rerun finds every arm done and trains nothing again
    args = ["--data", str(d / "data"), "--out", str(d / "out"), "--arms", "lora", "bitfit-published", "--seeds", "0",
            "--lrs", "2e-3", "--steps", str(STEPS), "--batch", str(BATCH), "--timing-steps", "0", "--jobs", "0"]
    assert methods_table.main(["run", *args]) == 0
    assert len((d / "out" / "results.jsonl").read_text().splitlines()) == len(rows)
