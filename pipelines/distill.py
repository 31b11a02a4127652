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
import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.fp8 import fp8_unsupported, use_fp8_linear
from models.kd import CUDAGRAPH_MODES, KDTaps, KDWeights, attention_pairs, diffusion_batch, feature_pairs, kd_loss
from models.student import RemovalSpec, count_params, resolve_spec, student_config
from models.teacher import encode_prompts, load_teacher, resolve_model_dir, unet_conditioning
from pipelines import tracking
from pipelines.cache import read_manifest, sample_latents
from pipelines.config import Config, DistillConfig
from pipelines.storage import ensure_ray, filesystem, is_remote, join

log = logging.getLogger(__name__)

CACHE_COLUMNS = ("latent", "latent_mean", "latent_std", "prompt_embeds", "pooled", "time_ids")
DS_TAG = "ds"  # DeepSpeed's checkpoint tag inside each checkpoint folder
STATE = "state.json"  # step, MLflow run id: written by rank 0 into each checkpoint
EMA_FILE = "ema.pt"
VAL_SEED = 1234
AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
           "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE")


# ---------------------------------------------------------------------------------------------------
# Pure helpers (no Ray): schedule, optimizer, DeepSpeed config, batches, sampling, export.
# ---------------------------------------------------------------------------------------------------


def lr_at(step: int, dc: DistillConfig) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warm-up, then constant, linear decay
    or cosine decay to zero at max_steps."""
    if step < dc.warmup_steps:
        return dc.lr * (step + 1) / dc.warmup_steps
    if dc.lr_schedule == "constant":
        return dc.lr
    frac = min(1.0, (step - dc.warmup_steps) / max(1, dc.max_steps - dc.warmup_steps))
    if dc.lr_schedule == "linear":
        return dc.lr * (1.0 - frac)
    return dc.lr * 0.5 * (1.0 + math.cos(math.pi * frac))


def make_optimizer(model: torch.nn.Module, dc: DistillConfig, use_gpu: bool = False) -> torch.optim.AdamW:
    """AdamW without weight decay on biases and norms; fused on GPU unless the optimizer lives on the CPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    fused = use_gpu and torch.cuda.is_available() and not dc.offload_optimizer
    groups = [{"params": decay, "weight_decay": dc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=dc.lr, betas=(0.9, 0.999), eps=1e-8, fused=fused)


def ds_config(dc: DistillConfig, world_size: int, use_gpu: bool = False) -> dict[str, Any]:
    """The DeepSpeed config of a run. The optimizer is ours (torch AdamW), the LR schedule too."""
    zero: dict[str, Any] = {"stage": dc.zero_stage}
    if dc.zero_stage >= 1:
        zero.update(overlap_comm=use_gpu, contiguous_gradients=True, reduce_bucket_size=5e7)
    if dc.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False, stage3_param_persistence_threshold=1e5)
    if dc.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if dc.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    return {
        "train_micro_batch_size_per_gpu": dc.batch_size,
        "gradient_accumulation_steps": dc.grad_accum,
        "train_batch_size": dc.batch_size * dc.grad_accum * world_size,
        "gradient_clipping": dc.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dc.precision == "bf16"},
        "fp16": {"enabled": dc.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # offloaded states step with torch AdamW (no C++ build)
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def kd_weights(dc: DistillConfig) -> KDWeights:
    return KDWeights(task=dc.loss.task, out=dc.loss.out, feat=dc.loss.feat, attn=dc.loss.attn)


def teacher_dtype(teacher_cfg_dtype: str, precision: str, device: torch.device) -> torch.dtype:
    """The frozen teacher runs in half precision on GPU (bf16 unless training in fp16), fp32 on CPU."""
    if teacher_cfg_dtype != "auto":
        return getattr(torch, teacher_cfg_dtype)
    if device.type != "cuda":
        return torch.float32
    return torch.float16 if precision == "fp16" else torch.bfloat16


def compile_kwargs(dc: DistillConfig) -> dict[str, Any]:
    """torch.compile's keyword arguments for distill.compile_mode."""
    return {} if dc.compile_mode == "default" else {"mode": dc.compile_mode}


def uses_cudagraphs(dc: DistillConfig) -> bool:
    """Whether the compiled forwards run as CUDA graphs (compile modes reduce-overhead and max-autotune)."""
    return dc.compile and dc.compile_mode in CUDAGRAPH_MODES


def kd_teacher(unet: torch.nn.Module, dc: DistillConfig) -> torch.nn.Module:
    """The teacher U-Net as the KD loss calls it: compiled (a wrapper; `unet` itself stays eager, for sampling)
    when distill.compile is set. Its KD taps go on `unet` (KDTaps) and fire inside the compiled graph."""
    return torch.compile(unet, **compile_kwargs(dc)) if dc.compile else unet


def eager_if_compiled(dc: DistillConfig) -> Any:
    """Validation and sampling run eagerly: other shapes and no-grad would each compile the forwards again."""
    return torch.compiler.set_stance("force_eager") if dc.compile else nullcontext()


def fp8_linears(dc: DistillConfig, student: torch.nn.Module, teacher_unet: torch.nn.Module,
                device: torch.device) -> int:
    """distill.fp8_linear: the transformer blocks' linear layers switched to float8 matmuls (models/fp8.py), the
    student's (and the teacher's with "both"), before the engine wraps the student; the number switched."""
    if dc.fp8_linear == "off":
        return 0
    why = fp8_unsupported(device)
    if why:
        raise ValueError(f"distill.fp8_linear={dc.fp8_linear!r}: {why}; set distill.fp8_linear to 'off'")
    return use_fp8_linear(student) + (use_fp8_linear(teacher_unet) if dc.fp8_linear == "both" else 0)


def job_name(cfg: Config) -> str:
    return cfg.distill.run_name or f"{cfg.name}-distill"


def cache_batch(batch: dict[str, np.ndarray], manifest: dict, family: str, device: torch.device,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """(scaled latents, U-Net conditioning) from a batch of cache rows (numpy)."""
    latents = sample_latents(batch, manifest, generator)
    emb = {k: torch.as_tensor(np.ascontiguousarray(batch[k]), dtype=torch.float32)
           for k in ("prompt_embeds", "pooled", "time_ids") if k in batch}
    cond = unet_conditioning(emb, family)
    return latents.to(device), _to(cond, device)


def _to(tree: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    if isinstance(tree, dict):
        return {k: _to(v, device, dtype) for k, v in tree.items()}
    if isinstance(tree, torch.Tensor):
        if dtype is not None and tree.is_floating_point():
            return tree.to(device, dtype)
        return tree.to(device)
    return tree


def prompt_conditioning(teacher: Any, prompts: list[str], resolution: int) -> dict[str, Any]:
    """U-Net conditioning for text prompts (SDXL: pooled embedding and square time ids)."""
    emb = encode_prompts(teacher, prompts)
    if teacher.family == "sdxl":
        emb["time_ids"] = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * len(prompts),
                                       dtype=torch.float32, device=emb["prompt_embeds"].device)
    return unet_conditioning(emb, teacher.family)


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
    both = _to(both, device, dtype)
    for t in sched.timesteps:
        xin = sched.scale_model_input(torch.cat([x, x]), t)
        out = unet(xin.to(dtype), t.to(device), **both).sample.float()
        u, c = out.chunk(2)
        x = sched.step(u + guidance * (c - u), t, x).prev_sample
    return x


@torch.no_grad()
def decode(vae: Any, latents: torch.Tensor) -> np.ndarray:
    """Images as uint8 (N, H, W, 3)."""
    p = next(vae.parameters())
    img = vae.decode(latents.to(p.device, p.dtype) / vae.config.scaling_factor).sample.float()
    img = ((img / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return img.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(teacher_imgs: np.ndarray, student_imgs: np.ndarray) -> Any:
    """One row per prompt: teacher on the left, student on the right."""
    from PIL import Image

    rows = [np.concatenate([t, s], axis=1) for t, s in zip(teacher_imgs, student_imgs)]
    return Image.fromarray(np.concatenate(rows, axis=0))


def consolidated_state(ckpt_dir: str | Path, zero_stage: int, deepspeed: bool) -> dict[str, torch.Tensor]:
    """The student's fp32 weights from a checkpoint folder: the EMA when there is one, else the ZeRO shards
    (stages 1-3) merged, else the saved module."""
    ckpt = Path(ckpt_dir)
    if (ckpt / EMA_FILE).exists():
        return {k: v.float() for k, v in torch.load(ckpt / EMA_FILE, map_location="cpu").items()}
    if not deepspeed:
        return {k: v.float() for k, v in torch.load(ckpt / "model.pt", map_location="cpu").items()}
    if zero_stage >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DS_TAG)
    module = torch.load(ckpt / DS_TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in module["module"].items()}


def export_student(ckpt_dir: str | Path, cfg: Config, spec: RemovalSpec, out_dir: str | Path,
                   meta: dict[str, Any]) -> Path:
    """A diffusers pipeline folder (the teacher's VAE, text encoders, scheduler) with the trained student
    U-Net, from a checkpoint folder. Plain diffusers loads it; its unet/ is the student alone."""
    from diffusers import UNet2DConditionModel

    from models.student import save_student

    src = resolve_model_dir(cfg.teacher.uri)
    t_config = UNet2DConditionModel.load_config(src, subfolder="unet")
    student = UNet2DConditionModel.from_config(student_config(t_config, spec))
    student.load_state_dict(consolidated_state(ckpt_dir, cfg.distill.zero_stage, cfg.distill.deepspeed))
    return save_student(student, src, out_dir, meta)


# ---------------------------------------------------------------------------------------------------
# The student engine: DeepSpeed ZeRO, or DDP + AdamW, behind the few calls the loop makes.
# ---------------------------------------------------------------------------------------------------


def skip_shm_comm_build() -> None:
    """CPU training only: DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (deepspeed_shm_comm,
    30-120 s of C++ on a small machine, again whenever the venv path changes) that only its inference_all_reduce
    uses; training's all-reduce goes through the gloo process group either way. deepspeed 0.19.8 decides by
    `deepspeed.ops.__compatible_ops__` (probed lazily, by compiler subprocesses, and read nowhere else): set
    before the engine starts the backend, it skips both the probe and the build."""
    import deepspeed.ops

    if "__compatible_ops__" not in vars(deepspeed.ops):
        deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
    else:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class StudentEngine:
    def __init__(self, student: torch.nn.Module, dc: DistillConfig, world_size: int, device: torch.device):
        self.dc, self.device = dc, device
        use_gpu = device.type == "cuda"
        sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, dc) / dc.lr)  # noqa: E731
        if dc.deepspeed:
            import deepspeed

            if not use_gpu:
                skip_shm_comm_build()
            opt = make_optimizer(student, dc, use_gpu)
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=student, optimizer=opt, lr_scheduler=sched, config=ds_config(dc, world_size, use_gpu),
                dist_init_required=False)
            if dc.compile:  # the student module compiled in place (its state_dict keys stay as they are)
                self.engine.compile(compile_kwargs=compile_kwargs(dc))
            self.module = self.engine.module
            # DeepSpeed casts the module for bf16/fp16; inputs must match it
            self.input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dc.precision, torch.float32)
            self.autocast = nullcontext
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            student.to(device)
            if dc.compile:
                student.compile(**compile_kwargs(dc))
            self.module = student
            self.optimizer = make_optimizer(student, dc, use_gpu)
            self.scheduler = sched(self.optimizer)
            multi = torch.distributed.is_initialized() and world_size > 1
            self.engine = DDP(student, device_ids=[device.index] if use_gpu else None) if multi else student
            self.input_dtype = torch.float32
            half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dc.precision)
            self.autocast = (lambda: torch.autocast(device.type, dtype=half)) if half else nullcontext
            self.scaler = torch.amp.GradScaler(device.type, enabled=dc.precision == "fp16")
            self._micro = 0

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def backward_step(self, loss: torch.Tensor) -> None:
        """One micro-batch; the optimizer steps every grad_accum micro-batches."""
        if self.dc.deepspeed:
            self.engine.backward(loss)
            self.engine.step()
            return
        self.scaler.scale(loss / self.dc.grad_accum).backward()
        self._micro += 1
        if self._micro % self.dc.grad_accum == 0:
            self.scaler.unscale_(self.optimizer)
            if self.dc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.dc.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save(self, folder: Path, step: int, rank: int) -> None:
        """Every rank writes its own shard files; Ray Train merges the folders of all ranks."""
        if self.dc.deepspeed:
            self.engine.save_checkpoint(str(folder), tag=DS_TAG, client_state={"step": step})
        elif rank == 0:
            torch.save(self.module.state_dict(), folder / "model.pt")
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "scaler": self.scaler.state_dict(), "step": step}, folder / "train_state.pt")

    def load(self, folder: Path) -> int:
        """Restore from a checkpoint folder; returns its step."""
        if self.dc.deepspeed:
            path, client_state = self.engine.load_checkpoint(str(folder), tag=DS_TAG)
            if path is None:
                raise RuntimeError(f"DeepSpeed found no checkpoint with tag {DS_TAG!r} in {folder}")
            return int(client_state["step"])
        self.module.load_state_dict(torch.load(folder / "model.pt", map_location=self.device))
        st = torch.load(folder / "train_state.pt", map_location=self.device, weights_only=False)
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.scaler.load_state_dict(st["scaler"])
        return int(st["step"])


class EMA:
    """Exponential moving average of the student's weights (fp32, on every rank; ZeRO stage <= 2)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()
                       if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for k, v in module.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach().float(), 1.0 - self.decay)


# ---------------------------------------------------------------------------------------------------
# The worker loop (runs on every Ray Train worker).
# ---------------------------------------------------------------------------------------------------


def _all_mean(values: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1 and torch.distributed.is_initialized():
        values = values.clone()
        torch.distributed.all_reduce(values)
        values /= world
    return values


def _train_batches(it: Any, dc: DistillConfig, rank: int):
    """(epoch, batch) forever over this worker's shard; each epoch streams the shard again."""
    epoch = 0
    while True:
        n = 0
        for batch in it.iter_batches(batch_size=dc.batch_size, drop_last=True, batch_format="numpy",
                                     local_shuffle_buffer_size=4 * dc.batch_size,
                                     local_shuffle_seed=dc.seed + 1000 * epoch + rank):
            n += 1
            yield epoch, batch
        if n == 0:
            raise RuntimeError(f"rank {rank}: the training shard has fewer than batch_size={dc.batch_size} rows; "
                               "lower distill.batch_size or distill.num_workers, or prepare more data")
        epoch += 1


def _encode_images(teacher: Any, batch: dict[str, np.ndarray], resolution: int,
                   device: torch.device) -> dict[str, np.ndarray]:
    """On-the-fly encoding: a batch of images (uint8 HWC) and captions as cache rows ("sample" latents)."""
    img = torch.as_tensor(np.stack(list(batch["image"])))
    if img.shape[-1] == 3:
        img = img.permute(0, 3, 1, 2)
    img = img.to(device, torch.float32) / 127.5 - 1.0
    vae = teacher.vae
    with torch.no_grad():
        lat = vae.encode(img.to(next(vae.parameters()).dtype)).latent_dist.sample() * vae.config.scaling_factor
        emb = encode_prompts(teacher, [str(c) for c in batch["caption"]])
    out = {"latent": lat.float().cpu().numpy(), "prompt_embeds": emb["prompt_embeds"].float().cpu().numpy()}
    if teacher.family == "sdxl":
        out["pooled"] = emb["pooled"].float().cpu().numpy()
        out["time_ids"] = np.tile(np.array([resolution, resolution, 0, 0, resolution, resolution], np.float32),
                                  (lat.shape[0], 1))
    return out


SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION"}
_SDPA_DEFAULT_ORDER: list[int] = []


def prefer_attention_backend(name: str) -> None:
    """distill.attention_backend for this process: that fused SDPA kernel goes to the front of PyTorch's priority
    list, the others after it in their own order ("auto": PyTorch's order). The U-Nets' attention calls
    F.scaled_dot_product_attention, so eager forwards and compiled graphs (which take the choice when they are
    traced) both follow it."""
    from torch.nn.attention import SDPBackend

    if not _SDPA_DEFAULT_ORDER:
        _SDPA_DEFAULT_ORDER.extend(torch._C._get_sdp_priority_order())
    order = list(_SDPA_DEFAULT_ORDER)
    if name != "auto":
        first = int(getattr(SDPBackend, SDPA_BACKENDS[name]))
        order = [first] + [code for code in order if code != first]
    torch._C._set_sdp_priority_order(order)


def worker_setup(dc: DistillConfig) -> tuple[int, int, torch.device]:
    """A Train worker's rank, world size and device, with its accelerator settings and seed."""
    import ray.train

    if not dc.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported in this process
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cuda", ctx.get_local_rank()) if dc.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = dc.cudnn_benchmark
    prefer_attention_backend(dc.attention_backend)
    torch.manual_seed(dc.seed + rank)
    return rank, world, device


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker. `config`: {"cfg": Config as JSON, "manifest": cache manifest, "spec": removal spec,
    "tracking_uri": str, "mlflow_run_id": str | None, "val_rows": object ref of the validation rows | None}."""
    import ray
    import ray.train

    cfg = Config.model_validate(config["cfg"])
    dc = cfg.distill
    rank, world, device = worker_setup(dc)
    manifest = config["manifest"]
    run_id, uri = config.get("mlflow_run_id"), config["tracking_uri"]
    resolution = int(manifest["resolution"])

    # the teacher: fp32 while the student is copied from it, then half precision on the device
    teacher = load_teacher(cfg.teacher.uri, dtype="float32", revision=cfg.teacher.revision,
                           variant=cfg.teacher.variant)
    spec = RemovalSpec.from_dict(config["spec"])
    from models.student import build_student

    student = build_student(teacher.unet, spec)
    t_dtype = teacher_dtype(cfg.teacher.dtype, dc.precision, device)
    teacher.unet.to(device, t_dtype)
    teacher.text_encoder.to(device)
    if teacher.text_encoder_2 is not None:
        teacher.text_encoder_2.to(device)
    teacher.vae.to(device)
    weights = kd_weights(dc)
    pairs = feature_pairs(student, teacher.unet, spec, dc.loss.level) if weights.feat > 0 else []
    attn_pairs = attention_pairs(student, teacher.unet, spec) if weights.attn > 0 else []
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
        print(f"[distill] fp8_linear={dc.fp8_linear}: {n_fp8} linear layers multiply in float8", flush=True)
    student.train()
    eng = StudentEngine(student, dc, world, device)
    ema = EMA(eng.module, dc.ema_decay) if dc.ema_decay else None
    # KD hooks registered once for the run (per-step hooks would break or recompile compiled forwards)
    taps = KDTaps(eng.module, teacher.unet, weights, pairs, attn_pairs, cudagraphs=uses_cudagraphs(dc)).attach()
    t_unet = kd_teacher(teacher.unet, dc)

    # resume: the latest checkpoint Ray Train knows (after a worker failure, or a rerun of the same job)
    step = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            step = eng.load(Path(d))
            if ema is not None and (Path(d) / EMA_FILE).exists():
                ema.shadow = torch.load(Path(d) / EMA_FILE, map_location="cpu")
    if rank == 0 and run_id:
        tracking.log_metrics(uri, run_id, {"resumed_from_step": step}, step)
        if step:
            print(f"[distill] resumed from step {step}", flush=True)

    # fixed validation batches: the same rows, noise and timesteps at every validation
    val_set = []
    if config.get("val_rows") is not None:
        rows = ray.get(config["val_rows"])
        n = len(next(iter(rows.values())))
        for i, start in enumerate(range(0, n, dc.batch_size)):
            batch = {k: v[start : start + dc.batch_size] for k, v in rows.items()}
            g = torch.Generator().manual_seed(VAL_SEED + i)
            if dc.encode_on_the_fly:
                batch = _encode_images(teacher, batch, resolution, device)
            latents, cond = cache_batch(batch, manifest, teacher.family, torch.device("cpu"), g)
            noisy, t, target = diffusion_batch(teacher.scheduler, latents, teacher.prediction_type, g)
            val_set.append((noisy, t, cond, target))

    # sample prompts: encoded once; the teacher's images are made once, on rank 0
    seeds = dc.sample_seeds * (len(dc.sample_prompts) if len(dc.sample_seeds) == 1 else 1)
    s_cond = _to(prompt_conditioning(teacher, dc.sample_prompts, resolution), device)
    s_uncond = _to(prompt_conditioning(teacher, [""] * len(dc.sample_prompts), resolution), device)
    latent_shape = tuple(manifest["latent_shape"])
    teacher_images = None

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
            sums = torch.zeros(4)
            with torch.no_grad(), eng.autocast():
                for noisy, t, cond, target in val_set:
                    parts = kd_loss(eng.module, teacher.unet, noisy.to(device, eng.input_dtype), t.to(device),
                                    _to(cond, device, eng.input_dtype), target.to(device), weights, taps=taps)
                    sums += torch.stack([parts[k].detach().float().cpu() for k in ("task", "out", "feat", "attn")])
            sums = _all_mean(sums / len(val_set), world)
            metrics = {f"val_{k}": float(v) for k, v in zip(("task", "out", "feat", "attn"), sums)}
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

    def checkpoint(at: int, metrics: dict[str, float]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            eng.save(folder, at, rank)
            if rank == 0:
                (folder / STATE).write_text(json.dumps({"step": at, "mlflow_run_id": run_id}))
                if ema is not None:
                    torch.save(ema.shadow, folder / EMA_FILE)
            ray.train.report({"step": at, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint_{at:06d}")

    if step == 0:  # a baseline before any training
        metrics = validate(0)
        ray.train.report({"step": 0, **metrics})

    batches = _train_batches(ray.train.get_dataset_shard("train"), dc, rank)
    samples_per_step = dc.batch_size * dc.grad_accum * world
    window = torch.zeros(5)  # loss, task, out, feat, attn summed over micro-batches since the last log
    window_n, t_log, t_start, start_step = 0, time.perf_counter(), time.perf_counter(), step
    gen = torch.Generator(device=device).manual_seed(dc.seed * 7919 + rank * 104729 + step)
    epoch = 0
    while step < dc.max_steps:
        for _ in range(dc.grad_accum):
            epoch, batch = next(batches)
            if dc.encode_on_the_fly:
                batch = _encode_images(teacher, batch, resolution, device)
            latents, cond = cache_batch(batch, manifest, teacher.family, device, None)
            noisy, t, target = diffusion_batch(teacher.scheduler, latents, teacher.prediction_type, gen)
            if dc.channels_last:
                noisy = noisy.contiguous(memory_format=torch.channels_last)
            with eng.autocast():
                parts = kd_loss(eng.engine, t_unet, noisy.to(eng.input_dtype), t,
                                _to(cond, device, eng.input_dtype), target, weights, taps=taps)
            eng.backward_step(parts["loss"])
            window += torch.stack([parts[k].detach().float().cpu() for k in ("loss", "task", "out", "feat", "attn")])
            window_n += 1
        step += 1
        if ema is not None:
            ema.update(eng.module)
        is_val = step % dc.val_every == 0 or step == dc.max_steps
        is_ckpt = step % dc.checkpoint_every == 0 or step == dc.max_steps
        if step % dc.log_every == 0 or is_val or is_ckpt:
            now = time.perf_counter()
            means = _all_mean(window / max(1, window_n), world)
            sps = samples_per_step * window_n / dc.grad_accum / max(now - t_log, 1e-9)
            if rank == 0:
                done = step - start_step
                eta = (now - t_start) / done * (dc.max_steps - step)
                print(f"[distill] step {step}/{dc.max_steps} loss {means[0]:.4f} {sps:.1f} samples/s "
                      f"elapsed {now - t_start:.0f}s ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}", flush=True)
                if run_id:
                    m = {"loss": means[0], "loss_task": means[1], "loss_out": means[2], "loss_feat": means[3],
                         "loss_attn": means[4], "lr": eng.lr(), "samples_per_s": sps, "epoch": epoch}
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


def _datasets(cfg: Config, manifest: dict) -> dict[str, Any]:
    import ray.data

    dc = cfg.distill
    if dc.encode_on_the_fly:
        from pipelines import prepare

        if not hasattr(prepare, "image_splits"):
            raise ValueError("distill.encode_on_the_fly: the data stage does not provide preprocessed image splits "
                             "yet (pipelines.prepare.image_splits); run `distillery prepare` and train from the cache")
        train, val = prepare.image_splits(cfg)  # preprocessed images and captions, split like the cache
        return {"train": train, "val": val}
    out = {}
    for split in ("train", "val"):
        if manifest["rows"].get(split, 0) == 0:
            continue
        fs, path = filesystem(join(dc.cache, split))
        ds = ray.data.read_parquet(path, filesystem=fs)
        keep = [c for c in CACHE_COLUMNS if c in ds.schema().names]
        out[split] = ds.select_columns(keep)
    if "train" not in out:
        raise ValueError(f"{dc.cache}: the cache has no training rows")
    return out


def _manifest(cfg: Config) -> dict:
    dc = cfg.distill
    if dc.encode_on_the_fly:
        from diffusers import AutoencoderKL

        src = resolve_model_dir(cfg.teacher.uri)
        vae_cfg = AutoencoderKL.load_config(src, subfolder="vae")
        f = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        r = cfg.data.resolution
        return {"teacher": cfg.teacher.uri, "latents": "sample", "resolution": r, "rows": {},
                "latent_shape": [vae_cfg["latent_channels"], r // f, r // f],
                "vae_scaling_factor": vae_cfg.get("scaling_factor", 0.18215)}
    manifest = read_manifest(dc.cache)
    if manifest is None or not manifest.get("complete"):
        raise FileNotFoundError(f"distill.cache {dc.cache}: no complete embedding cache there (no manifest.json "
                                "with complete: true); run `distillery prepare` first, or set "
                                "distill.encode_on_the_fly with data.source")
    if manifest["teacher"] != cfg.teacher.uri:
        raise ValueError(f"distill.cache {dc.cache} holds embeddings of teacher {manifest['teacher']!r}, but "
                         f"teacher.uri is {cfg.teacher.uri!r}; prepare the data with this teacher")
    return manifest


def _finished(cfg: Config, job_key: str) -> dict | None:
    """The result of an earlier run of this job that already exported its final student."""
    from pipelines.storage import exists, read_bytes

    meta_uri = join(cfg.distill.output, "distillery.json")
    if not exists(meta_uri):
        return None
    meta = json.loads(read_bytes(meta_uri))
    if meta.get("job_key") == job_key and meta.get("step") == cfg.distill.max_steps:
        return meta
    return None


def _upload(local: Path, uri: str) -> None:
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    if not is_remote(uri):
        if Path(path).exists():
            shutil.rmtree(path)
        shutil.copytree(local, path)
        return
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def worker_env(use_gpu: bool) -> dict[str, str]:
    """Environment of the training workers: DeepSpeed's CPU accelerator off-GPU, and the standard variables
    workers need to reach the same storage and servers as the driver (a cluster's nodes usually have their
    own: these only fill in what a worker started earlier does not have)."""
    env = {"DS_ACCELERATOR": "cpu"} if not use_gpu else {}
    env["RAY_DATA_DISABLE_PROGRESS_BARS"] = os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    for k in ("DISTILLERY_CACHE", "HF_HUB_OFFLINE", "MLFLOW_TRACKING_URI", *AWS_ENV):
        if os.environ.get(k):
            env[k] = os.environ[k]
    return env


def run_storage(uri: str) -> dict[str, Any]:
    """RunConfig keyword arguments that put a Train run's checkpoints at `uri` (local or s3://)."""
    fs, path = filesystem(uri)
    return {"storage_path": path, "storage_filesystem": fs} if is_remote(uri) else {"storage_path": path}


def trainer_configs(cfg: Config, callbacks: list | None = None) -> dict[str, Any]:
    """Scaling, backend and run configs of a training job on cfg.distill (distill and steps share them)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    dc = cfg.distill
    return {
        "scaling_config": ScalingConfig(num_workers=dc.num_workers, use_gpu=dc.use_gpu,
                                        resources_per_worker=dc.resources_per_worker or None),
        "torch_config": TorchConfig(backend="nccl" if dc.use_gpu else "gloo"),
        "run_config": RunConfig(name=job_name(cfg), failure_config=FailureConfig(max_failures=dc.max_failures),
                                checkpoint_config=CheckpointConfig(num_to_keep=dc.keep_checkpoints),
                                worker_runtime_env={"env_vars": worker_env(dc.use_gpu)},
                                callbacks=callbacks or [], **run_storage(dc.storage_path)),
    }


def trainer_for(cfg: Config, spec: RemovalSpec, manifest: dict, mlflow_run_id: str | None,
                callbacks: list | None = None) -> Any:
    """The TorchTrainer of a distillation job (Ray Tune wraps this with its own storage and callbacks)."""
    import ray
    from ray.train import DataConfig
    from ray.train.torch import TorchTrainer

    dc = cfg.distill

    datasets = _datasets(cfg, manifest)
    # the validation rows are few and fixed: taken once here, shared with every worker through the object store
    val_rows = None
    if "val" in datasets:
        n = dc.val_batches * dc.batch_size
        val_rows = ray.put(datasets.pop("val").limit(n).take_batch(n, batch_format="numpy"))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "manifest": manifest, "spec": spec.to_dict(),
                           "tracking_uri": cfg.tracking_uri(), "mlflow_run_id": mlflow_run_id,
                           "val_rows": val_rows},
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split="all"),
        **trainer_configs(cfg, callbacks),
    )


def run(cfg: Config, callbacks: list | None = None) -> dict[str, Any]:
    """Distill (or resume distilling) the student; returns the output folder, the final step, the last
    losses, the MLflow run id and the checkpoint."""
    dc = cfg.distill
    job_key = join(dc.storage_path, job_name(cfg))
    done = _finished(cfg, job_key)
    if done is not None:
        log.info("distill: %s already holds the final student of %s (step %d); nothing to do",
                 dc.output, job_key, done["step"])
        return {"output": dc.output, "step": done["step"], "losses": done.get("losses", {}),
                "mlflow_run_id": done.get("mlflow_run_id"), "checkpoint": done.get("checkpoint"), "skipped": True}
    manifest = _manifest(cfg)
    from diffusers import UNet2DConditionModel

    src = resolve_model_dir(cfg.teacher.uri)
    t_config = UNet2DConditionModel.load_config(src, subfolder="unet")
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
    if result.checkpoint is None:
        raise RuntimeError(f"distill: the run {job_key} finished without a checkpoint")
    metrics = dict(result.metrics or {})
    losses = {k: v for k, v in metrics.items() if "loss" in k or k.startswith("val_")}
    with result.checkpoint.as_directory() as d:
        state = json.loads((Path(d) / STATE).read_text())
        meta = {"teacher": cfg.teacher.uri, "preset": cfg.student.preset, "spec": spec.to_dict(),
                "job_key": job_key, "step": state["step"], "losses": losses, "mlflow_run_id": run_id,
                "checkpoint": result.checkpoint.path, "config_digest": cfg.digest()}
        with tempfile.TemporaryDirectory() as tmp:
            folder = export_student(d, cfg, spec, Path(tmp) / "student", meta)
            from diffusers import UNet2DConditionModel as U

            meta["params"] = count_params(U.from_pretrained(folder / "unet"))
            (folder / "distillery.json").write_text(json.dumps(meta, indent=2, default=str))
            tracking.log_artifact(uri, run_id, folder, "student")
            _upload(folder, dc.output)
    tracking.set_tags(uri, run_id, {"distillery.output": dc.output, "distillery.final_step": state["step"]})
    tracking.end_run(uri, run_id)
    return {"output": dc.output, "step": state["step"], "losses": losses, "mlflow_run_id": run_id,
            "checkpoint": result.checkpoint.path}
