"""The evaluate stage on tiny models, offline: the metric functions' sanity (FID of a set against itself is
~0 and against noise clearly larger; identical images give PSNR = inf and SSIM = 1), then the whole stage
against a real MLflow server (and S3 for the output): an identity student matches its teacher exactly,
a bk-small student is smaller and differs, the report holds every metric and plot, a rerun skips, and bad
inputs fail early with errors that name them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from pipelines import metrics as M
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
    from models.student import build_student, count_params, preset_spec, save_student
    from models.teacher import load_teacher

    teacher = load_teacher(str(tiny_sd1_dir), components=("unet",))
    out = {}
    for preset in ("identity", "bk-small"):
        spec = preset_spec(preset, teacher.unet.config)
        student = build_student(teacher.unet, spec)
        meta = {"teacher": str(tiny_sd1_dir), "preset": preset, "spec": spec.to_dict(), "params": count_params(student)}
        out[preset] = save_student(student, str(tiny_sd1_dir), tmp_path_factory.mktemp("students") / preset, meta)
    return out


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return M.tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def write_val_cache(uri: str, teacher_dir: Path, n: int = 6) -> None:
    """A validation split as the data stage writes it: captions and the VAE's (unscaled) latent means."""
    from diffusers import AutoencoderKL

    from pipelines.cache import write_manifest, write_rows

    vae = AutoencoderKL.from_pretrained(teacher_dir, subfolder="vae")
    images = M.to_tensor([shape_image(i) for i in range(n)]) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(images).latent_dist
    write_rows(f"{uri}/val/part-00000.parquet", {
        "key": [f"k{i}" for i in range(n)], "caption": [PROMPTS[i % 4] for i in range(n)],
        "split": ["val"] * n, "latent_mean": list(dist.mean.numpy()), "latent_std": list(dist.std.numpy()),
    })
    write_manifest(uri, {"schema_version": 1, "complete": True, "teacher": str(teacher_dir), "family": "sd1",
                         "prediction_type": "epsilon", "resolution": 64, "dtype": "float32", "latents": "dist",
                         "vae_scaling_factor": float(vae.config.scaling_factor), "latent_shape": [4, 16, 16],
                         "embed_shape": [77, 32], "pooled_dim": None, "rows": {"train": 0, "val": n}})


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

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(6):
        shape_image(i, 80).save(ref / f"{i}.png")
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

    logged = client.get_run(train_run)  # into the training run that distillery.json names
    assert logged.data.metrics["fid_student_vs_teacher"] == pytest.approx(metrics["fid_student_vs_teacher"])
    assert logged.data.metrics["ssim"] == pytest.approx(1.0)
    arts = {a.path for a in client.list_artifacts(train_run, "evaluation")}
    assert {"evaluation/report.html", "evaluation/metrics.json", "evaluation/plots", "evaluation/images"} <= arts

    # same inputs again: finds eval.json and returns the recorded metrics without redoing anything
    stamp = (out / "report.html").stat().st_mtime_ns
    assert run(cfg) == metrics
    assert (out / "report.html").stat().st_mtime_ns == stamp


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
        from pipelines.shapes import caption_accuracy
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
    from pipelines.evaluate import evaluate_pipelines, load_pipelines

    teacher, student = load_pipelines(str(tiny_sd1_dir), str(students["bk-small"]))
    ev = evaluate_pipelines(teacher, student, PROMPTS[:2] * 2, [5, 6, 5, 6], steps=2, guidance_scale=1.0,
                            batch_size=3, feature_extractor="builtin:tiny", latency_repeats=1, embedding_samples=4)
    a = np.asarray(ev.teacher_images[0], dtype=np.int16)
    assert np.array_equal(a, np.asarray(ev.teacher_images[2], dtype=np.int16))  # batch 1 vs batch 2, same seed
    assert not np.array_equal(a, np.asarray(ev.student_images[0], dtype=np.int16))
    assert "fid" not in ev.metrics and "is_mean" in ev.metrics  # no reference: IS only, and student vs teacher
    assert ev.metrics["fid_student_vs_teacher"] > 0
    assert set(ev.embeddings["output"]) == {"teacher", "student"} and ev.embeddings["output"]["teacher"].shape[0] == 4
