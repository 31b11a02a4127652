"""The serve stage: a Ray Serve application that generates images with the registered student.

One deployment, `ImageServer`, with a FastAPI ingress. Each replica holds one pipeline on its GPU (or CPU), in a
child process of its own by default (serve.pipeline_process: serving/replica_pipeline.py), loaded from
`models:/NAME@ALIAS` in MLflow (the alias is resolved to a version once, when the app is built, so every replica
serves the same version) or from a diffusers folder/URI, and generates one warm-up image before it reports ready.
Requests are split into single images and batched across requests (serve.batcher "replica", the default:
serving/batching.py, where a batch forms only when the previous one has returned; "serve": Ray's @serve.batch); a
batch mixing sizes, steps or guidance runs one pipeline call per group (models/sampling.py: render_images), and
every image has its own seed. With serve.compile the U-Net runs torch.compile graphs (CUDA graphs with
reduce-overhead) for the shapes warmed up at replica start (models.sampling.CompiledUNet); other shapes fall back to the
eager U-Net.

Routes: POST /v1/images/generations (OpenAI Images API + negative_prompt, num_inference_steps,
guidance_scale, seed), GET /v1/models, /healthz, /readyz, and / (a small web page). An answer's `timings`
say where its time went in the replica: queue_ms (waiting for a batch), render_ms and batch_size (the
pipeline call), encode_ms (PNGs), compiled (serve.compile: whether the batch ran compiled graphs only), phases
(the call's prep, denoise, decode and to-PIL ms: models.sampling.render_images).
Metrics: Ray Serve's own (ray_serve_*, including HTTP latency per route) on the Ray metrics port, plus
distillery_request_latency_ms by route and status, distillery_images_total, distillery_batch_size and
distillery_batch_ms (per pipeline batch).

Entry points: `build_app(cfg)` (a serve.Application), `run(cfg)` (blocks, like `serve run`),
`serve_config(cfg)` / `write_serve_config(cfg, path)` (the YAML for `serve deploy` or a KubeRay
RayService's serveConfigV2, built on the cluster by `app_builder`).
"""

import asyncio
import functools
import hmac
import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any, NamedTuple

import pybase64
import yaml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.sampling import ImageJob, encode_image
from pipelines.config import Config, ServeConfig, parse_config
from pipelines.storage import model_dir
from serving.batching import DynamicBatcher
from serving.replica_pipeline import PipelineProcessError, PipelineSpec, ProcessPipeline, ThreadPipeline
from serving.schemas import (
    ApiError,
    ImageData,
    ImageResponse,
    ModelCard,
    Timings,
    image_response_body,
    parse_request,
    parse_size,
)

log = logging.getLogger("distillery.serve")

APP_NAME = "distillery"
STATIC = Path(__file__).parent / "static"
ROUTES = ("/v1/images/generations", "/v1/models", "/healthz", "/readyz", "/")

api = FastAPI(title="distillery", description="Images from a distilled Stable Diffusion student.")


# ---------------------------------------------------------------------------------------------------
# errors: every refusal is a JSON body in OpenAI's error shape


@api.exception_handler(ApiError)
async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    msg = f"no route {request.method} {request.url.path}" if err.status_code in (404, 405) else str(err.detail)
    return JSONResponse(ApiError(err.status_code, msg, code="not_found").body(), status_code=err.status_code)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    return JSONResponse(ApiError(400, str(err.errors())).body(), status_code=400)


@api.exception_handler(Exception)
async def _server_error(request: Request, err: Exception) -> JSONResponse:
    log.exception("request %s %s failed", request.method, request.url.path)
    return JSONResponse(ApiError(500, f"internal error: {type(err).__name__}", code="internal").body(),
                        status_code=500)


@functools.cache  # one set per replica process, made in it (Ray's metrics belong to the process that makes them)
def _metrics() -> dict[str, Any]:
    from ray.serve.metrics import Counter, Histogram

    return {
        "latency": Histogram(
            "distillery_request_latency_ms", description="request latency by route and status",
            boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000],
            tag_keys=("route", "status"),
        ),
        "images": Counter("distillery_images_total", description="images generated"),
        "batch_size": Histogram("distillery_batch_size", description="images per pipeline batch",
                                boundaries=[1, 2, 4, 8, 16, 32, 64]),
        "batch_ms": Histogram(
            "distillery_batch_ms", description="pipeline call time of a batch",
            boundaries=[10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000],
        ),
    }


@api.middleware("http")
async def _timed(request: Request, call_next):
    t0 = time.perf_counter()
    status = 500
    try:
        response = await call_next(request)
        status = response.status_code
        return response
    finally:
        path = request.url.path
        prefix = request.scope.get("root_path", "")
        route = path[len(prefix):] if prefix and path.startswith(prefix) else path
        route = route if route in ROUTES else "other"
        try:
            _metrics()["latency"].observe((time.perf_counter() - t0) * 1000,
                                          tags={"route": route, "status": str(status)})
        except Exception:  # metrics never break a request
            pass


# ---------------------------------------------------------------------------------------------------
# the model: resolved on the driver, fetched and loaded in each replica


def resolve_model(cfg: Config) -> dict[str, Any]:
    """What the replicas load: an MLflow alias is pinned to its current version here."""
    uri = cfg.serve.model or f"models:/{cfg.registry.model_name}@{cfg.registry.champion_alias}"
    if uri.startswith("models:/"):
        import mlflow

        tracking = cfg.tracking_uri()
        client = mlflow.MlflowClient(tracking_uri=tracking)
        rest = uri[len("models:/"):]
        try:
            if "@" in rest:
                name, alias = rest.split("@", 1)
                mv = client.get_model_version_by_alias(name, alias)
            else:
                name, _, version = rest.partition("/")
                mv = client.get_model_version(name, version)
                alias = (mv.aliases or [None])[0]
        except mlflow.exceptions.MlflowException as err:
            raise ValueError(f"serve.model {uri}: not found in the MLflow registry at {tracking} "
                             f"(run the register stage first): {err.message}") from None
        return {"uri": f"models:/{name}/{mv.version}", "name": name, "version": int(mv.version), "alias": alias,
                "teacher": mv.tags.get("teacher"), "preset": mv.tags.get("preset"), "tracking_uri": tracking}
    from models.student import read_meta_file

    local = Path(uri[len("file://"):] if uri.startswith("file://") else uri)
    if "://" not in uri and not uri.startswith("builtin:") and not (local / "model_index.json").is_file():
        raise ValueError(f"serve.model {uri}: not a diffusers pipeline folder (no model_index.json)")
    meta = read_meta_file(local)  # empty for remote and builtin models
    return {"uri": uri, "name": uri.rstrip("/").rsplit("/", 1)[-1] or uri, "version": None, "alias": None,
            "teacher": meta.teacher, "preset": meta.preset, "tracking_uri": None}


def fetch_model(model: dict[str, Any]) -> str:
    """A local diffusers folder for the model: MLflow models are downloaded once per node and version."""
    if not model["uri"].startswith("models:/"):
        return model_dir(model["uri"])  # s3:// folders are copied to the node; builtin: names pass through
    import mlflow

    from models.local_cache import build_once, cache_root

    dest = cache_root() / "serve" / f"{model['name']}-v{model['version']}"
    folder = dest / "artifacts" / "pipeline"  # the artifacts layout pipelines/register.py logs

    def download(tmp: Path) -> None:
        mlflow.artifacts.download_artifacts(artifact_uri=model["uri"], dst_path=str(tmp),
                                            tracking_uri=model["tracking_uri"], registry_uri=model["tracking_uri"])
        if not (tmp / "artifacts" / "pipeline" / "model_index.json").is_file():
            raise ValueError(f"{model['uri']}: no artifacts/pipeline folder; was it logged by `distillery register`?")

    build_once(dest, download, done=lambda d: (d / "artifacts" / "pipeline" / "model_index.json").is_file())
    return str(folder)


def read_api_key(cfg: ServeConfig) -> str | None:
    """The key from the replica's environment or a file; a configured key that is missing is an error
    (a server meant to be protected must not start open)."""
    if cfg.api_key_env:
        key = os.environ.get(cfg.api_key_env, "").strip()
        if not key:
            raise ValueError(f"serve.api_key_env names {cfg.api_key_env}, which is not set in the replica")
        return key
    if cfg.api_key_file:
        try:
            key = Path(cfg.api_key_file).read_text().strip()
        except OSError as err:
            raise ValueError(f"serve.api_key_file {cfg.api_key_file}: {err.strerror}") from None
        if not key:
            raise ValueError(f"serve.api_key_file {cfg.api_key_file} is empty")
        return key
    return None


# ---------------------------------------------------------------------------------------------------
# the deployment


class Rendered(NamedTuple):
    """One image of a pipeline batch, with what its answer's `timings` say of that batch."""

    image: Any  # PIL
    start: float  # perf_counter when the batch's call began
    seconds: float  # the batch's pipeline call
    batch_size: int
    compiled: bool | None  # every U-Net call ran a compiled graph; None without serve.compile
    phases: dict[str, float]  # the call by phase (models.sampling.PHASES); empty where not measured


@serve.deployment(name="ImageServer")
@serve.ingress(api)
class ImageServer:
    def __init__(self, serve_cfg: dict[str, Any], model: dict[str, Any]):
        self.cfg = ServeConfig.model_validate(serve_cfg)
        self.model = {**model, "created": int(time.time())}
        self._key = read_api_key(self.cfg)
        if self.cfg.batcher == "serve":
            self._serve_batch.set_max_batch_size(self.cfg.max_batch_size)
            self._serve_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
            self._submit, self._batcher = self._serve_batch, None
        else:
            self._batcher = DynamicBatcher(self.generate_batch, self.cfg.max_batch_size,
                                           self.cfg.batch_wait_timeout_s, self.cfg.hold_answers_s)
            self._submit = self._batcher.submit
        c = self.cfg
        spec = PipelineSpec(fetch_model(model), "cuda" if c.num_gpus > 0 else "cpu",
                            c.decoder and model_dir(c.decoder), c.sizes, c.compile, c.compile_mode, c.compile_batches,
                            c.default_guidance_scale)
        # loaded, warmed up and compiled before the replica says it is ready (serving/replica_pipeline.py)
        self.pipeline = ProcessPipeline(spec) if c.pipeline_process else ThreadPipeline(spec)
        self.cfg = c.model_copy(update={"sizes": self.pipeline.sizes})
        self.page = (STATIC / "index.html").read_text().replace("__LIMITS__", json.dumps(self._limits()))
        self.ready = True
        log.info("replica ready: %s on %s", model["uri"], self.pipeline.device)

    def __del__(self) -> None:  # Serve's replica shutdown: the pipeline process goes with the replica
        if getattr(self, "pipeline", None) is not None:
            self.pipeline.close()

    def check_health(self) -> None:  # Serve restarts a replica whose pipeline is gone
        if not getattr(self, "ready", False):
            raise RuntimeError("pipeline not loaded")
        if not self.pipeline.alive():
            raise RuntimeError("the pipeline process exited")

    def _limits(self) -> dict[str, Any]:
        c = self.cfg
        return {"sizes": c.sizes, "max_n": c.max_n, "max_steps": c.max_steps, "default_steps": c.default_steps,
                "default_guidance_scale": c.default_guidance_scale, "max_prompt_chars": c.max_prompt_chars,
                "api_key_required": self._key is not None}

    def _authorize(self, request: Request) -> None:
        if self._key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer KEY'", code="missing_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._key.encode()):
            raise ApiError(401, "invalid API key", code="invalid_api_key")

    async def generate_batch(self, jobs: list[ImageJob]) -> list[Rendered]:
        # called by the batcher (serve.batcher), one batch at a time; the pipeline runs on its own thread (or in its
        # own process) so health checks and new requests are answered meanwhile. PIL images out: each request
        # encodes its own answers after the batch, so the next batch starts on the GPU while they are encoded.
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        # serve.hold_answers_s: the previous batch's answers go out once this one's first U-Net step is launched
        on_denoise = (functools.partial(loop.call_soon_threadsafe, self._batcher.started)
                      if self._batcher and self.cfg.hold_answers_s else None)
        done = await asyncio.wrap_future(self.pipeline.submit(jobs, on_denoise))
        seconds = time.perf_counter() - t0
        try:
            _metrics()["batch_size"].observe(len(jobs))
            _metrics()["batch_ms"].observe(seconds * 1000)
        except Exception:
            pass
        phases = {k: round(v, 2) for k, v in done.phases.items()}
        return [Rendered(img, t0, seconds, len(jobs), done.compiled, phases) for img in done.images]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _serve_batch(self, jobs: list[ImageJob]) -> list[Rendered]:
        return await self.generate_batch(jobs)  # serve.batcher "serve"

    async def _encoded_images(self, jobs: list[ImageJob], output_format: str,
                              quality: int | None) -> tuple[list[bytes], Timings]:
        t0 = time.perf_counter()
        done: list[Rendered] = await asyncio.gather(*[self._submit(j) for j in jobs])
        t1 = time.perf_counter()
        level = self.cfg.png_compress_level
        encoded = await asyncio.gather(*[asyncio.to_thread(encode_image, d.image, output_format, level, quality)
                                         for d in done])
        compiled = [d.compiled for d in done]
        slowest = max(done, key=lambda d: d.seconds)  # the batch whose call took longest: its time and phases
        timings = Timings(queue_ms=round(1000 * max(d.start - t0 for d in done), 2),
                          render_ms=round(1000 * slowest.seconds, 2),
                          encode_ms=round(1000 * (time.perf_counter() - t1), 2),
                          batch_size=max(d.batch_size for d in done),
                          held_ms=round(1000 * max(t1 - d.start - d.seconds for d in done), 2),
                          compiled=None if compiled[0] is None else all(compiled),
                          phases=slowest.phases or None)
        return encoded, timings

    @api.post("/v1/images/generations")
    async def generations(self, request: Request) -> Response:
        t0 = time.perf_counter()
        self._authorize(request)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.cfg.max_body_bytes:
            raise ApiError(413, f"request body of {declared} bytes; the limit is {self.cfg.max_body_bytes}")
        # read as it streams in (a chunked body declares no length): refused as soon as it passes the limit
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.cfg.max_body_bytes:
                raise ApiError(413, f"request body over {self.cfg.max_body_bytes} bytes (the limit)")
            chunks.append(chunk)
        raw = b"".join(chunks)
        req = parse_request(raw, self.cfg)
        w, h = parse_size(req.size or self.cfg.sizes[0])
        seed = req.seed if req.seed is not None else secrets.randbits(31)
        jobs = [
            ImageJob(
                prompt=req.prompt,
                negative_prompt=req.negative_prompt or "",
                num_inference_steps=req.num_inference_steps or self.cfg.default_steps,
                guidance_scale=float(req.guidance_scale if req.guidance_scale is not None
                                     else self.cfg.default_guidance_scale),
                seed=(seed + i) % (2**63),
                width=w,
                height=h,
            )
            for i in range(req.n)
        ]
        try:
            encoded, timings = await asyncio.wait_for(
                self._encoded_images(jobs, req.output_format, req.output_compression),
                timeout=self.cfg.request_timeout_s)
        except TimeoutError:
            raise ApiError(504, f"generation took longer than {self.cfg.request_timeout_s:g}s",
                           code="timeout") from None
        except PipelineProcessError as err:  # the replica fails its health check and Serve replaces it
            raise ApiError(503, f"{err}; the replica is being replaced, retry", code="unavailable") from None
        try:
            _metrics()["images"].inc(len(encoded))
        except Exception:
            pass
        resp = ImageResponse(
            created=int(time.time()),
            data=[ImageData(b64_json="", seed=j.seed) for j in jobs],  # the images are spliced into the body
            output_format=req.output_format,
            size=f"{w}x{h}",
            model=self.model["name"],
            latency_ms=round((time.perf_counter() - t0) * 1000, 2),
            timings=timings,
        )
        # pybase64 (SIMD): the stdlib's base64 held the GIL ~1 ms per answer (bench/RESULTS.md); the same bytes
        return Response(image_response_body(resp, [pybase64.b64encode(p) for p in encoded]),
                        media_type="application/json")

    def _card(self) -> dict[str, Any]:
        m = self.model
        card = ModelCard(id=m["name"], created=m["created"], version=m["version"], alias=m["alias"],
                         teacher=m["teacher"], preset=m["preset"], source=m["uri"], decoder=self.cfg.decoder)
        return {"name": m["name"], **card.model_dump()}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return {"object": "list", "data": [self._card()]}

    @api.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request) -> dict[str, Any]:
        self._authorize(request)  # OpenAI's models.retrieve
        if model_id != self.model["name"]:
            raise ApiError(404, f"no model {model_id!r}: this server serves {self.model['name']!r}", "model",
                           code="model_not_found")
        return self._card()

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        ready = getattr(self, "ready", False)
        return JSONResponse({"status": "ready" if ready else "loading", "model": self.model["uri"]},
                            status_code=200 if ready else 503)

    @api.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self.page)


def build_app(cfg: Config) -> serve.Application:
    """The Serve application for cfg.serve: resources, batching and autoscaling from the config."""
    c = cfg.serve
    model = resolve_model(cfg)
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": c.num_cpus, "num_gpus": c.num_gpus},
        "max_ongoing_requests": c.max_ongoing_requests or 2 * c.max_batch_size,
        "graceful_shutdown_timeout_s": 5,
        "health_check_period_s": c.health_check_period_s,
    }
    if c.min_replicas == c.max_replicas:
        opts["num_replicas"] = c.max_replicas
    else:
        opts["autoscaling_config"] = {
            "min_replicas": c.min_replicas,
            "initial_replicas": max(1, c.min_replicas),
            "max_replicas": c.max_replicas,
            "target_ongoing_requests": c.target_ongoing_requests,
            "upscale_delay_s": c.upscale_delay_s,
            "downscale_delay_s": c.downscale_delay_s,
            "look_back_period_s": c.look_back_period_s,
        }
    return ImageServer.options(**opts).bind(c.model_dump(mode="json"), model)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """`import_path: serving.app:app_builder` for `serve deploy` / RayService: args = {"config": {...}}."""
    return build_app(parse_config(args.get("config") or {}, source="serve config args"))


def serve_config(cfg: Config) -> dict[str, Any]:
    """The Serve config file (`serve deploy FILE`, or a RayService's serveConfigV2) for this config."""
    c = cfg.serve
    app: dict[str, Any] = {
        "name": APP_NAME,
        "route_prefix": c.route_prefix,
        "import_path": "serving.app:app_builder",
        "args": {"config": cfg.model_dump(mode="json")},
    }
    if cfg.ray.runtime_env:
        app["runtime_env"] = cfg.ray.runtime_env
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": c.port, "request_timeout_s": c.request_timeout_s + 10},
        "applications": [app],
    }


def write_serve_config(cfg: Config, path: str | os.PathLike) -> Path:
    """For `distillery serve CONFIG --write-config FILE`."""
    out = Path(path)
    out.write_text(yaml.safe_dump(serve_config(cfg), sort_keys=False))
    return out


def start(cfg: Config, blocking: bool = False) -> str:
    """Start Serve (HTTP on serve.host:port) and deploy the app; returns its URL."""
    from pipelines.storage import ensure_ray, require_gpus

    c = cfg.serve
    require_gpus(ensure_ray(cfg), "serve.num_gpus", c.num_gpus, "serve.num_gpus: 0 (replicas on the CPU)")
    serve.start(http_options={"host": c.host, "port": c.port, "request_timeout_s": c.request_timeout_s + 10})
    serve.run(build_app(cfg), name=APP_NAME, route_prefix=c.route_prefix, blocking=blocking)
    return f"http://{c.host}:{c.port}{c.route_prefix.rstrip('/')}/"


def run(cfg: Config) -> dict[str, Any]:
    """Serve until Ctrl-C (like `serve run`), then shut Serve down."""
    url = start(cfg)
    log.info("serving %s at %s (Ctrl-C stops)", cfg.serve.model or cfg.registry.model_name, url)
    print(f"serving at {url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return {"url": url, "stopped": True}
