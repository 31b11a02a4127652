"""U-Net latency per denoising step and per image: SD 1.5 vs BK-SDM base/small/tiny, SDXL vs SSD-1B/Vega
(issue 7's benchmark). The teacher's plain diffusers U-Net, eager, is the reference every row is compared to.

Full-size U-Nets are built from their public configs with random weights (no network: latency does not
depend on the weights; students from models.student's presets, which match the published SSD-1B and
Segmind-Vega U-Net layouts), at the family's native resolution (SD 1.5 512 px, SDXL 1024 px), batch 1 or
2 (= one image with classifier-free guidance), in these modes:

  eager     the plain diffusers U-Net (PyTorch's SDPA attention, its default)
  compile   torch.compile of the whole U-Net (--compile-mode, default "default"), one compile per model
            and batch, within --compile-budget seconds (later ones are skipped with a note)
  regional  torch.compile of the repeated transformer blocks only (diffusers' compile_repeated_blocks):
            compiles once for all models of a family, so it fits budgets the whole-model compile does not

How it measures (so that order, clocks and warm-up do not decide the result): all models of a family stay
on the GPU; for each (batch, mode) every model is first warmed up (at least --warmup calls and
--warmup-s seconds, after compilation), then --rounds rounds time each model in turn, in an order
rotated (and reversed) every round: a round times a window of back-to-back calls between CUDA events
(a window of at least --window-s), so a row's ms/step is the median over rounds of the per-call time of a
denoising loop, and IQR % is the spread across rounds. ms/image is the median of --image-repeats
interleaved rounds of --steps scheduler steps (CFG combine at batch 2) plus the VAE decode (fp16 for
SD 1.5, fp32 for SDXL as diffusers upcasts it; text encoding left out). peak MB = the model's weights plus
the most memory the image loop allocated on top.

    python bench/latency.py --device cuda --append-results bench/RESULTS.md        # both families, eager+compile
    python bench/latency.py --device cuda --family sdxl --modes eager regional --batch 2
    python bench/latency.py --device cuda --family sd15 --sdpa flash --fuse-qkv --channels-last
    python bench/latency.py --tiny                                                  # CPU smoke run (seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402

from bench.common import append_to_section, interrupt_once  # noqa: E402
from models.metrics import unet_inputs, unet_macs  # noqa: E402
from models.student import count_params, meta_unet, preset_spec, student_config  # noqa: E402
from models.tiny import SD1_UNET, VAE  # noqa: E402
from models.tiny import SDXL_UNET as TINY_SDXL_UNET  # noqa: E402
from pipelines.student_cli import SD15_UNET, SD15_VAE, SDXL_UNET  # noqa: E402

SECTION = "## Evaluation / latency"
SD_VAE = {k: v for k, v in SD15_VAE.items() if k not in ("sample_size", "scaling_factor")}

# family -> (teacher U-Net config, image size, VAE config, students, VAE dtype policy, scheduler)
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
# Issue 7's reference (one H100, fp16, batch 2, eager, random weights), ms/step
ISSUE_REFERENCE = {"sd15": 37.0, "bk-base": 24.6, "bk-small": 22.5, "bk-tiny": 24.0, "sdxl": 120.7, "ssd-1b": 74.7}
# whole-model compiles are slow: when the budget cannot cover a family, these come first
COMPILE_ORDER = {"sd15": ["bk-small", "sd15", "bk-tiny", "bk-base"], "sdxl": ["vega", "ssd-1b", "sdxl"]}
# published speed-ups over SDXL (Segmind's model cards: SSD-1B "60% faster", Vega "100% speedup")
PUBLISHED = {"ssd-1b": 1.6, "vega": 2.0}


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


# ----------------------------------------------------------------------------------------------- timing


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def window_ms(fn, calls: int, device: str) -> float:
    """Per-call time of `calls` back-to-back calls (what a denoising loop sees), in ms."""
    _sync(device)
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) * 1000.0 / calls


def warm_up(fn, min_calls: int, min_s: float, device: str) -> float:
    """Call fn until at least min_calls calls and min_s seconds have passed; the last call's ms."""
    t0, n, last = time.perf_counter(), 0, float("nan")
    while n < min_calls or time.perf_counter() - t0 < min_s:
        t1 = time.perf_counter()
        fn()
        _sync(device)
        last = (time.perf_counter() - t1) * 1000.0
        n += 1
    return last


def round_orders(names: list[str], rounds: int) -> list[list[str]]:
    """Each round's order: rotated by one every round, reversed every other round, so no model is
    always measured first or right after the same neighbour."""
    out = []
    for r in range(rounds):
        k = r % len(names)
        order = names[k:] + names[:k]
        out.append(order[::-1] if r % 2 else order)
    return out


def quartiles(v: list[float]) -> tuple[float, float, float]:
    if len(v) < 2:
        return v[0], v[0], v[0]
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[0], statistics.median(v), q[2]


def image_loop(unet, vae, scheduler, inputs: tuple, batch: int, steps: int, device: str, channels_last: bool):
    """One image: `steps` scheduler steps (CFG at batch 2) and the VAE decode. The U-Net gets inputs of
    the same shapes, dtypes and strides as in the step timing, so a compiled U-Net does not recompile."""
    (sample, t_ref), kw = inputs
    latents0 = torch.randn_like(sample[:1])

    def run(n_steps: int = steps) -> None:
        scheduler.set_timesteps(n_steps, device=device)
        x = latents0 * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(torch.cat([x] * batch), t).to(sample.dtype)
            if channels_last:
                inp = inp.contiguous(memory_format=torch.channels_last)
            tt = t.to(device=device, dtype=t_ref.dtype).reshape(1).repeat(batch)
            eps = unet(inp, tt, **kw).sample
            if batch == 2:
                uncond, cond = eps.chunk(2)
                eps = uncond + 7.5 * (cond - uncond)
            x = scheduler.step(eps, t, x).prev_sample
        vae.decode(x.to(vae.dtype) / vae.config.scaling_factor)

    return run


def measure_group(models: dict, inputs: tuple, batch: int, mode: str, ctx: dict, args) -> dict:
    """Interleaved measurement of every model of one family at one (batch, mode): name -> result."""
    device = args.device
    (a, t), kw = inputs
    calls = {name: (lambda m=m: m(a, t, **kw)) for name, m in models.items()}
    res: dict[str, dict] = {name: {"steps": [], "images": []} for name in models}
    with torch.no_grad(), sdpa_context(args.sdpa):
        window = {}
        for name, fn in calls.items():  # real warm-up, model by model
            last = warm_up(fn, args.warmup, args.warmup_s, device)
            window[name] = max(2, min(50, math.ceil(args.window_s * 1000.0 / max(last, 1e-3))))
        for order in round_orders(list(calls), args.rounds):
            for name in order:
                res[name]["steps"].append(window_ms(calls[name], window[name], device))
        if args.steps:
            loops = {name: image_loop(m, ctx["vae"], ctx["scheduler"], inputs, batch, args.steps, device,
                                      args.channels_last) for name, m in models.items()}
            for loop in loops.values():  # VAE decode and scheduler path warm, same shapes
                loop(2)
                _sync(device)
            for order in round_orders(list(loops), args.image_repeats):
                for name in order:
                    if device == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                    res[name]["images"].append(window_ms(loops[name], 1, device))
                    if device == "cuda":
                        extra = torch.cuda.max_memory_allocated() - base
                        res[name]["peak_mb"] = max(res[name].get("peak_mb", 0.0),
                                                   (extra + ctx["weight_bytes"][name]) / 2**20)
    for name, r in res.items():
        q1, med, q3 = quartiles(r["steps"])
        r.update(ms_step=med, iqr_pct=100.0 * (q3 - q1) / med, window=window[name],
                 ms_image=statistics.median(r["images"]) if r["images"] else None)
    return res


# ----------------------------------------------------------------------------------------------- compile


def set_dynamo_limits() -> None:
    """Many models of one family share U-Net code objects: let dynamo keep a compiled entry for each."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(64, getattr(cfg, name)))
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = max(1024, cfg.accumulated_recompile_limit)
    elif hasattr(cfg, "accumulated_cache_size_limit"):
        cfg.accumulated_cache_size_limit = max(1024, cfg.accumulated_cache_size_limit)


class Budget:
    """Seconds of compilation allowed; a compile is not started when the budget is spent or when the
    last compile of the family took more than twice what is left."""

    def __init__(self, seconds: float):
        self.total, self.used = seconds, 0.0

    def left(self) -> float:
        return self.total - self.used

    def allows(self, share: float, used_in_family: float, last: float | None) -> tuple[bool, str]:
        left = min(self.left(), share - used_in_family)
        if left <= 0:
            return False, f"compile budget used up ({self.used:.0f}s of {self.total:.0f}s)"
        if last is not None and last > 2 * left:
            return False, f"the last compile took {last:.0f}s, {left:.0f}s of the budget left"
        return True, ""


def compiled_models(unets: dict, inputs: tuple, mode: str, family_state: dict, budget: Budget, share: float,
                    notes: list[str], fname: str, batch: int, args) -> dict:
    """The models of one family compiled for one batch (whole-model or regional), within the budget, in
    COMPILE_ORDER: the student the issue's goal is about first (compiled vs the eager teacher is the row
    that can beat the published speed-up), then the teacher (the fair 'x teacher' under compile)."""
    (a, t), kw = inputs
    order = COMPILE_ORDER.get(fname, [])
    names = [n for n in order if n in unets] + [n for n in unets if n not in order]
    out = {}
    for name in names:
        ok, why = budget.allows(share, family_state["used"], family_state["last"])
        if not ok:
            notes.append(f"{fname} {name} batch {batch} {mode}: skipped, {why}")
            print(f"# {notes[-1]}", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            if mode == "compile":
                model = torch.compile(unets[name], mode=args.compile_mode, dynamic=False)
            else:
                if not family_state.get("regional"):
                    for m in unets.values():  # in place, on the shared blocks: the eager rows are done by now
                        m.compile_repeated_blocks(mode=args.compile_mode)
                    family_state["regional"] = True
                model = unets[name]
            with torch.no_grad(), sdpa_context(args.sdpa):
                model(a, t, **kw)
                _sync(args.device)
        except Exception as err:  # a failed compile costs its row, not the run
            notes.append(f"{fname} {name} batch {batch} {mode}: compile failed ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200] if str(err) else ''})")
            print(f"# {notes[-1]}", flush=True)
            traceback.print_exc()
            continue
        finally:
            dt = time.perf_counter() - t0
            budget.used += dt
            family_state["used"] += dt
        family_state["last"] = dt
        family_state.setdefault("compile_s", {})[(name, batch, mode)] = dt
        print(f"# compiled {fname} {name} batch {batch} ({mode}) in {dt:.1f}s", flush=True)
        out[name] = model
    return {n: out[n] for n in unets if n in out}  # back in table order


# ----------------------------------------------------------------------------------------------- driver


def bench(args: argparse.Namespace, rows: list[dict], notes: list[str]) -> None:
    device = args.device
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    families = TINY if args.tiny else FAMILIES
    budget = Budget(args.compile_budget)
    # whole-model compile before regional: regional compiles the shared blocks in place
    compile_modes = [m for m in ("compile", "regional") if m in args.modes]
    for fi, fname in enumerate(args.family):
        fam = families[fname]
        hw = fam["size"] // 8 if not args.tiny else fam["size"] // 4  # the tiny VAE downsamples by 4
        vae_dtype = torch.float32 if fam["vae_fp32"] else dtype
        with torch.device(device):
            vae = AutoencoderKL.from_config(fam["vae"])
        vae = vae.to(dtype=vae_dtype).eval().requires_grad_(False)
        scheduler = fam["scheduler"](beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        names = [fname] + [s for s in fam["students"] if not args.models or s in args.models]
        unets, info = {}, {}
        for name in names:
            config = unet_config(fam, None if name == fname else name)
            info[name] = dict(macs=unet_macs(config, hw, hw), params=count_params(meta_unet(config)))
            unets[name] = build_unet(config, device, dtype, args.channels_last, args.fuse_qkv)
            info[name]["bytes"] = sum(p.numel() * p.element_size() for p in unets[name].parameters())
        ctx = {"vae": vae, "scheduler": scheduler, "weight_bytes": {n: info[n]["bytes"] for n in names}}
        config = unet_config(fam, None)
        inputs = {}
        for batch in args.batch:
            (x, t), kw = unet_inputs(config, batch, hw, hw, device=device, dtype=dtype)
            if args.channels_last:
                x = x.to(memory_format=torch.channels_last)
            inputs[batch] = ((x, t), kw)
        # remaining compile budget shared equally among the remaining families
        share = budget.left() / (len(args.family) - fi) if compile_modes else 0.0
        family_state = {"used": 0.0, "last": None}
        results: dict[tuple, dict] = {}
        plan = [("eager", b) for b in args.batch if "eager" in args.modes]
        # compiled rows: batch 2 (the CFG case the issue's reference is at) before batch 1
        plan += [(m, b) for m in compile_modes for b in sorted(args.batch, reverse=True)]
        for mode, batch in plan:
            try:
                if mode == "eager":
                    models = unets
                else:
                    models = compiled_models(unets, inputs[batch], mode, family_state, budget, share, notes,
                                             fname, batch, args)
                if not models:
                    continue
                t0 = time.perf_counter()
                res = measure_group(models, inputs[batch], batch, mode, ctx, args)
                print(f"# {fname} batch {batch} {mode}: measured {len(models)} models in "
                      f"{time.perf_counter() - t0:.1f}s", flush=True)
            except Exception as err:  # e.g. out of memory: note it, keep the rest of the run
                notes.append(f"{fname} batch {batch} {mode}: failed ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:200] if str(err) else ''})")
                print(f"# {notes[-1]}", flush=True)
                traceback.print_exc()
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            for name, r in res.items():
                results[(name, batch, mode)] = r
                base = results.get((fname, batch, mode))
                eager = results.get((fname, batch, "eager"))
                row = dict(family=fname, model=name, params=info[name]["params"], macs=info[name]["macs"],
                           batch=batch, mode=mode, ms_step=r["ms_step"], iqr_pct=r["iqr_pct"],
                           speedup=base["ms_step"] / r["ms_step"] if base else None,
                           speedup_vs_eager=eager["ms_step"] / r["ms_step"] if eager else None,
                           mac_ratio=info[fname]["macs"] / info[name]["macs"],
                           ms_image=r["ms_image"], peak_mb=r.get("peak_mb"),
                           compile_s=family_state.get("compile_s", {}).get((name, batch, mode)))
                t_img = base.get("ms_image") if base else None
                row["speedup_image"] = t_img / r["ms_image"] if t_img and r["ms_image"] else None
                rows.append(row)
                print(_row_text(row), flush=True)
        # a compiled teacher measured after its students: fill in their "x teacher"
        for row in rows:
            if row["family"] == fname and row["speedup"] is None:
                base = results.get((fname, row["batch"], row["mode"]))
                if base:
                    row["speedup"] = base["ms_step"] / row["ms_step"]
                    if base.get("ms_image") and row["ms_image"]:
                        row["speedup_image"] = base["ms_image"] / row["ms_image"]
        models = None  # noqa: F841 (the compiled wrappers hold the U-Nets)
        del unets, vae, inputs, results
        if compile_modes:
            torch._dynamo.reset()  # drop this family's compiled graphs before the next family
        if device == "cuda":
            torch.cuda.empty_cache()


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


HEADER = ("| family | model | params | GMACs/call (b1) | batch | mode | ms/step | IQR % | × teacher | "
          "× eager teacher | MAC ratio | ms/image | × teacher (image) | peak MB | compile s |")


def _row_text(r: dict) -> str:
    return (f"| {r['family']} | {r['model']} | {r['params'] / 1e6:.1f}M | {r['macs'] / 1e9:.4g} | {r['batch']} | "
            f"{r['mode']} | {r['ms_step']:.2f} | {r['iqr_pct']:.1f} | {_f(r['speedup'], '.2f')} | "
            f"{_f(r['speedup_vs_eager'], '.2f')} | {r['mac_ratio']:.2f} | {_f(r['ms_image'], '.1f')} | "
            f"{_f(r['speedup_image'], '.2f')} | {_f(r['peak_mb'], '.0f')} | {_f(r['compile_s'], '.0f')} |")


def sort_rows(rows: list[dict], args) -> list[dict]:
    fam_order = {f: i for i, f in enumerate(args.family)}
    families = TINY if args.tiny else FAMILIES
    model_order = {f: {n: i for i, n in enumerate([f] + families[f]["students"])} for f in families}
    mode_order = {"eager": 0, "compile": 1, "regional": 2}
    return sorted(rows, key=lambda r: (fam_order[r["family"]], r["batch"], mode_order[r["mode"]],
                                       model_order[r["family"]][r["model"]]))


def summary(rows: list[dict]) -> list[str]:
    """Students against the issue's reference and the published speed-ups (batch 2, the CFG case)."""
    out = []
    by = {(r["model"], r["batch"], r["mode"]): r for r in rows}
    for r in rows:
        if r["model"] == r["family"] or r["batch"] != 2:
            continue
        line = f"- {r['model']} vs {r['family']}, batch 2, {r['mode']}: {_f(r['speedup'], '.2f')}× same mode"
        if r["mode"] != "eager":
            line += f", {_f(r['speedup_vs_eager'], '.2f')}× the eager teacher"
        if r["model"] in PUBLISHED:
            pub = PUBLISHED[r["model"]]
            best = r["speedup_vs_eager"] or 0.0
            line += f" (published ≈{pub:g}×: {'reached' if best >= 0.95 * pub else 'not reached'}"
            line += ", beaten)" if best > 1.05 * pub else ")"
        ref_t, ref_s = ISSUE_REFERENCE.get(r["family"]), ISSUE_REFERENCE.get(r["model"])
        if r["mode"] == "eager" and ref_t and ref_s:
            line += f"; issue reference {ref_t / ref_s:.2f}× ({ref_s} vs {ref_t} ms/step)"
        line += f"; MAC ratio {r['mac_ratio']:.2f}×"
        out.append(line)
    t1, t2 = by.get(("sd15", 1, "eager")), by.get(("sd15", 2, "eager"))
    if t1 and t2:
        ok = t1["ms_step"] <= t2["ms_step"] * 1.02
        out.append(f"- warm-up check: SD 1.5 eager batch 1 {t1['ms_step']:.2f} ms/step vs batch 2 {t2['ms_step']:.2f} "
                   f"({'batch 1 not slower, as expected' if ok else 'batch 1 slower: suspicious'})")
    return out


def hardware(device: str) -> str:
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, {os.cpu_count()} CPUs"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, load {load:.1f}"


def table(rows: list[dict], notes: list[str], args: argparse.Namespace, wall_s: float) -> str:
    import diffusers

    when = datetime.date.today().isoformat()
    cmd = "python bench/latency.py " + " ".join(sys.argv[1:])
    compiled = [m for m in args.modes if m != "eager"]
    head = (f"### {when}: {'tiny smoke run' if args.tiny else 'full size'} on {hardware(args.device)}\n\n"
            f"torch {torch.__version__}, diffusers {diffusers.__version__}, {args.dtype}, attention {args.sdpa}"
            f"{', fused qkv' if args.fuse_qkv else ''}{', channels_last' if args.channels_last else ''}"
            f"{f', compile mode {args.compile_mode}, budget {args.compile_budget:g}s' if compiled else ''}; "
            f"interleaved: warm-up ≥{args.warmup} calls and ≥{args.warmup_s:g}s per model, median of "
            f"{args.rounds} rotated rounds of ≥{args.window_s * 1000:g} ms windows; {args.steps} steps per image "
            f"(median of {args.image_repeats}); whole run {wall_s:.0f}s; command: `{cmd}`\n\n")
    lines = [HEADER, "|" + "---|" * (HEADER.count("|") - 1)] + [_row_text(r) for r in sort_rows(rows, args)]
    tail = summary(sort_rows(rows, args))
    if notes:
        tail += [f"- note: {n}" for n in notes]
    return head + "\n".join(lines) + "\n" + ("\n" + "\n".join(tail) + "\n" if tail else "")


def append_results(path: Path, text: str) -> None:
    """Put the table at the end of the "Evaluation / latency" section of RESULTS.md (made if missing)."""
    append_to_section(path, SECTION, text, intro="Written by bench/latency.py (issue 7): U-Net latency per step and "
                      "per image of the teachers and the block-removal students, random weights, native resolution.")


def gpu_warm(seconds: float) -> None:
    """Bring the GPU's clocks up before anything is timed (an idle GPU starts slow)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
    del a


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny models from models/tiny.py (CPU smoke run)")
    p.add_argument("--family", nargs="+", choices=["sd15", "sdxl"], default=["sd15", "sdxl"])
    p.add_argument("--models", nargs="+", default=None, help="only these students (the teacher always runs)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None, help="default fp16 on CUDA, else fp32")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 2], choices=[1, 2], help="2 = one image with CFG")
    p.add_argument("--modes", nargs="+", choices=["eager", "compile", "regional"], default=None,
                   help="default eager+compile on CUDA, eager on CPU")
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    p.add_argument("--compile-budget", type=float, default=120.0,
                   help="seconds of compilation in all (shared among families); later compiles are skipped")
    p.add_argument("--sdpa", choices=["auto", "flash", "efficient", "cudnn", "math"], default="auto",
                   help="scaled-dot-product attention kernel (auto: PyTorch picks)")
    p.add_argument("--fuse-qkv", action="store_true", help="fuse attention q/k/v projections (diffusers)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--warmup", type=int, default=10, help="warm-up calls per model, at least")
    p.add_argument("--warmup-s", type=float, default=2.0, help="warm-up seconds per model, at least")
    p.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds (median)")
    p.add_argument("--window-s", type=float, default=0.1, help="back-to-back calls per timed window, in seconds")
    p.add_argument("--steps", type=int, default=25, help="denoising steps per image (0: skip the image timing)")
    p.add_argument("--image-repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default 1 on CPU)")
    p.add_argument("--append-results", type=Path, default=None, metavar="RESULTS.md",
                   help="append the table to the 'Evaluation / latency' section of this file")
    args = p.parse_args(argv)
    interrupt_once()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    if not cuda and not args.tiny:
        p.error("full-size U-Nets on CPU take minutes per call: use --device cuda, or --tiny for a smoke run")
    args.dtype = args.dtype or ("fp16" if cuda else "fp32")
    diffusers_logging.set_verbosity_error()  # no "keep in float32" notice per .to(dtype)
    args.modes = args.modes or (["eager", "compile"] if cuda else ["eager"])
    if not cuda:  # a shared CPU: one thread avoids OpenMP spin contention, which swamps tiny models' timings
        torch.set_num_threads(args.threads or 1)
    if args.tiny:
        args.warmup, args.warmup_s = min(args.warmup, 2), min(args.warmup_s, 0.2)
        args.rounds, args.window_s = min(args.rounds, 4), min(args.window_s, 0.02)
        args.steps, args.image_repeats = min(args.steps, 4), min(args.image_repeats, 2)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        gpu_warm(2.0)
    if any(m != "eager" for m in args.modes):
        set_dynamo_limits()
    t0 = time.perf_counter()
    rows: list[dict] = []
    notes: list[str] = []
    print(HEADER, flush=True)
    try:
        bench(args, rows, notes)
    except BaseException as err:  # keep what was measured: a partial table is still written
        notes.append(f"run stopped early: {type(err).__name__}: {err or 'SIGINT, e.g. a timeout'}")
        traceback.print_exc()
    text = table(rows, notes, args, time.perf_counter() - t0)
    print("\n" + text)
    if args.append_results and rows:
        append_results(args.append_results, text)
        print(f"appended to {args.append_results}")
    return 0 if rows and not any(n.startswith("run stopped") for n in notes) else 1


if __name__ == "__main__":
    sys.exit(main())
