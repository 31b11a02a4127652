"""Fixtures: real local servers (moto's S3 server, an MLflow server with SQLite), a local Ray with 2
CPUs, and tiny teachers built offline. Servers start once per session."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from pipelines import local


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    # builtin teachers are built into this cache; never the user's home
    os.environ["DISTILLERY_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = local.start_s3(log_dir=tmp_path_factory.mktemp("s3"))
    old = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh bucket on the local S3 server; returns its s3:// URI."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    local.make_bucket(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = local.start_mlflow(tmp_path_factory.mktemp("mlflow"))
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = server.url
    yield server
    server.stop()
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="session")
def ray_local(s3_server, mlflow_server):
    """A local Ray with 2 CPUs whose workers see the local S3 and MLflow servers (started first, so
    their addresses and credentials are in the environment the workers inherit)."""
    import ray

    if not ray.is_initialized():
        env = {k: os.environ[k] for k in [*s3_server.env, *mlflow_server.env, "DISTILLERY_CACHE"]}
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory) -> Path:
    from models.tiny import save_tiny

    return save_tiny("tiny-sd1", tmp_path_factory.mktemp("tiny") / "sd1")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module: tiny U-Nets are dominated by per-op overhead, and two threads on a shared
    2-core machine thrash."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sd1(tiny_sd1_dir):
    """The tiny SD 1.x teacher, loaded once per module."""
    from models.teacher import load_teacher

    return load_teacher(str(tiny_sd1_dir), dtype="float32")


@pytest.fixture(scope="module")
def sd1_batch(sd1):
    """Four 32 px latents with their prompts' conditioning and the empty prompt's."""
    import torch

    from models.teacher import encode_prompts

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 8, 8, generator=g)
    prompts = ["a red circle", "a blue square", "two green stars", "a yellow triangle"]
    cond = {"encoder_hidden_states": encode_prompts(sd1, prompts)["prompt_embeds"]}
    uncond = {"encoder_hidden_states": encode_prompts(sd1, [""])["prompt_embeds"]}
    return latents, cond, uncond


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    from models.tiny import save_tiny

    return save_tiny("tiny-sdxl", tmp_path_factory.mktemp("tiny") / "sdxl")


# The longest test files first, so that pytest-xdist (scripts/test.sh: --dist loadfile --no-loadscope-reorder hands
# out whole files in collection order) starts the demo on one worker while the other works through the rest, instead
# of starting it last on a worker that then runs alone.
LONGEST_FIRST = ("test_demo.py", "test_distill.py", "test_tune.py", "test_ablation.py", "test_reliability.py",
                 "test_prepare.py", "test_buckets.py", "test_cluster.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
