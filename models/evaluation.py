"""The evaluation core: how good, how faithful, how fast and how small a student pipeline is next to its teacher's,
on any two diffusers pipelines of one family, with no Ray, MLflow or storage (pipelines/evaluate.py is the stage
that runs it where the GPUs are and writes what it measures).

    prompts x seeds
      │  teacher and student generate from the same seeds: the teacher at `steps` with classifier-free guidance,
      │  the student at its own steps and guidance (and at each of `steps_sweep`)
      ▼
    quality    FID/KID/IS against reference images, FID student vs teacher, CLIP score, caption accuracy (shapes)
    fidelity   latent MSE, pixel PSNR/SSIM of student vs teacher images, per-block feature cosine
    speed/size U-Net params, MACs per U-Net call, latency per step and per image, peak CUDA memory
    embeddings PCA and t-SNE of teacher vs student block features and U-Net outputs
      ▼
    steps sweep the student at k steps for each k: the quality, fidelity and latency metrics again, named
               with a suffix `_{k}steps` (fid_student_vs_teacher_1steps, speedup_image_4steps, ...)

The student runs with the teacher's VAE and text encoder(s) (the distill and steps stages copy them unchanged),
so only the U-Nets and schedulers differ: the student samples with its own scheduler when its folder has one (a
step-distilled student: DDIM with trailing spacing, or LCM), else the teacher's. A student whose U-Net takes the
guidance weight w as an input (`time_cond_proj_dim`: guided and consistency students) gets w through its
w-embedding and runs one U-Net forward per step where the teacher runs two.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from models import metrics as M
from models.kd import Taps, feature_pairs
from models.sampling import decode_latents
from models.steps import guidance_embedding, w_dim
from models.student import RemovalSpec, StudentMeta, count_params
from models.teacher import (
    Teacher,
    detect_family,
    encode_prompts,
    load_decoder,
    pick_dtype,
    resolve_model_dir,
    sdxl_time_ids,
    select_rows,
    swap_decoder,
)

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    metrics: dict[str, float]
    prompts: list[str]  # one per image
    seeds: list[int]
    teacher_images: list[Image.Image]
    student_images: list[Image.Image]
    embeddings: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # name -> teacher/student (K, D)
    sweep_images: dict[int, list[Image.Image]] = field(default_factory=dict)  # steps -> the student's images


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


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


def cfg_batch(pipe: Any, guidance_scale: float) -> int:
    """The batch of one denoising step's U-Net call for one image: 2 under classifier-free guidance (which
    the pipelines run when guidance_scale > 1 and the U-Net has no w input), else 1."""
    return 2 if guidance_scale > 1 and w_dim(pipe.unet) is None else 1


Size = tuple[int, int]  # (width, height) in pixels


def _wh(size: int | Size) -> Size:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


@torch.no_grad()
def generate(pipe: Any, prompts: list[str], seeds: list[int], steps: int, guidance_scale: float,
             size: int | Size, batch_size: int) -> torch.Tensor:
    """Scaled latents (N, 4, h, w), one per (prompt, seed), at `size` (a side, or (width, height)). One CPU
    generator per image, so an image depends only on its prompt and seed, not on the batching or the device."""
    width, height = _wh(size)
    out = []
    for i in range(0, len(prompts), batch_size):
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[i : i + batch_size]]
        res = pipe(prompt=prompts[i : i + batch_size], generator=gens, num_inference_steps=steps,
                   guidance_scale=guidance_scale, height=height, width=width, output_type="latent")
        out.append(res.images.float().cpu())
    return torch.cat(out)


@dataclass
class Samples:
    """One pipeline's images for a list of (prompt, seed, size): latents per size group (in `groups`' order of
    indices) and every image in [0, 1], center-cropped and resized to size x size where its own size is not that
    square (M.fit_image, as reference images are), in the prompts' order: (N, 3, size, size)."""

    latents: dict[Size, torch.Tensor]
    images: torch.Tensor


def size_groups(sizes: list[Any]) -> dict[Any, list[int]]:
    """Indices of the items of each size (any hashable: (width, height), a latent's shape), sizes in order of
    first appearance."""
    groups: dict[Any, list[int]] = {}
    for i, sz in enumerate(sizes):
        groups.setdefault(sz, []).append(i)
    return groups


def sample(pipe: Any, prompts: list[str], seeds: list[int], steps: int, guidance_scale: float,
           groups: dict[Size, list[int]], size: int, batch_size: int) -> Samples:
    """Generate and decode each size group in its own pipeline calls (an aspect-ratio bucket's images at that
    bucket's size), then bring every image to the common size x size the image metrics compare."""
    latents, images = {}, [None] * len(prompts)
    for sz, idx in groups.items():
        lat = generate(pipe, [prompts[i] for i in idx], [seeds[i] for i in idx], steps, guidance_scale, sz,
                       batch_size)
        img = decode(pipe, lat, batch_size)
        if sz != (size, size):
            img = M.to_tensor([M.fit_image(im, size) for im in to_pil(img)])
        latents[sz] = lat
        for j, i in enumerate(idx):
            images[i] = img[j]
    return Samples(latents, torch.stack(images))


def latent_mse(a: Samples, b: Samples) -> float:
    """The MSE between two pipelines' latents, over every size group (weighted by its images)."""
    n = sum(len(v) for v in a.latents.values())
    return sum(M.mse(a.latents[k], b.latents[k]) * len(a.latents[k]) for k in a.latents) / n


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


def _conditioning(teacher: Teacher, prompts: list[str], size: int | Size) -> dict[str, Any]:
    enc = encode_prompts(teacher, prompts)
    dtype = teacher.unet.dtype
    kw: dict[str, Any] = {"encoder_hidden_states": enc["prompt_embeds"].to(dtype)}
    if teacher.family == "sdxl":
        w, h = _wh(size)
        ids = torch.tensor([sdxl_time_ids((h, w), (0, 0), (h, w))] * len(prompts),
                           device=enc["pooled"].device, dtype=dtype)
        kw["added_cond_kwargs"] = {"text_embeds": enc["pooled"].to(dtype), "time_ids": ids}
    return kw


@torch.no_grad()
def feature_analysis(teacher_pipe: Any, student_pipe: Any, spec: RemovalSpec | None, prompts: list[str],
                     latents: torch.Tensor, samples: int, batch_size: int, size: int | Size, seed: int = 0,
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
    w = float(guidance_scale if guidance_scale is not None else 1.0) if w_dim(s_unet) is not None else None
    uncond = _conditioning(teacher, [""], size) if w is not None and w > 1 and w_dim(t_unet) is None else None
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
        kw, s_kw = select_rows(cond, b), {}
        if w is not None:
            s_kw["timestep_cond"] = guidance_embedding(torch.full((len(b),), w), s_unet.config.time_cond_proj_dim
                                                       ).to(device, s_unet.dtype)
        t_uncond = (t_unet(noisy, t.to(device), **select_rows(uncond, torch.zeros_like(b))).sample
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


def caption_scores(images: list[Image.Image], prompts: list[str], who: str) -> dict[str, float]:
    try:
        from models.shapes import caption_accuracy
    except ImportError:
        return {}
    result = caption_accuracy(images, prompts)
    if not result:
        return {}
    base = "caption_accuracy" + ("" if who == "student" else f"_{who}")
    return {base if k == "overall" else f"{base}_{k}": float(v) for k, v in result.items()}


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
    sizes: list[Size] | None = None,
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
    models.metrics.resolve_feature_extractor; `clip_model` a CLIP folder/hub id (None: no CLIP score).

    The teacher samples at `steps` with classifier-free guidance at `guidance_scale`; the student, with its
    pipeline's scheduler, at `student_steps` and `student_guidance_scale` (default: the teacher's), and again
    at each step count of `steps_sweep`, whose metrics are named with a suffix (`sweep_key`).

    `sizes`: each prompt's (width, height), e.g. the aspect-ratio bucket of a validation caption (None: all
    size x size). Each size's images are generated at that size; the image metrics (FID/KID/IS, CLIP, PSNR, SSIM,
    caption accuracy) compare every image center-cropped and resized to size x size, as the reference's; the
    feature comparison uses the largest size group; latency and memory are measured at size x size."""
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
    if sizes is not None and len(sizes) != len(prompts):
        raise ValueError(f"{len(sizes)} sizes for {len(prompts)} prompts: give one size per prompt")
    groups = size_groups([_wh(sz) for sz in sizes] if sizes else [(size, size)] * len(prompts))
    device = teacher_pipe.unet.device
    extractor = M.resolve_feature_extractor(feature_extractor)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    t_run = sample(teacher_pipe, prompts, seeds, steps, guidance_scale, groups, size, batch_size)
    s_run = sample(student_pipe, prompts, seeds, student_steps, s_scale, groups, size, batch_size)
    t_img, s_img = t_run.images, s_run.images
    sweep_run = {}
    for k in sweep:  # the same prompts and seeds; the student's own steps are already there
        sweep_run[k] = s_run if k == student_steps else sample(student_pipe, prompts, seeds, k, s_scale, groups,
                                                               size, batch_size)
    sweep_img = {k: r.images for k, r in sweep_run.items()}
    timings["generate"] = time.perf_counter() - t0

    metrics: dict[str, float] = {"num_images": len(prompts), "steps": steps, "guidance_scale": guidance_scale,
                                 "resolution": size, "steps_teacher": steps, "steps_student": student_steps,
                                 "guidance_scale_teacher": guidance_scale, "guidance_scale_student": s_scale,
                                 "num_sizes": len(groups)}
    metrics["latent_mse"] = latent_mse(s_run, t_run)
    metrics["psnr"] = M.psnr(s_img, t_img)
    metrics["ssim"] = M.ssim(s_img, t_img)
    for k in sweep:
        metrics[sweep_key("latent_mse", k)] = latent_mse(sweep_run[k], t_run)
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
    metrics.update(caption_scores(s_pil, prompts, "student"))
    metrics.update(caption_scores(t_pil, prompts, "teacher"))
    for k in sweep:
        acc = caption_scores(sweep_pil[k], prompts, "student").get("caption_accuracy")
        if acc is not None:
            metrics[sweep_key("caption_accuracy", k)] = acc

    t0 = time.perf_counter()
    top, idx = max(groups.items(), key=lambda g: len(g[1]))  # the features of one latent shape
    feat_metrics, embeddings = feature_analysis(teacher_pipe, student_pipe, spec, [prompts[i] for i in idx],
                                                t_run.latents[top], embedding_samples, batch_size, top, seed,
                                                s_scale)
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


def student_spec(meta: StudentMeta, teacher_pipe: Any, student_pipe: Any) -> RemovalSpec | None:
    if meta.spec:
        return RemovalSpec.from_dict(meta.spec)
    if meta.preset:
        from models.student import preset_spec

        return preset_spec(meta.preset, teacher_pipe.unet.config)
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


def student_sampling(ev: Any, meta: StudentMeta) -> tuple[int, float]:
    """(steps, guidance scale) the student samples with: evaluate.student_steps / student_guidance_scale,
    else what its distillery.json records (a step-distilled student), else evaluate.steps / guidance_scale."""
    steps, scale = ev.student_steps, ev.student_guidance_scale
    if steps is None:
        recorded = meta.steps
        if recorded is not None and recorded < 1:
            raise ValueError(f"evaluate.student {ev.student}: distillery.json records steps {recorded!r}, not a "
                             "step count >= 1; set evaluate.student_steps")
        steps = recorded if recorded is not None else ev.steps
    if scale is None:
        recorded = meta.guidance_scale
        if recorded is not None and recorded < 0:
            raise ValueError(f"evaluate.student {ev.student}: distillery.json records guidance_scale {recorded!r}, "
                             "not a number >= 0; set evaluate.student_guidance_scale")
        scale = float(recorded) if recorded is not None else ev.guidance_scale
    return steps, scale


def sampling_description(pipe: Any, steps: int, guidance_scale: float) -> str:
    sched = pipe.scheduler
    spacing = sched.config.get("timestep_spacing")
    how = ("w input (one U-Net call per step)" if w_dim(pipe.unet) is not None else
           "classifier-free guidance" if guidance_scale > 1 else "no guidance")
    return (f"{type(sched).__name__}{f' ({spacing} spacing)' if spacing else ''}, {steps} steps, "
            f"guidance scale {guidance_scale:g}, {how}")


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"

