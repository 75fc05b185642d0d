"""`drivedit generate`: a labelled synthetic driving dataset from a fine-tuned DiT, with Ray Data.

    spec ──plan──▶ shards of items (index, seed = base_seed + index, scenario)
         ──ShardSampler actors (one per GPU)──▶ latents
         ──write_shards CPU tasks──▶ images/<shard>/<index>.png + manifest part (marks the shard done)
         ──driver──▶ manifest.parquet + labels.json, summary, MLflow run

Everything that can be wrong with the request (unknown scenarios, a mix that does not sum, a
model that lacks a scenario, an output holding another dataset) is found by `prepare` before Ray
starts. Rerunning the same job skips complete shards and rewrites partial ones, so it ends with
exactly the requested items, byte-identical to an uninterrupted run.
"""
from __future__ import annotations

from drivedit.config.base import field_help_lines
import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

from drivedit import storage, tracking
from drivedit.config.base import ConfigError, load_config
from drivedit.config.generate import GenerateJob
from drivedit.generate import dataset
from drivedit.generate.model_ref import SamplingModel, load_sampling_model
from drivedit.generate.report import log_summary, start_tracking
from drivedit.generate.transfer import TransferPlan, plan_transfer
from drivedit.generate.undrawable import resolve_ignore_under
from drivedit.generate.spec import (ItemPlan, SpecError, existing_scenario_counts, plan_items, resolve_counts,
                                    spec_document, spec_hash)
from drivedit.logs import setup_logging
from drivedit.raylocal import connect_ray

log = logging.getLogger("drivedit.generate")


@dataclass
class Prepared:
    """What the driver settled before any sampling."""

    job: GenerateJob
    model: SamplingModel  # its weights are dropped once the facts below are read
    plan: ItemPlan | TransferPlan
    document: dict
    spec_hash: str
    image_size: int
    model_tracking_uri: str | None
    attempt: str = ""  # this execution's id in the dataset's attempt.json (dataset.begin_attempt)

    @property
    def writer_context(self) -> dict:
        sm = self.model
        return {"spec_hash": self.spec_hash, "model_version": sm.version, "image_size": self.image_size,
                "native_size": sm.image_size, "codec": sm.codec_info,
                "class_ids": dict(zip(sm.scenarios, sm.class_ids)), "attempt": self.attempt,
                "box_categories": self.document.get("layouts", {}).get("box_categories", []),
                "ignore_under": (self.document.get("layouts") or self.document.get("transfer") or {}).get("ignore_under", 0.0)}


def absolute_local_paths(job: GenerateJob) -> GenerateJob:
    """Relative local paths made absolute here, where the user meant them: Ray workers run elsewhere.

    Covers the model ref, the codec directory, the output directory, the balance source and an
    SQLite tracking store; URIs (s3://, models:/, builtin:) are left alone. The caller's job is not changed.
    """
    job = job.model_copy(deep=True)
    job.model.ref = storage.absolute(job.model.ref)
    if job.model.codec is not None and job.model.codec.source:
        job.model.codec.source = storage.absolute(job.model.codec.source, only_if_exists=True)  # or a hub id
    job.output.uri = storage.absolute(job.output.uri)
    if job.spec.balance is not None:
        job.spec.balance.source = storage.absolute(job.spec.balance.source)
    if job.spec.layouts is not None:
        job.spec.layouts.source = storage.absolute(job.spec.layouts.source)
        if job.spec.layouts.images:
            job.spec.layouts.images = storage.absolute(job.spec.layouts.images)
    if job.spec.transfer is not None:
        t = job.spec.transfer
        t.source, t.labels, t.images = (storage.absolute(u) if u else u for u in (t.source, t.labels, t.images))
    job.tracking.tracking_uri = tracking.absolute_tracking_uri(job.tracking.tracking_uri)
    return job


def config_checks(sections) -> list[str]:
    """The model and the output of the sections that are valid (load_config's `checks`: listed with the field
    errors): the model loads with its vocabulary and codec, the output location can be reached."""
    problems = []
    if sections.model is not None:
        m = sections.model
        try:
            load_sampling_model(m.ref, class_names=m.class_names, codec=m.codec,
                                tracking_uri=model_tracking_uri(SimpleNamespace(tracking=sections.tracking)))
        except (ValueError, OSError) as e:
            problems.append(f"model.ref: {e}")
    if sections.output is not None:
        try:
            storage.exists(sections.output.uri)
        except (ValueError, OSError) as e:
            problems.append(f"output.uri: {e}")
    return problems


def model_tracking_uri(job: GenerateJob) -> str | None:
    """Where `models:/` refs are looked up: tracking.tracking_uri, else $MLFLOW_TRACKING_URI."""
    return (job.tracking.tracking_uri if job.tracking is not None else None) or os.environ.get("MLFLOW_TRACKING_URI") \
        or None


def _ignore_entry(value: float | str, job: GenerateJob, sm) -> dict:
    """{"ignore_under": px} of a section's `ignore_under` (`token`: one token of this model at the output size) for
    the spec document; {} for 0, so a dataset that marks nothing keeps the hash it had before there were marks."""
    cfg = sm.model.config
    px = resolve_ignore_under(value, job.output.image_size or sm.image_size, cfg.input_size, cfg.patch_size)
    return {"ignore_under": px} if px > 0 else {}


def _layout_plan(job: GenerateJob, sm) -> tuple[ItemPlan, dict]:
    """Items of a `spec.layouts` job and what of it enters the spec hash; SpecError lists every problem."""
    from drivedit.generate.layouts import frames_digest, layout_plan, read_layout_frames

    section = job.spec.layouts
    branch = getattr(sm.model, "layout_branch", None)
    problems = []
    if branch is None:
        problems.append(f"spec.layouts needs a model with a layout branch, and {sm.version} has none; fine-tune "
                        "one with layout.kind controlnet or light")
    unknown = [s for s in section.scenarios if s not in sm.scenarios]
    if unknown:
        problems.append(f"spec.layouts.scenarios: unknown scenarios {unknown}; the model's vocabulary is: "
                        f"{', '.join(sm.scenarios)}")
    if problems:
        raise SpecError(problems)
    categories = list(branch.spec.box_categories)
    frames = read_layout_frames(section, categories, sm.image_size, list(branch.spec.segmentation_classes))
    plan = layout_plan(frames, section.scenarios, section.variants, job.spec.base_seed, job.spec.shard_size)
    document = {"source_digest": frames_digest(frames), "frames": len(frames), "variants": section.variants,
                "layout_guidance": float(section.layout_guidance), "box_categories": categories,
                **_ignore_entry(section.ignore_under, job, sm)}
    if branch.spec.uses_segmentation:  # only then, so a box-only job's spec hash is what it was
        document["segmentation_classes"] = list(branch.spec.segmentation_classes)
    return plan, document


def prepare(job: GenerateJob) -> Prepared:
    """Load the model's facts, resolve the counts, plan the items and hash the spec. Raises before any sampling."""
    m = job.model
    tracking_uri = model_tracking_uri(job)
    try:
        sm = load_sampling_model(m.ref, class_names=m.class_names, codec=m.codec, tracking_uri=tracking_uri)
    except (ValueError, OSError) as e:  # FileNotFoundError, an unreachable bucket, a checkpoint that does not fit
        raise ConfigError("generate", [f"model.ref: {e}"]) from None
    problems = []
    if job.sampler.guidance_kind == "superclass" and sm.superclass_of is None:
        problems.append(f"sampler.guidance_kind is `superclass` but {sm.version} has no tiered (superclass) "
                        f"embedder; use guidance_kind `cfg`")
    if job.sampler.guide_channels is not None and job.sampler.guide_channels > sm.model.in_channels:
        problems.append(f"sampler.guide_channels ({job.sampler.guide_channels}) exceeds the model's "
                        f"{sm.model.in_channels} latent channels")
    if problems:
        raise SpecError(problems)
    existing, layouts = None, None
    if job.spec.balance is not None:
        existing = existing_scenario_counts(job.spec.balance.source, sm.scenarios)
        log.info("balance source %s has %s", job.spec.balance.source, existing)
    if job.spec.layouts is not None:
        plan, layouts = _layout_plan(job, sm)
    elif job.spec.transfer is not None:
        branch = getattr(sm.model, "layout_branch", None)
        plan = plan_transfer(job, sm.scenarios, branch.spec if branch is not None else None, sm.version)
    else:
        counts = resolve_counts(job.spec, sm.scenarios, existing)
        plan = plan_items(counts, job.spec.base_seed, job.spec.shard_size)
    image_size = job.output.image_size or sm.image_size
    document = spec_document(plan, model_digest=sm.digest,
                             sampler=dataset.spec_settings(job.sampler),
                             image_size=image_size, codec=sm.codec_id, layouts=layouts)
    if job.spec.transfer is not None:
        document["transfer"] = {**plan.document(), **_ignore_entry(job.spec.transfer.ignore_under, job, sm)}
    sm.model = None  # the driver only plans; actors load their own copy
    return Prepared(job, sm, plan, document, spec_hash(document), image_size, tracking_uri)


# ----------------------------------------------------------------------------- Ray


def _pool_sizes(job: GenerateJob, num_pending: int) -> tuple[int, int, bool]:
    """(sampler actors, concurrent writer tasks, whether the cluster must grow to fit the actors).

    Writers get the CPUs left after the samplers, minus one for Ray Data's own tasks.
    """
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    gpus = int(total.get("GPU", 0))
    sc = job.scaling
    if sc.use_gpu and gpus == 0:
        raise ValueError("scaling.use_gpu is true but the Ray cluster has no GPUs; set scaling.use_gpu: false "
                         "to sample on CPU actors")
    samplers = max(1, min(sc.num_workers or (gpus if sc.use_gpu else 1), num_pending))
    grow = sc.use_gpu and samplers > gpus
    if grow:
        log.warning("scaling.num_workers asks for %d GPU actors but the cluster has %d GPUs now; starting with "
                    "what fits and growing if the cluster autoscales", samplers, gpus)
    cpus = float(total.get("CPU", 0))
    need = samplers * sc.cpus_per_worker + sc.cpus_per_write_task
    if need > cpus:
        raise ValueError(f"{samplers} sampler actor(s) x scaling.cpus_per_worker {sc.cpus_per_worker} + one write task "
                         f"x scaling.cpus_per_write_task {sc.cpus_per_write_task} need {need:g} CPUs but the Ray "
                         f"cluster has {cpus:g}; lower scaling.num_workers or the CPUs per worker (or give Ray more "
                         f"CPUs: ray.num_cpus)")
    left = float(free.get("CPU", cpus)) - samplers * sc.cpus_per_worker - 1
    writers = max(1, min(num_pending, int(left // sc.cpus_per_write_task)))
    return samplers, writers, grow


def run_pipeline(prep: Prepared, pending: list[int], stop_after_shards: int | None = None) -> list[dict]:
    """Sample and write `pending` shards; returns one row per shard written, in completion order.

    `stop_after_shards` abandons the pipeline after that many shards, leaving others half done
    exactly as a killed job does (used by the resume tests).
    """
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    from drivedit.generate.workers import ShardSampler
    from drivedit.generate.writer import write_shards

    job = prep.job
    sc = job.scaling
    samplers, writers, grow = _pool_sizes(job, len(pending))
    pool = ActorPoolStrategy(min_size=1, max_size=samplers) if grow else ActorPoolStrategy(size=samplers)
    job_dict = job.model_dump(mode="json")
    rows = [{"shard": k, "items": json.dumps(prep.plan.shard_items(k))} for k in pending]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))  # one block per shard: shards spread out
    ds = ds.map_batches(
        ShardSampler, batch_size=1, compute=pool,
        num_gpus=1 if sc.use_gpu else 0, num_cpus=sc.cpus_per_worker, resources=sc.resources_per_worker or None,
        fn_constructor_kwargs={"job": job_dict, "model_digest": prep.model.digest,
                               "tracking_uri": prep.model_tracking_uri})
    ds = ds.map_batches(
        write_shards, batch_size=1, compute=TaskPoolStrategy(size=writers), num_cpus=sc.cpus_per_write_task,
        fn_kwargs={"job": job_dict, "context": prep.writer_context})
    log.info("generating %d shards on %d sampler actor(s) and up to %d writer task(s)", len(pending), samplers, writers)
    done: list[dict] = []
    t0 = time.perf_counter()
    iterator = iter(ds.iter_rows())
    try:
        for row in iterator:
            done.append({k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()})
            images = sum(r["num_images"] for r in done)
            log.info("shard %d written (%d/%d shards, %d images, %.2f images/s)", row["shard"], len(done),
                     len(pending), images, images / max(time.perf_counter() - t0, 1e-9))
            if stop_after_shards is not None and len(done) >= stop_after_shards:
                break
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
    return done


# ----------------------------------------------------------------------------- the job


def run_generate(job: GenerateJob, *, stop_after_shards: int | None = None) -> dict:
    """Generate the dataset `job` asks for (resuming whatever is already there); returns the summary."""
    t_start = time.perf_counter()
    prep = prepare(absolute_local_paths(job))
    job = prep.job
    uri = job.output.uri
    try:
        resumed = dataset.claim_output(uri, prep.document, prep.spec_hash, prep.model.version)
    except OSError as e:  # an unreachable or malformed bucket: nothing was written
        raise ConfigError("generate", [f"output.uri: {e}"]) from None
    # from here on, writers of an earlier execution still running (a killed job's workers) stop at their next shard
    prep.attempt = dataset.begin_attempt(uri)
    plan = prep.plan
    complete = dataset.complete_shards(uri) & set(range(plan.num_shards))
    pending = [k for k in range(plan.num_shards) if k not in complete]
    log.info("%s: %d items in %d shards (%s); %d shards already complete", uri, plan.num_items, plan.num_shards,
             ", ".join(f"{s}={c}" for s, c in plan.counts().items()), len(complete))
    run = start_tracking(prep.job, prep.model, prep.spec_hash)
    status = "FAILED"
    try:
        rows: list[dict] = []
        seconds = 0.0
        if pending:
            connect_ray(job.ray.address, job.ray.num_cpus, job.ray.worker_niceness)
            t0 = time.perf_counter()  # the pipeline's time: actor start and model loads included, Ray's own not
            rows = run_pipeline(prep, pending, stop_after_shards)
            seconds = time.perf_counter() - t0
        finished = dataset.complete_shards(uri) >= set(range(plan.num_shards))
        formats = job.output.label_formats
        if finished and (rows or dataset.manifest_row_count(uri) != plan.num_items):
            dataset.finalize(uri, plan.num_items, plan.num_shards, formats)
        elif finished and (missing := dataset.missing_label_formats(uri, formats)):
            # a complete dataset rerun with formats it was not first asked for
            dataset.write_label_formats(uri, dataset.read_manifest(uri), missing)
        summary = _summary(prep, rows, len(complete), seconds, time.perf_counter() - t_start, finished, resumed)
        if run is not None:
            summary["mlflow_run_id"] = run.run_id
            log_summary(run, summary)
        status = "FINISHED" if finished else "KILLED"
        return summary
    finally:
        if run is not None:
            run.end(status)


def _summary(prep: Prepared, rows: list[dict], skipped: int, seconds: float, total_seconds: float,
             complete: bool, resumed: bool) -> dict:
    written: dict[str, int] = {}
    for r in rows:
        for s, c in json.loads(r["scenarios"]).items():
            written[s] = written.get(s, 0) + c
    images = sum(r["num_images"] for r in rows)
    uri = prep.job.output.uri
    return {
        "output": uri,
        "complete": complete,
        "resumed": resumed,
        "spec_hash": prep.spec_hash,
        "model": prep.job.model.ref,
        "model_version": prep.model.version,
        "model_digest": prep.model.digest,
        "num_items": prep.plan.num_items,
        "num_shards": prep.plan.num_shards,
        "shards_skipped": skipped,
        "shards_written": len(rows),
        "images_written": images,
        "seconds": round(seconds, 3),
        "total_seconds": round(total_seconds, 3),
        "images_per_s": round(images / seconds, 4) if seconds > 0 and images else 0.0,
        "per_scenario": prep.plan.counts(),
        "per_scenario_written": written,
        "image_size": prep.image_size,
        "manifest": storage.join(uri, dataset.MANIFEST_FILE) if complete else None,
        "labels": storage.join(uri, dataset.LABELS_FILE) if complete else None,
    }


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="drivedit generate", add_help=False,
        description="Generate a labelled synthetic dataset. Any config field can be overridden: --section.field VALUE")
    parser.add_argument("--config", help="YAML job config (configs/demo/generate.yaml)")
    parser.add_argument("-h", "--help", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    if args.help:
        print(parser.format_help() + "\n".join(field_help_lines(GenerateJob)))
        return 0
    setup_logging()
    try:
        job = load_config(GenerateJob, args.config, overrides, checks=config_checks)
        summary = run_generate(job)
    except (ConfigError, SpecError, dataset.OutputConflictError) as e:
        print(storage.redact(f"drivedit generate: {e}"), file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(storage.redact(f"drivedit generate: {e}"), file=sys.stderr)
        return 2
    print(storage.redact(json.dumps(summary, indent=2)))
    return 0 if summary["complete"] else 1
