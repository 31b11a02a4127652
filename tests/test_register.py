"""The register stage against a real MLflow server (SQLite registry): champion/challenger aliases, tags,
idempotent reruns, logging into the distill run, and the registered model loading back and generating."""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from PIL import Image

from pipelines import register
from pipelines.config import parse_config

REPO = Path(__file__).resolve().parents[1]


def _cfg(tmp_path, server, **registry_kw):
    return parse_config({
        "work_dir": str(tmp_path / "work"),
        "mlflow": {"tracking_uri": server.url, "experiment": "test-registry"},
        "registry": {"model_name": f"student-{uuid.uuid4().hex[:8]}", **registry_kw},
    })


@pytest.fixture(scope="module")
def student_dir(tiny_sd1_dir, tmp_path_factory):
    """A student folder as `distillery student build` writes it (its distillery.json by the real producer)."""
    from pipelines.cli import main

    d = tmp_path_factory.mktemp("student") / "pipe"
    assert main(["student", "build", "--teacher", "builtin:tiny-sd1", "--preset", "identity", "--out", str(d),
                 "--no-model-card"]) == 0
    return d


def test_worse_second_model_keeps_champion(mlflow_server, student_dir, tmp_path):
    cfg = _cfg(tmp_path, mlflow_server)
    first = register.register_student(student_dir, {"fid_student_vs_teacher": 10.0, "clip_score_student": 0.3}, cfg)
    assert (first["version"], first["alias"]) == (1, "champion")
    second = register.register_student(student_dir, {"fid_student_vs_teacher": 12.5}, cfg)
    assert (second["version"], second["alias"], second["champion_version"]) == (2, "challenger", 1)

    client = mlflow.MlflowClient(mlflow_server.url)
    name = cfg.registry.model_name
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    assert client.get_model_version_by_alias(name, "challenger").version == "2"
    tags = client.get_model_version(name, "1").tags
    assert tags["teacher"] == "builtin:tiny-sd1" and tags["preset"] == "identity"
    assert tags["config_digest"] == cfg.digest() and tags["family"] == "sd1"  # no config made it: this one's
    assert int(tags["params"]) == json.loads((student_dir / "distillery.json").read_text())["params"]
    assert float(tags["metric.fid_student_vs_teacher"]) == 10.0 and float(tags["metric.clip_score_student"]) == 0.3

    # a better one takes the alias; with mode=max the comparison flips
    third = register.register_student(student_dir, {"fid_student_vs_teacher": 4.0}, cfg)
    assert third["alias"] == "champion" and client.get_model_version_by_alias(name, "champion").version == "3"
    cfg.registry.mode = "max"
    fourth = register.register_student(student_dir, {"fid_student_vs_teacher": 3.0}, cfg)
    assert fourth["alias"] == "challenger"


def test_rerun_is_idempotent(mlflow_server, student_dir, tmp_path):
    cfg = _cfg(tmp_path, mlflow_server)
    a = register.register_student(student_dir, {"fid_student_vs_teacher": 7.0}, cfg)
    b = register.register_student(student_dir, {"fid_student_vs_teacher": 7.0}, cfg)
    assert b["skipped"] and b["version"] == a["version"] and b["alias"] == "champion"
    versions = mlflow.MlflowClient(mlflow_server.url).search_model_versions(f"name = '{cfg.registry.model_name}'")
    assert len(versions) == 1


def test_registered_model_loads_and_generates(mlflow_server, student_dir, tmp_path):
    cfg = _cfg(tmp_path, mlflow_server)
    register.register_student(student_dir, {"fid_student_vs_teacher": 1.0}, cfg)
    uri = f"models:/{cfg.registry.model_name}@champion"

    # the artifacts layout the serving stage relies on: a plain diffusers folder at artifacts/pipeline
    local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path / "dl"))
    assert (tmp_path / "dl" / "artifacts" / "pipeline" / "model_index.json").is_file(), local

    model = mlflow.pyfunc.load_model(uri)
    assert model.metadata.signature.inputs.input_names()[0] == "prompt"
    df = pd.DataFrame([
        {"prompt": "a red circle", "num_inference_steps": 2, "seed": 1, "width": 64, "height": 64},
        {"prompt": "a red circle", "num_inference_steps": 2, "seed": 1, "width": 64, "height": 64},
        {"prompt": "a red circle", "num_inference_steps": 2, "seed": 2, "width": 64, "height": 64},
    ])
    out = model.predict(df)
    imgs = list(out["image"])
    assert len(imgs) == 3
    assert Image.open(io.BytesIO(imgs[0])).size == (64, 64)
    assert imgs[0] == imgs[1] and imgs[0] != imgs[2]  # same seed, same image

    with pytest.raises(Exception, match="prompt"):
        model.predict(pd.DataFrame([{"seed": 1}]))


def test_logs_into_the_distill_run(mlflow_server, student_dir, tmp_path):
    cfg = _cfg(tmp_path, mlflow_server)
    mlflow.set_tracking_uri(mlflow_server.url)
    mlflow.set_experiment("test-registry")
    with mlflow.start_run() as run:
        pass
    d = tmp_path / "pipe"
    shutil.copytree(student_dir, d)
    meta = json.loads((d / "distillery.json").read_text())
    (d / "distillery.json").write_text(json.dumps({**meta, "mlflow_run_id": run.info.run_id}))
    out = register.register_student(d, {"fid_student_vs_teacher": 2.0}, cfg)
    assert out["run_id"] == run.info.run_id
    mv = mlflow.MlflowClient(mlflow_server.url).get_model_version(cfg.registry.model_name, str(out["version"]))
    assert mv.run_id == run.info.run_id
    assert mlflow.get_run(run.info.run_id).data.metrics["fid_student_vs_teacher"] == 2.0


def test_run_reads_evaluation_metrics(mlflow_server, student_dir, tmp_path):
    cfg = _cfg(tmp_path, mlflow_server)
    cfg.evaluate.student = str(student_dir)
    cfg.evaluate.output = str(tmp_path / "eval")
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        register.run(cfg)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps({"clip_score_student": 0.2, "speedup_step": 1.7}))
    with pytest.raises(ValueError, match="fid_student_vs_teacher.*clip_score_student"):
        register.run(cfg)
    cfg.registry.metric, cfg.registry.mode = "speedup_step", "max"
    out = register.run(cfg)
    assert out["alias"] == "champion" and out["value"] == 1.7


def test_not_a_pipeline_folder(mlflow_server, tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        register.register_student(tmp_path, {"fid_student_vs_teacher": 1.0}, _cfg(tmp_path, mlflow_server))


HIDE_PROJECT = """
import sys
editable = lambda f: (getattr(f, "__module__", "") or type(f).__module__).startswith("__editable__")
sys.meta_path[:] = [f for f in sys.meta_path if not editable(f)]
sys.path_hooks[:] = [h for h in sys.path_hooks if not editable(h)]
sys.path_importer_cache.clear()
repo = "{repo}"
sys.path[:] = [p for p in sys.path if p and p != repo and not (p.startswith(repo + "/") and "/.venv/" not in p)]
"""


def _env_without_project(tmp_path, server) -> dict[str, str]:
    """The environment of a Python process (and of every Python process it starts) that cannot import this
    project: a sitecustomize drops its editable install and its checkout from the import path."""
    site = tmp_path / "hide-project"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(HIDE_PROJECT.format(repo=REPO))
    return {**os.environ, "MLFLOW_TRACKING_URI": server.url, "PYTHONPATH": str(site)}


def test_registered_model_loads_where_the_project_is_not_installed(mlflow_server, student_dir, tmp_path):
    """`mlflow.pyfunc.load_model` in a process that cannot import this project (its editable install and checkout
    hidden): the model carries its own code (code_paths) and pinned requirements."""
    import subprocess
    import sys
    import textwrap

    cfg = _cfg(tmp_path, mlflow_server)
    register.register_student(student_dir, {"fid_student_vs_teacher": 1.0}, cfg)
    uri = f"models:/{cfg.registry.model_name}@champion"
    script = textwrap.dedent(f"""
        try:
            import pipelines  # noqa: F401
            raise SystemExit("the project is still importable")
        except ImportError:
            pass
        import mlflow, pandas as pd
        model = mlflow.pyfunc.load_model("{uri}")
        out = model.predict(pd.DataFrame([{{"prompt": "a red circle", "num_inference_steps": 2, "seed": 1}}]))
        print("images", len(out["image"]), len(out["image"][0]) > 100)
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=_env_without_project(tmp_path, mlflow_server),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "images 1 True" in r.stdout, (r.stdout + r.stderr)[-3000:]
    reqs = mlflow.pyfunc.get_model_dependencies(uri)
    pins = Path(reqs).read_text()
    for name in ("torch==", "diffusers==", "pillow==", "pandas=="):
        assert name in pins, pins


def test_mlflow_models_serve_answers_where_the_project_is_not_installed(mlflow_server, student_dir, tmp_path):
    """MLflow's own scoring server (`mlflow models serve`, the local environment manager) serves the registered
    student over HTTP from a process tree that cannot import this project."""
    import base64
    import signal
    import subprocess
    import sys
    import time

    import requests

    from pipelines.local import free_port

    cfg = _cfg(tmp_path, mlflow_server)
    register.register_student(student_dir, {"fid_student_vs_teacher": 1.0}, cfg)
    port = free_port()
    env = _env_without_project(tmp_path, mlflow_server)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m",
                             f"models:/{cfg.registry.model_name}@champion", "-p", str(port), "-h", "127.0.0.1",
                             "--env-manager", "local", "-w", "1"], cwd=tmp_path, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, ready = time.time() + 240, False
        while time.time() < deadline and proc.poll() is None and not ready:
            try:
                ready = requests.get(url + "/ping", timeout=2).status_code == 200
            except requests.RequestException:
                time.sleep(1)
        assert ready, (tmp_path / "serve.log").read_text(errors="replace")[-3000:]
        r = requests.post(url + "/invocations", timeout=180, json={
            "dataframe_records": [{"prompt": "a red circle", "num_inference_steps": 2, "seed": 1}]})
        assert r.status_code == 200, r.text[:2000]
        rows = r.json()["predictions"]
        png = base64.b64decode(rows[0]["image"]) if isinstance(rows[0]["image"], str) else None
        assert png is not None and Image.open(io.BytesIO(png)).size == (64, 64), str(rows)[:500]
        assert "No module named 'pipelines'" not in (tmp_path / "serve.log").read_text(errors="replace")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
