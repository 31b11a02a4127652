"""URIs (local paths and s3://) as pyarrow filesystems, small file helpers, and the one way stages get Ray.

S3 endpoint and credentials come from the standard AWS environment and config files (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, profiles); we only read the endpoint so that it travels with the pickled filesystem
to Ray workers that may not have it in their environment.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

log = logging.getLogger(__name__)


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path, file:// or s3:// URI."""
    if uri.startswith("s3://"):
        kw: dict[str, Any] = {}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            kw["endpoint_override"] = endpoint
            kw["scheme"] = "https" if endpoint.startswith("https") else "http"
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kw["region"] = region
        return pafs.S3FileSystem(**kw), uri[len("s3://") :].rstrip("/")
    if is_remote(uri):
        return pafs.FileSystem.from_uri(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])


def list_files(uri: str) -> list[str]:
    """All files under a folder URI (recursively), as paths relative to it, sorted; a file URI lists itself."""
    fs, root = filesystem(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: no such file or folder")
    if info.type == pafs.FileType.File:
        return [""]
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sorted(i.path[len(root) + 1 :] for i in infos if i.type == pafs.FileType.File)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def local_copy(uri: str) -> str:
    """A local path for a file: remote files are copied once into the node's cache (keyed by the URI), local
    paths pass through."""
    if not is_remote(uri):
        return uri.removeprefix("file://")
    import hashlib

    from models.local_cache import build_once, cache_root

    dest = cache_root() / "files" / hashlib.sha256(uri.encode()).hexdigest()[:16] / uri.rsplit("/", 1)[-1]
    return str(build_once(dest, lambda tmp: Path(tmp).write_bytes(read_bytes(uri))))


def model_dir(uri: str) -> str:
    """What the loaders in models/ take for a model folder URI: a remote folder (s3://) is copied once into the
    node's cache (keyed by the URI and what is there now, so a folder rewritten in place is fetched again); hub ids,
    local folders and builtin: names pass through."""
    if not is_remote(uri):
        return uri
    import hashlib

    from models.local_cache import build_once, cache_root

    dest = cache_root() / "models" / hashlib.sha256((uri + _listing(uri)).encode()).hexdigest()[:16]
    if not dest.exists():
        log.info("copying %s to %s", uri, dest)
    return str(build_once(dest, lambda tmp: _copy_remote_tree(uri, tmp)))


def _listing(uri: str) -> str:
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    info = fs.find(root, detail=True)
    return repr(sorted((k, v.get("size"), str(v.get("ETag") or v.get("LastModified") or v.get("mtime")))
                       for k, v in info.items()))


def _copy_remote_tree(uri: str, dest: Path) -> None:
    """Copy the files of a remote folder into `dest` (files in parallel)."""
    from concurrent.futures import ThreadPoolExecutor

    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    files = [f for f in fs.find(root) if not f.endswith("/")]
    if not files:
        raise FileNotFoundError(f"no files under {uri}")

    def get(f: str) -> None:
        target = dest / f[len(root.rstrip("/")) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(f, str(target))

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(get, files))


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file so that readers never see half of it: S3 puts are atomic; locally we rename."""
    write_file(*filesystem(uri), data)


def write_file(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """write_bytes with a filesystem made elsewhere (Ray workers get the driver's, endpoint included)."""
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def delete_dir(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def quiet_progress() -> None:
    """Before Ray starts (its processes inherit the environment): no library deprecation warnings, and off a
    terminal (ray job logs, a CI log, a file) no progress bars, Ray Data's (it redraws every operator every few
    seconds, the Ray Train dataset's split coordinator too), diffusers' or transformers'. The stages log what they
    did."""
    # the libraries' deprecation notices (Ray Train's own use of a deprecated Ray Data option, torch's of a renamed
    # collective in DeepSpeed) reach the terminal once per worker and run, and say nothing a user can act on; a
    # PYTHONWARNINGS of the user's own is kept
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")
    if sys.stdout.isatty():
        return
    import diffusers.utils.logging
    import ray.data
    import transformers.utils.logging

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' loading bars read it at import
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a registered model's download
    ray.data.DataContext.get_current().enable_progress_bars = False
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


_local_ray: str | None = None  # the GCS address of the local Ray ensure_ray started: a Ray that never gains a node


def ensure_ray(cfg: Any) -> Any:
    """The Ray every stage uses: the one already initialized, else cfg.ray.address or RAY_ADDRESS (a cluster,
    `ray job submit`), else a local Ray with cfg.ray.num_cpus."""
    global _local_ray
    import ray

    quiet_progress()
    if ray.is_initialized():
        return ray
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    kw: dict[str, Any] = {}
    if cfg.ray.runtime_env:
        kw["runtime_env"] = cfg.ray.runtime_env
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, **kw)
    else:
        if not cfg.ray.include_dashboard:
            kw["runtime_env"] = {"worker_process_setup_hook": state_api_quieter(), **kw.get("runtime_env", {})}
        ray.init(num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus, include_dashboard=cfg.ray.include_dashboard,
                 **kw)
        _local_ray = ray.get_runtime_context().gcs_address
    return ray


def require_gpus(ray: Any, field: str, gpus: float, fix: str) -> None:
    """Checks that Ray has the `gpus` that one task or worker of a stage asks for (config `field`) before the stage
    asks: Ray would queue it until a node with them joins. A local Ray that ensure_ray started never gains one,
    so there this raises a ConfigError saying how to `fix` it; on a cluster an autoscaler may add GPU nodes, so
    it only warns."""
    from pipelines.config import ConfigError

    if gpus <= 0:
        return
    have = ray.cluster_resources().get("GPU", 0)
    if have >= gpus:
        return
    asks = f"{field}: a task or worker asks for {gpus:g} GPU, and this Ray has {have:g}"
    if _local_ray is not None and _local_ray == ray.get_runtime_context().gcs_address:
        raise ConfigError(f"{asks}: the local Ray started for this job gains no GPU, so the stage would wait "
                          f"forever. Run it on a machine with a GPU, or on a cluster (ray.address or RAY_ADDRESS), "
                          f"or set {fix}")
    log.warning("%s; the stage waits until the cluster has one (an autoscaler may add GPU nodes)", asks)


def state_api_quieter() -> Any:
    """The worker_process_setup_hook of a local Ray started without its dashboard, which serves the State API: Ray
    Train's placement-group cleaner (a guard against a controller that dies without removing its placement group)
    asks that API once a second whether the controller lives and warns each time it cannot. Without the API it can
    never act, so the warning says nothing a user can change short of the dashboard; a local Ray's placement
    groups end with it.

    The hook is defined in here so that cloudpickle sends it by value: a worker runs it before the driver's code
    path is on its sys.path, so a hook that names this module kills every worker of a checkout that is not
    installed (`python -m pipelines` from the repository)."""

    def quiet_placement_group_cleaner() -> None:
        import logging

        logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(
            logging.ERROR)

    return quiet_placement_group_cleaner
