"""Aspect-ratio buckets in training (data.aspect_buckets): an SDXL cache of three aspect ratios, prepared from images
written with PIL, gives batches of one bucket each, in the data's bucket mix, preloaded or streamed, and the distill
stage trains on it with DeepSpeed ZeRO-2, checkpoints, resumes and exports; the steps stage makes a few-step student of
it on the same cache; both record and serve at the sizes they were trained at."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.config import parse_config

SIZES = {"square": (64, 64), "wide": (128, 64), "tall": (64, 128)}  # (width, height) of the source images
COLORS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 20)]


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory, ray_local):
    """The config and the prepared cache: 30 images (10 per aspect ratio) with .txt captions, as a user's folder."""
    from pipelines import prepare

    root = tmp_path_factory.mktemp("buckets")
    src = root / "images"
    src.mkdir()
    for i in range(30):
        kind = list(SIZES)[i % 3]
        color = COLORS[i % 4]
        img = Image.new("RGB", SIZES[kind], (240, 240, 240))
        w, h = SIZES[kind]
        img.paste(color, (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
        img.save(src / f"{kind}-{i:02d}.png")
        (src / f"{kind}-{i:02d}.txt").write_text(f"a {kind} picture, color {i % 4}")
    tree = {"name": "b", "work_dir": str(root / "work"), "teacher": {"uri": "builtin:tiny-sdxl"},
            "data": {"source": str(src), "resolution": 64, "aspect_buckets": True, "val_fraction": 0.2,
                     "dedup": False, "min_side": 16},
            "student": {"preset": "ssd-1b"},
            "distill": {"num_workers": 1, "batch_size": 2, "lr": 1e-3,
                        "deepspeed": True, "zero_stage": 2, "sample_steps": 1, "sample_prompts": ["a wide picture"],
                        "log_every": 1, "val_batches": 3, "val_every": 2, "checkpoint_every": 2, "max_steps": 2}}
    cfg = parse_config(tree)
    prepare.run(cfg)
    return tree, cfg


def _shapes(cfg) -> Counter:
    """Training rows per latent shape, read from the cache's files with pyarrow."""
    import pyarrow.parquet as pq

    out: Counter = Counter()
    for f in (Path(cfg.data.output) / "train").glob("*.parquet"):
        col = pq.read_table(f, columns=["latent_mean"]).column("latent_mean")
        out[tuple(col.type.shape)] += len(col)
    return out


def test_batches_hold_one_bucket_each_in_the_data_mix(bucketed):
    import torch

    from pipelines.cache import read_manifest
    from pipelines.train import TrainBatches, rank_rows, training_datasets

    tree, cfg = bucketed
    manifest = read_manifest(cfg.data.output)
    assert manifest.buckets and manifest.family == "sdxl"
    rows = _shapes(cfg)
    assert len(rows) == 3, rows  # square, wide and tall images landed in three buckets
    for preload_gb in (0.0, 1.0):  # streamed from Ray Data, then preloaded (the worker reads its rows itself)
        c = parse_config({**tree, "distill": {**tree["distill"], "preload_gb": preload_gb}})
        datasets = training_datasets(c, manifest)
        assert bool(datasets) == (preload_gb == 0)
        own = None if datasets else rank_rows(c.distill.cache, manifest, 0, 1)
        batches = TrainBatches(datasets.get("train"), manifest, "sdxl", c.distill, 0, torch.device("cpu"), None,
                               seed=0, rows=own)
        assert batches.preloaded == (preload_gb > 0)
        seen: Counter = Counter()
        while True:
            epoch, latents, cond = next(batches)
            if epoch >= 3:
                break
            shape = tuple(latents.shape[1:])
            assert latents.shape[0] == 2 and shape in rows, shape
            # the SDXL time ids of each row name its own bucket's size (target size = the latents' size x 8 / f)
            ids = cond["added_cond_kwargs"]["time_ids"]
            assert ids.shape == (2, 6) and torch.equal(ids[0, 4:], ids[1, 4:])
            seen[shape] += 1
        # every bucket is drawn from, each in proportion to its rows (3 epochs of its full batches)
        assert set(seen) == set(rows), (seen, rows)
        for shape, n in rows.items():
            assert abs(seen[shape] - 3 * n / 2) <= 3, (seen, rows)


def test_workers_shares_of_a_preloaded_cache_are_its_rows_once(bucketed):
    """rank_rows: three workers' contiguous shares, read with pyarrow across the cache's files, are every training
    row once, in order, and differ in size by one row at most."""
    from pipelines.cache import read_manifest, read_split_columns
    from pipelines.train import rank_rows

    _, cfg = bucketed
    manifest = read_manifest(cfg.data.output)
    assert len(list((Path(cfg.data.output) / "train").glob("*.parquet"))) > 1  # shares cross file boundaries
    every = read_split_columns(cfg.data.output, "train", ["latent_mean", "prompt_embeds"])["latent_mean"]
    shares = [rank_rows(cfg.data.output, manifest, r, 3)["latent_mean"] for r in range(3)]
    joined = [row for share in shares for row in share]
    assert len(joined) == len(every) == manifest.rows["train"]
    assert all(np.array_equal(a, b) for a, b in zip(joined, every))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_row_shapes_from_the_footers_are_the_arrays_shapes(bucketed):
    """split_row_shapes (the evaluate stage's bucket sizes, read without the latents) gives each row's shape in
    read_split_columns' order, whole and cut at a limit that ends inside a file."""
    from pipelines.cache import read_split_columns, split_row_shapes

    _, cfg = bucketed
    for split in ("train", "val"):
        arrays = read_split_columns(cfg.data.output, split, ["latent_mean"])["latent_mean"]
        shapes = [a.shape for a in arrays]
        assert split_row_shapes(cfg.data.output, split, "latent_mean") == shapes
        assert split_row_shapes(cfg.data.output, split, "latent_mean", limit=len(shapes) - 1) == shapes[:-1]
    assert len(set(split_row_shapes(cfg.data.output, "train", "latent_mean"))) == 3


def test_bucketed_distill_and_steps_train_checkpoint_resume_and_export(bucketed, mlflow_server):
    from diffusers import UNet2DConditionModel

    from pipelines import distill

    tree, _ = bucketed
    tree = {**tree, "mlflow": {"tracking_uri": mlflow_server.url, "experiment": "buckets"}}
    first = distill.run(parse_config(tree))
    assert first["step"] == 2 and np.isfinite(first["losses"]["loss"])
    more = {**tree, "distill": {**tree["distill"], "max_steps": 4}}
    second = distill.run(parse_config(more))  # the same job, further: it resumes from the step-2 checkpoint
    assert second["step"] == 4 and second["mlflow_run_id"] == first["mlflow_run_id"]
    out = parse_config(more).distill.output
    meta = json.loads(open(f"{out}/distillery.json").read())
    assert meta["step"] == 4
    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    assert unet.config.addition_embed_type == "text_time"  # an SDXL student, loaded by plain diffusers
    # it records the sizes it was trained at (the square one first, then the buckets); Serve offers those when
    # serve.sizes is unset, and the student generates at a wide bucket's size
    from diffusers import StableDiffusionXLPipeline

    from models.sampling import ImageJob, generate_images, load_pipeline
    from pipelines.cache import read_manifest
    from serving.replica_pipeline import served_sizes

    buckets = read_manifest(parse_config(more).data.output).buckets
    assert meta["sizes"][0] == "64x64" and sorted(meta["sizes"]) == sorted(buckets), meta["sizes"]
    pipe = load_pipeline(out, "cpu")
    assert isinstance(pipe, StableDiffusionXLPipeline) and served_sizes(out, pipe) == meta["sizes"]
    wide = max(meta["sizes"], key=lambda s: int(s.split("x")[0]) / int(s.split("x")[1]))
    w, h = (int(v) for v in wide.split("x"))
    (png,) = generate_images(pipe, [ImageJob("a wide picture", num_inference_steps=1, width=w, height=h, seed=0)])
    assert Image.open(io.BytesIO(png)).size == (w, h)
    # the steps stage on the same bucketed cache: guided stage 1 and one progressive round (4 -> 2 steps); the
    # few-step SDXL student takes w, keeps the sizes it was trained at and draws a wide image in 2 steps
    from pipelines import fewstep

    steps_tree = {**more, "distill": {**more["distill"], "deepspeed": True, "zero_stage": 2},
                  "steps": {"objective": "guided", "student": out, "teacher_steps": 4, "rounds": 1,
                            "steps_per_round": 2, "batch_size": 2, "lr": 1e-3}}
    few = fewstep.run(parse_config(steps_tree))
    assert few["steps"] == 2 and np.isfinite(few["loss"])
    few_meta = json.loads(open(f"{few['output']}/distillery.json").read())
    assert few_meta["steps"] == 2 and few_meta["sizes"] == meta["sizes"]
    fast = load_pipeline(few["output"], "cpu")
    assert isinstance(fast, StableDiffusionXLPipeline) and fast.unet.config.time_cond_proj_dim
    (png,) = generate_images(fast, [ImageJob("a wide picture", num_inference_steps=2, width=w, height=h, seed=0)])
    assert Image.open(io.BytesIO(png)).size == (w, h)
    # the evaluate stage on the bucketed cache: each validation caption generated at its bucket's size (by both
    # models), against the validation images decoded at their sizes; every image center-cropped to 64 px to compare
    import mlflow
    import pandas as pd
    import pyarrow.parquet as pq

    from pipelines import evaluate, register

    val_shapes = {tuple(pq.read_table(f, columns=["latent_mean"]).column("latent_mean").type.shape)
                  for f in (Path(parse_config(more).data.output) / "val").glob("*.parquet")}
    assert len(val_shapes) >= 2  # the data's validation split holds several buckets
    ev = {"student": out, "run_on": "driver", "num_prompts": 6, "feature_extractor": "builtin:tiny", "steps": 2,
          "latency_repeats": 1, "embedding_samples": 2, "batch_size": 2, "guidance_scale": 5.0}
    scored = {**more, "evaluate": ev, "registry": {"model_name": "sdxl-buckets-student"}}
    metrics = evaluate.run(parse_config(scored))
    assert metrics["num_sizes"] == len(val_shapes) and metrics["num_reference"] == metrics["num_images"]
    assert metrics["params_student"] < metrics["params_teacher"] and np.isfinite(metrics["fid_student_vs_teacher"])
    assert np.isfinite(metrics["fid"]) and np.isfinite(metrics["psnr"])
    import html

    report = html.unescape((Path(parse_config(scored).evaluate.output) / "report.html").read_text())
    assert "at their buckets' sizes" in report  # and it says which sizes it generated at
    m = read_manifest(parse_config(more).data.output)
    px = m.resolution // m.latent_shape[-1]  # pixels per latent (the tiny VAE's 4)
    assert all(f"{px * shape[-1]}x{px * shape[-2]}" in report for shape in val_shapes), (val_shapes, px)
    # the registered model generates through MLflow's pyfunc
    done = register.run(parse_config(scored))
    model = mlflow.pyfunc.load_model(f"models:/{parse_config(scored).registry.model_name}@champion")
    got = model.predict(pd.DataFrame([{"prompt": "a wide picture", "num_inference_steps": 2, "seed": 0, "width": w,
                                       "height": h}]))
    assert done["version"] >= 1 and Image.open(io.BytesIO(list(got["image"])[0])).size == (w, h)
    # and Ray Serve, over real HTTP, at the sizes it was trained at (serve.sizes unset): a wide bucket's image, and
    # a size it was not trained at refused by name
    import base64

    import requests
    from ray import serve

    from pipelines import local
    from serving.app import build_app

    port = local.free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(parse_config({**more, "serve": {"model": out, "num_cpus": 0.2, "max_batch_size": 2,
                                                             "default_steps": 1}})),
                  name="buckets", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/images/generations"
        r = requests.post(url, json={"prompt": "a wide picture", "size": wide, "seed": 0}, timeout=120)
        assert r.status_code == 200, r.text
        assert Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).size == (w, h)
        bad = requests.post(url, json={"prompt": "a wide picture", "size": "40x40"}, timeout=120)
        assert bad.status_code == 400 and "size" in bad.text and wide in bad.text, bad.text
    finally:
        serve.shutdown()


def test_vega_on_buckets_with_zero3(bucketed):
    """The other SDXL preset on the bucketed cache, parameters sharded (ZeRO-3): it trains, checkpoints, exports a
    consolidated student that plain diffusers loads, and draws a wide bucket's image."""
    from diffusers import UNet2DConditionModel

    from models.sampling import ImageJob, generate_images, load_pipeline
    from pipelines import distill

    tree, _ = bucketed
    tree = {**tree, "student": {"preset": "vega"},
            "distill": {**tree["distill"], "zero_stage": 3, "run_name": "b-vega",
                        "output": str(Path(tree["work_dir"]) / "student-vega")}}
    cfg = parse_config(tree)
    result = distill.run(cfg)
    assert result["step"] == 2 and np.isfinite(result["losses"]["loss"])
    meta = json.loads((Path(cfg.distill.output) / "distillery.json").read_text())
    assert meta["preset"] == "vega" and len(meta["sizes"]) > 1
    unet = UNet2DConditionModel.from_pretrained(cfg.distill.output, subfolder="unet")
    assert unet.config.addition_embed_type == "text_time"
    wide = max(meta["sizes"], key=lambda s: int(s.split("x")[0]) / int(s.split("x")[1]))
    w, h = (int(v) for v in wide.split("x"))
    (png,) = generate_images(load_pipeline(cfg.distill.output, "cpu"),
                             [ImageJob("a wide picture", num_inference_steps=1, width=w, height=h, seed=0)])
    assert Image.open(io.BytesIO(png)).size == (w, h)
