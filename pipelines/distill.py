"""`distillery distill CONFIG`: distill the student from the teacher with Ray Train and DeepSpeed.

The driver (`run`) reads the embedding cache with Ray Data, finds or starts the MLflow run, and starts a
TorchTrainer with one worker per GPU (or CPU workers with gloo). Each worker (`train_loop_per_worker`,
plain PyTorch) builds the student from the teacher by the removal spec, keeps the frozen teacher U-Net in
half precision beside it, and trains the student as a DeepSpeed ZeRO engine (or plain DDP) on the KD loss
of models/kd.py:

    latents (cache) -> noise at random t (teacher's scheduler) -> teacher and student U-Nets -> KD loss

The KD feature taps are registered once for the run (models.kd.KDTaps), so with distill.compile both
forwards run as torch.compile graphs (the student compiled in place inside its engine, the teacher through a
compiled wrapper); validation and sampling run eagerly.

Every `val_every` steps: the loss on fixed validation batches (fixed noise and timesteps, so the curve is
comparable over time and across runs) and an image grid, teacher next to student, from fixed prompts and
seeds. Every `checkpoint_every` steps: a DeepSpeed checkpoint reported to Ray Train, which keeps the latest
ones under storage_path. A failed worker restarts the group from the latest checkpoint (FailureConfig);
running the same config again resumes a stopped run (same run name under the same storage_path). At the
end the driver consolidates the last checkpoint (ZeRO shards included) into fp32 weights and saves the
student as a diffusers pipeline folder (distill.output; its unet/ subfolder is the student U-Net).

`val_loss` is MSE(student, target) + MSE(student, teacher) with unit weights whatever the configured loss
weights, so runs with different weights (Ray Tune) compare on it.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.kd import (
    KDTaps,
    KDWeights,
    attention_pairs,
    diffusion_batch,
    feature_pairs,
    kd_loss,
    self_attention_pairs,
)
from models.sampling import decode_latents
from models.student import (
    META_FILE,
    RemovalSpec,
    StudentMeta,
    count_params,
    read_meta,
    read_meta_file,
    resolve_spec,
    student_config,
)
from models.teacher import load_teacher, resolve_model_dir
from pipelines import tracking
from pipelines.cache import CacheManifest, read_split_columns, trained_sizes
from pipelines.config import Config, DistillConfig
from pipelines.storage import ensure_ray, join, model_dir
from pipelines.train import (
    CACHE_COLUMNS,
    EMA,
    StudentEngine,
    all_mean,
    cache_batch,
    cache_manifest,
    compile_kwargs,
    eager_if_compiled,
    finish_export,
    fp8_linears,
    latent_column,
    prompt_conditioning,
    prune_orphan_checkpoints,
    resume_checkpoint,
    rows_of,
    seal_checkpoint,
    shape_batches,
    teacher_dtype,
    to_device,
    trainer_configs,
    training_datasets,
    upload_folder,
    uses_cudagraphs,
    worker_batches,
    worker_setup,
)

log = logging.getLogger(__name__)

STATE = "state.json"  # step, MLflow run id: written by rank 0 into each checkpoint
EMA_FILE = "ema.pt"
VAL_SEED = 1234
TERMS = ("task", "out", "feat", "attn", "self_attn")  # the KD loss parts, validated and logged one by one


# ---------------------------------------------------------------------------------------------------
# Pure helpers (no Ray): loss weights, the teacher as KD calls it, sample grids, export.
# ---------------------------------------------------------------------------------------------------


def kd_weights(dc: DistillConfig) -> KDWeights:
    lc = dc.loss
    return KDWeights(task=lc.task, out=lc.out, feat=lc.feat, attn=lc.attn, self_attn=lc.self_attn,
                     feat_norm=lc.feat_norm, min_snr_gamma=lc.min_snr_gamma, attn_temperature=lc.attn_temperature)


def kd_teacher(unet: torch.nn.Module, dc: DistillConfig) -> torch.nn.Module:
    """The teacher U-Net as the KD loss calls it: compiled (a wrapper; `unet` itself stays eager, for sampling)
    when distill.compile is set. Its KD taps go on `unet` (KDTaps) and fire inside the compiled graph."""
    return torch.compile(unet, **compile_kwargs(dc)) if dc.compile else unet


def job_name(cfg: Config) -> str:
    return cfg.distill.run_name or f"{cfg.name}-distill"


@torch.no_grad()
def sample_latents_ddim(unet: torch.nn.Module, scheduler_config: Any, cond: dict[str, Any],
                        uncond: dict[str, Any], seeds: list[int], latent_shape: tuple[int, ...], steps: int,
                        guidance: float, dtype: torch.dtype) -> torch.Tensor:
    """DDIM sampling with classifier-free guidance; the same seeds give the same starting noise for teacher
    and student, so their images are comparable side by side."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps)
    device = cond["encoder_hidden_states"].device
    x = torch.stack([torch.randn(latent_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    x = x.to(device) * sched.init_noise_sigma
    both = {k: (torch.cat([uncond[k], cond[k]]) if k != "added_cond_kwargs"
                else {a: torch.cat([uncond[k][a], cond[k][a]]) for a in cond[k]}) for k in cond}
    both = to_device(both, device, dtype)
    for t in sched.timesteps:
        xin = sched.scale_model_input(torch.cat([x, x]), t)
        out = unet(xin.to(dtype), t.to(device), **both).sample.float()
        u, c = out.chunk(2)
        x = sched.step(u + guidance * (c - u), t, x).prev_sample
    return x


def decode(vae: Any, latents: torch.Tensor) -> np.ndarray:
    """Scaled latents -> images as uint8 (N, H, W, 3)."""
    img = decode_latents(vae, latents / vae.config.scaling_factor)  # (N, 3, H, W) in [0, 1]
    return (img * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def image_grid(teacher_imgs: np.ndarray, student_imgs: np.ndarray) -> Any:
    """One row per prompt: teacher on the left, student on the right."""
    from PIL import Image

    rows = [np.concatenate([t, s], axis=1) for t, s in zip(teacher_imgs, student_imgs)]
    return Image.fromarray(np.concatenate(rows, axis=0))


def consolidated_state(ckpt_dir: str | Path, zero_stage: int, deepspeed: bool) -> dict[str, torch.Tensor]:
    """The student's fp32 weights from a checkpoint folder: the EMA when there is one, else the ZeRO shards
    (stages 1-3) merged, else the saved module."""
    from pipelines.train import DS_TAG

    ckpt = Path(ckpt_dir)
    if (ckpt / EMA_FILE).exists():
        return {k: v.float() for k, v in torch.load(ckpt / EMA_FILE, map_location="cpu").items()}
    if not deepspeed:
        return {k: v.float() for k, v in torch.load(ckpt / "model.pt", map_location="cpu").items()}
    if zero_stage >= 1:
        import functools

        from deepspeed.utils import zero_to_fp32
        from tqdm import tqdm

        # its loading bars only on a terminal (tqdm's disable=None), not redrawn into a job's log
        bars, zero_to_fp32.tqdm = zero_to_fp32.tqdm, functools.partial(tqdm, disable=None)
        try:
            return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DS_TAG)
        finally:
            zero_to_fp32.tqdm = bars
    module = torch.load(ckpt / DS_TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in module["module"].items()}


def export_student(ckpt_dir: str | Path, cfg: Config, src: str, spec: RemovalSpec, out_dir: str | Path,
                   meta: StudentMeta) -> Path:
    """A diffusers pipeline folder (the teacher's VAE, text encoders, scheduler from its local folder `src`) with
    the trained student U-Net, from a checkpoint folder. Plain diffusers loads it; its unet/ is the student alone."""
    from diffusers import UNet2DConditionModel

    from models.student import save_student

    t_config = UNet2DConditionModel.load_config(src, subfolder="unet")
    student = UNet2DConditionModel.from_config(student_config(t_config, spec))
    student.load_state_dict(consolidated_state(ckpt_dir, cfg.distill.zero_stage, cfg.distill.deepspeed))
    return save_student(student, src, out_dir, meta)


def start_spec(start_from: str, teacher_config: Any) -> tuple[RemovalSpec, StudentMeta]:
    """The removal spec and distillery.json of an existing student folder (student.start_from), checked against the
    teacher: the folder's U-Net must be the one the spec makes of this teacher's architecture."""
    from diffusers import UNet2DConditionModel

    folder = resolve_model_dir(model_dir(start_from))
    meta = read_meta_file(folder)
    if meta.spec is None and meta.preset is None:
        raise ValueError(f"student.start_from {start_from}: its distillery.json records no spec or preset (was it "
                         "made by distill or `distillery student build`?)")
    spec = resolve_spec(teacher_config, preset=meta.preset, spec=meta.spec)
    want = student_config(teacher_config, spec)
    have = dict(UNet2DConditionModel.load_config(folder, subfolder="unet"))
    differ = sorted(k for k in want if k != "time_cond_proj_dim" and k in have and have[k] != want[k])
    if differ:
        raise ValueError(f"student.start_from {start_from}: its U-Net does not fit teacher.uri's architecture under "
                         f"its spec (differs in {', '.join(differ)})")
    return spec, meta


def initial_student(teacher_unet: torch.nn.Module, spec: RemovalSpec, init: str, seed: int,
                    start_from: str | None = None) -> torch.nn.Module:
    """The student U-Net before training: the teacher's kept blocks copied (student.init: teacher), the same
    architecture with fresh random weights, the same on every rank (random: the no-KD baseline), or the U-Net of
    an existing student folder (student.start_from: continued or multi-teacher distillation)."""
    from diffusers import UNet2DConditionModel

    from models.student import build_student

    if start_from is not None:
        return UNet2DConditionModel.from_pretrained(resolve_model_dir(model_dir(start_from)), subfolder="unet",
                                                    dtype=torch.float32)
    student = build_student(teacher_unet, spec)
    if init == "random":
        torch.manual_seed(seed)
        student = UNet2DConditionModel.from_config(student.config)
    return student


# ---------------------------------------------------------------------------------------------------
# The worker loop (runs on every Ray Train worker): set up, step, validate, save.
# ---------------------------------------------------------------------------------------------------


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker. `config`: {"cfg": Config as JSON, "manifest": cache manifest, "spec": removal spec,
    "tracking_uri": str, "mlflow_run_id": str | None, "val_rows": object ref of the validation rows | None}."""
    import ray
    import ray.train

    # --- set up: the teacher, the student built from it, the engine, the KD taps, resume
    cfg = Config.model_validate(config["cfg"])
    dc = cfg.distill
    rank, world, device = worker_setup(dc)
    manifest = config["manifest"]
    run_id, uri = config.get("mlflow_run_id"), config["tracking_uri"]
    resolution = int(manifest.resolution)

    # the teacher: fp32 while the student is copied from it, then half precision on the device
    teacher = load_teacher(model_dir(cfg.teacher.uri), dtype="float32", revision=cfg.teacher.revision,
                           variant=cfg.teacher.variant)
    spec = RemovalSpec.from_dict(config["spec"])
    student = initial_student(teacher.unet, spec, cfg.student.init, dc.seed, cfg.student.start_from)
    t_dtype = teacher_dtype(cfg.teacher.dtype, dc.precision, device)
    teacher.unet.to(device, t_dtype)
    teacher.text_encoder.to(device)
    if teacher.text_encoder_2 is not None:
        teacher.text_encoder_2.to(device)
    teacher.vae.to(device)
    weights = kd_weights(dc)
    pairs = feature_pairs(student, teacher.unet, spec, dc.loss.level) if weights.feat > 0 else []
    attn_pairs = attention_pairs(student, teacher.unet, spec) if weights.attn > 0 else []
    self_pairs = self_attention_pairs(student, teacher.unet, spec) if weights.self_attn > 0 else []
    # the schedule on the device once (min-SNR weights index it every step; no host copy in a captured step)
    alphas = teacher.scheduler.alphas_cumprod.to(device) if weights.min_snr_gamma else None
    if dc.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    if dc.channels_last:
        # the teacher's weights and the inputs go NHWC; the student's weights only without DeepSpeed, whose
        # ZeRO flattening (and its broadcast at start) needs contiguous parameters; convolutions run NHWC
        # when their input is
        teacher.unet.to(memory_format=torch.channels_last)
        if not dc.deepspeed:
            student.to(memory_format=torch.channels_last)
    n_fp8 = fp8_linears(dc, student, teacher.unet, device)
    if rank == 0 and n_fp8:
        log.info("[distill] fp8_linear=%s: %d linear layers multiply in float8", dc.fp8_linear, n_fp8)
    student.train()
    eng = StudentEngine(student, dc, world, device)
    ema = EMA(eng.module, dc.ema_decay) if dc.ema_decay else None
    # KD hooks registered once for the run (per-step hooks would break or recompile compiled forwards)
    taps = KDTaps(eng.module, teacher.unet, weights, pairs, attn_pairs, cudagraphs=uses_cudagraphs(dc),
                  self_attn_pairs=self_pairs).attach()
    t_unet = kd_teacher(teacher.unet, dc)

    # resume: the latest checkpoint Ray Train knows (after a worker failure, or a rerun of the same job)
    step = 0
    ckpt = resume_checkpoint(ray.train.get_checkpoint(), dc.storage_path, job_name(cfg))
    if ckpt is not None:
        with ckpt.as_directory() as d:
            step = eng.load(Path(d))
            if ema is not None and (Path(d) / EMA_FILE).exists():
                ema.shadow = torch.load(Path(d) / EMA_FILE, map_location="cpu")
    if rank == 0 and run_id:
        tracking.log_metrics(uri, run_id, {"resumed_from_step": step}, step)
        if step:
            log.info("[distill] resumed from step %d", step)

    # fixed validation batches: the same rows, noise and timesteps at every validation (no caption dropout)
    val_set = []
    if config.get("val_rows") is not None:
        rows = {k: rows_of(v) for k, v in ray.get(config["val_rows"]).items() if k in CACHE_COLUMNS}
        for i, batch in enumerate(shape_batches(rows, latent_column(manifest), dc.batch_size)):
            g = torch.Generator().manual_seed(VAL_SEED + i)
            latents, cond = cache_batch(batch, manifest, teacher.family, torch.device("cpu"), g)
            noisy, t, target = diffusion_batch(teacher.scheduler, latents, teacher.prediction_type, g)
            val_set.append((noisy, t, cond, target))

    # sample prompts: encoded once; the teacher's images are made once, on rank 0
    seeds = dc.sample_seeds * (len(dc.sample_prompts) if len(dc.sample_seeds) == 1 else 1)
    s_cond = to_device(prompt_conditioning(teacher, dc.sample_prompts, resolution), device)
    s_uncond = to_device(prompt_conditioning(teacher, [""] * len(dc.sample_prompts), resolution), device)
    empty = prompt_conditioning(teacher, [""], resolution)  # caption dropout's empty prompt
    latent_shape = tuple(manifest.latent_shape)
    teacher_images = None

    # --- step: one micro-batch of the KD loss
    def kd_step(noisy: torch.Tensor, t: torch.Tensor, cond: dict[str, Any], target: torch.Tensor) -> dict:
        with eng.autocast():
            return kd_loss(eng.engine, t_unet, noisy, t, cond, target, weights, taps=taps, alphas_cumprod=alphas,
                           prediction_type=teacher.prediction_type)

    # --- validate: fixed-batch losses and a teacher | student image grid
    def validate(at: int) -> dict[str, float]:
        with eager_if_compiled(dc):
            metrics = _validate(at)
        taps.clear()  # the sampling forwards fired the taps too
        return metrics

    def _validate(at: int) -> dict[str, float]:
        nonlocal teacher_images
        eng.train(False)
        metrics: dict[str, float] = {}
        if val_set:
            sums = torch.zeros(len(TERMS))
            with torch.no_grad(), eng.autocast():
                for noisy, t, cond, target in val_set:
                    parts = kd_loss(eng.module, teacher.unet, noisy.to(device, eng.input_dtype), t.to(device),
                                    to_device(cond, device, eng.input_dtype), target.to(device), weights, taps=taps,
                                    alphas_cumprod=alphas, prediction_type=teacher.prediction_type)
                    sums += torch.stack([parts[k].detach().float().cpu() for k in TERMS])
            sums = all_mean(sums / len(val_set), world)
            metrics = {f"val_{k}": float(v) for k, v in zip(TERMS, sums)}
            metrics["val_loss"] = metrics["val_task"] + metrics["val_out"]
        # every rank samples (a ZeRO-3 student needs all ranks for a forward); rank 0 draws the grid
        with eng.autocast():
            s_lat = sample_latents_ddim(eng.module, teacher.scheduler.config, s_cond, s_uncond, seeds, latent_shape,
                                        dc.sample_steps, dc.guidance_scale, eng.input_dtype)
        if rank == 0:
            if teacher_images is None:
                t_lat = sample_latents_ddim(teacher.unet, teacher.scheduler.config, s_cond, s_uncond, seeds,
                                            latent_shape, dc.sample_steps, dc.guidance_scale, t_dtype)
                teacher_images = decode(teacher.vae, t_lat)
            grid = image_grid(teacher_images, decode(teacher.vae, s_lat))
            if run_id:
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / f"step_{at:06d}.png"
                    grid.save(path)
                    tracking.log_artifact(uri, run_id, path, "grids")
                tracking.log_metrics(uri, run_id, metrics, at)
        eng.train(True)
        return metrics

    # --- save: a checkpoint folder per rank, reported to Ray Train
    def checkpoint(at: int, metrics: dict[str, float]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            eng.save(folder, at, rank)
            if rank == 0:
                (folder / STATE).write_text(json.dumps({"step": at, "mlflow_run_id": run_id}))
                if ema is not None:
                    torch.save(ema.shadow, folder / EMA_FILE)
            seal_checkpoint(folder, rank, world)
            ray.train.report({"step": at, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint_{at:06d}")

    if step == 0:  # a baseline before any training
        metrics = validate(0)
        ray.train.report({"step": 0, **metrics})

    batches = worker_batches(manifest, teacher.family, dc, rank, world, device, empty,
                             seed=dc.seed * 7919 + rank * 104729 + step)
    if rank == 0:
        log.info("[distill] %s batches of %d, caption dropout %.2f, latents %s%s", "preloaded" if batches.preloaded
                 else "streamed", dc.batch_size, dc.caption_dropout, manifest.latents,
                 ", one CUDA graph per step" if dc.cuda_graph else "")
    samples_per_step = dc.batch_size * dc.grad_accum * world
    window = torch.zeros(1 + len(TERMS), device=device)  # the loss and its TERMS, summed since the last log
    window_n, t_log, t_start, start_step = 0, time.perf_counter(), time.perf_counter(), step
    gen = torch.Generator(device=device).manual_seed(dc.seed * 7919 + rank * 104729 + step + 1)
    epoch, last_loss = 0, float("nan")
    while step < dc.max_steps:
        for _ in range(dc.grad_accum):
            epoch, latents, cond = next(batches)
            noisy, t, target = diffusion_batch(teacher.scheduler, latents, teacher.prediction_type, gen)
            if dc.channels_last:
                noisy = noisy.contiguous(memory_format=torch.channels_last)
            parts = eng.step(kd_step, {"noisy": noisy.to(eng.input_dtype), "t": t,
                                       "cond": to_device(cond, device, eng.input_dtype), "target": target})
            window += torch.stack([parts[k].detach().float() for k in ("loss", *TERMS)])
            window_n += 1
        step += 1
        if ema is not None:
            ema.update(eng.module)
        is_val = step % dc.val_every == 0 or step == dc.max_steps
        is_ckpt = step % dc.checkpoint_every == 0 or step == dc.max_steps
        if step % dc.log_every == 0 or is_val or is_ckpt:
            means = all_mean(window / max(1, window_n), world).tolist()
            now = time.perf_counter()
            sps = samples_per_step * window_n / dc.grad_accum / max(now - t_log, 1e-9)
            if rank == 0:
                done = step - start_step
                eta = (now - t_start) / done * (dc.max_steps - step)
                log.info("[distill] step %d/%d loss %.4f %.1f samples/s elapsed %.0fs ETA %s", step, dc.max_steps,
                         means[0], sps, now - t_start, time.strftime("%H:%M:%S", time.gmtime(eta)))
                if run_id:
                    m = {"loss": means[0], **{f"loss_{k}": v for k, v in zip(TERMS, means[1:])}, "lr": eng.lr(),
                         "samples_per_s": sps, "epoch": epoch}
                    if device.type == "cuda":
                        m["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                    tracking.log_metrics(uri, run_id, {k: float(v) for k, v in m.items()}, step)
            last_loss = float(means[0])
            window.zero_()
            window_n, t_log = 0, now
        if is_val or is_ckpt:
            metrics = {"loss": last_loss, "lr": eng.lr()}
            if is_val:
                metrics.update(validate(step))
            if is_ckpt:
                checkpoint(step, metrics)
            else:
                ray.train.report({"step": step, **metrics})


# ---------------------------------------------------------------------------------------------------
# The driver.
# ---------------------------------------------------------------------------------------------------


def _finished(cfg: Config, job_key: str) -> StudentMeta | None:
    """The result of an earlier run of this job that already exported its final student."""
    from pipelines.storage import exists, read_bytes

    meta_uri = join(cfg.distill.output, META_FILE)
    if not exists(meta_uri):
        return None
    meta = read_meta(read_bytes(meta_uri), meta_uri)
    if meta.job_key == job_key and meta.step == cfg.distill.max_steps:
        return meta
    return None


def trainer_for(cfg: Config, spec: RemovalSpec, manifest: CacheManifest, mlflow_run_id: str | None,
                callbacks: list | None = None) -> Any:
    """The TorchTrainer of a distillation job (Ray Tune wraps this with its own storage and callbacks)."""
    import ray
    from ray.train import DataConfig
    from ray.train.torch import TorchTrainer

    dc = cfg.distill

    datasets = training_datasets(cfg, manifest)
    # the validation rows are few and fixed: read once here with pyarrow (a Ray Data job costs seconds of start-up
    # for a few rows), shared with every worker through the object store
    val_rows = None
    if manifest.rows.get("val", 0) > 0:
        n = dc.val_batches * dc.batch_size
        val_rows = ray.put(read_split_columns(dc.cache, "val", list(CACHE_COLUMNS), n))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "manifest": manifest, "spec": spec.to_dict(),
                           "tracking_uri": cfg.tracking_uri(), "mlflow_run_id": mlflow_run_id,
                           "val_rows": val_rows},
        datasets=datasets or None,
        dataset_config=DataConfig(datasets_to_split="all"),
        **trainer_configs(cfg, job_name(cfg), callbacks),
    )


def run(cfg: Config, callbacks: list | None = None) -> dict[str, Any]:
    """Distill (or resume distilling) the student; returns the output folder, the final step, the last
    losses, the MLflow run id and the checkpoint."""
    dc = cfg.distill
    job_key = join(dc.storage_path, job_name(cfg))
    done = _finished(cfg, job_key)
    if done is not None:
        log.info("distill: %s already holds the final student of %s (step %d); nothing to do",
                 dc.output, job_key, done.step)
        return {"output": dc.output, "step": done.step, "losses": done.losses or {},
                "mlflow_run_id": done.mlflow_run_id, "checkpoint": done.checkpoint, "skipped": True}
    manifest = cache_manifest(cfg)
    from diffusers import UNet2DConditionModel

    src = resolve_model_dir(model_dir(cfg.teacher.uri))
    t_config = UNet2DConditionModel.load_config(src, subfolder="unet")
    preset = cfg.student.preset
    if cfg.student.start_from is not None:
        spec, start_meta = start_spec(cfg.student.start_from, t_config)
        preset = start_meta.preset
    else:
        spec = resolve_spec(t_config, preset=cfg.student.preset,
                            spec=cfg.student.spec.model_dump() if cfg.student.spec else None)
    ensure_ray(cfg)
    uri = cfg.tracking_uri()
    tags = {"distillery.stage": "distill", "distillery.config_digest": cfg.digest()}
    run_id, resumed = tracking.start_run(uri, cfg.mlflow.experiment, job_key, job_name(cfg),
                                         cfg.model_dump(mode="json"), tags=tags)
    log.info("distill: %s MLflow run %s (%s)", "resuming" if resumed else "starting", run_id, uri)
    try:
        result = trainer_for(cfg, spec, manifest, run_id, callbacks).fit()
    except BaseException:
        tracking.end_run(uri, run_id, "FAILED")
        raise
    # the newest complete checkpoint: a worker that died right after writing the last one (before Ray registered
    # it) resumes at max_steps and reports nothing more, so Ray's own result can be one checkpoint behind
    final = resume_checkpoint(result.checkpoint, dc.storage_path, job_name(cfg))
    if final is None:
        raise RuntimeError(f"distill: the run {job_key} finished without a checkpoint")
    prune_orphan_checkpoints(result, dc.storage_path, job_name(cfg))
    metrics = dict(result.metrics or {})
    losses = {k: v for k, v in metrics.items() if "loss" in k or k.startswith("val_")}
    with final.as_directory() as d:
        state = json.loads((Path(d) / STATE).read_text())
        meta = StudentMeta(teacher=cfg.teacher.uri, family=manifest.family, preset=preset,
                           init=cfg.student.init, start_from=cfg.student.start_from, spec=spec.to_dict(),
                           latents="mean" if manifest.latents == "mean" else "dist", sizes=trained_sizes(manifest),
                           job_key=job_key,
                           step=state["step"], losses=losses, mlflow_run_id=run_id, checkpoint=final.path,
                           config_digest=cfg.digest(), kd_loss=dc.loss.model_dump(mode="json"))
        with tempfile.TemporaryDirectory() as tmp:
            folder = export_student(d, cfg, src, spec, Path(tmp) / "student", meta)
            from diffusers import UNet2DConditionModel as U

            meta.params = count_params(U.from_pretrained(folder / "unet"))
            (folder / META_FILE).write_text(meta.to_json())
            finish_export(folder, cfg, f"{cfg.name}-student")
            tracking.log_artifact(uri, run_id, folder, "student")
            upload_folder(folder, dc.output)
    tracking.set_tags(uri, run_id, {"distillery.output": dc.output, "distillery.final_step": state["step"]})
    tracking.end_run(uri, run_id)
    return {"output": dc.output, "step": state["step"], "losses": losses, "mlflow_run_id": run_id,
            "checkpoint": final.path}
