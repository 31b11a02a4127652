"""Faults and inputs from the outside: concurrent fetches of one remote teacher, names that would escape work_dir,
credentials that must stay out of job metadata and MLflow, and config errors reported at the edge (one line, the
field named, no traceback, before Ray starts)."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.config import ConfigError, parse_config

REPO = Path(__file__).resolve().parents[1]
SHAPES = REPO / "models" / "assets" / "shapes-sd1"


def _resolve(uri: str, cache: str, env: dict, out: multiprocessing.Queue) -> None:
    os.environ.update(env, DISTILLERY_CACHE=cache)
    try:
        from pipelines.storage import model_dir

        out.put(("ok", model_dir(uri)))
    except Exception as e:  # noqa: BLE001 - the parent reports it
        out.put(("error", f"{type(e).__name__}: {e}"))


def test_concurrent_fetches_of_one_remote_teacher(s3_bucket, s3_server, tmp_path):
    """Four processes on one node load the same s3:// teacher at once (every Train worker and embedding actor
    does on a fresh node): one downloads, all get the same complete folder, no .partial is left."""
    import boto3

    s3 = boto3.client("s3")
    bucket = s3_bucket.removeprefix("s3://")
    for f in SHAPES.rglob("*"):
        if f.is_file():
            s3.upload_file(str(f), bucket, f"teacher/{f.relative_to(SHAPES)}")
    cache = str(tmp_path / "cache")
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_resolve, args=(f"{s3_bucket}/teacher", cache, s3_server.env, out))
             for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert [r[0] for r in results] == ["ok"] * 4, results
    folders = {r[1] for r in results}
    assert len(folders) == 1
    folder = Path(folders.pop())
    want = sorted(str(f.relative_to(SHAPES)) for f in SHAPES.rglob("*") if f.is_file())
    assert sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file()) == want
    assert not list(folder.parent.glob("*.partial"))
    # the loaders in models/ take local folders only: a remote URI is refused with its name, not fetched there
    from models.teacher import load_teacher

    with pytest.raises(ValueError, match="a remote folder; fetch it") as err:
        load_teacher(f"{s3_bucket}/teacher", components=("unet",))
    assert f"{s3_bucket}/teacher" in str(err.value)


@pytest.mark.parametrize("tree, field", [
    ({"name": "../../../elsewhere"}, "name"),
    ({"name": "a/b"}, "name"),
    ({"distill": {"run_name": "../x"}}, "distill.run_name"),
    ({"steps": {"run_name": ".."}}, "steps.run_name"),
])
def test_names_that_become_paths_stay_inside_work_dir(tree, field):
    with pytest.raises(ConfigError, match=rf"{field}: .*folder name"):
        parse_config(tree)


def test_unknown_presets_are_refused_by_config_validate():
    with pytest.raises(ConfigError, match="student.preset"):
        parse_config({"student": {"preset": "bk-smal"}})
    with pytest.raises(ConfigError, match=r"tune.presets.1"):
        parse_config({"tune": {"presets": ["bk-base", "bk-tinyy"]}})
    from typing import get_args

    from models.student import PRESETS
    from pipelines.config import PresetName

    assert set(get_args(PresetName)) == set(PRESETS)


def test_secrets_in_the_config_never_reach_mlflow_params():
    from pipelines.tracking import flatten

    cfg = parse_config({"ray": {"runtime_env": {"env_vars": {"AWS_SECRET_ACCESS_KEY": "SECRETVALUE123",
                                                             "HF_TOKEN": "hf_SECRETVALUE", "MY_PASSWORD": "pw1",
                                                             "PLAIN": "visible"}}},
                        "data": {"key_column": "id"}, "serve": {"api_key_env": "API_KEY"}})
    flat = flatten(cfg.model_dump(mode="json"))
    text = repr(flat)
    for secret in ("SECRETVALUE123", "hf_SECRETVALUE", "pw1"):
        assert secret not in text
    assert flat["ray.runtime_env.env_vars.PLAIN"] == "visible"
    assert flat["ray.runtime_env.env_vars.HF_TOKEN"] == "***"
    assert flat["data.key_column"] == "id" and flat["serve.api_key_env"] == "API_KEY"


def test_training_workers_get_no_credentials(monkeypatch):
    from pipelines.train import trainer_configs, worker_env

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAPLANTEDKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "planted-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "planted-token")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    env = worker_env(False)
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(env)
    run = trainer_configs(parse_config({}), "job")["run_config"]
    assert "planted" not in repr(run.worker_runtime_env) and "AKIAPLANTED" not in repr(run.worker_runtime_env)


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    return subprocess.run([sys.executable, "-m", "pipelines", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("sets, field", [
    (["teacher.uri=/no/such/teacher", "data.source=."], "teacher.uri"),
    (["teacher.uri=./nowhere/teacher"], "teacher.uri"),
    (["data.source=/no/such/images"], "data.source"),
    (["student.preset=bk-smal"], "student.preset"),
])
def test_config_errors_at_the_edge_are_one_line_before_ray_starts(tmp_path, sets, field):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"work_dir: {tmp_path / 'w'}\nstages: [prepare, distill]\n")
    r = _cli(tmp_path, "run", str(cfg), *[a for s in sets for a in ("--set", s)])
    assert r.returncode == 2, r.stderr
    assert field in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "Started a local Ray" not in r.stderr + r.stdout
    assert not (tmp_path / "w").exists()


def test_a_gpu_config_without_a_gpu_fails_at_once_naming_each_field(tmp_path, mlflow_server):
    """The README's ablation command (configs/shapes-ablation.yaml asks for GPUs) where Ray has none (ray.num_gpus=0,
    as on a laptop): a local Ray never gains a GPU, so a stage that asks for one would wait forever. Instead the
    first stage that asks fails at once, one line naming its field, before it writes anything; with that field
    set to 0 the run goes on to the next stage that asks (the tune stage's trials), which is named in turn."""
    work = tmp_path / "w"
    common = ["run", "configs/shapes-ablation.yaml", "--set", f"work_dir={work}", "--set", "ray.num_gpus=0",
              "--set", f"mlflow.tracking_uri={mlflow_server.url}", "--set", "ray.include_dashboard=false"]
    r = _cli(tmp_path, *common)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("data.embed_num_gpus: a task or worker asks for 0.5 GPU") and "Traceback" not in r.stderr
    assert "set data.embed_num_gpus: 0" in last
    assert not work.exists()  # failed before reading or writing anything

    r = _cli(tmp_path, *common, "--set", "data.embed_num_gpus=0", "--set", "data.source=builtin:shapes?n=24&seed=0")
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("tune.gpus_per_trial: a task or worker asks for 0.06 GPU"), last
    assert (work / "cache" / "manifest.json").is_file()  # the prepare stage, on the CPU now, finished
    # the distill stage on its own, with the cache there (its trainer is the steps stage's and a tune trial's too)
    r = _cli(tmp_path, *common, "--set", "stages=[distill]")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("distill.use_gpu: a task"), r.stderr


def test_a_cluster_short_of_gpus_is_warned_about_not_refused(ray_local, caplog):
    """On a Ray that the stage did not start (a cluster, here the tests' own), an autoscaler may still add GPU nodes:
    asking for more GPUs than it has is a warning naming the field, not an error."""
    import logging

    from pipelines.storage import require_gpus

    with caplog.at_level(logging.WARNING, logger="pipelines.storage"):
        require_gpus(ray_local, "distill.use_gpu", 1e6, "distill.use_gpu: false")
        require_gpus(ray_local, "tune.gpus_per_trial", 0, "tune.gpus_per_trial: 0")
    warned = [r.getMessage() for r in caplog.records if r.name == "pipelines.storage"]
    assert len(warned) == 1 and warned[0].startswith("distill.use_gpu: a task or worker asks for 1e+06 GPU")


def test_evaluate_and_serve_refuse_gpus_a_local_ray_lacks(ray_local, monkeypatch, tmp_path):
    """The evaluate stage (as a Ray task) and `distillery serve` check what they ask for, as the stages the CLI test
    above runs do: here the tests' Ray counts as one the job started."""
    from pipelines import evaluate, storage
    from serving import app

    monkeypatch.setattr(storage, "_local_ray", ray_local.get_runtime_context().gcs_address)
    cfg = parse_config({"work_dir": str(tmp_path), "evaluate": {"run_on": "ray", "num_gpus": 1e6},
                        "serve": {"model": str(SHAPES), "num_gpus": 1e6}})
    with pytest.raises(ConfigError, match=r"^evaluate\.num_gpus: a task or worker asks for 1e\+06 GPU"):
        evaluate.run(cfg)
    with pytest.raises(ConfigError, match=r"^serve\.num_gpus: .* or set serve\.num_gpus: 0"):
        app.start(cfg)
    assert not any(tmp_path.iterdir())


def test_planted_credentials_reach_no_log_mlflow_or_output(s3_bucket, s3_server, tmp_path):
    """A whole `distillery run` (prepare from S3, distill on a local Ray, outputs to S3, MLflow in SQLite) with
    recognizable credentials in the standard AWS variables: none of them appears in Ray's session logs, the MLflow
    store, anything the stages wrote, or the terminal."""
    import shutil
    import tempfile

    import boto3
    import yaml

    from pipelines.formats import write_shapes

    write_shapes(f"{s3_bucket}/data", "parquet", 24, seed=0)
    planted = {"AWS_ACCESS_KEY_ID": "AKIAPLANTEDKEYID0042", "AWS_SECRET_ACCESS_KEY": "planted+Secret/Value0042xyz",
               "AWS_SESSION_TOKEN": "PlantedSessionToken0042"}
    ray_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(s3_server.env, **planted, RAY_TMPDIR=ray_dir, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db",
               PYTHONPATH=str(REPO))
    cfg = {"name": "creds", "work_dir": f"{s3_bucket}/run", "stages": ["prepare", "distill"],
           "ray": {"num_cpus": 2, "include_dashboard": False},
           "teacher": {"uri": "builtin:tiny-sd1"},
           "data": {"source": f"{s3_bucket}/data", "resolution": 32, "val_fraction": 0.2, "embed_batch_size": 8},
           "distill": {"num_workers": 1, "deepspeed": False, "batch_size": 2, "max_steps": 2, "val_every": 2,
                       "checkpoint_every": 2, "val_batches": 1, "sample_steps": 1}}
    path = tmp_path / "creds.yaml"
    path.write_text(yaml.safe_dump(cfg))
    try:
        r = subprocess.run([sys.executable, "-m", "pipelines", "run", str(path)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        secrets = [v.encode() for v in planted.values()]
        found = []
        for root in (Path(ray_dir), tmp_path):
            for f in root.rglob("*"):
                if f.is_file() and not f.is_symlink():
                    data = f.read_bytes()
                    found += [f"{f}: {s.decode()}" for s in secrets if s in data]
        s3 = boto3.client("s3")
        bucket = s3_bucket.removeprefix("s3://")
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                data = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
                found += [f"s3 {obj['Key']}: {s.decode()}" for s in secrets if s in data]
        found += [f"terminal: {s.decode()}" for s in secrets if s.decode() in r.stdout + r.stderr]
        assert not found, found
        # without the dashboard Ray has no State API, and its Train run's placement-group cleaner would say so
        # once a second for the whole run
        assert "Failed to query Ray Train Controller actor state" not in r.stdout + r.stderr, r.stderr[-3000:]
        assert any(Path(ray_dir).rglob("*.log")), "Ray wrote no session logs where the test looked"
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)


def test_a_model_copy_that_fails_part_way_never_looks_finished(s3_bucket, tmp_path):
    """upload_folder, which puts every exported model in place: a copy that breaks on one file (a dangling link,
    read after the others) leaves a local destination's earlier model whole and no distillery.json on S3, the
    file by which a rerun takes a model for finished; once the folder is whole, both copies complete."""
    import json

    import boto3

    from pipelines.train import upload_folder

    src = tmp_path / "model"
    (src / "unet").mkdir(parents=True)
    (src / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(os.urandom(4096))
    (src / "distillery.json").write_text(json.dumps({"step": 2}))
    (src / "unet" / "zz-broken.bin").symlink_to(tmp_path / "nowhere")
    dest = tmp_path / "out"
    (dest / "unet").mkdir(parents=True)
    (dest / "distillery.json").write_text(json.dumps({"step": 1}))
    (dest / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"old")
    with pytest.raises(Exception):  # noqa: B017 - whichever error the copy raises
        upload_folder(src, str(dest))
    assert json.loads((dest / "distillery.json").read_text()) == {"step": 1}
    assert (dest / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]  # no partial copy left beside it
    s3 = boto3.client("s3")
    bucket = s3_bucket.removeprefix("s3://")

    def keys() -> list[str]:
        objects = s3.list_objects_v2(Bucket=bucket, Prefix="out/").get("Contents", [])
        return [o["Key"] for o in objects if not o["Key"].endswith("/")]  # not pyarrow's folder markers

    with pytest.raises(Exception):  # noqa: B017
        upload_folder(src, f"{s3_bucket}/out")
    assert "out/distillery.json" not in keys(), keys()
    (src / "unet" / "zz-broken.bin").unlink()
    (tmp_path / ".out.partial-0badc0de" / "unet").mkdir(parents=True)  # as a copy killed part way leaves it
    upload_folder(src, str(dest))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]
    upload_folder(src, f"{s3_bucket}/out")
    assert json.loads((dest / "distillery.json").read_text()) == {"step": 2}
    assert len((dest / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()) == 4096
    assert sorted(keys()) == ["out/distillery.json", "out/unet/diffusion_pytorch_model.safetensors"]


def test_the_local_ray_setup_hook_runs_where_the_package_cannot_be_imported(tmp_path):
    # A Ray worker runs its setup hook before the driver's code path is on sys.path: a hook pickled by reference
    # to pipelines.storage killed every worker of a checkout run as `python -m pipelines` without installing it.
    import cloudpickle

    from pipelines.storage import state_api_quieter

    (tmp_path / "hook.pkl").write_bytes(cloudpickle.dumps(state_api_quieter()))
    worker = (
        "import importlib.abc, logging, pickle, sys\n"
        "class NoPipelines(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'pipelines': raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, NoPipelines())\n"
        "pickle.loads(open(sys.argv[1], 'rb').read())()\n"
        "name = 'ray.train.v2._internal.execution.controller.placement_group_cleaner'\n"
        "print(logging.getLogger(name).level)\n"
    )
    done = subprocess.run([sys.executable, "-c", worker, str(tmp_path / "hook.pkl")], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["40"]  # logging.ERROR
