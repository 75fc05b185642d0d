"""Shared test fixtures, and the test tiers.

Tiers (markers, registered in pyproject.toml; every test gets exactly one, here):
- `unit`: no Ray, no servers; `pytest -m unit` runs in about a minute and a half on 2 cores.
- `integration`: uses the shared local Ray and/or the S3 server (any test that asks, directly or
  through another fixture, for one of INTEGRATION_FIXTURES).
- `e2e`: the jobs as users run them (a module or test marked `pytest.mark.e2e`).
`make test` runs all three in two pytest-xdist workers, a whole module at a time (`--dist loadfile`, so a
module's fixtures are built once), the slowest modules first (SLOWEST_FIRST) so that neither worker is left
with a long module at the end. Run `pytest tests` without `-n` for one process.

- One local Ray per test process (`ray_session`: one per xdist worker), started lazily by the first test
  that needs it, with 4 logical CPUs as the machine notes ask; tests leave CPUs free for Ray Data.
- A real S3 endpoint on loopback (moto's server mode), reached through s3fs / pyarrow exactly as a
  user's bucket is. Its environment (endpoint, credentials) is set before Ray starts so that Ray
  workers inherit it.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("TQDM_DISABLE", "0")

# Intra-op threads of this test process's own torch work. Under `make test` two xdist workers share the two
# cores: a second thread per worker has no core to run on, and OpenMP threads spinning at a barrier take the
# time the other worker needs (the shipped tiny model's class test: 45 s beside the other worker with torch's
# default two threads, 12 s with one; BENCHMARKS.md, "The test suite"). Alone, torch's default.
# Subprocesses and Ray workers set their own (Ray: one per CPU the task or actor asks for).
TEST_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else torch.get_num_threads()
torch.set_num_threads(TEST_THREADS)


INTEGRATION_FIXTURES = {"ray_session", "s3_server", "s3_bucket", "mlflow_server"}
TIERS = ("unit", "integration", "e2e")


# Modules by their measured time (`pytest --durations`, 2-core VM, two workers), the slowest first: xdist hands
# out whole modules in collection order, so these start at once and the short ones fill in around them.
SLOWEST_FIRST = ("test_demo", "test_gpu_suite", "test_downstream", "test_detect_train", "test_finetune",
                 "test_finetune_e2e", "test_generate_layouts", "test_serve_http", "test_detect_job",
                 "test_generate_transfer", "test_generate_transfer_guided", "test_generate_job")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("e2e"):
            continue
        shared = bool(INTEGRATION_FIXTURES & set(item.fixturenames))
        item.add_marker(getattr(pytest.mark, "integration" if shared else "unit"))
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))  # stable: order within a module kept


def random_tiny_dit(name: str = "DiT-N/2", std: float = 0.1, seed: int = 0):
    """A tiny "pretrained" DiT (8 px, 10 classes): every weight but the fixed sin-cos pos_embed drawn
    from N(0, std) after torch.manual_seed(seed), not the adaLN-zero init, so every path matters."""
    from drivedit.models.dit import build_dit, dit_config

    torch.manual_seed(seed)
    model = build_dit(dit_config(name, input_size=8, num_classes=10))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname != "pos_embed":
                p.normal_(0, std)
    return model.eval()


@pytest.fixture(scope="module")
def base():
    """The tiny base model most model tests start from (random_tiny_dit's defaults); a module may override it."""
    return random_tiny_dit()


@pytest.fixture
def worker_threads():
    """This process's thread budget (TEST_THREADS) for a test that trains for minutes, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield TEST_THREADS
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU the thread barriers cost seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; yields its endpoint URL. Env vars point boto/s3fs at it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket per test; yields its name."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """The one local Ray of this test session (S3 env already set so workers inherit it)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                           if k.startswith("AWS_") or k in ("HF_HUB_OFFLINE",)}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory):
    """One `mlflow server` on loopback for the session (tests/mlflow_server.py); `.ready()` waits for it."""
    from mlflow_server import MlflowServer

    server = MlflowServer(s3_server, tmp_path_factory.mktemp("mlflow-server"))
    yield server
    server.stop()
