"""Adversarial (LADD/ADD) and distribution-matching (DMD2) step distillation on tiny models (CPU): the losses learn,
only the network each loss is for changes, the training sampler is the exported LCMScheduler pipeline's, and the
Ray stage trains, checkpoints, resumes both networks and exports a student plain diffusers samples."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline

from models.critics import (
    CriticDistiller,
    FakeScore,
    critic_gan_loss,
    dmd_gradient,
    dmd_loss,
    student_gan_loss,
    student_x0,
)
from models.steps import Schedule, sampling_timesteps, save_steps_student, student_scheduler
from models.student import StepsMeta, build_student, preset_spec
from models.teacher import encode_prompts, load_teacher

pytestmark = pytest.mark.usefixtures("one_thread")


def _distiller(sd1, uncond, objective: str, **kw) -> CriticDistiller:
    timesteps = sampling_timesteps(student_scheduler(objective, sd1.scheduler, 4), 4)
    d = CriticDistiller(objective, build_student(sd1.unet, preset_spec("bk-small", sd1.unet.config)), sd1.unet,
                        Schedule.from_scheduler(sd1.scheduler), uncond=uncond, sample_timesteps=timesteps,
                        guidance_scale=5.0, **kw)
    d.start_phase(0)
    return d


def _fit(params, loss_fn, n: int, lr: float) -> tuple[float, float]:
    """loss_fn(generator)["loss"] on one fixed draw before and after n Adam steps on it."""
    opt = torch.optim.Adam(params, lr=lr)
    first = None
    for _ in range(n):
        loss = loss_fn(torch.Generator().manual_seed(123))["loss"]
        first = loss.item() if first is None else first
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return first, loss_fn(torch.Generator().manual_seed(123))["loss"].item()


def test_gan_losses_sign():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert critic_gan_loss(real, fake, "hinge").item() == pytest.approx(0.25 + 0.75)
    assert critic_gan_loss(real, fake, "non_saturating").item() < critic_gan_loss(fake, real, "non_saturating").item()
    # the student gains by raising the critic's logits on its samples
    assert student_gan_loss(real, "hinge") < student_gan_loss(fake, "hinge")
    assert student_gan_loss(real, "non_saturating") < student_gan_loss(fake, "non_saturating")


@pytest.mark.parametrize("gan_loss", ["hinge", "non_saturating"])
def test_adversarial_critic_and_student_losses_go_down(sd1, sd1_batch, gan_loss):
    latents, cond, uncond = sd1_batch
    d = _distiller(sd1, uncond, "adversarial", gan_loss=gan_loss, distill_weight=0.0)
    before, after = _fit(d.critic.parameters(), lambda g: d.critic_loss(latents, cond, g), 10, 2e-3)
    assert after < 0.7 * before, (before, after)
    # against that critic, frozen, the student's adversarial loss goes down (no distillation term here)
    before, after = _fit(d.params, lambda g: d.loss(latents, cond, g), 10, 2e-3)
    assert after < before - 0.1, (before, after)


def test_adversarial_distillation_term_goes_down(sd1, sd1_batch):
    latents, cond, uncond = sd1_batch
    d = _distiller(sd1, uncond, "adversarial", gan_weight=0.0)
    before, after = _fit(d.params, lambda g: d.loss(latents, cond, g), 10, 1e-2)
    # the random tiny teacher's x0 at high noise is far (rms ~8) from the student's: a slow but steady descent
    assert after < 0.97 * before, (before, after)


def test_dmd_fake_score_loss_goes_down_and_gan_term(sd1, sd1_batch):
    latents, cond, uncond = sd1_batch
    d = _distiller(sd1, uncond, "dmd", gan_weight=0.1)
    parts = d.critic_loss(latents, cond, torch.Generator().manual_seed(0))
    assert {"fake_score", "critic_gan"} <= set(parts)
    before, after = _fit(d.critic.parameters(), lambda g: d.critic_loss(latents, cond, g), 10, 1e-3)
    assert after < 0.8 * before, (before, after)
    assert "gan" in d.loss(latents, cond, torch.Generator().manual_seed(0))


def test_dmd_gradient_is_the_score_difference_and_the_student_follows_it(sd1, sd1_batch):
    latents, cond, uncond = sd1_batch
    d = _distiller(sd1, uncond, "dmd")
    x0 = latents.clone().requires_grad_(True)
    w = torch.full((4,), 5.0)
    fake = d.critic.unet
    grad = dmd_gradient(x0, sd1.unet, fake, d.schedule, cond, uncond, w, torch.Generator().manual_seed(1))
    assert grad.abs().mean() > 1e-3  # the guided teacher and the unguided fake score disagree
    dmd_loss(x0, grad).backward()
    assert torch.allclose(x0.grad, grad / grad.numel(), atol=1e-7)  # the surrogate's gradient is DMD's
    # a fake score that is the real score gives no gradient
    same = dmd_gradient(latents, sd1.unet, fake, d.schedule, cond, uncond, torch.ones(4),
                        torch.Generator().manual_seed(1))
    assert same.abs().max() < 1e-5
    # one student step moves its samples against the gradient (down the KL between the two distributions)
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    from models.critics import simulate

    x_before = simulate(d.student, d.schedule, d.sample_timesteps, latents, cond, g())
    grad = dmd_gradient(x_before, sd1.unet, fake, d.schedule, cond, uncond, w, torch.Generator().manual_seed(2))
    opt = torch.optim.SGD(d.params, lr=1.0)
    dmd_loss(x_before, grad).backward()
    opt.step()
    with torch.no_grad():
        x_after = simulate(d.student, d.schedule, d.sample_timesteps, latents, cond, g())
    assert ((x_after - x_before.detach()) * grad).sum() < 0


@pytest.mark.parametrize("objective", ["adversarial", "dmd"])
def test_each_loss_trains_only_its_network(sd1, sd1_batch, objective):
    latents, cond, uncond = sd1_batch
    d = _distiller(sd1, uncond, objective, gan_weight=0.1 if objective == "dmd" else None)
    teacher0 = {k: v.clone() for k, v in sd1.unet.state_dict().items()}
    student0 = {k: v.clone() for k, v in d.student.state_dict().items()}
    critic0 = {k: v.clone() for k, v in d.critic.state_dict().items()}
    d.loss(latents, cond, torch.Generator().manual_seed(0))["loss"].backward()
    assert all(p.grad is None for p in d.critic.parameters())  # the student's loss never reaches the critic
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.params)
    for p in d.params:
        p.grad = None
    opt = torch.optim.Adam(d.critic.parameters(), lr=1e-3)
    d.critic_loss(latents, cond, torch.Generator().manual_seed(0))["loss"].backward()
    assert all(p.grad is None for p in d.params)  # nor the critic's the student
    opt.step()
    assert all(p.grad is None for p in sd1.unet.parameters())
    assert all(torch.equal(v, sd1.unet.state_dict()[k]) for k, v in teacher0.items())
    assert all(torch.equal(v, d.student.state_dict()[k]) for k, v in student0.items())
    changed = [k for k, v in d.critic.state_dict().items() if not torch.equal(v, critic0[k])]
    assert changed
    if objective == "dmd":  # the fake score starts as the teacher and trains; the teacher stays
        assert any(k.startswith("unet.") for k in changed)
        assert isinstance(d.critic, FakeScore)


def test_training_sampler_is_the_exported_lcm_pipeline(sd1, tiny_sd1_dir, tmp_path):
    """The student trains on the sampling chain the exported pipeline runs: x̂0 = c_skip·z + c_out·x0 at each of
    LCMScheduler's timesteps, re-noised to the next with fresh noise."""
    student = build_student(sd1.unet, preset_spec("bk-small", sd1.unet.config))
    scheduler = student_scheduler("dmd", sd1.scheduler, 4)
    meta = StepsMeta(objective="dmd", steps=4, guidance_scale=1.0)
    out = save_steps_student(student, str(tiny_sd1_dir), tmp_path / "s", scheduler, meta)
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe.scheduler, LCMScheduler)
    got = pipe("a red circle", num_inference_steps=4, guidance_scale=1.0, output_type="latent", height=32, width=32,
               generator=torch.Generator().manual_seed(5)).images
    timesteps = sampling_timesteps(student_scheduler("dmd", sd1.scheduler, 4), 4)
    schedule = Schedule.from_scheduler(sd1.scheduler)
    cond = {"encoder_hidden_states": encode_prompts(sd1, ["a red circle"])["prompt_embeds"]}
    g = torch.Generator().manual_seed(5)
    side = 32 // pipe.vae_scale_factor
    z = torch.randn((1, 4, side, side), generator=g) * pipe.scheduler.init_noise_sigma
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            x0 = student_x0(student, schedule, z, torch.tensor([t]), cond)
            if i + 1 < len(timesteps):
                z = schedule.add_noise(x0, torch.randn(z.shape, generator=g), torch.tensor([timesteps[i + 1]]))
    assert torch.allclose(got, x0, atol=1e-4)


# --- the Ray stage: DMD through DeepSpeed ZeRO-2, stopped and resumed; adversarial with a LoRA adapter --------


def _stage_config(tmp_path, objective: str, steps_per_round: int, **steps) -> dict:
    return {
        "name": "c", "work_dir": str(tmp_path), "teacher": {"uri": "builtin:tiny-sd1"},
        "distill": {"num_workers": 1, "resources_per_worker": {"CPU": 1}, "zero_stage": 2, "log_every": 1,
                    "checkpoint_every": 2, "keep_checkpoints": 3},
        "steps": {"objective": objective, "student": "builtin:tiny-sd1", "steps_per_round": steps_per_round,
                  "batch_size": 4, "lr": 1e-3, "lcm_steps": 2, "guidance_scale": 3.0, **steps}}


def _engine_steps(folder) -> int:
    """The DeepSpeed engine's optimizer steps recorded in a checkpoint folder (its model-states file)."""
    states = torch.load(folder / "ds" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return int(states["global_steps"])


def test_steps_stage_dmd_resumes_student_and_fake_score(tmp_path, ray_local, mlflow_server):
    from mlflow.tracking import MlflowClient
    from test_steps import count_unet_calls, write_cache

    from pipelines import fewstep
    from pipelines.config import parse_config

    write_cache(str(tmp_path / "cache"), "builtin:tiny-sd1")
    # a run stopped after its checkpoint of step 2 (a first run that ends there), then the 4-step job resumes
    # from it mid-phase: the student's and the fake score's weights and optimizers come back
    first = fewstep.run(parse_config(_stage_config(tmp_path, "dmd", 2, critic_updates=2, gan_weight=0.1)))
    ckpts = tmp_path / "train" / "c-steps"
    assert _engine_steps(ckpts / "checkpoint_000002" / "critic") == 4
    cfg = parse_config(_stage_config(tmp_path, "dmd", 4, critic_updates=2, gan_weight=0.1))
    result = fewstep.run(cfg)
    assert result["mlflow_run_id"] == first["mlflow_run_id"] and result["scheduler"] == "LCMScheduler"
    # resumed, not restarted: the engines count on from the checkpoint (2 student, 4 critic steps) to 4 and 8
    last = ckpts / "checkpoint_000004"
    assert _engine_steps(last) == 4 and _engine_steps(last / "critic") == 8
    client = MlflowClient(mlflow_server.url)
    for key in ("loss", "dmd", "gan", "critic_loss", "fake_score", "critic_gan"):
        steps = [m.step for m in client.get_metric_history(result["mlflow_run_id"], key)]
        assert sorted(steps) == [1, 2, 3, 4], (key, steps)  # each step once: steps 1-2 were not trained again

    out = tmp_path / "student-steps"
    meta = json.loads((out / "distillery.json").read_text())
    assert meta["steps"] == 2 and meta["guidance_scale"] == 1.0 and meta["steps_distillation"]["objective"] == "dmd"
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe.scheduler, LCMScheduler)
    calls = count_unet_calls(pipe)
    img = pipe("a red square", num_inference_steps=2, guidance_scale=1.0, output_type="np", height=32, width=32,
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 32, 32, 3) and calls == [1, 1]  # no CFG: one U-Net pass per step


def test_steps_stage_adversarial_with_lora_adapter(tmp_path, ray_local, mlflow_server):
    from diffusers import UNet2DConditionModel
    from mlflow.tracking import MlflowClient
    from test_steps import sample_latents, write_cache

    from models.teacher import resolve_model_dir
    from pipelines import fewstep
    from pipelines.config import parse_config

    write_cache(str(tmp_path / "cache"), "builtin:tiny-sd1")
    result = fewstep.run(parse_config(_stage_config(tmp_path, "adversarial", 2, lora_rank=4, lr=1e-2,
                                                    gan_loss="non_saturating")))
    client = MlflowClient(mlflow_server.url)
    for key in ("adversarial", "distill", "critic_loss", "critic_real", "critic_fake"):
        assert len(client.get_metric_history(result["mlflow_run_id"], key)) == 2, key
    out = tmp_path / "student-steps"
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.unet.config.time_cond_proj_dim is None
    student = sample_latents(pipe)
    # the adapter alone on the model it came from gives the exported student's samples
    sched = LCMScheduler.from_pretrained(out, subfolder="scheduler")
    source = resolve_model_dir("builtin:tiny-sd1")
    base = StableDiffusionPipeline.from_pretrained(
        source, unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet"), scheduler=sched)
    plain = sample_latents(base)
    base.load_lora_weights(out / "lora")
    adapted = sample_latents(base)
    assert (adapted - plain).abs().max() > 1e-3 and torch.allclose(adapted, student, atol=1e-4)


def test_config_critic_fields(tmp_path):
    from pipelines.config import ConfigError, parse_config

    def steps(**kw):
        return parse_config(_stage_config(tmp_path, kw.pop("objective"), 2, **kw)).steps

    assert steps(objective="dmd").critic_steps == 5 and steps(objective="adversarial").critic_steps == 1
    assert steps(objective="dmd", critic_updates=3).critic_steps == 3
    assert steps(objective="consistency").critic_steps == 0
    assert not steps(objective="dmd").adds_w_embedding  # sampled at guidance 1, no w input
    with pytest.raises(ConfigError, match="gan_weight 0 and distill_weight 0"):
        steps(objective="adversarial", gan_weight=0, distill_weight=0)
    with pytest.raises(ConfigError, match="gan_loss"):
        steps(objective="adversarial", gan_loss="wasserstein")


@pytest.mark.parametrize("objective", ["adversarial", "dmd"])
def test_sdxl_conditioning_through_both_losses(tiny_sdxl_dir, objective):
    """SDXL's pooled embedding and time ids ride along with the text embeddings through the student's sampling, the
    teacher's CFG, the critic's batch of real and student samples (concatenated) and its features."""
    from models.teacher import unet_conditioning

    sdxl = load_teacher(str(tiny_sdxl_dir), dtype="float32")

    def cond_of(prompts):
        emb = encode_prompts(sdxl, prompts)
        emb["time_ids"] = torch.tensor([[64, 64, 0, 0, 64, 64]] * len(prompts), dtype=torch.float32)
        return unet_conditioning(emb, "sdxl")

    cond, uncond = cond_of(["a red circle", "a blue square"]), cond_of([""])
    timesteps = sampling_timesteps(student_scheduler(objective, sdxl.scheduler, 2), 2)
    d = CriticDistiller(objective, build_student(sdxl.unet, preset_spec("vega", sdxl.unet.config)), sdxl.unet,
                        Schedule.from_scheduler(sdxl.scheduler), uncond=uncond, sample_timesteps=timesteps,
                        guidance_scale=5.0, gan_weight=0.1)
    d.start_phase(0)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for parts in (d.loss(latents, cond, torch.Generator().manual_seed(1)),
                  d.critic_loss(latents, cond, torch.Generator().manual_seed(1))):
        assert all(torch.isfinite(torch.as_tensor(v)).all() for v in parts.values()), parts
        parts["loss"].backward()
    assert any(p.grad is not None for p in d.params) and any(p.grad is not None for p in d.critic.parameters())
