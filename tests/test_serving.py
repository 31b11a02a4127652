"""The serve stage for real: the tiny model registered in a local MLflow server, served by Ray Serve on a
local Ray, called over HTTP (and by headless Chromium for the web page). One app for the module, with an
API key and small autoscaling thresholds; Serve is shut down at the end."""

from __future__ import annotations

import base64
import io
import json
import shutil
import struct
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from pipelines import local
from pipelines.config import ConfigError, parse_config

KEY = "test-key-5d41c0e7"  # fixed: parametrize ids must match across pytest-xdist workers


@pytest.fixture(scope="module")
def server(ray_local, mlflow_server, tiny_sd1_dir, tmp_path_factory):
    from ray import serve

    from pipelines import register
    from serving import app

    tmp = tmp_path_factory.mktemp("serving")
    student = tmp / "student"
    shutil.copytree(tiny_sd1_dir, student)
    (student / "distillery.json").write_text(json.dumps({"teacher": "builtin:tiny-sd1", "preset": "identity"}))
    (tmp / "key").write_text(KEY + "\n")
    cfg = parse_config({
        "work_dir": str(tmp / "work"),
        "mlflow": {"tracking_uri": mlflow_server.url},
        "registry": {"model_name": f"serve-{uuid.uuid4().hex[:8]}"},
        "serve": {
            "port": local.free_port(), "num_cpus": 0.2, "min_replicas": 1, "max_replicas": 2,
            "target_ongoing_requests": 1, "upscale_delay_s": 0, "downscale_delay_s": 2, "look_back_period_s": 1,
            "max_batch_size": 4, "batch_wait_timeout_s": 0.05, "max_ongoing_requests": 16,
            "hold_answers_s": 1.0,  # a batch's answers wait for the next batch's first U-Net step
            "api_key_file": str(tmp / "key"), "sizes": ["64x64", "32x32"], "default_steps": 2, "max_steps": 20,
            "max_n": 4, "max_prompt_chars": 200, "png_compress_level": 9,
            "decoder": "builtin:tiny-decoder",  # a TAESD-style lighter decoder in place of the student's VAE
        },
    })
    reg = register.register_student(student, {"fid_student_vs_teacher": 1.0}, cfg)
    url = app.start(cfg)
    yield {"url": url, "cfg": cfg, "version": reg["version"], "name": cfg.registry.model_name}
    serve.shutdown()


def post(server, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(server["url"] + "v1/images/generations", json=body, headers=headers, timeout=120, **kw)


def images(resp) -> list[bytes]:
    assert resp.status_code == 200, resp.text
    return [base64.b64decode(d["b64_json"]) for d in resp.json()["data"]]


def test_generate_and_seed(server):
    body = {"prompt": "a red circle", "num_inference_steps": 2, "seed": 7}
    a = images(post(server, body))
    assert len(a) == 1 and Image.open(io.BytesIO(a[0])).size == (64, 64)
    assert images(post(server, body)) == a  # a fixed seed gives the same image
    assert images(post(server, {**body, "seed": 8})) != a
    assert png_zlib_level(a[0]) == 3  # serve.png_compress_level 9 (zlib's header records 7-9 as 3)
    small = images(post(server, {**body, "size": "32x32", "guidance_scale": 1.0, "negative_prompt": "blue"}))
    assert Image.open(io.BytesIO(small[0])).size == (32, 32)


def png_zlib_level(png: bytes) -> int:
    """The compression level class (0: fastest .. 3: best) in the zlib header of a PNG's first IDAT chunk."""
    pos = 8
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        if kind == b"IDAT":
            return png[pos + 9] >> 6
        pos += 12 + length
    raise AssertionError("no IDAT chunk")


def test_png_level_is_lossless_and_checked():
    from models.sampling import encode_png

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8))
    fast, best = encode_png(img, 1), encode_png(img, 9)
    assert (png_zlib_level(fast), png_zlib_level(best)) == (0, 3)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(fast))), np.asarray(img))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(best))), np.asarray(img))
    with pytest.raises(ConfigError, match="png_compress_level"):
        parse_config({"serve": {"png_compress_level": 10}})


def test_render_phases_keep_the_pipelines_own_images():
    """render_images with `phases`: the images are what the pipeline's own "pil" output gives for the seeds, and
    the phases of both groups (two settings in one batch) are measured."""
    import torch

    from models.sampling import PHASES, ImageJob, render_images
    from models.tiny import tiny_sd1_pipeline

    pipe = tiny_sd1_pipeline()
    pipe.set_progress_bar_config(disable=True)
    jobs = [ImageJob("a red circle", num_inference_steps=3, seed=s) for s in (4, 5)]
    jobs.append(ImageJob("a blue square", num_inference_steps=2, seed=6, guidance_scale=1.0))
    phases: dict[str, float] = {}
    denoising: list[int] = []  # on_denoise: once per pipeline call (two groups here), at its first U-Net forward
    timed = render_images(pipe, jobs, phases=phases, on_denoise=lambda: denoising.append(len(denoising)))
    assert denoising == [0, 1]
    with torch.inference_mode():
        own = pipe(prompt=["a red circle"], negative_prompt=[""], num_inference_steps=3, guidance_scale=7.5,
                   width=64, height=64, generator=[torch.Generator().manual_seed(5)], output_type="pil").images[0]
    assert np.array_equal(np.asarray(timed[1]), np.asarray(own))
    assert [np.asarray(i).tolist() for i in timed] == [np.asarray(i).tolist() for i in render_images(pipe, jobs)]
    assert set(phases) == set(PHASES) and phases["denoise_ms"] > 0 and phases["decode_ms"] > 0
    assert min(phases.values()) >= 0


def test_pixels_to_pil_gives_diffusers_own_bits():
    """The 8-bit conversion made on the tensor's device is diffusers' numpy_to_pil(pt_to_numpy(x)) bit for bit,
    halves (x 255 = k + 0.5, rounded to even) and one-channel images included."""
    import torch
    from diffusers.image_processor import VaeImageProcessor

    from models.sampling import pixels_to_pil

    x = torch.rand(3, 3, 16, 12, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0, :4] = torch.tensor([0.5, 1.5, 2.5, 254.5]) / 255  # round half to even, as numpy does
    for batch in (x, x.half(), x[:, :1]):
        ours = [np.asarray(i) for i in pixels_to_pil(batch)]
        theirs = [np.asarray(i) for i in VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(batch))]
        assert [i.shape for i in ours] == [i.shape for i in theirs] and all(map(np.array_equal, ours, theirs))


def test_jpeg_answers_are_encoded_without_holding_the_gil():
    """encode_image's JPEG: PIL reads it as a JPEG of the image (as close as PIL's own encoder at the same quality),
    and while one thread encodes large images, another making small torch calls (each gives the GIL up and takes
    it back, as the replica's pipeline thread does) keeps running: PIL's JPEG encoder, which holds the GIL, lets
    it make a handful of calls in the same time."""
    import torch

    from models.sampling import encode_image

    yy, xx = np.mgrid[0:96, 0:80]
    pic = Image.fromarray(np.stack([xx * 3, yy * 2, (xx + yy) % 256], -1).astype(np.uint8))
    for quality in (None, 80, 0):
        got = Image.open(io.BytesIO(encode_image(pic, "jpeg", quality=quality)))
        buf = io.BytesIO()
        pic.save(buf, "JPEG", quality=100 if quality is None else max(quality, 1))
        ref = np.asarray(Image.open(buf), dtype=float)
        assert (got.format, got.mode, got.size) == ("JPEG", "RGB", pic.size)
        err = np.abs(np.asarray(got, dtype=float) - np.asarray(pic, dtype=float)).mean()
        assert err <= np.abs(ref - np.asarray(pic, dtype=float)).mean() + 0.5
    assert Image.open(io.BytesIO(encode_image(pic.convert("RGBA"), "jpeg"))).mode == "RGB"

    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (2048, 2048, 3), dtype=np.uint8))

    def calls_beside(encode) -> int:
        done, x, calls = threading.Event(), torch.zeros(4), 0
        worker = threading.Thread(target=lambda: (encode(), done.set()))
        worker.start()
        while not done.is_set():
            torch.add(x, 1)
            calls += 1
        worker.join()
        return calls

    # no forced GIL switches (every 5 ms by default): the small calls run only when the encoder lets the GIL go
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1.0)
    try:
        ours = calls_beside(lambda: [encode_image(big, "jpeg") for _ in range(3)])
        pils = calls_beside(lambda: [big.save(io.BytesIO(), "JPEG", quality=100) for _ in range(3)])
    finally:
        sys.setswitchinterval(interval)
    assert ours > 5 * max(pils, 200), (ours, pils)


def test_image_response_body_is_the_json_of_the_answer():
    """The answer's body with the images spliced in parses to what the response model dumps with them in place,
    whatever the other fields hold (quotes and the field's own name in the model's name included)."""
    from serving.schemas import ImageData, ImageResponse, Timings, image_response_body

    imgs = [base64.b64encode(bytes(range(256)) * k) for k in (1, 3)]
    resp = ImageResponse(created=1, data=[ImageData(b64_json="", seed=s) for s in (7, 8)], output_format="jpeg",
                         size="64x64", model='say "b64_json":"" here', latency_ms=1.5,
                         timings=Timings(queue_ms=0, render_ms=1, encode_ms=0, batch_size=2))
    body = json.loads(image_response_body(resp, imgs))
    full = resp.model_copy(update={"data": [ImageData(b64_json=i.decode(), seed=s) for i, s in zip(imgs, (7, 8))]})
    assert body == full.model_dump()
    with pytest.raises(ValueError, match="one base64 image per data entry"):
        image_response_body(resp, imgs[:1])


def test_batcher_setting_is_checked():
    assert parse_config({"serve": {"batcher": "serve"}}).serve.batcher == "serve"
    with pytest.raises(ConfigError, match="batcher"):
        parse_config({"serve": {"batcher": "fastest"}})
    with pytest.raises(ConfigError, match="hold_answers_s needs batcher 'replica'"):
        parse_config({"serve": {"batcher": "serve", "hold_answers_s": 0.5}})


def test_serve_batch_batcher_serves_batches(server, tiny_sd1_dir, tmp_path):
    """serve.batcher "serve" (Ray's @serve.batch) in a second app next to the module's (the default "replica",
    serving/batching.py):
    concurrent requests are answered, in batches, with the same image for a seed."""
    from ray import serve

    from serving.app import build_app

    cfg = parse_config({"work_dir": str(tmp_path / "work"), "serve": {
        "model": str(tiny_sd1_dir), "num_cpus": 0.2, "batcher": "serve", "max_batch_size": 4,
        "batch_wait_timeout_s": 0.05, "max_ongoing_requests": 16, "sizes": ["64x64"], "default_steps": 2}})
    serve.run(build_app(cfg), name="serve-batcher", route_prefix="/rb")
    try:
        url = server["url"] + "rb/v1/images/generations"
        body = {"prompt": "a red circle", "num_inference_steps": 2, "seed": 7}
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda _: requests.post(url, json=body, timeout=120), range(12)))
        assert [r.status_code for r in answers] == [200] * 12, answers[0].text
        assert max(r.json()["timings"]["batch_size"] for r in answers) > 1
        imgs = [np.asarray(Image.open(io.BytesIO(images(r)[0])), np.int16) for r in answers]
        assert max(np.abs(i - imgs[0]).max() for i in imgs) <= 2  # one seed: one image (up to batched rounding)
    finally:
        serve.delete("serve-batcher")


def test_compiled_unet_serves_the_eager_images(server, tiny_sd1_dir, tmp_path):
    """serve.compile: the replica compiles the U-Net for the shapes it warms up (2 images at the default
    guidance: a CFG batch of 4) and pads a one-image batch up to them; a request whose U-Net batch was not
    warmed up (guidance 1: no CFG) runs the eager U-Net instead of failing. Both answer with the image the
    eager pipeline draws for the seed."""
    from ray import serve

    from models.sampling import ImageJob, generate_images, load_pipeline
    from serving.app import build_app

    cfg = parse_config({"work_dir": str(tmp_path / "work"), "serve": {
        "model": str(tiny_sd1_dir), "num_cpus": 0.2, "sizes": ["64x64"], "default_steps": 2,
        "default_guidance_scale": 7.5, "compile": True, "compile_mode": "default", "compile_batches": [2]}})
    serve.run(build_app(cfg), name="compiled", route_prefix="/compiled")
    try:
        url = server["url"] + "compiled/v1/images/generations"
        eager = load_pipeline(str(tiny_sd1_dir))
        for guidance, compiled in ((7.5, True), (1.0, False)):
            r = requests.post(url, json={"prompt": "a red circle", "seed": 7, "guidance_scale": guidance},
                              timeout=120)
            served = np.asarray(Image.open(io.BytesIO(images(r)[0])), np.int16)
            assert r.json()["timings"]["compiled"] is compiled and r.json()["timings"]["batch_size"] == 1
            job = ImageJob("a red circle", num_inference_steps=2, seed=7, guidance_scale=guidance)
            local = np.asarray(Image.open(io.BytesIO(generate_images(eager, [job])[0])), np.int16)
            assert np.abs(served - local).max() <= 2, guidance
        with pytest.raises(ConfigError, match="compile_batches"):
            parse_config({"serve": {"compile_batches": [0]}})
    finally:
        serve.delete("compiled")


def test_served_images_come_from_the_decoder(server, tiny_sd1_dir):
    """serve.decoder: the replica decodes with the lighter decoder, not the model's own VAE."""
    from models.sampling import ImageJob, generate_images, load_pipeline

    served = np.asarray(Image.open(io.BytesIO(images(post(server, {"prompt": "a red circle", "num_inference_steps": 2,
                                                                    "seed": 7}))[0])), np.int16)
    job = [ImageJob("a red circle", num_inference_steps=2, seed=7, guidance_scale=7.5)]
    local = {d: np.asarray(Image.open(io.BytesIO(generate_images(load_pipeline(str(tiny_sd1_dir), decoder=d), job)[0])),
                           np.int16) for d in (None, "builtin:tiny-decoder")}
    assert np.abs(served - local["builtin:tiny-decoder"]).max() <= 2
    assert np.abs(served - local[None]).max() > 10


def test_n_images(server):
    r = post(server, {"prompt": "a blue square", "n": 3, "num_inference_steps": 2, "seed": 100})
    imgs = images(r)
    assert len(imgs) == 3 and len(set(imgs)) == 3
    assert [d["seed"] for d in r.json()["data"]] == [100, 101, 102]
    # image i of a request with seed s is the image of seed s+i alone (up to batched float rounding)
    alone = images(post(server, {"prompt": "a blue square", "num_inference_steps": 2, "seed": 101}))[0]
    diff = np.abs(np.asarray(Image.open(io.BytesIO(alone)), np.int16) - np.asarray(Image.open(io.BytesIO(imgs[1]))))
    assert diff.max() <= 2


def test_serve_config(tiny_sd1_dir, tmp_path):
    """The generated file is a valid Serve config whose builder makes the app (a folder model: no MLflow)."""
    from ray.serve.schema import ServeDeploySchema

    from serving import app

    cfg = parse_config({"serve": {"model": str(tiny_sd1_dir), "min_replicas": 1, "max_replicas": 3,
                                  "num_gpus": 1, "route_prefix": "/sd"}})
    path = app.write_serve_config(cfg, tmp_path / "serve.yaml")
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    spec = schema.applications[0]
    assert spec.import_path == "serving.app:app_builder" and spec.route_prefix == "/sd"
    built = app.app_builder(spec.args)
    opts = built._bound_deployment._deployment_config
    assert opts.autoscaling_config.max_replicas == 3
    assert built._bound_deployment.ray_actor_options["num_gpus"] == 1
    with pytest.raises(ValueError, match="not a diffusers pipeline folder"):
        app.resolve_model(parse_config({"serve": {"model": str(tmp_path)}}))
    # serve.sizes unset: a model whose distillery.json records no sizes is served at its native square size
    from types import SimpleNamespace

    from serving.replica_pipeline import served_sizes

    assert cfg.serve.sizes is None
    pipe = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(sample_size=96)), vae_scale_factor=8)
    assert served_sizes(str(tmp_path), pipe) == ["768x768"]
    with pytest.raises(ConfigError, match="sizes"):
        parse_config({"serve": {"sizes": []}})


def test_models_and_health(server):
    r = requests.get(server["url"] + "v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 200, r.text
    card = r.json()["data"][0]
    assert card["name"] == server["name"] and card["version"] == server["version"]
    assert card["alias"] == "champion" and card["teacher"] == "builtin:tiny-sd1" and card["preset"] == "identity"
    assert card["decoder"] == "builtin:tiny-decoder"
    assert card["object"] == "model" and abs(card["created"] - time.time()) < 24 * 3600
    assert requests.get(server["url"] + "healthz", timeout=30).json() == {"status": "ok"}


def test_newer_openai_fields_are_accepted_and_ignored(server):
    body = {"prompt": "a red circle", "num_inference_steps": 2, "seed": 3, "output_format": "png", "background": "auto",
            "moderation": "low", "quality": "high", "style": "vivid", "safety_identifier": "u-1", "stream": False}
    assert len(images(post(server, body))) == 1
    assert requests.get(server["url"] + "readyz", timeout=30).status_code == 200


def test_the_official_openai_client(server):
    """The `openai` package as a user calls it: images.generate with its own arguments (our seed and steps through
    extra_body), its response model, JPEG and WebP output, size "auto", models.list, and its exception classes for our
    error answers."""
    import openai

    client = openai.OpenAI(base_url=server["url"] + "v1", api_key=KEY, max_retries=0, timeout=120)
    extra = {"seed": 11, "num_inference_steps": 2}
    got = client.images.generate(model=server["name"], prompt="two blue squares", n=2, size="32x32",
                                 response_format="b64_json", extra_body=extra)
    pics = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in got.data]
    assert [(p.format, p.size) for p in pics] == [("PNG", (32, 32))] * 2 and got.output_format == "png"
    assert pics[0].tobytes() != pics[1].tobytes()  # n images, each with its own seed
    again = client.images.generate(prompt="two blue squares", size="32x32", extra_body=extra)
    assert base64.b64decode(again.data[0].b64_json) == base64.b64decode(got.data[0].b64_json)
    for fmt, pil_name in (("jpeg", "JPEG"), ("webp", "WEBP")):
        out = client.images.generate(prompt="two blue squares", size="auto", output_format=fmt,
                                     output_compression=80, extra_body=extra)
        pic = Image.open(io.BytesIO(base64.b64decode(out.data[0].b64_json)))
        assert (pic.format, pic.size, out.output_format, out.size) == (pil_name, (64, 64), fmt, "64x64")
        # lossy, but the same picture as the PNG of the same seed and size
        png = np.asarray(Image.open(io.BytesIO(images(post(server, {"prompt": "two blue squares", **extra}))[0])))
        assert np.abs(np.asarray(pic.convert("RGB"), dtype=float) - png).mean() < 12
    assert server["name"] in [m.id for m in client.models.list()]
    assert client.models.retrieve(server["name"]).id == server["name"]
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-image-1")
    assert missing.value.body["code"] == "model_not_found" and server["name"] in missing.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="a", size="1024x1024")
    assert bad.value.status_code == 400 and bad.value.body["param"] == "size" and "32x32" in bad.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="a", output_format="gif")
    assert bad.value.body["param"] == "output_format"
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="a", stream=True)
    assert "streaming is not supported" in bad.value.message
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["url"] + "v1", api_key="wrong", max_retries=0).images.generate(prompt="a")


@pytest.mark.parametrize("body,key,status,words", [
    ({"n": 1}, KEY, 400, "'prompt' is required"),
    ({"prompt": "x" * 5000}, KEY, 400, "5000 characters; the limit is 200"),
    ({"prompt": "a", "n": 0}, KEY, 400, "'n' must be between 1 and 4"),
    ({"prompt": "a", "n": 50}, KEY, 400, "'n' must be between 1 and 4"),
    ({"prompt": "a", "size": "1024x1024"}, KEY, 400, "'size' '1024x1024' is not supported"),
    ({"prompt": "a", "n": "two"}, KEY, 400, "'n'"),
    ({"prompt": 5}, KEY, 400, "'prompt'"),
    ({"prompt": "a", "num_inference_steps": 1000}, KEY, 400, "'num_inference_steps' must be between 1 and 20"),
    ({"prompt": "a", "seed": -1}, KEY, 400, "'seed'"),
    ({"prompt": "a", "colour": "red"}, KEY, 400, "'colour' is not a known field"),
    ({"prompt": "a", "response_format": "url"}, KEY, 400, "'response_format'"),
    ({"prompt": "a"}, None, 401, "missing API key"),
    ({"prompt": "a"}, "wrong", 401, "invalid API key"),
])
def test_bad_requests(server, body, key, status, words):
    r = post(server, body, key=key)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_bad_bodies_then_good(server):
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = server["url"] + "v1/images/generations"
    r = requests.post(url, data=b"{not json", headers=h, timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = requests.post(url, data=b"[1, 2]", headers=h, timeout=30)
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = requests.post(url, data=json.dumps({"prompt": "y" * 100_000}).encode(), headers=h, timeout=30)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    r = requests.get(server["url"] + "v2/nothing", timeout=30)
    assert r.status_code == 404 and "no route" in r.json()["error"]["message"]
    # the server is still up and serving
    assert len(images(post(server, {"prompt": "still here", "num_inference_steps": 2}))) == 1


def test_chunked_body_over_the_limit_is_refused_as_it_streams(server):
    """A chunked body (no Content-Length) of up to 200 MiB, sent a MiB at a time over a raw socket: the 413 arrives
    once the body passes serve.max_body_bytes, while the client is still sending; the server stays up."""
    import select
    import socket
    from urllib.parse import urlparse

    u = urlparse(server["url"])
    sock = socket.create_connection((u.hostname, u.port), timeout=30)
    head = (f"POST /v1/images/generations HTTP/1.1\r\nHost: {u.hostname}\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    sock.sendall(head.encode())
    chunk = b"%x\r\n" % 2**20 + b"x" * 2**20 + b"\r\n"
    answer, sent = b"", 0
    try:
        while sent < 200 and not answer:
            sock.sendall(chunk)
            sent += 1
            if select.select([sock], [], [], 0.05)[0]:
                answer = sock.recv(65536)
        if not answer:
            sock.sendall(b"0\r\n\r\n")
            answer = sock.recv(65536)
    except (BrokenPipeError, ConnectionResetError):
        answer = answer or b"(closed)"
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 413") or answer == b"(closed)", answer[:200]
    assert sent < 100, f"{sent} MiB were sent before the refusal"
    assert len(images(post(server, {"prompt": "still here", "num_inference_steps": 2}))) == 1


def test_web_page(server, tmp_path):
    from browser import chromium
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with chromium(tmp_path / "profile") as driver:
        driver.get(server["url"])
        driver.find_element(By.ID, "prompt").send_keys("a green triangle")
        driver.find_element(By.ID, "apikey").send_keys(KEY)
        steps = driver.find_element(By.ID, "steps")
        steps.clear()
        steps.send_keys("2")
        driver.find_element(By.ID, "generate").click()
        img = WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#images img.result"))[0]
        assert img.get_attribute("src").startswith("data:image/png;base64,")
        WebDriverWait(driver, 10).until(lambda d: d.execute_script("return arguments[0].naturalWidth", img) == 64)
        assert "for a batch of 1" in driver.find_element(By.ID, "status").text


def _replicas() -> dict[str, int]:
    from ray import serve

    from serving.app import APP_NAME

    dep = serve.status().applications[APP_NAME].deployments["ImageServer"]
    return {str(k.value if hasattr(k, "value") else k): v for k, v in dep.replica_states.items()}


def _live(states: dict[str, int]) -> int:
    return sum(v for k, v in states.items() if k != "STOPPING")


def test_load_and_autoscaling(server):
    deadline = time.time() + 60  # the module's earlier requests may have scaled it up (held answers count as ongoing)
    while time.time() < deadline and _live(_replicas()) > 1:
        time.sleep(0.5)
    assert _live(_replicas()) == 1
    body = {"prompt": "load", "num_inference_steps": 2, "seed": 3}
    with ThreadPoolExecutor(50) as pool:  # 50 concurrent requests, all succeed
        answers = list(pool.map(lambda _: post(server, body), range(50)))
    assert [r.status_code for r in answers] == [200] * 50
    # they were batched (serve.max_batch_size 4), and each answer says where its time went
    timings = [r.json()["timings"] for r in answers]
    assert {t["batch_size"] for t in timings} <= {1, 2, 3, 4} and max(t["batch_size"] for t in timings) == 4
    for r, t in zip(answers, timings):
        assert 0 < t["render_ms"] and 0 <= t["queue_ms"] and 0 < t["encode_ms"]
        assert t["queue_ms"] + t["render_ms"] + t["held_ms"] + t["encode_ms"] <= r.json()["latency_ms"] + 1
        assert 0 <= t["held_ms"] < 1000 + 500  # released by the next batch's start, or by hold_answers_s at most
        # the batch's call by phase: each part measured, together within the call's own time
        ph = t["phases"]
        assert set(ph) == {"prep_ms", "denoise_ms", "decode_ms", "to_pil_ms"} and min(ph.values()) >= 0
        assert ph["denoise_ms"] > 0 and 0.3 * t["render_ms"] < sum(ph.values()) <= t["render_ms"] + 1
    assert max(t["queue_ms"] for t in timings) > min(t["render_ms"] for t in timings)  # later ones waited a batch

    # keep the load on until the autoscaler adds the second replica, then stop and watch it go again
    stop, grew = threading.Event(), False

    def client():
        while not stop.is_set():
            post(server, {**body, "num_inference_steps": 8})

    threads = [threading.Thread(target=client, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not grew:
            grew = _live(_replicas()) >= 2
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert grew, f"no second replica under load: {_replicas()}"
    deadline = time.time() + 60
    while time.time() < deadline and _live(_replicas()) > 1:
        time.sleep(0.5)
    assert _live(_replicas()) == 1, f"did not scale back down: {_replicas()}"
    assert len(images(post(server, body))) == 1
