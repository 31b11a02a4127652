"""Step distillation on tiny models (CPU): the objectives learn, the w input works in plain diffusers
pipelines without CFG, progressive rounds halve the steps, exported students load and generate."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from models.steps import (
    Schedule,
    StepDistiller,
    add_guidance_embedding,
    add_lora,
    consistency_loss,
    frozen_copy,
    guidance_embedding,
    guided_loss,
    merge_lora,
    plan,
    predict,
    progressive_loss,
    save_steps_student,
    student_scheduler,
    trailing_timesteps,
)
from models.student import StepsMeta, build_student, preset_spec
from models.teacher import encode_prompts, load_teacher

pytestmark = pytest.mark.usefixtures("one_thread")


def _student(sd1):
    return build_student(sd1.unet, preset_spec("bk-small", sd1.unet.config))


def _train(distiller: StepDistiller, latents, cond, n: int, lr: float = 2e-3, loss_fn=None) -> tuple[float, float]:
    """Loss on a fixed draw (noise, t, w) before and after n optimizer steps on that same draw."""
    opt = torch.optim.Adam(distiller.params, lr=lr)
    loss_fn = loss_fn or (lambda g: distiller.loss(latents, cond, g))
    first = last = None
    for i in range(n + 1):
        loss = loss_fn(torch.Generator().manual_seed(123))["loss"]
        if i == 0:
            first = loss.item()
        last = loss.item()
        if i == n:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        distiller.after_step()
    return first, last


def test_guidance_embedding_matches_diffusers_and_student_starts_equal(sd1, sd1_batch):
    w = torch.tensor([1.0, 3.5, 7.5])
    ref = StableDiffusionPipeline.get_guidance_scale_embedding(None, w - 1, embedding_dim=256)
    assert torch.allclose(guidance_embedding(w, 256), ref, atol=1e-5)

    latents, cond, _ = sd1_batch
    unet = _student(sd1)
    with_w = add_guidance_embedding(unet)
    assert with_w.config.time_cond_proj_dim == 256 and unet.config.get("time_cond_proj_dim") is None
    t = torch.tensor([10, 300, 600, 999])
    with torch.no_grad():  # the new projection is zero: the w-student starts as its parent, for any w
        a = predict(unet, latents, t, cond)
        b = predict(with_w, latents, t, cond, w=torch.tensor([1.0, 2.0, 5.0, 8.0]))
    assert torch.equal(a, b)


def test_trailing_grid_matches_ddim_and_halves():
    s = DDIMScheduler(timestep_spacing="trailing")
    for n in (1, 2, 4, 8, 32):
        s.set_timesteps(n)
        assert s.timesteps.tolist() == trailing_timesteps(n)
    assert set(trailing_timesteps(4)) <= set(trailing_timesteps(8))
    assert [p.steps for p in plan("guided", 32, 3)] == [32, 16, 8, 4]
    assert [p.steps for p in plan("progressive", 8, 2)] == [4, 2]
    with pytest.raises(ValueError, match="halved"):
        plan("progressive", 12, 3)


@pytest.mark.parametrize("objective", ["guided", "progressive", "consistency"])
def test_each_objective_loss_goes_down(objective, sd1, sd1_batch):
    latents, cond, uncond = sd1_batch
    sched = Schedule.from_scheduler(sd1.scheduler)
    d = StepDistiller(objective, _student(sd1), sd1.unet, sched, uncond=uncond, teacher_steps=8, rounds=1,
                      lcm_skip=100)
    d.start_phase(0)
    loss_fn = None
    if objective == "progressive":  # 2 steps of the CFG-guided teacher (a frozen self-copy already agrees)
        w = torch.tensor([2.0, 4.0, 6.0, 8.0])
        loss_fn = lambda g: progressive_loss(d.student, sd1.unet, sched, latents, cond, 4, w, uncond, g)
    before, after = _train(d, latents, cond, 10, loss_fn=loss_fn)
    assert after < 0.7 * before, (objective, before, after)


def test_consistency_loss_with_lora_trains_only_the_adapter(sd1, sd1_batch):
    latents, cond, uncond = sd1_batch
    d = StepDistiller("consistency", _student(sd1), sd1.unet, Schedule.from_scheduler(sd1.scheduler),
                      uncond=uncond, lcm_skip=100, lora_rank=4)
    d.start_phase(0)
    n_train = sum(p.numel() for p in d.params)
    n_all = sum(p.numel() for p in d.student.parameters())
    assert 0 < n_train < 0.5 * n_all
    # a new w-embedding trains beside the adapter, so the adapter alone is not the student's whole change
    assert any(p is d.student.time_embedding.cond_proj.weight for p in d.params) and not d.portable_adapter
    frozen = {k: v.clone() for k, v in d.student.state_dict().items() if "lora_" not in k and "cond_proj" not in k}
    before, after = _train(d, latents, cond, 6, lr=1e-2)
    assert after < before
    assert all(torch.equal(frozen[k], v) for k, v in d.student.state_dict().items() if k in frozen)
    # merging folds the adapters in: same outputs, a plain U-Net again
    t, w = torch.tensor([99, 499, 799, 999]), torch.full((4,), 5.0)
    with torch.no_grad():
        ref = predict(d.student, latents, t, cond, w)
        merged = merge_lora(frozen_copy(d.student))
        assert not any("lora_" in k or "base_layer" in k for k in merged.state_dict())
        assert torch.allclose(predict(merged, latents, t, cond, w), ref, atol=1e-4)


@pytest.mark.parametrize("objective", ["guided", "consistency"])
def test_a_student_without_w_learns_the_guided_teacher_in_its_adapter(objective, sd1, sd1_batch):
    # LCM-LoRA: no w-embedding; the teacher's CFG over guidance_range is learned in the adapter alone
    latents, cond, uncond = sd1_batch
    d = StepDistiller(objective, _student(sd1), sd1.unet, Schedule.from_scheduler(sd1.scheduler), uncond=uncond,
                      teacher_steps=8, rounds=1, lcm_skip=100, lora_rank=4, w_embedding=False,
                      guidance_range=(4.0, 6.0))
    d.start_phase(0)
    assert d.student.config.get("time_cond_proj_dim") is None and d.portable_adapter
    assert all("lora_" in n for n, p in d.student.named_parameters() if p.requires_grad)
    before, after = _train(d, latents, cond, 8, lr=1e-2)
    assert after < 0.9 * before, (before, after)


def test_losses_on_a_student_without_w(sd1, sd1_batch):
    latents, cond, uncond = sd1_batch
    sched = Schedule.from_scheduler(sd1.scheduler)
    # guided: the student without w input matches the teacher's CFG output; finite and differentiable
    g = guided_loss(_student(sd1), sd1.unet, sched, latents, cond, uncond, torch.full((4,), 4.0))["loss"]
    g.backward()
    assert torch.isfinite(g) and g > 0
    # progressive on an unguided student: no w, plain conditional teacher; finite and differentiable
    s = _student(sd1)
    out = progressive_loss(s, frozen_copy(s), sched, latents, cond, steps=2)["loss"]
    out.backward()
    assert torch.isfinite(out)
    c = consistency_loss(add_guidance_embedding(s), frozen_copy(add_guidance_embedding(s)), sd1.unet, sched,
                         latents, cond, uncond, torch.full((4,), 4.0), skip=100)["loss"]
    assert torch.isfinite(c)


def count_unet_calls(pipe):
    calls = []
    pipe.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    return calls


def test_guided_rounds_halve_steps_and_export_runs_without_cfg(sd1, sd1_batch, tiny_sd1_dir, tmp_path):
    latents, cond, uncond = sd1_batch
    d = StepDistiller("guided", _student(sd1), sd1.unet, Schedule.from_scheduler(sd1.scheduler), uncond=uncond,
                      teacher_steps=8, rounds=2)
    seen = []
    for i in range(len(d.phases)):
        ph = d.start_phase(i)
        seen.append(ph.steps)
        if ph.objective == "progressive":  # each round is taught by the student of the round before
            assert d.teacher is not d.student and w_is_input(d.teacher)
        _train(d, latents, cond, 2, lr=5e-3)
    assert seen == [8, 4, 2] and d.final_steps == 2
    out = save_steps_student(d.export_student(), str(tiny_sd1_dir), tmp_path / "s",
                             student_scheduler("guided", sd1.scheduler, d.final_steps),
                             StepsMeta(objective="guided", steps=d.final_steps, guidance_scale=7.5))
    meta = json.loads((out / "distillery.json").read_text())
    assert meta["steps"] == 2 and meta["steps_distillation"]["objective"] == "guided"

    pipe = StableDiffusionPipeline.from_pretrained(out)  # plain diffusers, nothing of ours
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.unet.config.time_cond_proj_dim == 256
    calls = count_unet_calls(pipe)
    images = {}
    for w in (2.0, 8.0):
        images[w] = pipe("a red circle", num_inference_steps=2, guidance_scale=w, output_type="np", height=32, width=32,
                         generator=torch.Generator().manual_seed(0)).images
    assert calls == [1, 1, 1, 1]  # one forward of batch 1 per step: no CFG doubling
    assert images[2.0].shape == (1, 32, 32, 3) and not torch.allclose(  # w reaches the U-Net
        torch.from_numpy(images[2.0]), torch.from_numpy(images[8.0]))


def w_is_input(unet) -> bool:
    return unet.config.get("time_cond_proj_dim") is not None


def test_consistency_student_exports_with_lcm_scheduler(sd1, sd1_batch, tiny_sd1_dir, tmp_path):
    from diffusers import LatentConsistencyModelPipeline

    latents, cond, uncond = sd1_batch
    d = StepDistiller("consistency", _student(sd1), sd1.unet, Schedule.from_scheduler(sd1.scheduler),
                      uncond=uncond, lcm_skip=100)
    d.start_phase(0)
    _train(d, latents, cond, 1)
    sched = student_scheduler("consistency", sd1.scheduler, 4, skip=100)
    out = save_steps_student(d.export_student(), str(tiny_sd1_dir), tmp_path / "lcm", sched,
                             StepsMeta(objective="consistency", steps=4, guidance_scale=7.5))
    pipe = LatentConsistencyModelPipeline.from_pretrained(out, safety_checker=None, feature_extractor=None)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.scheduler.config.original_inference_steps == 10
    calls = count_unet_calls(pipe)
    img = pipe("a blue square", num_inference_steps=4, guidance_scale=7.5, output_type="np", height=32, width=32,
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 32, 32, 3) and calls == [1, 1, 1, 1]
    assert UNet2DConditionModel.from_pretrained(out, subfolder="unet").config.time_cond_proj_dim == 256


def test_lora_needs_projections():
    with pytest.raises(ValueError, match="no attention"):
        add_lora(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1)), 2)  # type: ignore[arg-type]


# --- the Ray stage: a real step distillation (local Ray, DeepSpeed on CPU, a real MLflow server) ------------


def write_cache(uri: str, teacher_uri: str, n: int = 8) -> None:
    """A small embedding cache by the contract: colored squares encoded by the tiny teacher."""
    import numpy as np

    from pipelines.cache import CacheManifest, write_manifest, write_rows
    from pipelines.storage import join

    t = load_teacher(teacher_uri, dtype="float32", components=("vae", "text"))
    colors = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
    names = [list(colors)[i % 4] for i in range(n)]
    imgs = torch.full((n, 3, 64, 64), 0.9)
    for i, name in enumerate(names):
        imgs[i, :, 16:48, 16:48] = torch.tensor(colors[name]).view(3, 1, 1) / 127.5 - 1
    captions = [f"a {c} square" for c in names]
    with torch.no_grad():
        dist = t.vae.encode(imgs).latent_dist
        emb = encode_prompts(t, captions)["prompt_embeds"]
    write_rows(join(uri, "train", "part-0.parquet"), {
        "key": [f"k{i}" for i in range(n)], "caption": captions, "split": ["train"] * n,
        "latent_mean": list(dist.mean.numpy()), "latent_std": list(dist.std.numpy()),
        "prompt_embeds": list(emb.numpy().astype(np.float32))})
    write_manifest(uri, CacheManifest(teacher=teacher_uri, family="sd1", prediction_type="epsilon", resolution=64,
                                      latents="dist", vae_scaling_factor=t.vae_scale, latent_shape=(4, 16, 16),
                                      embed_shape=(77, 32), rows={"train": n, "val": 0}, source="test",
                                      format="test", config_digest="test", created="now"))


def sample_latents(pipe, seed: int = 0):
    return pipe("a red square", num_inference_steps=2, guidance_scale=1.0, output_type="latent", height=32,
                width=32, generator=torch.Generator().manual_seed(seed)).images


def _merged_by_hand(unet: UNet2DConditionModel, adapter_file) -> UNet2DConditionModel:
    """unet with W += (alpha / r)·B·A for every layer in a diffusers LoRA file, read with safetensors alone."""
    from safetensors import safe_open

    with safe_open(str(adapter_file), "pt") as f:
        meta = {k.removeprefix("unet."): v for k, v in json.loads(f.metadata()["lora_adapter_metadata"]).items()}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    scale = meta["lora_alpha"] / meta["r"]
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for k, a in tensors.items():
            if ".lora_A." not in k:
                continue
            b = tensors[k.replace(".lora_A.", ".lora_B.")]
            w = params[k.removeprefix("unet.").replace(".lora_A.weight", ".weight")]
            w += (scale * (b.flatten(1) @ a.flatten(1))).view(w.shape)
    return unet


def test_steps_stage_guided_lora_on_ray(tmp_path, ray_local, mlflow_server):
    from mlflow.tracking import MlflowClient

    from models.teacher import resolve_model_dir
    from pipelines import fewstep
    from pipelines.config import parse_config

    write_cache(str(tmp_path / "cache"), "builtin:tiny-sd1")
    cfg = parse_config({
        "name": "t", "work_dir": str(tmp_path), "teacher": {"uri": "builtin:tiny-sd1"},
        "distill": {"num_workers": 1, "resources_per_worker": {"CPU": 1}, "zero_stage": 2, "log_every": 1},
        # step-distill the teacher itself: guided stage 1, then one round 4 -> 2 steps, as a LoRA (LCM-LoRA
        # style: no w-embedding, the guidance learned in the adapter)
        "steps": {"objective": "guided", "student": "builtin:tiny-sd1", "teacher_steps": 4, "rounds": 1,
                  "steps_per_round": 2, "batch_size": 4, "lr": 1e-2, "lora_rank": 4}})
    result = fewstep.run(cfg)
    assert result["steps"] == 2 and result["scheduler"] == "DDIMScheduler"
    out = tmp_path / "student-steps"
    meta = json.loads((out / "distillery.json").read_text())
    assert meta["steps"] == 2 and meta["guidance_scale"] == 1.0  # the guidance is in the weights: no CFG
    assert [p["objective"] for p in meta["steps_distillation"]["phases"]] == ["guided", "progressive"]
    assert meta["steps_distillation"]["lora_adapter"] == "lora"

    history = MlflowClient(mlflow_server.url).get_metric_history(result["mlflow_run_id"], "student_steps")
    assert [(m.step, m.value) for m in history] == [(1, 4), (2, 4), (3, 2), (4, 2)]

    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.unet.config.time_cond_proj_dim is None and not any("lora" in k for k in pipe.unet.state_dict())
    calls = count_unet_calls(pipe)
    img = pipe("a red square", num_inference_steps=2, guidance_scale=1.0, output_type="np", height=32, width=32,
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 32, 32, 3) and calls == [1, 1]
    student = sample_latents(pipe)

    # the adapter alone, in plain diffusers, on the model it was distilled from: the exported student's samples
    source = resolve_model_dir("builtin:tiny-sd1")
    sched = DDIMScheduler.from_pretrained(out, subfolder="scheduler")
    base = StableDiffusionPipeline.from_pretrained(source, scheduler=sched)
    plain = sample_latents(base)
    base.load_lora_weights(out / "lora")
    adapted = sample_latents(base)
    assert (adapted - plain).abs().max() > 1e-2  # it changes the samples ...
    assert torch.allclose(adapted, student, atol=1e-4)  # ... into the student's
    base.unload_lora_weights()
    assert torch.equal(sample_latents(base), plain)

    # and on a second U-Net of the same architecture (another fine-tune): W + BA there, as the file says
    other = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p += 0.02 * p.std().nan_to_num() * torch.randn(p.shape, generator=g)
    other.save_pretrained(tmp_path / "other")
    tuned = StableDiffusionPipeline.from_pretrained(
        source, unet=UNet2DConditionModel.from_pretrained(tmp_path / "other"), scheduler=sched)
    tuned_plain = sample_latents(tuned, seed=3)
    tuned.load_lora_weights(out / "lora", adapter_name="fewstep")
    tuned_adapted = sample_latents(tuned, seed=3)
    by_hand = StableDiffusionPipeline.from_pretrained(
        source, unet=_merged_by_hand(UNet2DConditionModel.from_pretrained(tmp_path / "other"),
                                     out / "lora" / "pytorch_lora_weights.safetensors"), scheduler=sched)
    assert (tuned_adapted - tuned_plain).abs().max() > 1e-2
    assert torch.allclose(tuned_adapted, sample_latents(by_hand, seed=3), atol=1e-4)
    assert "load_lora_weights" in (out / "README.md").read_text()  # the card says how
    assert fewstep.run(cfg)["skipped"] is True  # the same job again: nothing to do
