"""U-Net latency per denoising step and per image: SD 1.5 vs BK-SDM base/small/tiny, SDXL vs SSD-1B/Vega
(issue 7's benchmark). The teacher's plain diffusers U-Net, eager, is the reference every row is compared to.

Full-size U-Nets are built from their public configs with random weights (no network: latency does not
depend on the weights; students from models.student's presets), at the family's native resolution
(SD 1.5 512 px, SDXL 1024 px). For each model, batch (1, or 2 = one image with classifier-free guidance)
and mode (eager; torch.compile) it measures

  ms/step   one U-Net call: CUDA events around each call after warm-up, median of --repeats
  ms/image  --steps scheduler steps (U-Net + scheduler.step, CFG combine at batch 2) and the VAE decode
            (fp16 for SD 1.5, fp32 for SDXL as diffusers upcasts it); text encoding is left out (a few ms,
            the same for teacher and student); median of --image-repeats
  peak MB   torch.cuda.max_memory_allocated during the image loop (weights included)

and prints a table with speedups against the teacher (same batch and mode, and against the eager
teacher), then appends it to the "Evaluation / latency" section of bench/RESULTS.md.

    python bench/latency.py --device cuda                       # both families, eager + compile, fp16
    python bench/latency.py --device cuda --family sd15 --modes eager
    python bench/latency.py --device cuda --family sdxl --sdpa flash --fuse-qkv --channels-last
    python bench/latency.py --tiny                              # CPU smoke run on tiny models (seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel  # noqa: E402

from models.student import count_params, meta_unet, preset_spec, student_config  # noqa: E402
from models.tiny import SD1_UNET, VAE  # noqa: E402
from models.tiny import SDXL_UNET as TINY_SDXL_UNET  # noqa: E402
from pipelines.metrics import count_macs, measure_latency, median, unet_inputs  # noqa: E402
from pipelines.student_cli import SD15_UNET, SD15_VAE, SDXL_UNET  # noqa: E402

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## Evaluation / latency"

SD_VAE = {k: v for k, v in SD15_VAE.items() if k not in ('sample_size', 'scaling_factor')}

# family -> (teacher U-Net config, image size, VAE config, students, VAE dtype policy)
FAMILIES = {
    "sd15": dict(unet=SD15_UNET, size=512, vae=dict(SD_VAE, sample_size=512, scaling_factor=0.18215),
                 students=["bk-base", "bk-small", "bk-tiny"], vae_fp32=False, scheduler=DDIMScheduler),
    "sdxl": dict(unet=SDXL_UNET, size=1024, vae=dict(SD_VAE, sample_size=1024, scaling_factor=0.13025),
                 students=["ssd-1b", "vega"], vae_fp32=True, scheduler=EulerDiscreteScheduler),
}
TINY = {
    "sd15": dict(unet=dict(sample_size=16, **SD1_UNET), size=64, vae=dict(VAE, sample_size=64),
                 students=["bk-base", "bk-small", "bk-tiny"], vae_fp32=False, scheduler=DDIMScheduler),
    "sdxl": dict(unet=dict(sample_size=16, **TINY_SDXL_UNET), size=64, vae=dict(VAE, sample_size=64),
                 students=["ssd-1b", "vega"], vae_fp32=True, scheduler=EulerDiscreteScheduler),
}


def unet_config(family: dict, preset: str | None) -> dict:
    teacher = meta_unet(family["unet"]).config
    if preset is None:
        return {k: v for k, v in dict(teacher).items() if not k.startswith("_")}
    return student_config(teacher, preset_spec(preset, teacher))


def build_unet(config: dict, device: str, dtype: torch.dtype, channels_last: bool, fuse_qkv: bool):
    with torch.device(device):  # random init straight on the device: an SDXL U-Net in seconds
        unet = UNet2DConditionModel.from_config(config)
    unet = unet.to(dtype=dtype).eval().requires_grad_(False)
    if fuse_qkv:
        unet.fuse_qkv_projections()
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    return unet


def sdpa_context(name: str):
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]
    return sdpa_kernel(backend)


def image_loop(unet, vae, scheduler, config: dict, batch: int, hw: int, steps: int, device: str, dtype: torch.dtype):
    """One image: `steps` scheduler steps (CFG at batch 2) and the VAE decode."""
    (_, _), kw = unet_inputs(config, batch, hw, hw, device=device, dtype=dtype)
    latents0 = torch.randn(1, config["in_channels"], hw, hw, device=device, dtype=dtype)

    def run() -> None:
        scheduler.set_timesteps(steps, device=device)
        x = latents0 * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(torch.cat([x] * batch), t)
            eps = unet(inp, t, **kw).sample
            if batch == 2:
                uncond, cond = eps.chunk(2)
                eps = uncond + 7.5 * (cond - uncond)
            x = scheduler.step(eps, t, x).prev_sample
        vae.decode(x.to(vae.dtype) / vae.config.scaling_factor)

    return run


def bench(args: argparse.Namespace) -> list[dict]:
    device = args.device
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    families = TINY if args.tiny else FAMILIES
    rows = []
    for fname in args.family:
        fam = families[fname]
        hw = fam["size"] // 8 if not args.tiny else fam["size"] // 4  # the tiny VAE downsamples by 4
        vae_dtype = torch.float32 if fam["vae_fp32"] else dtype
        with torch.device(device):
            vae = AutoencoderKL.from_config(fam["vae"])
        vae = vae.to(dtype=vae_dtype).eval().requires_grad_(False)
        scheduler = fam["scheduler"](beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        names = [None] + [s for s in fam["students"] if not args.models or s in args.models]
        teacher_ms: dict[tuple, float] = {}
        for preset in names:
            config = unet_config(fam, preset)
            meta = meta_unet(config)
            m_args, m_kw = unet_inputs(config, 1, hw, hw, device="meta")
            macs = count_macs(lambda meta=meta, a=m_args, k=m_kw: meta(*a, **k))
            params = count_params(meta)
            del meta
            unet = build_unet(config, device, dtype, args.channels_last, args.fuse_qkv)
            for mode in args.modes:
                model = unet
                if mode == "compile":
                    torch._dynamo.reset()
                    model = torch.compile(unet, mode=args.compile_mode, dynamic=False)
                for batch in args.batch:
                    args_, kw = unet_inputs(config, batch, hw, hw, device=device, dtype=dtype)
                    if args.channels_last:
                        args_ = (args_[0].to(memory_format=torch.channels_last), args_[1])
                    with torch.no_grad(), sdpa_context(args.sdpa):
                        t0 = time.perf_counter()
                        step = measure_latency(lambda m=model, a=args_, k=kw: m(*a, **k), args.repeats,
                                               warmup=args.warmup, device=device)
                        warm_s = time.perf_counter() - t0
                        image_ms = peak = None
                        if args.steps:
                            loop = image_loop(model, vae, scheduler, config, batch, hw, args.steps, device, dtype)
                            if device == "cuda":
                                torch.cuda.reset_peak_memory_stats()
                            image_ms = median(measure_latency(loop, args.image_repeats, warmup=1, device=device))
                            if device == "cuda":
                                peak = torch.cuda.max_memory_allocated() / 2**20
                    name = fname if preset is None else preset
                    ms = median(step)
                    if preset is None:
                        teacher_ms[(batch, mode)] = ms
                        teacher_ms[(batch, mode, "image")] = image_ms
                    base = teacher_ms.get((batch, mode))
                    eager = teacher_ms.get((batch, "eager"))
                    t_img = teacher_ms.get((batch, mode, "image"))
                    rows.append(dict(family=fname, model=name, params=params, macs=macs, batch=batch, mode=mode,
                                     ms_step=ms, min_ms_step=min(step), speedup=base / ms if base else None,
                                     speedup_vs_eager=eager / ms if eager else None, ms_image=image_ms,
                                     speedup_image=t_img / image_ms if t_img and image_ms else None, peak_mb=peak,
                                     total_s=warm_s))
                    print(_row_text(rows[-1]), flush=True)
            del unet, model
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


HEADER = ("| family | model | params | GMACs/call | batch | mode | ms/step | × teacher | × eager teacher | "
          "ms/image | × teacher (image) | peak MB |")


def _row_text(r: dict) -> str:
    return (f"| {r['family']} | {r['model']} | {r['params'] / 1e6:.1f}M | {r['macs'] / 1e9:.4g} | {r['batch']} | "
            f"{r['mode']} | {r['ms_step']:.2f} | {_f(r['speedup'], '.2f')} | {_f(r['speedup_vs_eager'], '.2f')} | "
            f"{_f(r['ms_image'], '.1f')} | {_f(r['speedup_image'], '.2f')} | {_f(r['peak_mb'], '.0f')} |")


def hardware(device: str) -> str:
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    import os

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, load {load:.1f}"


def table(rows: list[dict], args: argparse.Namespace) -> str:
    when = datetime.date.today().isoformat()
    cmd = "python bench/latency.py " + " ".join(sys.argv[1:])
    head = (f"### {when}: {'tiny smoke run' if args.tiny else 'full size'} on {hardware(args.device)}\n\n"
            f"torch {torch.__version__}, {args.dtype}, attention {args.sdpa}"
            f"{', fused qkv' if args.fuse_qkv else ''}{', channels_last' if args.channels_last else ''}"
            f"{', compile mode ' + args.compile_mode if 'compile' in args.modes else ''}; "
            f"{args.repeats} step repeats (median), {args.steps} steps per image ({args.image_repeats} repeats); "
            f"command: `{cmd}`\n\n")
    lines = [HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    return head + "\n".join(lines + [_row_text(r) for r in rows]) + "\n"


def append_results(text: str) -> None:
    """Put the table at the end of the "Evaluation / latency" section of RESULTS.md (made if missing)."""
    doc = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if SECTION not in doc:
        doc = doc.rstrip("\n") + (
            f"\n\n{SECTION}\n\nWritten by bench/latency.py (issue 7): U-Net latency per step and per image of the "
            "teachers and the block-removal students, random weights, native resolution. × teacher = the "
            "teacher's time / the row's time at the same batch and mode; × eager teacher compares with the plain "
            "diffusers U-Net. Reference from the issue (H100, fp16, batch 2, eager): SD 1.5 37.0 ms/step, "
            "bk-base 24.6 (1.51×), bk-small 22.5 (1.65×), bk-tiny 24.0 (1.55×); SDXL 120.7, SSD-1B-sized 74.7 "
            "(1.62×). Published: SSD-1B ≈ 1.6×, Vega ≈ 2× SDXL. GPU runs (to be recorded here): "
            "`python bench/latency.py --device cuda --family sd15` and `... --family sdxl` (fp16, batch 1 and 2, "
            "eager and torch.compile); add `--sdpa flash --fuse-qkv --channels-last` for the kernel variants. "
            "Tiny smoke runs on a shared CPU only show that the script works; they are no performance claim.\n")
    start = doc.index(SECTION)
    nxt = doc.find("\n## ", start + len(SECTION))
    end = len(doc) if nxt < 0 else nxt + 1
    section = doc[start:end].rstrip("\n") + "\n\n" + text
    RESULTS.write_text(doc[:start] + section + ("\n" + doc[end:] if end < len(doc) else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny models from models/tiny.py (CPU smoke run)")
    p.add_argument("--family", nargs="+", choices=["sd15", "sdxl"], default=["sd15", "sdxl"])
    p.add_argument("--models", nargs="+", default=None, help="only these students (the teacher always runs)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None, help="default fp16 on CUDA, else fp32")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 2], choices=[1, 2], help="2 = one image with CFG")
    p.add_argument("--modes", nargs="+", choices=["eager", "compile"], default=None,
                   help="default eager+compile on CUDA, eager on CPU")
    p.add_argument("--compile-mode", default="max-autotune-no-cudagraphs",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    p.add_argument("--sdpa", choices=["auto", "flash", "efficient", "cudnn", "math"], default="auto",
                   help="scaled-dot-product attention kernel (auto: PyTorch picks)")
    p.add_argument("--fuse-qkv", action="store_true", help="fuse attention q/k/v projections (diffusers)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=25, help="denoising steps per image (0: skip the image timing)")
    p.add_argument("--image-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default 1 on CPU)")
    p.add_argument("--no-append", action="store_true", help="print only; leave RESULTS.md alone")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    if not cuda and not args.tiny:
        p.error("full-size U-Nets on CPU take minutes per call: use --device cuda, or --tiny for a smoke run")
    args.dtype = args.dtype or ("fp16" if cuda else "fp32")
    args.modes = args.modes or (["eager", "compile"] if cuda else ["eager"])
    if not cuda:  # a shared CPU: one thread avoids OpenMP spin contention, which swamps tiny models' timings
        torch.set_num_threads(args.threads or 1)
    if args.tiny:
        args.repeats, args.warmup = min(args.repeats, 5), min(args.warmup, 1)
        args.steps, args.image_repeats = min(args.steps, 4), min(args.image_repeats, 2)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    print(HEADER, flush=True)
    rows = bench(args)
    text = table(rows, args)
    print("\n" + text)
    if not args.no_append:
        append_results(text)
        print(f"appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
