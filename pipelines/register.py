"""The register stage: log the student to MLflow as a python_function model and register it.

The pyfunc model's only artifact is the diffusers pipeline folder (`artifacts={"pipeline": folder}`), so
inside a downloaded model directory the plain diffusers folder is `artifacts/pipeline`: the serving
stage and users' own tools load it with `DiffusionPipeline.from_pretrained` and no MLflow at all.

The new version takes the `champion` alias only if it beats the current champion on the configured
metric (`registry.metric`, `registry.mode`); otherwise it becomes the `challenger`. Tags on the version
record the teacher, the preset or spec, every metric and the config hash. Registering the same student
with the same metrics twice returns the existing version (the stage is idempotent).

`DiffusersImageModel` generates with models/sampling.py's `generate_images`, as the serving stage does, so
`mlflow.pyfunc.load_model("models:/NAME@champion")` and the HTTP API give the same images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from models.sampling import ImageJob, generate_images, load_pipeline  # noqa: F401 (load_pipeline: re-export)
from models.student import StudentMeta, read_meta_file
from pipelines import tracking
from pipelines.config import Config

log = logging.getLogger(__name__)

METRIC_TAG = "metric."  # version tags "metric.<name>" hold the metrics it was registered with

# prompt and generation parameters in (one row per image), PNG bytes out
SIGNATURE = ModelSignature(
    inputs=Schema([
        ColSpec("string", "prompt"),
        ColSpec("string", "negative_prompt", required=False),
        ColSpec("long", "num_inference_steps", required=False),
        ColSpec("double", "guidance_scale", required=False),
        ColSpec("long", "seed", required=False),
        ColSpec("long", "width", required=False),
        ColSpec("long", "height", required=False),
    ]),
    outputs=Schema([ColSpec("binary", "image")]),
)
INPUT_EXAMPLE = pd.DataFrame([{
    "prompt": "a red circle on a blue background", "negative_prompt": "", "num_inference_steps": 1,
    "guidance_scale": 7.5, "seed": 0, "width": 64, "height": 64,
}])
# what the pyfunc needs where it is loaded, pinned to the versions it was registered with (torch without its local
# build tag, so the CUDA or CPU build of that version both satisfy it)
REQUIRED = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "pillow", "pandas", "numpy", "pydantic",
            "pyyaml")
CODE_PACKAGES = ("models", "pipelines", "serving")  # the project code the pyfunc imports, shipped with the model


def pip_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in REQUIRED]


def code_paths(dest: Path) -> list[str]:
    """Copies of the project's packages (Python files only: no shipped weights) for the model's code/ folder, so
    the model loads where this project is not installed (mlflow models serve, another environment)."""
    root = Path(__file__).resolve().parents[1]
    out = []
    for pkg in CODE_PACKAGES:
        for f in (root / pkg).rglob("*.py"):
            target = dest / pkg / f.relative_to(root / pkg)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
        out.append(str(dest / pkg))
    return out


def _cell(row: pd.Series, key: str, default: Any) -> Any:
    v = row.get(key, None)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return default
    return v


def jobs_from_frame(df: pd.DataFrame, pipe: Any) -> list[ImageJob]:
    size = int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))
    jobs = []
    for n, (_, row) in enumerate(df.iterrows()):
        prompt = _cell(row, "prompt", None)
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"row {n}: 'prompt' must be a non-empty string (got {prompt!r})")
        jobs.append(ImageJob(
            prompt=prompt,
            negative_prompt=str(_cell(row, "negative_prompt", "")),
            num_inference_steps=int(_cell(row, "num_inference_steps", 20)),
            guidance_scale=float(_cell(row, "guidance_scale", 7.5)),
            seed=int(_cell(row, "seed", 0)),
            width=int(_cell(row, "width", size)),
            height=int(_cell(row, "height", size)),
        ))
    return jobs


class DiffusersImageModel(mlflow.pyfunc.PythonModel):
    """A diffusers pipeline as an MLflow pyfunc: a DataFrame of prompts in, PNG bytes out."""

    def load_context(self, context) -> None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipe = load_pipeline(context.artifacts["pipeline"], device)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        return pd.DataFrame({"image": generate_images(self.pipe, jobs_from_frame(model_input, self.pipe))})


# ---------------------------------------------------------------------------------------------------
# registration


def _fingerprint(folder: Path, metrics: dict[str, float]) -> str:
    """Same U-Net weights and same metrics: same fingerprint (a rerun registers nothing new)."""
    h = hashlib.sha256()
    for f in sorted((folder / "unet").glob("*")):
        if f.is_file():
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    h.update(chunk)
    h.update(json.dumps(metrics, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copy2(src, dst)


def _better(new: float, old: float | None, mode: str) -> bool:
    if old is None:
        return True
    return new < old if mode == "min" else new > old


def _champion_value(client: mlflow.MlflowClient, name: str, alias: str, metric: str) -> tuple[Any, float | None]:
    try:
        mv = client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None, None
    raw = mv.tags.get(METRIC_TAG + metric)
    return mv, (float(raw) if raw is not None else None)


def _tags(meta: StudentMeta, metrics: dict[str, float], cfg: Config, fingerprint: str) -> dict[str, str]:
    tags = {
        "teacher": meta.teacher or cfg.teacher.uri,
        "family": meta.family or "",
        "preset": meta.preset or "",
        "spec": json.dumps(meta.spec) if meta.spec is not None else "",
        "config_digest": meta.config_digest or cfg.digest(),
        "fingerprint": fingerprint,
        "params": str(meta.params) if meta.params is not None else "",
    }
    tags.update({METRIC_TAG + k: repr(float(v)) for k, v in metrics.items()})
    return {k: v for k, v in tags.items() if v != ""}


def register_student(pipeline_dir: str | Path, metrics: dict[str, float], cfg: Config) -> dict[str, Any]:
    """Log the pipeline folder as a pyfunc model, register it under registry.model_name, set its alias.

    Returns {"name", "version", "alias", "champion_version", "metric", "value", "previous_champion_value",
    "run_id", "model_uri", "skipped"}.
    """
    folder = Path(pipeline_dir)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
    rc = cfg.registry
    metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if rc.metric not in metrics:
        raise ValueError(f"registry.metric {rc.metric!r} is not among the numeric metrics {sorted(metrics)}")
    meta = read_meta_file(folder)

    uri = cfg.tracking_uri()
    client = tracking.client(uri)
    name = rc.model_name
    fingerprint = _fingerprint(folder, metrics)
    try:
        existing = client.search_model_versions(f"name = '{name}' and tag.fingerprint = '{fingerprint}'")
    except mlflow.exceptions.MlflowException:
        existing = []
    if existing:
        mv = client.get_model_version(name, max(int(v.version) for v in existing))
        aliases = list(mv.aliases or [])
        log.info("%s version %s already registers this student with these metrics; skipping", name, mv.version)
        champ, _ = _champion_value(client, name, rc.champion_alias, rc.metric)
        return {"name": name, "version": int(mv.version), "alias": aliases[0] if aliases else None,
                "champion_version": int(champ.version) if champ else None, "metric": rc.metric,
                "value": metrics[rc.metric], "run_id": mv.run_id, "model_uri": f"models:/{name}/{mv.version}",
                "skipped": True}

    value = metrics[rc.metric]
    champ, champ_value = _champion_value(client, name, rc.champion_alias, rc.metric)
    wins = champ is None or _better(value, champ_value, rc.mode)

    tags = _tags(meta, metrics, cfg, fingerprint)
    run_id = meta.mlflow_run_id  # the distill stage's run, or a run of its own
    if run_id is None:
        run_id, _ = tracking.start_run(uri, cfg.mlflow.experiment, f"{cfg.name}-register-{fingerprint}",
                                       f"{cfg.name}-register", cfg.model_dump(mode="json"))
    tracking.log_metrics(uri, run_id, metrics, step=0)
    tracking.set_tags(uri, run_id, {"distillery.stage": "register", "distillery.config_digest": tags["config_digest"]})
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.") as staging:
        # the pyfunc model's folder holds artifacts/pipeline (a hard-linked copy of the student: MLflow names a
        # logged folder after its basename and refuses symlinks), whatever the student's folder is called
        staged = Path(staging) / "pipeline"
        shutil.copytree(folder, staged, copy_function=_link_or_copy)
        model_dir = Path(staging) / "student"
        mlflow.pyfunc.save_model(
            path=str(model_dir),
            python_model=DiffusersImageModel(),
            artifacts={"pipeline": str(staged)},
            signature=SIGNATURE,
            input_example=INPUT_EXAMPLE,
            pip_requirements=pip_requirements(),
            code_paths=code_paths(Path(staging) / "code"),
        )
        client.log_artifacts(run_id, str(model_dir), "student")
    if meta.mlflow_run_id is None:
        tracking.end_run(uri, run_id)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/student"
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = str(client.create_model_version(name, source, run_id=run_id).version)
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    alias = rc.champion_alias if wins else rc.challenger_alias
    client.set_registered_model_alias(name, alias, version)
    log.info("%s version %s: %s=%s (champion: %s) -> alias %s", name, version, rc.metric, value, champ_value, alias)
    return {"name": name, "version": int(version), "alias": alias,
            "champion_version": int(version) if wins else int(champ.version), "metric": rc.metric,
            "value": value, "previous_champion_value": champ_value, "run_id": run_id,
            "model_uri": f"models:/{name}/{version}", "skipped": False}


def read_metrics(eval_dir: str) -> dict[str, float]:
    """The evaluation stage's metrics.json (a local path or any fsspec URI)."""
    import fsspec

    uri = f"{eval_dir.rstrip('/')}/metrics.json"
    try:
        with fsspec.open(uri, "r") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri} not found: run the evaluate stage first") from None
    if not isinstance(data, dict):
        raise ValueError(f"{uri}: expected a JSON object of metric name -> value")
    return data


def run(cfg: Config) -> dict[str, Any]:
    from models.teacher import resolve_model_dir
    from pipelines.storage import model_dir

    metrics = read_metrics(cfg.evaluate.output)
    if cfg.registry.metric not in metrics:
        raise ValueError(
            f"registry.metric {cfg.registry.metric!r} is not in {cfg.evaluate.output}/metrics.json "
            f"(it has {sorted(metrics)}); set registry.metric to one of them"
        )
    folder = resolve_model_dir(model_dir(cfg.evaluate.student))  # s3:// students are copied locally first
    return register_student(folder, metrics, cfg)
