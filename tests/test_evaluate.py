"""The evaluate stage on tiny models, offline: the metric functions' sanity (FID of a set against itself is
~0 and against noise clearly larger; identical images give PSNR = inf and SSIM = 1), then the whole stage
against a real MLflow server (and S3 for the output): an identity student matches its teacher exactly,
a bk-small student is smaller and differs, the report holds every metric and plot, a rerun skips, and bad
inputs fail early with errors that name them."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from models import metrics as M
from pipelines.config import parse_config

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
PROMPTS = ["a red circle on a blue background", "a green square on a black background",  # shapes captions
           "a yellow triangle on a white background", "a purple circle on a gray background"]


def shape_image(i: int, size: int = 64) -> Image.Image:
    names = list(COLORS)
    fg, bg = COLORS[names[i % 4]], COLORS[names[(i + 2) % 4]]
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    r, c = size // 4 + (i % 3), size // 2 + (i % 5) - 2
    (d.ellipse if i % 2 == 0 else d.rectangle)((c - r, c - r, c + r, c + r), fill=fg)
    return im


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models on a shared 2-core machine: a second OpenMP thread only adds spin contention
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------- metrics


def test_metric_sanity():
    images = M.to_tensor([shape_image(i) for i in range(16)])
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(0))
    ext = M.resolve_feature_extractor("builtin:tiny")
    self_q = M.fidelity_metrics(images, images, ext)
    noise_q = M.fidelity_metrics(images, noise, ext)
    assert abs(self_q["fid"]) < 1e-4
    assert noise_q["fid"] > 100 * max(abs(self_q["fid"]), 1e-3)
    assert noise_q["kid_mean"] > self_q["kid_mean"] + 0.01
    assert set(self_q) == {"fid", "kid_mean", "kid_std", "is_mean", "is_std"}

    assert M.psnr(images, images) == math.inf and M.mse(images, images) == 0.0
    assert M.ssim(images, images) == pytest.approx(1.0, abs=1e-9)
    assert M.ssim(images, noise) < 0.2
    assert 0 < M.psnr(images, noise) < 15
    x = torch.randn(3, 8, 4, 4)
    assert torch.allclose(M.cosine_per_sample(x, 2 * x), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(M.cosine_per_sample(x, -x), -torch.ones(3, dtype=torch.float64))

    lin = torch.nn.Linear(10, 20)
    assert M.count_macs(lambda: lin(torch.randn(3, 10))) == 3 * 10 * 20
    times = M.measure_latency(lambda: lin(torch.randn(3, 10)), repeats=3, warmup=1)
    assert len(times) == 3 and all(t >= 0 for t in times)

    with pytest.raises(ValueError, match="unknown builtin"):
        M.resolve_feature_extractor("builtin:nope")
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        M.resolve_feature_extractor("/nonexistent/inception.pth")
    with pytest.raises(ValueError, match="at least 2 images"):
        M.fidelity_metrics(images[:1], images, ext)


# ------------------------------------------------------------------------------------------ stage


@pytest.fixture(scope="module")
def students(tiny_sd1_dir, tmp_path_factory) -> dict[str, Path]:
    from models.student import StudentMeta, build_student, count_params, preset_spec, save_student
    from models.teacher import load_teacher

    teacher = load_teacher(str(tiny_sd1_dir), components=("unet",))
    out = {}
    for preset in ("identity", "bk-small"):
        spec = preset_spec(preset, teacher.unet.config)
        student = build_student(teacher.unet, spec)
        meta = StudentMeta(teacher=str(tiny_sd1_dir), preset=preset, spec=spec.to_dict(), params=count_params(student))
        out[preset] = save_student(student, str(tiny_sd1_dir), tmp_path_factory.mktemp("students") / preset, meta)
    return out


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return M.tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def write_val_cache(uri: str, teacher_dir: Path, n: int = 6) -> None:
    """A validation split as the data stage writes it: captions and the VAE's (unscaled) latent means."""
    from diffusers import AutoencoderKL

    from pipelines.cache import CacheManifest, write_manifest, write_rows

    vae = AutoencoderKL.from_pretrained(teacher_dir, subfolder="vae")
    images = M.to_tensor([shape_image(i) for i in range(n)]) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(images).latent_dist
    write_rows(f"{uri}/val/part-00000.parquet", {
        "key": [f"k{i}" for i in range(n)], "caption": [PROMPTS[i % 4] for i in range(n)],
        "split": ["val"] * n, "latent_mean": list(dist.mean.numpy()), "latent_std": list(dist.std.numpy()),
    })
    write_manifest(uri, CacheManifest(teacher=str(teacher_dir), family="sd1", prediction_type="epsilon",
                                      resolution=64, latents="dist", vae_scaling_factor=vae.config.scaling_factor,
                                      latent_shape=(4, 16, 16), embed_shape=(77, 32), rows={"train": 0, "val": n},
                                      source="test", format="test", config_digest="test", created="now"))


def prompts_and_reference(folder: Path, n_ref: int, size: int) -> tuple[Path, Path]:
    """PROMPTS as a prompts file and n_ref shape images of `size` px as a reference folder, under `folder`."""
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    ref = folder / "ref"
    ref.mkdir()
    for i in range(n_ref):
        shape_image(i, size).save(ref / f"{i}.png")
    return prompts, ref


def small_eval(**kw) -> dict:
    return {"num_prompts": 4, "steps": 2, "guidance_scale": 3.0, "latency_repeats": 2, "embedding_samples": 8,
            "batch_size": 4, "feature_extractor": "builtin:tiny", **kw}


def test_identity_student_matches_teacher(tiny_sd1_dir, students, clip_dir, tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    from pipelines.evaluate import run

    client = MlflowClient(mlflow_server.url)
    exp_id = client.create_experiment("eval-identity")
    train_run = client.create_run(exp_id, run_name="distill").info.run_id
    meta_path = students["identity"] / "distillery.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "mlflow_run_id": train_run}))

    from models.export import NOT_SCORED, write_model_card
    from models.student import read_meta_file

    write_model_card(students["identity"], read_meta_file(students["identity"]), title="identity")
    prompts, ref = prompts_and_reference(tmp_path, 6, 80)
    prompts.write_text(prompts.read_text() + "\n")  # a blank line, skipped
    (ref / "notes.txt").write_text("not an image")
    cfg = parse_config({"work_dir": str(tmp_path / "work"), "teacher": {"uri": str(tiny_sd1_dir)},
                        "evaluate": small_eval(student=str(students["identity"]), prompts=str(prompts),
                                               reference=str(ref), clip_model=str(clip_dir))})
    metrics = run(cfg)

    assert metrics["psnr"] == math.inf and metrics["latent_mse"] == 0.0
    assert metrics["ssim"] == pytest.approx(1.0, abs=1e-9)
    assert abs(metrics["fid_student_vs_teacher"]) < 1e-4
    assert metrics["fid"] == pytest.approx(metrics["fid_teacher"], abs=1e-6) and metrics["fid"] > 0
    assert metrics["clip_score_student"] == pytest.approx(metrics["clip_score_teacher"])
    cos = {k: v for k, v in metrics.items() if k.startswith("feature_cosine_")}
    assert len(cos) >= 10 and all(v == pytest.approx(1.0, abs=1e-6) for v in cos.values()), cos
    assert "feature_cosine_mid_block" in cos and "feature_cosine_output" in cos
    assert metrics["param_ratio"] == 1.0 and metrics["macs_ratio"] == 1.0 and metrics["macs_teacher"] > 0
    assert metrics["num_images"] == 4 and metrics["num_reference"] == 6
    assert metrics["is_std"] == 0.0  # 4 images: IS over one split
    for key in ("kid_mean", "kid_std", "is_mean", "latency_step_ms_student", "latency_step_ms_teacher",
                "latency_image_ms_student", "latency_image_ms_teacher", "speedup_step", "speedup_image",
                "params_student", "params_teacher", "macs_student"):
        assert key in metrics and metrics[key] > 0, key

    out = Path(cfg.evaluate.output)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert len(list((out / "images" / "teacher").glob("*.png"))) == 4
    assert len(list((out / "images" / "student").glob("*.png"))) == 4
    report = (out / "report.html").read_text()
    for key in metrics:
        assert key in report, key
    plots = ["plots/pca.png", "plots/tsne.png", "plots/feature_cosine.png", "plots/grid.png"]
    for p in plots:
        assert (out / p).stat().st_size > 1000 and f'src="{p}"' in report
    assert "a green square on a black background" in report and 'src="images/student/0003.png"' in report
    # the card of the student folder now carries the verdict and the side-by-side table; read as the Hub does
    from huggingface_hub import ModelCard

    card = ModelCard.load(students["identity"] / "README.md")
    assert card.data.library_name == "diffusers" and "diffusion-distillery" in card.data.tags
    assert NOT_SCORED not in card.text and "keeps 1.00 of the teacher's CLIP score: goal 0.95 met" in card.text
    assert "| CLIP score | " in card.text and "| U-Net parameters (M) |" in card.text

    logged = client.get_run(train_run)  # into the training run that distillery.json names
    assert logged.data.metrics["fid_student_vs_teacher"] == pytest.approx(metrics["fid_student_vs_teacher"])
    assert logged.data.metrics["ssim"] == pytest.approx(1.0)
    arts = {a.path for a in client.list_artifacts(train_run, "evaluation")}
    assert {"evaluation/report.html", "evaluation/metrics.json", "evaluation/plots", "evaluation/images"} <= arts

    # same inputs again: finds eval.json and returns the recorded metrics without redoing anything
    stamp = (out / "report.html").stat().st_mtime_ns
    assert run(cfg) == metrics
    assert (out / "report.html").stat().st_mtime_ns == stamp


def test_report_answers_first_in_a_browser(tiny_sd1_dir, students, clip_dir, tmp_path):
    """report.html as a browser shows it: the verdict, then teacher | student side by side, before the images,
    the plots and the list of every metric."""
    from browser import chromium
    from selenium.webdriver.common.by import By

    from pipelines.evaluate import run

    cfg = parse_config({"work_dir": str(tmp_path / "work"), "teacher": {"uri": str(tiny_sd1_dir)},
                        "evaluate": small_eval(student=str(students["bk-small"]), prompts=str(_prompts(tmp_path)),
                                               reference=str(_reference(tmp_path)), clip_model=str(clip_dir),
                                               goal=2.0)})
    metrics = run(cfg)
    with chromium(tmp_path / "profile") as driver:
        driver.get((Path(cfg.evaluate.output) / "report.html").resolve().as_uri())
        verdict = driver.find_element(By.ID, "verdict")
        assert "of the teacher's CLIP score: goal 2.00 not met" in verdict.text  # no student doubles CLIP score
        assert verdict.get_attribute("class") == "missed"
        headings = [h.text for h in driver.find_elements(By.TAG_NAME, "h2")]
        assert headings[0] == "Teacher | student", headings
        table = driver.find_element(By.ID, "side-by-side")
        rows = {r.find_elements(By.TAG_NAME, "td")[0].text: [c.text for c in r.find_elements(By.TAG_NAME, "td")[1:]]
                for r in table.find_elements(By.TAG_NAME, "tr")[1:]}
        t, s, ratio = rows["U-Net parameters (M)"]
        assert float(s) < float(t) and ratio == f"{metrics['params_student'] / metrics['params_teacher']:.2f}x"
        assert float(rows["ms per image (ratio: speed-up)"][1]) == pytest.approx(
            metrics["latency_image_ms_student"], abs=0.06)
        # the answer sits above the images; every metric is listed further down, folded
        y = lambda el: el.location["y"]  # noqa: E731
        first_image = driver.find_element(By.CSS_SELECTOR, 'img[src^="images/"]')
        assert y(verdict) < y(table) < y(first_image)
        assert not driver.find_element(By.ID, "metrics").is_displayed()
        assert all(driver.execute_script("return arguments[0].naturalWidth", im) > 0
                   for im in driver.find_elements(By.TAG_NAME, "img"))


def _prompts(tmp_path: Path) -> Path:
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(PROMPTS) + "\n")
    return p


def _reference(tmp_path: Path) -> Path:
    ref = tmp_path / "ref"
    ref.mkdir(exist_ok=True)
    for i in range(6):
        shape_image(i, 80).save(ref / f"{i}.png")
    return ref


def test_bk_small_from_cache_to_s3_via_cli(tiny_sd1_dir, students, s3_bucket, mlflow_server, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from pipelines.cli import main
    from pipelines.storage import list_files

    cache = f"{s3_bucket}/cache"
    write_val_cache(cache, tiny_sd1_dir)
    out = f"{s3_bucket}/eval"
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({
        "name": "evals3", "work_dir": str(tmp_path / "work"), "teacher": {"uri": str(tiny_sd1_dir)},
        "data": {"output": cache}, "mlflow": {"experiment": "eval-s3"},
        "evaluate": small_eval(student=str(students["bk-small"]), output=out, images_per_prompt=1,
                               clip_model="builtin:tiny-clip"),
    }))
    assert main(["evaluate", str(config)]) == 0
    metrics = json.loads(capsys.readouterr().out)

    assert 0 < metrics["param_ratio"] < 1 and metrics["macs_ratio"] < 1
    assert 0 < metrics["psnr"] < math.inf and metrics["latent_mse"] > 0 and metrics["ssim"] < 1
    assert metrics["fid_student_vs_teacher"] > 1e-4
    assert metrics["num_reference"] == 6  # the cache's validation latents, decoded
    assert metrics["num_images"] == 4
    assert "feature_cosine_mid_block" not in metrics  # bk-small has no mid block
    assert "feature_cosine_up_blocks_0" in metrics and metrics["feature_cosine_output"] < 1
    assert "clip_score_student" in metrics
    try:
        from models.shapes import caption_accuracy
    except ImportError:
        caption_accuracy = None
    if caption_accuracy is not None and caption_accuracy([shape_image(i) for i in range(4)], PROMPTS) is not None:
        assert 0 <= metrics["caption_accuracy"] <= 1 and 0 <= metrics["caption_accuracy_teacher"] <= 1

    files = set(list_files(out))
    assert {"metrics.json", "report.html", "eval.json", "plots/pca.png", "plots/tsne.png",
            "images/teacher/0000.png", "images/student/0003.png"} <= files
    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name("eval-s3")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "evals3-evaluate" and run.info.status == "FINISHED"
    assert run.data.metrics["param_ratio"] == pytest.approx(metrics["param_ratio"])
    assert run.data.params["evaluate.steps"] == "2"  # the whole config, as params


def test_on_a_cluster_the_stage_runs_as_a_ray_task(tiny_sd1_dir, students, ray_local, tmp_path, monkeypatch):
    """Under `ray job submit` (RAY_ADDRESS set) the stage is a Ray task with the resources it asks for, not the
    driver's process (a KubeRay job's driver runs on the head, which has no GPU); it measures what the driver
    measures, and where it ran is not part of what it measured."""
    from pipelines import evaluate

    prompts, ref = prompts_and_reference(tmp_path, 4, 64)

    def cfg_for(out: str, **kw):
        return parse_config({"work_dir": str(tmp_path / "work"), "teacher": {"uri": str(tiny_sd1_dir)},
                             "evaluate": small_eval(student=str(students["bk-small"]), prompts=str(prompts),
                                                    reference=str(ref), output=str(tmp_path / out), **kw)})

    monkeypatch.setenv("RAY_ADDRESS", "auto")
    on_ray = cfg_for("on-ray", num_cpus=1)
    assert evaluate.runs_on_ray(on_ray) and not evaluate.runs_on_ray(cfg_for("x", run_on="driver"))
    metrics = evaluate.run(on_ray)
    done = json.loads((tmp_path / "on-ray" / "eval.json").read_text())
    assert done["ran_on"]["pid"] != os.getpid() and done["ran_on"]["device"].startswith("cpu")
    here = evaluate.run(cfg_for("here", run_on="driver"))
    assert json.loads((tmp_path / "here" / "eval.json").read_text())["ran_on"]["pid"] == os.getpid()
    for key in ("latent_mse", "psnr", "ssim", "fid_student_vs_teacher", "fid", "param_ratio", "macs_ratio"):
        assert metrics[key] == pytest.approx(here[key], rel=1e-4), key
    # the Ray task's results stand for the driver too: the same inputs are not measured again
    assert evaluate.run(cfg_for("on-ray", run_on="driver")) == metrics
    assert json.loads((tmp_path / "on-ray" / "eval.json").read_text()) == done


def test_bad_inputs_fail_early_and_name_the_problem(tiny_sd1_dir, students, tmp_path):
    from pipelines.evaluate import run

    def cfg(**ev):
        return parse_config({"work_dir": str(tmp_path / "w"), "teacher": {"uri": str(tiny_sd1_dir)},
                             "data": {"output": str(tmp_path / "no-cache")},
                             "evaluate": small_eval(**{"student": str(students["bk-small"]), **ev})})

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match=r"empty.txt: the file has no prompts"):
        run(cfg(prompts=str(empty)))
    with pytest.raises(FileNotFoundError, match="evaluate.prompts .*missing.txt: no such file"):
        run(cfg(prompts=str(tmp_path / "missing.txt")))
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS))
    with pytest.raises(FileNotFoundError, match=r"evaluate.reference .*nope: no such folder"):
        run(cfg(prompts=str(prompts), reference=str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match=r"no validation captions: the embedding cache .*no-cache"):
        run(cfg())
    with pytest.raises(FileNotFoundError, match=r"no reference images: the embedding cache .*no-cache"):
        run(cfg(prompts=str(prompts)))
    with pytest.raises(FileNotFoundError, match=r"evaluate.student .*nothing: no student pipeline"):
        run(cfg(student=str(tmp_path / "nothing"), prompts=str(prompts)))
    one = tmp_path / "one.txt"
    one.write_text("a red circle")
    with pytest.raises(ValueError, match="FID needs at least 2"):
        run(cfg(prompts=str(one), reference=str(tmp_path)))
    assert not (tmp_path / "w" / "eval").exists()  # nothing written


def test_evaluate_pipelines_core_without_stage(tiny_sd1_dir, students):
    """The core on two pipelines, no config, MLflow or files: same seeds give the same images per prompt
    regardless of batching, and a different student gives different images."""
    from models.evaluation import evaluate_pipelines, load_pipelines

    teacher, student = load_pipelines(str(tiny_sd1_dir), str(students["bk-small"]))
    ev = evaluate_pipelines(teacher, student, PROMPTS[:2] * 2, [5, 6, 5, 6], steps=2, guidance_scale=1.0,
                            batch_size=3, feature_extractor="builtin:tiny", latency_repeats=1, embedding_samples=4)
    a = np.asarray(ev.teacher_images[0], dtype=np.int16)
    assert np.array_equal(a, np.asarray(ev.teacher_images[2], dtype=np.int16))  # batch 1 vs batch 2, same seed
    assert not np.array_equal(a, np.asarray(ev.student_images[0], dtype=np.int16))
    assert "fid" not in ev.metrics and "is_mean" in ev.metrics  # no reference: IS only, and student vs teacher
    assert ev.metrics["fid_student_vs_teacher"] > 0
    assert set(ev.embeddings["output"]) == {"teacher", "student"} and ev.embeddings["output"]["teacher"].shape[0] == 4


def test_student_decoder_decodes_the_student_only(tiny_sd1_dir, students, tmp_path):
    """evaluate.student_decoder: the student's latents are the same, its images come from the lighter decoder
    (TAESD-style AutoencoderTiny), the teacher keeps its own VAE; a decoder of another latent space is refused."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    from models.evaluation import evaluate_pipelines, load_pipelines

    kw = dict(steps=2, guidance_scale=1.0, batch_size=2, feature_extractor="builtin:tiny", latency_repeats=1,
              embedding_samples=4)
    runs = {}
    for decoder in (None, "builtin:tiny-decoder"):
        teacher, student = load_pipelines(str(tiny_sd1_dir), str(students["bk-small"]), student_decoder=decoder)
        assert isinstance(teacher.vae, AutoencoderKL)
        assert isinstance(student.vae, AutoencoderTiny if decoder else AutoencoderKL)
        runs[decoder] = evaluate_pipelines(teacher, student, PROMPTS[:2], [5, 6], **kw)
    plain, light = runs[None], runs["builtin:tiny-decoder"]
    assert light.metrics["latent_mse"] == plain.metrics["latent_mse"]  # the U-Net's work is unchanged
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(light.teacher_images, plain.teacher_images))
    assert light.student_images[0].size == plain.student_images[0].size
    assert not np.array_equal(np.asarray(light.student_images[0]), np.asarray(plain.student_images[0]))
    assert light.metrics["psnr"] != plain.metrics["psnr"]
    AutoencoderTiny(latent_channels=4).save_pretrained(tmp_path / "taesd")  # TAESD's own layout: 8x, SD at 512 px
    with pytest.raises(ValueError, match="student_decoder .*upsampled 8x; the pipeline's VAE .* upsampled 4x"):
        load_pipelines(str(tiny_sd1_dir), str(students["bk-small"]), student_decoder=str(tmp_path / "taesd"))
    with pytest.raises(ValueError, match="need an AutoencoderTiny"):
        load_pipelines(str(tiny_sd1_dir), str(students["bk-small"]),
                       student_decoder=str(Path(tiny_sd1_dir) / "unet"))
    assert parse_config({"evaluate": {"student_decoder": "madebyollin/taesd"}}).evaluate.student_decoder


# --------------------------------------------------------------------------- step-distilled students


@pytest.fixture(scope="module")
def guided_student(tiny_sd1_dir, tmp_path_factory) -> Path:
    """A guided step student as the steps stage exports it, without training: the teacher's U-Net with a w
    input (its projection random, so that w changes the output), DDIM with trailing spacing, and
    distillery.json recording 2 steps at guidance 5."""
    from models.steps import add_guidance_embedding, save_steps_student, student_scheduler
    from models.student import StepsMeta
    from models.teacher import load_teacher

    teacher = load_teacher(str(tiny_sd1_dir), components=("unet", "scheduler"))
    unet = add_guidance_embedding(teacher.unet)
    with torch.no_grad():
        proj = unet.time_embedding.cond_proj.weight
        proj.copy_(torch.randn(proj.shape, generator=torch.Generator().manual_seed(0)) * 0.1)
    return save_steps_student(unet, str(tiny_sd1_dir), tmp_path_factory.mktemp("steps") / "guided",
                              student_scheduler("guided", teacher.scheduler, 2),
                              StepsMeta(objective="guided", steps=2, guidance_scale=5.0))


def test_step_student_runs_its_own_scheduler_steps_and_sweep(tiny_sd1_dir, guided_student, clip_dir, tmp_path,
                                                             mlflow_server):
    """The stage on a guided step student: its own DDIM (trailing) scheduler, the steps and guidance its
    distillery.json records as a w input (one U-Net call per step), and the sweep's metrics at 1 and 2 steps."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from models.evaluation import load_pipelines
    from pipelines.evaluate import run

    teacher, student = load_pipelines(str(tiny_sd1_dir), str(guided_student))
    assert isinstance(student.scheduler, DDIMScheduler) and student.scheduler.config.timestep_spacing == "trailing"
    assert teacher.scheduler.config.timestep_spacing == "leading"  # the teacher keeps its own
    del teacher, student

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(4):
        shape_image(i).save(ref / f"{i}.png")
    cfg = parse_config({"work_dir": str(tmp_path / "work"), "teacher": {"uri": str(tiny_sd1_dir)},
                        "mlflow": {"experiment": "eval-steps"},
                        "evaluate": small_eval(student=str(guided_student), prompts=str(prompts), reference=str(ref),
                                               clip_model=str(clip_dir), steps_sweep=[1, 2])})
    metrics = run(cfg)

    assert (metrics["steps_teacher"], metrics["guidance_scale_teacher"], metrics["cfg_batch_teacher"]) == (2, 3.0, 2)
    assert (metrics["steps_student"], metrics["guidance_scale_student"], metrics["cfg_batch_student"]) == (2, 5.0, 1)
    assert metrics["steps"] == 2 and metrics["guidance_scale"] == 3.0  # the names other code reads, unchanged
    for k in (1, 2):
        for name in ("fid_student_vs_teacher", "fid", "kid_mean", "clip_score_student", "caption_accuracy", "psnr",
                     "ssim", "latent_mse", "latency_image_ms_student", "speedup_image"):
            assert math.isfinite(metrics[f"{name}_{k}steps"]), (name, k)
        assert metrics[f"latent_mse_{k}steps"] > 0 and metrics[f"latency_image_ms_student_{k}steps"] > 0
        assert 0 <= metrics[f"caption_accuracy_{k}steps"] <= 1
    for name in ("psnr", "latent_mse", "fid_student_vs_teacher", "clip_score_student", "caption_accuracy"):
        assert metrics[f"{name}_2steps"] == metrics[name]  # 2 steps is the student's own: the main comparison
    assert metrics["latent_mse_1steps"] != metrics["latent_mse_2steps"]
    assert metrics["latency_image_ms_student_2steps"] == metrics["latency_image_ms_student"]

    out = Path(cfg.evaluate.output)

    def image(folder: str, i: int = 0) -> np.ndarray:
        return np.asarray(Image.open(out / "images" / folder / f"{i:04d}.png"), dtype=np.int16)

    assert not np.array_equal(image("student_1steps"), image("student_2steps"))
    assert np.array_equal(image("student_2steps"), image("student"))
    assert len(list((out / "images" / "student_1steps").glob("*.png"))) == 4
    # plain diffusers on the student folder at the recorded steps and guidance draws the same image; the
    # teacher's guidance (3) would not, so w reached the U-Net
    pipe = StableDiffusionPipeline.from_pretrained(guided_student)
    pipe.set_progress_bar_config(disable=True)
    size = int(metrics["resolution"])

    def plain(w: float) -> np.ndarray:
        im = pipe(PROMPTS[0], num_inference_steps=2, guidance_scale=w, height=size, width=size,
                  generator=torch.Generator().manual_seed(cfg.evaluate.seed)).images[0]
        return np.asarray(im, dtype=np.int16)

    assert np.abs(plain(5.0) - image("student")).max() <= 1
    assert np.abs(plain(3.0) - image("student")).max() > 10

    report = (out / "report.html").read_text()
    assert "<h2>Steps sweep</h2>" in report and 'src="plots/steps_sweep.png"' in report
    assert (out / "plots" / "steps_sweep.png").stat().st_size > 1000
    assert 'src="images/student_1steps/0003.png"' in report
    assert "DDIMScheduler (trailing spacing), 2 steps, guidance scale 5, w input" in report
    for key in metrics:
        assert key in report, key


def test_guided_student_runs_one_forward_per_step(tiny_sd1_dir, guided_student):
    """evaluate_pipelines: the teacher's U-Net sees the CFG pair (batch 2B) at its steps, the guided student's
    only batch B with the w-embedding, at its own steps and then at each step count of the sweep."""
    from collections import Counter

    from models.evaluation import evaluate_pipelines, load_pipelines

    teacher, student = load_pipelines(str(tiny_sd1_dir), str(guided_student))
    calls: dict[str, Counter] = {"teacher": Counter(), "student": Counter()}
    w_inputs = []

    def record(who):
        def hook(_m, args, kwargs):
            calls[who][args[0].shape[0]] += 1
            if who == "student":
                w_inputs.append(kwargs.get("timestep_cond") is not None)
        return hook

    teacher.unet.register_forward_pre_hook(record("teacher"), with_kwargs=True)
    student.unet.register_forward_pre_hook(record("student"), with_kwargs=True)
    ev = evaluate_pipelines(teacher, student, PROMPTS[:3], steps=3, guidance_scale=3.0, student_steps=2,
                            student_guidance_scale=5.0, steps_sweep=[1, 2], batch_size=3,
                            feature_extractor="builtin:tiny", latency_repeats=1, embedding_samples=2)
    assert calls["teacher"][6] == 3 and calls["student"][6] == 0  # generation: 3 teacher steps of the CFG pair
    assert calls["student"][3] == 2 + 1  # 2 steps, and 1 for the sweep (its 2 steps are the main run's)
    assert all(w_inputs) and len(w_inputs) > 3  # every student call, latency and features included, gets w
    assert ev.metrics["cfg_batch_teacher"] == 2 and ev.metrics["cfg_batch_student"] == 1
    assert set(ev.sweep_images) == {1, 2} and ev.sweep_images[2] is ev.student_images

    with pytest.raises(ValueError, match="steps_sweep"):
        evaluate_pipelines(teacher, student, PROMPTS[:2], steps_sweep=[0])


def test_bad_steps_sweep_names_the_field():
    from pipelines.config import ConfigError

    for bad, why in (([0], ">= 1"), ([1, 2, 2], "must not repeat")):
        with pytest.raises(ConfigError, match=rf"evaluate\.steps_sweep: .*{why}"):
            parse_config({"evaluate": {"steps_sweep": bad}})
    assert parse_config({"evaluate": {"steps_sweep": [1, 2, 4, 8]}}).evaluate.steps_sweep == [1, 2, 4, 8]
