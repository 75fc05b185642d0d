"""A real `mlflow server` on loopback for the tests that need a tracking server (REST store)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on loopback: SQLite backend store, artifacts proxied to a bucket on the S3 server.
    Started at once, waited for only when first used, so it boots while Ray does."""

    def __init__(self, s3_endpoint: str, root: Path):
        import boto3

        self.bucket, self.root = "mlflow-artifacts", root
        boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=self.bucket)
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(root / "server.log", "w")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", f"s3://{self.bucket}/artifacts"],
            env={**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}, stdout=self.log, stderr=subprocess.STDOUT)

    def ready(self) -> str:
        deadline = time.time() + 240
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return self.url
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.proc.kill()
                    raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a loaded machine: gunicorn's workers may not stop in time
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.log.close()
