"""`distillery evaluate CONFIG`: the evaluate stage. It reads the prompts (a file, or the cache's validation
captions, each at its aspect-ratio bucket's size on a bucketed cache) and the reference images (a folder, or the
cache's validation latents decoded with the teacher's VAE),
runs the evaluation core (models/evaluation.py) on the teacher and the student, as a Ray task with the GPUs it
asks for when the driver is on a cluster (evaluate.run_on), and writes

    {evaluate.output}/images/{teacher,student,student_{k}steps}/*.png, plots/*.png, metrics.json,
    report.html (pipelines/report.py), eval.json and the same logged to MLflow (into the student's training run
    when distillery.json names one); the scores go into the student's model card.

A rerun with the same inputs finds eval.json and returns the metrics it recorded.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image

from models import metrics as M
from models.evaluation import (
    caption_scores,
    decode,
    device_name,
    evaluate_pipelines,
    generate,
    image_size,
    load_pipelines,
    load_teacher_pipeline,
    sampling_description,
    size_groups,
    student_sampling,
    student_spec,
    to_pil,
)
from models.sampling import decode_latents
from models.student import META_FILE, StudentMeta, read_meta
from pipelines.cache import CacheManifest, read_manifest, read_split_columns, split_row_shapes
from pipelines.config import Config
from pipelines.report import write_report
from pipelines.storage import exists, is_remote, join, list_files, local_copy, model_dir, read_bytes, write_bytes

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
EVAL_MANIFEST = "eval.json"  # written last: its digest says which inputs the metrics are for


# ---------------------------------------------------------------------------------------------- inputs


def read_prompts(uri: str) -> list[str]:
    """A text file (local or remote), one prompt per line; blank lines are skipped. `builtin:shapes?n=N&seed=S`:
    the captions of that generated shapes dataset (models/shapes.py; seed 10000 is the shapes teacher's held-out
    evaluation set); `&holdout=K&only=heldout`: only captions of the K shape-color pairs a limited-data student's
    data left out."""
    if uri.startswith("builtin:shapes"):
        from models.shapes import prompts as shape_prompts
        from pipelines.prepare import builtin_params

        p = builtin_params(uri, "evaluate.prompts")
        return shape_prompts(p["n"], p["seed"], p["holdout"], p["only"])
    if not exists(uri):
        raise FileNotFoundError(f"evaluate.prompts {uri}: no such file")
    prompts = [line.strip() for line in read_bytes(uri).decode("utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"evaluate.prompts {uri}: the file has no prompts (one per line)")
    return prompts


def _require_cache(cache: str, what: str) -> CacheManifest:
    """The cache's manifest, where it is complete and has validation rows."""
    manifest = read_manifest(cache)
    if manifest is None or not manifest.complete:
        raise FileNotFoundError(
            f"no {what}: the embedding cache {cache} has no complete manifest.json (run `distillery prepare` "
            f"first, or set evaluate.{'prompts' if what.endswith('captions') else 'reference'})"
        )
    if not manifest.rows.get("val"):
        raise ValueError(f"no {what}: the embedding cache {cache} has no validation rows (data.val_fraction is 0?)")
    return manifest


def _latent_column(manifest: CacheManifest) -> str:
    return "latent" if manifest.latents == "sample" else "latent_mean"


def val_prompts(cache: str, limit: int) -> tuple[list[str], list[tuple[int, int]] | None]:
    """The cache's non-empty validation captions and, for an aspect-bucketed cache, each one's image size
    (width, height) from its latent's shape (None for square crops)."""
    manifest = _require_cache(cache, "validation captions")
    rows = {"caption": read_split_columns(cache, "val", ["caption"], limit)["caption"]}
    sizes = None
    if manifest.buckets:  # the latents' shapes from the files' footers: cache_reference reads the latents
        scale = manifest.resolution // manifest.latent_shape[-1]  # pixels per latent
        sizes = [(int(s[-1]) * scale, int(s[-2]) * scale)
                 for s in split_row_shapes(cache, "val", _latent_column(manifest), limit)]
    keep = [i for i, c in enumerate(rows["caption"]) if c and c.strip()]
    if not keep:
        raise ValueError(f"no validation captions: the cache {cache} has only empty captions")
    return [rows["caption"][i] for i in keep], sizes and [sizes[i] for i in keep]


def read_reference_folder(uri: str, size: int, limit: int | None = None) -> list[Image.Image]:
    """Every image under a folder (local or remote), center-cropped and resized to size x size."""
    if not exists(uri):
        raise FileNotFoundError(f"evaluate.reference {uri}: no such folder")
    names = [f for f in list_files(uri) if f.lower().endswith(IMAGE_EXTS)]
    images, bad = [], 0
    for name in names[:limit]:
        try:
            images.append(M.fit_image(Image.open(io.BytesIO(read_bytes(join(uri, name)))), size))
        except OSError:
            bad += 1
    if bad:
        log.warning("evaluate.reference %s: skipped %d file(s) that are not readable images", uri, bad)
    if len(images) < 2:
        raise ValueError(f"evaluate.reference {uri}: found {len(images)} readable images "
                         f"({', '.join(IMAGE_EXTS)}); FID needs at least 2")
    return images


def cache_reference(cache: str, vae: Any, limit: int | None, batch_size: int) -> list[Image.Image]:
    """The validation images as the cache holds them: latents decoded with the teacher's VAE (an aspect-bucketed
    cache's at their buckets' sizes, each shape decoded together)."""
    manifest = _require_cache(cache, "reference images")
    col = _latent_column(manifest)
    values = read_split_columns(cache, "val", [col], limit)[col]
    rows = list(values)  # one array per row (an (N, ...) array iterates as its rows)
    # "sample": scaled draws; "dist": the mean of the latent distribution, unscaled
    scale = manifest.vae_scaling_factor if manifest.latents == "sample" else 1.0
    images: list[Image.Image | None] = [None] * len(rows)
    for idx in size_groups([a.shape for a in rows]).values():
        lat = torch.from_numpy(np.stack([rows[i] for i in idx])).float() / scale
        for i, im in zip(idx, to_pil(decode_latents(vae, lat, batch_size))):
            images[i] = im
    if len(images) < 2:
        raise ValueError(f"the cache {cache} has {len(images)} validation image(s); FID needs at least 2")
    return images


# --------------------------------------------------------------------------------- scores for tune trials


def quality_scores(teacher_uri: str, student_uri: str | None, prompts: list[str], seeds: list[int], *, steps: int,
                   guidance_scale: float, size: int | None = None, batch_size: int = 4, clip_model: str | None = None,
                   dtype: str = "auto", device: str | None = None) -> dict[str, float]:
    """The image-quality scores of one pipeline on its own (the student's, or the teacher's with student_uri
    None), as this stage names them: caption accuracy where the prompts are shapes captions, the CLIP score with
    `clip_model`. One image per (prompt, seed), sampled as the stage samples a student; for `distillery tune`,
    which ranks trials on them."""
    t0 = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if student_uri is None:
        pipe = load_teacher_pipeline(model_dir(teacher_uri), dtype, device)
    else:  # a step-distilled student samples as its distillery.json records, as in the stage
        asked = SimpleNamespace(student=student_uri, student_steps=None, student_guidance_scale=None, steps=steps,
                                guidance_scale=guidance_scale)
        steps, guidance_scale = student_sampling(asked, _student_meta(student_uri))
        _, pipe = load_pipelines(model_dir(teacher_uri), model_dir(student_uri), dtype, device)
    size = size or image_size(pipe)
    images = decode(pipe, generate(pipe, prompts, seeds, steps, guidance_scale, size, batch_size), batch_size)
    out: dict[str, float] = {"num_images": float(len(prompts))}
    out.update(caption_scores(to_pil(images), prompts, "student"))
    if clip_model:
        model, tokenizer = M.load_clip(model_dir(clip_model), device)
        out["clip_score_student"] = M.clip_score(images, prompts, model, tokenizer)
    out["eval_s"] = time.perf_counter() - t0
    return out


# ----------------------------------------------------------------------------------------------- stage


def _student_meta(student: str) -> StudentMeta:
    if not (exists(join(student, "unet", "config.json"))):
        raise FileNotFoundError(f"evaluate.student {student}: no student pipeline there (expected a diffusers "
                                "folder with unet/, as the distill stage writes; run `distillery distill` first)")
    path = join(student, META_FILE)
    return read_meta(read_bytes(path), path) if exists(path) else StudentMeta()


def _weights_stamp(student: str) -> list:
    """Sizes and times of the student's U-Net files: a retrained student is a different student."""
    from pipelines.storage import filesystem

    fs, root = filesystem(join(student, "unet"))
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sorted((i.path[len(root):], i.size, str(i.mtime)) for i in infos if i.type == pafs.FileType.File)


def _digest(cfg: Config, meta: StudentMeta, prompts: list[str], reference: str,
            sizes: list[tuple[int, int]] | None = None) -> str:
    where = {"run_on", "num_gpus", "num_cpus"}  # where the stage runs does not change what it measures
    blob = json.dumps({"evaluate": cfg.evaluate.model_dump(mode="json", exclude=where),
                       "teacher": cfg.teacher.model_dump(mode="json"),
                       "student": meta.model_dump(mode="json", exclude_none=True),
                       "weights": _weights_stamp(cfg.evaluate.student), "prompts": prompts, "reference": reference,
                       **({"sizes": sizes} if sizes else {})},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _upload(local: Path, uri: str, names: list[str]) -> None:
    for name in names:
        write_bytes(join(uri, name), (local / name).read_bytes())


def log_to_mlflow(cfg: Config, meta: StudentMeta, metrics: dict[str, float], folder: Path) -> str:
    """Metrics and the report folder (as artifacts under evaluation/) into the student's training run when
    distillery.json names one that this tracking server has, else into a new run of cfg.mlflow.experiment."""
    from mlflow.exceptions import MlflowException

    from pipelines import tracking

    uri = cfg.tracking_uri()
    client = tracking.client(uri)
    run_id, created = meta.mlflow_run_id, False
    if run_id:
        try:
            client.get_run(run_id)
        except MlflowException:
            log.warning("distillery.json names MLflow run %s, which %s does not have: starting a new run", run_id, uri)
            run_id = None
    if not run_id:
        exp = client.get_experiment_by_name(cfg.mlflow.experiment)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(cfg.mlflow.experiment)
        run_id = client.create_run(exp_id, run_name=f"{cfg.name}-evaluate",
                                   tags={"distillery.stage": "evaluate"}).info.run_id
        created = True
        tracking.log_params(uri, run_id, cfg.model_dump(mode="json"))
    tracking.log_metrics(uri, run_id, metrics, step=0)
    client.set_tag(run_id, "distillery.eval_output", cfg.evaluate.output)
    client.log_artifacts(run_id, str(folder), "evaluation")
    if created:
        with contextlib.redirect_stdout(sys.stderr):  # MLflow prints the run's URL; stdout is the CLI's JSON
            client.set_terminated(run_id)
    return run_id


def runs_on_ray(cfg: Config) -> bool:
    """Whether the stage runs as a Ray task (evaluate.run_on; "auto": when the job runs on a cluster)."""
    how = cfg.evaluate.run_on
    return how == "ray" or (how == "auto" and bool(cfg.ray.address or os.environ.get("RAY_ADDRESS")))


def run(cfg: Config) -> dict[str, float]:
    """The evaluate stage: returns the metrics (also in {evaluate.output}/metrics.json and MLflow). On a cluster,
    as a Ray task with the GPUs it asks for (the driver of a job runs on the head, which may have none)."""
    if not runs_on_ray(cfg):
        return evaluate_here(cfg)
    from pipelines.storage import ensure_ray, require_gpus
    from pipelines.train import worker_env

    ev = cfg.evaluate
    ray = ensure_ray(cfg)
    gpus = ev.num_gpus if ev.num_gpus is not None else float(ray.cluster_resources().get("GPU", 0) >= 1)
    require_gpus(ray, "evaluate.num_gpus", gpus, "evaluate.num_gpus: 0, or leave it unset (1 where Ray has a GPU)")
    tree = cfg.model_dump(mode="json")
    tree["mlflow"]["tracking_uri"] = cfg.tracking_uri()  # the task logs where the driver would
    # ---- Ray: the stage's body as one task with the stage's resources
    task = ray.remote(_evaluate_task).options(num_cpus=ev.num_cpus, num_gpus=gpus,
                                              runtime_env={"env_vars": worker_env(gpus > 0)})
    log.info("evaluate: as a Ray task with %g CPU and %g GPU", ev.num_cpus, gpus)
    return ray.get(task.remote(tree, os.getcwd()))


def _evaluate_task(tree: dict, driver_cwd: str) -> dict[str, float]:
    """The stage in a Ray worker. Local paths resolve as in the driver when the task runs on its machine."""
    here = os.getcwd()
    if os.path.isdir(driver_cwd):
        os.chdir(driver_cwd)
    try:
        return evaluate_here(Config.model_validate(tree))
    finally:
        os.chdir(here)


def evaluate_here(cfg: Config) -> dict[str, float]:
    """The stage's body, in this process, on its GPU if it has one."""
    ev = cfg.evaluate
    out_uri = ev.output
    device = "cuda" if torch.cuda.is_available() else "cpu"

    # inputs first, so a bad one fails before any model loads
    meta = _student_meta(ev.student)
    student_steps, student_scale = student_sampling(ev, meta)
    sizes = None  # each prompt's (width, height): a bucketed cache's captions at their buckets' sizes
    if ev.prompts:
        prompts = read_prompts(ev.prompts)[: ev.num_prompts]
    else:
        prompts, sizes = val_prompts(cfg.data.output, ev.num_prompts)
    if ev.reference:
        if not exists(ev.reference):
            raise FileNotFoundError(f"evaluate.reference {ev.reference}: no such folder")
        ref_source = ev.reference
    else:
        buckets = _require_cache(cfg.data.output, "reference images").buckets
        at = ", at their buckets' sizes" if buckets else ""
        ref_source = f"{cfg.data.output} (validation latents{at})"
    image_prompts = [p for p in prompts for _ in range(ev.images_per_prompt)]
    image_sizes = sizes and [sz for sz in sizes for _ in range(ev.images_per_prompt)]
    seeds = [ev.seed + i for i in range(len(image_prompts))]
    if len(image_prompts) < 2:
        raise ValueError(f"{len(image_prompts)} image to evaluate; FID needs at least 2: raise evaluate.num_prompts "
                         "or evaluate.images_per_prompt")

    digest = _digest(cfg, meta, image_prompts, ref_source, image_sizes)
    done = join(out_uri, EVAL_MANIFEST)
    if exists(done) and json.loads(read_bytes(done)).get("digest") == digest:
        log.info("evaluate: %s already has the metrics of these inputs; skipping", out_uri)
        return json.loads(read_bytes(join(out_uri, "metrics.json")))

    teacher_pipe, student_pipe = load_pipelines(model_dir(cfg.teacher.uri), model_dir(ev.student), cfg.teacher.dtype,
                                                device, cfg.teacher.revision, cfg.teacher.variant,
                                                ev.student_decoder and model_dir(ev.student_decoder))
    size = ev.resolution or _cache_resolution(cfg.data.output) or image_size(teacher_pipe)
    if ev.reference:
        reference = read_reference_folder(ev.reference, size, ev.num_reference)
    else:
        reference = cache_reference(cfg.data.output, teacher_pipe.vae, ev.num_reference, ev.batch_size)
    spec = student_spec(meta, teacher_pipe, student_pipe)
    result = evaluate_pipelines(
        teacher_pipe, student_pipe, image_prompts, seeds, spec=spec, steps=ev.steps,
        guidance_scale=ev.guidance_scale, student_steps=student_steps, student_guidance_scale=student_scale,
        steps_sweep=ev.steps_sweep, size=size, sizes=image_sizes, batch_size=ev.batch_size, reference=reference,
        feature_extractor=ev.feature_extractor and local_copy(ev.feature_extractor),
        clip_model=ev.clip_model and model_dir(ev.clip_model), latency_repeats=ev.latency_repeats,
        embedding_samples=ev.embedding_samples, seed=ev.seed,
    )
    info = {"teacher": cfg.teacher.uri, "student": ev.student, "preset": meta.preset,
            "step distillation": meta.steps_distillation and meta.steps_distillation.objective,
            "teacher sampling": sampling_description(teacher_pipe, ev.steps, ev.guidance_scale),
            "student sampling": sampling_description(student_pipe, student_steps, student_scale),
            "steps sweep": ", ".join(map(str, ev.steps_sweep)) or "none",
            "student decoder": ev.student_decoder or "the teacher's VAE",
            "reference": ref_source, "device": device_name(device), "dtype": str(teacher_pipe.unet.dtype),
            "sizes": ", ".join(f"{w}x{h}" for w, h in dict.fromkeys(image_sizes or [(size, size)])) + (
                f" (images compared at {size}x{size}, center-cropped)" if image_sizes else ""),
            "feature extractor": ev.feature_extractor or "inception-v3-compat (torch-fidelity download)",
            "clip model": ev.clip_model}
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(out_uri) if not is_remote(out_uri) else Path(tmp)
        local.mkdir(parents=True, exist_ok=True)
        write_report(result, local, f"{cfg.name}: student vs teacher", info, goal=ev.goal)
        run_id = log_to_mlflow(cfg, meta, result.metrics, local)
        manifest = {"digest": digest, "complete": True, "mlflow_run_id": run_id, "student": ev.student,
                    "teacher": cfg.teacher.uri, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "ran_on": {"host": socket.gethostname(), "pid": os.getpid(), "device": device_name(device)}}
        if is_remote(out_uri):
            names = [str(p.relative_to(local)) for p in sorted(local.rglob("*")) if p.is_file()]
            _upload(local, out_uri, names)
        write_bytes(done, json.dumps(manifest, indent=2).encode())  # last: the outputs are complete
    log.info("evaluate: wrote %s (MLflow run %s)", out_uri, run_id)
    _score_card(ev.student, result.metrics, ev.goal)
    return result.metrics


def _score_card(student: str, metrics: dict[str, float], goal: float) -> None:
    """The student folder's model card gets these scores (a folder or s3:// with a card this project wrote; a
    registry or Hub student is left as it is)."""
    from models.export import with_scores

    card_uri = join(student, "README.md")
    try:
        if not exists(card_uri):
            return
        text = with_scores(read_bytes(card_uri).decode(), metrics, goal)
        if text is not None:
            write_bytes(card_uri, text.encode())
            log.info("evaluate: the scores are in %s", card_uri)
    except (OSError, ValueError) as e:  # a read-only or remote-only student: the report has the scores anyway
        log.warning("evaluate: could not write the scores into %s: %s", card_uri, e)


def _cache_resolution(cache: str | None) -> int | None:


    try:
        manifest = read_manifest(cache) if cache else None
    except (OSError, ValueError):
        return None
    return manifest.resolution if manifest else None


