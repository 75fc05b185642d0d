"""The fine-tuning job as a user submits it: `ray job submit --working-dir . -- python jobs/finetune.py
--config configs/demo/finetune.yaml` against a local `ray start --head`.

The cluster is this test's own (own temp dir, own ports, token auth off on loopback), so it never touches
the session's shared Ray; it is stopped by ending the process session `ray start --block` leads.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from finetune_support import write_shards

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _session_pids(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    return [int(p) for p, s in (line.split() for line in out.splitlines()) if int(s) == sid and int(p) != os.getpid()]


@pytest.fixture
def local_cluster(tmp_path):
    """A `ray start --head --block` cluster with 4 CPUs; yields (dashboard URL, env for the ray CLI)."""
    gcs, dash, client, agent, metrics, runtime_env = _free_ports(6)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    temp_dir = Path("/tmp") / f"ray-e2e-{uuid.uuid4().hex[:8]}"  # short: Ray's socket paths must fit 107 bytes
    log = open(tmp_path / "ray-start.log", "w")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=4", "--node-ip-address=127.0.0.1",
         f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}", f"--temp-dir={temp_dir}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 240
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2)
                break
            except OSError:
                if head.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"ray start failed: {(tmp_path / 'ray-start.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield url, env
    finally:
        # everything the head started shares its session: end exactly those processes
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)  # a SIGTERMed head drains for up to 30 s; nothing here needs draining
        except subprocess.TimeoutExpired:
            pass
        for pid in _session_pids(head.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        head.wait(timeout=30)
        log.close()
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)


@pytest.mark.slow
@pytest.mark.e2e
def test_ray_job_submit_demo_config(local_cluster, tmp_path):
    url, env = local_cluster
    # the demo config as shipped (builtin:tiny-dit on 32x32x4 tiny-VAE latents), on small demo-like shards
    shards = write_shards(tmp_path / "shards", size=32, channels=4, codec_id="autoencoder_kl:builtin:tiny-vae",
                          with_layout=True,  # the demo config trains a layout branch
                          resolution=128)
    storage = tmp_path / "runs"
    sid = f"finetune-{uuid.uuid4().hex[:8]}"
    overrides = ["--data.shards", str(shards), "--run.storage_path", str(storage),
                 "--optim.total_steps", "4", "--optim.global_batch_size", "8", "--optim.warmup_steps", "0",
                 "--run.checkpoint_every", "2", "--run.log_every", "2", "--sampling.every_steps", "0",
                 "--sampling.steps", "2", "--data.probe_rows", "24", "--method.init_samples", "2",
                 "--method.init_timesteps", "[200, 600]"]
    cmd = [str(BIN / "ray"), "job", "submit", "--address", url, "--submission-id", sid, "--working-dir", ".",
           "--", "python", "jobs/finetune.py", "--config", "configs/demo/finetune.yaml", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    status = subprocess.run([str(BIN / "ray"), "job", "status", sid, "--address", url], env=env,
                            capture_output=True, text=True, timeout=120)
    assert f"job '{sid}' succeeded" in (status.stdout + status.stderr).lower(), output[-6000:]
    assert proc.returncode == 0, output[-6000:]
    assert "drivedit.finetune: step 4/4" in output and "registered as models:/drivedit-demo/1" in output

    result = json.loads((storage / "demo" / "result.json").read_text())
    assert result["step"] == 4 and result["model_uri"] == "models:/drivedit-demo/1"
    assert (storage / "demo" / "bundle" / "bundle.json").is_file()
    assert (storage / "mlflow.db").is_file()
    from drivedit import tracking

    bundle = tracking.download_registered_bundle("models:/drivedit-demo/1", tmp_path / "dl",
                                                 tracking_uri=f"sqlite:///{storage / 'mlflow.db'}")
    assert json.loads((bundle / "bundle.json").read_text())["extra"]["run"] == "demo"
