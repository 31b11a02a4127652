"""KD step throughput: a plain PyTorch reference loop against our Ray Train + DeepSpeed path, same run.

    python bench/distill_throughput.py                      # SD 1.5 -> bk-small, 512 px, 32 samples per GPU
    python bench/distill_throughput.py --teacher sdxl --preset ssd-1b --resolution 1024 --batch 8
    python bench/distill_throughput.py --tiny               # CPU smoke check (tiny-sd1, 64 px)

Both sides build full-size U-Nets from their public configs with random weights (no network, no
download) and train on latents and text embeddings already in memory, as the embedding cache provides
them (no VAE or text encoder in the loop). Each step: noise at random t, the frozen teacher and the
student forward with feature hooks, the KD loss of models/kd.py (task + output + block features),
backward, AdamW step.

  reference  one process, eager: fp32 weights under bf16 autocast, teacher too; torch AdamW (foreach).
  ours       Ray Train TorchTrainer, one worker per GPU, DeepSpeed ZeRO-2 with our levers: bf16 student
             weights with fp32 master weights in the optimizer, teacher in bf16 without autograd, fused
             AdamW, channels_last, optionally torch.compile (--compile) and larger micro-batches (--batch).

Prints a table and appends it to bench/RESULTS.md (section "Distillation") with the hardware.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.kd import KDWeights, diffusion_batch, feature_pairs, kd_loss  # noqa: E402
from models.student import build_student, count_params, preset_spec  # noqa: E402
from pipelines.student_cli import SD15_UNET, SDXL_UNET  # noqa: E402

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = """`bench/distill_throughput.py`: KD step throughput (SD 1.5 -> bk-small, 512 px, latents from memory as the
cache gives them, random weights) of our Ray Train + DeepSpeed ZeRO-2 path against a plain eager PyTorch loop
(fp32 weights under bf16 autocast) in the same run. Reference figures given with the task (random weights, one
H100): plain eager bf16-autocast loop 92.7 samples/s; Ray Train + DeepSpeed ZeRO-2 83.5 samples/s. Goal: >= 2x
the plain eager loop per GPU. GPU command (to be run by the lead): `python bench/distill_throughput.py`
(add `--compile`, `--batch 48`, `--gpus N` to try more levers). Tables below; a --tiny row is a CPU smoke run,
not a performance claim.
"""


def unet_config(args: argparse.Namespace) -> dict:
    if args.tiny:
        from models.tiny import SD1_UNET

        return dict(SD1_UNET, sample_size=16)
    return dict(SDXL_UNET if args.teacher == "sdxl" else SD15_UNET)


def models(args: argparse.Namespace) -> tuple:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    teacher = UNet2DConditionModel.from_config(unet_config(args))
    spec = preset_spec(args.preset, teacher.config)
    student = build_student(teacher, spec)
    teacher.requires_grad_(False).eval()
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return teacher, student, spec, sched


def synthetic_batch(args: argparse.Namespace, teacher, n: int, device) -> tuple[torch.Tensor, dict]:
    """Scaled latents and conditioning, as a cache batch gives them."""
    f = 8 if not args.tiny else 4
    lat = torch.randn(n, 4, args.resolution // f, args.resolution // f, device=device)
    d = teacher.config.cross_attention_dim
    cond = {"encoder_hidden_states": torch.randn(n, 77, d, device=device)}
    if teacher.config.addition_embed_type == "text_time":
        r = args.resolution
        cond["added_cond_kwargs"] = {
            "text_embeds": torch.randn(n, teacher.config.projection_class_embeddings_input_dim - 6 * 256,
                                       device=device),
            "time_ids": torch.tensor([[r, r, 0, 0, r, r]] * n, dtype=torch.float32, device=device)}
    return lat, cond


def timed(step_fn, warmup: int, steps: int, device) -> float:
    for _ in range(warmup):
        step_fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step_fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def reference(args: argparse.Namespace) -> dict:
    """The plain eager loop: what a straightforward PyTorch KD script does."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    teacher, student, spec, sched = models(args)
    teacher.to(device)
    student.to(device).train()
    pairs = feature_pairs(student, teacher, spec)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    lat, cond = synthetic_batch(args, teacher, args.ref_batch, device)
    use_amp = device.type == "cuda"

    def step():
        noisy, t, target = diffusion_batch(sched, lat, "epsilon")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = kd_loss(student, teacher, noisy, t, cond, target, KDWeights(), pairs)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    secs = timed(step, args.warmup, args.steps, device)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    name = "reference (eager, bf16 autocast)" if use_amp else "reference (eager, fp32)"
    return {"name": name, "workers": 1, "batch": args.ref_batch,
            "samples_per_s": args.ref_batch * args.steps / secs, "mem_gb": mem,
            "params": count_params(student)}


def ours_worker(config: dict) -> None:
    """A Ray Train worker running our engine (pipelines/distill.py: StudentEngine, teacher_dtype)."""
    import ray.train

    args = argparse.Namespace(**config["args"])
    if args.tiny:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from pipelines.config import parse_config
    from pipelines.distill import StudentEngine, _to, teacher_dtype

    ctx = ray.train.get_context()
    use_gpu = not args.tiny
    device = torch.device("cuda", ctx.get_local_rank()) if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dc = parse_config({"distill": {
        "zero_stage": args.zero_stage, "precision": "fp32" if args.tiny else "bf16", "batch_size": args.batch,
        "channels_last": not args.no_channels_last, "compile": args.compile, "use_gpu": use_gpu,
        "max_steps": args.warmup + args.steps, "lr": 1e-5}}).distill
    teacher, student, spec, sched = models(args)
    t_dtype = teacher_dtype("auto", dc.precision, device)
    teacher.to(device, t_dtype)
    pairs = feature_pairs(student, teacher, spec)
    if dc.channels_last:  # as pipelines/distill.py: teacher weights and inputs NHWC (DeepSpeed needs the
        teacher.to(memory_format=torch.channels_last)  # student's parameters contiguous)
    eng = StudentEngine(student, dc, ctx.get_world_size(), device)
    lat, cond = synthetic_batch(args, teacher, args.batch, device)
    cond = _to(cond, device, eng.input_dtype)

    def step():
        noisy, t, target = diffusion_batch(sched, lat, "epsilon")
        if dc.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        with eng.autocast():
            loss = kd_loss(eng.engine, teacher, noisy.to(eng.input_dtype), t, cond, target, KDWeights(), pairs)
        eng.backward_step(loss["loss"])

    if use_gpu:
        torch.cuda.reset_peak_memory_stats()
    secs = timed(step, args.warmup, args.steps, device)
    mem = torch.cuda.max_memory_allocated() / 2**30 if use_gpu else float("nan")
    # Train V2 keeps result.metrics only for reports with a checkpoint: rank 0 reports a tiny one
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        Path(d, "done").write_text("1")
        ckpt = ray.train.Checkpoint.from_directory(d) if ctx.get_world_rank() == 0 else None
        ray.train.report({"secs": secs, "mem_gb": mem}, checkpoint=ckpt)


def ours(args: argparse.Namespace) -> dict:
    import tempfile

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        ray.init(include_dashboard=False, num_cpus=2 if args.tiny else None)
    gpus = 0 if args.tiny else int(ray.cluster_resources().get("GPU", 0))
    workers = 1 if args.tiny else max(1, min(args.gpus or gpus, gpus))
    env = {"DS_ACCELERATOR": "cpu"} if args.tiny else {}
    # the repo first, then whatever the driver already had (site bundles on GPU hosts)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(Path(__file__).resolve().parents[1]),
                                                   os.environ.get("PYTHONPATH")] if p)
    metrics = {}

    # by reference (the module, importable on workers through PYTHONPATH), not pickled from __main__
    from bench.distill_throughput import ours_worker as worker_fn

    trainer = TorchTrainer(
        worker_fn,
        train_loop_config={"args": vars(args)},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=not args.tiny,
                                     resources_per_worker={"CPU": 1} if args.tiny else None),
        torch_config=TorchConfig(backend="gloo" if args.tiny else "nccl"),
        run_config=RunConfig(name=f"bench-{int(time.time())}", storage_path=tempfile.mkdtemp(),
                             worker_runtime_env={"env_vars": env}),
    )
    result = trainer.fit()
    metrics = result.metrics
    if not metrics:  # no checkpoint reported: Train V2 may leave result.metrics empty
        raise RuntimeError("the benchmark worker reported no metrics")
    levers = [f"ZeRO-{args.zero_stage}"] + (["fp32 on CPU", "teacher no-grad"] if args.tiny else [
        "bf16 weights", "teacher bf16 no-grad", "fused AdamW"])
    levers += ([] if args.no_channels_last else ["channels_last"]) + (["torch.compile"] if args.compile else [])
    return {"name": "ours (Ray Train + DeepSpeed: " + ", ".join(levers) + ")", "workers": workers,
            "batch": args.batch, "samples_per_s": workers * args.batch * args.steps / metrics["secs"],
            "mem_gb": metrics["mem_gb"]}


def hardware(args: argparse.Namespace) -> str:
    if torch.cuda.is_available() and not args.tiny:
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", choices=["sd15", "sdxl"], default="sd15")
    p.add_argument("--preset", default=None, help="default: bk-small (sd15), ssd-1b (sdxl)")
    p.add_argument("--resolution", type=int, default=None, help="default 512 (sd15), 1024 (sdxl)")
    p.add_argument("--batch", type=int, default=32, help="our micro-batch per GPU")
    p.add_argument("--ref-batch", type=int, default=None, help="the reference's batch (default: --batch)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--gpus", type=int, default=None, help="workers for ours (default: all GPUs)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--tiny", action="store_true", help="CPU smoke check on tiny-sd1 at 64 px")
    p.add_argument("--no-append", action="store_true", help="do not append to bench/RESULTS.md")
    args = p.parse_args()
    if args.tiny:
        args.teacher, args.resolution = "sd15", args.resolution or 64
        args.batch, args.steps, args.warmup = min(args.batch, 4), min(args.steps, 3), min(args.warmup, 1)
    args.preset = args.preset or ("ssd-1b" if args.teacher == "sdxl" else "bk-small")
    args.resolution = args.resolution or (1024 if args.teacher == "sdxl" else 512)
    args.ref_batch = args.ref_batch or args.batch

    rows = [] if args.skip_reference else [reference(args)]
    if not args.skip_reference and torch.cuda.is_available():
        torch.cuda.empty_cache()
    rows.append(ours(args))
    base = rows[0]["samples_per_s"] / rows[0]["workers"]
    lines = [
        f"### KD step throughput, {args.teacher} -> {args.preset}, {args.resolution} px"
        f"{' (tiny smoke check)' if args.tiny else ''}",
        "",
        f"{datetime.date.today()}, {hardware(args)}, torch {torch.__version__}, random weights, latents in memory, "
        f"{args.steps} timed steps after {args.warmup} warm-up. `python bench/distill_throughput.py "
        + " ".join(sys.argv[1:]) + "`",
        "",
        "| path | workers | batch/worker | samples/s | samples/s per worker | vs reference (per worker) | peak GiB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        per = r["samples_per_s"] / r["workers"]
        lines.append(f"| {r['name']} | {r['workers']} | {r['batch']} | {r['samples_per_s']:.1f} | {per:.1f} | "
                     f"{per / base:.2f}x | {r['mem_gb']:.1f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if not args.no_append:
        text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
        if "\n## Distillation\n" not in text:
            text = text.rstrip("\n") + "\n\n## Distillation\n\n" + SECTION
        RESULTS.write_text(text.rstrip("\n") + "\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
