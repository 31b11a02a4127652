"""Few-step students trained against a critic: adversarial (ADD/LADD) and distribution-matching (DMD2) distillation
(pure PyTorch + diffusers, no Ray).

Both objectives train the student as a 1-8 step sampler on LCMScheduler's timesteps, the scheduler it is exported
with: the student's output is the consistency-parametrized clean latent x̂0 = c_skip(t)·z_t + c_out(t)·x0(z_t, t),
and one sampling step re-noises x̂0 to the next timestep with fresh noise, as LCMScheduler.step does.

  adversarial  LADD (Sauer et al., "Fast High-Resolution Image Synthesis with Latent Adversarial Diffusion
               Distillation"): the discriminator is the frozen teacher U-Net's features (its mid block and each up
               block) at a noised sample, with one small trainable head per feature map; hinge or non-saturating
               loss, plus ADD's distillation term (the student's x̂0 against the teacher's guided denoising of it,
               re-noised).
  dmd          DMD2 (Yin et al., "Improved Distribution Matching Distillation for Fast Image Synthesis"): the
               student's samples move along the difference of two scores: the teacher with CFG (real) and a second
               U-Net trained on the student's samples by denoising (fake), updated several times per student step
               (the two time-scale rule); an optional GAN head on the fake score's mid block.

Multi-step students learn by backward simulation (DMD2 §4.5): each sample starts from pure noise, takes j of the
student's own sampling steps without gradient (j uniform in 0..steps-1), and the student is trained at the step it
reached, so it sees the inputs it will see when sampling.

The critic (heads, or fake score) is a module of its own with its own optimizer: the training shell steps it and
the student in turn. The student's loss reads the critic through `torch.func.functional_call` with detached
parameters, so no gradient of the student's loss reaches the critic.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from models.kd import Taps, unwrapped
from models.steps import Schedule, StepDistiller, cat_trees, lcm_boundary, noise_like, predict

CRITIC_OBJECTIVES = ("adversarial", "dmd")
GAN_LOSSES = ("hinge", "non_saturating")


# --- the student as a few-step sampler ------------------------------------------------------------------------


def student_x0(student: torch.nn.Module, schedule: Schedule, z: torch.Tensor, t: torch.Tensor,
               cond: dict[str, Any]) -> torch.Tensor:
    """The clean latent one LCMScheduler step takes from (z_t, t): c_skip·z + c_out·x0(output)."""
    x0, _ = schedule.x0_eps(predict(student, z, t, cond), z, t)
    c_skip, c_out = lcm_boundary(t, z)
    return c_skip * z.float() + c_out * x0


def simulate(student: torch.nn.Module, schedule: Schedule, timesteps: tuple[int, ...], like: torch.Tensor,
             cond: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
    """Backward simulation: per sample, j ~ U{0..k-1} sampling steps from pure noise without gradient, then the
    student's x̂0 at the j-th timestep with gradient (under the caller's grad mode). Same shape as `like`."""
    n, k = like.shape[0], len(timesteps)
    grid = schedule.on(like.device, tuple(timesteps))  # (k,) highest first
    j = torch.randint(0, k, (n,), device=like.device, generator=generator)
    z = noise_like(like, generator)
    z_j = z
    if k > 1:
        with torch.no_grad():
            for i in range(k - 1):
                t = grid[i].expand(n)
                z = schedule.add_noise(student_x0(student, schedule, z, t, cond), noise_like(like, generator),
                                       grid[i + 1].expand(n))
                z_j = torch.where((j == i + 1).view(-1, *([1] * (like.dim() - 1))), z, z_j)
    return student_x0(student, schedule, z_j, grid[j], cond)


def _timesteps(n: int, schedule: Schedule, device: Any, generator: torch.Generator | None,
               lo: float = 0.02, hi: float = 0.98) -> torch.Tensor:
    """t uniform in [lo·T, hi·T): DMD2's range, away from the ends where the two scores carry no signal."""
    T = schedule.num_train_timesteps
    return torch.randint(int(lo * T), int(hi * T), (n,), device=device, generator=generator)


# --- GAN losses -----------------------------------------------------------------------------------------------


def critic_gan_loss(real: torch.Tensor, fake: torch.Tensor, kind: str) -> torch.Tensor:
    """The discriminator's loss on its logits for real and for student samples."""
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def student_gan_loss(fake: torch.Tensor, kind: str) -> torch.Tensor:
    """The student's adversarial loss on the discriminator's logits for its samples."""
    return -fake.mean() if kind == "hinge" else F.softplus(-fake).mean()


def _frozen_call(module: torch.nn.Module, *args: Any) -> Any:
    """module(*args) with its parameters detached: gradients reach the inputs, never the module."""
    m = unwrapped(module)
    params = {k: v.detach() for k, v in m.named_parameters()}
    return functional_call(m, params, args)


# --- critics --------------------------------------------------------------------------------------------------


class FeatureHead(torch.nn.Module):
    """Per-location logits from one feature map (B, C, h, w) -> (B, h·w)."""

    def __init__(self, channels: int, width: int = 128):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(channels, width, 3, padding=1), torch.nn.GroupNorm(32, width), torch.nn.SiLU(),
            torch.nn.Conv2d(width, 1, 1))

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.net(feature.to(self.net[0].weight.dtype)).flatten(1)


def feature_paths(unet: torch.nn.Module) -> tuple[list[str], list[int]]:
    """The U-Net's mid block and up blocks, and their output channels: where the discriminator reads it."""
    u = unwrapped(unet)
    out = list(u.config.block_out_channels)
    paths, channels = [], []
    if getattr(u, "mid_block", None) is not None:
        paths.append("mid_block")
        channels.append(out[-1])
    for i in range(len(u.up_blocks)):
        paths.append(f"up_blocks.{i}")
        channels.append(out[::-1][i])
    return paths, channels


class FeatureCritic(torch.nn.Module):
    """LADD's discriminator heads: one FeatureHead per teacher feature map; the frozen teacher is not part of it
    (not trained, not saved). forward(features) -> (B, Σ h·w) logits."""

    def __init__(self, channels: list[int]):
        super().__init__()
        self.heads = torch.nn.ModuleList(FeatureHead(c) for c in channels)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([h(f) for h, f in zip(self.heads, features)], dim=1)


class FakeScore(torch.nn.Module):
    """DMD's fake score: a trainable copy of the teacher U-Net (fp32), with an optional GAN head on its mid block.
    forward(z, t, cond) -> (output, logits or None)."""

    def __init__(self, teacher: torch.nn.Module, gan: bool):
        super().__init__()
        self.unet = copy.deepcopy(unwrapped(teacher)).float().requires_grad_(True).train()
        if gan and self.unet.mid_block is None:
            raise ValueError("dmd with a GAN term: the teacher U-Net has no mid block to put the head on")
        self.head = FeatureHead(self.unet.config.block_out_channels[-1]) if gan else None

    def forward(self, z: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        if self.head is None:
            return predict(self.unet, z, t, cond), None
        with Taps(self.unet, ["mid_block"]) as taps:
            out = predict(self.unet, z, t, cond)
            return out, self.head(taps.features["mid_block"])


# --- the student's losses -------------------------------------------------------------------------------------


@torch.no_grad()
def dmd_gradient(x0: torch.Tensor, teacher: torch.nn.Module, fake: torch.nn.Module, schedule: Schedule,
                 cond: dict[str, Any], uncond: dict[str, Any], w: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """DMD2's distribution matching gradient on the student's x̂0: (fake x0 - real x0) / mean|x̂0 - real x0| at x̂0
    noised to a random t, the real x0 the teacher's CFG at w, the fake the fake score's (DMD2's normalizer)."""
    x = x0.detach().float()
    t = _timesteps(x.shape[0], schedule, x.device, generator)
    z = schedule.add_noise(x, noise_like(x, generator), t)
    real, _ = schedule.x0_eps(predict(teacher, z, t, cond, w, uncond), z, t)
    fake_x0, _ = schedule.x0_eps(predict(fake, z, t, cond), z, t)
    dims = tuple(range(1, x.dim()))
    return torch.nan_to_num((fake_x0 - real) / (x - real).abs().mean(dim=dims, keepdim=True))


def dmd_loss(x0: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The surrogate whose gradient on x̂0 is `grad` / numel: 0.5·MSE(x̂0, sg(x̂0 - grad))."""
    return 0.5 * F.mse_loss(x0.float(), (x0.detach().float() - grad).detach())


def fake_score_loss(out: torch.Tensor, x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor,
                    schedule: Schedule) -> torch.Tensor:
    """Denoising loss of the fake score on the student's samples: its output against the one that predicts x0."""
    return F.mse_loss(out, schedule.output_from(x0, z, t))


def teacher_features(teacher: torch.nn.Module, taps: Taps, z: torch.Tensor, t: torch.Tensor,
                     cond: dict[str, Any]) -> list[torch.Tensor]:
    """The teacher's feature maps at (z_t, t) on the taps' paths, in their order (grad to z as the caller's)."""
    with taps:
        predict(teacher, z, t, cond)
        return [taps.features[p] for p in taps.paths]


# --- the distiller --------------------------------------------------------------------------------------------


class CriticDistiller(StepDistiller):
    """A StepDistiller whose student is trained against a critic (adversarial: heads on the frozen teacher's
    features; dmd: a fake score U-Net). The training loop steps `critic` with `critic_loss` (its own optimizer,
    `critic_updates` times per student step) and the student with `loss`; both return their parts with "loss"."""

    def __init__(self, objective: str, student: torch.nn.Module, teacher: torch.nn.Module, schedule: Schedule, *,
                 uncond: dict[str, Any], sample_timesteps: list[int], guidance_scale: float = 7.5,
                 gan_loss: str = "hinge", gan_weight: float | None = None, distill_weight: float = 2.5,
                 lora_rank: int | None = None):
        if objective not in CRITIC_OBJECTIVES:
            raise ValueError(f"objective {objective!r}: choose {' or '.join(CRITIC_OBJECTIVES)}")
        if gan_loss not in GAN_LOSSES:
            raise ValueError(f"gan_loss {gan_loss!r}: choose {' or '.join(GAN_LOSSES)}")
        super().__init__(objective, student, teacher, schedule, uncond=uncond, lcm_steps=len(sample_timesteps),
                         lora_rank=lora_rank, w_embedding=False)
        self.sample_timesteps = tuple(int(t) for t in sample_timesteps)
        self.guidance_scale, self.gan_loss = guidance_scale, gan_loss
        self.gan_weight = (1.0 if objective == "adversarial" else 0.0) if gan_weight is None else gan_weight
        self.distill_weight = distill_weight if objective == "adversarial" else 0.0
        if objective == "adversarial" and self.gan_weight == 0 and self.distill_weight == 0:
            raise ValueError("adversarial with gan_weight 0 and distill_weight 0 has nothing to train")
        if objective == "dmd":
            self.critic: torch.nn.Module = FakeScore(teacher, gan=self.gan_weight > 0)
        else:
            paths, channels = feature_paths(teacher)
            self.taps = Taps(self.guide, paths)
            self.critic = FeatureCritic(channels)
        self.critic.to(next(teacher.parameters()).device)

    def _w(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0],), self.guidance_scale, device=x.device)

    def loss(self, latents: torch.Tensor, cond: dict[str, Any],
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        x0 = simulate(self.student, self.schedule, self.sample_timesteps, latents, cond, generator)
        uncond = self.uncond_on(latents.device)
        parts: dict[str, torch.Tensor] = {}
        if self.objective == "dmd":
            grad = dmd_gradient(x0, self.teacher, unwrapped(self.critic).unet, self.schedule, cond, uncond,
                                self._w(x0), generator)
            parts["dmd"] = dmd_loss(x0, grad)
            if self.gan_weight:
                t = _timesteps(x0.shape[0], self.schedule, x0.device, generator)
                z = self.schedule.add_noise(x0, noise_like(x0, generator), t)
                parts["gan"] = student_gan_loss(_frozen_call(self.critic, z, t, cond)[1], self.gan_loss)
            parts["loss"] = parts["dmd"] + self.gan_weight * parts.get("gan", 0.0)
            return parts
        t = _timesteps(x0.shape[0], self.schedule, x0.device, generator)
        z = self.schedule.add_noise(x0, noise_like(x0, generator), t)
        total = 0.0
        if self.gan_weight:
            logits = _frozen_call(self.critic, teacher_features(self.teacher, self.taps, z, t, cond))
            parts["adversarial"] = student_gan_loss(logits, self.gan_loss)
            total = total + self.gan_weight * parts["adversarial"]
        if self.distill_weight:  # ADD: the teacher's guided denoising of the re-noised x̂0 is the target
            t_d = _timesteps(x0.shape[0], self.schedule, x0.device, generator)
            with torch.no_grad():
                z_d = self.schedule.add_noise(x0.detach(), noise_like(x0, generator), t_d)
                target, _ = self.schedule.x0_eps(predict(self.teacher, z_d, t_d, cond, self._w(x0), uncond), z_d, t_d)
            parts["distill"] = F.mse_loss(x0, target)
            total = total + self.distill_weight * parts["distill"]
        parts["loss"] = total
        return parts

    def critic_loss(self, latents: torch.Tensor, cond: dict[str, Any],
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One critic update on fresh student samples (no gradient to the student) and, for a GAN term, the
        batch's real latents. Real and student samples go through the critic in one call (one DDP forward)."""
        with torch.no_grad():
            fake = simulate(self.student, self.schedule, self.sample_timesteps, latents, cond, generator)
        real = latents.float()
        n = fake.shape[0]
        t = _timesteps(n, self.schedule, fake.device, generator)
        z_fake = self.schedule.add_noise(fake, noise_like(fake, generator), t)
        if self.objective == "dmd":
            if not self.gan_weight:
                out, _ = self.critic(z_fake, t, cond)
                loss = fake_score_loss(out, fake, z_fake, t, self.schedule)
                return {"loss": loss, "fake_score": loss}
            z_real = self.schedule.add_noise(real, noise_like(real, generator), t)
            out, logits = self.critic(torch.cat([z_fake, z_real]), torch.cat([t, t]), cat_trees(cond, cond))
            score = fake_score_loss(out[:n], fake, z_fake, t, self.schedule)
            gan = critic_gan_loss(logits[n:], logits[:n], self.gan_loss)
            return {"loss": score + self.gan_weight * gan, "fake_score": score, "critic_gan": gan}
        t_r = _timesteps(n, self.schedule, fake.device, generator)
        z_real = self.schedule.add_noise(real, noise_like(real, generator), t_r)
        with torch.no_grad():
            feats = teacher_features(self.teacher, self.taps, torch.cat([z_fake, z_real]), torch.cat([t, t_r]),
                                     cat_trees(cond, cond))
        logits = self.critic(feats)
        loss = critic_gan_loss(logits[n:], logits[:n], self.gan_loss)
        return {"loss": loss, "critic_real": logits[n:].mean().detach(), "critic_fake": logits[:n].mean().detach()}
