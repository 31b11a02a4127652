"""`distillery steps CONFIG`: step-distill a student (or the teacher itself) into a 1-8 step sampler.

The training shell the distill stage runs on (pipelines/train.py): Ray Data streams the embedding cache to a
Ray Train TorchTrainer, each worker trains the student as a DeepSpeed ZeRO engine (or DDP) with the
distill section's workers, precision, ZeRO stage and checkpoint settings, rank 0 logs to MLflow. What
differs is the loss, from models/steps.py, and that training runs in phases (`StepDistiller`):

    guided       stage 1 (w input, teacher's CFG output) | round 1: 2N -> N steps | round 2 ... (DDIM)
    progressive  round 1: 2N -> N | round 2: N -> N/2 | ...                           (DDIM)
    consistency  one LCM phase: the teacher's guided ODE, an EMA target               (LCMScheduler)
    adversarial  one phase against discriminator heads on the teacher's features      (LCMScheduler)
    dmd          one phase: the teacher's CFG score against a trained fake score      (LCMScheduler)

Each phase runs steps.steps_per_round optimizer steps. adversarial and dmd also train their critic
(models/critics.py) as a second engine of the same kind (DeepSpeed or DDP, its own optimizer and LR),
steps.critic_steps updates of it before each student step. Checkpoints carry the DeepSpeed state (the
critic's in critic/) plus the phase's frozen teacher or EMA target, so a stopped run resumes mid-phase; a
run whose output already records this job at its last step is skipped. The driver saves a pipeline folder
(steps.output) with the student U-Net (LoRA adapter merged, w-embedding in its config), the matching scheduler and
distillery.json (objective, steps, guidance_scale), which plain diffusers loads and samples in one
forward per step. With steps.lora_rank, lora/ in it holds the adapter alone, for `pipe.load_lora_weights()`
on the source student or another U-Net of its architecture.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from models.critics import CRITIC_OBJECTIVES, CriticDistiller
from models.steps import (
    Schedule,
    StepDistiller,
    plan,
    sampling_timesteps,
    save_lora_adapter,
    save_steps_student,
    student_scheduler,
    w_dim,
)
from models.student import META_FILE, StepsMeta, read_meta
from models.teacher import load_teacher, resolve_model_dir
from pipelines import tracking
from pipelines.config import Config, DistillConfig
from pipelines.storage import ensure_ray, exists, join, model_dir, read_bytes
from pipelines.train import (
    StudentEngine,
    all_mean,
    cache_manifest,
    finish_export,
    prompt_conditioning,
    prune_orphan_checkpoints,
    resume_checkpoint,
    seal_checkpoint,
    teacher_dtype,
    trainer_configs,
    training_datasets,
    upload_folder,
    worker_batches,
    worker_setup,
)

log = logging.getLogger(__name__)

STATE = "state.json"  # step, phase, MLflow run id (rank 0, in every checkpoint)
AUX = "aux.pt"  # the phase's frozen teacher (progressive) or EMA target (consistency)
FINAL = "student_unet"  # the exported U-Net, in the last checkpoint
ADAPTER = "lora"  # the LoRA adapter alone (steps.lora_rank), in the last checkpoint and in the output folder
CRITIC = "critic"  # adversarial, dmd: the critic engine's checkpoint, in every checkpoint


def job_name(cfg: Config) -> str:
    return cfg.steps.run_name or f"{cfg.name}-steps"


def train_config(cfg: Config) -> DistillConfig:
    """The distill section with this stage's learning rate, batch size and length (the LR schedule and
    the DeepSpeed config read these). A student trained against a critic is not captured as a CUDA graph (two
    engines step in turn)."""
    sc = cfg.steps
    total = len(plan(sc.objective, sc.teacher_steps, sc.rounds, sc.lcm_steps)) * sc.steps_per_round
    update = {"lr": sc.lr, "batch_size": sc.batch_size, "max_steps": total, "grad_accum": 1, "ema_decay": None,
              "caption_dropout": sc.caption_dropout}
    if sc.objective in CRITIC_OBJECTIVES:
        update["cuda_graph"] = False
    return cfg.distill.model_copy(update=update)


def critic_config(cfg: Config) -> DistillConfig:
    """The critic engine's: train_config with steps.critic_lr and steps.critic_steps updates per student step."""
    sc, dc = cfg.steps, train_config(cfg)
    return dc.model_copy(update={"lr": sc.critic_lr or sc.lr, "max_steps": dc.max_steps * sc.critic_steps})


def _load_student(uri: str) -> tuple[str, Any]:
    from diffusers import UNet2DConditionModel

    src = resolve_model_dir(model_dir(uri))
    if not (Path(src) / "model_index.json").exists() or not (Path(src) / "unet").is_dir():
        raise FileNotFoundError(f"steps.student {uri}: no diffusers pipeline folder with a unet/ there; run the "
                                "distill stage first, or set steps.student to the teacher's URI to step-distill "
                                "the teacher itself")
    return src, UNet2DConditionModel.from_pretrained(src, subfolder="unet", dtype=torch.float32)


def _scheduler(src: str) -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_pretrained(src, subfolder="scheduler")  # any SD scheduler config: same betas


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker. `config`: {"cfg": Config as JSON, "manifest": cache manifest, "tracking_uri",
    "mlflow_run_id"}."""
    import ray.train

    cfg = Config.model_validate(config["cfg"])
    sc, dc = cfg.steps, train_config(cfg)
    rank, world, device = worker_setup(dc)
    manifest, run_id, uri = config["manifest"], config.get("mlflow_run_id"), config["tracking_uri"]

    src, student = _load_student(sc.student)
    base_scheduler = _scheduler(src)
    schedule = Schedule.from_scheduler(base_scheduler)
    guide = None
    # the empty prompt: the teacher's CFG (every objective but progressive) and caption dropout
    teacher = load_teacher(model_dir(cfg.teacher.uri), dtype="float32",
                           components=("text",) if sc.objective == "progressive" else ("unet", "text"),
                           revision=cfg.teacher.revision, variant=cfg.teacher.variant)
    uncond = prompt_conditioning(teacher, [""], int(manifest.resolution))
    if teacher.unet is not None:  # the teacher's CFG output guides (and, adversarial, is the discriminator)
        guide = teacher.unet.to(device, teacher_dtype(cfg.teacher.dtype, dc.precision, device))
    del teacher
    if sc.objective in CRITIC_OBJECTIVES:
        timesteps = sampling_timesteps(student_scheduler(sc.objective, base_scheduler, sc.lcm_steps, sc.lcm_skip),
                                       sc.lcm_steps)
        d = CriticDistiller(sc.objective, student, guide, schedule, uncond=uncond, sample_timesteps=timesteps,
                            guidance_scale=sc.guidance_scale, gan_loss=sc.gan_loss, gan_weight=sc.gan_weight,
                            distill_weight=sc.distill_weight, lora_rank=sc.lora_rank)
    else:
        d = StepDistiller(sc.objective, student, guide, schedule, uncond=None if guide is None else uncond,
                          teacher_steps=sc.teacher_steps, rounds=sc.rounds, guidance_range=tuple(sc.guidance_range),
                          lcm_skip=sc.lcm_skip, lcm_steps=sc.lcm_steps, ema_decay=sc.ema_decay,
                          lora_rank=sc.lora_rank, huber_c=sc.huber_c, w_embedding=sc.adds_w_embedding)
    eng = StudentEngine(d.student, dc, world, device)
    d.student = eng.engine  # forwards go through the engine (DeepSpeed/DDP hooks); copies unwrap it
    critic = None
    if d.critic is not None:  # a second engine: the critic's own optimizer, LR schedule and ZeRO state
        critic = StudentEngine(d.critic, critic_config(cfg), world, device)
        d.critic = critic.engine
    total, per = dc.max_steps, sc.steps_per_round

    step, aux = 0, None
    ckpt = resume_checkpoint(ray.train.get_checkpoint(), dc.storage_path, job_name(cfg))
    if ckpt is not None:
        with ckpt.as_directory() as folder:
            step = eng.load(Path(folder))
            if critic is not None:
                critic.load(Path(folder) / CRITIC)
            if (Path(folder) / AUX).exists():
                aux = torch.load(Path(folder) / AUX, map_location=device)
        if rank == 0:
            log.info("[steps] resumed from step %d", step)

    def checkpoint(at: int, metrics: dict[str, float]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            eng.save(folder, at, rank)
            if critic is not None:
                (folder / CRITIC).mkdir(exist_ok=True)
                critic.save(folder / CRITIC, at, rank)
            if rank == 0:
                (folder / STATE).write_text(json.dumps({"step": at, "phase": d.phase, "mlflow_run_id": run_id}))
                if at < total and at % per:  # mid-phase: keep what the phase compares against
                    if d.target is not None:
                        torch.save({"target": d.target.state_dict()}, folder / AUX)
                    elif d.phases[d.phase].objective == "progressive":
                        torch.save({"teacher": d.teacher.state_dict()}, folder / AUX)
                if at == total:
                    if d.portable_adapter:
                        save_lora_adapter(d.student, folder / ADAPTER)
                    d.export_student().save_pretrained(folder / FINAL)
            seal_checkpoint(folder, rank, world)
            ray.train.report({"step": at, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint_{at:06d}")

    batches = worker_batches(manifest, manifest.family, dc, rank, world, device, uncond,
                             seed=dc.seed * 7919 + rank * 104729 + step)
    gen = torch.Generator(device=device).manual_seed(dc.seed * 7919 + rank * 104729 + step + 1)
    # what each logged loss term summed to since the last log line, and how many steps it was summed over
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    window_n, t_log = 0, time.perf_counter()

    def add(parts: dict[str, torch.Tensor], prefix: str = "") -> None:
        for k, v in parts.items():  # summed at once: a replayed CUDA graph overwrites its outputs
            key = prefix + k if k == "loss" else k
            sums[key] = sums.get(key, 0.0) + v.detach().float()
            counts[key] = counts.get(key, 0) + 1

    def steps_loss(latents: torch.Tensor, cond: dict[str, Any]) -> dict[str, torch.Tensor]:
        with eng.autocast():
            return d.loss(latents, cond, gen)

    def critic_loss(latents: torch.Tensor, cond: dict[str, Any]) -> dict[str, torch.Tensor]:
        with critic.autocast():
            return d.critic_loss(latents, cond, gen)

    last = float("nan")
    while step < total:
        if d.phase != step // per:
            ph = d.start_phase(step // per)
            eng.reset_graph()  # a captured step would read the last phase's teacher
            if aux is not None:  # resumed mid-phase: the same teacher / target as before the stop
                (d.target if "target" in aux else d.teacher).load_state_dict(aux.get("target", aux.get("teacher")))
                aux = None
            if rank == 0:
                log.info("[steps] phase %d/%d: %s, student samples in %d steps", d.phase + 1, len(d.phases),
                         ph.objective, ph.steps)
        for _ in range(sc.critic_steps):  # the critic first, on batches of its own (DMD2's two time-scale rule)
            _, latents, cond = next(batches)
            add(critic.step(critic_loss, {"latents": latents, "cond": cond}, generators=(gen,)), "critic_")
        _, latents, cond = next(batches)
        add(eng.step(steps_loss, {"latents": latents, "cond": cond}, generators=(gen,)))
        d.after_step()
        step += 1
        window_n += 1
        end_of_phase = step % per == 0
        if step % dc.log_every == 0 or end_of_phase or step == total:
            now = time.perf_counter()
            keys = sorted(sums)  # the same on every rank: every rank runs the same loss terms
            means = all_mean(torch.stack([sums[k] / counts[k] for k in keys]).reshape(-1), world).tolist()
            terms = dict(zip(keys, means))
            last = terms["loss"]
            if rank == 0:
                log.info("[steps] step %d/%d %s %.1f samples/s", step, total,
                         " ".join(f"{k} {v:.4f}" for k, v in terms.items()),
                         dc.batch_size * world * window_n / max(now - t_log, 1e-9))
                if run_id:
                    tracking.log_metrics(uri, run_id, {**terms, "phase": d.phase,
                                                       "student_steps": d.phases[d.phase].steps,
                                                       "lr": eng.lr()}, step)
            sums.clear()
            counts.clear()
            window_n, t_log = 0, now
        if step % dc.checkpoint_every == 0 or end_of_phase or step == total:
            checkpoint(step, {"loss": last, "phase": d.phase})


# ---------------------------------------------------------------------------------------------------
# The driver.
# ---------------------------------------------------------------------------------------------------


def _finished(cfg: Config, job_key: str, total: int) -> StepsMeta | None:
    meta_uri = join(cfg.steps.output, META_FILE)
    if not exists(meta_uri):
        return None
    meta = read_meta(read_bytes(meta_uri), meta_uri).steps_distillation
    if meta is not None and meta.job_key == job_key and meta.step == total:
        return meta
    return None


def _check(cfg: Config) -> None:
    """Errors the workers would otherwise hit minutes later, named by the fields to change."""
    dc = cfg.distill
    if dc.deepspeed and dc.zero_stage == 3:
        raise ValueError("steps: distill.zero_stage 3 is not supported here (the progressive teacher, the "
                         "consistency target and the critics read whole U-Nets); use zero_stage 0-2")
    if dc.cuda_graph and cfg.steps.objective in CRITIC_OBJECTIVES:
        log.warning("steps.objective %s: distill.cuda_graph is not used (student and critic step in turn)",
                    cfg.steps.objective)


def run(cfg: Config, callbacks: list | None = None) -> dict[str, Any]:
    """Step-distill (or resume) cfg.steps.student; returns the output folder, the sampling steps, the last
    loss and the MLflow run id."""
    from diffusers import UNet2DConditionModel
    from ray.train.torch import TorchTrainer

    sc, dc = cfg.steps, train_config(cfg)
    _check(cfg)
    job_key = join(dc.storage_path, job_name(cfg))
    done = _finished(cfg, job_key, dc.max_steps)
    if done is not None:
        log.info("steps: %s already holds the final student of %s; nothing to do", sc.output, job_key)
        return {"output": sc.output, "steps": done.steps, "loss": done.loss, "mlflow_run_id": done.mlflow_run_id,
                "skipped": True}
    manifest = cache_manifest(cfg)
    src, student = _load_student(sc.student)
    t_cfg = UNet2DConditionModel.load_config(resolve_model_dir(model_dir(cfg.teacher.uri)), subfolder="unet")
    if t_cfg["cross_attention_dim"] != student.config.cross_attention_dim:
        raise ValueError(f"steps.student {sc.student} (cross_attention_dim {student.config.cross_attention_dim}) "
                         f"does not fit teacher.uri {cfg.teacher.uri} ({t_cfg['cross_attention_dim']})")
    del student

    ensure_ray(cfg)
    uri = cfg.tracking_uri()
    run_id, resumed = tracking.start_run(uri, cfg.mlflow.experiment, job_key, job_name(cfg),
                                         cfg.model_dump(mode="json"),
                                         tags={"distillery.stage": "steps", "distillery.config_digest": cfg.digest(),
                                               "distillery.objective": sc.objective})
    log.info("steps: %s MLflow run %s", "resuming" if resumed else "starting", run_id)
    datasets = training_datasets(cfg, manifest)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "manifest": manifest, "tracking_uri": uri,
                           "mlflow_run_id": run_id},
        datasets=datasets or None,
        **trainer_configs(cfg, job_name(cfg), callbacks),
    )
    try:
        result = trainer.fit()
    except BaseException:
        tracking.end_run(uri, run_id, "FAILED")
        raise
    final = resume_checkpoint(result.checkpoint, dc.storage_path, job_name(cfg))  # as in distill.run
    if final is None:
        raise RuntimeError(f"steps: the run {job_key} finished without a checkpoint")
    prune_orphan_checkpoints(result, dc.storage_path, job_name(cfg))
    phases = plan(sc.objective, sc.teacher_steps, sc.rounds, sc.lcm_steps)
    # else sampled without CFG: guidance 1 (a critic's student learned the guided distribution at w = 1)
    takes_w = sc.objective not in CRITIC_OBJECTIVES and (sc.adds_w_embedding or student_w(src))
    meta = StepsMeta(objective=sc.objective, steps=phases[-1].steps,
                     guidance_scale=sc.guidance_scale if takes_w else 1.0, guidance_range=list(sc.guidance_range),
                     phases=[vars(p) for p in phases], teacher=cfg.teacher.uri, source=sc.student,
                     lora_rank=sc.lora_rank, job_key=job_key, step=dc.max_steps,
                     loss=(result.metrics or {}).get("loss"), mlflow_run_id=run_id, config_digest=cfg.digest())
    with final.as_directory() as d:
        unet = UNet2DConditionModel.from_pretrained(Path(d) / FINAL, dtype=torch.float32)
        scheduler = student_scheduler(sc.objective, _scheduler(src), meta.steps, sc.lcm_skip)
        meta.scheduler = type(scheduler).__name__
        meta.lora_adapter = ADAPTER if (Path(d) / ADAPTER).is_dir() else None  # the workers wrote one
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_steps_student(unet, src, Path(tmp) / "student", scheduler, meta)
            if meta.lora_adapter:
                shutil.copytree(Path(d) / ADAPTER, folder / ADAPTER)
            finish_export(folder, cfg, f"{cfg.name}-steps")
            tracking.log_artifact(uri, run_id, folder / META_FILE, "student")
            upload_folder(folder, sc.output)
    tracking.set_tags(uri, run_id, {"distillery.output": sc.output, "distillery.student_steps": meta.steps})
    tracking.end_run(uri, run_id)
    return {"output": sc.output, "steps": meta.steps, "guidance_scale": meta.guidance_scale,
            "scheduler": meta.scheduler, "loss": meta.loss, "mlflow_run_id": run_id}


def student_w(src: str) -> bool:
    """Whether a pipeline folder's U-Net takes the guidance weight w as an input."""
    from diffusers import UNet2DConditionModel

    return w_dim(UNet2DConditionModel.load_config(src, subfolder="unet")) is not None
