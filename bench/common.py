"""What every benchmark here shares: writing its table into its section of bench/RESULTS.md, and a SIGINT
that stops a run early without losing what it measured; for the kernel benchmarks at the KD step's own shapes
(sdpa_backends, fp8_linear), their arguments, the U-Net configs and the device they time on."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path


def append_to_section(path: Path, heading: str, text: str, intro: str = "") -> None:
    """Put `text` at the end of the `heading` section ("## Name") of the markdown file at `path`, before the next
    "## " section; the section (with `intro` under its heading) and the file are made when missing."""
    doc = path.read_text() if path.exists() else "# Benchmark results\n"
    if f"\n{heading}\n" not in doc:
        doc = doc.rstrip("\n") + f"\n\n{heading}\n" + (f"\n{intro.strip()}\n" if intro.strip() else "")
    start = doc.index(f"\n{heading}\n") + len(heading) + 2
    nxt = doc.find("\n## ", start)
    end = len(doc) if nxt < 0 else nxt + 1
    rest = "\n" + doc[end:] if end < len(doc) else ""
    path.write_text(doc[:end].rstrip("\n") + "\n\n" + text.strip("\n") + "\n" + rest)


def interrupt_once() -> None:
    """The first SIGINT (e.g. from `timeout -s INT`) raises KeyboardInterrupt; later ones are ignored, so
    the partial results are still cleaned up after and written."""
    seen = []

    def handler(signum, frame):
        if not seen:
            seen.append(signum)
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)


def add_kd_shape_args(p: argparse.ArgumentParser) -> None:
    """The arguments of a benchmark that times kernels at the shapes of one KD step (teacher -> student)."""
    p.add_argument("--teacher", choices=["sd15", "sdxl"], default="sd15")
    p.add_argument("--preset", default=None, help="default: bk-small (sd15), ssd-1b (sdxl)")
    p.add_argument("--resolution", type=int, default=None, help="default 512 (sd15), 1024 (sdxl)")
    p.add_argument("--batch", type=int, default=None, help="default 32 (sd15), 8 (sdxl)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--tiny", action="store_true", help="CPU smoke check on tiny-sd1 at 64 px")
    p.add_argument("--append", action="store_true", help="append the tables to bench/RESULTS.md")


def kd_shape_setup(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple:
    """args' defaults filled in by teacher (and --tiny) -> (teacher U-Net config with diffusers' defaults, student
    config, latent side, device, dtype): tiny-sd1 in float32 on CPU with --tiny, else bf16 on the GPU."""
    import torch

    sdxl = args.teacher == "sdxl"
    args.preset = args.preset or ("ssd-1b" if sdxl else "bk-small")
    args.resolution = args.resolution or (64 if args.tiny else 1024 if sdxl else 512)
    args.batch = args.batch or (2 if args.tiny else 8 if sdxl else 32)
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            p.error("needs a GPU (or --tiny)")
        device, dtype = torch.device("cuda"), torch.bfloat16
    return (*kd_unet_configs(teacher_unet_config(args), args), device, dtype)


def teacher_unet_config(args: argparse.Namespace) -> dict:
    """The teacher U-Net's public config for args.teacher (tiny-sd1 with --tiny)."""
    if args.tiny:
        from models.tiny import SD1_UNET

        return dict(SD1_UNET, sample_size=16)
    from pipelines.student_cli import SD15_UNET, SDXL_UNET

    return dict(SDXL_UNET if args.teacher == "sdxl" else SD15_UNET)


def kd_unet_configs(teacher_cfg: dict, args: argparse.Namespace) -> tuple[dict, dict, int]:
    """(teacher U-Net config with diffusers' defaults filled in, the args.preset student's config, latent side at
    args.resolution: the tiny VAE downsamples 4x, SD's 8x)."""
    from models.student import meta_unet, preset_spec, student_config

    full = dict(meta_unet(teacher_cfg).config)
    return full, student_config(full, preset_spec(args.preset, full)), args.resolution // (4 if args.tiny else 8)
