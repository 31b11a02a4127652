"""The distill stage: pure helpers without Ray, then real distillations on tiny-sd1 (local Ray with 2 CPU
workers, DeepSpeed on CPU with gloo, a real MLflow server): loss goes down, checkpoints, MLflow contents,
a stopped run resumes, a killed worker is replaced and the run resumes from its last checkpoint, and the
exported student (ZeRO-3 shards consolidated) loads in plain diffusers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml

from pipelines.config import ConfigError, parse_config

REPO = Path(__file__).resolve().parents[1]
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
SHAPES = ("circle", "square")


# --- pure helpers ---------------------------------------------------------------------------------


def test_attention_backend_goes_first_and_auto_restores():
    """distill.attention_backend reorders PyTorch's SDPA priority list for the process; the others stay behind it
    as fallbacks, and "auto" puts PyTorch's own order back. A bad name is refused with the field's name."""
    from torch.nn.attention import SDPBackend

    from pipelines.train import prefer_attention_backend

    own = torch._C._get_sdp_priority_order()
    try:
        prefer_attention_backend("cudnn")
        order = torch._C._get_sdp_priority_order()
        assert order[0] == int(SDPBackend.CUDNN_ATTENTION) and sorted(order) == sorted(own)
        assert [c for c in order if c != order[0]] == [c for c in own if c != order[0]]
        prefer_attention_backend("efficient")
        assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.EFFICIENT_ATTENTION)
        prefer_attention_backend("auto")
        assert torch._C._get_sdp_priority_order() == own
    finally:
        torch._C._set_sdp_priority_order(own)
    with pytest.raises(ConfigError, match="attention_backend"):
        parse_config({"distill": {"attention_backend": "fa3"}})


def test_lr_schedule_warmup_and_decay():
    from pipelines.train import lr_at

    dc = parse_config({"distill": {"lr": 1e-3, "warmup_steps": 4, "max_steps": 14, "lr_schedule": "cosine"}}).distill
    assert lr_at(0, dc) == pytest.approx(2.5e-4) and lr_at(3, dc) == pytest.approx(1e-3)
    assert lr_at(4, dc) == pytest.approx(1e-3) and lr_at(9, dc) == pytest.approx(5e-4)
    assert lr_at(14, dc) == pytest.approx(0.0, abs=1e-12)
    dc.lr_schedule = "linear"
    assert lr_at(9, dc) == pytest.approx(5e-4)
    dc.lr_schedule = "constant"
    assert lr_at(13, dc) == 1e-3


def test_ds_config_and_optimizer():
    from pipelines.train import ds_config, make_optimizer

    dc = parse_config({"distill": {"zero_stage": 3, "precision": "bf16", "batch_size": 4, "grad_accum": 2,
                                   "offload_params": True, "offload_optimizer": True, "grad_clip": 0.5}}).distill
    c = ds_config(dc, world_size=8)
    assert c["train_batch_size"] == 64 and c["train_micro_batch_size_per_gpu"] == 4
    assert c["gradient_accumulation_steps"] == 2 and c["gradient_clipping"] == 0.5
    assert c["bf16"]["enabled"] and not c["fp16"]["enabled"]
    assert c["zero_optimization"]["stage"] == 3
    assert c["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert c["zero_allow_untested_optimizer"] is True
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = make_optimizer(model, dc)
    decay, no_decay = opt.param_groups
    assert [p.ndim for p in decay["params"]] == [2] and decay["weight_decay"] == dc.weight_decay
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="offload_params needs zero_stage 3"):
        parse_config({"distill": {"offload_params": True, "zero_stage": 2}})
    with pytest.raises(ConfigError, match="ema_decay is not supported with zero_stage 3"):
        parse_config({"distill": {"ema_decay": 0.99, "zero_stage": 3}})
    with pytest.raises(ConfigError, match="sample_seeds has 2 seeds for 3"):
        parse_config({"distill": {"sample_prompts": ["a", "b", "c"], "sample_seeds": [1, 2]}})


def test_compile_settings():
    from pipelines.train import compile_kwargs, uses_cudagraphs

    with pytest.raises(ConfigError, match="compile_mode 'max-autotune' needs compile: true"):
        parse_config({"distill": {"compile_mode": "max-autotune"}})
    with pytest.raises(ConfigError, match="compile_mode"):
        parse_config({"distill": {"compile": True, "compile_mode": "fastest"}})
    assert compile_kwargs(parse_config({"distill": {"compile": True}}).distill) == {}
    dc = parse_config({"distill": {"compile": True, "compile_mode": "max-autotune-no-cudagraphs"}}).distill
    assert compile_kwargs(dc) == {"mode": "max-autotune-no-cudagraphs"}
    assert not uses_cudagraphs(dc)
    assert uses_cudagraphs(parse_config({"distill": {"compile": True, "compile_mode": "reduce-overhead"}}).distill)


def test_tracking_flatten_limits():
    from pipelines.tracking import MAX_PARAM_CHARS, flatten

    flat = flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x" * 7000, "e": None, "f": {}})
    assert flat["a.b"] == "1" and flat["a.c"] == "[1, 2]" and flat["e"] == "null" and flat["f"] == "{}"
    assert len(flat["d"]) == MAX_PARAM_CHARS and flat["d"].endswith("...")


# --- a tiny embedding cache, as the data stage writes it --------------------------------------------


def _image(color: tuple[int, int, int], shape: str, size: int = 64) -> np.ndarray:
    img = np.full((size, size, 3), 245, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    c = size / 2
    mask = (yy - c) ** 2 + (xx - c) ** 2 < (size / 4) ** 2 if shape == "circle" else (
        (abs(yy - c) < size / 4) & (abs(xx - c) < size / 4))
    img[mask] = color
    return img


def make_cache(uri: str, teacher_uri: str, n_train: int = 64, n_val: int = 8):
    """Encode colored-shape images with the tiny teacher and write the cache by the contract."""
    from models.teacher import encode_prompts, load_teacher
    from pipelines.cache import CacheManifest, write_manifest, write_rows
    from pipelines.storage import join, model_dir

    teacher = load_teacher(model_dir(teacher_uri), dtype="float32", components=("vae", "text"))
    combos = [(c, s) for c in COLORS for s in SHAPES]
    rows = {"train": [], "val": []}
    for i in range(n_train + n_val):
        color, shape = combos[i % len(combos)]
        rows["train" if i < n_train else "val"].append((f"k{i}", f"a {color} {shape}", _image(COLORS[color], shape)))
    for split, items in rows.items():
        imgs = torch.tensor(np.stack([x[2] for x in items])).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            dist = teacher.vae.encode(imgs).latent_dist
            emb = encode_prompts(teacher, [x[1] for x in items])["prompt_embeds"]
        write_rows(join(uri, split, "part-0.parquet"), {
            "key": [x[0] for x in items], "caption": [x[1] for x in items], "split": [split] * len(items),
            "latent_mean": list(dist.mean.numpy()), "latent_std": list(dist.std.numpy()),
            "prompt_embeds": list(emb.numpy()),
        })
    manifest = CacheManifest(teacher=teacher_uri, family="sd1", prediction_type="epsilon", resolution=64,
                             latents="dist", vae_scaling_factor=teacher.vae_scale, latent_shape=(4, 16, 16),
                             embed_shape=(77, 32), rows={"train": n_train, "val": n_val}, source="test",
                             format="test", config_digest="test", created="now")
    write_manifest(uri, manifest)
    return manifest


# --- real distillations ------------------------------------------------------------------------------


def _config(work: Path, **distill) -> dict:
    return {"name": "t", "work_dir": str(work), "teacher": {"uri": "builtin:tiny-sd1"},
            "distill": {"num_workers": 2, "resources_per_worker": {"CPU": 0.5}, "batch_size": 4, "lr": 3e-4,
                        "sample_steps": 2, "sample_prompts": ["a red circle", "a blue square"], "log_every": 1,
                        "max_failures": 2, **distill}}


def _wait_for_checkpoint(run_dir: Path, step: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Until Ray Train has registered the checkpoint of `step` (its manager's snapshot names it)."""
    snapshot, name = run_dir / "checkpoint_manager_snapshot.json", f"checkpoint_{step:06d}"
    deadline = time.time() + timeout
    while not (snapshot.exists() and name in snapshot.read_text()):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the distill process exited ({proc.returncode}) before {name} was registered")
        if time.time() > deadline:
            raise AssertionError(f"{name} was not registered in {run_dir} within {timeout:.0f}s")
        time.sleep(0.02)


def _wait_for_checkpoint_on_disk(run_dir: Path, step: int, timeout: float, proc: subprocess.Popen) -> None:
    """Until the checkpoint folder of `step` is complete on disk (every rank's file list and files there), which is
    before Ray Train registers it in its snapshot (~0.5 s later)."""
    import pyarrow.fs as pafs

    from pipelines.train import checkpoint_complete

    folder = run_dir / f"checkpoint_{step:06d}"
    deadline = time.time() + timeout
    while not (folder.is_dir() and checkpoint_complete(pafs.LocalFileSystem(), str(folder))):
        if proc.poll() is not None:
            raise AssertionError(f"the distill process exited ({proc.returncode}) before {folder.name} was written")
        if time.time() > deadline:
            raise AssertionError(f"{folder} was not complete within {timeout:.0f}s")
        time.sleep(0.02)


def _train_workers(since: float) -> list[psutil.Process]:
    """Ray Train worker processes of our local Ray (children of this process) started after `since`."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()) and p.create_time() >= since:
                found.append(p)
        except psutil.Error:
            pass
    return found


@pytest.fixture(scope="module")
def job(tmp_path_factory, ray_local, mlflow_server):
    """One distillation job run twice: first as `distillery distill` in its own process, killed as soon as the
    checkpoint of step 4 is on disk (before Ray Train registers it); then the same config again here, during which
    one training worker is killed after the checkpoint of step 8. It must resume twice and finish at step 12."""
    from pipelines import distill
    from pipelines.config import load_config

    t0 = time.time()
    work = tmp_path_factory.mktemp("distill")
    make_cache(str(work / "cache"), "builtin:tiny-sd1")
    cfg_path = work / "config.yaml"
    # work_dir relative, as configs/ ship it: the Ray Train workers run in folders of their own
    cfg_path.write_text(yaml.safe_dump(_config(Path(work.name), max_steps=12, val_every=4, checkpoint_every=4,
                                               keep_checkpoints=2, zero_stage=2)))
    ckpts = work / "train" / "t-distill"
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    with open(work / "first.log", "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines", "distill", str(cfg_path)], cwd=work.parent, env=env,
                                stdout=out, stderr=out, start_new_session=True)
        try:
            _wait_for_checkpoint_on_disk(ckpts, 4, 480, proc)  # a busy 2-core CI: minutes
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # a stopped job: no chance to clean up, nor to register step 4
            proc.wait()
    time.sleep(2)

    print(f"[test] first run stopped after {time.time() - t0:.0f}s", flush=True)
    started, killed = time.time(), []

    def kill_one_worker():
        # the two workers are found while they train up to step 8, so the kill follows the registration of its
        # checkpoint at once: four steps run until the next one, and scanning every Ray process then could outlast them
        workers, deadline = [], time.time() + 480
        while len(workers) < 2 and time.time() < deadline:
            time.sleep(0.5)
            workers = _train_workers(started)
        _wait_for_checkpoint(ckpts, 8, 480)
        if workers:
            workers[-1].kill()
            killed.append(workers[-1].pid)

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    here = os.getcwd()
    os.chdir(work.parent)  # the config's paths are resolved where it is loaded, as the CLI does
    try:
        cfg = load_config(cfg_path)
    finally:
        os.chdir(here)
    assert cfg.distill.cache == str(work / "cache")
    result = distill.run(cfg)
    killer.join(10)
    print(f"[test] second run finished after {time.time() - started:.0f}s", flush=True)
    return {"cfg": cfg, "result": result, "work": work, "ckpts": ckpts, "killed": killed}


def _history(run_id: str, key: str) -> list:
    from mlflow.tracking import MlflowClient

    return sorted(MlflowClient().get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step))


def test_distill_resumes_after_stop_and_worker_failure(job):
    r = job["result"]
    assert r["step"] == 12 and job["killed"], "the run did not finish, or no worker was killed"
    resumed = [m.value for m in _history(r["mlflow_run_id"], "resumed_from_step")]
    # a fresh start, the rerun after the stop (from step 4), the restart after the killed worker (>= 4)
    assert resumed == [0, 4, 8]
    steps = {m.step for m in _history(r["mlflow_run_id"], "loss")}
    assert set(range(1, 13)) <= steps  # nothing lost: every step was trained and logged


def test_distill_loss_goes_down_and_checkpoints_exist(job):
    r = job["result"]
    val = {m.step: m.value for m in _history(r["mlflow_run_id"], "val_loss")}
    assert val[12] < val[0], val
    kept = sorted(p.name for p in job["ckpts"].glob("checkpoint_0*"))
    assert kept == ["checkpoint_000008", "checkpoint_000012"]  # keep_checkpoints=2
    assert (job["ckpts"] / "checkpoint_000012" / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").exists()


def test_distill_mlflow_run_contents(job):
    from mlflow.tracking import MlflowClient

    r = job["result"]
    client = MlflowClient()
    run = client.get_run(r["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["distill.max_steps"] == "12" and run.data.params["student.preset"] == "bk-small"
    assert run.data.params["distill.loss.feat"] == "1.0"
    for key in ("loss_task", "loss_out", "loss_feat", "lr", "samples_per_s", "val_loss", "val_out"):
        assert key in run.data.metrics, key
    grids = {f.path for f in client.list_artifacts(r["mlflow_run_id"], "grids")}
    assert {"grids/step_000000.png", "grids/step_000012.png"} <= grids
    student = {f.path for f in client.list_artifacts(r["mlflow_run_id"], "student")}
    assert "student/unet" in student and "student/model_index.json" in student


def test_exported_student_loads_in_plain_diffusers_and_rerun_is_skipped(job):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from pipelines import distill

    out = Path(job["result"]["output"])
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    assert unet.mid_block is None  # bk-small
    pipe = StableDiffusionPipeline.from_pretrained(out)
    img = pipe("a red circle", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()
    again = distill.run(job["cfg"])
    assert again.get("skipped") and again["step"] == 12


def test_continued_distillation_starts_from_a_student_folder_with_another_teacher(job, tmp_path):
    """student.start_from (SSD-1B's continued, multi-teacher training): the distilled student of `job` goes on
    against a second teacher of the same architecture (a fine-tune: the tiny teacher's U-Net perturbed). It starts
    from that folder's U-Net (with a vanishing learning rate its export is that U-Net), not from the new teacher's
    blocks; its distillery.json says where it started. A folder that records no spec is refused, naming it."""
    from diffusers import UNet2DConditionModel

    from models.student import build_student, preset_spec
    from models.teacher import load_teacher, resolve_model_dir
    from pipelines import distill

    start = Path(job["result"]["output"])
    second = tmp_path / "teacher-2"
    shutil.copytree(resolve_model_dir("builtin:tiny-sd1"), second)
    unet = UNet2DConditionModel.from_pretrained(second / "unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.01)
    unet.save_pretrained(second / "unet")
    make_cache(str(tmp_path / "cache"), str(second), n_train=16, n_val=4)
    tree = _config(tmp_path, max_steps=2, val_every=2, checkpoint_every=2, num_workers=1, deepspeed=False, lr=1e-12)
    tree.update(teacher={"uri": str(second)}, student={"start_from": str(start)},
                data={"output": str(tmp_path / "cache")})
    result = distill.run(parse_config(tree))
    assert result["step"] == 2
    out = Path(result["output"])
    meta = json.loads((out / "distillery.json").read_text())
    assert meta["start_from"] == str(start) and meta["preset"] == "bk-small" and meta["teacher"] == str(second)
    got = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    began = UNet2DConditionModel.from_pretrained(start / "unet").state_dict()
    fresh = build_student(load_teacher(str(second), components=("unet",), dtype="float32").unet,
                          preset_spec("bk-small", unet.config)).state_dict()
    assert all(torch.allclose(got[k], began[k], atol=1e-6) for k in got)
    assert any(not torch.allclose(got[k], fresh[k], atol=1e-4) for k in got)
    with pytest.raises(ValueError, match="records no spec or preset") as err:
        distill.start_spec(str(second), unet.config)
    assert str(second) in str(err.value)
    with pytest.raises(ConfigError, match="student.spec"):
        parse_config({**tree, "student": {"start_from": str(start), "spec": {"down": [[0]], "up": [[0]]}}})


def test_distill_zero3_on_s3_exports_consolidated_student(tmp_path, ray_local, mlflow_server, s3_bucket):
    import boto3
    from diffusers import UNet2DConditionModel

    from models.student import build_student, preset_spec
    from models.teacher import load_teacher, resolve_model_dir
    from pipelines import distill
    from pipelines.storage import list_files, read_bytes

    # the teacher on S3 too: the driver and every worker fetch it through pipelines.storage.model_dir
    tiny = Path(resolve_model_dir("builtin:tiny-sd1"))
    for f in tiny.rglob("*"):
        if f.is_file():
            boto3.client("s3").upload_file(str(f), s3_bucket.removeprefix("s3://"), f"teacher/{f.relative_to(tiny)}")
    teacher_uri = f"{s3_bucket}/teacher"
    make_cache(str(tmp_path / "cache"), teacher_uri, n_train=32, n_val=4)
    # with float8 matmuls in both U-Nets' transformer layers: they train and export as plain nn.Linear weights; and
    # with the KD settings of later papers (transformer-level features normalized as LAPTOP-Diff, self-attention
    # KD, min-SNR weights, tempered attention transfer), each term logged on its own
    loss = {"level": "transformer", "feat_norm": True, "self_attn": 0.5, "attn": 0.5, "attn_temperature": 2.0,
            "min_snr_gamma": 5.0}
    tree = _config(tmp_path, max_steps=2, val_every=2, checkpoint_every=2, zero_stage=3, fp8_linear="both",
                   storage_path=f"{s3_bucket}/train", output=f"{s3_bucket}/student", lr=1e-3, loss=loss)
    tree["data"] = {"output": str(tmp_path / "cache")}
    tree["teacher"] = {"uri": teacher_uri}
    tree["mlflow"] = {"tracking_uri": mlflow_server.url, "experiment": "zero3-kd-terms"}
    result = distill.run(parse_config(tree))
    assert result["step"] == 2
    from mlflow.tracking import MlflowClient

    run = MlflowClient(mlflow_server.url).get_run(result["mlflow_run_id"])
    for term in ("task", "out", "feat", "attn", "self_attn"):
        assert run.data.metrics[f"loss_{term}"] > 0 and run.data.metrics[f"val_{term}"] > 0, term
    assert run.data.params["distill.loss.level"] == "transformer"
    files = list_files(f"{s3_bucket}/train/t-distill/checkpoint_000002/ds")
    assert {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"} <= set(files)
    local = tmp_path / "exported"
    local.mkdir()
    for name in list_files(f"{s3_bucket}/student/unet"):
        (local / name).write_bytes(read_bytes(f"{s3_bucket}/student/unet/{name}"))
    trained = UNet2DConditionModel.from_pretrained(local)
    teacher = load_teacher("builtin:tiny-sd1", components=("unet",), dtype="float32")
    init = build_student(teacher.unet, preset_spec("bk-small", teacher.unet.config))
    a, b = init.state_dict(), trained.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    moved = sum(float((a[k] - b[k]).abs().max()) > 0 for k in a)
    assert moved > len(a) // 2  # the whole student was consolidated from the shards, trained


def test_distill_imports_no_mlflow():
    """MLflow loads only where a run is tracked: the training code (and the GPU benchmark, whose offline bundle
    leaves MLflow out) imports without it."""
    code = "import sys, pipelines.distill, pipelines.fewstep; print(sorted(m for m in sys.modules if 'mlflow' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_cpu_deepspeed_skips_the_shm_op_build():
    """On CPU the DeepSpeed backend would JIT-compile its shared-memory all-reduce op (C++, up to minutes) at
    every engine start; the engine marks it off first, so DeepSpeed's own check builds nothing."""
    code = ("import os; os.environ['DS_ACCELERATOR'] = 'cpu'\n"
            "from pipelines.train import skip_shm_comm_build\n"
            "skip_shm_comm_build()\n"
            "from deepspeed.comm.torch import build_shm_op\n"
            "print(build_shm_op())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "None", out.stdout
    assert "built successfully" not in out.stdout + out.stderr
