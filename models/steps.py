"""Step distillation: students that sample in 1-8 steps instead of 25-50 (pure PyTorch + diffusers, no Ray).

Three objectives here, each a function returning {"loss": ...} for one batch of clean latents (two more, trained
against a critic, adversarial and dmd, are in models/critics.py):

  guided_loss       Meng et al., "On Distillation of Guided Diffusion Models", stage 1: the student, given
                    the guidance weight w as an input (a w-embedding added to its time embedding), matches
                    the teacher's classifier-free-guided output in one forward pass, w sampled from a range.
  progressive_loss  Salimans & Ho, "Progressive Distillation": one student DDIM step from t to t-Δ matches
                    two DDIM steps of its teacher (t -> t-Δ/2 -> t-Δ). Each round halves the steps and the
                    student of one round teaches the next. With a w-embedding this is guided stage 2.
  consistency_loss  Latent consistency distillation (LCM): the student's consistency function
                    f(z_t) = c_skip(t)·z_t + c_out(t)·x̂0 at t must equal the EMA target network's at t-k,
                    where z_{t-k} is one skipping-step DDIM step of the teacher's guided ODE from z_t.

The guidance weight w is the diffusers `guidance_scale` (eps = u + w·(c - u)); the student sees it through
`UNet2DConditionModel(time_cond_proj_dim=...)` and `timestep_cond = guidance_embedding(w)`, exactly what
StableDiffusionPipeline / LatentConsistencyModelPipeline pass when `unet.config.time_cond_proj_dim` is set
(they embed `guidance_scale - 1`), so an exported student runs in plain diffusers with one forward per step.

Timesteps are discrete (0..T-1) as in diffusers' schedulers; a timestep of -1 means "the end", whose alpha
is the scheduler's `final_alpha_cumprod`. Student schedules use DDIM's "trailing" spacing (first step at
t=T-1), which nests across halvings (1000 -> 999; 999, 499; 999, 749, 499, 249; ...).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, LCMScheduler, UNet2DConditionModel

from models.student import META_FILE, StepsMeta, read_meta_file
from models.teacher import cast_floats, map_tensors

GUIDANCE_EMBED_DIM = 256  # as the published LCM U-Nets (time_cond_proj_dim)
OBJECTIVES = ("guided", "progressive", "consistency", "adversarial", "dmd")
# students sampled with LCMScheduler; adversarial and dmd are trained against a critic (models/critics.py)
LCM_OBJECTIVES = ("consistency", "adversarial", "dmd")


# --- noise schedule and DDIM -------------------------------------------------------------------------------


@dataclass
class Schedule:
    """The teacher's discrete noise schedule and prediction type, with DDIM (eta=0) steps on it."""

    alphas_cumprod: torch.Tensor  # (T,)
    final_alpha: float  # alpha_cumprod "after" t=0 (DDIM's final_alpha_cumprod)
    prediction_type: str
    # device copies made once (of alphas_cumprod, of timestep grids): no host-to-device copy per training step,
    # which would also keep a step from being captured as a CUDA graph
    _on_device: dict = field(default_factory=dict, repr=False, compare=False)

    def on(self, device: Any, values: tuple[int, ...] | None = None) -> torch.Tensor:
        """alphas_cumprod (or the timesteps `values`) as a tensor on `device`, copied there once."""
        key = (str(device), values)
        if key not in self._on_device:
            src = self.alphas_cumprod if values is None else torch.tensor(values)
            self._on_device[key] = src.to(device)
        return self._on_device[key]

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> Schedule:
        ddim = DDIMScheduler.from_config(scheduler.config)  # any SD scheduler config describes the same betas
        pt = scheduler.config.get("prediction_type", "epsilon")
        if pt not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction type {pt!r}: step distillation supports epsilon and v_prediction")
        return cls(ddim.alphas_cumprod.float(), float(ddim.final_alpha_cumprod), pt)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(ᾱ_t), sqrt(1-ᾱ_t) shaped (B, 1, 1, 1) for broadcasting over `like`; t < 0 is the end."""
        ac = self.on(like.device)
        a = torch.where(t >= 0, ac[t.clamp(min=0)], torch.full_like(ac[:1], self.final_alpha).expand(t.shape))
        a = a.to(torch.float32).view(-1, *([1] * (like.dim() - 1)))
        return a.sqrt(), (1 - a).sqrt()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.alpha_sigma(t, x0)
        return a * x0 + s * noise

    def x0_eps(self, out: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean latent and the noise a model output implies at (z_t, t)."""
        a, s = self.alpha_sigma(t, z)
        out, z = out.float(), z.float()
        if self.prediction_type == "epsilon":
            return (z - s * out) / a, out
        return a * z - s * out, s * z + a * out  # v = a·eps - s·x0

    def output_from(self, x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model output (eps or v) that would predict x0 at (z_t, t)."""
        a, s = self.alpha_sigma(t, z)
        eps = (z - a * x0) / s
        return eps if self.prediction_type == "epsilon" else a * eps - s * x0

    def ddim_step(self, out: torch.Tensor, z: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor) -> torch.Tensor:
        x0, eps = self.x0_eps(out, z, t)
        a, s = self.alpha_sigma(t_prev, z)
        return a * x0 + s * eps


def trailing_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """DDIMScheduler(timestep_spacing="trailing").set_timesteps(steps).timesteps, highest first."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps={steps}: must be in 1..{num_train_timesteps}")
    return (np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / steps)).astype(np.int64) - 1).tolist()


def lcm_boundary(t: torch.Tensor, like: torch.Tensor, timestep_scaling: float = 10.0,
                 sigma_data: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip(t), c_out(t) of the consistency function, as LCMScheduler computes them; (B, 1, 1, 1)."""
    st = t.to(torch.float32).clamp(min=0) * timestep_scaling
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / (st**2 + sigma_data**2) ** 0.5
    shape = (-1, *([1] * (like.dim() - 1)))
    return c_skip.view(shape).to(like.device), c_out.view(shape).to(like.device)


# --- the w input ---------------------------------------------------------------------------------------------


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The w-embedding diffusers pipelines pass as `timestep_cond`: sinusoidal features of 1000·(w - 1).
    (StableDiffusionPipeline.get_guidance_scale_embedding(guidance_scale - 1)); (B,) -> (B, dim)."""
    w = (w.float() - 1.0) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _unwrap(unet: torch.nn.Module) -> UNet2DConditionModel:
    return getattr(unet, "module", unet)  # DeepSpeed / DDP wrappers


def w_dim(unet: Any) -> int | None:
    """The size of the U-Net's guidance-weight input (`time_cond_proj_dim`: its w-embedding), None when it takes no
    w. `unet`: a U-Net (also wrapped by DeepSpeed/DDP) or its config. A U-Net that takes w is fed w by diffusers'
    pipelines instead of running classifier-free guidance."""
    config = unet if isinstance(unet, dict) else _unwrap(unet).config
    return config.get("time_cond_proj_dim")


def add_guidance_embedding(unet: UNet2DConditionModel, dim: int = GUIDANCE_EMBED_DIM) -> UNet2DConditionModel:
    """A copy of `unet` that takes w as `timestep_cond`: the config gains `time_cond_proj_dim`, every weight
    is copied and the new projection starts at zero, so the copy computes exactly what `unet` did."""
    if unet.config.get("time_cond_proj_dim") is not None:
        return unet
    cfg = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    cfg["time_cond_proj_dim"] = dim
    new = UNet2DConditionModel.from_config(cfg)
    missing, unexpected = new.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
        raise RuntimeError(f"adding the w-embedding: missing {missing}, unexpected {unexpected}")
    torch.nn.init.zeros_(new.time_embedding.cond_proj.weight)
    return new.to(device=unet.device, dtype=unet.dtype)


def cat_trees(a: Any, b: Any) -> Any:
    """Concatenate two U-Net keyword-argument trees along the batch."""
    if isinstance(a, dict):
        return {k: cat_trees(a[k], b[k]) for k in a}
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    return a


def _expand(cond: dict[str, Any], n: int) -> dict[str, Any]:
    """Repeat a batch-1 conditioning (the empty prompt) to n rows."""
    return map_tensors(cond, lambda v: v.expand(n, *v.shape[1:]) if v.shape[0] == 1 and n != 1 else v)


def predict(unet: torch.nn.Module, z: torch.Tensor, t: torch.Tensor, cond: dict[str, Any],
            w: torch.Tensor | None = None, uncond: dict[str, Any] | None = None) -> torch.Tensor:
    """The (guided) output of `unet` at (z, t): one pass with the w-embedding when the U-Net takes w,
    else classifier-free guidance u + w·(c - u) in one doubled batch when w and `uncond` are given,
    else the plain conditional output. Inputs are cast to the U-Net's dtype; the result is float32."""
    dtype = next(_unwrap(unet).parameters()).dtype
    dim = w_dim(unet)
    cond = cast_floats(cond, dtype)
    if dim is not None:
        w = torch.ones(z.shape[0], device=z.device) if w is None else w
        emb = guidance_embedding(w, dim).to(device=z.device, dtype=dtype)
        return unet(z.to(dtype), t, timestep_cond=emb, **cond).sample.float()
    if w is None or uncond is None:
        return unet(z.to(dtype), t, **cond).sample.float()
    u = cast_floats(_expand(uncond, z.shape[0]), dtype)
    both = unet(torch.cat([z, z]).to(dtype), torch.cat([t, t]), **cat_trees(u, cond)).sample.float()
    out_u, out_c = both.chunk(2)
    return out_u + w.view(-1, 1, 1, 1).float() * (out_c - out_u)


def sample_w(n: int, guidance_range: tuple[float, float], device: Any, generator: torch.Generator | None = None):
    lo, hi = guidance_range
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=device)


def noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise (float32) of x's shape on x's device, drawn from `generator`."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)


# --- the objectives ------------------------------------------------------------------------------------------


def guided_loss(student: torch.nn.Module, teacher: torch.nn.Module, schedule: Schedule, latents: torch.Tensor,
                cond: dict[str, Any], uncond: dict[str, Any], w: torch.Tensor,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Guided distillation, stage 1: MSE between the student's output given w and the teacher's CFG output
    at w, at a random timestep (a student without a w input learns the guidance range in its weights). Outputs
    (eps or v) are linear in (x0, eps), so matching them matches the guided x̂0 of the paper, weighted by the SNR."""
    x0 = latents.float()
    t = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],), device=x0.device, generator=generator)
    z = schedule.add_noise(x0, noise_like(x0, generator), t)
    with torch.no_grad():
        target = predict(teacher, z, t, cond, w, uncond)
    out = predict(student, z, t, cond, w)
    return {"loss": F.mse_loss(out, target)}


def progressive_loss(student: torch.nn.Module, teacher: torch.nn.Module, schedule: Schedule, latents: torch.Tensor,
                     cond: dict[str, Any], steps: int, w: torch.Tensor | None = None,
                     uncond: dict[str, Any] | None = None,
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Progressive distillation for a student that samples in `steps` DDIM steps: from z_t at one of its
    timesteps, the teacher takes two steps t -> t-Δ/2 -> t-Δ (Δ = T // steps); the student's target x̃ is the
    clean latent whose one DDIM step from z_t lands on the same z_{t-Δ}. The loss is the MSE of the student's
    output against the output that predicts x̃ (x-space error weighted by SNR for eps, SNR+1 for v).
    Students with a w input (guided) get w; a teacher without one is guided by CFG when `uncond` is given."""
    x0 = latents.float()
    n, T = x0.shape[0], schedule.num_train_timesteps
    grid = schedule.on(x0.device, tuple(trailing_timesteps(steps, T)))
    t = grid[torch.randint(0, steps, (n,), device=x0.device, generator=generator)]
    delta = T // steps
    t_mid, t_end = t - delta // 2, t - delta
    z = schedule.add_noise(x0, noise_like(x0, generator), t)
    with torch.no_grad():
        z_mid = schedule.ddim_step(predict(teacher, z, t, cond, w, uncond), z, t, t_mid)
        z_end = schedule.ddim_step(predict(teacher, z_mid, t_mid, cond, w, uncond), z_mid, t_mid, t_end)
        a_t, s_t = schedule.alpha_sigma(t, z)
        a_e, s_e = schedule.alpha_sigma(t_end, z)
        x_tilde = (z_end - (s_e / s_t) * z) / (a_e - (s_e / s_t) * a_t)
        target = schedule.output_from(x_tilde, z, t)
    out = predict(student, z, t, cond, w)
    return {"loss": F.mse_loss(out, target)}


def lcm_timesteps(skip: int, num_train_timesteps: int = 1000) -> list[int]:
    """The skipping-step solver's grid: skip-1, 2·skip-1, ..., T-1 (LCMScheduler's original schedule)."""
    if not 1 <= skip <= num_train_timesteps // 2:
        raise ValueError(f"lcm_skip={skip}: must be in 1..{num_train_timesteps // 2}")
    n = num_train_timesteps // skip
    return [(i + 1) * skip - 1 for i in range(n)]


def consistency_loss(student: torch.nn.Module, target: torch.nn.Module, teacher: torch.nn.Module,
                     schedule: Schedule, latents: torch.Tensor, cond: dict[str, Any], uncond: dict[str, Any],
                     w: torch.Tensor, skip: int = 20, huber_c: float | None = 0.001,
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Latent consistency distillation: f_θ(z_t, t) against the EMA target's f(ẑ_{t-k}, t-k), where ẑ_{t-k} is
    one DDIM step of the teacher's CFG-guided ODE at w. Pseudo-Huber loss (LCM) or MSE when huber_c is None."""
    x0 = latents.float()
    n = x0.shape[0]
    grid = schedule.on(x0.device, tuple(lcm_timesteps(skip, schedule.num_train_timesteps)))
    t = grid[torch.randint(0, len(grid), (n,), device=x0.device, generator=generator)]
    t_prev = (t - skip).clamp(min=0)
    z = schedule.add_noise(x0, noise_like(x0, generator), t)
    c_skip, c_out = lcm_boundary(t, z)
    x0_s, _ = schedule.x0_eps(predict(student, z, t, cond, w), z, t)
    f_student = c_skip * z + c_out * x0_s
    with torch.no_grad():
        z_prev = schedule.ddim_step(predict(teacher, z, t, cond, w, uncond), z, t, t_prev)
        c_skip_p, c_out_p = lcm_boundary(t_prev, z)
        x0_t, _ = schedule.x0_eps(predict(target, z_prev, t_prev, cond, w), z_prev, t_prev)
        f_target = c_skip_p * z_prev + c_out_p * x0_t
    if huber_c is None:
        loss = F.mse_loss(f_student, f_target)
    else:
        loss = (torch.sqrt((f_student - f_target) ** 2 + huber_c**2) - huber_c).mean()
    return {"loss": loss}


@torch.no_grad()
def ema_update(target: torch.nn.Module, source: torch.nn.Module, decay: float) -> None:
    """target <- decay·target + (1-decay)·source, over parameters of the same name."""
    src = dict(_unwrap(source).named_parameters())
    pairs = [(p, src[name].detach()) for name, p in _unwrap(target).named_parameters()]
    same = [(p, q) for p, q in pairs if p.dtype == q.dtype]
    if same:  # one fused launch per tensor list, not one per parameter (small U-Nets are launch-bound)
        torch._foreach_lerp_([p for p, _ in same], [q for _, q in same], 1 - decay)
    for p, q in pairs:
        if p.dtype != q.dtype:
            p.lerp_(q.to(p.dtype), 1 - decay)


def frozen_copy(unet: torch.nn.Module) -> UNet2DConditionModel:
    m = copy.deepcopy(_unwrap(unet))
    return m.requires_grad_(False).eval()


# --- LoRA (LCM-LoRA style): PEFT adapters, merged for export and written as a portable adapter ---------------

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
ADAPTER_FILE = "pytorch_lora_weights.safetensors"  # the file diffusers' load_lora_weights(folder) reads


def add_lora(unet: UNet2DConditionModel, rank: int) -> list[torch.nn.Parameter]:
    """Freeze `unet` and add a PEFT LoRA adapter (alpha = rank, B starts at zero: the U-Net computes what it did)
    to its attention and feed-forward projections, in place. Returns the adapter's parameters."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    if not any(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(n.endswith("." + s) for s in LORA_TARGETS)
               for n, m in unet.named_modules()):
        raise ValueError("add_lora: no attention or feed-forward projections found in the U-Net")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LORA_TARGETS)))
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def merge_lora(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """Fold the adapter into the base weights, in place: a plain U-Net again (plain diffusers loads it)."""
    if getattr(unet, "peft_config", None):
        unet.fuse_lora()
        unet.unload_lora()
    return unet


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights alone, PEFT's keys (`<module>.lora_A.weight`, `<module>.lora_B.weight`)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu() for k, v in get_peft_model_state_dict(_unwrap(unet)).items()}


def save_lora_adapter(unet: torch.nn.Module, folder: Any) -> Any:
    """Write the adapter as diffusers' `pipe.load_lora_weights(folder)` reads it: ADAPTER_FILE with PEFT's keys
    under "unet." and the LoRA config in its metadata. It loads onto any U-Net of the architecture it was trained
    on (LCM-LoRA's portability). PEFT's keys as they are: diffusers' convert_state_dict_to_diffusers turns them
    into the old format, whose attention layers load_lora_weights (0.42) then leaves out."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    unet = _unwrap(unet)
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        folder, unet_lora_layers=lora_state_dict(unet), weight_name=ADAPTER_FILE,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    return folder


# --- export --------------------------------------------------------------------------------------------------


def student_scheduler(objective: str, base_scheduler: Any, steps: int, skip: int = 20) -> Any:
    """The scheduler an exported student samples with: DDIM (trailing spacing) for guided and progressive
    students, LCMScheduler on the grid of every `skip` timesteps for consistency, adversarial and dmd students."""
    cfg = {k: v for k, v in dict(base_scheduler.config).items() if not k.startswith("_")}
    if objective in LCM_OBJECTIVES:
        T = cfg.get("num_train_timesteps", 1000)
        return LCMScheduler.from_config(cfg, original_inference_steps=T // skip)
    if objective in ("guided", "progressive"):
        # trailing spacing ignores steps_offset; keeping SD's 1 spares the pipelines' deprecation warning
        return DDIMScheduler.from_config(cfg, timestep_spacing="trailing")
    raise ValueError(f"objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")


def sampling_timesteps(scheduler: Any, steps: int) -> list[int]:
    """The timesteps `scheduler` samples `steps` steps at, highest first (what the exported pipeline runs)."""
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]


def save_steps_student(unet: UNet2DConditionModel, source_dir: str, out_dir: Any, scheduler: Any,
                       meta: StepsMeta) -> Any:
    """A pipeline folder: the step-distilled U-Net (adapters merged) and its scheduler with the source
    pipeline's other components; `distillery.json` records objective, steps and guidance."""
    from pathlib import Path

    from diffusers import DiffusionPipeline

    unet = merge_lora(_unwrap(unet))
    out = Path(out_dir)
    pipe = DiffusionPipeline.from_pretrained(source_dir, unet=unet, scheduler=scheduler, dtype=unet.dtype)
    pipe.save_pretrained(out)
    made = read_meta_file(source_dir).model_copy(
        update={"steps_distillation": meta, "steps": meta.steps, "guidance_scale": meta.guidance_scale})
    (out / META_FILE).write_text(made.to_json())
    return out


# --- rounds: what a stage runs, in order ---------------------------------------------------------------------


@dataclass
class Phase:
    objective: str  # one of OBJECTIVES
    steps: int  # DDIM steps the student samples with after this phase (progressive), or the solver's grid


def plan(objective: str, teacher_steps: int, rounds: int, lcm_steps: int = 4) -> list[Phase]:
    """The phases of a step distillation. guided: stage 1 (w-conditioned, at the teacher's steps), then
    `rounds` progressive halvings; progressive: `rounds` halvings; consistency, adversarial, dmd: one phase
    (sampled in `lcm_steps` steps)."""
    if objective in LCM_OBJECTIVES:
        return [Phase(objective, lcm_steps)]
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
    if teacher_steps % (2**rounds):
        raise ValueError(f"teacher_steps={teacher_steps} cannot be halved {rounds} times")
    halvings = [Phase("progressive", teacher_steps // 2 ** (r + 1)) for r in range(rounds)]
    return ([Phase("guided", teacher_steps)] if objective == "guided" else []) + halvings


class StepDistiller:
    """The state of one step distillation, between optimizer steps: the student (given a w input and LoRA
    adapters as needed), the current teacher (the guiding teacher, then each round's frozen student) and,
    for consistency, the EMA target. The training loop (plain or DeepSpeed) owns the optimizer and calls
    `loss`, then `after_step`; `start_phase(i)` moves to the next round."""

    def __init__(self, objective: str, student: UNet2DConditionModel, teacher: UNet2DConditionModel | None,
                 schedule: Schedule, *, uncond: dict[str, Any] | None, teacher_steps: int = 32, rounds: int = 2,
                 guidance_range: tuple[float, float] = (1.0, 8.0), lcm_skip: int = 20, lcm_steps: int = 4,
                 ema_decay: float = 0.95, lora_rank: int | None = None, huber_c: float | None = 0.001,
                 w_embedding: bool = True):
        self.phases = plan(objective, teacher_steps, rounds, lcm_steps)
        self.objective, self.schedule, self.uncond = objective, schedule, uncond
        self.guidance_range, self.lcm_skip, self.ema_decay = guidance_range, lcm_skip, ema_decay
        self.huber_c = huber_c
        if objective != "progressive":
            if teacher is None or uncond is None:
                raise ValueError(f"{objective}: needs the guiding teacher and the empty prompt's conditioning")
            if teacher.config.cross_attention_dim != student.config.cross_attention_dim:
                raise ValueError(
                    f"teacher cross_attention_dim {teacher.config.cross_attention_dim} != student's "
                    f"{student.config.cross_attention_dim}: the student must come from this teacher")
        # without a w-embedding (w_embedding=False) the student learns the teacher's guidance over guidance_range
        # in its weights and samples at guidance 1, as LCM-LoRA: its change is then the adapter alone
        new_w = objective in ("guided", "consistency") and w_embedding and w_dim(student) is None
        if new_w:
            student = add_guidance_embedding(student)
        # w is drawn when the student takes it or the guiding teacher's CFG needs it
        self.draws_w = w_dim(student) is not None or objective in ("guided", "consistency")
        self.lora = lora_rank is not None
        # the adapter is the whole change (it loads onto another U-Net) unless a new w-embedding trains beside it
        self.portable_adapter = self.lora and not new_w
        if self.lora:
            self.params = add_lora(student, lora_rank)
            if new_w:  # zero at first, so it must train with the adapter
                self.params += [p.requires_grad_(True) for p in student.time_embedding.cond_proj.parameters()]
        else:
            self.params = [p for p in student.requires_grad_(True).parameters()]
        self.student: torch.nn.Module = student.train()  # the training loop may swap in its engine
        self.guide = teacher.requires_grad_(False).eval() if teacher is not None else None
        self.teacher: torch.nn.Module | None = None
        self.target: torch.nn.Module | None = None
        self.critic: torch.nn.Module | None = None  # adversarial, dmd: models/critics.py's CriticDistiller
        self.phase = -1
        # the empty prompt's conditioning on each device, copied once: a host-to-device copy per step would stall
        # the step and keep it from being captured as a CUDA graph
        self._uncond_on: dict[str, dict[str, Any] | None] = {}

    def start_phase(self, i: int) -> Phase:
        """Enter phase i: progressive rounds are taught by a frozen copy of the student as it is now."""
        self.phase, ph = i, self.phases[i]
        if ph.objective == "progressive":
            self.teacher = frozen_copy(self.student)
        elif ph.objective == "consistency":
            self.teacher, self.target = self.guide, frozen_copy(self.student)
        else:
            self.teacher = self.guide
        return ph

    def loss(self, latents: torch.Tensor, cond: dict[str, Any],
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        ph = self.phases[self.phase]
        w = sample_w(latents.shape[0], self.guidance_range, latents.device, generator) if self.draws_w else None
        uncond = self.uncond_on(latents.device)
        if ph.objective == "guided":
            return guided_loss(self.student, self.teacher, self.schedule, latents, cond, uncond, w, generator)
        if ph.objective == "progressive":
            return progressive_loss(self.student, self.teacher, self.schedule, latents, cond, ph.steps, w,
                                    None, generator)
        return consistency_loss(self.student, self.target, self.teacher, self.schedule, latents, cond, uncond, w,
                                self.lcm_skip, self.huber_c, generator)

    def uncond_on(self, device: Any) -> dict[str, Any] | None:
        """The empty prompt's conditioning on `device`, copied there once."""
        key = str(device)
        if key not in self._uncond_on:
            self._uncond_on[key] = (None if self.uncond is None
                                    else map_tensors(self.uncond, lambda v: v.to(device)))
        return self._uncond_on[key]

    def after_step(self) -> None:
        if self.target is not None:
            ema_update(self.target, self.student, self.ema_decay)

    @property
    def final_steps(self) -> int:
        return self.phases[-1].steps

    def export_student(self) -> UNet2DConditionModel:
        """The student to save: the consistency student itself (its EMA target is the slow copy LCM keeps
        for the loss), adapters merged into a copy so training could go on."""
        return merge_lora(frozen_copy(self.student)) if self.lora else _unwrap(self.student)
