"""Local stand-ins for a cluster's services, started as real servers on 127.0.0.1: an S3-compatible
server (moto's server mode) and an MLflow tracking server with a SQLite registry. The demo and the
tests use them; a cluster uses real S3 and a real MLflow instead, through the same URIs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception:
            time.sleep(0.25)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    env: dict[str, str] = field(default_factory=dict)  # what a client needs in its environment

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def start_s3(port: int | None = None, log_dir: str | Path | None = None) -> Server:
    """moto's S3 server; clients find it through the standard AWS_ENDPOINT_URL variable."""
    port = port or free_port()
    out = open(Path(log_dir) / "s3.log", "ab") if log_dir else subprocess.DEVNULL
    proc = subprocess.Popen([_bin("moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/moto-api/", proc=proc)
    env = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    return Server(url, proc, env)


def start_mlflow(root: str | Path, port: int | None = None) -> Server:
    """An MLflow tracking server with a SQLite backend (so the model registry works) and local artifacts."""
    root = Path(root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = open(root / "server.log", "ab")
    cmd = [
        _bin("mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", timeout=120, proc=proc)
    return Server(url, proc, {"MLFLOW_TRACKING_URI": url})


def make_bucket(name: str) -> None:
    import boto3

    s3 = boto3.client("s3")
    try:
        s3.create_bucket(Bucket=name)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
