"""MLflow for the training stages: find or start the run of a training job, log the whole config as
params, metrics and artifacts. Only the driver and rank 0 call these (the caller checks the rank).

A training job is identified by a key (its checkpoint location); running the same job again (resume
after a stop) continues the same MLflow run. Everything goes through MlflowClient with an explicit
tracking URI, so no global "active run" state leaks between stages or Ray workers.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

# MLflow is imported where it is used: a run with no tracking URI (and the GPU benchmarks, whose offline
# bundle leaves MLflow out) never loads it
log = logging.getLogger(__name__)

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
BATCH = 100  # MLflow's limit on params per log_batch call
KEY_TAG = "distillery.job_key"


SECRET_KEY = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)
# config fields of ours whose names match SECRET_KEY but hold no secret (a column name, a variable's name, a path)
NOT_SECRET = {"data.key_column", "serve.api_key_env", "serve.api_key_file"}
REDACTED = "***"


def redact(tree: Any, prefix: str = "") -> Any:
    """`tree` with the value of every key that looks like a secret's (KEY, SECRET, TOKEN, PASSWORD, CREDENTIAL, any
    case: e.g. ray.runtime_env.env_vars.AWS_SECRET_ACCESS_KEY) replaced by ***, at any depth."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            hidden = SECRET_KEY.search(str(k)) and path not in NOT_SECRET and v not in (None, "", {}, [])
            out[k] = REDACTED if hidden else redact(v, path)
        return out
    if isinstance(tree, list):
        return [redact(v, prefix) for v in tree]
    return tree


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts as dotted keys ("distill.loss.feat"); lists and scalars as JSON, cut to MLflow's limit. Values of
    keys that look like secrets' are redacted."""
    if not prefix:
        tree = redact(tree)
    out: dict[str, str] = {}
    if isinstance(tree, dict) and tree:
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    value = tree if isinstance(tree, str) else json.dumps(tree, default=str)
    if len(value) > MAX_PARAM_CHARS:
        value = value[: MAX_PARAM_CHARS - 3] + "..."
    out[prefix or "value"] = value
    return out


def client(tracking_uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def start_run(tracking_uri: str, experiment: str, job_key: str, run_name: str, config: dict[str, Any],
              tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """The MLflow run of a training job: the latest one tagged with job_key, else a new one with the
    config as params. Returns (run id, resumed)."""
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else c.create_experiment(experiment)
    found = c.search_runs([exp_id], filter_string=f"tags.`{KEY_TAG}` = '{job_key}'",
                          order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        run_id = found[0].info.run_id
        if found[0].info.status != "RUNNING":
            c.update_run(run_id, status="RUNNING")
        return run_id, True
    run = c.create_run(exp_id, run_name=run_name, tags={KEY_TAG: job_key, **(tags or {})})
    log_params(tracking_uri, run.info.run_id, config)
    return run.info.run_id, False


def log_params(tracking_uri: str, run_id: str, config: dict[str, Any]) -> None:
    """A config, flattened to dotted names (secrets masked), as the run's params."""
    from mlflow.entities import Param

    params = [Param(k, v) for k, v in flatten(config).items()]
    for i in range(0, len(params), BATCH):
        client(tracking_uri).log_batch(run_id, params=params[i : i + BATCH])


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
    for i in range(0, len(batch), 1000):
        client(tracking_uri).log_batch(run_id, metrics=batch[i : i + 1000])


def set_tags(tracking_uri: str, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    client(tracking_uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_artifact(tracking_uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """A file or a whole folder."""
    c = client(tracking_uri)
    if Path(path).is_dir():
        c.log_artifacts(run_id, str(path), artifact_path)
    else:
        c.log_artifact(run_id, str(path), artifact_path)


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(tracking_uri).set_terminated(run_id, status=status)
