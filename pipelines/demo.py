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

from models import report
from pipelines import local
from pipelines.config import Config, load_config
from pipelines.storage import quiet_progress

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
BUCKET = "distillery-demo"
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


EVAL_PROMPTS = 64  # held-out prompts the student is scored on: enough that caption accuracy means something


def heldout_prompts(n: int, train_captions: set[str], seed: int = 10_000) -> list[str]:
    """n prompts of the shapes teacher's evaluation seed whose captions the demo's data never shows."""
    from models.shapes import prompts

    out, k = [], 4 * n
    while len(out) < n:
        out = [p for p in dict.fromkeys(prompts(k, seed)) if p not in train_captions][:n]
        k *= 2
    return out


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
        f"evaluate.prompts={work / 'eval-prompts.txt'}",
    ]
    if small:
        sets += [
            # one validation and checkpoint, one Tune trial: each Train run costs ~a minute of start-up on 2 cores
            # (tests/test_tune.py searches several trials); enough KD steps that the student draws some prompts right
            "distill.max_steps=50", "distill.val_every=50", "distill.checkpoint_every=50",
            "data.val_fraction=0.15",  # FID needs 2 reference images or more from 64
            "tune.num_samples=1", "tune.steps_per_trial=3", "evaluate.num_prompts=16", "evaluate.steps=10",
            "evaluate.latency_repeats=1", "evaluate.embedding_samples=8",
        ]
    return load_config(REPO / "configs" / "demo.yaml", sets)


def dataset_size(small: bool) -> int:
    return 64 if small else 1200


def run_demo(work_dir: str, small: bool = False, serve: bool = True, port: int = 8000,
             stop: threading.Event | None = None) -> dict[str, Any]:
    """Start the local services, run the stages, optionally serve until `stop` is set (or Ctrl-C)."""
    import ray

    from pipelines.formats import write_shapes
    from pipelines.run import run_all

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
        from models.shapes import prompts

        seen = set(prompts(dataset_size(small), cfg.seed))
        (work / "eval-prompts.txt").write_text("\n".join(heldout_prompts(EVAL_PROMPTS, seen)) + "\n")
        quiet_progress()
        if not ray.is_initialized():
            # workers inherit the servers' addresses through the environment; credentials only through the processes'
            # own environment (this one's, inherited), never as job metadata
            env = {k: os.environ[k] for k in [*s3.env, *mlflow.env] if k not in SECRET_ENV}
            ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.include_dashboard,
                     runtime_env={"env_vars": env})
        results = run_all(cfg)
        summary = {"work_dir": str(work), "mlflow": mlflow.url, "s3": s3.url, "results": results}
        (work / "demo-summary.json").write_text(json.dumps(summary, indent=2, default=str))
        m = results.get("evaluate") or {}
        if m:
            print("\n" + report.text_table(m) + "\n" + report.verdict(m, cfg.evaluate.goal))
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
