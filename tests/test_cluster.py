"""cluster/ and configs/: the launcher configs pass Ray's own cluster-config validation (what `ray up` runs
before it touches a cloud), the KubeRay manifests carry what KubeRay needs and their embedded Serve config
and runtime env pass Ray's own schemas, the real-run configs validate and match the published recipes,
and a real `ray job submit --runtime-env cluster/runtime_env.yaml` of a tiny demo config runs on a local head
(127.0.0.1, CPU)."""

from __future__ import annotations

import copy
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import ray
import yaml
from PIL import Image

from pipelines.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
BIN = Path(sys.executable).parent


# --- the Ray cluster launcher configs ----------------------------------------------------------------------


def _launcher(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _validate_launcher(config: dict) -> dict:
    """What `ray up` does to a config before it calls the cloud: fill Ray's defaults, validate the schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    full = prepare_config(copy.deepcopy(config))
    validate_config(full)
    return full


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_config_validates_against_ray_schema(name):
    config = _launcher(name)
    full = _validate_launcher(config)
    types = full["available_node_types"]
    head = types[full["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0  # a CPU head
    gpus = sorted(t["resources"].get("GPU", 0) for n, t in types.items() if n != full["head_node_type"])
    assert 8 in gpus and 1 in gpus  # 8-GPU training nodes, 1-GPU serving/tuning nodes
    for n, t in types.items():
        if n != full["head_node_type"]:
            assert 0 <= t["min_workers"] <= t["max_workers"] <= full["max_workers"], n
    # the image's Ray is the Ray the project pins
    assert full["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-py311-gpu")
    # the project is installed on every node from the synced checkout, without local junk
    assert any("pip install" in c and "/home/ray/distillery" in c for c in full["setup_commands"])
    assert full["file_mounts"]["/home/ray/distillery"] == "."
    assert {".venv", "runs", ".offline*"} <= set(full["rsync_exclude"])


def test_aws_workers_reach_s3_through_an_instance_profile():
    config = _launcher("aws.yaml")
    for name, t in config["available_node_types"].items():
        if name != config["head_node_type"]:
            arn = t["node_config"]["IamInstanceProfile"]["Arn"]
            assert arn.startswith("arn:aws:iam::") and ":instance-profile/" in arn, name


@pytest.mark.parametrize("breakage", ["unknown node field", "negative resource", "min above max"])
def test_launcher_validation_rejects_broken_configs(breakage):
    config = _launcher("aws.yaml")
    worker = config["available_node_types"]["gpu-8x-a100"]
    if breakage == "unknown node field":
        worker["min_worker"] = 1  # a typo of min_workers
    elif breakage == "negative resource":
        worker["resources"]["GPU"] = -8
    else:
        worker["min_workers"] = 20
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _validate_launcher(config)


# --- KubeRay ---------------------------------------------------------------------------------------------


def _manifest(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d]
    assert len(docs) == 1
    return docs[0]


def _check_cluster_spec(spec: dict, volume_paths: dict[str, str]) -> None:
    """The RayCluster part of a RayJob/RayService: what KubeRay needs to create the pods."""
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True  # the Ray autoscaler on
    head = spec["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # KubeRay wants strings
    assert head["rayStartParams"]["num-cpus"] == "0"
    containers = head["template"]["spec"]["containers"]
    assert containers[0]["name"] == "ray-head"
    images = {c["image"] for c in containers}
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        assert isinstance(group.get("rayStartParams", {}), dict)
        for c in group["template"]["spec"]["containers"]:
            images.add(c["image"])
            req, lim = c["resources"]["requests"], c["resources"]["limits"]
            if "nvidia.com/gpu" in req or "nvidia.com/gpu" in lim:
                assert req["nvidia.com/gpu"] == lim["nvidia.com/gpu"], group["groupName"]  # GPUs: request == limit
    assert len(images) == 1  # one project image everywhere
    for pod in [head] + spec["workerGroupSpecs"]:
        pspec = pod["template"]["spec"]
        volumes = {v["name"]: v for v in pspec.get("volumes", [])}
        for c in pspec["containers"]:
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"volumeMount {m['name']} has no volume"
                volume_paths[m["mountPath"]] = m["name"]


def test_rayjob_runs_distillery_on_a_config():
    from ray.runtime_env import RuntimeEnv

    m = _manifest("rayjob.yaml")
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == "RayJob" and m["metadata"]["name"]
    spec = m["spec"]
    entry = spec["entrypoint"].split()
    assert entry[:2] == ["distillery", "run"]
    RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))
    assert spec["shutdownAfterJobFinishes"] is True
    mounts: dict[str, str] = {}
    _check_cluster_spec(spec["rayClusterSpec"], mounts)
    # the config file the entrypoint reads is mounted on the head (where the driver runs)
    config_path = entry[2]
    assert any(config_path.startswith(p.rstrip("/") + "/") for p in mounts), config_path
    groups = {g["groupName"]: g for g in spec["rayClusterSpec"]["workerGroupSpecs"]}
    gpu = groups["gpu-8x"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert int(gpu) == 8
    assert int(gpu) >= load_config(REPO / "configs" / "sd15-bk-small.yaml").distill.num_workers


def test_rayservice_serves_the_champion_with_autoscaling():
    from ray.serve.schema import ServeDeploySchema

    from pipelines.config import parse_config
    from serving import app as serving_app

    m = _manifest("rayservice.yaml")
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == "RayService" and m["metadata"]["name"]
    spec = m["spec"]
    serve = ServeDeploySchema.model_validate(yaml.safe_load(spec["serveConfigV2"]))  # Ray Serve's own schema
    (app,) = serve.applications
    # the builder the serve stage provides, with its args as the serve stage writes them
    cfg = parse_config(app.args["config"], source="serveConfigV2 args")
    expected = serving_app.serve_config(cfg)["applications"][0]
    assert app.import_path == expected["import_path"] and callable(serving_app.app_builder)
    assert app.args.keys() == expected["args"].keys()
    # the champion of a registered model, autoscaled by Serve
    assert cfg.serve.model is None and cfg.registry.champion_alias == "champion"
    assert cfg.registry.model_name == load_config(REPO / "configs" / "sd15-bk-small.yaml").registry.model_name
    assert cfg.serve.max_replicas > cfg.serve.min_replicas >= 1 and cfg.serve.num_gpus == 1
    mounts: dict[str, str] = {}
    _check_cluster_spec(spec["rayClusterConfig"], mounts)
    (group,) = spec["rayClusterConfig"]["workerGroupSpecs"]
    # the Ray autoscaler may add a GPU pod for every Serve replica
    assert group["maxReplicas"] >= cfg.serve.max_replicas
    container = group["template"]["spec"]["containers"][0]
    assert int(container["resources"]["requests"]["nvidia.com/gpu"]) == cfg.serve.num_gpus
    assert float(container["resources"]["requests"]["cpu"]) >= cfg.serve.num_cpus


# --- runtime env and configs ------------------------------------------------------------------------------


def test_runtime_env_is_valid_and_keeps_uploads_small():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # Ray's own validation (types of working_dir, excludes, env_vars)
    assert env["working_dir"] == "."
    assert {".git", ".venv", "runs", ".offline*"} <= set(env["excludes"])
    assert "MLFLOW_TRACKING_URI" in env["env_vars"]
    assert not any(k.startswith("AWS_SECRET") for k in env["env_vars"])  # credentials come from the nodes


RECIPES = {
    # config: (teacher, preset, resolution, global batch, lr)
    "sd15-bk-small.yaml": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "bk-small", 512, 256, 5e-5),
    "sd15-bk-tiny.yaml": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "bk-tiny", 512, 256, 5e-5),
    "sdxl-ssd-1b.yaml": ("stabilityai/stable-diffusion-xl-base-1.0", "ssd-1b", 1024, 128, 1e-5),
    "sdxl-vega.yaml": ("stabilityai/stable-diffusion-xl-base-1.0", "vega", 1024, 128, 1e-5),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_real_run_configs_match_the_recipes(name):
    from models.student import PRESETS

    teacher, preset, resolution, global_batch, lr = RECIPES[name]
    cfg = load_config(REPO / "configs" / name)  # validation only: no model is loaded
    assert cfg.name == name.removesuffix(".yaml")
    assert cfg.teacher.uri == teacher and cfg.student.preset == preset and preset in PRESETS
    assert cfg.data.resolution == resolution and cfg.data.source.startswith("s3://")
    assert cfg.work_dir.startswith("s3://") and cfg.data.output.startswith(cfg.work_dir)
    d = cfg.distill
    assert d.use_gpu and d.deepspeed and d.zero_stage in (2, 3) and d.precision == "bf16"
    assert d.num_workers * d.batch_size * d.grad_accum == global_batch
    assert d.num_workers <= 8  # one 8-GPU node (cluster/aws.yaml, cluster/kuberay/rayjob.yaml)
    assert d.lr == lr and d.lr_schedule == "constant"
    assert (d.loss.task, d.loss.out, d.loss.feat) == (1.0, 1.0, 1.0)
    if preset.startswith("bk-"):
        assert d.max_steps == 50_000
    assert cfg.stages[0] == "prepare" and "serve" not in cfg.stages  # jobs end; serving is the RayService
    assert f"{resolution}x{resolution}" in cfg.serve.sizes


# --- a real job on a real (local) cluster ----------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _wait_http(url: str, proc: subprocess.Popen, timeout: float, token: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        try:
            req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


@pytest.fixture
def ray_head():
    """`ray start --head` on 127.0.0.1 with its own ports, temp dir and auth token; yields (dashboard URL, temp
    dir, the environment a client needs: RAY_ADDRESS and the token, as a user exports them).

    Stopped by SIGTERM to the `ray start --block` process we started, which stops the processes it started:
    `ray stop` would stop every Ray on this machine, other tests' included."""
    (gcs, dash, client, agent, agent_grpc, rt_agent, metrics, node_mgr, obj_mgr) = _free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray puts unix sockets under it
    token = secrets.token_hex(32)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--num-cpus=2", "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}", f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={rt_agent}",
        f"--metrics-export-port={metrics}", f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]
    log = open(Path(temp_dir) / "ray-start.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_http(url + "/api/version", proc, 120, token)
        _wait_http(url + "/api/jobs/", proc, 60, token)
        yield url, Path(temp_dir), {**env, "RAY_ADDRESS": url}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _write_dataset(folder: Path, n: int) -> None:
    """n small images with .txt captions (the imagefolder layout)."""
    folder.mkdir(parents=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        a = np.empty((48, 48, 3), np.uint8)
        a[:] = rng.integers(0, 200, 3)
        a[8:24, 8:24] = rng.integers(200, 256, 3)
        Image.fromarray(a).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"a light square on a dark background, number {i}")


def _job_config(tmp: Path, work_dir: str, source: str, stages: list[str]) -> Path:
    """configs/demo.yaml with tiny sizes, the given stages, and absolute/remote URIs (the job runs elsewhere)."""
    tree = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    tree.update(name="job-test", work_dir=work_dir, stages=stages)
    tree["data"].update(source=source, resolution=32, val_fraction=0.25, embed_batch_size=4)
    tree["distill"].update(num_workers=1, batch_size=2, max_steps=2, val_every=2, checkpoint_every=2,
                           val_batches=1, deepspeed=False)
    tree["evaluate"].update(num_prompts=2, steps=2, latency_repeats=1, embedding_samples=2, batch_size=2)
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    load_config(path)
    return path


def _check_outputs(cfg_path: Path, stages: list[str], n_images: int) -> None:
    from pipelines import storage

    cfg = load_config(cfg_path)
    if "prepare" in stages:
        import json

        manifest = json.loads(storage.read_bytes(storage.join(cfg.data.output, "manifest.json")))
        assert manifest["complete"] and sum(manifest["rows"].values()) == n_images, manifest
        assert manifest["rows"]["val"] >= 1 and not manifest["skipped"]
    if "distill" in stages:
        assert storage.exists(storage.join(cfg.distill.output, "unet", "config.json"))


def _ray(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The `ray` command line, as a user runs it from the checkout."""
    return subprocess.run([str(BIN / "ray"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("stages", [["prepare"]])
def test_ray_job_submit_runs_the_demo_config(ray_head, s3_bucket, tmp_path, stages):
    """The README's path: `ray job submit --runtime-env cluster/runtime_env.yaml -- python -m
    pipelines run CONFIG` to a head, following the logs; data and results on S3 (the local S3 server), its
    endpoint and credentials in the job's env as a cluster's nodes would have them."""
    import boto3

    _, temp_dir, client_env = ray_head
    n_images = 8
    _write_dataset(tmp_path / "data", n_images)
    s3 = boto3.client("s3")
    bucket = s3_bucket.removeprefix("s3://")
    for f in sorted((tmp_path / "data").iterdir()):
        s3.upload_file(str(f), bucket, f"data/{f.name}")
    cfg_path = _job_config(tmp_path, f"{s3_bucket}/run", f"{s3_bucket}/data", stages)

    # cluster/runtime_env.yaml as shipped, with this machine's services in env_vars
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    env["env_vars"] = {
        **{k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                      "AWS_DEFAULT_REGION")},
        "DISTILLERY_CACHE": os.environ["DISTILLERY_CACHE"],
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
    }
    env_path = tmp_path / "runtime_env.yaml"
    env_path.write_text(yaml.safe_dump(env))

    job_id = f"distillery-test-{uuid.uuid4().hex[:8]}"
    try:
        # without --no-wait: follows the job's logs until it ends; exits 1 if the job failed
        submit = _ray(client_env, "job", "submit", "--submission-id", job_id, "--runtime-env", str(env_path),
                      "--", "python", "-m", "pipelines", "run", str(cfg_path), timeout=300)
    except subprocess.TimeoutExpired as err:
        _ray(client_env, "job", "stop", job_id)
        logs = _ray(client_env, "job", "logs", job_id).stdout
        pytest.fail(f"job {job_id} did not end within {err.timeout:.0f}s; its logs so far:\n{logs[-6000:]}")
    status = _ray(client_env, "job", "status", job_id).stdout
    out = submit.stdout + submit.stderr
    assert submit.returncode == 0 and f"Job '{job_id}' succeeded" in status, (
        f"job {job_id}: submit exited {submit.returncode}; status:\n{status}\noutput and logs:\n{out[-6000:]}")
    for i, stage in enumerate(stages, 1):
        assert f"stage {i}/{len(stages)} {stage}: done" in out, out[-3000:]
    _check_outputs(cfg_path, stages, n_images)

    # what was uploaded: the code, not the local venv, runs or caches
    (pkg,) = [p for p in (temp_dir / "session_latest" / "runtime_resources" / "working_dir_files").iterdir()
              if p.is_dir()]
    names = {p.name for p in pkg.iterdir()}
    assert {"pipelines", "models", "configs"} <= names and (pkg / "pipelines" / "run.py").exists()
    assert not names & {".venv", "runs", ".git"} and not any(n.startswith(".offline") for n in names), names
    # the shipped teacher travels whole (builtin:shapes-sd1 loads on the cluster), and Ray saw one working_dir
    shipped = pkg / "models" / "assets" / "shapes-sd1"
    assert (shipped / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (shipped / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert "working_dir" not in out or "overriding" not in out.lower(), out[-3000:]
    size = sum(p.stat().st_size for p in pkg.rglob("*") if p.is_file())
    assert size < 20 * 2**20, f"working_dir upload is {size / 2**20:.1f} MiB"

    # a failing job: its status and the error come back to the user, the exit code says so
    bad = tmp_path / "bad.yaml"
    bad.write_text(cfg_path.read_text().replace("distill:", "distil:"))  # a typo'd section
    failed = _ray(client_env, "job", "submit", "--runtime-env", str(env_path), "--working-dir", ".", "--",
                  "python", "-m", "pipelines", "run", str(bad))
    out = failed.stdout + failed.stderr
    assert failed.returncode == 1 and "failed" in out, out[-3000:]
    assert "distil: unknown field" in out, out[-3000:]  # the job's own error message, in the followed logs
