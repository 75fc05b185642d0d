"""The sampling endpoint: a Ray Serve deployment with a FastAPI ingress.

One deployment holds the model. Each replica loads it once (onto its GPU when it has one), builds its
FastAPI app from the model's vocabulary and the operator's bounds, and answers:

- `POST /v1/samples`: image/png for one image, JSON with base64 PNGs otherwise. Concurrent requests
  are gathered by `@serve.batch` (bounded in images and in wait time) and those sharing sampler
  settings are drawn in one sampler call; `X-Batch-Size` tells each caller how many images its call held.
- `GET /v1/scenarios`, `GET /healthz`, and `/openapi.json` with every field's bounds.

Back-pressure is Serve's: a replica takes at most `max_ongoing_requests`, the proxy queues at most
`max_queued_requests` more, and everything beyond gets 503 at once.

Entry points: `build_app(cfg)` (an Application for `serve.run`), `app_builder(args)` (the `import_path`
of configs/serve/serve_config.yaml for `serve deploy`), `main(argv)` for `drivedit serve --config FILE`.
"""
from __future__ import annotations

from drivedit.config.base import field_help_lines
import argparse
import asyncio
import logging
import os
import secrets
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from ray import serve
from ray.serve import Application

from drivedit import storage, tracking
from drivedit.config.base import ConfigError, load_config, validate_config
from drivedit.config.serve import ServeApp
from drivedit.logs import setup_logging
from drivedit.raylocal import connect_ray
from drivedit.serve.engine import SampleJob, SampleResult, count_images

logger = logging.getLogger("drivedit.serve")

RANDOM_SEED_RANGE = 2**31  # seeds drawn for requests that give none


@serve.deployment
@serve.ingress()
class DiTSamplerDeployment:
    """One replica: the model, a one-thread executor that owns it, and the HTTP routes."""

    async def __init__(self, config: dict):
        # Re-validated here: a replica trusts nothing but its own copy of the config.
        self.cfg = validate_config(ServeApp, config, "serve replica config")
        setup_logging()
        # One thread owns the model: sampler calls never overlap, and the event loop keeps answering
        # /healthz, validation errors and new arrivals while a batch is on the device.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dit-sampler")
        loop = asyncio.get_running_loop()
        self.served = await loop.run_in_executor(self._executor, _load_on_model_thread, self.cfg)
        b = self.cfg.batching
        self._batched.set_max_batch_size(b.max_batch_size)
        self._batched.set_batch_wait_timeout_s(b.batch_wait_timeout_s)
        logger.info("serving %s on %s (%d scenarios, %d px)", self.served.version, self.served.device,
                    len(self.served.scenarios), self.served.image_size)

    def __serve_build_asgi_app__(self):
        from drivedit.serve.http import create_http_app

        return create_http_app(self)

    async def sample(self, job: SampleJob) -> SampleResult:
        if self.cfg.batching.enabled:
            return await self._batched(job)
        loop = asyncio.get_running_loop()
        return (await loop.run_in_executor(self._executor, self.served.engine.run, [job]))[0]

    # max_batch_size counts images (batch_size_fn), and is reset from the config in __init__.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05, batch_size_fn=count_images)
    async def _batched(self, jobs: list[SampleJob]) -> list[SampleResult]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.served.engine.run, jobs)

    def new_seed(self) -> int:
        return secrets.randbelow(RANDOM_SEED_RANGE)


def _load_on_model_thread(cfg: ServeApp):
    import torch

    from drivedit.serve.loading import load_served_model, pick_device

    if pick_device(cfg.model.device).type == "cpu":
        # as many torch threads as CPUs reserved: replicas sharing a node must not oversubscribe it
        torch.set_num_threads(max(1, int(cfg.deployment.cpus_per_replica)))
    return load_served_model(cfg)


def resolve_gpus(setting: float | str) -> float:
    """`auto`: one GPU per replica when the cluster has GPUs (asked of Ray when connected, else of torch)."""
    if setting != "auto":
        return float(setting)
    import ray

    if ray.is_initialized():
        return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


def absolute_local_refs(cfg: ServeApp) -> ServeApp:
    """Relative local paths (model ref, SQLite tracking store, codec dir) made absolute here, where they were
    written: a replica's working directory is not necessarily this one."""
    cfg = cfg.model_copy(deep=True)
    m = cfg.model
    m.ref = storage.absolute(m.ref, only_if_exists=True)  # a hub id stays as it is
    m.tracking_uri = tracking.absolute_tracking_uri(m.tracking_uri)
    if m.codec is not None and m.codec.source:
        m.codec.source = storage.absolute(m.codec.source, only_if_exists=True)
    return cfg


def build_app(cfg: ServeApp) -> Application:
    """The Serve application for `cfg`: one deployment, its options all from the config."""
    cfg = absolute_local_refs(cfg)
    d = cfg.deployment
    autoscaling = {
        "min_replicas": d.min_replicas,
        "max_replicas": d.max_replicas,
        "initial_replicas": d.initial_replicas if d.initial_replicas is not None else max(d.min_replicas, 1),
        "target_ongoing_requests": d.target_ongoing_requests,
        "upscale_delay_s": d.upscale_delay_s,
        "downscale_delay_s": d.downscale_delay_s,
    }
    deployment = DiTSamplerDeployment.options(
        name=d.name,
        max_ongoing_requests=d.max_ongoing_requests,
        max_queued_requests=d.max_queued_requests,
        autoscaling_config=autoscaling,
        ray_actor_options={"num_cpus": d.cpus_per_replica, "num_gpus": resolve_gpus(d.gpus_per_replica)},
    )
    return deployment.bind(cfg.model_dump(mode="json"))


def model_problem(cfg: ServeApp) -> str | None:
    """Why the configured model cannot be served, found by loading it here on the CPU as a replica would
    (a checkpoint that is not plain tensors, keys or shapes that do not fit, a vocabulary or codec that does
    not match, a guidance the model cannot do); None when it loads. Checked before Ray starts: inside a
    replica the same message ends up in the Serve controller's logs and the command only says the
    deployment failed."""
    from drivedit.serve.loading import load_served_model

    on_cpu = absolute_local_refs(cfg)
    on_cpu.model.device = "cpu"
    try:
        load_served_model(on_cpu)
    except (ValueError, OSError, RuntimeError) as e:  # FileNotFoundError and CheckpointMismatchError included
        return f"model.ref {cfg.model.ref}: {e}"
    return None


def config_checks(sections) -> list[str]:
    """`model_problem` of a valid model section (load_config's `checks`: listed with the field errors)."""
    if sections.model is None:
        return []
    sampler = sections.sampler.model_dump(mode="json") if sections.sampler is not None else {}
    try:
        cfg = ServeApp.model_validate({"model": sections.model.model_dump(mode="json"), "sampler": sampler})
    except ValueError:  # the sections disagree: the field errors already say so
        return []
    problem = model_problem(cfg)
    return [problem] if problem else []


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_args(args: dict) -> ServeApp:
    """`args` of a Serve config file: an optional `config` (a ServeApp YAML path) and ServeApp sections on top."""
    args = dict(args or {})
    path = args.pop("config", None)
    raw: dict = {}
    source = "serve config args"
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(source, [f"config: file not found: {p} (relative paths resolve against "
                                       f"{Path.cwd()}; ship it in the runtime_env working_dir)"])
        raw = yaml.safe_load(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(str(p), ["the top level must be a mapping of sections"])
        source = f"{p} + serve config args"
    return validate_config(ServeApp, _deep_merge(raw, args), source)


def app_builder(args: dict) -> Application:
    """`import_path: drivedit.serve.app:app_builder` in a Serve config file (`serve deploy`)."""
    return build_app(config_from_args(args))


# ----------------------------------------------------------------------------- command line


def usage() -> str:
    return "\n".join([
        "usage: drivedit serve --config FILE [--section.field VALUE ...] [--detach] [--check]",
        "",
        "Start the sampling endpoint (Ray Serve) for the model in the config. Without --detach the command",
        "keeps the endpoint up until interrupted; with it, the application stays deployed on the cluster.",
        "--check validates the config and prints it without starting anything.",
        "",
        "config fields:",
        *field_help_lines(ServeApp),
    ])


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    parser = argparse.ArgumentParser(prog="drivedit serve", add_help=False)
    parser.add_argument("--config", required=True)
    parser.add_argument("--detach", action="store_true")
    parser.add_argument("--check", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(ServeApp, args.config, overrides, checks=config_checks)
    except ConfigError as e:
        print(storage.redact(f"drivedit serve: {e}"), file=sys.stderr)
        return 2
    if args.check:
        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        return 0

    if args.detach and cfg.ray.address is None and not os.environ.get("RAY_ADDRESS"):
        print("drivedit serve: --detach needs a running Ray cluster (ray.address or RAY_ADDRESS); a Ray started "
              "by this command would end with it", file=sys.stderr)
        return 2
    problem = model_problem(cfg)
    if problem is not None:
        print(storage.redact(f"drivedit serve: {problem}"), file=sys.stderr)
        return 2
    setup_logging()
    connect_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.worker_niceness)
    http = {"host": cfg.http.host, "port": cfg.http.port}
    if cfg.http.request_timeout_s is not None:
        http["request_timeout_s"] = cfg.http.request_timeout_s
    serve.start(http_options=http)
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.http.route_prefix)
    base = f"http://{cfg.http.host}:{cfg.http.port}{cfg.http.route_prefix.rstrip('/')}"
    print(f"drivedit serve: {cfg.model.ref} at {base}/v1/samples (health: {base}/healthz, "
          f"schema: {base}/openapi.json)", flush=True)
    if args.detach:
        return 0
    # `ray job stop` sends SIGTERM: take the application down as Ctrl-C does
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("drivedit serve: shutting down", flush=True)
        serve.delete(cfg.app_name)
    return 0
