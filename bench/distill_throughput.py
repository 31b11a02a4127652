"""KD step throughput: a plain PyTorch reference loop against our Ray Train + DeepSpeed path, lever by lever, same run.

    python bench/distill_throughput.py        # SD 1.5 -> bk-small, 512 px, 32/GPU: ref, ours, ours+compile, ...+big
    python bench/distill_throughput.py --levers ref,ref+bf16t,ref+fused,ref+cl,ref+encode,ours,ours+nocl,ddp
    python bench/distill_throughput.py --teacher sdxl --preset ssd-1b --resolution 1024 --batch 8 --levers ref,ours
    python bench/distill_throughput.py --tiny # CPU smoke check (tiny-sd1, 64 px)

Both sides build full-size U-Nets from their public configs with random weights (no network, no
download) and train on latents and text embeddings already in memory, as the embedding cache provides
them (no VAE or text encoder in the loop unless +encode). Each step: noise at random t, the frozen teacher
and the student forward with feature taps, the KD loss of models/kd.py (task + output + block features),
backward, AdamW step.

Rows (--levers, comma-separated; each a base with +modifiers), measured one by one: the reference rows in
this process first, then all rows of ours in one Ray Train run (one worker per GPU; the teacher is built
once, each row builds its student and engine afresh and frees them, and resets torch.compile's caches):
  ref      plain eager loop: fp32 weights under bf16 autocast (the teacher too, under no_grad), torch AdamW
           (foreach), hooks registered at every step (kd_loss without taps)
  ours     pipelines/distill.py's engine: DeepSpeed ZeRO-2, bf16 weights with fp32 master weights, teacher in bf16
           without autograd, fused AdamW, channels_last teacher and inputs, KD taps registered once (KDTaps)
  ddp      ours without DeepSpeed (distill.deepspeed false): fp32 weights under bf16 autocast, fused AdamW, teacher
           in bf16 without autograd, channels_last student too, KDTaps
modifiers:
  +compile torch.compile of the student and teacher forwards (ours/ddp: distill.compile; ref: torch.compile of
           both with KDTaps); --compile-mode applies. Its warm-up column holds the compilation.
  +big     micro-batch --big-batch (default 2x --batch); skipped when the same row without +big, measured
           earlier, had a peak memory that scaled to the bigger batch does not fit the GPU
  +nocl    channels_last off (ours, ddp)          +z0 .. +z3  ZeRO stage (ours; default 2)
  +cl      channels_last on (ref)                 +fused      fused AdamW (ref)
  +bf16t   teacher weights in bf16, no autocast cast for it (ref)
  +encode  VAE encoder + text encoder in the loop, as without the embedding cache (ref, sd15 only)
  +cudnnb  torch.backends.cudnn.benchmark (ours/ddp: distill.cudnn_benchmark; ref: set for the row)
  +sdpa-cudnn, +sdpa-flash, +sdpa-efficient  that fused attention kernel first in PyTorch's SDPA priority list
           (ours/ddp: distill.attention_backend; ref: set for the row). Without one, both sides use diffusers'
           default attention: PyTorch SDPA in its own order (cuDNN attention first on the H200 in torch 2.11).
  +nhwcbwd torch._inductor.config.force_layout_optimization for the row: Inductor turns its channels_last layout
           optimization off for graphs without an aten.convolution node, which are the compiled backward graphs
           (pytorch/pytorch#189239), so their gradients come out NCHW and every convolution_backward copies them
           back to channels_last
  +graph   distill.cuda_graph (ddp, one GPU): each training step captured once as a CUDA graph and replayed
  +fp8     distill.fp8_linear both (ours, ddp): the transformer blocks' linear layers of student and teacher
           multiply in float8 (models/fp8.py; needs compute capability 8.9+)
  +fp8s    distill.fp8_linear student: the same for the student only (ours, ddp)
  +buckets each batch of one of three aspect-ratio buckets of data.aspect_buckets at --resolution (the square one
           and the two two steps away: 1152x896 and 896x1152 at 1024 px), each first seen in the warm-up, then in a
           seeded random order, as pipelines/train.py's TrainBatches draws an aspect-bucketed cache (ours, ddp).
           The buckets hold ~1% fewer pixels than the square: the note gives the ratio

--profile: after a row's timed steps, 3 more run under torch.profiler; the GPU kernel time per step, split by
kind (convolution, matmul, attention, Triton-fused pointwise/norm, optimizer, copies, other), is printed and
tabled under the main table as ms and % of the timed step, with the TFLOP/s the convolution, matmul and attention
kernels reach against their model FLOPs (meta-device count) and the CPU-side ops behind the copies.

Time: --budget bounds the whole run: a row whose estimated time (the longest earlier row of its kind, else a
default) would end past it is skipped with a printed note; so are all rows after one that took longer than
--row-budget. A row that fails (an error, out of memory) is reported with its error and the run goes on.
Prints a table (speed-up per worker over the `ref` row, else the first ref row) and appends it to
bench/RESULTS.md (section "Distillation") with the hardware; --json also writes the rows.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

T0 = time.time()  # --budget counts from here: torch's and diffusers' imports included

import torch  # noqa: E402
from torch._inductor import config as inductor_config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import append_to_section, kd_unet_configs, teacher_unet_config  # noqa: E402
from models.fp8 import use_fp8_linear  # noqa: E402
from models.kd import CUDAGRAPH_MODES, KDTaps, KDWeights, diffusion_batch, feature_pairs, kd_loss  # noqa: E402
from models.student import build_student, preset_spec  # noqa: E402
from pipelines.student_cli import SD15_TEXT, SD15_VAE  # noqa: E402
from pipelines.train import fp8_linears, prefer_attention_backend  # noqa: E402

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = """`bench/distill_throughput.py`: KD step throughput (SD 1.5 -> bk-small, 512 px, latents from memory as the
cache gives them, random weights) of our Ray Train + DeepSpeed ZeRO-2 path against a plain eager PyTorch loop
(fp32 weights under bf16 autocast) in the same run, lever by lever (see the script's docstring for the rows).
Goal: >= 2x the plain eager loop per GPU. Tables below; a --tiny table is a CPU smoke run, not a performance claim.
"""
DEFAULT_LEVERS = "ref,ours,ours+compile,ours+compile+big"
SDPA = {"sdpa-flash", "sdpa-efficient", "sdpa-cudnn"}
BASES = {"ref": {"compile", "big", "cl", "fused", "bf16t", "encode", "cudnnb", "nhwcbwd"} | SDPA,
         "ours": {"compile", "big", "nocl", "z0", "z1", "z2", "z3", "cudnnb", "nhwcbwd", "fp8", "fp8s",
                  "buckets"} | SDPA,
         "ddp": {"compile", "big", "nocl", "cudnnb", "nhwcbwd", "fp8", "fp8s", "graph", "buckets"} | SDPA}
WHAT = {"ref": "eager, fp32 weights + {amp}, {adam} AdamW",
        "ours": "Ray Train + DeepSpeed ZeRO-{z}, {half} weights, teacher {half} no-grad, fused AdamW{cl}",
        "ddp": "Ray Train, no DeepSpeed: {amp}, teacher {half} no-grad, fused AdamW{cl}"}
MOD_WHAT = {"compile": "torch.compile", "cl": "channels_last", "bf16t": "teacher bf16",
            "encode": "VAE + text encoder in the loop", "cudnnb": "cudnn.benchmark",
            "nhwcbwd": "Inductor layout optimization forced (channels_last backward graphs)",
            "fp8": "FP8 transformer linears (student and teacher)", "fp8s": "FP8 transformer linears (student)",
            "graph": "each step one CUDA graph (distill.cuda_graph)",
            "buckets": "aspect-ratio buckets (each batch one of 3 sizes)",
            **{m: f"{m[5:]} attention first" for m in SDPA}}
# seconds a row is expected to take before one of its kind was measured (H200: SD 1.5 at 512 px, batch 32; SDXL at
# 1024 px, batch 8, whose compilation took 336-393 s)
DEFAULT_ROW_S = {"sd15": {"compile": 200.0, "eager": 45.0}, "sdxl": {"compile": 420.0, "eager": 60.0}}


# ---------------------------------------------------------------------------------------------------
# Levers: parsing, names, estimates.
# ---------------------------------------------------------------------------------------------------


def parse_levers(text: str) -> list[dict]:
    """'ref,ours+compile+big' -> [{"key": "ref", "base": "ref", "mods": []}, ...]; errors name the bad lever."""
    rows = []
    for key in [k.strip() for k in text.split(",") if k.strip()]:
        base, *mods = key.split("+")
        if base not in BASES:
            raise SystemExit(f"--levers: {key!r}: unknown base {base!r} (choose from {', '.join(BASES)})")
        bad = [m for m in mods if m not in BASES[base]]
        if bad:
            raise SystemExit(f"--levers: {key!r}: {', '.join(bad)} not a modifier of {base} "
                             f"(choose from {', '.join(sorted(BASES[base]))})")
        if sum(m.startswith("z") for m in mods) > 1:
            raise SystemExit(f"--levers: {key!r}: give one ZeRO stage")
        rows.append({"key": key, "base": base, "mods": mods})
    if not rows:
        raise SystemExit("--levers: no rows given")
    return rows


def zero_stage(row: dict, args: argparse.Namespace) -> int:
    return next((int(m[1]) for m in row["mods"] if m.startswith("z")), args.zero_stage)


def row_batch(row: dict, args: argparse.Namespace) -> int:
    return args.big_batch if "big" in row["mods"] else args.batch


def describe(row: dict, args: argparse.Namespace) -> str:
    mods = row["mods"]
    what = WHAT[row["base"]].format(z=zero_stage(row, args), cl="" if "nocl" in mods else ", channels_last",
                                    amp="fp32 (CPU)" if args.tiny else "bf16 autocast",
                                    half="fp32" if args.tiny else "bf16",
                                    adam="fused" if "fused" in mods else "foreach")
    return what + "".join(f" + {MOD_WHAT[m]}" for m in mods if m in MOD_WHAT)


def blank(row: dict, args: argparse.Namespace, workers: int, note: str = "") -> dict:
    """A row's result before (or instead of) measuring it."""
    if not note and "buckets" in row["mods"]:
        sizes = bench_buckets(args)
        pixels = sum(w * h for w, h in sizes) / len(sizes) / args.resolution**2
        note = f"buckets {', '.join(f'{w}x{h}' for w, h in sizes)}: {pixels:.3f}x the square's pixels per sample"
    return {"key": row["key"], "base": row["base"], "mods": row["mods"], "what": describe(row, args),
            "workers": workers, "batch": row_batch(row, args), "note": note}


def estimate(row: dict, done: list[dict], args: argparse.Namespace) -> float:
    """Seconds the row will likely take: the longest measured row of its kind (compiled or not), else a default."""
    kind = "compile" if "compile" in row["mods"] else "eager"
    seen = [r["wall_s"] for r in done if r.get("wall_s") and ("compile" in r["mods"]) == (kind == "compile")]
    base = max(seen) if seen else DEFAULT_ROW_S[args.teacher][kind] * (0.5 if args.tiny else 1.0)
    return base * (1.1 if "big" in row["mods"] else 1.0)


def skip_reason(row: dict, done: list[dict], args: argparse.Namespace, deadline: float) -> str | None:
    """Why the row is not run (budget, memory), or None."""
    slow = [r for r in done if r.get("wall_s") and r["wall_s"] > args.row_budget]
    if slow:
        return f"skipped: row {slow[0]['key']} took {slow[0]['wall_s']:.0f} s > --row-budget {args.row_budget:.0f} s"
    left, need = deadline - time.time(), estimate(row, done, args)
    if need > left:
        return f"skipped: ~{need:.0f} s expected, {max(left, 0):.0f} s left of --budget {args.budget:.0f} s"
    if "big" in row["mods"] and torch.cuda.is_available() and not args.tiny:
        small_key = "+".join([row["base"]] + [m for m in row["mods"] if m != "big"])
        small = next((r for r in done if r["key"] == small_key and r.get("mem_gb")), None)
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
        if small is not None:
            need_gb = small["mem_gb"] * args.big_batch / small["batch"]
            if need_gb > 0.95 * total:
                return (f"skipped: {small_key} peaked at {small['mem_gb']:.1f} GiB at batch {small['batch']}, "
                        f"~{need_gb:.0f} GiB at {args.big_batch} > {total:.0f} GiB")
    return None


# ---------------------------------------------------------------------------------------------------
# Models and batches (both sides).
# ---------------------------------------------------------------------------------------------------


def models(args: argparse.Namespace) -> tuple:
    """Teacher and student (fp32, CPU, random weights), the removal spec, the noise scheduler."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    # random init is much faster on the GPU; the weights then wait on the CPU, out of the rows' peak memory
    with torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"):
        teacher = UNet2DConditionModel.from_config(teacher_unet_config(args))
        spec = preset_spec(args.preset, teacher.config)
        student = build_student(teacher, spec)
    teacher, student = teacher.cpu(), student.cpu()
    teacher.requires_grad_(False).eval()
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return teacher, student, spec, sched


# dense (no sparsity) bf16 tensor-core peak, TFLOP/s, of the GPUs these benchmarks run on (vendor data sheets, SXM)
BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def model_flops(args: argparse.Namespace) -> dict:
    """Model FLOPs of one KD sample (2 x MACs): the teacher's forward, the student's forward and backward (3x its
    forward), counted on the meta device (no weights, no GPU) with the rows' shapes."""
    from models.metrics import unet_macs

    full, student_cfg, h = kd_unet_configs(teacher_unet_config(args), args)
    teacher = unet_macs(full, h, h)
    student = unet_macs(student_cfg, h, h)
    return {"teacher_gmacs": teacher / 1e9, "student_gmacs": student / 1e9,
            "tflop_per_sample": 2 * (teacher + 3 * student) / 1e12}


# aten ops of the meta-device FLOP count -> the kernel kinds of --profile (the meta device runs SDPA as two bmm,
# and these U-Nets have no other bmm)
OP_KINDS = {"convolution": "convolution", "convolution_backward": "convolution", "mm": "matmul", "addmm": "matmul",
            "bmm": "attention"}


def op_tflops(args: argparse.Namespace) -> dict[str, float]:
    """Model TFLOP of one KD sample by kernel kind (convolution, matmul, attention): the teacher's forward and the
    student's forward and backward (as autograd runs it: no gradient for the input, so the total is a little
    below model_flops' 3x forward), counted on the meta device (no weights) by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    from models.metrics import unet_inputs
    from models.student import meta_unet

    full, student_cfg, h = kd_unet_configs(teacher_unet_config(args), args)
    kinds: dict[str, float] = {}
    for config, train in ((full, False), (student_cfg, True)):
        unet = meta_unet(config)
        inputs, kwargs = unet_inputs(unet.config, 1, h, h, device="meta")
        with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(train):
            out = unet(*inputs, **kwargs).sample
            if train:
                out.sum().backward()
        for op, flops in counter.get_flop_counts()["Global"].items():
            kind = OP_KINDS.get(str(op).split(".")[-1], "other")
            kinds[kind] = kinds.get(kind, 0.0) + flops / 1e12
    return kinds


def bf16_peak(args: argparse.Namespace) -> tuple[str, float] | None:
    """(GPU name, dense bf16 peak TFLOP/s) when the rows ran on a GPU of BF16_PEAK_TFLOPS."""
    if args.tiny or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next(((k, v) for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def flops_line(args: argparse.Namespace, rows: list[dict], ref_per_worker: float | None) -> str:
    """What the rows are in model FLOPs, and in % of the GPU's bf16 peak when it is known."""
    f = model_flops(args)
    text = (f"Model FLOPs per KD sample: teacher forward {f['teacher_gmacs']:.1f} GMACs + {args.preset} forward and "
            f"backward 3 x {f['student_gmacs']:.1f} GMACs = {f['tflop_per_sample']:.3g} TFLOP.")
    peak = bf16_peak(args)
    if peak is None:
        return text
    gpu, tflops = peak

    def pct(per_worker: float) -> str:
        achieved = per_worker * f["tflop_per_sample"]
        return f"{achieved:.0f} TFLOP/s = {100 * achieved / tflops:.0f}%"

    parts = [f"`{r['key']}` {pct(r['samples_per_s'] / r['workers'])}" for r in rows if r.get("samples_per_s")]
    text += (f" Per worker, of the {gpu}'s {tflops:.0f} TFLOP/s dense bf16 peak: " + ", ".join(parts)
             + (f"; the 2x goal is {pct(2 * ref_per_worker)}" if ref_per_worker else "") + ".")
    return text


def synthetic_batch(args: argparse.Namespace, teacher, n: int, device,
                    size: tuple[int, int] | None = None) -> tuple[torch.Tensor, dict]:
    """Scaled latents and conditioning, as a cache batch gives them; `size` (width, height), default square."""
    f = 8 if not args.tiny else 4
    w, h = size or (args.resolution, args.resolution)
    lat = torch.randn(n, 4, h // f, w // f, device=device)
    d = teacher.config.cross_attention_dim
    cond = {"encoder_hidden_states": torch.randn(n, 77, d, device=device)}
    if teacher.config.addition_embed_type == "text_time":
        cond["added_cond_kwargs"] = {
            "text_embeds": torch.randn(n, teacher.config.projection_class_embeddings_input_dim - 6 * 256,
                                       device=device),
            "time_ids": torch.tensor([[h, w, 0, 0, h, w]] * n, dtype=torch.float32, device=device)}
    return lat, cond


def bench_buckets(args: argparse.Namespace) -> list[tuple[int, int]]:
    """The square bucket of data.aspect_buckets at --resolution and the two two steps away from it."""
    from pipelines.prepare import aspect_buckets

    buckets = aspect_buckets(args.resolution)
    i = buckets.index((args.resolution, args.resolution))
    return [buckets[i], buckets[i + 2], buckets[i - 2]]


def bucket_order(n_buckets: int, steps: int, seed: int = 0) -> list[int]:
    """Which bucket each step draws: every bucket once, then a seeded random draw per step."""
    rng = random.Random(seed)
    return list(range(n_buckets)) + [rng.randrange(n_buckets) for _ in range(steps)]


def encoders(args: argparse.Namespace, device) -> tuple:
    """SD 1.5's VAE encoder and text encoder (random weights; tiny ones for --tiny), for +encode."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    if args.tiny:
        from models.tiny import VAE

        vae = AutoencoderKL.from_config(VAE)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, max_position_embeddings=77))
    else:
        vae = AutoencoderKL.from_config(SD15_VAE)
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    return vae.to(device).requires_grad_(False).eval(), text.to(device).requires_grad_(False).eval()


def timed(step_fn, warmup: int, steps: int, device) -> tuple[float, float]:
    """(seconds of the warm-up steps, compilation included; seconds of the timed steps)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    t = time.perf_counter()
    for _ in range(warmup):
        step_fn()
    sync()
    t_warm = time.perf_counter()
    for _ in range(steps):
        step_fn()
    sync()
    return t_warm - t, time.perf_counter() - t_warm


def free_memory() -> None:
    import torch._dynamo

    torch._dynamo.reset()  # compiled graphs (and what they hold) of the row just done
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sdpa_backend(row: dict) -> str:
    """The row's distill.attention_backend ("auto" without a +sdpa-... modifier)."""
    return next((m[5:] for m in row["mods"] if m in SDPA), "auto")


def fp8_mode(row: dict) -> str:
    """The row's distill.fp8_linear."""
    return "both" if "fp8" in row["mods"] else "student" if "fp8s" in row["mods"] else "off"


def apply_row_settings(row: dict) -> None:
    """The process-wide settings a row's modifiers choose, set before it builds (and compiles) its models: cuDNN
    autotuning and the attention kernel first (for ours/ddp rows, what pipelines/distill.py's worker_setup sets
    from distill.cudnn_benchmark and distill.attention_backend), and Inductor's forced layout optimization."""
    torch.backends.cudnn.benchmark = "cudnnb" in row["mods"]
    prefer_attention_backend(sdpa_backend(row))
    inductor_config.force_layout_optimization = "nhwcbwd" in row["mods"]


# GPU kernels by kind, matched in this order on the lower-cased kernel name (cuDNN's attention kernels have "sdpa"
# or "flash" in theirs, so attention comes before convolution)
KERNEL_KINDS = (("attention", ("flash", "fmha", "sdpa", "attention")),
                ("convolution", ("conv", "fprop", "dgrad", "wgrad", "implicit", "cudnn")),
                ("matmul", ("gemm", "nvjet", "cublas", "cutlass", "matmul")),
                ("optimizer", ("adam", "multi_tensor")),
                ("triton", ("triton",)),
                ("copy", ("copy", "memcpy", "memset", "transpose", "nchwtonhwc", "nhwctonchw")))
PROFILE_STEPS = 3


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def kernel_profile(step_fn, device, steps: int = PROFILE_STEPS) -> dict:
    """GPU kernel milliseconds per step by kind (KERNEL_KINDS), the heaviest kernels, and the CPU-side ops (with
    their callers and input shapes) that launched the copy and other kernels, from torch.profiler over `steps`
    steps (its own overhead makes those steps slower: compare kernel time with the timed steps' wall time)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(steps):
            step_fn()
        torch.cuda.synchronize(device)

    def add(box: dict, key: str, us: float) -> None:
        box[key] = box.get(key, 0.0) + us / 1000 / steps

    kinds: dict[str, float] = {}
    names: dict[str, float] = {}
    sources: dict[str, float] = {}
    for ev in prof.events():
        if ev.device_type == DeviceType.CUDA and not getattr(ev, "is_user_annotation", False):  # kernels only
            us = ev.time_range.elapsed_us()
            add(kinds, kernel_kind(ev.name), us)
            add(names, ev.name[:120], us)
        elif ev.kernels:
            chain, up = [ev.name], ev.cpu_parent
            while up is not None and len(chain) < 4:
                chain.append(up.name)
                up = up.cpu_parent
            key = " < ".join(chain) + " " + str(ev.input_shapes)[:160]
            for k in ev.kernels:
                if kernel_kind(k.name) in ("copy", "other"):
                    add(sources, key, k.duration)

    def top(box: dict, n: int) -> list:
        return [[k, round(v, 3)] for k, v in sorted(box.items(), key=lambda kv: -kv[1])[:n]]

    return {"gpu_ms": sum(kinds.values()), "kinds": kinds, "top": top(names, 15), "copy_sources": top(sources, 15)}


def run_row(row: dict, args: argparse.Namespace, setup, device, workers: int = 1) -> dict:
    """One measured row: setup() returns its step function; errors and OOM become the row's note."""
    batch = row_batch(row, args)
    out = blank(row, args, workers)
    t0 = time.time()
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step = setup()
        warm_s, secs = timed(step, args.warmup, args.steps, device)
        out.update(samples_per_s=workers * batch * args.steps / secs, warmup_s=warm_s,
                   mem_gb=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)
        if args.profile and device.type == "cuda":
            try:
                out["profile"] = kernel_profile(step, device)
                print(f"[bench] {row['key']} profile: " + json.dumps(out["profile"], indent=1), flush=True)
            except Exception as e:  # the row's throughput stands without its profile
                traceback.print_exc()
                out["note"] = f"profile failed: {type(e).__name__}"
    except torch.OutOfMemoryError:
        out["note"] = f"out of memory at batch {batch}"
    except Exception as e:  # one row's failure is its result; the other rows still run
        traceback.print_exc()
        out["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    out["wall_s"] = time.time() - t0
    return out


# ---------------------------------------------------------------------------------------------------
# The reference: a plain PyTorch loop in this process.
# ---------------------------------------------------------------------------------------------------


def reference_rows(args: argparse.Namespace, rows: list[dict], done: list[dict], deadline: float) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    teacher_cpu, student_cpu, spec, sched = models(args)
    pairs = feature_pairs(student_cpu, teacher_cpu, spec)
    use_amp = device.type == "cuda"
    enc = None

    for row in rows:
        reason = skip_reason(row, done, args, deadline)
        if reason:
            done.append(blank(row, args, 1, reason))
            print(f"[bench] {row['key']}: {reason}", flush=True)
            continue
        mods = row["mods"]
        if "encode" in mods and enc is None:
            enc = encoders(args, device)
        print(f"[bench] {row['key']}: {describe(row, args)} ...", flush=True)
        state = {}

        def setup(row=row, mods=mods, state=state, enc=enc):
            apply_row_settings(row)
            teacher = copy.deepcopy(teacher_cpu).to(device)
            if "bf16t" in mods and use_amp:
                teacher.to(torch.bfloat16)
            student = copy.deepcopy(student_cpu).to(device).train()
            if "cl" in mods:
                teacher.to(memory_format=torch.channels_last)
                student.to(memory_format=torch.channels_last)
            opt = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=("fused" in mods and use_amp) or None)
            n = row_batch(row, args)
            lat, cond = synthetic_batch(args, teacher, n, device)
            s_fn, t_fn, taps = student, teacher, None
            if "compile" in mods:
                taps = KDTaps(student, teacher, KDWeights(), pairs,
                              cudagraphs=args.compile_mode in CUDAGRAPH_MODES).attach()
                mode = {} if args.compile_mode == "default" else {"mode": args.compile_mode}
                s_fn, t_fn = torch.compile(student, **mode), torch.compile(teacher, **mode)
            if "encode" in mods:
                vae, text = enc
                images = torch.rand(n, 3, args.resolution, args.resolution, device=device) * 2 - 1
                ids = torch.randint(0, text.config.vocab_size, (n, 77), device=device)
            state.update(model=(teacher, student, opt, taps))

            def step():
                latents, c = lat, cond
                if "encode" in mods:
                    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                        latents = vae.encode(images).latent_dist.sample().float() * 0.18215
                        c = {"encoder_hidden_states": text(ids)[0].float()}
                noisy, t, target = diffusion_batch(sched, latents, "epsilon")
                if "cl" in mods:
                    noisy = noisy.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    loss = kd_loss(s_fn, t_fn, noisy, t, c, target, KDWeights(), pairs, taps=taps)["loss"]
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            return step

        result = run_row(row, args, setup, device)
        if state.get("model") and state["model"][3] is not None:
            state["model"][3].detach()
        state.clear()
        free_memory()
        done.append(result)
        print(f"[bench] {row['key']}: {line(result)}", flush=True)


# ---------------------------------------------------------------------------------------------------
# Ours: pipelines/distill.py's engine in Ray Train workers.
# ---------------------------------------------------------------------------------------------------


def ours_worker(config: dict) -> None:
    """A Ray Train worker measuring the rows of ours in turn (pipelines/train.py's StudentEngine, KDTaps,
    pipelines/distill.py's kd_teacher). Rank 0 appends each row to config["out"] (JSON lines) when it is done."""
    import ray.train

    args = argparse.Namespace(**config["args"])
    rows, deadline, done = config["rows"], config["deadline"], list(config["done"])
    if args.tiny:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from pipelines.config import parse_config
    from pipelines.distill import kd_teacher
    from pipelines.train import StudentEngine, teacher_dtype, to_device, uses_cudagraphs

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = not args.tiny
    device = torch.device("cuda", ctx.get_local_rank()) if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    teacher_cpu, student_cpu, spec, sched = models(args)
    pairs = feature_pairs(student_cpu, teacher_cpu, spec)
    t_dtype = teacher_dtype("auto", "fp32" if args.tiny else "bf16", device)
    teacher = teacher_cpu.to(device, t_dtype)  # one teacher for all rows (only its memory format changes)

    def agreed(reason: str | None) -> str | None:
        """Rank 0's decision for every rank (clocks and memory readings differ a little between ranks)."""
        if world > 1 and torch.distributed.is_initialized():
            box = [reason]
            torch.distributed.broadcast_object_list(box, src=0)
            return box[0]
        return reason

    for row in rows:
        reason = agreed(skip_reason(row, done, args, deadline))
        if reason:
            result = blank(row, args, world, reason)
        else:
            if rank == 0:
                print(f"[bench] {row['key']}: {describe(row, args)} ...", flush=True)
            mods = row["mods"]
            n = row_batch(row, args)
            dc = parse_config({"distill": {
                "zero_stage": zero_stage(row, args), "deepspeed": row["base"] == "ours",
                "precision": "fp32" if args.tiny else "bf16", "batch_size": n, "channels_last": "nocl" not in mods,
                "compile": "compile" in mods, "compile_mode": args.compile_mode if "compile" in mods else "default",
                "cudnn_benchmark": "cudnnb" in mods, "attention_backend": sdpa_backend(row),
                "fp8_linear": fp8_mode(row), "cuda_graph": "graph" in mods,
                "use_gpu": use_gpu, "max_steps": args.warmup + args.steps,
                "lr": 1e-5}}).distill
            state = {}

            def setup(dc=dc, n=n, state=state, row=row):
                # as pipelines/distill.py's worker: teacher weights and inputs NHWC; the student's weights too
                # without DeepSpeed (whose ZeRO flattening needs contiguous parameters)
                fmt = torch.channels_last if dc.channels_last else torch.contiguous_format
                apply_row_settings(row)
                teacher.to(memory_format=fmt)
                student = copy.deepcopy(student_cpu).train()
                if dc.channels_last and not dc.deepspeed:
                    student.to(memory_format=torch.channels_last)
                use_fp8_linear(teacher, enabled=False)  # the shared teacher as an earlier +fp8 row left it
                fp8_linears(dc, student, teacher, device)
                eng = StudentEngine(student, dc, world, device)
                taps = KDTaps(eng.module, teacher, KDWeights(), pairs, cudagraphs=uses_cudagraphs(dc)).attach()
                t_unet = kd_teacher(teacher, dc)
                state.update(eng=eng, taps=taps)
                sizes = bench_buckets(args) if "buckets" in row["mods"] else [None]
                batches = [synthetic_batch(args, teacher, n, device, size) for size in sizes]
                batches = [(lat, to_device(cond, device, eng.input_dtype)) for lat, cond in batches]
                order = iter(bucket_order(len(batches), 10 * (args.warmup + args.steps + PROFILE_STEPS)))

                def kd_step(noisy, t, cond, target):
                    with eng.autocast():
                        return kd_loss(eng.engine, t_unet, noisy, t, cond, target, KDWeights(), taps=taps)

                def step():
                    lat, cond = batches[next(order) if len(batches) > 1 else 0]
                    noisy, t, target = diffusion_batch(sched, lat, "epsilon")
                    if dc.channels_last:
                        noisy = noisy.contiguous(memory_format=torch.channels_last)
                    eng.step(kd_step, {"noisy": noisy.to(eng.input_dtype), "t": t, "cond": cond, "target": target})

                return step

            result = run_row(row, args, setup, device, workers=world)
            if "taps" in state:
                state["taps"].detach()
            eng = state.pop("eng", None)
            if eng is not None and hasattr(eng.engine, "destroy"):
                eng.engine.destroy()
            del eng
            state.clear()
            free_memory()
        done.append(result)
        if rank == 0:
            print(f"[bench] {row['key']}: {line(result)}", flush=True)
            with open(config["out"], "a") as f:
                f.write(json.dumps(result) + "\n")


def ours_rows(args: argparse.Namespace, rows: list[dict], done: list[dict], deadline: float) -> None:
    reasons = [skip_reason(row, done, args, deadline) for row in rows]
    if all(reasons):  # not worth starting Ray for
        for row, reason in zip(rows, reasons):
            print(f"[bench] {row['key']}: {reason}", flush=True)
            done.append(blank(row, args, 1, reason))
        return
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        ray.init(include_dashboard=False, num_cpus=2 if args.tiny else None)
    gpus = 0 if args.tiny else int(ray.cluster_resources().get("GPU", 0))
    if not args.tiny and gpus == 0:
        raise SystemExit("no GPU in the Ray cluster: run with --tiny on CPU")
    workers = 1 if args.tiny else max(1, min(args.gpus or gpus, gpus))
    env = {"DS_ACCELERATOR": "cpu"} if args.tiny else {}
    # the repo first, then whatever the driver already had (site bundles on GPU hosts)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(Path(__file__).resolve().parents[1]),
                                                   os.environ.get("PYTHONPATH")] if p)
    out = Path(tempfile.mkdtemp()) / "rows.jsonl"
    # by reference (the module, importable on workers through PYTHONPATH), not pickled from __main__
    from bench.distill_throughput import ours_worker as worker_fn

    trainer = TorchTrainer(
        worker_fn,
        train_loop_config={"args": vars(args), "rows": rows, "deadline": deadline, "done": done, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=not args.tiny,
                                     resources_per_worker={"CPU": 1} if args.tiny else None),
        torch_config=TorchConfig(backend="gloo" if args.tiny else "nccl"),
        run_config=RunConfig(name=f"bench-{int(time.time())}", storage_path=tempfile.mkdtemp(),
                             worker_runtime_env={"env_vars": env}),
    )
    try:
        trainer.fit()
    except Exception as e:  # the rows measured before the failure are kept
        print(f"[bench] the Ray Train run failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    got = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    for row in rows:
        match = next((r for r in got if r["key"] == row["key"]), None)
        done.append(match or blank(row, args, workers, "not measured: the Ray Train run ended before this row"))


# ---------------------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------------------


def line(r: dict) -> str:
    if r.get("samples_per_s") is None:
        return r["note"]
    return (f"{r['samples_per_s']:.1f} samples/s ({r['workers']} x batch {r['batch']}), warm-up {r['warmup_s']:.0f} s, "
            f"row {r['wall_s']:.0f} s" + (f", peak {r['mem_gb']:.1f} GiB" if r.get("mem_gb") else ""))


def table(args: argparse.Namespace, rows: list[dict], total_s: float) -> str:
    measured = [r for r in rows if r["base"] == "ref" and r.get("samples_per_s")]
    ref = next((r for r in measured if r["key"] == "ref"), measured[0] if measured else None)
    base = ref["samples_per_s"] / ref["workers"] if ref else None
    lines = [
        f"### KD step throughput, {args.teacher} -> {args.preset}, {args.resolution} px"
        f"{' (tiny smoke check)' if args.tiny else ''}",
        "",
        f"{datetime.date.today()}, {hardware(args)}, torch {torch.__version__}, random weights, latents in memory, "
        f"{args.steps} timed steps after {args.warmup} warm-up (compilation included in warm-up s), whole run "
        f"{total_s:.0f} s. `python bench/distill_throughput.py " + " ".join(sys.argv[1:]) + "`",
        "",
        "| row | what | workers | batch/worker | samples/s | samples/s per worker | vs ref (per worker) | peak GiB "
        "| warm-up s | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        sps = r.get("samples_per_s")
        per = sps / r["workers"] if sps else None
        cells = [f"`{r['key']}`", r["what"], str(r["workers"]), str(r["batch"]),
                 f"{sps:.1f}" if sps else "-", f"{per:.1f}" if per else "-",
                 f"{per / base:.2f}x" if per and base else "-",
                 f"{r['mem_gb']:.1f}" if r.get("mem_gb") else "-",
                 f"{r['warmup_s']:.0f}" if r.get("warmup_s") is not None else "-", r.get("note", "")]
        lines.append("| " + " | ".join(cells) + " |")
    best = max((r for r in rows if r["base"] != "ref" and r.get("samples_per_s")),
               key=lambda r: r["samples_per_s"] / r["workers"], default=None)
    if best and base:
        x = best["samples_per_s"] / best["workers"] / base
        lines += ["", f"Best of ours: `{best['key']}` {x:.2f}x the reference per worker "
                      f"(goal >= 2x: {'met' if x >= 2 else 'not met'})."]
    lines += ["", flops_line(args, rows, base)]
    profiled = [r for r in rows if r.get("profile")]
    if profiled:
        kinds = [k for k, _ in KERNEL_KINDS] + ["other"]
        lines += ["", f"GPU kernel time per step by kind (torch.profiler over {PROFILE_STEPS} steps after the timed "
                      "ones), ms and % of the timed steps' wall time per step:", "",
                  "| row | step ms (timed) | GPU kernels | " + " | ".join(kinds) + " |",
                  "| --- | --- | --- | " + " | ".join("---" for _ in kinds) + " |"]
        for r in profiled:
            pr, step_ms = r["profile"], 1000 * r["batch"] * r["workers"] / r["samples_per_s"]
            cells = [f"{pr['kinds'].get(k, 0.0):.1f} ({100 * pr['kinds'].get(k, 0.0) / step_ms:.0f}%)" for k in kinds]
            lines.append(f"| `{r['key']}` | {step_ms:.1f} | {pr['gpu_ms']:.1f} ({100 * pr['gpu_ms'] / step_ms:.0f}%) | "
                         + " | ".join(cells) + " |")
        per_kind = op_tflops(args)
        peak = bf16_peak(args)
        lines += ["", "Model FLOPs per sample by kind: " + ", ".join(
            f"{k} {v:.3g} TFLOP" for k, v in per_kind.items() if k != "other") + ". What each kind's kernels reach "
            "(TFLOP/s" + (f", % of the {peak[0]}'s dense bf16 peak" if peak else "") + "):"]
        for r in profiled:
            n = r["batch"]  # per worker and step
            parts = []
            for kind in ("convolution", "matmul", "attention"):
                ms = r["profile"]["kinds"].get(kind)
                if ms and per_kind.get(kind):
                    rate = per_kind[kind] * n / (ms / 1000)
                    parts.append(f"{kind} {rate:.0f}" + (f" ({100 * rate / peak[1]:.0f}%)" if peak else ""))
            lines.append(f"- `{r['key']}`: " + ", ".join(parts))
    return "\n".join(lines) + "\n"


def append_results(path: Path, text: str) -> None:
    """Put the table at the end of the "Distillation" section of RESULTS.md (made if missing)."""
    append_to_section(path, "## Distillation", text, intro=SECTION)


def hardware(args: argparse.Namespace) -> str:
    if torch.cuda.is_available() and not args.tiny:
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levers", default=DEFAULT_LEVERS, help=f"rows to measure (default {DEFAULT_LEVERS})")
    p.add_argument("--teacher", choices=["sd15", "sdxl"], default="sd15")
    p.add_argument("--preset", default=None, help="default: bk-small (sd15), ssd-1b (sdxl)")
    p.add_argument("--resolution", type=int, default=None, help="default 512 (sd15), 1024 (sdxl)")
    p.add_argument("--batch", type=int, default=32, help="micro-batch per GPU")
    p.add_argument("--big-batch", type=int, default=None, help="micro-batch of +big rows (default 2x --batch)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    p.add_argument("--gpus", type=int, default=None, help="workers for ours (default: all GPUs)")
    p.add_argument("--budget", type=float, default=480.0,
                   help="seconds for the whole run: rows expected to end past it are skipped (default 480)")
    p.add_argument("--row-budget", type=float, default=300.0,
                   help="after a row that took longer than this (seconds), the rest are skipped (default 300)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke check on tiny-sd1 at 64 px")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--no-append", action="store_true", help="do not append to bench/RESULTS.md")
    p.add_argument("--profile", action="store_true",
                   help=f"GPU kernel time by kind over {PROFILE_STEPS} more steps of each row (GPU only)")
    args = p.parse_args()
    t0 = T0
    deadline = t0 + args.budget
    if args.tiny:
        args.teacher, args.resolution = "sd15", args.resolution or 64
        args.batch, args.steps, args.warmup = min(args.batch, 4), min(args.steps, 3), min(args.warmup, 1)
    args.preset = args.preset or ("ssd-1b" if args.teacher == "sdxl" else "bk-small")
    args.resolution = args.resolution or (1024 if args.teacher == "sdxl" else 512)
    args.big_batch = args.big_batch or 2 * args.batch
    rows = parse_levers(args.levers)
    if any("encode" in r["mods"] for r in rows) and args.teacher != "sd15":
        raise SystemExit("--levers: +encode is for --teacher sd15 only")

    done: list[dict] = []
    refs = [r for r in rows if r["base"] == "ref"]
    if refs:
        reference_rows(args, refs, done, deadline)
    ours = [r for r in rows if r["base"] != "ref"]
    if ours:
        ours_rows(args, ours, done, deadline)
    order = {r["key"]: i for i, r in enumerate(rows)}
    done.sort(key=lambda r: order[r["key"]])
    text = table(args, done, time.time() - t0)
    print("\n" + text, flush=True)
    if args.json:
        args.json.write_text(json.dumps(done, indent=2))
    if not args.no_append:
        append_results(RESULTS, text)
        print(f"[bench] appended to {RESULTS} (section Distillation)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
