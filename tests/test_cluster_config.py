"""cluster.yaml passes Ray's own cluster-launcher validation (schema, defaults, docker checks) offline,
and has the shape the docs promise: an idle CPU head, a training GPU group and an inference GPU group."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _prepared(config: dict) -> dict:
    """What `ray up` does before it talks to AWS: merge aws/defaults.yaml, setup commands, docker checks,
    per-type worker bounds; then the schema validation."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_validates_with_ray(raw):
    prepared = _prepared(raw)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] == "head"
    # setup_commands were merged into both node kinds and install the mounted project
    for kind in ("head_setup_commands", "worker_setup_commands"):
        assert any("pip install" in c and "/home/ray/drivedit" in c for c in prepared[kind])


def test_head_runs_no_work_and_groups_are_bounded(raw):
    types = raw["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0}
    assert set(types) == {"head", "gpu_train", "gpu_infer"}
    assert types["gpu_train"]["node_config"]["InstanceType"].split(".")[0] in ("p4d", "p4de", "p5")
    assert types["gpu_infer"]["node_config"]["InstanceType"].split(".")[0] in ("g5", "g6", "g6e")
    for name in ("gpu_train", "gpu_infer"):
        group = types[name]
        assert 0 <= group["min_workers"] <= group["max_workers"] <= raw["max_workers"]
    assert raw["idle_timeout_minutes"] > 0


def test_image_matches_installed_ray_and_storage_is_wired(raw):
    image = raw["docker"]["image"]
    assert image.startswith(f"rayproject/ray:{ray.__version__}-py3"), image
    assert image.endswith("-gpu")
    assert raw["file_mounts"] == {"/home/ray/drivedit": "."}
    head_start = " ".join(raw["head_start_ray_commands"])
    assert "mlflow server" in head_start and "--artifacts-destination s3://" in head_start
    # every Ray process learns the tracking server from the environment set before `ray start`
    assert "MLFLOW_TRACKING_URI" in head_start
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in " ".join(raw["worker_start_ray_commands"])


def test_validation_rejects_a_broken_config(raw):
    typo = copy.deepcopy(raw)
    typo["available_node_types"]["gpu_infer"]["min_worker"] = 1  # misspelt key
    with pytest.raises(Exception, match="min_worker"):
        _prepared(typo)
    too_many = copy.deepcopy(raw)
    too_many["available_node_types"]["gpu_infer"]["min_workers"] = raw["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        _prepared(too_many)
    no_head = copy.deepcopy(raw)
    no_head["head_node_type"] = "missing"
    with pytest.raises(ValueError, match="head_node_type"):
        _prepared(no_head)
