"""FP8 linear layers at the KD step's own shapes: what float8 GEMMs can save against bf16, and at what error.

The calls of the linear layers distill.fp8_linear switches (models/fp8.py: the transformer blocks' q/k/v/out,
feed-forward and projections) are recorded from one meta-device forward of the teacher and of the student (no
weights). Each distinct (tokens, in, out) is then timed on the GPU, forward (the frozen teacher) and forward +
backward (the student, three GEMMs):
  bf16 GEMM     the three matmuls in bf16 (torch.mm): the plain reference
  fp8 GEMM      torch._scaled_mm alone on operands already in float8 and in its layouts: what FP8 can give
  nn.Linear     the bf16 layer as it runs eagerly, autograd included
  Float8Linear  models/fp8.py as it runs eagerly: scaling, casts and transposes included (under torch.compile
                Inductor fuses some of those; bench/distill_throughput.py +fp8 measures the whole compiled step)
and the relative error of Float8Linear's output and gradients against bf16 F.linear on random data is printed
beside it. The last table adds the times up per KD step (teacher forwards + student forwards and backwards).

    python bench/fp8_linear.py                    # SD 1.5 -> bk-small, 512 px, batch 32 (GPU, compute capability 8.9+)
    python bench/fp8_linear.py --teacher sdxl     # SDXL -> ssd-1b, 1024 px, batch 8
    python bench/fp8_linear.py --tiny             # CPU smoke check (tiny U-Nets, 64 px)

Prints markdown; --append adds it to bench/RESULTS.md ("Distillation").
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_kd_shape_args, append_to_section, kd_shape_setup  # noqa: E402
from models.fp8 import E4M3, E5M2, Float8Linear, fp8_fits, fp8_linear_names, fp8_unsupported, to_float8  # noqa: E402

RESULTS = Path(__file__).with_name("RESULTS.md")
COLUMNS = ("bf16 GEMM", "fp8 GEMM", "nn.Linear", "Float8Linear")


def linear_calls(config: dict, h: int, w: int, batch: int) -> Counter:
    """(tokens, in features, out features) -> calls of the switched linear layers, one `batch` forward on the
    meta device."""
    from models.metrics import unet_inputs
    from models.student import meta_unet

    unet = meta_unet({k: v for k, v in config.items() if not k.startswith("_")})
    calls: Counter = Counter()

    def record(module, inputs, _out):
        x = inputs[0]
        calls[(x.numel() // x.shape[-1], module.in_features, module.out_features)] += 1

    handles = [unet.get_submodule(n).register_forward_hook(record) for n in fp8_linear_names(unet)]
    args, kwargs = unet_inputs(unet.config, batch, h, w, device="meta")
    try:
        with torch.no_grad():
            unet(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def steps_for(shape: tuple, device, dtype) -> dict:
    """column -> (forward, forward + backward) callables at one shape."""
    m, k, n = shape
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    lin = torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype)
    f8 = torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype)
    f8.__class__ = Float8Linear
    f8.weight = lin.weight
    g = torch.randn(m, n, device=device, dtype=dtype)
    # the three GEMMs of a float8 linear layer on operands already cast, in torch._scaled_mm's layouts
    x8, sx = to_float8(x.detach(), E4M3)
    w8, sw = to_float8(lin.weight.detach(), E4M3)
    g8, sg = to_float8(g, E5M2)
    w8_col, g8_t, x8_col = w8.t().contiguous().t(), g8.t().contiguous(), x8.t().contiguous().t()

    xd, w = x.detach(), lin.weight.detach()

    def gemm_fwd():
        return torch._scaled_mm(x8, w8.t(), sx, sw, out_dtype=dtype, use_fast_accum=True)

    def gemm_both():
        gemm_fwd()
        torch._scaled_mm(g8, w8_col, sg, sw, out_dtype=dtype)
        torch._scaled_mm(g8_t, x8_col, sg, sx, out_dtype=dtype)

    def bf16_fwd():
        return xd @ w.t()

    def bf16_both():  # the same three products in bf16
        bf16_fwd()
        g @ w
        g.t() @ xd

    def module(mod):
        def fwd():
            with torch.no_grad():
                return mod(x)

        def both():
            mod(x).backward(g)
        return fwd, both

    # a shape the float8 GEMM cannot take runs in bf16 in Float8Linear: so it counts here
    gemm = (gemm_fwd, gemm_both) if fp8_fits(m, k, n) else (bf16_fwd, bf16_both)
    return {"bf16 GEMM": (bf16_fwd, bf16_both), "fp8 GEMM": gemm, "nn.Linear": module(lin),
            "Float8Linear": module(f8)}


def rel_errors(shape: tuple, device, dtype) -> tuple[float, float, float]:
    """Relative error (norm) of Float8Linear's output, input gradient and weight gradient against F.linear in
    `dtype`, on normal random data."""
    m, k, n = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(device, dtype)
    g = torch.randn(m, n, generator=gen).to(device, dtype)
    outs = []
    for cls in (torch.nn.Linear, Float8Linear):
        lin = torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype)
        lin.weight.data.copy_(w)
        lin.__class__ = cls
        xi = x.clone().requires_grad_()
        y = lin(xi)
        y.backward(g)
        outs.append((y.detach().float(), xi.grad.float(), lin.weight.grad.float()))
    return tuple(((b - a).norm() / a.norm()).item() for a, b in zip(*outs))


def time_ms(fn, device, repeats: int) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return 1000 * (time.perf_counter() - t) / repeats


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_kd_shape_args(p)
    args = p.parse_args()
    teacher_cfg, student_cfg, h, device, dtype = kd_shape_setup(p, args)
    why = fp8_unsupported(device)
    if why:
        p.error(why)
    sdxl = args.teacher == "sdxl"
    t_calls = linear_calls(teacher_cfg, h, h, args.batch)
    s_calls = linear_calls(student_cfg, h, h, args.batch)
    shapes = sorted(set(t_calls) | set(s_calls), key=lambda s: (-s[0], s[1], s[2]))

    timings, errors = {}, {}
    for shape in shapes:
        for col, (fwd, both) in steps_for(shape, device, dtype).items():
            timings[shape, col] = (time_ms(fwd, device, args.repeats), time_ms(both, device, args.repeats))
        errors[shape] = rel_errors(shape, device, dtype)

    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    flags = f"{' --teacher sdxl' if sdxl else ''}{' --tiny' if args.tiny else ''}"
    head = (f"### FP8 linear layers at the KD step's shapes, {args.teacher} -> {args.preset}, {args.resolution} px, "
            f"batch {args.batch}\n\n{time.strftime('%Y-%m-%d')}, {gpu}, torch {torch.__version__}, "
            f"{str(dtype).replace('torch.', '')} reference, {args.repeats} calls each. "
            f"`python bench/fp8_linear.py{flags}`\n")
    cols = " | ".join(f"{c} fwd / fwd+bwd ms" for c in COLUMNS)
    lines = [head, f"| tokens x in x out | teacher calls | student calls | {cols} | rel. error out / dx / dw |",
             "| --- | --- | --- | " + " | ".join("---" for _ in COLUMNS) + " | --- |"]
    for shape in shapes:
        cells = " | ".join(f"{timings[shape, c][0]:.3f} / {timings[shape, c][1]:.3f}" for c in COLUMNS)
        err = " / ".join(f"{e:.3f}" for e in errors[shape])
        lines.append(f"| {' x '.join(map(str, shape))} | {t_calls[shape]} | {s_calls[shape]} | {cells} | {err} |")
    per_step = {c: sum(t_calls[s] * timings[s, c][0] + s_calls[s] * timings[s, c][1] for s in shapes)
                for c in COLUMNS}
    lines += ["", "| linear layers as | ms per KD step (teacher fwd + student fwd+bwd) | vs bf16 GEMM |",
              "| --- | --- | --- |"]
    lines += [f"| {c} | {per_step[c]:.1f} | {per_step['bf16 GEMM'] / per_step[c]:.2f}x |" for c in COLUMNS]
    lines.append("\nShapes with a relative error of 0 run in bf16 (tokens not a multiple of 16: the float8 GEMM "
                 "cannot take them), in both fp8 columns.")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.append:
        append_to_section(RESULTS, "## Distillation", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
