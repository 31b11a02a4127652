"""Request and response shapes of the HTTP API: the OpenAI Images API (POST /v1/images/generations with
prompt, n, size, response_format=b64_json, output_format png/jpeg/webp) plus negative_prompt,
num_inference_steps, guidance_scale and seed. Validation happens here, where requests enter: a bad request
becomes an `ApiError` with a 4xx status and a message naming the field and what was wrong, in OpenAI's error
shape."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError

from pipelines.config import ServeConfig

MAX_SEED = 2**63 - 1
MAX_GUIDANCE = 50.0


class ApiError(Exception):
    """A request the server refuses; becomes {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_request"):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "authentication_error" if self.status == 401 else (
            "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr
    n: StrictInt = 1
    size: StrictStr | None = None  # "WIDTHxHEIGHT", one of serve.sizes; default ("auto" too) the first
    response_format: Literal["b64_json"] = "b64_json"
    # the images' encoding (OpenAI's newer field); output_compression is the JPEG/WebP quality (0-100, default 100)
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: StrictInt | None = Field(None, ge=0, le=100)
    negative_prompt: StrictStr | None = None
    num_inference_steps: StrictInt | None = None
    guidance_scale: StrictFloat | StrictInt | None = None
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED)
    # accepted for OpenAI client compatibility; the server has one model
    model: StrictStr | None = None
    user: StrictStr | None = None
    quality: StrictStr | None = None
    style: StrictStr | None = None
    # newer fields of the OpenAI images API, accepted and ignored the same way
    background: StrictStr | None = None
    moderation: StrictStr | None = None
    safety_identifier: StrictStr | None = None
    stream: bool | None = None  # only false: an answer holds whole images
    partial_images: StrictInt | None = None  # streaming's partial images: none without streaming


class ImageData(BaseModel):
    b64_json: str
    seed: int  # generating again with this seed gives this image


class Timings(BaseModel):
    """Where a request's time went inside the replica (its images may run in more than one batch: the largest
    and slowest count)."""
    queue_ms: float  # waiting for a batch to start (the batch before it, the batch wait timeout)
    render_ms: float  # the pipeline call of the batch (all its images)
    encode_ms: float  # PNG encoding of this request's images, after the batch
    batch_size: int  # images in the pipeline batch
    held_ms: float = 0.0  # from the batch's end until its answers went out (serve.hold_answers_s)
    compiled: bool | None = None  # serve.compile: every U-Net call of its batches ran a compiled graph
    # the slowest batch's pipeline call by phase, ms (models.sampling.PHASES: prep, denoise, decode on the device's
    # timeline; to_pil on the CPU); None where the pipeline takes no step callback
    phases: dict[str, float] | None = None


class ImageResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str  # png, jpeg or webp, as asked (OpenAI's response field)
    size: str  # WIDTHxHEIGHT of every image
    model: str
    latency_ms: float
    timings: Timings


def image_response_body(resp: ImageResponse, b64: list[bytes]) -> bytes:
    """`resp` as JSON (as JSONResponse writes it) with data[i].b64_json set to the base64 `b64[i]`, spliced into
    the text: base64 needs no JSON escaping, and json.dumps would scan each image's string (~0.3-1 MB) while holding
    the GIL that the replica's pipeline thread needs (bench/RESULTS.md). `resp`'s own b64_json fields are left
    empty."""
    if len(b64) != len(resp.data) or any(d.b64_json for d in resp.data):
        raise ValueError("give one base64 image per data entry, whose b64_json is left empty")
    text = json.dumps(resp.model_dump(), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    # a JSON string escapes its quotes, so this exact text occurs only as the data entries' own (empty) field
    parts = text.split(b'"b64_json":""')
    if len(parts) != len(b64) + 1:
        raise RuntimeError(f"{len(parts) - 1} b64_json fields in the JSON of {len(b64)} images")
    out = [parts[0]]
    for img, rest in zip(b64, parts[1:]):
        out += [b'"b64_json":"', img, b'"', rest]
    return b"".join(out)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int  # unix time the replica loaded the model (the OpenAI models API field)
    owned_by: str = "distillery"
    version: int | None = None
    alias: str | None = None
    teacher: str | None = None
    preset: str | None = None
    source: str
    decoder: str | None = None  # serve.decoder: what decodes latents in place of the model's VAE


def _describe(err: ValidationError) -> tuple[str, str | None]:
    parts, first = [], None
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(body)"
        first = first or where
        if e["type"] == "missing":
            parts.append(f"'{where}' is required")
        elif e["type"] == "extra_forbidden":
            parts.append(f"'{where}' is not a known field")
        else:
            got = e.get("input")
            shown = json.dumps(got)[:60] if isinstance(got, (str, int, float, bool, type(None))) else type(got).__name__
            parts.append(f"'{where}': {e['msg']} (got {shown})")
    return "; ".join(parts), first


def parse_request(raw: bytes, cfg: ServeConfig) -> ImageRequest:
    """Validate a request body against the schema and the configured limits."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        req = ImageRequest.model_validate(body)
    except ValidationError as err:
        msg, param = _describe(err)
        raise ApiError(400, msg, param) from None
    if not req.prompt.strip():
        raise ApiError(400, "'prompt' is empty", "prompt")
    if len(req.prompt) > cfg.max_prompt_chars:
        raise ApiError(400, f"'prompt' has {len(req.prompt)} characters; the limit is {cfg.max_prompt_chars}",
                       "prompt")
    if req.negative_prompt is not None and len(req.negative_prompt) > cfg.max_prompt_chars:
        raise ApiError(400, f"'negative_prompt' has {len(req.negative_prompt)} characters; the limit is "
                            f"{cfg.max_prompt_chars}", "negative_prompt")
    if not 1 <= req.n <= cfg.max_n:
        raise ApiError(400, f"'n' must be between 1 and {cfg.max_n} (got {req.n})", "n")
    if req.stream:
        raise ApiError(400, "'stream': streaming is not supported; send stream false or leave it out", "stream")
    if req.size == "auto":
        req.size = None
    if req.size is not None and req.size not in cfg.sizes:
        raise ApiError(400, f"'size' {req.size!r} is not supported; choose one of {', '.join(cfg.sizes)}", "size")
    if req.num_inference_steps is not None and not 1 <= req.num_inference_steps <= cfg.max_steps:
        raise ApiError(400, f"'num_inference_steps' must be between 1 and {cfg.max_steps} "
                            f"(got {req.num_inference_steps})", "num_inference_steps")
    if req.guidance_scale is not None and not 0 <= req.guidance_scale <= MAX_GUIDANCE:
        raise ApiError(400, f"'guidance_scale' must be between 0 and {MAX_GUIDANCE:g} (got {req.guidance_scale})",
                       "guidance_scale")
    return req


def parse_size(size: str) -> tuple[int, int]:
    w, _, h = size.partition("x")
    return int(w), int(h)
