"""End-to-end image latency of step-distilled students against the teacher (issue 10's benchmark).

Builds full-size SD 1.5 and BK-SDM-Small pipelines from their public configs with random weights (no
network; latency does not depend on the weights), then times whole StableDiffusionPipeline calls (text
encoding, denoising, VAE decoding) at 512 px, batch 1:

  reference  SD 1.5, 25 DDIM steps with classifier-free guidance (two U-Net passes per step)
  rows       bk-small at 25 steps with CFG; bk-small + w input (guided / consistency distillation) at 4
             steps, one U-Net pass per step, with DDIM and with LCMScheduler; the same with a compiled
             U-Net (serve.compile's CompiledUNet, teacher and student) and with a tiny
             (TAESD-sized) decoder, where the remaining time is.

Each row also splits its time into text encoding, the denoising loop and VAE decoding (measured by running
the pipeline to latents and decoding separately). Prints a table, appends it to bench/RESULTS.md.

    python bench/steps_latency.py --device cuda            # the GPU benchmark (fp16, eager)
    python bench/steps_latency.py --device cuda --compile  # also the serve.compile rows (teacher and student)
    python bench/steps_latency.py --tiny                   # a CPU smoke run on tiny models (seconds)
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import (  # noqa: E402
    AutoencoderKL,
    AutoencoderTiny,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from bench.common import append_to_section  # noqa: E402
from models.sampling import CompiledUNet  # noqa: E402
from models.steps import add_guidance_embedding, student_scheduler  # noqa: E402
from models.student import build_student, count_params, preset_spec  # noqa: E402
from models.tiny import SD1_UNET, VAE, load_tokenizer, sd1_scheduler, text_config  # noqa: E402
from pipelines.student_cli import SD15_TEXT, SD15_UNET, SD15_VAE  # noqa: E402

RESULTS = Path(__file__).with_name("RESULTS.md")

def build(tiny: bool, device: str, dtype: torch.dtype) -> dict:
    """Components: the teacher U-Net, the bk-small student (with and without w input), VAEs, text encoder."""
    torch.manual_seed(0)
    with torch.device("cpu"):
        unet = UNet2DConditionModel(**(dict(sample_size=16, **SD1_UNET) if tiny else SD15_UNET))
        vae = AutoencoderKL(**(dict(sample_size=64, **VAE) if tiny else SD15_VAE))
        te = CLIPTextModel(text_config() if tiny else CLIPTextConfig(**SD15_TEXT))
        taesd = AutoencoderTiny()  # TAESD's architecture (diffusers' defaults)
        if tiny:  # the tiny VAE downsamples by 4; a tiny TAESD-like decoder must too
            taesd = AutoencoderTiny(encoder_block_out_channels=(16, 16, 16), decoder_block_out_channels=(16, 16, 16),
                                    num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1))
    student = build_student(unet, preset_spec("bk-small", unet.config))
    student_w = add_guidance_embedding(student)
    parts = {"teacher": unet, "student": student, "student_w": student_w, "vae": vae, "taesd": taesd, "te": te}
    for k, m in parts.items():
        parts[k] = m.to(device=device, dtype=dtype).eval()
    parts["tokenizer"] = load_tokenizer()
    return parts


def pipeline(parts: dict, unet_key: str, scheduler, vae_key: str = "vae") -> StableDiffusionPipeline:
    return StableDiffusionPipeline(unet=parts[unet_key], vae=parts[vae_key], text_encoder=parts["te"],
                                   tokenizer=parts["tokenizer"], scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False).to(parts["te"].device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def time_row(pipe: StableDiffusionPipeline, steps: int, guidance: float, size: int, repeats: int, warmup: int,
             device: str) -> dict:
    """Median ms per image: end to end, and its text / denoise / decode parts."""
    kw = dict(prompt="a photo of an astronaut riding a horse", num_inference_steps=steps, guidance_scale=guidance,
              height=size, width=size)

    def once(**extra) -> float:
        _sync(device)
        t0 = time.perf_counter()
        out = pipe(**kw, **extra)
        _sync(device)
        return (time.perf_counter() - t0) * 1000, out

    for _ in range(warmup):
        once(output_type="np")
        once(output_type="latent")
    total = statistics.median(once(output_type="np")[0] for _ in range(repeats))
    to_latent = statistics.median(once(output_type="latent")[0] for _ in range(repeats))
    _, lat = once(output_type="latent")
    cfg = guidance > 1 and pipe.unet.config.time_cond_proj_dim is None

    def text() -> float:
        _sync(device)
        t0 = time.perf_counter()
        pipe.encode_prompt(kw["prompt"], pipe.device, 1, cfg, "" if cfg else None)
        _sync(device)
        return (time.perf_counter() - t0) * 1000

    text_ms = statistics.median(text() for _ in range(repeats))

    def decode() -> float:
        _sync(device)
        t0 = time.perf_counter()
        img = pipe.vae.decode(lat.images / pipe.vae.config.scaling_factor, return_dict=False)[0]
        pipe.image_processor.postprocess(img, output_type="np")
        _sync(device)
        return (time.perf_counter() - t0) * 1000

    decode_ms = statistics.median(decode() for _ in range(repeats))
    return {"total": total, "text": text_ms, "denoise": max(0.0, to_latent - text_ms), "decode": decode_ms}


def write_results(table: str) -> None:
    """Put the table at the end of the "## Step distillation" section of RESULTS.md (made if missing)."""
    append_to_section(RESULTS, "## Step distillation", table, intro="Written by bench/steps_latency.py (issue 10): "
                      "end-to-end latency of few-step students against the teacher at 25 steps with CFG.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"])
    p.add_argument("--tiny", action="store_true", help="tiny models (a CPU smoke run)")
    p.add_argument("--size", type=int, default=None, help="image size in px (default 512; 64 with --tiny)")
    p.add_argument("--teacher-steps", type=int, default=25)
    p.add_argument("--student-steps", type=int, default=4)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="add rows with serve.compile's U-Net (teacher and student)")
    p.add_argument("--no-write", action="store_true", help="do not append to bench/RESULTS.md")
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.float16 if a.device.startswith("cuda") else torch.float32)
    size = a.size or (64 if a.tiny else 512)
    repeats = a.repeats or (2 if a.tiny else 10)
    warmup = a.warmup if a.warmup is not None else (2 if a.tiny else 3)
    if a.tiny:
        torch.set_num_threads(1)  # tiny models are per-op overhead; threads only thrash on a shared CPU
    if a.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    parts = build(a.tiny, a.device, dtype)
    ddim = DDIMScheduler.from_config(sd1_scheduler().config)
    guided_ddim = student_scheduler("guided", ddim, a.student_steps)
    lcm = student_scheduler("consistency", ddim, a.student_steps, skip=20)
    S, T = a.student_steps, a.teacher_steps
    sd = "tiny teacher" if a.tiny else "SD 1.5"
    rows = [
        (f"{sd}, {T} steps, CFG (reference)", pipeline(parts, "teacher", ddim), T, a.guidance),
        (f"bk-small, {T} steps, CFG", pipeline(parts, "student", ddim), T, a.guidance),
        (f"bk-small + w (guided), {S} steps DDIM, no CFG", pipeline(parts, "student_w", guided_ddim), S, a.guidance),
        (f"bk-small + w (consistency), {S} steps LCM, no CFG", pipeline(parts, "student_w", lcm), S, a.guidance),
        (f"bk-small + w, {S} steps LCM, tiny decoder (TAESD-size)", pipeline(parts, "student_w", lcm, "taesd"), S,
         a.guidance),
    ]
    results = []
    for name, pipe, steps, g in rows:
        pipe.set_progress_bar_config(disable=True)
        results.append((name, time_row(pipe, steps, g, size, repeats, warmup, a.device)))
        print(f"{name:<58} {results[-1][1]['total']:9.1f} ms", flush=True)
    compiled_ref = None  # the compiled teacher's ms/image, the reference of the compiled rows
    if a.compile:
        # serve.compile's path (models/sampling.py: CompiledUNet, reduce-overhead: CUDA graphs on CUDA) for the teacher
        # and the student alike, so the compiled speed-up compares like with like; the decoders stay eager, as served
        for key in ("teacher", "student_w"):
            CompiledUNet(parts[key], "reduce-overhead" if a.device.startswith("cuda") else "default")
        compiled = [(f"{sd}, {T} steps, CFG, serve.compile U-Net (compiled reference)", "teacher", ddim, T, "vae"),
                    (f"bk-small + w, {S} steps LCM, serve.compile U-Net", "student_w", lcm, S, "vae"),
                    (f"bk-small + w, {S} steps LCM, serve.compile U-Net, tiny decoder", "student_w", lcm, S, "taesd")]
        for name, unet_key, sched, steps, vae_key in compiled:
            pipe = pipeline(parts, unet_key, sched, vae_key)
            pipe.set_progress_bar_config(disable=True)
            results.append((name, time_row(pipe, steps, a.guidance, size, repeats, max(warmup, 2), a.device)))
            print(f"{name:<58} {results[-1][1]['total']:9.1f} ms", flush=True)
            compiled_ref = compiled_ref or results[-1][1]["total"]  # the first compiled row is the teacher's

    ref = results[0][1]["total"]
    hw = torch.cuda.get_device_name() if a.device.startswith("cuda") else platform.processor() or platform.machine()
    lines = [
        f"### Step distillation latency ({'tiny models' if a.tiny else 'SD 1.5 / bk-small'}, {size} px, "
        f"{str(dtype).replace('torch.', '')}, {a.device}: {hw})"
        + (" — CPU smoke run; not a performance claim" if a.tiny else ""),
        "",
        f"{datetime.date.today()}; torch {torch.__version__}; random weights (latency only); batch 1; median of "
        f"{repeats} after {warmup} warm-up; `python bench/steps_latency.py {' '.join(argv or sys.argv[1:])}`. "
        f"U-Net params: {sd} {count_params(parts['teacher']) / 1e6:.0f}M, "
        f"bk-small {count_params(parts['student']) / 1e6:.0f}M.",
        "",
        "| pipeline | total ms/image | text ms | denoise ms | decode ms | speed-up vs reference |"
        + (" speed-up vs compiled reference |" if compiled_ref else ""),
        "|---|---:|---:|---:|---:|---:|" + ("---:|" if compiled_ref else ""),
    ]
    for name, r in results:
        lines.append(f"| {name} | {r['total']:.1f} | {r['text']:.1f} | {r['denoise']:.1f} | {r['decode']:.1f} | "
                     f"{ref / r['total']:.2f}× |"
                     + (f" {compiled_ref / r['total']:.2f}× |" if compiled_ref else ""))
    table = "\n".join(lines)
    print("\n" + table)
    if not a.no_write:
        write_results(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
