"""Attention kernels at the KD step's own shapes: which fused SDPA backend (flash, efficient, cudnn) is fastest.

The U-Nets' attention calls are recorded from one meta-device forward of the teacher and of the student (no
weights), then each distinct (batch, heads, query length, key length, head dim) is timed on the GPU with every
backend PyTorch can run it with: forward only (what the frozen teacher does) and forward + backward (what the
student does). The last table adds up one KD step's attention per backend (teacher forwards + student forwards and
backwards), against PyTorch's default order (printed with it; torch 2.11 on an H200 tries cuDNN first).
`distill.attention_backend` (bench lever `+sdpa-<name>`) moves a backend to the front of that list.

    python bench/sdpa_backends.py                    # SD 1.5 -> bk-small, 512 px, batch 32 (GPU)
    python bench/sdpa_backends.py --teacher sdxl     # SDXL -> ssd-1b, 1024 px, batch 8
    python bench/sdpa_backends.py --tiny             # CPU smoke check (tiny U-Nets, 64 px)

Prints markdown; --append adds it to bench/RESULTS.md ("Distillation").
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_kd_shape_args, append_to_section, kd_shape_setup  # noqa: E402

RESULTS = Path(__file__).with_name("RESULTS.md")
BACKENDS = ("flash", "efficient", "cudnn", "math")


def attention_calls(config: dict, h: int, w: int) -> Counter:
    """(heads, query length, key length, head dim) -> calls, of one batch-1 forward, on the meta device."""
    from models.metrics import unet_inputs
    from models.student import meta_unet

    unet = meta_unet({k: v for k, v in config.items() if not k.startswith("_")})  # private keys: diffusers' own
    calls: Counter = Counter()
    real = F.scaled_dot_product_attention

    def record(q, k, v, *a, **kw):
        calls[(q.shape[1], q.shape[2], k.shape[2], q.shape[3])] += 1
        return real(q, k, v, *a, **kw)

    args, kwargs = unet_inputs(unet.config, 1, h, w, device="meta")
    F.scaled_dot_product_attention = record
    try:
        with torch.no_grad():
            unet(*args, **kwargs)
    finally:
        F.scaled_dot_product_attention = real
    return calls


def time_call(backend: str, shape: tuple, batch: int, backward: bool, device, dtype, repeats: int) -> float | None:
    """Milliseconds of one SDPA call (forward, or forward + backward) with only `backend` enabled; None when that
    backend cannot run the shape."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pipelines.train import SDPA_BACKENDS

    heads, lq, lk, d = shape

    def leaf(n: int) -> torch.Tensor:  # (B, heads, n, d) as a view of (B, n, heads, d), as diffusers' processor
        return torch.randn(batch, n, heads, d, device=device, dtype=dtype).transpose(1, 2).requires_grad_(backward)

    q, k, v = leaf(lq), leaf(lk), leaf(lk)
    grad = torch.randn(batch, lq, heads, d, device=device, dtype=dtype).transpose(1, 2)

    def once():
        out = F.scaled_dot_product_attention(q, k, v)
        if backward:
            out.backward(grad)

    with sdpa_kernel(getattr(SDPBackend, {**SDPA_BACKENDS, "math": "MATH"}[backend])):
        try:
            once()
        except RuntimeError:  # "No available kernel": this backend does not take this shape or dtype
            return None
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        for _ in range(repeats):
            once()
        sync()
    return 1000 * (time.perf_counter() - t) / repeats


def fmt(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.2f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_kd_shape_args(p)
    p.add_argument("--backends", default="flash,efficient,cudnn", help=f"comma list of {', '.join(BACKENDS)}")
    args = p.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in backends if b not in BACKENDS]
    if bad:
        p.error(f"--backends: unknown {', '.join(bad)} (choose from {', '.join(BACKENDS)})")
    teacher_cfg, student_cfg, h, device, dtype = kd_shape_setup(p, args)
    if args.tiny:
        backends = ["math"]
    sdxl = args.teacher == "sdxl"
    t_calls, s_calls = attention_calls(teacher_cfg, h, h), attention_calls(student_cfg, h, h)
    shapes = sorted(set(t_calls) | set(s_calls), key=lambda s: (-s[1], s[2]))

    timings = {}
    for shape in shapes:
        for b in backends:
            timings[shape, b] = (time_call(b, shape, args.batch, False, device, dtype, args.repeats),
                                 time_call(b, shape, args.batch, True, device, dtype, args.repeats))
    default = torch._C._get_sdp_priority_order()
    name_of = {1: "flash", 2: "efficient", 0: "math", 3: "cudnn", 4: "overrideable"}

    def default_pick(shape: tuple, i: int) -> float | None:
        """What PyTorch runs with its default priority list (the first backend, in that order, that took it)."""
        for code in default:
            b = name_of.get(code)
            if b in backends and timings[shape, b][i] is not None:
                return timings[shape, b][i]
        return None

    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    head = (f"### SDPA backends at the KD step's attention shapes, {args.teacher} -> {args.preset}, "
            f"{args.resolution} px, batch {args.batch}\n\n{time.strftime('%Y-%m-%d')}, {gpu}, torch "
            f"{torch.__version__}, {str(dtype).replace('torch.', '')}, {args.repeats} calls each. "
            f"`python bench/sdpa_backends.py{' --teacher sdxl' if sdxl else ''}{' --tiny' if args.tiny else ''}`\n")
    cols = " | ".join(f"{b} fwd / fwd+bwd ms" for b in backends)
    lines = [head, f"| heads x q x kv x dim | teacher calls | student calls | {cols} |",
             "| --- | --- | --- | " + " | ".join("---" for _ in backends) + " |"]
    for shape in shapes:
        cells = " | ".join(f"{fmt(timings[shape, b][0])} / {fmt(timings[shape, b][1])}" for b in backends)
        lines.append(f"| {' x '.join(map(str, shape))} | {t_calls[shape]} | {s_calls[shape]} | {cells} |")

    def per_step(pick) -> float | None:
        total = 0.0
        for shape in shapes:
            fwd, both = pick(shape, 0), pick(shape, 1)
            if (t_calls[shape] and fwd is None) or (s_calls[shape] and both is None):
                return None
            total += t_calls[shape] * (fwd or 0.0) + s_calls[shape] * (both or 0.0)
        return total

    base = per_step(default_pick)
    lines += ["", "| backend first | attention ms per KD step (teacher fwd + student fwd+bwd) | vs PyTorch's default |",
              "| --- | --- | --- |", f"| default ({', '.join(name_of.get(c, str(c)) for c in default)}) | "
                                    f"{fmt(base)} | 1.00x |"]
    for b in backends:
        ms = per_step(lambda shape, i, b=b: timings[shape, b][i] if timings[shape, b][i] is not None
                      else default_pick(shape, i))
        lines.append(f"| {b} | {fmt(ms)} | {base / ms:.2f}x |" if ms and base else f"| {b} | {fmt(ms)} | - |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.append:
        append_to_section(RESULTS, "## Distillation", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
