"""MLflow for every job: one run per job execution, owned by us rather than by a Ray callback.

- The run lives as long as the job, across Ray Train restarts and reruns: its id is stored in
  `mlflow_run.json` beside the checkpoints, and a job that finds the file logs into that run again.
- Params are the flattened job config with anything that looks like a secret left out.
- Metrics and images come from rank 0 only (the caller decides; `TrackedRun` is a thin, picklable handle that
  any process can rebuild from the tracking URI and run id).
- Fine-tuned bundles become versions of a registered model; `download_registered_bundle` brings a
  `models:/NAME/VERSION` back to a local directory for `generate` and `serve`.

Tracking URI: `tracking.tracking_uri` when set (an MLflow server: `http://host:5000`), else the
embedded default, an SQLite file `mlflow.db` in the job's storage directory with artifacts in
`mlartifacts/` beside it, so `mlflow ui --backend-store-uri sqlite:///runs/finetune/mlflow.db`
shows every run (and every registered version) of that storage directory.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drivedit import storage
from drivedit.config.base import flatten

RUN_ID_FILE = "mlflow_run.json"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
_MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+|latest)|@(?P<alias>[\w-]+))$")


# ----------------------------------------------------------------------------- params


def config_params(config: dict) -> dict[str, str]:
    """Flattened config as MLflow params: secret-looking keys dropped, credentials in URIs masked, values as
    strings within MLflow's length limit."""
    params: dict[str, str] = {}
    for key, value in flatten(config).items():
        if storage.SECRET_NAME.search(key.rsplit(".", 1)[-1]):
            continue
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        params[key] = storage.redact(text)[:_MAX_PARAM_VALUE]  # URIs inside list values too
    return params


# ----------------------------------------------------------------------------- tracking URIs


def local_path_of(uri: str) -> Path | None:
    """A local directory for plain paths and file:// URIs, None for remote storage."""
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if "://" in uri:
        return None
    return Path(uri)


def embedded_tracking_uri(storage_dir: str) -> str:
    """sqlite:///<abs storage dir>/mlflow.db; the storage directory must be local."""
    path = local_path_of(storage_dir)
    if path is None:
        raise ValueError(f"the embedded MLflow store needs a local directory, not {storage_dir}; "
                         "set tracking.tracking_uri to an MLflow server")
    path = path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / DB_FILE}"


def absolute_tracking_uri(uri: str | None) -> str | None:
    """An SQLite store given relative to this directory (sqlite:///runs/mlflow.db) made absolute; other URIs
    unchanged. Ray workers and replicas run in other directories."""
    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{storage.absolute(uri[len('sqlite:///'):])}"
    return uri


def resolve_tracking_uri(tracking_uri: str | None, storage_dir: str) -> str:
    return tracking_uri or embedded_tracking_uri(storage_dir)


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


# ----------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class TrackedRun:
    """A handle on one MLflow run. Plain data, so it travels to Ray workers inside a config dict."""

    tracking_uri: str
    run_id: str
    experiment_id: str
    resumed: bool = False

    @property
    def client(self):
        return _client(self.tracking_uri)

    def to_dict(self) -> dict:
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id, "experiment_id": self.experiment_id,
                "resumed": self.resumed}

    @classmethod
    def from_dict(cls, d: dict) -> "TrackedRun":
        return cls(d["tracking_uri"], d["run_id"], d["experiment_id"], bool(d.get("resumed", False)))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000], synchronous=True)

    def log_params(self, params: dict[str, str]) -> list[str]:
        """Log params the run does not have yet. A resumed run cannot change a param (MLflow forbids
        it), so changed values are returned and recorded in the `drivedit.changed_params` tag instead."""
        from mlflow.entities import Param

        params = {k: storage.redact(v)[:_MAX_PARAM_VALUE] for k, v in params.items()}
        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i:i + 100], synchronous=True)
        if changed:
            self.client.set_tag(self.run_id, "drivedit.changed_params",
                                ", ".join(f"{k}={params[k]}" for k in changed)[:_MAX_PARAM_VALUE])
        return changed

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, storage.redact(str(v)))

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_image(self, key: str, image, step: int) -> None:
        """An image (a PNG path, a PIL image or a uint8 (H, W, 3) array) under `key` at `step`: the MLflow UI's
        image panel shows every step of a key with a step slider."""
        from PIL import Image

        if isinstance(image, (str, Path)):
            with Image.open(image) as img:
                image = img.convert("RGB")
        # synchronous: the image is in the store when this returns (a job may end right after)
        self.client.log_image(self.run_id, image, key=key, step=int(step), synchronous=True)

    def logged_images(self, key: str) -> dict[int, str]:
        """step -> artifact path of the full-resolution images logged under `key` (what the UI's slider shows)."""
        prefix = f"images/{key.replace('/', '~')}+step+"
        out = {}
        for f in self.client.list_artifacts(self.run_id, "images"):
            if f.path.startswith(prefix) and f.path.endswith(".png"):
                out[int(f.path[len(prefix):].split("+", 1)[0])] = f.path
        return out

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, json.loads(storage.redact(json.dumps(data, default=str))), artifact_file)

    def artifact_uri(self, artifact_path: str = "") -> str:
        root = self.client.get_run(self.run_id).info.artifact_uri
        return f"{root}/{artifact_path}" if artifact_path else root

    def list_artifacts(self, path: str | None = None) -> list[str]:
        return [f.path for f in self.client.list_artifacts(self.run_id, path)]

    def register(self, artifact_path: str, model_name: str, description: str | None = None,
                 tags: dict[str, str] | None = None) -> str:
        """Register the run's artifact directory as a new version of `model_name`; returns
        `models:/NAME/VERSION`. The directory need not be an MLflow Model: the version's source
        points straight at the logged files (an adapter bundle)."""
        from mlflow.exceptions import MlflowException

        client = self.client
        try:
            client.get_registered_model(model_name)
        except MlflowException:
            client.create_registered_model(model_name, description=description)
        version = client.create_model_version(model_name, source=self.artifact_uri(artifact_path),
                                              run_id=self.run_id, tags=tags or {}, description=description)
        return f"models:/{model_name}/{version.version}"

    def end(self, status: str = "FINISHED") -> None:
        # MLflow prints "View run ... at: <tracking URI>/#/..." for a tracking server: print it redacted
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            self.client.set_terminated(self.run_id, status=status)
        if printed.getvalue():
            sys.stdout.write(storage.redact(printed.getvalue()))


def start_run(tracking_uri: str, experiment: str, run_name: str, storage_dir: str | None = None,
              params: dict[str, str] | None = None, tags: dict[str, str] | None = None) -> TrackedRun:
    """Start a run, or reopen the one whose id is stored in `storage_dir/mlflow_run.json`.

    `storage_dir` is the job's run directory (local or s3://): the id file makes a rerun of the
    same job, and every Ray Train restart, log into the same run. With the embedded SQLite store
    the experiment keeps its artifacts beside the database.
    """
    from mlflow.exceptions import MlflowException

    stored = _read_run_id(storage_dir) if storage_dir else None
    # the id file holds the tracking URI redacted (it is compared, never used to connect)
    if stored is not None and storage.redact(stored.get("tracking_uri", "?")) != storage.redact(tracking_uri):
        raise ValueError(
            f"{storage.redact(storage_dir)} belongs to an MLflow run in {storage.redact(stored.get('tracking_uri', '?'))}, "
            f"not {storage.redact(tracking_uri)}; rerun with the same tracking.tracking_uri or a new run.name")
    client = _client(tracking_uri)
    if stored is not None:
        try:
            run = client.get_run(stored["run_id"])
        except MlflowException:
            run = None
        if run is not None and run.info.lifecycle_stage != "deleted":
            client.update_run(run.info.run_id, status="RUNNING")
            tracked = TrackedRun(tracking_uri, run.info.run_id, run.info.experiment_id, resumed=True)
            if params:
                tracked.log_params(params)
            if tags:
                tracked.set_tags(tags)
            return tracked
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        location = None
        if tracking_uri.startswith("sqlite:///"):
            location = (Path(tracking_uri[len("sqlite:///"):]).parent / ARTIFACTS_DIR).as_uri()
        try:
            experiment_id = client.create_experiment(experiment, artifact_location=location)
        except MlflowException:  # created concurrently by another job
            experiment_id = client.get_experiment_by_name(experiment).experiment_id
    else:
        if exp.lifecycle_stage == "deleted":
            raise ValueError(f"MLflow experiment {experiment!r} is deleted; restore it or choose another name")
        experiment_id = exp.experiment_id
    run = client.create_run(experiment_id, run_name=run_name,
                            tags={k: storage.redact(str(v)) for k, v in (tags or {}).items()})
    tracked = TrackedRun(tracking_uri, run.info.run_id, experiment_id)
    if params:
        tracked.log_params(params)
    if storage_dir:
        storage.write_text_atomic(storage.join(storage_dir, RUN_ID_FILE), json.dumps(
            {"run_id": tracked.run_id, "experiment_id": experiment_id, "tracking_uri": storage.redact(tracking_uri)},
            indent=1))
    return tracked


def _read_run_id(storage_dir: str) -> dict | None:
    uri = storage.join(storage_dir, RUN_ID_FILE)
    if not storage.exists(uri):
        return None
    return json.loads(storage.read_bytes(uri))


def stored_run(storage_dir: str) -> dict | None:
    """What `mlflow_run.json` of a run directory says (run_id, experiment_id, tracking_uri), or None;
    `drivedit eval` logs into the run a generated dataset records."""
    return _read_run_id(storage_dir)


# ----------------------------------------------------------------------------- registry


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """models:/NAME/VERSION | models:/NAME/latest | models:/NAME@alias -> (name, version, alias)."""
    m = _MODELS_URI.match(uri)
    if not m:
        raise ValueError(f"{uri!r} is not a registered-model URI; write models:/NAME/VERSION (e.g. models:/drivedit/3), "
                         "models:/NAME/latest or models:/NAME@alias")
    return m.group("name"), m.group("version"), m.group("alias")


def download_registered_bundle(uri: str, dst: str | Path | None = None, tracking_uri: str | None = None) -> Path:
    """Download the adapter bundle of a registered model version to a local directory and return it.

    `tracking_uri` defaults to $MLFLOW_TRACKING_URI. The directory holds `bundle.json` and
    `adapter.safetensors` as the fine-tuning job wrote them.
    """
    return download_registered(uri, "bundle.json", "a drivedit adapter bundle", dst, tracking_uri)


def download_registered(uri: str, marker_file: str, what: str, dst: str | Path | None = None,
                        tracking_uri: str | None = None) -> Path:
    """Download the files of a registered model version (`models:/NAME/VERSION`, `/latest`, `@alias`) to a
    local directory and return it; `marker_file` must be among them (it says the version is `what`)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    name, version, alias = parse_models_uri(uri)
    client = _client(tracking_uri)
    try:
        if alias:
            mv = client.get_model_version_by_alias(name, alias)
        elif version == "latest":
            versions = client.search_model_versions(f"name='{name}'")
            if not versions:
                raise MlflowException(f"no versions of {name}")
            mv = max(versions, key=lambda v: int(v.version))
        else:
            mv = client.get_model_version(name, version)
    except MlflowException as e:
        try:
            known = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
            hint = f"registered versions of {name}: {known}" if known else f"no model named {name!r} is registered"
        except MlflowException:
            hint = "the registry could not be listed"
        raise ValueError(f"cannot resolve {uri} in {storage.redact(tracking_uri)} ({hint}): {e.message}") from None
    dst = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix=f"model-{name}-v{mv.version}-"))
    dst.mkdir(parents=True, exist_ok=True)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(dst),
                                                     tracking_uri=tracking_uri))
    if not (local / marker_file).is_file():
        raise ValueError(f"{uri} (source {mv.source}) holds no {marker_file}: it is not {what}")
    return local
