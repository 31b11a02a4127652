"""The Ray Train shell every training stage shares (distill, steps, Tune's trials, the benchmarks).

A stage's worker function reads top to bottom as set up, step, validate, save; what it needs from here:

    worker_setup(dc)                          rank, world size, device (accelerator settings, seed)
    StudentEngine(student, dc, world, dev)    DeepSpeed ZeRO or DDP + AdamW; eng.step(loss_fn, inputs) runs one
                                              micro-batch (optionally the whole step as one CUDA graph);
                                              eng.save / eng.load; the LR schedule with its floor (lr_at)
    EMA                                       an exponential moving average of the student's weights
    worker_batches(manifest, ...)             a worker's TrainBatches: batches of the embedding cache as U-Net
                                              inputs on the device, streamed by Ray Data, or the worker's rows
                                              read once and kept on the device when they are few
                                              (distill.preload_gb); latents as the teacher expects them, a
                                              caption_dropout share of empty prompts
    trainer_configs(cfg), training_datasets(cfg, manifest), cache_manifest(cfg), upload_folder(local, uri)
                                              the driver's side: Ray Train's scaling/run configs, the cache as
                                              Ray datasets, the checked manifest, the exported folder to its URI
    finish_export(folder, cfg, title)         the exported folder's model card and fp16 variant (cfg.export)

Only the functions that say so touch Ray; the rest is plain PyTorch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.fp8 import fp8_unsupported, use_fp8_linear
from models.student import META_FILE, read_meta_file
from models.teacher import encode_prompts, map_tensors, unet_conditioning
from pipelines.cache import CacheManifest, read_manifest, read_split_columns, sample_latents
from pipelines.config import Config, DistillConfig, uses_cudagraphs  # noqa: F401 (part of the shell)
from pipelines.storage import filesystem, is_remote, join, require_gpus

CACHE_COLUMNS = ("latent", "latent_mean", "latent_std", "prompt_embeds", "pooled", "time_ids")
DS_TAG = "ds"  # DeepSpeed's checkpoint tag inside each checkpoint folder
# the variables workers need to reach the same servers as the driver; no credentials (workers take those from
# their own environment: instance role, node env, IRSA, the standard AWS files)
WORKER_ENV = ("DISTILLERY_CACHE", "HF_HUB_OFFLINE", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL",
              "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE")


# ---------------------------------------------------------------------------------------------------
# Schedule, optimizer, DeepSpeed config, precision (pure)
# ---------------------------------------------------------------------------------------------------


def lr_at(step: int, dc: DistillConfig) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warm-up, then constant, or a linear or cosine
    decay from lr to lr * min_lr_ratio at max_steps."""
    if step < dc.warmup_steps:
        return dc.lr * (step + 1) / dc.warmup_steps
    if dc.lr_schedule == "constant":
        return dc.lr
    frac = min(1.0, (step - dc.warmup_steps) / max(1, dc.max_steps - dc.warmup_steps))
    floor = dc.lr * dc.min_lr_ratio
    if dc.lr_schedule == "linear":
        return floor + (dc.lr - floor) * (1.0 - frac)
    return floor + (dc.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))


def make_optimizer(model: torch.nn.Module, dc: DistillConfig, use_gpu: bool = False,
                   capturable: bool = False) -> torch.optim.AdamW:
    """AdamW without weight decay on biases and norms; fused on GPU unless the optimizer lives on the CPU.
    `capturable` (a CUDA-graph step): the learning rate is a device tensor that set_lr fills in place."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    fused = use_gpu and torch.cuda.is_available() and not dc.offload_optimizer
    groups = [{"params": decay, "weight_decay": dc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if capturable:
        lr = torch.tensor(dc.lr, device=params[0].device)
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True, capturable=True)
    return torch.optim.AdamW(groups, lr=dc.lr, betas=(0.9, 0.999), eps=1e-8, fused=fused)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        if torch.is_tensor(g["lr"]):
            g["lr"].fill_(lr)
        else:
            g["lr"] = lr


def ds_config(dc: DistillConfig, world_size: int, use_gpu: bool = False) -> dict[str, Any]:
    """The DeepSpeed config of a run. The optimizer is ours (torch AdamW), the LR schedule too."""
    zero: dict[str, Any] = {"stage": dc.zero_stage}
    if dc.zero_stage >= 1:
        zero.update(overlap_comm=use_gpu, contiguous_gradients=True, reduce_bucket_size=5e7)
    if dc.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False, stage3_param_persistence_threshold=1e5)
    if dc.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if dc.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    return {
        "train_micro_batch_size_per_gpu": dc.batch_size,
        "gradient_accumulation_steps": dc.grad_accum,
        "train_batch_size": dc.batch_size * dc.grad_accum * world_size,
        "gradient_clipping": dc.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dc.precision == "bf16"},
        "fp16": {"enabled": dc.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # offloaded states step with torch AdamW (no C++ build)
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def teacher_dtype(teacher_cfg_dtype: str, precision: str, device: torch.device) -> torch.dtype:
    """The frozen teacher runs in half precision on GPU (bf16 unless training in fp16), fp32 on CPU."""
    if teacher_cfg_dtype != "auto":
        return getattr(torch, teacher_cfg_dtype)
    if device.type != "cuda":
        return torch.float32
    return torch.float16 if precision == "fp16" else torch.bfloat16


def compile_kwargs(dc: DistillConfig) -> dict[str, Any]:
    """torch.compile's keyword arguments for distill.compile_mode."""
    return {} if dc.compile_mode == "default" else {"mode": dc.compile_mode}


def eager_if_compiled(dc: DistillConfig) -> Any:
    """Validation and sampling run eagerly: other shapes and no-grad would each compile the forwards again."""
    return torch.compiler.set_stance("force_eager") if dc.compile else nullcontext()


def fp8_linears(dc: DistillConfig, student: torch.nn.Module, teacher_unet: torch.nn.Module,
                device: torch.device) -> int:
    """distill.fp8_linear: the transformer blocks' linear layers switched to float8 matmuls (models/fp8.py), the
    student's (and the teacher's with "both"), before the engine wraps the student; the number switched."""
    if dc.fp8_linear == "off":
        return 0
    why = fp8_unsupported(device)
    if why:
        raise ValueError(f"distill.fp8_linear={dc.fp8_linear!r}: {why}; set distill.fp8_linear to 'off'")
    return use_fp8_linear(student) + (use_fp8_linear(teacher_unet) if dc.fp8_linear == "both" else 0)


SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION"}
_SDPA_DEFAULT_ORDER: list[int] = []


def prefer_attention_backend(name: str) -> None:
    """distill.attention_backend for this process: that fused SDPA kernel goes to the front of PyTorch's priority
    list, the others after it in their own order ("auto": PyTorch's order). The U-Nets' attention calls
    F.scaled_dot_product_attention, so eager forwards and compiled graphs (which take the choice when they are
    traced) both follow it."""
    from torch.nn.attention import SDPBackend

    if not _SDPA_DEFAULT_ORDER:
        _SDPA_DEFAULT_ORDER.extend(torch._C._get_sdp_priority_order())
    order = list(_SDPA_DEFAULT_ORDER)
    if name != "auto":
        first = int(getattr(SDPBackend, SDPA_BACKENDS[name]))
        order = [first] + [code for code in order if code != first]
    torch._C._set_sdp_priority_order(order)


def to_device(tree: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """A tree of tensors (dicts of dicts, as U-Net conditioning is) on `device`; floating tensors cast to `dtype`."""
    return map_tensors(tree, lambda v: v.to(device, dtype) if dtype is not None and v.is_floating_point()
                       else v.to(device))


def all_mean(values: torch.Tensor, world: int) -> torch.Tensor:
    """The mean of `values` over the workers (the values themselves with one worker)."""
    if world > 1 and torch.distributed.is_initialized():
        values = values.clone()
        torch.distributed.all_reduce(values)
        values /= world
    return values


# ---------------------------------------------------------------------------------------------------
# The student engine: DeepSpeed ZeRO, or DDP + AdamW, behind the few calls a training loop makes
# ---------------------------------------------------------------------------------------------------


def skip_shm_comm_build() -> None:
    """CPU training only: DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (deepspeed_shm_comm,
    30-120 s of C++ on a small machine, again whenever the venv path changes) that only its inference_all_reduce
    uses; training's all-reduce goes through the gloo process group either way. deepspeed 0.19.8 decides by
    `deepspeed.ops.__compatible_ops__` (probed lazily, by compiler subprocesses, and read nowhere else): set
    before the engine starts the backend, it skips both the probe and the build."""
    import deepspeed.ops

    if "__compatible_ops__" not in vars(deepspeed.ops):
        deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
    else:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _tree_copy(dst: Any, src: Any) -> None:
    if isinstance(dst, dict):
        for k in dst:
            _tree_copy(dst[k], src[k])
    elif isinstance(dst, torch.Tensor):
        dst.copy_(src)


def _tree_clone(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _tree_clone(v) for k, v in tree.items()}
    return tree.clone() if isinstance(tree, torch.Tensor) else tree


class StudentEngine:
    """The student being trained and its optimizer. `step(loss_fn, inputs)` runs one micro-batch: `loss_fn(**inputs)`
    returns a dict of scalar tensors with "loss"; backward; every grad_accum micro-batches, gradient clipping and
    the optimizer step at the LR of lr_at.

    With distill.cuda_graph (one CUDA worker, no DeepSpeed), the first three steps run eagerly on a side stream,
    the fourth is captured as one CUDA graph (forwards, backward, clipping, a capturable fused AdamW reading the LR
    from a device tensor), and every later step copies its inputs into the captured ones and replays the graph:
    small U-Nets are bound by launching their few thousand kernels, not by running them. A step that cannot be
    captured falls back to eager steps with a log line. The tensors a replayed step returns are the graph's own:
    read them before the next step."""

    GRAPH_WARMUP = 3

    def __init__(self, student: torch.nn.Module, dc: DistillConfig, world_size: int, device: torch.device):
        self.dc, self.device = dc, device
        use_gpu = device.type == "cuda"
        self.opt_steps, self._micro = 0, 0
        self.graph_error: str | None = None
        graph = dc.cuda_graph and use_gpu and not dc.deepspeed and world_size == 1
        self._graph: torch.cuda.CUDAGraph | None = None
        self._stream = torch.cuda.Stream(device) if graph else None
        if graph and hasattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch"):
            # the warm-up steps run on the side stream on purpose (capture needs it): autograd's warning that the
            # gradient accumulators were made on another stream says nothing here
            torch.autograd.graph.set_warn_on_accumulate_grad_stream_mismatch(False)
        self._static_in: Any = None
        self._static_out: dict[str, torch.Tensor] = {}
        self._calls = 0
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dc.precision)
        if dc.deepspeed:
            import deepspeed

            if not use_gpu:
                skip_shm_comm_build()
            opt = make_optimizer(student, dc, use_gpu)
            # a callable: DeepSpeed builds the schedule on the optimizer it wraps (ZeRO drops empty param groups)
            sched = lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_at(s, dc) / dc.lr)  # noqa: E731
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=student, optimizer=opt, lr_scheduler=sched, config=ds_config(dc, world_size, use_gpu),
                dist_init_required=False)
            if dc.compile:  # the student module compiled in place (its state_dict keys stay as they are)
                self.engine.compile(compile_kwargs=compile_kwargs(dc))
            self.module = self.engine.module
            # DeepSpeed casts the module for bf16/fp16; inputs must match it
            self.input_dtype = half or torch.float32
            self.autocast = nullcontext
            return
        from torch.nn.parallel import DistributedDataParallel as DDP

        student.to(device)
        if dc.compile:
            student.compile(**compile_kwargs(dc))
        self.module = student
        self.optimizer = make_optimizer(student, dc, use_gpu, capturable=graph)
        multi = torch.distributed.is_initialized() and world_size > 1
        self.engine = DDP(student, device_ids=[device.index] if use_gpu else None) if multi else student
        self.input_dtype = torch.float32
        # a captured step must cast the weights on every replay, not take them from a cache filled at capture
        cache = not graph
        self.autocast = (lambda: torch.autocast(device.type, dtype=half, cache_enabled=cache)) if half \
            else nullcontext
        self.scaler = torch.amp.GradScaler(device.type, enabled=dc.precision == "fp16")

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    @property
    def graphed(self) -> bool:
        """Whether steps replay a captured CUDA graph."""
        return self._graph is not None

    def reset_graph(self) -> None:
        """Capture the step again after the next warm-up steps (the loss now reads other tensors: a new phase)."""
        self._graph, self._static_in, self._static_out, self._calls = None, None, {}, 0

    def step(self, loss_fn: Any, inputs: dict[str, Any],
             generators: tuple[torch.Generator, ...] = ()) -> dict[str, torch.Tensor]:
        """One micro-batch of `loss_fn(**inputs)`; returns its parts (see the class docstring). `generators`: device
        generators the loss draws from itself (step distillation's timesteps and noise); a captured step advances
        them on every replay, as an eager one does."""
        if self.dc.deepspeed:
            parts = loss_fn(**inputs)
            self.engine.backward(parts["loss"])
            self.engine.step()
            return parts
        if self._stream is None:
            parts = loss_fn(**inputs)
            self._backward_and_update(parts["loss"])
            return parts
        self._calls += 1
        if self._graph is None and self._calls <= self.GRAPH_WARMUP:
            # CUDA's handles and the optimizer's state are made on a side stream, as capture needs
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                parts = loss_fn(**inputs)
                self._backward_and_update(parts["loss"])
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
            return parts
        if self._graph is None:
            self._static_in = _tree_clone(inputs)
            self.optimizer.zero_grad(set_to_none=True)  # the graph's backward writes the gradients afresh
            graph = torch.cuda.CUDAGraph()
            for g in generators:
                graph.register_generator_state(g)
            set_lr(self.optimizer, lr_at(self.opt_steps, self.dc))
            try:
                with torch.cuda.graph(graph):  # records the step without running it: the replay below runs it
                    self._static_out = loss_fn(**self._static_in)
                    self._static_out["loss"].backward()
                    self._clip_and_step()
            except RuntimeError as e:  # an operation that cannot be captured: go on eagerly
                import logging

                logging.getLogger(__name__).warning("distill.cuda_graph: capture failed, eager steps from here: %s", e)
                self._stream, self.graph_error = None, str(e)
                self.optimizer.zero_grad(set_to_none=True)
                return self.step(loss_fn, inputs, generators)
            self._graph = graph
        _tree_copy(self._static_in, inputs)
        set_lr(self.optimizer, lr_at(self.opt_steps, self.dc))
        self._graph.replay()
        self.opt_steps += 1
        return self._static_out

    def _clip_and_step(self) -> None:
        if self.dc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.dc.grad_clip)
        self.optimizer.step()

    def _backward_and_update(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.dc.grad_accum).backward()
        self._micro += 1
        if self._micro % self.dc.grad_accum:
            return
        set_lr(self.optimizer, lr_at(self.opt_steps, self.dc))
        self.scaler.unscale_(self.optimizer)
        if self.dc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.dc.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.opt_steps += 1

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save(self, folder: Path, step: int, rank: int) -> None:
        """Every rank writes its own shard files; Ray Train merges the folders of all ranks."""
        if self.dc.deepspeed:
            self.engine.save_checkpoint(str(folder), tag=DS_TAG, client_state={"step": step})
        elif rank == 0:
            torch.save(self.module.state_dict(), folder / "model.pt")
            torch.save({"optimizer": self.optimizer.state_dict(), "opt_steps": self.opt_steps,
                        "scaler": self.scaler.state_dict(), "step": step}, folder / "train_state.pt")

    def load(self, folder: Path) -> int:
        """Restore from a checkpoint folder; returns its step."""
        if self.dc.deepspeed:
            path, client_state = self.engine.load_checkpoint(str(folder), tag=DS_TAG)
            if path is None:
                raise RuntimeError(f"DeepSpeed found no checkpoint with tag {DS_TAG!r} in {folder}")
            return int(client_state["step"])
        self.module.load_state_dict(torch.load(folder / "model.pt", map_location=self.device))
        st = torch.load(folder / "train_state.pt", map_location=self.device, weights_only=False)
        lr_tensors = [g["lr"] for g in self.optimizer.param_groups if torch.is_tensor(g["lr"])]
        self.optimizer.load_state_dict(st["optimizer"])
        for g, lr in zip(self.optimizer.param_groups, lr_tensors):  # a captured step reads the same LR tensor
            g["lr"] = lr
        self.scaler.load_state_dict(st["scaler"])
        self.opt_steps = int(st.get("opt_steps", st["step"]))  # checkpoints written before opt_steps was saved
        return int(st["step"])


class EMA:
    """Exponential moving average of the student's weights (fp32, on every rank; ZeRO stage <= 2)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()
                       if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        state = module.state_dict()
        keys = [k for k in self.shadow if k in state]
        torch._foreach_lerp_([self.shadow[k] for k in keys], [state[k].detach().float() for k in keys],
                             1.0 - self.decay)


# ---------------------------------------------------------------------------------------------------
# Batches: the embedding cache as U-Net inputs on the device
# ---------------------------------------------------------------------------------------------------


def prompt_conditioning(teacher: Any, prompts: list[str], resolution: int) -> dict[str, Any]:
    """U-Net conditioning for text prompts (SDXL: pooled embedding and square time ids)."""
    emb = encode_prompts(teacher, prompts)
    if teacher.family == "sdxl":
        emb["time_ids"] = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * len(prompts),
                                       dtype=torch.float32, device=emb["prompt_embeds"].device)
    return unet_conditioning(emb, teacher.family)


def cache_batch(batch: dict[str, Any], manifest: CacheManifest, family: str, device: torch.device,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """(scaled latents, U-Net conditioning) on `device` from a batch of cache rows (numpy arrays, or tensors
    already on the device). The generator draws "dist" latents; it lives on `device`, or on the CPU for CPU rows."""
    on = generator.device if generator is not None else device
    rows = {k: torch.as_tensor(np.require(v, requirements=["C", "W"]) if isinstance(v, np.ndarray) else v).to(on)
            for k, v in batch.items() if k in CACHE_COLUMNS}
    latents = sample_latents(rows, manifest, generator)
    emb = {k: rows[k].float() for k in ("prompt_embeds", "pooled", "time_ids") if k in rows}
    return latents.to(device), to_device(unet_conditioning(emb, family), device)


def drop_captions(cond: dict[str, Any], empty: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
    """`cond` with the rows where `keep` is False replaced by the empty prompt's conditioning (classifier-free
    guidance needs a model that has seen empty prompts). Time ids stay: they describe the image, not the text."""
    def pick(c: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        mask = keep.view(-1, *([1] * (c.ndim - 1)))
        return torch.where(mask, c, e.to(c.dtype).expand_as(c))

    out = dict(cond, encoder_hidden_states=pick(cond["encoder_hidden_states"], empty["encoder_hidden_states"]))
    if "added_cond_kwargs" in cond:
        added = dict(cond["added_cond_kwargs"])
        added["text_embeds"] = pick(added["text_embeds"], empty["added_cond_kwargs"]["text_embeds"])
        out["added_cond_kwargs"] = added
    return out


def shard_bytes(manifest: CacheManifest, rows: int) -> int:
    """The bytes `rows` cache rows take as float32 tensors (what preloading keeps on the device)."""
    per_row = math.prod(manifest.latent_shape) * (2 if manifest.latents == "dist" else 1)
    per_row += math.prod(manifest.embed_shape or [0])
    per_row += (manifest.pooled_dim or 0) + (6 if manifest.family == "sdxl" else 0)
    return 4 * per_row * rows


def preload_fits(manifest: CacheManifest, dc: DistillConfig, world: int) -> bool:
    """Whether a worker's share of the training rows fits in distill.preload_gb (then it is kept on the device)."""
    per_worker = math.ceil(int(manifest.rows.get("train", 0)) / max(1, world))
    return dc.preload_gb > 0 and shard_bytes(manifest, per_worker) <= dc.preload_gb * 2**30


def rank_rows(cache: str, manifest: CacheManifest, rank: int, world: int) -> dict[str, Any]:
    """This rank's contiguous share of the training rows, read with pyarrow (a preloaded shard: each epoch draws
    its own permutation of them, so contiguous shares train as a random split does)."""
    n = int(manifest.rows["train"])
    start, stop = rank * n // world, (rank + 1) * n // world
    return read_split_columns(cache, "train", list(CACHE_COLUMNS), limit=stop - start, start=start)


def latent_column(manifest: CacheManifest) -> str:
    return "latent" if manifest.latents == "sample" else "latent_mean"


def rows_of(column: Any) -> list[np.ndarray]:
    """A batch column as one array per row: Ray Data gives an (N, ...) array when the batch's rows share a shape and
    an object array of per-row arrays when they do not (an aspect-bucketed cache)."""
    return [np.asarray(r, dtype=np.float32) for r in column]


def shape_batches(rows: dict[str, Any], key: str, batch_size: int) -> list[dict[str, np.ndarray]]:
    """Rows (columns of equal length) as batches of at most batch_size rows, each of one latent shape (`key`'s):
    a square cache gives its rows in order, an aspect-bucketed one its buckets' rows in order, bucket by bucket."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows[key]):
        groups.setdefault(np.shape(r), []).append(i)
    out = []
    for idx in groups.values():
        for start in range(0, len(idx), batch_size):
            part = idx[start : start + batch_size]
            out.append({k: np.stack([np.asarray(v[i], dtype=np.float32) for i in part]) for k, v in rows.items()})
    return out


class TrainBatches:
    """(epoch, scaled latents, U-Net conditioning) for every micro-batch of a worker's shard, forever; each epoch
    visits the shard again in a new order. Iterate with next().

    Streaming from a Ray Data shard (iter_batches with a local shuffle buffer), or from `rows`, the worker's rows
    already read (worker_batches does when they fit in distill.preload_gb): those are kept in device memory and every
    batch is drawn there (a permutation per epoch), which keeps small models from waiting on the data loader. A
    caption_dropout share of each batch gets the empty prompt.

    An aspect-bucketed cache (data.aspect_buckets: rows of several latent shapes, the SDXL time ids of each row's
    bucket) gives batches of one bucket each, in the data's bucket mix: preloaded, each epoch is every bucket's
    full batches in one shuffled order; streamed, rows collect per bucket and a bucket's batch leaves when full."""

    def __init__(self, shard: Any, manifest: CacheManifest, family: str, dc: DistillConfig, rank: int,
                 device: torch.device, empty: dict[str, Any] | None, seed: int, batch_size: int | None = None,
                 rows: dict[str, Any] | None = None):
        self.manifest, self.family, self.dc, self.rank, self.device = manifest, family, dc, rank, device
        self.batch_size = batch_size or dc.batch_size
        self.empty = to_device(empty, device) if empty is not None else None
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.epoch = 0
        self.preloaded = rows is not None
        self.shard = shard
        self.bucketed = bool(manifest.buckets)
        self.key = latent_column(manifest)
        if self.preloaded and self.bucketed:
            parts = {k: rows_of(v) for k, v in rows.items() if k in CACHE_COLUMNS}
            if not parts.get(self.key):
                raise RuntimeError(self._too_few())
            self.buckets = [{k: torch.from_numpy(v).to(device) for k, v in b.items()}
                            for b in shape_batches(parts, self.key, len(parts[self.key]))]
            self._plan, self._at = self._bucket_plan(), 0
        elif self.preloaded:
            self.rows = {k: torch.as_tensor(np.asarray(v, dtype=np.float32)).to(device) for k, v in rows.items()
                         if k in CACHE_COLUMNS}
            self.n = len(next(iter(self.rows.values())))
            if self.n < self.batch_size:
                raise RuntimeError(self._too_few())
            self._order, self._at = self._permutation(), 0
        else:
            self._stream = self._streamed_buckets() if self.bucketed else self._streamed()

    def _too_few(self) -> str:
        return (f"rank {self.rank}: the training shard has fewer than batch_size={self.batch_size} rows; lower "
                "distill.batch_size or distill.num_workers, or prepare more data")

    def _bucket_plan(self) -> list[tuple[int, torch.Tensor]]:
        """One epoch: (bucket, row indices) of every full batch of every bucket, in one shuffled order."""
        plan = []
        for b, rows in enumerate(self.buckets):
            n = len(rows[self.key])
            perm = torch.randperm(n, generator=self.gen, device=self.device)
            plan += [(b, perm[i : i + self.batch_size]) for i in range(0, n - self.batch_size + 1, self.batch_size)]
        if not plan:
            raise RuntimeError(self._too_few() + " (in any one aspect-ratio bucket)")
        order = torch.randperm(len(plan), generator=self.gen, device=self.device).tolist()
        return [plan[i] for i in order]

    def _streamed_buckets(self):
        while True:
            n, pending = 0, {}
            for batch in self.shard.iter_batches(batch_size=self.batch_size, batch_format="numpy",
                                                 local_shuffle_buffer_size=4 * self.batch_size,
                                                 local_shuffle_seed=self.dc.seed + 1000 * self.epoch + self.rank):
                cols = {k: rows_of(v) for k, v in batch.items() if k in CACHE_COLUMNS}
                for i, latent in enumerate(cols[self.key]):
                    rows = pending.setdefault(latent.shape, {k: [] for k in cols})
                    for k, v in cols.items():
                        rows[k].append(v[i])
                    if len(rows[self.key]) == self.batch_size:
                        n += 1
                        yield {k: np.stack(v) for k, v in pending.pop(latent.shape).items()}
            if n == 0:
                raise RuntimeError(self._too_few() + " (in any one aspect-ratio bucket)")
            self.epoch += 1  # rows left in a bucket's unfinished batch are dropped, as drop_last does

    def _permutation(self) -> torch.Tensor:
        return torch.randperm(self.n, generator=self.gen, device=self.device)

    def _streamed(self):
        while True:
            n = 0
            for batch in self.shard.iter_batches(batch_size=self.batch_size, drop_last=True, batch_format="numpy",
                                                 local_shuffle_buffer_size=4 * self.batch_size,
                                                 local_shuffle_seed=self.dc.seed + 1000 * self.epoch + self.rank):
                n += 1
                yield batch
            if n == 0:
                raise RuntimeError(self._too_few())
            self.epoch += 1

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> tuple[int, torch.Tensor, dict[str, Any]]:
        if self.preloaded and self.bucketed:
            if self._at == len(self._plan):
                self.epoch += 1
                self._plan, self._at = self._bucket_plan(), 0
            b, idx = self._plan[self._at]
            self._at += 1
            batch = {k: v[idx] for k, v in self.buckets[b].items()}
        elif self.preloaded:
            if self._at + self.batch_size > self.n:
                self.epoch += 1
                self._order, self._at = self._permutation(), 0
            idx = self._order[self._at : self._at + self.batch_size]
            self._at += self.batch_size
            batch = {k: v[idx] for k, v in self.rows.items()}
        else:
            batch = next(self._stream)
        latents, cond = cache_batch(batch, self.manifest, self.family, self.device, self.gen)
        if self.empty is not None and self.dc.caption_dropout > 0:
            keep = torch.rand(latents.shape[0], generator=self.gen, device=self.device) >= self.dc.caption_dropout
            cond = drop_captions(cond, self.empty, keep)
        return self.epoch, latents, cond


# ---------------------------------------------------------------------------------------------------
# Ray: the worker's set-up and the driver's configs (the Ray lines of every training stage)
# ---------------------------------------------------------------------------------------------------


def worker_batches(manifest: CacheManifest, family: str, dc: DistillConfig, rank: int, world: int,
                   device: torch.device, empty: dict[str, Any] | None, seed: int) -> TrainBatches:
    """A Train worker's TrainBatches: its rows read directly when they fit in distill.preload_gb (the driver then
    gave the trainer no dataset: training_datasets), else its shard of the Ray dataset."""
    import ray.train

    if preload_fits(manifest, dc, world):
        return TrainBatches(None, manifest, family, dc, rank, device, empty, seed,
                            rows=rank_rows(dc.cache, manifest, rank, world))
    return TrainBatches(ray.train.get_dataset_shard("train"), manifest, family, dc, rank, device, empty, seed)


def worker_setup(dc: DistillConfig) -> tuple[int, int, torch.device]:
    """A Train worker's rank, world size and device, with its accelerator settings and seed."""
    import ray.train

    if not dc.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported in this process
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cuda", ctx.get_local_rank()) if dc.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = dc.cudnn_benchmark
    prefer_attention_backend(dc.attention_backend)
    torch.manual_seed(dc.seed + rank)
    worker_logging()
    return rank, world, device


def worker_logging() -> None:
    """This project's log lines (INFO and up) on the worker's stdout, which Ray shows on the driver."""
    logger = logging.getLogger("pipelines")
    if not any(getattr(h, "_distillery", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._distillery = True
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def worker_env(use_gpu: bool) -> dict[str, str]:
    """Environment of the training workers: DeepSpeed's CPU accelerator off-GPU, and the non-secret variables
    workers need to reach the same storage and servers as the driver. Credentials never travel with a job (Ray
    shows and logs runtime environments): workers read them from their own node, as the driver does."""
    env = {"DS_ACCELERATOR": "cpu"} if not use_gpu else {}
    for k in ("RAY_DATA_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):  # no loading bars in worker logs
        env[k] = os.environ.get(k, "1")
    for k in WORKER_ENV:
        if os.environ.get(k):
            env[k] = os.environ[k]
    return env


def run_storage(uri: str) -> dict[str, Any]:
    """RunConfig keyword arguments that put a Train run's checkpoints at `uri` (local or s3://)."""
    fs, path = filesystem(uri)
    return {"storage_path": path, "storage_filesystem": fs} if is_remote(uri) else {"storage_path": path}


def trainer_configs(cfg: Config, name: str, callbacks: list | None = None) -> dict[str, Any]:
    """Scaling, backend and run configs of a training job on cfg.distill (distill and steps share them)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    dc = cfg.distill
    if dc.use_gpu:  # checked here, before Ray Train queues workers that could wait forever
        import ray

        field = "distill.resources_per_worker.GPU" if "GPU" in dc.resources_per_worker else "distill.use_gpu"
        require_gpus(ray, field, dc.resources_per_worker.get("GPU", 1.0), "distill.use_gpu: false")
    return {
        "scaling_config": ScalingConfig(num_workers=dc.num_workers, use_gpu=dc.use_gpu,
                                        resources_per_worker=dc.resources_per_worker or None),
        "torch_config": TorchConfig(backend="nccl" if dc.use_gpu else "gloo"),
        "run_config": RunConfig(name=name, failure_config=FailureConfig(max_failures=dc.max_failures),
                                checkpoint_config=CheckpointConfig(num_to_keep=dc.keep_checkpoints),
                                worker_runtime_env={"env_vars": worker_env(dc.use_gpu)},
                                callbacks=callbacks or [], **run_storage(dc.storage_path)),
    }


FILE_LIST = "files-rank{rank}.json"  # written last into each rank's checkpoint folder: what a complete one holds


def seal_checkpoint(folder: Path, rank: int, world: int) -> None:
    """Record the files (and sizes) of this rank's part of a checkpoint folder, after everything else is written:
    a checkpoint is complete when every rank's list is there and every listed file has its size."""

    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / FILE_LIST.format(rank=rank)).write_text(json.dumps({"world": world, "files": files}))


def checkpoint_complete(fs: Any, path: str) -> bool:
    """Whether a checkpoint folder (on `fs`) holds every file that every rank's list names, at its size."""

    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    sizes = {i.path[len(path) + 1 :]: i.size for i in infos if i.type == pafs.FileType.File}
    lists = [k for k in sizes if k.startswith("files-rank") and k.endswith(".json")]
    if not lists:
        return False
    world = None
    for name in lists:
        try:  # a list caught mid-copy (a job killed while Ray copied the folder to storage) is no list
            with fs.open_input_stream(f"{path}/{name}") as f:
                listed = json.loads(f.read())
            world, files = int(listed["world"]), dict(listed["files"])
        except (ValueError, KeyError, TypeError, OSError):
            return False
        if any(sizes.get(k) != v for k, v in files.items()):
            return False
    return len(lists) == world


def resume_checkpoint(registered: Any, storage_path: str, name: str) -> Any:
    """The checkpoint a restarted worker resumes from: the newest complete one on storage, which can be newer than
    the one Ray Train registered (a run killed within the moment between writing a checkpoint and registering it);
    half-written ones are passed over. `registered`: ray.train.get_checkpoint()."""
    import re

    import pyarrow.fs as pafs
    import ray.train

    fs, root = filesystem(join(storage_path, name))
    found = []
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        m = re.fullmatch(r"checkpoint_(\d+)", info.base_name)
        if info.type == pafs.FileType.Directory and m:
            found.append((int(m.group(1)), info.path))
    known = -1
    if registered is not None:
        m = re.search(r"checkpoint_(\d+)$", registered.path.rstrip("/"))
        known = int(m.group(1)) if m else 10**12  # a checkpoint of another layout: trust Ray's
    for step, path in sorted(found, reverse=True):
        if step <= known:
            break
        if checkpoint_complete(fs, path):
            return ray.train.Checkpoint(path, filesystem=fs)
    return registered


def prune_orphan_checkpoints(result: Any, storage_path: str, name: str) -> list[str]:
    """Remove the checkpoint folders that Ray Train does not keep and that are older than its newest (written by a
    run killed before it registered them; resume_checkpoint may have started from one). Returns what was removed."""
    import re

    import pyarrow.fs as pafs

    kept = {c.path.rstrip("/").rsplit("/", 1)[-1] for c, _ in (getattr(result, "best_checkpoints", None) or [])}
    if result.checkpoint is not None:
        kept.add(result.checkpoint.path.rstrip("/").rsplit("/", 1)[-1])
    steps = [int(m.group(1)) for k in kept if (m := re.fullmatch(r"checkpoint_(\d+)", k))]
    if not steps:
        return []
    fs, root = filesystem(join(storage_path, name))
    removed = []
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        m = re.fullmatch(r"checkpoint_(\d+)", info.base_name)
        if info.type == pafs.FileType.Directory and m and info.base_name not in kept and int(m.group(1)) < max(steps):
            fs.delete_dir(info.path)
            removed.append(info.base_name)
    return removed


def training_datasets(cfg: Config, manifest: CacheManifest) -> dict[str, Any]:
    """The cache's training split as a Ray dataset of the columns training reads, or none where each worker's share
    fits in distill.preload_gb: then the workers read their rows themselves (worker_batches), which spares the
    Ray Data job's start-up. Validation rows are few: the stages read them with pipelines.cache.read_split_columns."""
    import ray.data

    if manifest.rows.get("train", 0) == 0:
        raise ValueError(f"{cfg.distill.cache}: the cache has no training rows")
    if preload_fits(manifest, cfg.distill, cfg.distill.num_workers):
        return {}
    fs, path = filesystem(join(cfg.distill.cache, "train"))
    ds = ray.data.read_parquet(path, filesystem=fs)
    return {"train": ds.select_columns([c for c in CACHE_COLUMNS if c in ds.schema().names])}


def cache_manifest(cfg: Config) -> CacheManifest:
    """The manifest of distill.cache, checked: complete, and made with teacher.uri."""
    dc = cfg.distill
    manifest = read_manifest(dc.cache)
    if manifest is None or not manifest.complete:
        raise FileNotFoundError(f"distill.cache {dc.cache}: no complete embedding cache there (no manifest.json "
                                "with complete: true); run `distillery prepare` first")
    if manifest.buckets and dc.cuda_graph:
        raise ValueError(f"distill.cuda_graph captures one batch shape, but the cache {dc.cache} has aspect-ratio "
                         f"buckets ({', '.join(manifest.buckets)}); set cuda_graph: false")
    if manifest.teacher != cfg.teacher.uri:
        raise ValueError(f"distill.cache {dc.cache} holds embeddings of teacher {manifest.teacher!r}, but "
                         f"teacher.uri is {cfg.teacher.uri!r}; prepare the data with this teacher")
    return manifest


def finish_export(folder: Path, cfg: Config, title: str) -> None:
    """The rest of an exported student folder, as cfg.export asks: the fp16 variant, then the model card (which
    shows how to load the variant when there is one). Reads how the student was made from its distillery.json."""
    from models.export import save_fp16_variant, write_model_card

    ex = cfg.export
    if ex.fp16_variant:
        save_fp16_variant(folder)
    if ex.model_card:
        meta = read_meta_file(folder)
        prompt = cfg.distill.sample_prompts[0] if cfg.distill.sample_prompts else "a photo of a cat"
        write_model_card(folder, meta, title=title, license=ex.license, tags=ex.tags, goal=cfg.evaluate.goal,
                         prompt=prompt)


def upload_folder(local: Path, uri: str) -> None:
    """Copy a finished local folder to `uri` (local path, replaced whole; or s3://). A copy killed or failing part
    way is never taken for a finished model, which the stages recognize by its distillery.json: a local folder is
    copied beside the destination and renamed into place; on S3 distillery.json is written last."""
    import uuid

    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    if not is_remote(uri):
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        for stale in [*dest.parent.glob(f".{dest.name}.partial-*"), *dest.parent.glob(f".{dest.name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # what a copy killed part way left beside the destination
        partial = dest.with_name(f".{dest.name}.partial-{uuid.uuid4().hex[:8]}")
        try:
            shutil.copytree(local, partial)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        if dest.exists():
            dest.rename(old)  # a kill between the two renames leaves no folder, never a partial one
        partial.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
        return
    fs.create_dir(path, recursive=True)
    files = sorted((f for f in Path(local).rglob("*") if f.is_file() or f.is_symlink()),
                   key=lambda f: f.name == META_FILE)  # distillery.json last
    for f in files:
        rel = f.relative_to(local).as_posix()
        pafs.copy_files(str(f), f"{path}/{rel}", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
