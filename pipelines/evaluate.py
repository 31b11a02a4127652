"""`distillery evaluate CONFIG`: how good, how faithful, how fast and how small the student is next to its
teacher. A plain Python stage (no Ray): the work is one process's worth of generation.

    prompts (a file, or the cache's validation captions) x seeds
      │  teacher and student generate from the same seeds: the teacher at evaluate.steps with classifier-free
      │  guidance, the student at its own steps and guidance (and at each of evaluate.steps_sweep)
      ▼
    quality    FID/KID/IS against reference images (a folder, or the cache's validation latents decoded
               with the teacher's VAE), FID student vs teacher, CLIP score, caption accuracy (shapes)
    fidelity   latent MSE, pixel PSNR/SSIM of student vs teacher images, per-block feature cosine
    speed/size U-Net params, MACs per U-Net call, latency per step and per image, peak CUDA memory
    embeddings PCA and t-SNE of teacher vs student block features and U-Net outputs
      ▼
    steps sweep the student at k steps for each k: the quality, fidelity and latency metrics again, named
               with a suffix `_{k}steps` (fid_student_vs_teacher_1steps, speedup_image_4steps, ...)
      ▼
    {evaluate.output}/images/{teacher,student,student_{k}steps}/*.png, plots/*.png, metrics.json,
    report.html, eval.json and the same logged to MLflow (into the student's training run when
    distillery.json names one).

`evaluate_pipelines` is the core, callable on any two diffusers pipelines without Ray or MLflow. The
student runs with the teacher's VAE and text encoder(s) (the distill and steps stages copy them
unchanged), so only the U-Nets and schedulers differ: the student samples with its own scheduler when its
folder has one (a step-distilled student: DDIM with trailing spacing, or LCM), else the teacher's. A
student whose U-Net takes the guidance weight w as an input (`time_cond_proj_dim`: guided and consistency
students) gets w through its w-embedding and runs one U-Net forward per step where the teacher runs two.
A rerun with the same inputs finds eval.json and returns the metrics it recorded.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import inspect
import io
import json
import logging
import math
import os
import re
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image

from models import report
from models.kd import Taps, feature_pairs
from models.sampling import decode_latents
from models.steps import guidance_embedding
from models.student import RemovalSpec, count_params
from models.teacher import (
    Teacher,
    detect_family,
    encode_prompts,
    load_decoder,
    pick_dtype,
    resolve_model_dir,
    sdxl_time_ids,
    swap_decoder,
)
from pipelines import metrics as M
from pipelines.config import Config
from pipelines.storage import exists, is_remote, join, list_files, read_bytes, write_bytes

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
EVAL_MANIFEST = "eval.json"  # written last: its digest says which inputs the metrics are for


@dataclass
class Evaluation:
    metrics: dict[str, float]
    prompts: list[str]  # one per image
    seeds: list[int]
    teacher_images: list[Image.Image]
    student_images: list[Image.Image]
    embeddings: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # name -> teacher/student (K, D)
    sweep_images: dict[int, list[Image.Image]] = field(default_factory=dict)  # steps -> the student's images


# ---------------------------------------------------------------------------------------------- inputs


def read_prompts(uri: str) -> list[str]:
    """A text file (local or remote), one prompt per line; blank lines are skipped. `builtin:shapes?n=N&seed=S`:
    the captions of that generated shapes dataset (pipelines/shapes.py; seed 10000 is the shapes teacher's held-out
    evaluation set); `&holdout=K&only=heldout`: only captions of the K shape-color pairs a limited-data student's
    data left out."""
    if uri.startswith("builtin:shapes"):
        from pipelines.prepare import builtin_params
        from pipelines.shapes import prompts as shape_prompts

        p = builtin_params(uri, "evaluate.prompts")
        return shape_prompts(p["n"], p["seed"], p["holdout"], p["only"])
    if not exists(uri):
        raise FileNotFoundError(f"evaluate.prompts {uri}: no such file")
    prompts = [line.strip() for line in read_bytes(uri).decode("utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"evaluate.prompts {uri}: the file has no prompts (one per line)")
    return prompts


def _require_cache(cache: str, what: str) -> dict:
    from pipelines.cache import read_manifest

    manifest = read_manifest(cache)
    if manifest is None or not manifest.get("complete"):
        raise FileNotFoundError(
            f"no {what}: the embedding cache {cache} has no complete manifest.json (run `distillery prepare` "
            f"first, or set evaluate.{'prompts' if what.endswith('captions') else 'reference'})"
        )
    if not manifest.get("rows", {}).get("val"):
        raise ValueError(f"no {what}: the embedding cache {cache} has no validation rows (data.val_fraction is 0?)")
    return manifest


def read_val_columns(cache: str, columns: list[str], limit: int | None = None) -> dict[str, Any]:
    """Columns of the cache's validation split, in file order: strings as lists, tensors as (N, ...) arrays."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data.extensions  # noqa: F401  (registers the Arrow tensor type, so tensors read back as such)

    from pipelines.storage import filesystem

    root = join(cache, "val")
    files = [f for f in list_files(root) if f.endswith(".parquet")]
    if not files:
        raise FileNotFoundError(f"{root}: no parquet files")
    fs, base = filesystem(root)
    tables, n = [], 0
    for f in files:
        t = pq.read_table(f"{base}/{f}", filesystem=fs, columns=columns)
        tables.append(t)
        n += t.num_rows
        if limit is not None and n >= limit:
            break
    table = pa.concat_tables(tables)
    if limit is not None:
        table = table.slice(0, limit)
    out: dict[str, Any] = {}
    for name in columns:
        col = table.column(name).combine_chunks()
        if hasattr(col, "to_numpy_ndarray"):  # ray's tensor extension array
            out[name] = col.to_numpy_ndarray()
        elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            out[name] = col.to_pylist()
        else:
            out[name] = np.stack([np.asarray(v, dtype=np.float32) for v in col.to_pylist()])
    return out


def val_captions(cache: str, limit: int) -> list[str]:
    _require_cache(cache, "validation captions")
    captions = [c for c in read_val_columns(cache, ["caption"], limit)["caption"] if c and c.strip()]
    if not captions:
        raise ValueError(f"no validation captions: the cache {cache} has only empty captions")
    return captions


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
    """The validation images as the cache holds them: latents decoded with the teacher's VAE."""
    manifest = _require_cache(cache, "reference images")
    if manifest.get("latents") == "sample":
        lat = torch.from_numpy(read_val_columns(cache, ["latent"], limit)["latent"]).float()
        lat = lat / float(manifest["vae_scaling_factor"])
    else:  # "dist": the mean of the latent distribution, unscaled
        lat = torch.from_numpy(read_val_columns(cache, ["latent_mean"], limit)["latent_mean"]).float()
    images = decode_latents(vae, lat, batch_size)
    if len(images) < 2:
        raise ValueError(f"the cache {cache} has {len(images)} validation image(s); FID needs at least 2")
    return to_pil(images)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


# ------------------------------------------------------------------------------------------- pipelines


def load_pipelines(teacher_uri: str, student_uri: str, dtype: str = "auto", device: str = "cpu",
                   revision: str | None = None, variant: str | None = None,
                   student_decoder: str | None = None) -> tuple[Any, Any]:
    """(teacher pipeline, student pipeline). The student pipeline is the teacher's with the student U-Net
    (loaded from STUDENT/unet) and the student's own scheduler (STUDENT/scheduler, as the steps stage
    writes it), or a fresh copy of the teacher's when the student folder has none; with `student_decoder`
    (TAESD or another VAE) the student decodes with it, the teacher with its own VAE."""
    from diffusers import UNet2DConditionModel

    teacher = load_teacher_pipeline(teacher_uri, dtype, device, revision, variant)
    student_dir = resolve_model_dir(student_uri)
    student_unet = UNet2DConditionModel.from_pretrained(student_dir, subfolder="unet", dtype=teacher.unet.dtype)
    student = with_unet(teacher, student_unet, own_scheduler(student_dir, student_uri))
    student.to(device)
    student.set_progress_bar_config(disable=True)
    if student_decoder:  # float32 like the teacher's VAE: decoding is a small part of the time
        decoder = load_decoder(student_decoder, torch.float32)
        swap_decoder(student, decoder, f"evaluate.student_decoder {student_decoder}")
    return teacher, student


def load_teacher_pipeline(teacher_uri: str, dtype: str = "auto", device: str = "cpu", revision: str | None = None,
                          variant: str | None = None) -> Any:
    """The teacher's pipeline as this stage compares it: no safety checker (raw outputs), the VAE in float32."""
    from diffusers import DiffusionPipeline

    src = resolve_model_dir(teacher_uri)
    kw: dict[str, Any] = {"dtype": pick_dtype(dtype, device)}
    if revision:
        kw["revision"] = revision
    if variant:
        kw["variant"] = variant
    index = DiffusionPipeline.load_config(src, **({"revision": revision} if revision else {}))
    if "safety_checker" in index:  # we compare raw outputs; a safety checker would black some out
        kw.update(safety_checker=None, requires_safety_checker=False)
    teacher = DiffusionPipeline.from_pretrained(src, **kw)
    if teacher.vae.dtype != torch.float32:  # SD VAEs overflow in fp16; decoding is a small part of the time
        teacher.vae.to(torch.float32)
    teacher.to(device)
    teacher.set_progress_bar_config(disable=True)
    return teacher


def own_scheduler(folder: str, uri: str | None = None) -> Any | None:
    """The scheduler a pipeline folder carries (scheduler/scheduler_config.json, of the diffusers class it
    names), or None when it has none."""
    import diffusers

    path = Path(folder) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    name = json.loads(path.read_text()).get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if cls is None or not hasattr(cls, "from_pretrained") or not name.endswith("Scheduler"):
        raise ValueError(f"evaluate.student {uri or folder}: scheduler/scheduler_config.json names {name!r}, "
                         "which is not a diffusers scheduler class")
    return cls.from_pretrained(folder, subfolder="scheduler")


def with_unet(pipe: Any, unet: Any, scheduler: Any | None = None) -> Any:
    """The same pipeline class and components with another U-Net and `scheduler` (default: a fresh copy
    of the pipeline's own)."""
    if scheduler is None:
        scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    comps = {**pipe.components, "unet": unet, "scheduler": scheduler}
    params = inspect.signature(pipe.__class__.__init__).parameters
    for name in params:  # config-only arguments (requires_safety_checker, force_zeros_for_empty_prompt)
        if name not in comps and name in pipe.config:
            comps[name] = pipe.config[name]
    return pipe.__class__(**{k: v for k, v in comps.items() if k in params})


def image_size(pipe: Any) -> int:
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def takes_w(unet: Any) -> bool:
    """Whether the U-Net takes the guidance weight w as an input (a w-embedding, `time_cond_proj_dim`):
    diffusers' pipelines then feed it w instead of running classifier-free guidance."""
    return unet.config.get("time_cond_proj_dim") is not None


def cfg_batch(pipe: Any, guidance_scale: float) -> int:
    """The batch of one denoising step's U-Net call for one image: 2 under classifier-free guidance (which
    the pipelines run when guidance_scale > 1 and the U-Net has no w input), else 1."""
    return 2 if guidance_scale > 1 and not takes_w(pipe.unet) else 1


@torch.no_grad()
def generate(pipe: Any, prompts: list[str], seeds: list[int], steps: int, guidance_scale: float, size: int,
             batch_size: int) -> torch.Tensor:
    """Scaled latents (N, 4, h, w), one per (prompt, seed). One CPU generator per image, so an image
    depends only on its prompt and seed, not on the batching or the device."""
    out = []
    for i in range(0, len(prompts), batch_size):
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[i : i + batch_size]]
        res = pipe(prompt=prompts[i : i + batch_size], generator=gens, num_inference_steps=steps,
                   guidance_scale=guidance_scale, height=size, width=size, output_type="latent")
        out.append(res.images.float().cpu())
    return torch.cat(out)


def decode(pipe: Any, latents: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    return decode_latents(pipe.vae, latents / pipe.vae.config.scaling_factor, batch_size)


def as_teacher(pipe: Any) -> Teacher:
    """The pipeline's components as models.teacher.Teacher (for encode_prompts)."""
    c = pipe.components
    sdxl = c.get("text_encoder_2") is not None
    return Teacher(source="", family="sdxl" if sdxl else detect_family(pipe.unet.config),
                   prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"), dtype=pipe.unet.dtype,
                   unet=pipe.unet, vae=pipe.vae, text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                   scheduler=pipe.scheduler, text_encoder_2=c.get("text_encoder_2"), tokenizer_2=c.get("tokenizer_2"))


def _conditioning(teacher: Teacher, prompts: list[str], size: int) -> dict[str, Any]:
    enc = encode_prompts(teacher, prompts)
    dtype = teacher.unet.dtype
    kw: dict[str, Any] = {"encoder_hidden_states": enc["prompt_embeds"].to(dtype)}
    if teacher.family == "sdxl":
        ids = torch.tensor([sdxl_time_ids((size, size), (0, 0), (size, size))] * len(prompts),
                           device=enc["pooled"].device, dtype=dtype)
        kw["added_cond_kwargs"] = {"text_embeds": enc["pooled"].to(dtype), "time_ids": ids}
    return kw


def _select(cond: dict[str, Any], idx: torch.Tensor) -> dict[str, Any]:
    return {k: _select(v, idx) if isinstance(v, dict) else v[idx.to(v.device)] for k, v in cond.items()}


@torch.no_grad()
def feature_analysis(teacher_pipe: Any, student_pipe: Any, spec: RemovalSpec | None, prompts: list[str],
                     latents: torch.Tensor, samples: int, batch_size: int, size: int, seed: int = 0,
                     guidance_scale: float | None = None,
                     ) -> tuple[dict[str, float], dict[str, dict[str, np.ndarray]]]:
    """Both U-Nets on the same noisy inputs (the teacher's own latents, noised at random timesteps, with
    their prompts): per-block cosine similarity of student vs teacher features (the block map of the
    removal spec) and of the outputs, and pooled features of each for the embedding plots. A student
    that takes w as an input gets `guidance_scale` through its w-embedding, and its output is compared with
    what it was distilled towards: the teacher's classifier-free-guided output at that w."""
    from diffusers import DDPMScheduler

    t_unet, s_unet = teacher_pipe.unet, student_pipe.unet
    pairs = feature_pairs(s_unet, t_unet, spec, level="block") if spec is not None else []
    noiser = DDPMScheduler.from_config(teacher_pipe.scheduler.config)
    teacher = as_teacher(teacher_pipe)
    cond = _conditioning(teacher, prompts, size)
    w = float(guidance_scale if guidance_scale is not None else 1.0) if takes_w(s_unet) else None
    uncond = _conditioning(teacher, [""], size) if w is not None and w > 1 and not takes_w(t_unet) else None
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(samples) % len(latents)
    cos: dict[str, list[torch.Tensor]] = {t: [] for _, t in pairs} | {"output": []}
    emb: dict[str, dict[str, list[torch.Tensor]]] = {name: {"teacher": [], "student": []} for name in cos}
    device, dtype = t_unet.device, t_unet.dtype
    for i in range(0, samples, batch_size):
        b = idx[i : i + batch_size]
        x0 = latents[b]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, noiser.config.num_train_timesteps, (len(b),), generator=g)
        noisy = noiser.add_noise(x0, noise, t).to(device, dtype)
        kw, s_kw = _select(cond, b), {}
        if w is not None:
            s_kw["timestep_cond"] = guidance_embedding(torch.full((len(b),), w), s_unet.config.time_cond_proj_dim
                                                       ).to(device, s_unet.dtype)
        t_uncond = (t_unet(noisy, t.to(device), **_select(uncond, torch.zeros_like(b))).sample
                    if uncond is not None else None)
        with Taps(t_unet, [t for _, t in pairs]) as t_tap, Taps(s_unet, [s for s, _ in pairs]) as s_tap:
            t_out = t_unet(noisy, t.to(device), **kw).sample
            if t_uncond is not None:  # u + w·(c - u), the guided student's target
                t_out = t_uncond + w * (t_out - t_uncond)
            s_out = s_unet(noisy, t.to(device), **kw, **s_kw).sample
            feats = [(tp, s_tap.features[sp], t_tap.features[tp]) for sp, tp in pairs]
            feats.append(("output", s_out, t_out))
            for name, s_f, t_f in feats:
                cos[name].append(M.cosine_per_sample(s_f, t_f).cpu())
                emb[name]["teacher"].append(M.pooled(t_f))
                emb[name]["student"].append(M.pooled(s_f))
    metrics = {f"feature_cosine_{name.replace('.', '_')}": float(torch.cat(v).mean()) for name, v in cos.items()}
    metrics["feature_cosine_mean"] = float(np.mean([m for k, m in metrics.items() if not k.endswith("_output")]
                                                   or [metrics["feature_cosine_output"]]))
    embeddings = {name: {who: torch.cat(v).numpy() for who, v in d.items()} for name, d in emb.items()}
    return metrics, embeddings


def image_latency(pipe: Any, prompt: str, seed: int, steps: int, guidance_scale: float, size: int,
                  repeats: int) -> float:
    """Median milliseconds for one image (batch 1): text encoding, `steps` denoising steps and the VAE
    decode, after a warm-up."""
    def one_image() -> None:
        decode(pipe, generate(pipe, [prompt], [seed], steps, guidance_scale, size, 1))

    return M.median(M.measure_latency(one_image, repeats, warmup=1, device=pipe.unet.device))


def speed_and_size(teacher_pipe: Any, student_pipe: Any, prompt: str, seed: int, steps: int, guidance_scale: float,
                   size: int, repeats: int, student_steps: int | None = None,
                   student_guidance_scale: float | None = None) -> dict[str, float]:
    """Parameters and MACs of each U-Net (one call, batch 1); latency per denoising step (one U-Net call at
    the batch its pipeline runs for one image: 2 under classifier-free guidance, 1 without it or for a
    U-Net that takes w as an input, which then gets its w-embedding) and per image (text encoding, all
    steps and the VAE decode, batch 1; the teacher at `steps`, the student at `student_steps`, default
    `steps`): median of `repeats` after a warm-up; peak CUDA memory per image (weights of the pipeline's
    models + the call's peak above what was allocated before it)."""
    device = teacher_pipe.unet.device
    h = w = size // teacher_pipe.vae_scale_factor
    runs = {"teacher": (teacher_pipe, steps, guidance_scale),
            "student": (student_pipe, student_steps or steps,
                        guidance_scale if student_guidance_scale is None else student_guidance_scale)}
    out: dict[str, float] = {}
    for who, (pipe, n_steps, scale) in runs.items():
        unet = pipe.unet
        out[f"params_{who}"] = count_params(unet)
        out[f"macs_{who}"] = M.unet_macs(unet.config, h, w)
        batch = cfg_batch(pipe, scale)
        out[f"cfg_batch_{who}"] = batch
        args, kw = M.unet_inputs(unet.config, batch, h, w, device=device, dtype=unet.dtype)
        step = M.measure_latency(lambda unet=unet, a=args, k=kw: unet(*a, **k), repeats, warmup=2, device=device)
        out[f"latency_step_ms_{who}"] = M.median(step)
        out[f"latency_image_ms_{who}"] = image_latency(pipe, prompt, seed, n_steps, scale, size, repeats)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            decode(pipe, generate(pipe, [prompt], [seed], n_steps, scale, size, 1))
            torch.cuda.synchronize(device)
            weights = sum(p.numel() * p.element_size() for m in (pipe.unet, pipe.vae, *_text_encoders(pipe))
                          for p in m.parameters())
            peak = torch.cuda.max_memory_allocated(device) - before + weights
            out[f"peak_mem_mb_{who}"] = peak / 2**20
    out["param_ratio"] = out["params_student"] / out["params_teacher"]
    out["macs_ratio"] = out["macs_student"] / out["macs_teacher"]
    # per step: the teacher's CFG pair of U-Net calls against the student's call, as each pipeline runs them
    out["speedup_step"] = out["latency_step_ms_teacher"] / out["latency_step_ms_student"]
    out["speedup_image"] = out["latency_image_ms_teacher"] / out["latency_image_ms_student"]
    return out


def _text_encoders(pipe: Any) -> list[Any]:
    return [m for m in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if m is not None]


def _caption_accuracy(images: list[Image.Image], prompts: list[str], who: str) -> dict[str, float]:
    try:
        from pipelines.shapes import caption_accuracy
    except ImportError:
        return {}
    result = caption_accuracy(images, prompts)
    if not result:
        return {}
    base = "caption_accuracy" + ("" if who == "student" else f"_{who}")
    return {base if k == "overall" else f"{base}_{k}": float(v) for k, v in result.items()}


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
        pipe = load_teacher_pipeline(teacher_uri, dtype, device)
    else:  # a step-distilled student samples as its distillery.json records, as in the stage
        asked = SimpleNamespace(student=student_uri, student_steps=None, student_guidance_scale=None, steps=steps,
                                guidance_scale=guidance_scale)
        steps, guidance_scale = student_sampling(asked, _student_meta(student_uri))
        _, pipe = load_pipelines(teacher_uri, student_uri, dtype, device)
    size = size or image_size(pipe)
    images = decode(pipe, generate(pipe, prompts, seeds, steps, guidance_scale, size, batch_size), batch_size)
    out: dict[str, float] = {"num_images": float(len(prompts))}
    out.update(_caption_accuracy(to_pil(images), prompts, "student"))
    if clip_model:
        model, tokenizer = M.load_clip(clip_model, device)
        out["clip_score_student"] = M.clip_score(images, prompts, model, tokenizer)
    out["eval_s"] = time.perf_counter() - t0
    return out


def sweep_key(name: str, steps: int) -> str:
    """The name of a metric of the steps sweep: the student at `steps` steps."""
    return f"{name}_{steps}steps"


SWEEP_KEY = re.compile(r"^(?P<name>.+)_(?P<steps>\d+)steps$")
SWEEP_METRICS = ("fid_student_vs_teacher", "fid", "kid_mean", "clip_score_student", "caption_accuracy", "psnr", "ssim",
                 "latent_mse", "latency_image_ms_student", "speedup_image")  # in the report's order


def evaluate_pipelines(
    teacher_pipe: Any,
    student_pipe: Any,
    prompts: list[str],
    seeds: list[int] | None = None,
    *,
    spec: RemovalSpec | None = None,
    steps: int = 20,
    guidance_scale: float = 7.5,
    student_steps: int | None = None,
    student_guidance_scale: float | None = None,
    steps_sweep: list[int] | tuple[int, ...] = (),
    size: int | None = None,
    batch_size: int = 4,
    reference: list[Image.Image] | None = None,
    feature_extractor: str | None = None,
    clip_model: str | None = None,
    latency_repeats: int = 5,
    embedding_samples: int = 64,
    seed: int = 0,
) -> Evaluation:
    """Everything the stage measures, for two pipelines of one family. One image per (prompt, seed);
    `spec` maps student blocks to teacher blocks for the feature comparison (None: outputs only);
    `reference` images for FID/KID/IS (None: only student vs teacher); `feature_extractor` as in
    pipelines.metrics.resolve_feature_extractor; `clip_model` a CLIP folder/hub id (None: no CLIP score).

    The teacher samples at `steps` with classifier-free guidance at `guidance_scale`; the student, with its
    pipeline's scheduler, at `student_steps` and `student_guidance_scale` (default: the teacher's), and again
    at each step count of `steps_sweep`, whose metrics are named with a suffix (`sweep_key`)."""
    if not prompts:
        raise ValueError("no prompts to evaluate")
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one seed per prompt")
    if len(prompts) < 2:
        raise ValueError("FID needs at least 2 images: give at least 2 prompts (or images per prompt)")
    sweep = list(steps_sweep)
    if any(not isinstance(k, int) or k < 1 for k in sweep) or len(set(sweep)) != len(sweep):
        raise ValueError(f"steps_sweep {sweep}: give distinct step counts, each an integer >= 1")
    student_steps = steps if student_steps is None else student_steps
    s_scale = guidance_scale if student_guidance_scale is None else student_guidance_scale
    if steps < 1 or student_steps < 1:
        raise ValueError(f"steps {steps}, student_steps {student_steps}: each must be >= 1")
    size = size or image_size(teacher_pipe)
    device = teacher_pipe.unet.device
    extractor = M.resolve_feature_extractor(feature_extractor)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    t_lat = generate(teacher_pipe, prompts, seeds, steps, guidance_scale, size, batch_size)
    s_lat = generate(student_pipe, prompts, seeds, student_steps, s_scale, size, batch_size)
    t_img, s_img = decode(teacher_pipe, t_lat, batch_size), decode(student_pipe, s_lat, batch_size)
    sweep_lat, sweep_img = {}, {}
    for k in sweep:  # the same prompts and seeds; the student's own steps are already there
        sweep_lat[k] = s_lat if k == student_steps else generate(student_pipe, prompts, seeds, k, s_scale, size,
                                                                 batch_size)
        sweep_img[k] = s_img if k == student_steps else decode(student_pipe, sweep_lat[k], batch_size)
    timings["generate"] = time.perf_counter() - t0

    metrics: dict[str, float] = {"num_images": len(prompts), "steps": steps, "guidance_scale": guidance_scale,
                                 "resolution": size, "steps_teacher": steps, "steps_student": student_steps,
                                 "guidance_scale_teacher": guidance_scale, "guidance_scale_student": s_scale}
    metrics["latent_mse"] = M.mse(s_lat, t_lat)
    metrics["psnr"] = M.psnr(s_img, t_img)
    metrics["ssim"] = M.ssim(s_img, t_img)
    for k in sweep:
        metrics[sweep_key("latent_mse", k)] = M.mse(sweep_lat[k], t_lat)
        metrics[sweep_key("psnr", k)] = M.psnr(sweep_img[k], t_img)
        metrics[sweep_key("ssim", k)] = M.ssim(sweep_img[k], t_img)

    t0 = time.perf_counter()
    fid_kw = dict(extractor=extractor, device=device, batch_size=max(batch_size, 16))
    ref = None
    if reference is not None:
        ref = M.to_tensor([M.fit_image(im, size) for im in reference])
        metrics.update(M.fidelity_metrics(s_img, ref, **fid_kw))
        teacher_q = M.fidelity_metrics(t_img, ref, kid=False, **fid_kw)
        metrics["fid_teacher"] = teacher_q["fid"]
        metrics["is_mean_teacher"] = teacher_q["is_mean"]
        metrics["num_reference"] = len(ref)
    else:
        metrics.update({k: v for k, v in M.fidelity_metrics(s_img, None, kid=False, **fid_kw).items()})
    metrics["fid_student_vs_teacher"] = M.fidelity_metrics(s_img, t_img, isc=False, kid=False, **fid_kw)["fid"]
    for k in sweep:
        metrics[sweep_key("fid_student_vs_teacher", k)] = M.fidelity_metrics(sweep_img[k], t_img, isc=False,
                                                                             kid=False, **fid_kw)["fid"]
        if ref is not None:
            q = M.fidelity_metrics(sweep_img[k], ref, isc=False, **fid_kw)
            metrics[sweep_key("fid", k)] = q["fid"]
            metrics[sweep_key("kid_mean", k)] = q["kid_mean"]
    timings["fidelity"] = time.perf_counter() - t0

    if clip_model:
        model, tokenizer = M.load_clip(clip_model, device)
        metrics["clip_score_student"] = M.clip_score(s_img, prompts, model, tokenizer)
        metrics["clip_score_teacher"] = M.clip_score(t_img, prompts, model, tokenizer)
        for k in sweep:
            metrics[sweep_key("clip_score_student", k)] = M.clip_score(sweep_img[k], prompts, model, tokenizer)
        del model
    t_pil, s_pil = to_pil(t_img), to_pil(s_img)
    sweep_pil = {k: s_pil if k == student_steps else to_pil(img) for k, img in sweep_img.items()}
    metrics.update(_caption_accuracy(s_pil, prompts, "student"))
    metrics.update(_caption_accuracy(t_pil, prompts, "teacher"))
    for k in sweep:
        acc = _caption_accuracy(sweep_pil[k], prompts, "student").get("caption_accuracy")
        if acc is not None:
            metrics[sweep_key("caption_accuracy", k)] = acc

    t0 = time.perf_counter()
    feat_metrics, embeddings = feature_analysis(teacher_pipe, student_pipe, spec, prompts, t_lat,
                                                embedding_samples, batch_size, size, seed, s_scale)
    metrics.update(feat_metrics)
    timings["features"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    metrics.update(speed_and_size(teacher_pipe, student_pipe, prompts[0], seeds[0], steps, guidance_scale, size,
                                  latency_repeats, student_steps, s_scale))
    for k in sweep:  # each against the teacher's image latency at its own steps, with CFG
        ms = (metrics["latency_image_ms_student"] if k == student_steps else
              image_latency(student_pipe, prompts[0], seeds[0], k, s_scale, size, latency_repeats))
        metrics[sweep_key("latency_image_ms_student", k)] = ms
        metrics[sweep_key("speedup_image", k)] = metrics["latency_image_ms_teacher"] / ms
    timings["speed"] = time.perf_counter() - t0
    log.info("evaluation took %s", ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return Evaluation(metrics, list(prompts), seeds, t_pil, s_pil, embeddings, sweep_pil)


# ---------------------------------------------------------------------------------------------- report


def _scatter_grid(embeddings: dict[str, dict[str, np.ndarray]], names: list[str], method: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        t, s = embeddings[name]["teacher"], embeddings[name]["student"]
        x = np.concatenate([t, s]).astype(np.float64)
        x = x - x.mean(0)
        if method == "pca":
            pca = PCA(n_components=2, random_state=0)
            y = pca.fit_transform(x)
            title = f"{name}\n(PC1+2: {pca.explained_variance_ratio_[:2].sum():.0%} of variance)"
        else:
            perplexity = float(max(2, min(30, (len(x) - 1) // 3)))
            y = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=0, max_iter=500).fit_transform(x)
            title = name
        n = len(t)
        ax.scatter(y[:n, 0], y[:n, 1], s=12, c="tab:blue", label="teacher", alpha=0.7)
        ax.scatter(y[n:, 0], y[n:, 1], s=12, c="tab:orange", label="student", alpha=0.7, marker="x")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{'PCA' if method == 'pca' else 't-SNE'}: teacher vs student features on the same inputs")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_plots(ev: Evaluation, out: Path) -> list[str]:
    """plots/*.png; returns their paths relative to `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    names = list(ev.embeddings)
    written = []
    if names:
        _scatter_grid(ev.embeddings, names, "pca", plots / "pca.png")
        # t-SNE is slower: a few blocks spread over the U-Net, and the output
        blocks = [n for n in names if n != "output"]
        pick = [blocks[i] for i in sorted({round(j * (len(blocks) - 1) / 3) for j in range(4)})] if blocks else []
        _scatter_grid(ev.embeddings, pick + ["output"], "tsne", plots / "tsne.png")
        written += ["plots/pca.png", "plots/tsne.png"]
    cos = {k.removeprefix("feature_cosine_"): v for k, v in ev.metrics.items()
           if k.startswith("feature_cosine_") and k != "feature_cosine_mean"}
    if cos:
        fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(cos)), 3.2))
        ax.bar(range(len(cos)), list(cos.values()), color="tab:green")
        ax.set_xticks(range(len(cos)), list(cos), rotation=45, ha="right", fontsize=8)
        ax.set_ylim(min(0, *cos.values()), 1.05)
        ax.set_ylabel("cosine similarity")
        ax.set_title("student vs teacher features, per teacher block")
        fig.tight_layout()
        fig.savefig(plots / "feature_cosine.png", dpi=90)
        plt.close(fig)
        written.append("plots/feature_cosine.png")
    n = min(16, len(ev.prompts))
    columns = _image_columns(ev, shown=True)
    fig, axes = plt.subplots(n, len(columns), figsize=(2.5 * len(columns), 2.6 * n + 0.4), squeeze=False)
    for i in range(n):
        for j, (_, _, images) in enumerate(columns):
            axes[i, j].imshow(images[i])
            axes[i, j].axis("off")
        axes[i, 0].set_title(f"{ev.prompts[i][:70]} (seed {ev.seeds[i]})", fontsize=7, loc="left")
    fig.suptitle(" | ".join(label for _, label, _ in columns), fontsize=9)
    fig.tight_layout()
    fig.savefig(plots / "grid.png", dpi=90)
    plt.close(fig)
    written.append("plots/grid.png")
    if ev.sweep_images:
        _sweep_plot(ev.metrics, sorted(ev.sweep_images), plots / "steps_sweep.png")
        written.append("plots/steps_sweep.png")
    return written


def _n_steps(k: float) -> str:
    return f"{k:g} step{'' if k == 1 else 's'}"


def _image_columns(ev: Evaluation, shown: bool = False) -> list[tuple[str, str, list[Image.Image]]]:
    """(folder under images/, label, images) for the teacher, the student and each step count of the sweep;
    `shown`: without the sweep's copy of the student's own step count."""
    m = ev.metrics
    steps = lambda key: f", {_n_steps(m[key])}" if key in m else ""  # noqa: E731
    cols = [("teacher", f"teacher{steps('steps_teacher')}", ev.teacher_images),
            ("student", f"student{steps('steps_student')}", ev.student_images)]
    return cols + [(f"student_{k}steps", f"student, {_n_steps(k)}", ev.sweep_images[k]) for k in sorted(ev.sweep_images)
                   if not (shown and k == m.get("steps_student"))]


def _sweep_plot(metrics: dict[str, float], ks: list[int], path: Path) -> None:
    """Quality (FID student vs teacher, caption accuracy) and latency per image against the student's steps,
    the teacher at its steps as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t_steps = metrics.get("steps_teacher")
    fig, (q_ax, l_ax) = plt.subplots(1, 2, figsize=(9, 3.4))
    q_ax.plot(ks, [metrics[sweep_key("fid_student_vs_teacher", k)] for k in ks], "o-", color="tab:blue")
    q_ax.set_xlabel("student steps")
    q_ax.set_ylabel("FID student vs teacher", color="tab:blue")
    if all(sweep_key("caption_accuracy", k) in metrics for k in ks):
        acc_ax = q_ax.twinx()
        acc_ax.plot(ks, [metrics[sweep_key("caption_accuracy", k)] for k in ks], "s--", color="tab:green",
                    label="student")
        if "caption_accuracy_teacher" in metrics:
            acc_ax.axhline(metrics["caption_accuracy_teacher"], color="tab:green", ls=":", lw=1,
                           label=f"teacher ({t_steps:g} steps)" if t_steps else "teacher")
            acc_ax.legend(fontsize=8, loc="lower right")
        acc_ax.set_ylabel("caption accuracy", color="tab:green")
        acc_ax.set_ylim(-0.02, 1.02)
    q_ax.set_title("quality")
    l_ax.plot(ks, [metrics[sweep_key("latency_image_ms_student", k)] for k in ks], "o-", color="tab:orange",
              label="student")
    if "latency_image_ms_teacher" in metrics:
        l_ax.axhline(metrics["latency_image_ms_teacher"], color="tab:gray", ls="--",
                     label=f"teacher ({t_steps:g} steps, CFG)" if t_steps else "teacher")
    l_ax.set_xlabel("student steps")
    l_ax.set_ylabel("ms per image")
    l_ax.set_ylim(bottom=0)
    l_ax.legend(fontsize=8)
    l_ax.set_title("latency")
    for ax in (q_ax, l_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
    fig.suptitle("steps sweep: the student at each step count, same prompts and seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _fmt(v: float) -> str:
    if isinstance(v, float) and math.isinf(v):
        return "∞" if v > 0 else "-∞"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


SECTIONS = [
    ("Steps and guidance", ("steps", "guidance_scale", "cfg_batch")),
    ("Quality", ("fid", "kid_", "is_", "clip_score", "caption_accuracy", "num_")),
    ("Fidelity to the teacher (same seeds)", ("psnr", "ssim", "latent_mse")),
    ("Features (student vs teacher, cosine)", ("feature_cosine_",)),
    ("Speed and size", ("params_", "param_ratio", "macs", "latency_", "speedup", "peak_mem")),
]


def write_report(ev: Evaluation, out: Path, title: str, info: dict[str, Any] | None = None,
                 goal: float = 0.95) -> None:
    """images/{teacher,student,student_{k}steps}/*.png, plots/*.png, metrics.json and report.html under a
    local folder. The page answers first (the verdict against `goal`, teacher | student side by side), then shows
    the images and the plots, and lists every metric last."""
    columns = _image_columns(ev)
    for folder, _, images in columns:
        d = out / "images" / folder
        d.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images):
            im.save(d / f"{i:04d}.png")
    plots = write_plots(ev, out)
    (out / "metrics.json").write_text(json.dumps(ev.metrics, indent=2))
    esc = html.escape
    rows, shown = [], {k for k in ev.metrics if SWEEP_KEY.match(k)}  # those are in the sweep's table
    for section, prefixes in SECTIONS + [("Run", ("",))]:
        keys = [k for k in ev.metrics if k not in shown and k.startswith(prefixes)]
        if not keys:
            continue
        rows.append(f'<tr><th colspan="2">{esc(section)}</th></tr>')
        for k in keys:
            rows.append(f"<tr><td>{esc(k)}</td><td>{esc(_fmt(ev.metrics[k]))}</td></tr>")
            shown.add(k)
    columns = _image_columns(ev, shown=True)
    grid = []
    for i, (p, s) in enumerate(zip(ev.prompts, ev.seeds)):
        cells = "".join(f'<td><img src="images/{folder}/{i:04d}.png"></td>' for folder, _, _ in columns)
        grid.append(f"<tr><td>{esc(p)}<br><small>seed {s}</small></td>{cells}</tr>")
    heads = "".join(f"<th>{esc(label)}</th>" for _, label, _ in columns)
    info_rows = "".join(f"<tr><td>{esc(str(k))}</td><td>{esc(str(v))}</td></tr>" for k, v in (info or {}).items())
    met = report.goal_met(ev.metrics, goal)
    verdict_class = "none" if met is None else "met" if met else "missed"
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }} table {{ border-collapse: collapse; margin-bottom: 2em; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }}
th {{ background: #eee; }} img {{ max-width: 256px; image-rendering: pixelated; }} .plot img {{ max-width: 100%; }}
#verdict {{ font-size: 1.2em; padding: 0.5em 1em; border-left: 6px solid #999; }} #verdict.met {{ border-color: #2a2; }}
#verdict.missed {{ border-color: #c22; }}
</style></head><body>
<h1>{esc(title)}</h1>
<p id="verdict" class="{verdict_class}">{esc(report.verdict(ev.metrics, goal))}</p>
<h2>Teacher | student</h2>
{report.html_table(ev.metrics)}
{_sweep_table(ev.metrics, sorted(ev.sweep_images))}
<h2>Teacher | student, same prompt and seed</h2>
<table><tr><th>prompt</th>{heads}</tr>{"".join(grid)}</table>
<h2>Plots</h2>
{"".join(f'<div class="plot"><h3>{esc(p)}</h3><img src="{esc(p)}"></div>' for p in plots)}
<h2>The run</h2>
<table>{info_rows}</table>
<details><summary>Every metric ({len(ev.metrics)})</summary>
<table id="metrics">{"".join(rows)}</table>
</details>
</body></html>
"""
    (out / "report.html").write_text(page)


def _sweep_table(metrics: dict[str, float], ks: list[int]) -> str:
    """The "Steps sweep" section: one row per step count (each cell also names its metric key), and the
    teacher at its steps."""
    if not ks:
        return ""
    esc = html.escape
    matches = [SWEEP_KEY.match(k) for k in metrics]
    found = {m["name"] for m in matches if m and int(m["steps"]) in ks}
    names = [n for n in SWEEP_METRICS if n in found] + sorted(found - set(SWEEP_METRICS))
    teacher = {"fid_student_vs_teacher": None, "fid": metrics.get("fid_teacher"),
               "clip_score_student": metrics.get("clip_score_teacher"),
               "caption_accuracy": metrics.get("caption_accuracy_teacher"),
               "latency_image_ms_student": metrics.get("latency_image_ms_teacher"), "speedup_image": 1.0}
    head = "".join(f"<th>{esc(n)}</th>" for n in names)
    t_label = f"teacher, {_n_steps(metrics['steps_teacher'])}" if "steps_teacher" in metrics else "teacher"
    if "cfg_batch_teacher" in metrics:
        t_label += f" (U-Net batch {metrics['cfg_batch_teacher']:g} per step)"
    rows = [f"<tr><td>{esc(t_label)}</td>"
            + "".join(f"<td>{esc(_fmt(teacher[n])) if teacher.get(n) is not None else ''}</td>" for n in names)
            + "</tr>"]
    for k in ks:
        cells = "".join(f'<td title="{esc(sweep_key(n, k))}">{esc(_fmt(metrics[sweep_key(n, k)]))}'
                        f"<br><small>{esc(sweep_key(n, k))}</small></td>" if sweep_key(n, k) in metrics
                        else "<td></td>" for n in names)
        rows.append(f"<tr><td>student, {_n_steps(k)}</td>{cells}</tr>")
    guidance = metrics.get("guidance_scale_student")
    note = (f"<p>The student at each step count with its own scheduler, guidance scale {guidance:g}, on the "
            "teacher's prompts and seeds; speedup_image is against the teacher's image latency.</p>"
            if guidance is not None else "")
    return f"<h2>Steps sweep</h2>\n{note}<table><tr><th></th>{head}</tr>{''.join(rows)}</table>"


# ----------------------------------------------------------------------------------------------- stage


def _student_meta(student: str) -> dict[str, Any]:
    if not (exists(join(student, "unet", "config.json"))):
        raise FileNotFoundError(f"evaluate.student {student}: no student pipeline there (expected a diffusers "
                                "folder with unet/, as the distill stage writes; run `distillery distill` first)")
    path = join(student, "distillery.json")
    return json.loads(read_bytes(path)) if exists(path) else {}


def _student_spec(meta: dict[str, Any], teacher_pipe: Any, student_pipe: Any) -> RemovalSpec | None:
    if meta.get("spec"):
        return RemovalSpec.from_dict(meta["spec"])
    if meta.get("preset"):
        from models.student import preset_spec

        return preset_spec(meta["preset"], teacher_pipe.unet.config)
    # a step-distilled copy of the teacher differs only by its w input, which no block map concerns
    t_cfg = {k: v for k, v in dict(teacher_pipe.unet.config).items()
             if not k.startswith("_") and k != "time_cond_proj_dim"}
    s_cfg = {k: v for k, v in dict(student_pipe.unet.config).items()
             if not k.startswith("_") and k != "time_cond_proj_dim"}
    if t_cfg == s_cfg:
        from models.student import preset_spec

        return preset_spec("identity", teacher_pipe.unet.config)
    log.warning("the student has no removal spec in distillery.json: comparing U-Net outputs only, not blocks")
    return None


def student_sampling(ev: Any, meta: dict[str, Any]) -> tuple[int, float]:
    """(steps, guidance scale) the student samples with: evaluate.student_steps / student_guidance_scale,
    else what its distillery.json records (a step-distilled student), else evaluate.steps / guidance_scale."""
    steps, scale = ev.student_steps, ev.student_guidance_scale
    if steps is None:
        recorded = meta.get("steps")
        if recorded is not None and (not isinstance(recorded, int) or recorded < 1):
            raise ValueError(f"evaluate.student {ev.student}: distillery.json records steps {recorded!r}, not a "
                             "step count >= 1; set evaluate.student_steps")
        steps = recorded if recorded is not None else ev.steps
    if scale is None:
        recorded = meta.get("guidance_scale")
        if recorded is not None and (not isinstance(recorded, (int, float)) or recorded < 0):
            raise ValueError(f"evaluate.student {ev.student}: distillery.json records guidance_scale {recorded!r}, "
                             "not a number >= 0; set evaluate.student_guidance_scale")
        scale = float(recorded) if recorded is not None else ev.guidance_scale
    return steps, scale


def _weights_stamp(student: str) -> list:
    """Sizes and times of the student's U-Net files: a retrained student is a different student."""
    from pipelines.storage import filesystem

    fs, root = filesystem(join(student, "unet"))
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sorted((i.path[len(root):], i.size, str(i.mtime)) for i in infos if i.type == pafs.FileType.File)


def _digest(cfg: Config, meta: dict, prompts: list[str], reference: str) -> str:
    where = {"run_on", "num_gpus", "num_cpus"}  # where the stage runs does not change what it measures
    blob = json.dumps({"evaluate": cfg.evaluate.model_dump(mode="json", exclude=where),
                       "teacher": cfg.teacher.model_dump(mode="json"), "student": meta,
                       "weights": _weights_stamp(cfg.evaluate.student), "prompts": prompts, "reference": reference},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _upload(local: Path, uri: str, names: list[str]) -> None:
    for name in names:
        write_bytes(join(uri, name), (local / name).read_bytes())


def log_to_mlflow(cfg: Config, meta: dict[str, Any], metrics: dict[str, float], folder: Path) -> str:
    """Metrics and the report folder (as artifacts under evaluation/) into the student's training run when
    distillery.json names one that this tracking server has, else into a new run of cfg.mlflow.experiment."""
    from mlflow.exceptions import MlflowException

    from pipelines import tracking

    uri = cfg.tracking_uri()
    client = tracking.client(uri)
    run_id, created = meta.get("mlflow_run_id"), False
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
    from pipelines.storage import ensure_ray
    from pipelines.train import worker_env

    ev = cfg.evaluate
    ray = ensure_ray(cfg)
    gpus = ev.num_gpus if ev.num_gpus is not None else float(ray.cluster_resources().get("GPU", 0) >= 1)
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
    if ev.prompts:
        prompts = read_prompts(ev.prompts)[: ev.num_prompts]
    else:
        prompts = val_captions(cfg.data.output, ev.num_prompts)
    if ev.reference:
        if not exists(ev.reference):
            raise FileNotFoundError(f"evaluate.reference {ev.reference}: no such folder")
        ref_source = ev.reference
    else:
        _require_cache(cfg.data.output, "reference images")
        ref_source = f"{cfg.data.output} (validation latents)"
    image_prompts = [p for p in prompts for _ in range(ev.images_per_prompt)]
    seeds = [ev.seed + i for i in range(len(image_prompts))]
    if len(image_prompts) < 2:
        raise ValueError(f"{len(image_prompts)} image to evaluate; FID needs at least 2: raise evaluate.num_prompts "
                         "or evaluate.images_per_prompt")

    digest = _digest(cfg, meta, image_prompts, ref_source)
    done = join(out_uri, EVAL_MANIFEST)
    if exists(done) and json.loads(read_bytes(done)).get("digest") == digest:
        log.info("evaluate: %s already has the metrics of these inputs; skipping", out_uri)
        return json.loads(read_bytes(join(out_uri, "metrics.json")))

    teacher_pipe, student_pipe = load_pipelines(cfg.teacher.uri, ev.student, cfg.teacher.dtype, device,
                                                cfg.teacher.revision, cfg.teacher.variant, ev.student_decoder)
    size = ev.resolution or _cache_resolution(cfg.data.output) or image_size(teacher_pipe)
    if ev.reference:
        reference = read_reference_folder(ev.reference, size, ev.num_reference)
    else:
        reference = cache_reference(cfg.data.output, teacher_pipe.vae, ev.num_reference, ev.batch_size)
    spec = _student_spec(meta, teacher_pipe, student_pipe)
    result = evaluate_pipelines(
        teacher_pipe, student_pipe, image_prompts, seeds, spec=spec, steps=ev.steps,
        guidance_scale=ev.guidance_scale, student_steps=student_steps, student_guidance_scale=student_scale,
        steps_sweep=ev.steps_sweep, size=size, batch_size=ev.batch_size, reference=reference,
        feature_extractor=ev.feature_extractor, clip_model=ev.clip_model, latency_repeats=ev.latency_repeats,
        embedding_samples=ev.embedding_samples, seed=ev.seed,
    )
    info = {"teacher": cfg.teacher.uri, "student": ev.student, "preset": meta.get("preset"),
            "step distillation": (meta.get("steps_distillation") or {}).get("objective"),
            "teacher sampling": _sampling(teacher_pipe, ev.steps, ev.guidance_scale),
            "student sampling": _sampling(student_pipe, student_steps, student_scale),
            "steps sweep": ", ".join(map(str, ev.steps_sweep)) or "none",
            "student decoder": ev.student_decoder or "the teacher's VAE",
            "reference": ref_source, "device": _device_name(device), "dtype": str(teacher_pipe.unet.dtype),
            "feature extractor": ev.feature_extractor or "inception-v3-compat (torch-fidelity download)",
            "clip model": ev.clip_model}
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(out_uri) if not is_remote(out_uri) else Path(tmp)
        local.mkdir(parents=True, exist_ok=True)
        write_report(result, local, f"{cfg.name}: student vs teacher", info, goal=ev.goal)
        run_id = log_to_mlflow(cfg, meta, result.metrics, local)
        manifest = {"digest": digest, "complete": True, "mlflow_run_id": run_id, "student": ev.student,
                    "teacher": cfg.teacher.uri, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "ran_on": {"host": socket.gethostname(), "pid": os.getpid(), "device": _device_name(device)}}
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


def _sampling(pipe: Any, steps: int, guidance_scale: float) -> str:
    sched = pipe.scheduler
    spacing = sched.config.get("timestep_spacing")
    how = ("w input (one U-Net call per step)" if takes_w(pipe.unet) else
           "classifier-free guidance" if guidance_scale > 1 else "no guidance")
    return (f"{type(sched).__name__}{f' ({spacing} spacing)' if spacing else ''}, {steps} steps, "
            f"guidance scale {guidance_scale:g}, {how}")


def _cache_resolution(cache: str | None) -> int | None:
    from pipelines.cache import read_manifest

    try:
        manifest = read_manifest(cache) if cache else None
    except (OSError, ValueError):
        return None
    return int(manifest["resolution"]) if manifest and manifest.get("resolution") else None


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"

