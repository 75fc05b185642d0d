"""The downstream experiment (bench/downstream.py) in its reduced form: every stage wrote what it reports
(real and synthetic datasets, the generator, the detector runs, the MLflow runs, the table), and the two
arms took the same optimizer steps and the same real epochs, read from what the detector runs recorded."""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from drivedit.config.base import ConfigError, load_config
from drivedit.config.downstream import DownstreamBench

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "bench" / "downstream.yaml"


def _scenario(frame: dict) -> str:
    a = frame["attributes"]
    return "night" if a["timeofday"] == "night" else a["weather"]


def test_bad_config_lists_every_problem():
    with pytest.raises(ConfigError) as e:
        load_config(DownstreamBench, CONFIG, ["--scenes.rare", "[night, foggy]", "--detector.real_per_step", "3",
                                              "--detector.seeds", "[1, 1]", "--scenes.common", "[night]",
                                              "--synthetic.mode", "transfer", "--synthetic.start", "inversion",
                                              "--synthetic.sampler", "ddpm"])
    text = str(e.value)
    for part in ("unknown scenarios ['foggy']", "['night'] are both common and rare", "real_per_step (3)",
                 "seeds must be distinct", "synthetic.start inversion needs synthetic.sampler ddim, got ddpm"):
        assert part in text


def test_per_step_counts_give_both_arms_the_same_real_frames(tmp_path):
    import torch

    from drivedit.config.detect import DetectJob
    from drivedit.data.scenes import write_scenes_dataset
    from drivedit.detect.loop import DetectContext, DetectLoop, Edges

    write_scenes_dataset(str(tmp_path / "real"), 6, size=32, seed=0)
    write_scenes_dataset(str(tmp_path / "synth"), 3, size=32, seed=5)

    def loop(train: list[dict]) -> DetectLoop:
        job = DetectJob.model_validate({
            "data": {"train": train, "val": str(tmp_path / "real"), "categories": ["car", "truck", "bus"],
                     "image_size": 32},
            "optim": {"total_steps": 3, "global_batch_size": sum(t["per_step"] for t in train)},
            "run": {"storage_path": str(tmp_path / "runs")}, "tracking": {"enabled": False}})
        lp = DetectLoop(job, DetectContext(run_dir=str(tmp_path / "runs")),
                        Edges(0, 1, torch.device("cpu"), None, lambda *a: None, lambda m, ignore: m))
        lp.load_data()
        return lp

    real = loop([{"uri": str(tmp_path / "real"), "per_step": 4}])
    mixed = loop([{"uri": str(tmp_path / "real"), "per_step": 4}, {"uri": str(tmp_path / "synth"), "per_step": 2}])
    for step in range(3):
        (xr, tr, _), (xm, tm, _) = real.batch(step), mixed.batch(step)
        assert xr.shape == (4, 3, 32, 32) and xm.shape == (6, 3, 32, 32)
        assert torch.equal(xr, xm[:4])  # the same real frames, flipped alike
        assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(tr, tm[:4]))
    assert not torch.equal(real.batch(0)[0], real.batch(1)[0])
    # what the run records: 5 batches of 4 real frames (3 steps + 2 above); 3 batches of 4 real + 2 synthetic
    assert real.data_seen() == [{"uri": str(tmp_path / "real"), "frames": 6, "images": 20, "epochs": 20 / 6}]
    assert [(s["images"], s["frames"], s["epochs"]) for s in mixed.data_seen()] == [(12, 6, 2.0), (6, 3, 2.0)]
    with pytest.raises(ValueError, match="sum to 6, but optim.global_batch_size is 4"):
        DetectJob.model_validate({"data": {"train": [{"uri": "a", "per_step": 4}, {"uri": "b", "per_step": 2}]},
                                  "optim": {"global_batch_size": 4}})
    with pytest.raises(ValueError, match="given for some datasets and not others"):
        DetectJob.model_validate({"data": {"train": [{"uri": "a", "per_step": 4}, {"uri": "b"}]},
                                  "optim": {"global_batch_size": 4}})


def _run(arm: str, seed: int, ap50: float, night: float, snowy: float) -> dict:
    return {"arm": arm, "seed": seed, "steps": 10, "real_epochs": 1.0, "images_per_step": [8, 4],
            "metrics": {"AP50": ap50, "per_scenario": {"night": {"AP50": night}, "snowy": {"AP50": snowy}}}}


def test_control_arms_are_compared_with_both_other_arms():
    from drivedit.eval.downstream import compare, control_arms, control_table, fairness_table

    runs = []
    for seed, (real, mixed, more) in enumerate([(0.30, 0.36, 0.31), (0.32, 0.35, 0.35), (0.28, 0.36, 0.30)]):
        runs += [_run("real", seed, real, real, real), _run("mixed", seed, mixed, mixed + 0.1, mixed),
                 _run("control-more-real", seed, more, more, more)]
    assert control_arms(runs) == ["control-more-real"]
    keys = ["AP50", "group/night,snowy/AP50"]
    vs_real = compare(runs, keys, "real", "control-more-real")
    mixed_vs = compare(runs, keys, "control-more-real", "mixed")
    assert vs_real[0].diffs == pytest.approx([1.0, 3.0, 2.0])  # control - real, AP points
    assert mixed_vs[1].diffs == pytest.approx([10.0, 5.0, 11.0])  # mixed - control on the rare group
    d = vs_real[0].as_dict()
    assert d["real"] == pytest.approx([30.0, 32.0, 30 - 2.0]) and d["control-more-real_mean"] == pytest.approx(32.0)
    assert d["diff"] == pytest.approx(2.0) and d["diff_ci95"][0] < 2.0 < d["diff_ci95"][1]
    table = control_table([("all AP50", vs_real[0], mixed_vs[0])], "control-more-real", 3)
    # sd of 31, 35, 30 = sqrt(7); t(0.975, 2) = 4.303: +2 +- 4.303 x 1 / sqrt(3), +3.7 +- 4.303 x 3.21 / sqrt(3)
    assert "| all AP50 | 32.0 ± 2.6 | +2.0 [-0.5, +4.5] | +3.7 [-4.3, +11.7] |" in table
    order = [line.split(" | ")[0] for line in fairness_table(runs).splitlines()[2:5]]
    assert order == ["| real", "| mixed", "| control-more-real"]
    with pytest.raises(ValueError, match="control-rare-real seed 0"):
        compare(runs, keys, "real", "control-rare-real")


def test_control_arms_draw_more_real_frames_on_the_shared_stream(tmp_path):
    sys.path.insert(0, str(REPO))
    from bench.downstream import RARE_LABELS, arm_name, detect_job

    cfg = load_config(DownstreamBench, CONFIG, ["--detector.controls", "[more-real, rare-real]",
                                                "--detector.seeds", "[3]"])
    jobs = {arm: detect_job(cfg, tmp_path, arm, 3, [], "sqlite:///x.db")
            for arm in ("real", "control-more-real", "control-rare-real")}
    real, more, rare = ([(t.uri, t.per_step, t.labels_file) for t in jobs[a].data.train] for a in jobs)
    scenes = str(tmp_path / "scenes")
    assert real == [(scenes, 8, None)]
    assert more == [(scenes, 8, None), (scenes, 4, None)] and rare == [(scenes, 8, None), (scenes, 4, RARE_LABELS)]
    assert jobs["control-rare-real"].optim.global_batch_size == 12 and jobs["real"].optim.seed == 3
    assert jobs["control-rare-real"].run.name == arm_name(cfg, "control-rare-real", 3) == "control-rare-real-x4-seed3"
    with pytest.raises(ConfigError, match="detector.controls must be distinct"):
        load_config(DownstreamBench, CONFIG, ["--detector.controls", "[more-real, more-real]"])
    with pytest.raises(ConfigError, match="detector.controls"):
        load_config(DownstreamBench, CONFIG, ["--detector.controls", "[fewer-real]"])


def test_a_guidance_interval_names_its_own_synthetic_dataset():
    sys.path.insert(0, str(REPO))
    from bench.downstream import synthetic_name

    every = load_config(DownstreamBench, CONFIG)
    limited = load_config(DownstreamBench, CONFIG, ["--synthetic.guidance_interval", "[0.28, 3]"])
    assert every.synthetic.guidance_interval is None and limited.synthetic.guidance_interval == (0.28, 3.0)
    assert "-gi" not in synthetic_name(every, "layouts")  # the recorded arms' folders keep their names
    assert synthetic_name(limited, "layouts") == synthetic_name(every, "layouts").replace("-n", "-gi0.28-3-n", 1)


@pytest.mark.slow
@pytest.mark.e2e
def test_reduced_experiment_writes_every_stage_and_keeps_the_arms_fair(tmp_path, ray_session):
    from mlflow.tracking import MlflowClient

    sys.path.insert(0, str(REPO))
    from bench.downstream import TABLE_FILE, run_downstream

    cfg = load_config(DownstreamBench, CONFIG, [
        "--out", str(tmp_path / "ds"), "--scenes.common_per_scenario", "4", "--scenes.heldout_per_scenario", "2",
        "--generator.steps", "2", "--generator.overrides",
        "{optim.global_batch_size: 8, data.probe_rows: 16, sampling.steps: 2}",
        "--synthetic.mode", "both", "--synthetic.per_scenario", "1", "--synthetic.sampler_steps", "2",
        "--detector.steps", "2", "--detector.real_per_step", "2", "--detector.synthetic_per_step", "2",
        "--detector.num_workers", "1", "--detector.seeds", "[0]"])
    summary = run_downstream(cfg)
    out = Path(summary["out"])

    # 1. real data: the rare scenarios short in training, every scenario held out
    train = json.loads((out / "scenes" / "labels.json").read_text())
    counts = Counter(_scenario(f) for f in train)
    assert counts == {"clear": 4, "overcast": 4, "partly cloudy": 4, "rainy": 4, "night": 1, "snowy": 1}
    assert summary["scenes"]["train_frames"] == len(train) == 18
    held = Counter(_scenario(f) for f in json.loads((out / "heldout" / "labels.json").read_text()))
    assert held == {s: 2 for s in ("clear", "overcast", "partly cloudy", "rainy", "night", "snowy")}
    assert all((out / "scenes" / "images" / f["name"]).is_file() for f in train)
    # 2. the generator: a bundle with a layout branch, fine-tuned on the training frames' shards
    gen = summary["generator"]
    bundle = json.loads((Path(gen["bundle_uri"]) / "bundle.json").read_text())
    assert bundle["spec"]["layout"]["kind"] == "light" and gen["step"] == 2
    # 3. synthetic frames of the rare scenarios only, by both modes, with boxes
    assert [s["mode"] for s in summary["synthetic"]] == ["layouts", "transfer"]
    for s in summary["synthetic"]:
        frames = json.loads((Path(s["uri"]) / "labels.json").read_text())
        assert len(frames) == s["images"] == 2  # 1 source frame x 2 rare scenarios
        assert {_scenario(f) for f in frames} == {"night", "snowy"}
        assert all((Path(s["uri"]) / "images" / f["name"]).is_file() for f in frames)
    # 4. detector runs: what each recorded (result.json, written by the detect job), not the config
    results = {}
    for record in summary["runs"]:
        arm, run_dir = record["arm"], Path(record["run_dir"])
        assert run_dir.parent == out / "detect" and record["seed"] == 0
        results[arm] = json.loads((run_dir / "result.json").read_text())
        assert (run_dir / "detector").is_dir() and (run_dir / "scores" / "metrics.json").is_file()
    real, mixed = results["real"], results["mixed"]
    assert real["step"] == mixed["step"] == 2
    assert len(real["data_seen"]) == 1 and len(mixed["data_seen"]) == 3
    assert real["data_seen"][0] == mixed["data_seen"][0]  # same real dataset, images and epochs
    assert real["data_seen"][0]["images"] == 2 * 2 and real["data_seen"][0]["epochs"] == pytest.approx(4 / 18)
    assert [s["images"] for s in mixed["data_seen"][1:]] == [2, 2]  # one synthetic image per step from each
    # the table and the records it was made from
    table = (out / TABLE_FILE).read_text()
    assert "| real | 0 | 2 | 2 | 0.222 |" in table and "| mixed | 0 | 2 | 2 + 1 + 1 | 0.222 |" in table
    saved = json.loads((out / "downstream.json").read_text())
    assert "night AP50" in table and "all, small objects AP" in table
    assert ("**met**" in table) == saved["verdict"]["met"] and ("**not met**" in table) != saved["verdict"]["met"]
    rare = saved["comparison"][0]
    assert rare["key"] == "group/night,snowy/AP50"
    metrics = json.loads((out / "detect" / "real-seed0" / "scores" / "metrics.json").read_text())
    assert sorted(p.name for p in (out / "detect").iterdir() if p.is_dir()) == [
        "mixed-layouts-lg4-n1-ddim2-g4_transfer-s0.7-lg4-inv-n1-ddim2-g4-x2-ign19.2-nobg-seed0", "real-seed0"]
    night, snowy = metrics["per_scenario"]["night"]["AP50"], metrics["per_scenario"]["snowy"]["AP50"]
    assert rare["real"] == [pytest.approx(100 * (night + snowy) / 2)]
    # one MLflow experiment: the generator, the two generate jobs, each detector run (tagged) and the table
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    exp = client.get_experiment_by_name(cfg.experiment)
    runs = client.search_runs([exp.experiment_id])
    tags = {(r.data.tags.get("drivedit.downstream.arm"), r.data.tags.get("drivedit.downstream.seed")) for r in runs}
    assert {("real", "0"), ("mixed", "0")} <= tags
    kinds = Counter(r.data.tags.get("drivedit.job") for r in runs)
    assert kinds["detect"] == 2 and kinds["downstream"] == 1 and len(runs) >= 6
