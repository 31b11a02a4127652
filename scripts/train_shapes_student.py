"""Distill the shipped shapes teacher (builtin:shapes-sd1) into smaller and fewer-step students, and measure
what they keep (issues 8 and 10).

One run, plain PyTorch + diffusers, on one GPU in under ten minutes by default:

  data       N generated shapes images (seed 0: the teacher's training distribution) encoded once by the
             teacher's frozen VAE (posterior means x scaling_factor: what the teacher was trained on), and
             the frozen text encoder's embeddings per distinct caption; 10% empty captions (CFG).
  distilled  a block-removal student (--preset, default bk-small) initialised from the teacher's U-Net and
             trained with the distill stage's loss (models/kd.py: task + output KD + feature KD).
  scratch    the same architecture, randomly initialised, task loss only: the same steps, batch, LR
             schedule, data and noise (the same budget), to show what distillation adds.
  steps      step distillation of the distilled student (models/steps.py StepDistiller): guided stage 1
             (w input, matches the teacher's CFG output) then progressive halvings from --teacher-steps down
             to --final-steps (or one consistency phase), exported with its own scheduler and w input.
  evaluate   caption accuracy (pipelines/shapes.py) on --eval-prompts unseen prompts (seed 10000): the
             teacher at 20 steps CFG 5 (its model card's setting) and 25 steps (issue 10's reference), the
             students at 20 steps CFG 5, the step students at 1/2/4/8 steps with w = 5 (one forward per
             step), the teacher at those few steps as a baseline; U-Net parameters, MACs, latency per image.

Outputs under --out: distilled/, scratch/, steps/ (diffusers pipeline folders with distillery.json, so
`distillery evaluate` and plain diffusers load them), prompts.txt, reference/ (--reference-images),
results.json, samples.png; a markdown table on stdout and, with --append-results, in bench/RESULTS.md.

    python scripts/train_shapes_student.py --device cuda --out runs/shapes-students \\
        --append-results bench/RESULTS.md
    # a CPU check of the whole flow (a minute):
    python scripts/train_shapes_student.py --device cpu --images 512 --kd-steps 4 --batch 16 \\
        --teacher-steps 4 --steps-per-round 2 --eval-prompts 8 --out /tmp/students
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from train_shapes_teacher import dataset, grid, log, lr_factor, sample  # noqa: E402

from models.kd import KDWeights, diffusion_batch, feature_pairs, kd_loss  # noqa: E402
from models.steps import Schedule, StepDistiller, save_steps_student, student_scheduler  # noqa: E402
from models.student import build_student, count_params, preset_spec, save_student, student_config  # noqa: E402
from models.teacher import encode_prompts, load_teacher, resolve_model_dir  # noqa: E402
from pipelines import metrics as M  # noqa: E402
from pipelines import shapes  # noqa: E402

TEACHER = "builtin:shapes-sd1"
EVAL_SEED = 10_000  # the model card's prompts: unseen in training (seed 0)
CARD_STEPS, CARD_GUIDANCE = 20, 5.0  # the model card's evaluation
REF_STEPS = 25  # issue 10's reference: the teacher at 25 steps with CFG
ATTRS = ("shape", "color", "size", "position", "count", "background")


# ---------------------------------------------------------------------------------------------- data


@torch.no_grad()
def prepare_data(teacher: Any, args, device: torch.device) -> dict[str, Any]:
    """Latents and text embeddings of the training set, on the device.

    latents (N, 4, 16, 16): the VAE posterior means x scaling_factor. The teacher was trained on the means;
    its posterior std is ~0.6 (a near-zero KL weight left it untrained), so sampled latents (the distill
    stage's default, data.latents: dist) would be far noisier than anything the teacher saw (--latents).
    emb (D, 77, 64): one per distinct caption; cap (N,) indexes it; empty (1, 77, 64): the "" prompt."""
    t0 = time.time()
    x, caps = dataset(args.images, args.data_seed)
    t_gen = time.time() - t0
    vae = teacher.vae
    means, stds = [], []
    for i in range(0, len(x), 1024):
        post = vae.encode(x[i : i + 1024].to(device)).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    scale = float(vae.config.scaling_factor)
    mean, std = torch.cat(means), torch.cat(stds)
    distinct = sorted(set(caps))
    index = {c: i for i, c in enumerate(distinct)}
    emb = torch.cat([encode_prompts(teacher, distinct[i : i + 512])["prompt_embeds"]
                     for i in range(0, len(distinct), 512)]).float()
    data = {
        "mean": mean, "std": std if args.latents == "sample" else None, "scale": scale,
        "cap": torch.tensor([index[c] for c in caps], device=device), "emb": emb,
        "empty": encode_prompts(teacher, [""])["prompt_embeds"].float(),
    }
    stats = {"images": len(x), "seed": args.data_seed, "distinct_captions": len(distinct), "latents": args.latents,
             "scaling_factor": scale, "scaled_latent_std": float((mean * scale).std()),
             "posterior_std_mean": float(std.mean()), "generate_seconds": round(t_gen, 1),
             "seconds": round(time.time() - t0, 1)}
    log(f"data: {len(x)} images ({len(distinct)} distinct captions) generated in {t_gen:.1f}s, encoded; "
        f"scaled latent std {stats['scaled_latent_std']:.3f}, posterior std {stats['posterior_std_mean']:.3f} "
        f"({time.time() - t0:.1f}s)")
    return {**data, "stats": stats}


def draw(data: dict[str, Any], n: int, gen: torch.Generator, drop: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch: scaled latents (n, 4, 16, 16) and text embeddings (n, 77, 64), a `drop` fraction empty."""
    dev = data["mean"].device
    idx = torch.randint(len(data["mean"]), (n,), device=dev, generator=gen)
    lat = data["mean"][idx]
    if data["std"] is not None:
        lat = lat + data["std"][idx] * torch.randn(lat.shape, device=dev, generator=gen)
    emb = data["emb"][data["cap"][idx]]
    if drop > 0:
        keep = torch.rand(n, device=dev, generator=gen) >= drop
        emb = torch.where(keep[:, None, None], emb, data["empty"])
    return lat * data["scale"], emb


# ------------------------------------------------------------------------------------------ training


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, cache: bool = True):
    """bf16 autocast on CUDA. `cache=False` for a step captured as a CUDA graph: the weights must be recast on
    every replay, not taken from a cache filled at capture."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda", cache_enabled=cache)


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float, device: torch.device,
                   graph: bool) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA). For a CUDA-graph step: capturable, with the learning rate as a device tensor
    that `set_lr` fills in place, so the captured step reads each step's rate."""
    if graph:
        return torch.optim.AdamW(params, lr=torch.tensor(lr, device=device), weight_decay=weight_decay,
                                 fused=True, capturable=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        if torch.is_tensor(g["lr"]):
            g["lr"].fill_(lr)
        else:
            g["lr"] = lr


class TrainStep:
    """One optimizer step: `loss_fn(*inputs)` (a dict of scalar tensors with "loss"), backward, gradient
    clipping, `opt.step()`.

    With `graph` (CUDA), the first `warm` steps run eagerly on a side stream (CUDA's handles and the optimizer's
    state are made there); the next one is captured as one CUDA graph, and from then on each call copies its
    inputs into the captured ones and replays the graph. These U-Nets are tiny, so an eager step is bound by
    launching its few thousand kernels, not by running them. The returned tensors of a replayed step are the
    graph's own: read them before the next call. The optimizer comes from `make_optimizer(..., graph=True)`."""

    def __init__(self, loss_fn: Any, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, graph: bool,
                 warm: int = 3, clip: float = 1.0):
        self.loss_fn, self.params, self.opt, self.clip, self.warm = loss_fn, params, opt, clip, warm
        self.stream = torch.cuda.Stream() if graph else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_in: list[torch.Tensor] = []
        self.static_out: dict[str, torch.Tensor] = {}
        self.calls = 0
        self.failed: str | None = None

    def _step(self, inputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        out = self.loss_fn(*inputs)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        return out

    def __call__(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.stream is None:
            self.opt.zero_grad(set_to_none=True)
            return self._step(inputs)
        if self.graph is None:
            if self.calls <= self.warm:
                self.stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self.stream):
                    self.opt.zero_grad(set_to_none=True)
                    out = self._step(inputs)
                torch.cuda.current_stream().wait_stream(self.stream)
                return out
            self.static_in = [x.clone() for x in inputs]
            self.opt.zero_grad(set_to_none=True)  # the graph's backward writes the gradients afresh each replay
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):  # records the step without running it: the replay below runs it
                    self.static_out = self._step(tuple(self.static_in))
            except RuntimeError as e:  # an operation that cannot be captured: say so, go on eagerly
                log(f"CUDA graph capture failed, eager steps from here: {e}")
                self.stream, self.failed = None, str(e)
                self.opt.zero_grad(set_to_none=True)
                return self._step(inputs)
            self.graph = graph
        for s, x in zip(self.static_in, inputs):
            s.copy_(x)
        self.graph.replay()
        return self.static_out


def train_unet(student: UNet2DConditionModel, teacher: Any, data: dict[str, Any], args, device: torch.device, *,
               label: str, weights: KDWeights, pairs: list, lr: float, steps: int, warmup: int, budget_s: float,
               plan: bool, stop_at: int | None = None,
               curve_probe: Any = None) -> tuple[UNet2DConditionModel, Any, dict]:
    """Train `student` on kd_loss for `steps` optimizer steps (warmup, then cosine to 0.1x; AdamW; bf16 autocast
    on CUDA; grad clip 1). With `plan`, the step count is cut once, at the end of the warmup (so the LR of every
    step taken is the same whatever the final count), to what fits `budget_s` at the measured rate; the run
    stops at `budget_s` in any case, and after `stop_at` steps when given (the LR schedule still spans `steps`).
    `curve_probe(student)`, every --curve-every steps and at the end: the caption accuracy of the weights being trained
    (raw, not EMA) for the learning curve; its time is not counted in the budget.
    Returns (final weights: the EMA when --ema, raw weights or None, stats)."""
    student.to(device).train().requires_grad_(True)
    params = list(student.parameters())
    graph = device.type == "cuda" and args.cuda_graph
    opt = make_optimizer(params, lr, 0.01, device, graph)

    def loss_fn(noisy: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, target: torch.Tensor) -> dict:
        with _autocast(device, cache=not graph):
            return kd_loss(student, teacher.unet, noisy, t, {"encoder_hidden_states": emb}, target, weights, pairs)

    train_step = TrainStep(loss_fn, params, opt, graph)
    ema = [p.detach().clone() for p in params] if args.ema else None
    gen = torch.Generator(device).manual_seed(args.seed + 1)  # the same batches and noise for every student
    cond_drop = 0.1
    total, planned = steps, steps
    probe = (warmup // 4, warmup) if plan and budget_s and warmup >= 20 else None  # steps timed to plan the run
    sums = torch.zeros(4, device=device)
    n_sum, last = 0, {}
    curve: list[dict[str, float]] = []

    def measure_curve() -> float:
        _sync(device)
        t = time.time()
        acc = curve_probe(student)
        curve.append({"step": step, "caption_accuracy": round(acc, 4)})
        log(f"{label} step {step}: caption accuracy {acc:.3f} ({len(curve_probe.prompts)} prompts, "
            f"{time.time() - t:.0f}s)")
        return time.time() - t

    _sync(device)
    t0 = time.time()
    t_probe = t0
    step = 0
    while step < min(total, stop_at or total):
        if budget_s and time.time() - t0 > budget_s:
            log(f"{label}: time cap of {budget_s:.0f}s reached at step {step}/{total}")
            break
        set_lr(opt, lr * lr_factor(step, warmup, step / total))
        lat, emb = draw(data, args.batch, gen, cond_drop)
        noisy, t, target = diffusion_batch(teacher.scheduler, lat, teacher.prediction_type, gen)
        parts = train_step(noisy, t, emb, target)
        if ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - min(args.ema, (1 + step) / (10 + step)))
        sums += torch.stack([parts[k].detach().float() for k in ("loss", "task", "out", "feat")])
        n_sum += 1
        step += 1
        if probe and step == probe[0]:
            _sync(device)
            t_probe = time.time()
        if probe and step == probe[1]:
            _sync(device)
            rate = (time.time() - t_probe) / (probe[1] - probe[0])
            fit = step + int(0.95 * (budget_s - (time.time() - t0)) / rate)
            if fit < total:
                log(f"{label}: {rate * 1e3:.0f} ms/step; {total} steps would take {total * rate:.0f}s, over the "
                    f"{budget_s:.0f}s cap: planning {fit} steps")
                total = fit
        if step % args.log_every == 0 or step == min(total, stop_at or total):
            _sync(device)
            last = {k: float(v) / n_sum for k, v in zip(("loss", "task", "out", "feat"), sums.tolist())}
            sums.zero_()
            n_sum = 0
            el = time.time() - t0
            log(f"{label} step {step}/{total} " + " ".join(f"{k} {v:.4f}" for k, v in last.items())
                + f" ({el:.0f}s, {el / step * 1e3:.0f} ms/step)")
        if curve_probe and step % args.curve_every == 0 and step < min(total, stop_at or total):
            paused = measure_curve()
            t0 += paused  # the budget and the step rate count training only
            t_probe += paused
    _sync(device)
    seconds = time.time() - t0
    if curve_probe:
        measure_curve()
    student.eval().requires_grad_(False)
    raw = None
    if ema is not None:
        raw = student
        student = copy.deepcopy(raw)
        with torch.no_grad():
            for p, e in zip(student.parameters(), ema):
                p.copy_(e)
    stats = {"steps": step, "planned_steps": total, "requested_steps": planned, "batch": args.batch, "lr": lr,
             "cuda_graph": train_step.graph is not None, "cuda_graph_error": train_step.failed, "curve": curve,
             "warmup": warmup, "ema": args.ema or None, "seconds": round(seconds, 1),
             "ms_per_step": round(seconds / max(1, step) * 1e3, 1), "final_loss": last,
             "weights": vars(weights), "cond_drop": cond_drop}
    log(f"{label}: {step} steps in {seconds:.0f}s")
    return student, raw, stats


def step_distill(distilled: UNet2DConditionModel, teacher: Any, data: dict[str, Any], args,
                 device: torch.device) -> tuple[StepDistiller, list[tuple[str, int, dict]], dict]:
    """models/steps.py's StepDistiller on the distilled student, phase by phase, with one AdamW over all phases
    and a warmup + cosine LR per phase. Returns the distiller (its student is the final one), a snapshot of the
    weights after every phase but the last (objective, sampling steps, state dict) and stats."""
    schedule = Schedule.from_scheduler(teacher.scheduler)
    rounds = 0
    if args.steps_objective != "consistency":
        rounds = int(round(math.log2(args.teacher_steps / args.final_steps)))
    d = StepDistiller(args.steps_objective, copy.deepcopy(distilled).float(), teacher.unet, schedule,
                      uncond={"encoder_hidden_states": data["empty"]}, teacher_steps=args.teacher_steps,
                      rounds=max(rounds, 1), guidance_range=tuple(args.guidance_range), lcm_steps=args.final_steps)
    d.student.to(device)
    opt = make_optimizer(d.params, args.steps_lr, 0.0, device, graph=False)
    gen = torch.Generator(device).manual_seed(args.seed + 2)
    per_phase = args.steps_minutes * 60 / len(d.phases) if args.steps_minutes else 0.0
    per = args.steps_per_round
    warmup = max(1, min(50, per // 10))
    snapshots, phase_stats = [], []
    t_all = time.time()
    for i in range(len(d.phases)):
        ph = d.start_phase(i)
        d.student.train()
        _sync(device)
        t0 = time.time()
        n, sums, last = 0, torch.zeros((), device=device), float("nan")
        while n < per:
            if per_phase and time.time() - t0 > per_phase:
                log(f"steps phase {i + 1}: time cap of {per_phase:.0f}s reached at step {n}/{per}")
                break
            set_lr(opt, args.steps_lr * lr_factor(n, warmup, n / per))
            lat, emb = draw(data, args.steps_batch, gen, 0.0)
            with _autocast(device):
                loss = d.loss(lat, {"encoder_hidden_states": emb}, gen)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(d.params, 1.0)
            opt.step()
            d.after_step()
            sums += loss.detach().float()
            n += 1
            if i == 0 and n == min(30, per) and per_phase and per > 30:  # plan the phases to fit the cap
                _sync(device)
                rate = (time.time() - t0) / n
                fit = int(0.9 * per_phase / rate)
                if fit < per:
                    log(f"steps: {rate * 1e3:.0f} ms/step; {per} steps per phase would take {per * rate:.0f}s, "
                        f"over the {per_phase:.0f}s per phase: planning {fit}")
                    per = max(fit, n)
            if n % args.log_every == 0 or n == per:
                last = float(sums) / (n % args.log_every or args.log_every)
                sums.zero_()
                log(f"steps phase {i + 1}/{len(d.phases)} ({ph.objective}, {ph.steps}-step sampler) step {n}/{per} "
                    f"loss {last:.5f} ({time.time() - t0:.0f}s)")
        _sync(device)
        phase_stats.append({"objective": ph.objective, "steps": ph.steps, "optimizer_steps": n,
                            "seconds": round(time.time() - t0, 1), "final_loss": last})
        if i < len(d.phases) - 1:
            snapshots.append((ph.objective, ph.steps, {k: v.detach().cpu().clone()
                                                       for k, v in d.export_student().state_dict().items()}))
    d.student.eval().requires_grad_(False)
    stats = {"objective": args.steps_objective, "teacher_steps": args.teacher_steps, "final_steps": d.final_steps,
             "steps_per_round": per, "requested_steps_per_round": args.steps_per_round, "batch": args.steps_batch,
             "lr": args.steps_lr, "guidance_range": list(args.guidance_range), "phases": phase_stats,
             "seconds": round(time.time() - t_all, 1)}
    return d, snapshots, stats


# ------------------------------------------------------------------------------------------ evaluation


def make_pipe(base: StableDiffusionPipeline, unet: UNet2DConditionModel, scheduler: Any) -> StableDiffusionPipeline:
    parts = {k: v for k, v in base.components.items() if k not in ("unet", "scheduler")}
    pipe = StableDiffusionPipeline(**{**parts, "unet": unet, "scheduler": scheduler, "safety_checker": None,
                                      "feature_extractor": None, "requires_safety_checker": False})
    pipe.set_progress_bar_config(disable=True)
    return pipe


class CurveProbe:
    """Caption accuracy of a U-Net while it trains: the teacher's pipeline with that U-Net, the evaluation's
    sampler (--eval-steps, --guidance, seed 0) on the first --curve-prompts evaluation prompts."""

    def __init__(self, base: StableDiffusionPipeline, prompts: list[str], args):
        self.base, self.prompts, self.args = base, prompts, args

    def __call__(self, unet: UNet2DConditionModel) -> float:
        pipe = make_pipe(self.base, unet, self.base.scheduler)
        images = sample(pipe, self.prompts, self.args.eval_steps, self.args.guidance, seed=0,
                        batch=self.args.eval_batch)
        return shapes.caption_accuracy(images, self.prompts)["overall"]


def load_pipe(folder: str | Path, device: torch.device) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_macs(unet: UNet2DConditionModel) -> int:
    """MACs of one U-Net forward at batch 1 (64 px: 4x16x16 latents), counted on the meta device."""
    return M.unet_macs(unet.config, 16, 16)


def generate_row(name: str, label: str, pipe: StableDiffusionPipeline, steps: int, guidance: float,
                 prompts: list[str], args, pool: Any) -> dict[str, Any]:
    """Images for every prompt with one sampler setting (scored by caption accuracy in `pool`, while the GPU goes
    on), its U-Net's size and MACs. Private keys (_pipe, _images, _acc) are dropped before results.json."""
    t0 = time.time()
    images = sample(pipe, prompts, steps, guidance, seed=0, batch=args.eval_batch)
    cfg = guidance > 1 and pipe.unet.config.get("time_cond_proj_dim") is None  # as StableDiffusionPipeline decides
    macs = unet_macs(pipe.unet)
    row = {"name": name, "label": label, "steps": steps, "guidance": guidance, "cfg": cfg,
           "w_input": not cfg and guidance > 1, "scheduler": type(pipe.scheduler).__name__,
           "params": count_params(pipe.unet), "macs_per_forward": macs,
           "macs_per_image": macs * steps * (2 if cfg else 1),
           "generate_seconds": round(time.time() - t0, 1), "_pipe": pipe, "_images": images,
           "_acc": pool.submit(shapes.caption_accuracy, images, prompts) if pool else None}
    log(f"eval {label}, {steps} steps: {len(images)} images in {row['generate_seconds']}s")
    return row


def latency_key(row: dict[str, Any]) -> str:
    """Samplers that run the same computation (U-Net config, steps, CFG, scheduler) share one measurement."""
    cfg = {k: v for k, v in dict(row["_pipe"].unet.config).items() if not k.startswith("_")}
    return json.dumps([cfg, row["steps"], row["guidance"], row["cfg"], row["scheduler"]], sort_keys=True, default=str)


def measure_latencies(rows: list[dict[str, Any]], prompt: str, args, device: torch.device) -> None:
    """Latency per image (one prompt, batch 1, the whole pipeline call: text encoder, U-Net steps, VAE decode) with
    pipelines.metrics.measure_latency: every distinct sampler warmed up, then timed once per round, round-robin,
    so a slow spell of a shared machine falls on all of them; the median over the rounds."""
    calls: dict[str, Any] = {}
    for r in rows:
        key = latency_key(r)
        if key not in calls:
            def one(pipe=r["_pipe"], steps=r["steps"], guidance=r["guidance"]) -> None:
                pipe([prompt], height=64, width=64, num_inference_steps=steps, guidance_scale=guidance,
                     generator=torch.Generator(device).manual_seed(0), output_type="pt")

            calls[key] = one
    t0 = time.time()
    for fn in calls.values():
        M.measure_latency(fn, repeats=0, warmup=args.latency_warmup, device=device)
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(args.latency_repeats):
        for key, fn in calls.items():
            times[key] += M.measure_latency(fn, repeats=1, warmup=0, device=device)
    for r in rows:
        r["latency_ms"] = round(M.median(times[latency_key(r)]), 2)
    log(f"latency: {len(calls)} distinct samplers, {args.latency_repeats} rounds in {time.time() - t0:.0f}s")


def caption_pool() -> Any:
    """Worker processes for the caption-accuracy analyzer (pure Python + numpy, ~2.5 ms an image). Forked: the
    children touch no CUDA, only PIL images and numpy."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    try:
        return ProcessPoolExecutor(max_workers=max(1, min(8, (os.cpu_count() or 2) - 1)),
                                   mp_context=multiprocessing.get_context("fork"))
    except (OSError, ValueError) as e:
        log(f"no process pool for caption accuracy ({e}); scoring in this process")
        return None


def collect_accuracy(rows: list[dict[str, Any]], prompts: list[str], pool: Any) -> None:
    """Each row's caption accuracy from the pool (then shut down); scored here when the pool failed or hung."""
    for r in rows:
        acc = None
        if r["_acc"] is not None:
            try:
                acc = r["_acc"].result(timeout=300)
            except Exception as e:  # noqa: BLE001 - a broken or hung pool must not lose the run
                log(f"caption accuracy in the pool failed for {r['label']} ({type(e).__name__}: {e}); scoring here")
        r["caption_accuracy"] = acc or shapes.caption_accuracy(r["_images"], prompts)
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)


def finish_rows(rows: list[dict], eval_steps: int, ref_steps: int) -> None:
    """Ratios against the teacher: U-Net params and MACs per image against the teacher at `ref_steps` (25) with
    CFG (issue 10's reference), latency speed-up likewise, accuracy against the teacher at the model card's
    setting (`eval_steps`: 20 steps, CFG 5; issue 8's goal: >= 0.95)."""
    card = next(r for r in rows if r["name"] == "teacher" and r["steps"] == eval_steps)
    ref = next(r for r in rows if r["name"] == "teacher" and r["steps"] == ref_steps)
    for r in rows:
        r["param_ratio"] = r["params"] / ref["params"]
        r["macs_ratio"] = r["macs_per_image"] / ref["macs_per_image"]
        r["speedup_vs_reference"] = ref["latency_ms"] / r["latency_ms"]
        r["accuracy_vs_teacher"] = ratio(r["caption_accuracy"]["overall"], card["caption_accuracy"]["overall"])


def table(rows: list[dict], eval_steps: int, ref_steps: int) -> str:
    ref = f"teacher {ref_steps}+CFG"
    head = (f"| model | sampler | U-Net params (vs teacher) | U-Net GMACs/image (vs {ref}) | ms/image | speed-up "
            f"vs {ref} | caption acc. | vs teacher {eval_steps}+CFG | " + " | ".join(ATTRS) + " |")
    lines = [head, "|" + "---|" * (8 + len(ATTRS))]
    for r in rows:
        acc = r["caption_accuracy"]
        guide = f"CFG {r['guidance']:g}" if r["cfg"] else f"w = {r['guidance']:g}" if r["w_input"] else "no CFG"
        how = f"{r['steps']} step{'s' if r['steps'] > 1 else ''}, {guide}, {r['scheduler'].removesuffix('Scheduler')}"
        lines.append(
            f"| {r['label']} | {how} | {r['params'] / 1e6:.2f}M ({r['param_ratio']:.2f}x) | "
            f"{r['macs_per_image'] / 1e9:.2f} ({r['macs_ratio']:.3f}x) | {r['latency_ms']:.1f} | "
            f"{r['speedup_vs_reference']:.2f}x | **{acc['overall']:.3f}** | {fmt(r['accuracy_vs_teacher'])} | "
            + " | ".join(f"{acc[k]:.3f}" for k in ATTRS) + " |")
    return "\n".join(lines)


def curve_table(kd: list[dict], scratch: list[dict], prompts: int) -> str:
    """The learning curves side by side (empty without --curve-every)."""
    if not kd and not scratch:
        return ""
    by_step: dict[int, dict[str, float]] = {}
    for name, points in (("kd", kd), ("scratch", scratch)):
        for pt in points:
            by_step.setdefault(pt["step"], {})[name] = pt["caption_accuracy"]
    lines = [f"\n\nLearning curves: caption accuracy on the first {prompts} evaluation prompts, weights being "
             "trained.\n",
             "| optimizer step | distilled (KD) | from scratch |", "|---|---|---|"]
    for step in sorted(by_step):
        v = by_step[step]
        lines.append(f"| {step} | {fmt(v.get('kd'))} | {fmt(v.get('scratch'))} |")
    return "\n".join(lines)


def ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None  # a teacher that scores 0 (tiny CPU runs) gives no ratio


def fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def folder_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6, 2)


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--out", required=True, help="output folder (students, results.json, prompts.txt, ...)")
    ap.add_argument("--images", type=int, default=50_000, help="generated training images (seed --data-seed)")
    ap.add_argument("--data-seed", type=int, default=0, help="0: the teacher's own training set")
    ap.add_argument("--latents", choices=["mean", "sample"], default="mean",
                    help="VAE posterior means (what the teacher was trained on) or samples (the distill stage's "
                         "data.latents: dist)")
    ap.add_argument("--preset", default="bk-small", help="student preset (models/student.py): bk-base, bk-small, "
                                                          "bk-tiny")
    ap.add_argument("--feature-level", choices=["block", "layer"], default="block")
    ap.add_argument("--w-task", type=float, default=1.0, help="KD loss weights (pipelines/config.py LossConfig)")
    ap.add_argument("--w-out", type=float, default=1.0)
    ap.add_argument("--w-feat", type=float, default=1.0)
    ap.add_argument("--kd-steps", type=int, default=60_000,
                    help="optimizer steps of the distilled and scratch students (upper bound: --kd-minutes plans the "
                         "count that fits)")
    ap.add_argument("--batch", type=int, default=128,
                    help="128 with lr 1e-3: 0.813 after 2550 steps where 512 with 2e-3 gave 0.787 after 966 (H200)")
    ap.add_argument("--lr", type=float, default=1e-3,
                    help="peak LR of the distilled student (3e-4 was worse: 0.753 against 0.813 at ~2500 steps, H200)")
    ap.add_argument("--scratch-lr", type=float, default=None,
                    help="peak LR of the scratch student (default --lr; the teacher was trained at 1e-3)")
    ap.add_argument("--warmup", type=int, default=200, help="LR warmup steps (at most a fifth of --kd-steps)")
    ap.add_argument("--ema", type=float, default=0.0,
                    help="EMA decay of the weights (0: none; at 400 steps an EMA of 0.995 scored 1.5-6.5 points below "
                         "the raw weights)")
    ap.add_argument("--also-raw", action="store_true", help="with --ema: also evaluate the students' raw weights")
    ap.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                    help="CUDA: run every KD/scratch step eagerly (default: one CUDA graph per step after 3 eager "
                         "ones, several times faster for these launch-bound U-Nets)")
    ap.add_argument("--curve-every", type=int, default=0,
                    help="learning curves: caption accuracy of both students every N steps and at the end (0: off)")
    ap.add_argument("--curve-prompts", type=int, default=200, help="prompts per learning-curve point")
    ap.add_argument("--kd-minutes", type=float, default=3.0, help="time cap of the KD phase (0: none); the step "
                                                                   "count is planned to fit it")
    ap.add_argument("--scratch-minutes", type=float, default=3.0, help="time cap of the scratch phase (0: none)")
    ap.add_argument("--steps-objective", choices=["guided", "progressive", "consistency"], default="guided")
    ap.add_argument("--teacher-steps", type=int, default=16, help="guided/progressive: the first progressive "
                                                                  "teacher's DDIM steps")
    ap.add_argument("--final-steps", type=int, default=2, help="guided/progressive: halve down to this many steps; "
                                                               "consistency: the exported student's steps")
    ap.add_argument("--steps-per-round", type=int, default=300, help="optimizer steps per phase")
    ap.add_argument("--steps-batch", type=int, default=None, help="default --batch")
    ap.add_argument("--steps-lr", type=float, default=5e-4)
    ap.add_argument("--guidance-range", type=float, nargs=2, default=(1.0, 8.0), metavar=("LOW", "HIGH"),
                    help="w sampled in step distillation (pipelines/config.py StepsConfig)")
    ap.add_argument("--steps-minutes", type=float, default=2.0, help="time cap of step distillation (0: none)")
    ap.add_argument("--no-steps", action="store_true", help="skip step distillation")
    ap.add_argument("--eval-prompts", type=int, default=500)
    ap.add_argument("--eval-batch", type=int, default=100, help="prompts per pipeline call (the model card's 100)")
    ap.add_argument("--eval-steps", type=int, default=CARD_STEPS,
                    help="DDIM steps of the teacher and the block-removal students (the model card's 20)")
    ap.add_argument("--reference-steps", type=int, default=REF_STEPS,
                    help="DDIM steps of the teacher with CFG that speed-ups are measured against (issue 10's 25)")
    ap.add_argument("--step-counts", type=int, nargs="+", default=[1, 2, 4, 8],
                    help="sampling steps of the step students (and of the teacher baseline)")
    ap.add_argument("--guidance", type=float, default=CARD_GUIDANCE, help="CFG scale / w of every evaluation")
    ap.add_argument("--latency-repeats", type=int, default=5, help="timed rounds over all samplers")
    ap.add_argument("--latency-warmup", type=int, default=1)
    ap.add_argument("--reference-images", type=int, default=0,
                    help="write this many dataset images of the eval prompts to OUT/reference (for FID)")
    ap.add_argument("--append-results", default=None, help="append a dated section to this file (bench/RESULTS.md)")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads of torch (0: its default); 1 keeps a CPU run steady on a shared machine")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=100)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible (use --device cpu)")
    for name in ("images", "kd_steps", "batch", "steps_per_round", "eval_prompts", "eval_batch", "eval_steps",
                 "reference_steps", "latency_repeats", "log_every"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.ema < 1:
        ap.error(f"--ema must be in [0, 1), got {args.ema}")
    lo, hi = args.guidance_range
    if not 1.0 <= lo <= hi:
        ap.error(f"--guidance-range {lo} {hi}: need 1 <= LOW <= HIGH")
    if not args.no_steps and not lo <= args.guidance <= hi:
        ap.error(f"--guidance {args.guidance} is outside --guidance-range {lo} {hi}, where the step student learns w")
    if any(n < 1 for n in args.step_counts):
        ap.error(f"--step-counts must be >= 1, got {args.step_counts}")
    if args.steps_objective != "consistency":
        r = args.teacher_steps / max(args.final_steps, 1)
        if args.final_steps < 1 or r < 2 or r != 2 ** round(math.log2(r)):
            ap.error(f"--teacher-steps {args.teacher_steps} / --final-steps {args.final_steps} must be a power of 2 "
                     ">= 2 (each progressive round halves the steps)")
    args.scratch_lr = args.scratch_lr or args.lr
    args.steps_batch = args.steps_batch or args.batch
    args.warmup = max(1, min(args.warmup, args.kd_steps // 5))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = "python scripts/train_shapes_student.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.threads:
        torch.set_num_threads(args.threads)
    return run(args, command)


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True  # as the teacher's training and evaluation
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)
    t_start = time.time()
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"
    log(f"device {hw}, torch {torch.__version__}; {command}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    teacher_dir = resolve_model_dir(TEACHER)
    teacher = load_teacher(TEACHER, dtype="float32", device=device)
    spec = preset_spec(args.preset, teacher.unet.config)
    data = prepare_data(teacher, args, device)
    timings["data"] = data["stats"]["seconds"]

    curve_probe = None
    if args.curve_every:
        curve_prompts = shapes.prompts(args.curve_prompts, seed=EVAL_SEED)
        curve_probe = CurveProbe(load_pipe(teacher_dir, device), curve_prompts, args)

    # 1. the distilled student: the teacher's weights, the KD loss
    weights = KDWeights(task=args.w_task, out=args.w_out, feat=args.w_feat, attn=0.0)
    student = build_student(teacher.unet, spec)
    pairs = feature_pairs(student, teacher.unet, spec, args.feature_level) if weights.feat > 0 else []
    log(f"distilled student: {args.preset}, {count_params(student) / 1e6:.2f}M params (teacher "
        f"{count_params(teacher.unet) / 1e6:.2f}M), {len(pairs)} feature pairs ({args.feature_level})")
    distilled, distilled_raw, kd_stats = train_unet(
        student, teacher, data, args, device, label="kd", weights=weights, pairs=pairs, lr=args.lr,
        steps=args.kd_steps, warmup=args.warmup, budget_s=args.kd_minutes * 60, plan=True, curve_probe=curve_probe)
    timings["kd"] = kd_stats["seconds"]

    # 2. the scratch student: the same architecture at random, task loss only, the same steps/schedule/data
    torch.manual_seed(args.seed)
    scratch = UNet2DConditionModel.from_config(student_config(teacher.unet.config, spec))
    scratch, scratch_raw, scratch_stats = train_unet(
        scratch, teacher, data, args, device, label="scratch", weights=KDWeights(task=1.0, out=0.0, feat=0.0),
        pairs=[], lr=args.scratch_lr, steps=kd_stats["planned_steps"], warmup=args.warmup,
        budget_s=args.scratch_minutes * 60, plan=False, stop_at=kd_stats["steps"], curve_probe=curve_probe)
    timings["scratch"] = scratch_stats["seconds"]

    common = {"teacher": TEACHER, "preset": args.preset, "spec": spec.to_dict(),
              "script": "scripts/train_shapes_student.py", "command": command}
    save_student(distilled.cpu(), teacher_dir, out / "distilled",
                 {**common, "method": "kd", "step": kd_stats["steps"], "losses": kd_stats["final_loss"],
                  "params": count_params(distilled), "training": kd_stats})
    save_student(scratch.cpu(), teacher_dir, out / "scratch",
                 {**common, "method": "scratch", "step": scratch_stats["steps"], "losses": scratch_stats["final_loss"],
                  "params": count_params(scratch), "training": scratch_stats})

    # 3. step distillation of the distilled student
    steps_stats, snapshots, step_unet = None, [], None
    if not args.no_steps:
        d, snapshots, steps_stats = step_distill(distilled.to(device), teacher, data, args, device)
        timings["steps"] = steps_stats["seconds"]
        step_unet = d.export_student()
        sched = student_scheduler(args.steps_objective, teacher.scheduler, d.final_steps)
        phases = [vars(p) for p in d.phases]
        meta = {"objective": args.steps_objective, "steps": d.final_steps, "guidance_scale": args.guidance,
                "guidance_range": list(args.guidance_range), "phases": phases, "teacher": TEACHER,
                "source": str(out / "distilled"), "lora_rank": None, "step": sum(p["optimizer_steps"]
                                                                                for p in steps_stats["phases"]),
                "loss": steps_stats["phases"][-1]["final_loss"], "scheduler": type(sched).__name__,
                "training": steps_stats}
        save_steps_student(copy.deepcopy(step_unet).cpu(), str(out / "distilled"), out / "steps", sched, meta)
    data_stats = data["stats"]
    del data
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 4. evaluation: every sampler on the same prompts and seeds
    t_eval = time.time()
    prompts = shapes.prompts(args.eval_prompts, seed=EVAL_SEED)
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")
    if args.reference_images:
        (out / "reference").mkdir(exist_ok=True)
        for i, s in enumerate(shapes.generate(args.reference_images, seed=EVAL_SEED)):
            s.image.save(out / "reference" / f"{i:05d}.png")
    t_pipe = load_pipe(teacher_dir, device)
    g, ev = args.guidance, args.eval_steps
    rows: list[dict[str, Any]] = []
    pool = caption_pool()

    def add(name: str, label: str, pipe: StableDiffusionPipeline, steps: int) -> None:
        rows.append(generate_row(name, label, pipe, steps, g, prompts, args, pool))

    add("teacher", "teacher (shapes-sd1)", t_pipe, ev)
    if args.reference_steps != ev:
        add("teacher", "teacher (shapes-sd1)", t_pipe, args.reference_steps)
    add("distilled", f"{args.preset}, distilled (KD)", load_pipe(out / "distilled", device), ev)
    add("scratch", f"{args.preset}, from scratch (same budget)", load_pipe(out / "scratch", device), ev)
    if args.also_raw and distilled_raw is not None:
        add("distilled_raw", f"{args.preset}, distilled, raw weights (no EMA)",
            make_pipe(t_pipe, distilled_raw.to(device), t_pipe.scheduler), ev)
        add("scratch_raw", f"{args.preset}, from scratch, raw weights (no EMA)",
            make_pipe(t_pipe, scratch_raw.to(device), t_pipe.scheduler), ev)
    if not args.no_steps:
        trailing = DDIMScheduler.from_config(t_pipe.scheduler.config, timestep_spacing="trailing")
        t_few = make_pipe(t_pipe, t_pipe.unet, trailing)
        for n in args.step_counts:
            add("teacher_few_steps", "teacher, DDIM trailing (no step distillation)", t_few, n)
        s_pipe = load_pipe(out / "steps", device)  # the exported folder, as plain diffusers loads it
        final = steps_stats["final_steps"]
        for n in args.step_counts:
            add("steps", f"{args.preset} + step distillation ({args.steps_objective}, {final}-step student)",
                s_pipe, n)
        for i, (objective, n, state) in enumerate(snapshots):  # each earlier phase's student at its own steps
            unet = copy.deepcopy(s_pipe.unet)
            unet.load_state_dict(state)
            what = "after stage 1 (w input)" if objective == "guided" else f"after phase {i + 1} ({objective})"
            add(f"steps_phase{i + 1}", f"{args.preset} + step distillation, {what}",
                make_pipe(t_pipe, unet, s_pipe.scheduler), n)
    collect_accuracy(rows, prompts, pool)  # first: the pool's processes stay off the CPU while latency is timed
    measure_latencies(rows, prompts[0], args, device)
    for r in rows:
        a = r["caption_accuracy"]
        log(f"{r['label']}, {r['steps']} steps: caption accuracy {a['overall']:.3f} ("
            + ", ".join(f"{k} {a[k]:.3f}" for k in ATTRS) + f"); {r['latency_ms']:.1f} ms/image")
    finish_rows(rows, ev, args.reference_steps)
    shown = [("teacher", ev), ("distilled", ev), ("scratch", ev)]
    if steps_stats:
        shown.append(("steps", steps_stats["final_steps"]))
    # one row per model: the first (up to 8) prompts of prompts.txt
    cols = min(8, len(prompts))
    first = {(r["name"], r["steps"]): r["_images"][:cols] for r in reversed(rows)}
    grid([im for k in shown if k in first for im in first[k]], cols=cols).save(out / "samples.png")
    rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    timings["eval"] = round(time.time() - t_eval, 1)

    acc = {r["name"]: r["caption_accuracy"]["overall"] for r in rows if r["steps"] == ev}
    card, kd_acc = acc["teacher"], acc["distilled"]
    results = {
        "date": time.strftime("%Y-%m-%d"), "device": hw, "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__, "command": command,
        "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
        "teacher": {"uri": TEACHER, "params": count_params(teacher.unet)},
        "data": data_stats, "kd": kd_stats, "scratch": scratch_stats, "steps": steps_stats,
        "eval": {"prompts": len(prompts), "seed": EVAL_SEED, "guidance": g, "image_seeds": "chunk i of "
                 f"{args.eval_batch} prompts: generator seed i", "latency": f"median of {args.latency_repeats} "
                 f"rounds after {args.latency_warmup} warm-up, batch 1, fp32, whole pipeline call (text encoder, U-Net "
                 "steps, VAE decode); one measurement per distinct computation"},
        "rows": rows,
        "goal": {"distilled_over_teacher": ratio(kd_acc, card), "target": 0.95,
                 "met": card > 0 and kd_acc >= 0.95 * card, "scratch_over_teacher": ratio(acc["scratch"], card)},
        "folders_mb": {name: folder_mb(out / name) for name in ("distilled", "scratch", "steps")
                       if (out / name).is_dir()},
        "timings_seconds": {**timings, "total": round(time.time() - t_start, 1)},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    md = table(rows, ev, args.reference_steps) + curve_table(kd_stats["curve"], scratch_stats["curve"],
                                                            args.curve_prompts)
    print("\n" + md + "\n", flush=True)
    log(f"distilled / teacher caption accuracy: {fmt(results['goal']['distilled_over_teacher'])} (goal >= 0.95: "
        f"{'met' if results['goal']['met'] else 'not met'}); scratch / teacher: "
        f"{fmt(results['goal']['scratch_over_teacher'])}; timings {results['timings_seconds']}")
    if args.append_results:
        append_results(Path(args.append_results), results, md)
    return results


def append_results(path: Path, r: dict[str, Any], md: str) -> None:
    kd, sc, st = r["kd"], r["scratch"], r["steps"]
    steps_line = "" if st is None else (
        f" Step distillation ({st['objective']}, guidance range {st['guidance_range']}): "
        + ", ".join(f"{p['objective']} -> {p['steps']} steps {p['optimizer_steps']} steps" for p in st["phases"])
        + f" at batch {st['batch']}, lr {st['lr']:g} ({st['seconds']:.0f}s).")
    text = (
        f"\n### Shapes students: distilled vs scratch, step distillation ({r['date']}, {r['device']})\n\n"
        f"Written by scripts/train_shapes_student.py; torch {r['torch']}, diffusers {r['diffusers']}; "
        f"command: `{r['command']}`.\n"
        f"Data: {r['data']['images']} generated images (seed {r['data']['seed']}, {r['data']['distinct_captions']} "
        f"captions), VAE latents ({r['data']['latents']}). KD: {kd['steps']} steps at batch {kd['batch']}, lr "
        f"{kd['lr']:g}, EMA {kd['ema']} ({kd['seconds']:.0f}s, {kd['ms_per_step']:.0f} ms/step); scratch: "
        f"{sc['steps']} steps, same batch, schedule and data, lr {sc['lr']:g} ({sc['seconds']:.0f}s)." + steps_line
        + f"\nCaption accuracy on {r['eval']['prompts']} unseen prompts (seed {r['eval']['seed']}); latency: "
        f"{r['eval']['latency']}; MACs: U-Net only. Distilled / teacher (20 steps, CFG): "
        f"{fmt(r['goal']['distilled_over_teacher'])} (goal >= 0.95: {'met' if r['goal']['met'] else 'not met'}); "
        f"scratch / teacher: {fmt(r['goal']['scratch_over_teacher'])}. Total {r['timings_seconds']['total']:.0f}s.\n\n"
        + md + "\n")
    with path.open("a") as f:
        f.write(text)
    log(f"appended the results to {path}")


if __name__ == "__main__":
    main()
