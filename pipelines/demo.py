"""`distillery demo`: the whole system on one machine with no GPU and no network.

It starts what a cluster would provide, as real local servers (an S3-compatible server and an MLflow
server with a SQLite registry on 127.0.0.1, a local Ray), writes the built-in shapes dataset to S3, and
runs the stages of configs/demo.yaml: prepare (from S3, cache on S3) → distill the shipped shapes
teacher into a bk-small student → a small Tune search → evaluate → register the champion → serve it.
Everything stays under one work directory; Ctrl-C stops the servers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from pipelines import local
from pipelines.config import Config, load_config

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
BUCKET = "distillery-demo"


def demo_config(work: Path, small: bool, port: int) -> Config:
    """configs/demo.yaml with this machine's paths; `small` shrinks every size for tests."""
    from models.teacher import SHIPPED

    teacher = "builtin:shapes-sd1" if (SHIPPED / "shapes-sd1").is_dir() else "builtin:tiny-sd1"
    sets = [
        f"work_dir={work}",
        f"data.source=s3://{BUCKET}/shapes",
        f"data.output=s3://{BUCKET}/cache",
        f"teacher.uri={teacher}",
        f"serve.port={port}",
        f"ray.num_cpus={os.cpu_count() or 2}",
    ]
    if small:
        sets += [
            # one validation and checkpoint, one Tune trial: each Train run costs ~a minute of start-up on 2 cores
            # (tests/test_tune.py searches several trials)
            "distill.max_steps=6", "distill.val_every=6", "distill.checkpoint_every=6", "distill.batch_size=4",
            "tune.num_samples=1", "tune.steps_per_trial=3", "evaluate.num_prompts=4", "evaluate.steps=3",
            "evaluate.latency_repeats=1", "evaluate.embedding_samples=8",
        ]
    return load_config(REPO / "configs" / "demo.yaml", sets)


def dataset_size(small: bool) -> int:
    return 64 if small else 1200


def run_demo(work_dir: str, small: bool = False, serve: bool = True, port: int = 8000,
             stop: threading.Event | None = None) -> dict[str, Any]:
    """Start the local services, run the stages, optionally serve until `stop` is set (or Ctrl-C)."""
    import ray

    from pipelines.run import run_all
    from pipelines.shapes import write_shapes

    work = Path(work_dir).absolute()
    work.mkdir(parents=True, exist_ok=True)
    servers: list[local.Server] = []
    try:
        s3 = local.start_s3(log_dir=work)
        servers.append(s3)
        os.environ.update(s3.env)
        mlflow = local.start_mlflow(work / "mlflow")
        servers.append(mlflow)
        os.environ.update(mlflow.env)
        log.info("S3-compatible server at %s, MLflow at %s", s3.url, mlflow.url)
        local.make_bucket(BUCKET)
        cfg = demo_config(work, small, port)
        written = write_shapes(cfg.data.source, "parquet", dataset_size(small), seed=cfg.seed)
        log.info("built-in shapes dataset: %s", written)
        if not ray.is_initialized():
            # workers inherit the servers' addresses through the environment
            env = {k: os.environ[k] for k in [*s3.env, *mlflow.env]}
            ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, runtime_env={"env_vars": env})
        results = run_all(cfg)
        summary = {"work_dir": str(work), "mlflow": mlflow.url, "s3": s3.url, "results": results}
        (work / "demo-summary.json").write_text(json.dumps(summary, indent=2, default=str))
        if serve:
            from serving.app import start

            # set here, not earlier: Ray Tune installs its own SIGINT handler while it runs
            stop = stop or _ctrl_c_event()
            url = start(cfg)
            summary["url"] = url
            print(f"\nThe student is served at {url}  (web page: {url.rstrip('/')}/)")
            print(f"curl -s {url.rstrip('/')}/v1/images/generations -H 'Content-Type: application/json' "
                  "-d '{\"prompt\": \"a red circle at the top left on a blue background\", \"seed\": 0}'")
            print("Ctrl-C stops the servers.")
            stop.wait()
        return summary
    finally:
        if serve:
            try:
                from ray import serve as ray_serve

                ray_serve.shutdown()
            except Exception:  # Serve was never started
                pass
        for s in reversed(servers):
            s.stop()


def _ctrl_c_event() -> threading.Event:
    ev = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: ev.set())
    signal.signal(signal.SIGTERM, lambda *_: ev.set())
    return ev


def main(args: argparse.Namespace) -> int:
    summary = run_demo(args.work_dir, small=args.small, serve=not args.no_serve, port=args.port)
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}, indent=2))
    return 0
