"""Benchmark: the streaming Ray Data encode pipeline against a plain single-process loop.

Both do the same work on the same frames: read the bytes through the storage layer, decode, resize
and center-crop, rasterise the boxes, encode the image and its mirror with the same codec in
batches of the same size, and write the shards. The loop runs it one step after another in this
process, reading one file after another; the pipeline (`drivedit.data.encode.run_encode`) overlaps
reading (several reads in flight per task) and decoding (CPU tasks) with encoding (an actor). Ray is started before timing; the pipeline's time includes everything
`run_encode` does, codec actor start-up included. Each side runs `--repeats` times, alternating,
and the best run of each is reported, with the codec alone on preloaded tensors as the ceiling.

    python bench/encode.py                  # CPU defaults: S3 (moto server) in and out, builtin:tiny-vae at 128 px
    python bench/encode.py --source local --data /tmp/bench-ds   # from and to this disk, dataset kept
    python bench/encode.py --codec pixel --resolution 32   # the identity codec (the demo's before the tiny VAE)
    python bench/encode.py --num 64 --size 128 --resolution 32 --codec pixel   # a quick smoke run
    python bench/encode.py --codec sd-vae --resolution 256 --num 2048 --use-gpu   # on a GPU node
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from drivedit import storage  # noqa: E402
from drivedit.config.encode import EncodeJob  # noqa: E402
from drivedit.data import encode as encode_mod  # noqa: E402
from drivedit.data.encode import ROW_COLUMNS, plan_frames, preflight, run_encode, stage_config  # noqa: E402
from drivedit.data.bdd100k import load_label_file, write_label_file  # noqa: E402
from drivedit.data.encode_stages import CodecEncoder, load_images  # noqa: E402
from drivedit.data.scenes import write_scenes_dataset  # noqa: E402
from drivedit.data.shards import build_shard_table, shard_name, write_shard  # noqa: E402

VAES = {  # random weights: throughput does not depend on the values
    "sd-vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
}


def make_codec_dir(kind: str, root: str) -> str | None:
    if kind == "pixel":
        return None
    if kind == "tiny-vae":
        return "builtin:tiny-vae"  # the shipped VAE, through the same AutoencoderKL path
    from diffusers import AutoencoderKL

    cfg = VAES[kind]
    n = len(cfg["block_out_channels"])
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                        latent_channels=4, **cfg)
    path = os.path.join(root, kind)
    vae.save_pretrained(path)
    return path


def make_dataset(root: str, args) -> None:
    """`args.unique` rendered scenes, copied under new names up to `args.num` frames (rendering is slower
    than encoding; a copy costs the same to read and decode as the original)."""
    unique = min(args.unique, args.num)
    write_scenes_dataset(root, unique, args.size, seed=0, aspect=args.aspect,
                         weathers=["clear", "overcast", "partly cloudy", "rainy", "snowy"])
    frames = load_label_file(storage.join(root, "labels.json"))
    blobs = [storage.read_bytes(storage.join(root, "images", f.name)) for f in frames]
    copies = []
    for i in range(unique, args.num):
        src = frames[i % unique]
        name = f"copy-{i:06d}.jpg"
        storage.write_bytes_atomic(storage.join(root, "images", name), blobs[i % unique])
        copies.append(dataclasses.replace(src, name=name))
    write_label_file(frames + copies, storage.join(root, "labels.json"))


def start_s3_server():
    """A moto S3 server in its own process (so it takes no CPU from the loop's process), bucket `bench`."""
    import socket
    import subprocess

    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    for _ in range(100):
        try:
            boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench")
            return proc
        except Exception:
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("the moto S3 server did not start")


def plain_loop(job: EncodeJob) -> int:
    """The baseline: the same stages, one after another, in this process. Returns rows written."""
    codec = preflight(job)
    plan = plan_frames(job, codec)
    cfg = {**stage_config(job, codec), "io_threads": 1}  # plain: one file after another
    encoder = CodecEncoder(job.codec.model_dump(mode="json"), list(plan.meta.latent_shape),
                           threads=torch.get_num_threads())
    storage.makedirs(job.data.output)
    rows_written = 0
    rps, rb, eb = job.shards.rows_per_shard, job.pipeline.read_batch_size, job.pipeline.encode_batch_size
    for s in range(0, len(plan.records), rps):
        shard_records = plan.records[s:s + rps]
        parts = []
        for b in range(0, len(shard_records), eb):
            recs = shard_records[b:b + eb]
            loaded = [load_images({k: np.array([r[k] for r in recs[i:i + rb]], dtype=object) for k in recs[0]}, cfg)
                      for i in range(0, len(recs), rb)]
            batch = {k: np.concatenate([p[k] for p in loaded]) for k in loaded[0]}
            parts.append(encoder(batch))
        rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        ok = np.array([e == "" for e in rows["error"]])
        table = build_shard_table({k: rows[k][ok] for k in ROW_COLUMNS}, plan.meta)
        write_shard(storage.join(job.data.output, shard_name(s // rps)), table)
        rows_written += int(ok.sum())
    return rows_written


def codec_alone(job: EncodeJob, num: int, channels_last: bool | None = None) -> float:
    """Images/s of the codec on preloaded uint8 crops (image + mirror per item): the pipeline's ceiling.
    `channels_last` overrides the codec's memory layout (None: its default, NHWC)."""
    codec = preflight(job)
    g = job.data.resolution // codec.factor
    encoder = CodecEncoder(job.codec.model_dump(mode="json"), [codec.latent_channels, g, g],
                           threads=torch.get_num_threads())
    if channels_last is not None and encoder.codec is not None:
        encoder.codec.channels_last = channels_last
        encoder.codec.vae.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    images = np.random.default_rng(0).integers(0, 256, (job.pipeline.encode_batch_size, job.data.resolution,
                                                        job.data.resolution, 3), dtype=np.uint8)
    encoder.encode_images(images)  # warm-up (cuDNN autotune, allocations)
    done, start = 0, time.perf_counter()
    while done < num:
        encoder.encode_images(images)
        done += len(images)
    if encoder.device_type == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def encode_job(args, data_root: str, out: str, source: str | None, limit: int | None = None) -> EncodeJob:
    """The encode job both sides run, from this script's arguments."""
    return EncodeJob.model_validate({
        "data": {"input": data_root, "output": out, "resolution": args.resolution, "limit": limit},
        "codec": {"kind": "pixel" if args.codec == "pixel" else "autoencoder_kl", "source": source},
        "shards": {"rows_per_shard": 128},
        "pipeline": {"read_batch_size": args.read_batch, "encode_batch_size": args.encode_batch,
                     "read_cpus": args.read_cpus},
        "scaling": {"num_workers": args.workers, "cpus_per_worker": args.cpus_per_worker, "use_gpu": args.use_gpu}})


def time_pipeline(job: EncodeJob) -> tuple[float, float, dict]:
    """(seconds of the whole `run_encode`, seconds until the first encoded rows reached the driver: the
    start-up of actors and codec, the job's summary)."""
    first_rows: list[float] = []
    add = encode_mod.ShardCollector.add

    def timed_add(self, batch):
        if not first_rows:
            first_rows.append(time.perf_counter() - t0)
        return add(self, batch)

    encode_mod.ShardCollector.add = timed_add
    try:
        t0 = time.perf_counter()
        summary = run_encode(job)
        return time.perf_counter() - t0, first_rows[0] if first_rows else float("nan"), summary
    finally:
        encode_mod.ShardCollector.add = add


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num", type=int, default=4096, help="frames")
    ap.add_argument("--unique", type=int, default=128, help="distinct rendered images (the rest are copies)")
    ap.add_argument("--size", type=int, default=256, help="source image height (width = size * aspect)")
    ap.add_argument("--aspect", type=float, default=16 / 9)
    ap.add_argument("--resolution", type=int, default=128, help="encode resolution (the CPU demo's is 128)")
    ap.add_argument("--codec", choices=["pixel", "tiny-vae", "sd-vae"], default="tiny-vae",
                    help="tiny-vae: the shipped builtin:tiny-vae (the CPU demo's codec); pixel: the identity codec; "
                         "sd-vae: the sd-vae-ft-* architecture with random weights (GPU)")
    ap.add_argument("--source", choices=["local", "s3"], default="s3",
                    help="where frames are read from and shards written: s3 = a local S3 server (moto) in its own "
                         "process, the way a cluster reads a bucket; local = this disk")
    ap.add_argument("--data", help="with --source local: a dataset folder to write once and reuse across runs")
    ap.add_argument("--workers", type=int, default=1, help="codec actors")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0,
                    help="CPUs (and torch threads) per codec actor; the loop's torch uses every core too")
    ap.add_argument("--read-cpus", type=float, default=0.5)
    ap.add_argument("--read-batch", type=int, default=64, help="pipeline.read_batch_size (the job's default)")
    ap.add_argument("--encode-batch", type=int, default=64, help="pipeline.encode_batch_size (the job's default)")
    ap.add_argument("--num-cpus", type=int, default=max(4, os.cpu_count() or 1),
                    help="logical CPUs of the local Ray (as in the tests: 4 on a 2-core machine)")
    ap.add_argument("--use-gpu", action="store_true", help="codec actors on GPUs")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)

    import ray

    tmp = tempfile.mkdtemp(prefix="bench-encode-")
    moto = None
    try:
        if args.source == "s3":
            moto = start_s3_server()
            data_root, out_root = "s3://bench/ds", "s3://bench/out"
        else:
            data_root, out_root = os.path.join(tmp, "ds"), os.path.join(tmp, "out")
        if args.source == "local" and args.data:
            data_root = args.data  # reused between runs when it already holds this many frames
        t = time.perf_counter()
        labels = storage.join(data_root, "labels.json")
        if storage.exists(labels) and len(json.loads(storage.read_text(labels))) == args.num:
            print(f"dataset: reusing {data_root}")
        else:
            make_dataset(data_root, args)
            print(f"dataset: {args.num} frames ({min(args.unique, args.num)} distinct) "
                  f"{round(args.size * args.aspect)}x{args.size} JPEG at {data_root} "
                  f"({time.perf_counter() - t:.1f} s to write)")
        source = make_codec_dir(args.codec, tmp)

        def job(out: str, limit: int | None = None) -> EncodeJob:
            return encode_job(args, data_root, out, source, limit)

        ray.init(num_cpus=args.num_cpus, include_dashboard=False, runtime_env={"env_vars": {
            k: v for k, v in os.environ.items() if k.startswith("AWS_") or k == "HF_HUB_OFFLINE"}})
        ray.data.DataContext.get_current().enable_progress_bars = False
        # warm-up on a few frames: starts Ray Data's own actors and the task workers once, for both sides
        run_encode(job(f"{out_root}/warm-pipe", limit=8))
        plain_loop(job(f"{out_root}/warm-loop", limit=8))
        pipe_times, loop_times, first_rows = [], [], []
        for r in range(args.repeats):
            seconds, first, summary = time_pipeline(job(f"{out_root}/pipe{r}"))
            pipe_times.append(seconds)
            first_rows.append(first)
            t = time.perf_counter()
            rows = plain_loop(job(f"{out_root}/loop{r}"))
            loop_times.append(time.perf_counter() - t)
            assert rows == summary["encoded"] == args.num, (rows, summary["encoded"])
            for out in (f"{out_root}/pipe{r}", f"{out_root}/loop{r}"):  # the S3 server keeps objects in memory
                for f in storage.list_files(out):
                    storage.delete(f)
            print(f"  run {r}: pipeline {pipe_times[-1]:.2f} s (first rows after {first_rows[-1]:.2f} s), "
                  f"loop {loop_times[-1]:.2f} s")
        ceiling = codec_alone(job(f"{out_root}/x"), max(args.num, 4 * args.encode_batch))
        pipe, loop = args.num / min(pipe_times), args.num / min(loop_times)
        result = {"frames": args.num, "source_size": [round(args.size * args.aspect), args.size],
                  "resolution": args.resolution, "codec": args.codec, "source": args.source,
                  "workers": args.workers, "ray_cpus": args.num_cpus, "torch_threads_loop": torch.get_num_threads(),
                  "pipeline_images_per_s": round(pipe, 2), "loop_images_per_s": round(loop, 2),
                  "ratio_pipeline_over_loop": round(pipe / loop, 3),
                  "pipeline_first_rows_s": round(first_rows[pipe_times.index(min(pipe_times))], 2),
                  "load_average_1m": round(os.getloadavg()[0], 2),
                  "codec_alone_images_per_s": round(ceiling, 2), "pipeline_fraction_of_codec_alone": round(pipe / ceiling, 3)}
        print(json.dumps(result, indent=2))
        print(f"pipeline {pipe:.1f} img/s vs plain loop {loop:.1f} img/s: {pipe / loop:.2f}x "
              f"(codec alone on preloaded tensors: {ceiling:.1f} img/s, pipeline at {pipe / ceiling:.0%} of it)")
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if moto is not None:
            moto.terminate()
            moto.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
