"""The model core, no Ray: teachers, students by block removal, KD losses (tiny models, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

from models.kd import KDTaps, KDWeights, Taps, attention_pairs, diffusion_batch, feature_pairs, kd_loss
from models.student import (
    RemovalSpec,
    StudentMeta,
    build_student,
    count_params,
    meta_unet,
    preset_spec,
    resolve_spec,
    save_student,
    student_config,
)
from models.teacher import encode_prompts, load_teacher, unet_conditioning
from pipelines.student_cli import SD15_UNET, SDXL_UNET, preset_table


def _cond(teacher, prompts):
    emb = encode_prompts(teacher, prompts)
    if teacher.family == "sdxl":
        emb["time_ids"] = torch.tensor([[64, 64, 0, 0, 64, 64]] * len(prompts), dtype=torch.float32)
    return unet_conditioning(emb, teacher.family)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir):
    return load_teacher(str(tiny_sdxl_dir), dtype="float32")


def test_teacher_family_and_prediction_type(sd1, sdxl, tmp_path):
    assert (sd1.family, sd1.prediction_type) == ("sd1", "epsilon")
    assert sdxl.family == "sdxl" and sdxl.text_encoder_2 is not None
    emb = encode_prompts(sdxl, ["a red circle", "two blue squares"])
    assert emb["prompt_embeds"].shape == (2, 77, 64) and emb["pooled"].shape == (2, 32)
    # v-prediction is read from the scheduler config
    from models.tiny import tiny_sd1_pipeline

    tiny_sd1_pipeline(prediction_type="v_prediction").save_pretrained(tmp_path / "v")
    assert load_teacher(str(tmp_path / "v")).prediction_type == "v_prediction"


def test_builtin_teacher_uri():
    t = load_teacher("builtin:tiny-sd1", components=("unet",))
    assert t.family == "sd1" and t.unet is not None and t.vae is None
    with pytest.raises(ValueError, match="unknown builtin"):
        load_teacher("builtin:nope")


@pytest.mark.parametrize("which", ["sd1", "sdxl"])
def test_identity_student_reproduces_teacher_exactly(which, request):
    teacher = request.getfixturevalue(which)
    spec = preset_spec("identity", teacher.unet.config)
    student = build_student(teacher.unet, spec)
    assert count_params(student) == count_params(teacher.unet)
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([3, 700])
    cond = _cond(teacher, ["a red circle", "a green star"])
    with torch.no_grad():
        assert torch.equal(student(x, t, **cond).sample, teacher.unet(x, t, **cond).sample)


def test_published_parameter_counts_on_meta_device():
    rows = {(r["teacher"], r["preset"]): r["params"] for r in preset_table({"sd1.5": SD15_UNET, "sdxl": SDXL_UNET})}
    m = 1e6
    assert round(rows["sd1.5", "identity"] / m, 1) == 859.5
    assert round(rows["sd1.5", "bk-base"] / m, 1) == 579.4
    assert round(rows["sd1.5", "bk-small"] / m, 1) == 482.3
    assert round(rows["sd1.5", "bk-tiny"] / m, 1) == 323.4
    assert round(rows["sdxl", "identity"] / 1e9, 2) == 2.57
    assert round(rows["sdxl", "ssd-1b"] / 1e9, 1) == 1.3
    assert round(rows["sdxl", "vega"] / 1e9, 2) == 0.75  # Segmind: 0.745B
    # nothing was allocated: the counts came from meta tensors
    assert next(meta_unet(SD15_UNET).parameters()).device.type == "meta"


@pytest.mark.parametrize("preset", ["bk-base", "bk-small", "bk-tiny"])
def test_sd1_students_save_and_generate_in_plain_diffusers(preset, sd1, tmp_path):
    spec = preset_spec(preset, sd1.unet.config)
    student = build_student(sd1.unet, spec)
    out = save_student(student, sd1.source, tmp_path / preset, StudentMeta(preset=preset))
    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    assert count_params(unet) == count_params(student) < count_params(sd1.unet)
    pipe = StableDiffusionPipeline.from_pretrained(out)
    img = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 64, 64, 3) and float(img.std()) > 0
    # round trip: saved weights are the built student's
    for (k, a), (_, b) in zip(student.state_dict().items(), unet.state_dict().items()):
        assert torch.equal(a, b), k
    assert json.loads((out / "distillery.json").read_text())["preset"] == preset


@pytest.mark.parametrize("preset", ["ssd-1b", "vega"])
def test_sdxl_students_save_and_generate(preset, sdxl, tmp_path):
    student = build_student(sdxl.unet, preset_spec(preset, sdxl.unet.config))
    out = save_student(student, sdxl.source, tmp_path / preset, StudentMeta(preset=preset))
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    img = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert img.shape == (1, 64, 64, 3)
    assert pipe.unet.config.mid_block_type == "UNetMidBlock2D"


@pytest.mark.parametrize(
    "which,preset,level",
    [("sd1", "bk-small", "block"), ("sd1", "bk-tiny", "layer"), ("sd1", "bk-base", "block"),
     ("sdxl", "ssd-1b", "layer"), ("sdxl", "vega", "block")],
)
def test_kd_steps_lower_the_loss_and_features_match(which, preset, level, request):
    teacher = request.getfixturevalue(which)
    spec = preset_spec(preset, teacher.unet.config)
    student = build_student(teacher.unet, spec)
    pairs = feature_pairs(student, teacher.unet, spec, level)
    attn = attention_pairs(student, teacher.unet, spec)
    torch.manual_seed(0)
    latents = torch.randn(4, 4, 16, 16)
    cond = _cond(teacher, ["a red circle", "a blue square", "two green stars", "a yellow triangle"])
    # every mapped pair has the same shape
    with Taps(student, [s for s, _ in pairs]) as st, Taps(teacher.unet, [t for _, t in pairs]) as tt, torch.no_grad():
        student(latents, torch.tensor([10] * 4), **cond)
        teacher.unet(latents, torch.tensor([10] * 4), **cond)
        for s, t in pairs:
            assert st.features[s].shape == tt.features[t].shape, (s, t)
    assert not st.features and not student._forward_hooks  # taps leave nothing behind
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    weights = KDWeights(task=1.0, out=1.0, feat=1.0, attn=1.0)
    losses = []
    for _ in range(8):
        noisy, t, target = diffusion_batch(teacher.scheduler, latents, teacher.prediction_type,
                                           torch.Generator().manual_seed(1))  # same batch each step
        parts = kd_loss(student, teacher.unet, noisy, t, cond, target, weights, pairs, attn)
        opt.zero_grad()
        parts["loss"].backward()
        opt.step()
        losses.append(parts["loss"].item())
    assert losses[-1] < losses[0] * 0.9, losses
    assert parts["feat"] > 0 and parts["out"] > 0 and parts["attn"] > 0
    assert all(p.grad is None for p in teacher.unet.parameters())


@pytest.mark.parametrize("level", ["block", "layer"])
def test_run_long_taps_give_the_per_step_loss_eager_and_compiled(level, sd1):
    """kd_loss with hooks registered per call, with KDTaps registered once, and with KDTaps under
    torch.compile(fullgraph=True) (dynamo's graph, run eagerly): the same loss parts at every step of a short
    training, and the compiled forwards trace once (no graph break, no recompilation from the taps)."""
    import copy

    from torch._dynamo.utils import counters

    spec = preset_spec("bk-small", sd1.unet.config)
    base = build_student(sd1.unet, spec)
    students = [copy.deepcopy(base) for _ in range(3)]  # per-step taps, run-long taps, run-long taps compiled
    teachers = [copy.deepcopy(sd1.unet).requires_grad_(False) for _ in range(3)]
    pairs = feature_pairs(base, sd1.unet, spec, level)
    attn = attention_pairs(base, sd1.unet, spec)
    weights = KDWeights(task=1.0, out=0.5, feat=1.0, attn=2.0)
    opts = [torch.optim.SGD(s.parameters(), lr=0.5) for s in students]
    torch._dynamo.reset()
    c_student = torch.compile(students[2], backend="eager", fullgraph=True)
    c_teacher = torch.compile(teachers[2], backend="eager", fullgraph=True)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = _cond(sd1, ["a red circle", "a blue square"])
    graphs, before = [], counters["stats"]["unique_graphs"]
    with KDTaps(students[1], teachers[1], weights, pairs, attn) as taps, \
            KDTaps(c_student, c_teacher, weights, pairs, attn) as c_taps:
        for step in range(2):  # the second step: after an update, and must not trace again
            noisy, t, target = diffusion_batch(sd1.scheduler, latents, "epsilon", torch.Generator().manual_seed(step))
            runs = [kd_loss(students[0], teachers[0], noisy, t, cond, target, weights, pairs, attn),
                    kd_loss(students[1], teachers[1], noisy, t, cond, target, weights, taps=taps),
                    kd_loss(c_student, c_teacher, noisy, t, cond, target, weights, taps=c_taps)]
            graphs.append(counters["stats"]["unique_graphs"] - before)
            for key in ("loss", "task", "out", "feat", "attn"):
                ref = runs[0][key].item()
                assert ref > 0, key
                for other in runs[1:]:
                    assert other[key].item() == pytest.approx(ref, rel=1e-6, abs=1e-6), (step, key)
            for parts, opt in zip(runs, opts):
                opt.zero_grad()
                parts["loss"].backward()
                opt.step()
            assert not taps.student.features and not c_taps.teacher.maps  # nothing kept past the step
    assert graphs[0] == 2 and graphs[-1] == graphs[0], graphs  # teacher and student: one graph each, traced once
    for model in students + teachers:  # closed taps leave no hooks behind
        assert not any(m._forward_hooks for m in model.modules())
    for a, b in zip(students[0].parameters(), students[2].parameters()):  # the compiled path trained the same
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


class _GraphRun(torch.nn.Module):
    """Stand-in for a forward compiled with CUDA graphs (mode reduce-overhead), which a CPU cannot run: its
    outputs, and what its hooks recorded, live in memory that the next run of any graph sharing `live`
    overwrites (here: fills with NaN)."""

    def __init__(self, module: torch.nn.Module, taps: Taps, live: list):
        super().__init__()
        self._orig_mod, self.taps, self.live = module, taps, live

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            for t in self.live:
                t.fill_(float("nan"))
        self.live.clear()
        out = self._orig_mod(*args, **kwargs)
        self.live += [out.sample, *self.taps.features.values(), *self.taps.maps.values()]
        return out


def test_cudagraph_taps_copy_the_teachers_outputs_before_the_student_runs(sd1):
    """KDTaps(cudagraphs=True): the teacher's output and features are copied before the student's graph runs
    (which overwrites them), so the loss is the eager one; without it the stand-in graphs spoil the loss."""
    import copy

    spec = preset_spec("bk-small", sd1.unet.config)
    student = build_student(sd1.unet, spec)
    teacher = copy.deepcopy(sd1.unet).requires_grad_(False)
    pairs = feature_pairs(student, teacher, spec, "block")
    attn = attention_pairs(student, teacher, spec)
    weights = KDWeights(task=1.0, out=0.5, feat=1.0, attn=2.0)
    noisy, t, target = diffusion_batch(sd1.scheduler, torch.randn(2, 4, 16, 16), "epsilon",
                                       torch.Generator().manual_seed(0))
    cond = _cond(sd1, ["a red circle", "a blue square"])
    eager = kd_loss(student, teacher, noisy, t, cond, target, weights, pairs, attn)
    for cudagraphs in (True, False):
        with KDTaps(student, teacher, weights, pairs, attn, cudagraphs=cudagraphs) as taps:
            live: list = []
            s_run, t_run = _GraphRun(student, taps.student, live), _GraphRun(teacher, taps.teacher, live)
            for _ in range(2):  # the second call overwrites what the first left live
                parts = kd_loss(s_run, t_run, noisy, t, cond, target, weights, taps=taps)
                if cudagraphs:
                    for key in ("loss", "task", "out", "feat", "attn"):
                        assert parts[key].item() == pytest.approx(eager[key].item(), rel=1e-6), key
                else:  # the student's run overwrote the teacher's output: the stand-in does what CUDA graphs do
                    assert torch.isnan(parts["out"]) and torch.isnan(parts["feat"])
                    assert parts["task"].item() == pytest.approx(eager["task"].item(), rel=1e-6)


def test_bad_specs_fail_with_clear_errors(sd1, sdxl):
    with pytest.raises(ValueError, match="for SD 1.x/2.x teachers"):
        preset_spec("bk-small", sdxl.unet.config)
    with pytest.raises(ValueError, match="for SDXL teachers"):
        preset_spec("ssd-1b", sd1.unet.config)
    with pytest.raises(ValueError, match="unknown preset"):
        preset_spec("bk-huge", sd1.unet.config)
    with pytest.raises(ValueError, match="drop_inner=4"):
        student_config(sd1.unet.config, RemovalSpec(down=[], up=[], drop_inner=4))
    with pytest.raises(ValueError, match="5 down and 4 up stages"):
        student_config(sd1.unet.config, RemovalSpec(down=[[0]] * 5, up=[[0, 2]] * 4))
    with pytest.raises(ValueError, match="down stage 1: kept layers \\[2\\]"):
        student_config(sd1.unet.config, RemovalSpec(down=[[0], [2], [0], [0]], up=[[0, 2]] * 4))
    with pytest.raises(ValueError, match="one more layer than its down stage"):
        student_config(sd1.unet.config, RemovalSpec(down=[[0]] * 4, up=[[0, 1, 2]] * 4))
    with pytest.raises(ValueError, match="teacher's last layer"):
        build_student(sd1.unet, RemovalSpec(down=[[0]] * 4, up=[[0, 1]] * 4))
    with pytest.raises(ValueError, match="unknown removal spec fields"):
        resolve_spec(sd1.unet.config, spec={"down": [[0]] * 4, "up": [[0, 2]] * 4, "middle": False})


def test_custom_spec_builds(sd1):
    # keep both down layers in the outer stage, one elsewhere; no mid block
    spec = resolve_spec(sd1.unet.config, spec={"down": [[0, 1], [0], [0], [1]], "up": [[0, 2]] * 3 + [[0, 1, 2]],
                                               "mid": "none"})
    student = build_student(sd1.unet, spec)
    assert list(student.config.layers_per_block) == [2, 1, 1, 1]
    out = student(torch.randn(1, 4, 16, 16), torch.tensor([5]), **_cond(sd1, ["a red star"])).sample
    assert out.shape == (1, 4, 16, 16)


# --- the KD settings of later papers (models/kd.py): transformer level, self-attention, LAPTOP-Diff's feature
# normalization, min-SNR weighting, a temperature for attention transfer


def test_transformer_level_and_self_attention_pairs_match_shapes(sdxl):
    from models.kd import self_attention_pairs

    spec = preset_spec("ssd-1b", sdxl.unet.config)  # thins transformer depth: 10 -> fewer blocks
    student = build_student(sdxl.unet, spec)
    layer = feature_pairs(student, sdxl.unet, spec, "layer")
    deep = feature_pairs(student, sdxl.unet, spec, "transformer")
    sattn = self_attention_pairs(student, sdxl.unet, spec)
    blocks = [p for p in deep if ".transformer_blocks." in p[0]]
    assert len(deep) > len(layer) and blocks and len(sattn) == len(blocks)
    # a thinned stack maps each student block to a distinct teacher block of the same attention, in order
    by_attn: dict[str, list[int]] = {}
    for _, t in blocks:
        by_attn.setdefault(t.rsplit(".transformer_blocks.", 1)[0], []).append(int(t.rsplit(".", 1)[1]))
    assert any(len(v) > 1 for v in by_attn.values())
    assert all(v == sorted(set(v)) for v in by_attn.values()), by_attn
    cond = _cond(sdxl, ["a red circle", "a blue square"])
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    paths = deep + sattn
    with Taps(student, [s for s, _ in paths]) as st, Taps(sdxl.unet, [t for _, t in paths]) as tt, torch.no_grad():
        student(latents, torch.tensor([10, 500]), **cond)
        sdxl.unet(latents, torch.tensor([10, 500]), **cond)
        for s, t in paths:
            assert st.features[s].shape == tt.features[t].shape, (s, t)


def test_feature_normalization_makes_each_term_scale_free():
    from models.kd import feature_term

    g = torch.Generator().manual_seed(0)
    t = {"a": torch.randn(2, 8, generator=g), "b": 100 * torch.randn(2, 8, generator=g)}
    s = {k: 1.1 * v for k, v in t.items()}  # 10% off everywhere: MSE = 0.01 x the teacher's mean square
    pairs = [("a", "a"), ("b", "b")]
    plain = [feature_term(s, t, [p]).item() for p in pairs]
    normed = [feature_term(s, t, [p], normalize=True).item() for p in pairs]
    assert plain[1] > 1000 * plain[0]  # unnormalized, the large-norm layer is all of the sum
    assert normed == pytest.approx([0.01, 0.01], rel=1e-4)  # normalized, both count alike
    scaled = feature_term({k: 3 * v for k, v in s.items()}, {k: 3 * v for k, v in t.items()}, pairs, normalize=True)
    assert scaled.item() == pytest.approx(sum(normed), rel=1e-5)


def test_min_snr_weights_follow_the_formula(sd1):
    from models.kd import min_snr_weights

    ac = sd1.scheduler.alphas_cumprod
    t = torch.tensor([0, 100, 500, 999])
    snr = ac[t] / (1 - ac[t])
    eps = min_snr_weights(ac, t, 5.0, "epsilon")
    torch.testing.assert_close(eps, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert eps[0] < 0.01 and eps[-1] == pytest.approx(1.0)  # low-noise steps weigh little, high-noise ones fully
    v = min_snr_weights(ac, t, 5.0, "v_prediction")
    torch.testing.assert_close(v, torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))


def test_attention_kl_is_the_tempered_kd_term():
    import torch.nn.functional as F

    from models.kd import attention_kl

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 5, 7, generator=g), 2 * torch.randn(2, 3, 5, 7, generator=g)
    assert attention_kl(t, t, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    for tau in (1.0, 4.0):
        ref = F.kl_div(F.log_softmax(s / tau, -1), F.log_softmax(t / tau, -1), log_target=True,
                       reduction="none").sum(-1).mean() * tau**2
        assert attention_kl(s, t, tau).item() == pytest.approx(ref.item(), rel=1e-5)
    assert attention_kl(s, t, 4.0) / 16 < attention_kl(s, t, 1.0)  # softened distributions differ less


def test_kd_loss_with_every_new_setting_trains_and_logs_each_term(sd1):
    from models.kd import self_attention_pairs

    spec = preset_spec("bk-small", sd1.unet.config)
    student = build_student(sd1.unet, spec)
    weights = KDWeights(task=1.0, out=1.0, feat=1.0, attn=1.0, self_attn=1.0, feat_norm=True, min_snr_gamma=5.0,
                        attn_temperature=2.0)
    pairs = feature_pairs(student, sd1.unet, spec, "transformer")
    attn, sattn = attention_pairs(student, sd1.unet, spec), self_attention_pairs(student, sd1.unet, spec)
    latents = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = _cond(sd1, ["a red circle", "a blue square", "two green stars", "a yellow triangle"])
    ac = sd1.scheduler.alphas_cumprod
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    losses = []
    with KDTaps(student, sd1.unet, weights, pairs, attn, self_attn_pairs=sattn) as taps:
        for step in range(8):
            noisy, t, target = diffusion_batch(sd1.scheduler, latents, "epsilon", torch.Generator().manual_seed(1))
            parts = kd_loss(student, sd1.unet, noisy, t, cond, target, weights, taps=taps, alphas_cumprod=ac)
            if step == 0:  # the run-long taps give what per-call hooks give
                once = kd_loss(student, sd1.unet, noisy, t, cond, target, weights, pairs, attn,
                               self_attn_pairs=sattn, alphas_cumprod=ac)
                for k in ("loss", "task", "out", "feat", "attn", "self_attn"):
                    assert parts[k].item() == pytest.approx(once[k].item(), rel=1e-5), k
            opt.zero_grad()
            parts["loss"].backward()
            opt.step()
            losses.append(parts["loss"].item())
    assert losses[-1] < losses[0] * 0.9, losses
    assert all(parts[k] > 0 for k in ("task", "out", "feat", "attn", "self_attn"))
    # min-SNR weighting changes the task term (the same batch, unweighted, differs)
    noisy, t, target = diffusion_batch(sd1.scheduler, latents, "epsilon", torch.Generator().manual_seed(1))
    plain = kd_loss(student, sd1.unet, noisy, t, cond, target, KDWeights(out=0, feat=0))
    snr = kd_loss(student, sd1.unet, noisy, t, cond, target, KDWeights(out=0, feat=0, min_snr_gamma=5.0),
                  alphas_cumprod=ac)
    assert snr["task"].item() != pytest.approx(plain["task"].item(), rel=1e-3)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        kd_loss(student, sd1.unet, noisy, t, cond, target, KDWeights(min_snr_gamma=5.0))
