"""The one YAML config of a run: a pydantic model per stage, validated once where the file enters.

Every section has defaults that work on the embedded demo, and `extra="forbid"`, so a typo is an error
that names the field. Output URIs left empty are derived from `work_dir`, so each stage finds what the
stage before it wrote. The whole config (with defaults filled in) is what gets logged to MLflow.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.sampling import PNG_LEVEL


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def absolute_local(uri: str | None, must_exist: bool) -> str | None:
    """A relative local path as an absolute one (of this process's working directory); URIs with a scheme
    (s3://, file://, builtin:, models:/) unchanged, and with must_exist a relative name that is no local file or
    folder (a hub id) too."""
    if not uri or ":" in uri.split("/")[0] or os.path.isabs(uri) or (must_exist and not os.path.exists(uri)):
        return uri
    return os.path.abspath(uri)


def path_safe(name: str | None) -> str | None:
    """A name that becomes one folder under work_dir or storage_path: no separators, no '..', not empty."""
    if name is None:
        return name
    if not name.strip() or "/" in name or "\\" in name or name in (".", "..") or ".." in name.split("."):
        raise ValueError(f"{name!r} becomes a folder name: use letters, digits, '-', '_' or '.', no '/' or '..'")
    return name


class RayConfig(Section):
    address: str | None = None  # None: RAY_ADDRESS if set (ray job submit), else a local Ray
    num_cpus: int | None = Field(None, ge=1)  # only for a local Ray started by us
    num_gpus: int | None = Field(None, ge=0)
    # a local Ray's dashboard (it also serves the State API; without it, storage.state_api_quieter keeps Ray
    # Train's placement-group cleaner from warning once a second that it cannot reach that API)
    include_dashboard: bool = True
    runtime_env: dict[str, Any] = Field(default_factory=dict)


class MlflowConfig(Section):
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else ./mlruns under work_dir
    experiment: str = "distillery"


class TeacherConfig(Section):
    # hub id ("stable-diffusion-v1-5/stable-diffusion-v1-5"), a local diffusers folder, an s3:// URI,
    # or a builtin model ("builtin:tiny-sd1", "builtin:tiny-sdxl", "builtin:shapes-sd1").
    uri: str = "builtin:tiny-sd1"
    revision: str | None = None
    variant: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"


class DataConfig(Section):
    source: str | None = None  # raw images+captions: local path, s3://, any fsspec URI
    format: Literal["auto", "imagefolder", "parquet", "webdataset"] = "auto"
    image_column: str = "image"  # parquet: image bytes (or a struct with "bytes")
    caption_column: str = "caption"
    key_column: str | None = None  # parquet: a stable id; default is the content hash
    resolution: int = Field(64, ge=8)
    crop: Literal["center", "random"] = "center"
    min_side: int = Field(0, ge=0)  # drop images whose short side is below this (before resize)
    max_aspect_ratio: float = Field(4.0, ge=1.0)
    min_caption_chars: int = Field(1, ge=0)
    max_caption_chars: int = Field(2000, ge=1)
    score_column: str | None = None  # e.g. "aesthetic"
    min_score: float | None = None
    # drop exact duplicate images (by content hash), keeping one; with dedup false every copy is cached, even rows
    # that repeat image and caption exactly
    dedup: bool = True
    aspect_buckets: bool = False  # SDXL: bucket by aspect ratio instead of square crops
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int | None = None  # default: the top-level seed
    max_rows: int | None = Field(None, ge=1)
    output: str | None = None  # the embedding cache; default {work_dir}/cache
    # the latents the student trains on, as the teacher was trained: "dist" keeps the VAE posterior (mean, std) and
    # training draws from it (SD, SDXL); "mean" keeps the posterior mean (a teacher trained on means); "sample"
    # keeps one scaled draw per image; "auto": what the teacher's folder declares (distillery.json), else "dist"
    latents: Literal["auto", "dist", "mean", "sample"] = "auto"
    embed_batch_size: int = Field(16, ge=1)
    # embedding actors: None = three per GPU of the cluster at 0.33 GPU each (one actor per GPU idles the GPU while
    # its batch is handed to the writer: on an H200 0.65x of a plain loop for one, 0.87x for two, 0.95x for three,
    # bench/RESULTS.md), 1 on CPU
    embed_concurrency: int | None = Field(None, ge=1)
    embed_num_gpus: float | None = Field(None, ge=0)  # None: 0.33 if the cluster has GPUs, else 0
    rows_per_file: int = Field(1024, ge=1)
    # CPU side of the stage (none of these changes what is cached): rows per decode/resize/crop task call,
    # CPUs Ray reserves per decode task (0.5 packs two per core; 2 leaves room for PIL's own threads), and
    # read tasks (Ray Data's override_num_blocks; None lets Ray choose from the cluster and the input size)
    decode_batch_size: int = Field(64, ge=1)
    decode_num_cpus: float = Field(1.0, gt=0)
    read_parallelism: int | None = Field(None, ge=1)


class RemovalSpecConfig(Section):
    """Which parts of the teacher U-Net the student keeps (models/student.py: RemovalSpec)."""

    down: list[list[int]]  # per kept down stage (outermost first): teacher layer indices kept
    up: list[list[int]]  # per kept up stage (innermost first): teacher layer indices kept
    mid: Literal["full", "resnet", "none"] = "full"
    drop_inner: int = Field(0, ge=0)  # innermost stages removed
    down_depths: list[list[int]] | None = None  # transformer depth per kept attention, per down stage
    up_depths: list[list[int]] | None = None


# models/student.py's PRESETS, named here so `config validate` (no torch) refuses a typo
PresetName = Literal["identity", "bk-base", "bk-small", "bk-tiny", "ssd-1b", "vega"]


class StudentConfig(Section):
    preset: PresetName | None = "bk-small"
    spec: RemovalSpecConfig | None = None  # overrides preset when set
    # "teacher": the kept blocks start from the teacher's weights (BK-SDM); "random": the same architecture from
    # scratch (with distill.loss task-only, the no-KD baseline; with the identity preset, a teacher of your own)
    init: Literal["teacher", "random"] = "teacher"
    # continued (or multi-teacher) distillation, as SSD-1B: start from an existing student folder (local, s3://, hub
    # id) instead of building one; its distillery.json's spec maps it onto teacher.uri, which may be another teacher
    # of the same architecture (a fine-tune)
    start_from: str | None = None
    output: str | None = None  # default {work_dir}/student-init

    @model_validator(mode="after")
    def _one_of(self) -> StudentConfig:
        if self.preset is None and self.spec is None:
            raise ValueError("set student.preset or student.spec")
        if self.start_from is not None:
            if self.init != "teacher":
                raise ValueError("student.start_from starts from that folder's weights: leave student.init unset")
            if self.spec is not None:  # (student.preset is not read either; it has a default, so it may be set)
                raise ValueError("student.start_from takes the removal spec from that folder's distillery.json: "
                                 "leave student.spec unset")
        return self


class LossConfig(Section):
    """The KD loss (models/kd.py): a weight per term, and the settings later papers found to help."""

    task: float = Field(1.0, ge=0)  # MSE(student, noise/v target)
    out: float = Field(1.0, ge=0)  # MSE(student, teacher output)
    feat: float = Field(1.0, ge=0)  # sum of MSE over mapped features
    attn: float = Field(0.0, ge=0)  # cross-attention transfer (MSE of head-mean maps, or KL with attn_temperature)
    self_attn: float = Field(0.0, ge=0)  # self-attention outputs of every mapped transformer block (KOALA)
    # the features compared: BK-SDM's block outputs, every resnet and Transformer2DModel ("layer"), or every resnet
    # and every transformer block inside ("transformer", as SSD-1B)
    level: Literal["block", "layer", "transformer"] = "block"
    feat_norm: bool = False  # each feature term over the teacher feature's mean square (LAPTOP-Diff)
    min_snr_gamma: float | None = Field(None, gt=0)  # min-SNR-γ weights on the task and output terms (e.g. 5)
    # τ: attention transfer as τ²·KL(teacher ‖ student) of each head's softened cross-attention (KD temperature)
    attn_temperature: float | None = Field(None, gt=0)


def uses_cudagraphs(dc: Any) -> bool:
    """Whether distill's compiled forwards run as CUDA graphs (compile modes reduce-overhead and max-autotune)."""
    return dc.compile and dc.compile_mode in ("reduce-overhead", "max-autotune")


class DistillConfig(Section):
    """pipelines/distill.py: Ray Train workers, DeepSpeed ZeRO, KD loss, validation, checkpoints, export."""

    cache: str | None = None  # default data.output
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    zero_stage: int = Field(2, ge=0, le=3)
    deepspeed: bool = True  # False: plain torch DDP
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    offload_optimizer: bool = False
    offload_params: bool = False
    grad_clip: float = Field(1.0, ge=0)
    grad_accum: int = Field(1, ge=1)
    batch_size: int = Field(8, ge=1)  # per worker, per micro-step
    max_steps: int = Field(100, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # linear/cosine decay ends at lr * min_lr_ratio
    # the share of training samples whose caption is replaced by the empty prompt: the student is sampled with
    # classifier-free guidance, so it must learn the unconditional prediction too (as SD's own training does)
    caption_dropout: float = Field(0.1, ge=0, lt=1)
    # keep a worker's whole training shard in device memory when it takes at most this many GiB (as float32), and
    # draw every batch there: small caches and small models stop waiting on the data loader; 0 always streams
    preload_gb: float = Field(2.0, ge=0)
    # capture each training step (forwards, backward, clipping, AdamW) as one CUDA graph and replay it: for small
    # models, which are bound by launching kernels. One CUDA worker, deepspeed false, grad_accum 1, bf16 or fp32
    cuda_graph: bool = False
    ema_decay: float | None = Field(None, gt=0, lt=1)
    gradient_checkpointing: bool = False
    channels_last: bool = False
    compile: bool = False  # torch.compile the student's and the teacher's forwards (first steps compile, ~minutes)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    # cuDNN times its algorithms for each convolution shape once and keeps the fastest (a fixed resolution and
    # micro-batch: a few seconds at the start; aspect-ratio buckets: once per bucket)
    cudnn_benchmark: bool = False
    # the fused attention kernel tried first; the others stay as fallbacks for shapes it cannot take. "auto" keeps
    # PyTorch's own order (torch 2.11 on an H200: cudnn, flash, efficient, math); bench/sdpa_backends.py times them
    attention_backend: Literal["auto", "flash", "efficient", "cudnn"] = "auto"
    # float8 matmuls (models/fp8.py) for the transformer blocks' linear layers of the student ("student") or of
    # both U-Nets ("both"); needs FP8 tensor cores (compute capability 8.9+). Changes the training numerics (e4m3
    # activations and weights, e5m2 gradients, scaled per tensor); convolutions stay bf16
    fp8_linear: Literal["off", "student", "both"] = "off"
    loss: LossConfig = Field(default_factory=LossConfig)
    val_every: int = Field(50, ge=1)
    val_batches: int = Field(2, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)
    storage_path: str | None = None  # checkpoints; default {work_dir}/train
    output: str | None = None  # the distilled student folder; default {work_dir}/student
    sample_prompts: list[str] = Field(default_factory=lambda: ["a red circle on a blue background"])
    sample_seeds: list[int] = Field(default_factory=lambda: [0])
    sample_steps: int = Field(10, ge=1)
    guidance_scale: float = Field(7.5, ge=0)  # sample grids (classifier-free guidance)
    log_every: int = Field(10, ge=1)  # progress lines on the driver and train metrics to MLflow
    run_name: str | None = None  # the Ray Train run under storage_path; default "{name}-distill"
    seed: int | None = None  # default: the top-level seed

    _run_name = field_validator("run_name")(classmethod(lambda cls, v: path_safe(v)))

    @model_validator(mode="after")
    def _consistent(self) -> DistillConfig:
        if self.deepspeed and self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params needs zero_stage 3 (got zero_stage {self.zero_stage})")
        if self.deepspeed and self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3 (got zero_stage 0)")
        if not self.deepspeed and (self.offload_params or self.offload_optimizer):
            raise ValueError("offload_optimizer/offload_params need deepspeed: true")
        if self.ema_decay is not None and self.deepspeed and self.zero_stage == 3:
            raise ValueError("ema_decay is not supported with zero_stage 3 (the student's weights are sharded)")
        if self.compile_mode != "default" and not self.compile:
            raise ValueError(f"compile_mode {self.compile_mode!r} needs compile: true")
        if self.cuda_graph:
            why = [w for w, bad in (("deepspeed: false", self.deepspeed), ("num_workers: 1", self.num_workers != 1),
                                    ("grad_accum: 1", self.grad_accum != 1), ("precision bf16 or fp32",
                                                                              self.precision == "fp16"),
                                    ("use_gpu: true", not self.use_gpu),
                                    ("no CUDA-graph compile_mode", uses_cudagraphs(self)))
                   if bad]
            if why:
                raise ValueError(f"cuda_graph needs {', '.join(why)}")
        if len(self.sample_seeds) not in (1, len(self.sample_prompts)):
            raise ValueError(f"sample_seeds has {len(self.sample_seeds)} seeds for {len(self.sample_prompts)} "
                             "sample_prompts: give one seed, or one per prompt")
        return self


class StepsConfig(Section):
    """Step distillation (models/steps.py), run after (or instead of) block-removal KD.

    guided: stage 1 (w input, matches the teacher's CFG output) then `rounds` progressive halvings from
    teacher_steps; progressive: `rounds` halvings of the student's own steps; consistency: LCM with a
    skipping-step DDIM solver on the teacher's guided ODE; adversarial: LADD (a discriminator of heads on the frozen
    teacher's features) with ADD's distillation term; dmd: DMD2 (the teacher's CFG score against a fake score trained
    on the student's samples). adversarial and dmd train the student at its lcm_steps sampling steps by backward
    simulation, step their critic critic_updates times per student step, and export an LCMScheduler student
    sampled without CFG. Each phase runs steps_per_round (student) optimizer steps.
    Workers, precision, ZeRO stage, checkpoints and the data cache are the distill section's."""

    objective: Literal["guided", "progressive", "consistency", "adversarial", "dmd"] = "consistency"
    student: str | None = None  # the model to step-distill (a pipeline folder/URI); default distill.output
    guidance_range: tuple[float, float] = (1.0, 8.0)  # w (diffusers guidance_scale) sampled in training
    # the w recorded for sampling the exported student; adversarial, dmd: the teacher's CFG weight (the real score
    # and the distillation target), the student is sampled at 1
    guidance_scale: float = Field(7.5, ge=1.0)
    teacher_steps: int = Field(32, ge=2)  # DDIM steps of the first progressive teacher
    rounds: int = Field(2, ge=1)  # progressive: each round halves the steps
    steps_per_round: int = Field(50, ge=1)
    lcm_skip: int = Field(20, ge=1)  # consistency: skipping-step of the DDIM solver (timesteps)
    # consistency, adversarial, dmd: the sampling steps recorded for the exported student (adversarial and dmd
    # train at these steps; trained at 1 the student drifts at the others, trained at 2 it kept 1 and 4 steps)
    lcm_steps: int = Field(4, ge=1)
    # adversarial, dmd: the critic (discriminator heads; fake score U-Net) and its updates per student step
    # (None: dmd 5, DMD2's two time-scale rule; adversarial 1)
    critic_lr: float | None = Field(None, gt=0)  # None: lr
    critic_updates: int | None = Field(None, ge=1)
    gan_loss: Literal["hinge", "non_saturating"] = "hinge"
    gan_weight: float | None = Field(None, ge=0)  # None: adversarial 1, dmd 0 (DMD2's optional GAN term off)
    distill_weight: float = Field(2.5, ge=0)  # adversarial: ADD's distillation term (0: adversarial loss alone)
    huber_c: float | None = Field(0.001, gt=0)  # consistency: pseudo-Huber constant; None: MSE
    ema_decay: float = Field(0.95, gt=0, lt=1)  # consistency: the target network
    # train a LoRA adapter (PEFT) instead of the whole U-Net: merged into the exported U-Net and also written
    # alone to {output}/lora, where diffusers' pipe.load_lora_weights() reads it
    lora_rank: int | None = Field(None, ge=1)
    # guided, consistency: the student takes w as an input (a new w-embedding; sampled at any guidance without
    # CFG). false: it learns the teacher's guidance over guidance_range in its weights and samples at guidance 1,
    # as LCM-LoRA. None: true, false with lora_rank, so that the adapter is the student's whole change and loads
    # onto another U-Net of the architecture (an adapter cannot add an embedding)
    w_embedding: bool | None = None
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(8, ge=1)
    # empty prompts in training: 0 by default, since a guided or consistency student takes w as an input and is
    # sampled without CFG; set it for progressive students sampled with CFG
    caption_dropout: float = Field(0.0, ge=0, lt=1)
    run_name: str | None = None  # the Ray Train run under distill.storage_path; default "{name}-steps"
    output: str | None = None  # default {work_dir}/student-steps

    _run_name = field_validator("run_name")(classmethod(lambda cls, v: path_safe(v)))

    @property
    def critic_steps(self) -> int:
        """Critic updates per student step (adversarial, dmd; 0 for the others)."""
        if self.objective not in ("adversarial", "dmd"):
            return 0
        return self.critic_updates or (5 if self.objective == "dmd" else 1)

    @property
    def adds_w_embedding(self) -> bool:
        """Whether the student gets a w-embedding (guided, consistency; see w_embedding)."""
        wanted = self.lora_rank is None if self.w_embedding is None else self.w_embedding
        return self.objective in ("guided", "consistency") and wanted

    @model_validator(mode="after")
    def _check(self) -> StepsConfig:
        lo, hi = self.guidance_range
        if not 1.0 <= lo <= hi:
            raise ValueError(f"guidance_range {list(self.guidance_range)}: need 1 <= low <= high")
        if self.adds_w_embedding and not lo <= self.guidance_scale <= hi:
            raise ValueError(f"guidance_scale {self.guidance_scale} is outside guidance_range "
                             f"{list(self.guidance_range)}, where the student was trained")
        if self.objective == "adversarial" and self.gan_weight == 0 and self.distill_weight == 0:
            raise ValueError("objective adversarial with gan_weight 0 and distill_weight 0 has nothing to train")
        if self.objective in ("guided", "progressive") and self.teacher_steps % 2**self.rounds:
            raise ValueError(f"teacher_steps {self.teacher_steps} cannot be halved rounds={self.rounds} times")
        return self


# the evaluate stage's image-quality scores a tune trial can be ranked on (higher is better); the others are
# validation losses (lower is better)
QUALITY_METRICS = ("caption_accuracy", "clip_score_student")


class ArmConfig(Section):
    """One arm of an ablation (tune.arms): how the student starts and which loss terms train it. Each arm runs
    once per preset and seed, at the same budget (tune.steps_per_trial)."""

    name: str = Field(min_length=1)
    init: Literal["teacher", "random"] = "teacher"  # student.init
    presets: list[PresetName] | None = None  # default tune.presets
    loss: dict[str, Any] = Field(default_factory=dict)  # the distill.loss fields this arm sets (others: distill.loss)

    @field_validator("loss")
    @classmethod
    def _loss_fields(cls, v: dict[str, Any]) -> dict[str, Any]:
        LossConfig.model_validate(v)  # a typo or a bad weight fails here, naming the field
        return v


class TuneConfig(Section):
    """tuning/search.py: Ray Tune over the student's removal spec, the KD loss weights and the learning rate,
    or over named arms (an ablation).

    Each trial is a short distillation (the distill stage's trainer, one worker with cpus/gpus_per_trial)
    that reports validation loss, teacher fidelity, latency per denoising step and parameter count. A
    (low, high) range with low == high is fixed, not searched. objective "scalar": minimize `metric`, with a
    penalty for exceeding latency_budget_ms / param_budget; "multi": Optuna over (metric, latency). A quality
    metric (caption_accuracy, clip_score_student) is the evaluate stage's score of the trial's exported student
    on eval_prompts, measured once the trial has trained; trials then run to their end (scheduler fifo).

    With `arms`, nothing is sampled: every arm runs for each of its presets and each of `seeds` (a grid), and
    the results add a table per arm (mean and spread over seeds) and a plot."""

    num_samples: int = Field(4, ge=1)  # trials
    max_concurrent: int = Field(1, ge=1)
    steps_per_trial: int = Field(20, ge=1)
    val_every: int | None = Field(None, ge=1)  # validation = a Tune report (ASHA rung); default steps/4
    presets: list[PresetName] = Field(default_factory=lambda: ["bk-base", "bk-small", "bk-tiny"])
    # sample the spec per stage instead of a preset: resnet/attention pairs kept, transformer depth, mid block
    search_spec: bool = False
    mid: list[Literal["full", "resnet", "none"]] = Field(default_factory=lambda: ["full", "resnet", "none"])
    lambda_task: tuple[float, float] = (1.0, 1.0)
    lambda_out: tuple[float, float] = (0.5, 2.0)
    lambda_feat: tuple[float, float] = (0.0, 2.0)
    lambda_attn: tuple[float, float] = (0.0, 0.0)  # distill.loss.attn; (0, 0): off, not searched
    lambda_self_attn: tuple[float, float] = (0.0, 0.0)  # distill.loss.self_attn
    lr: tuple[float, float] = (5e-5, 5e-4)  # sampled log-uniformly
    objective: Literal["scalar", "multi"] = "scalar"
    metric: Literal["val_loss", "val_out", "val_task", "caption_accuracy", "clip_score_student"] = "val_loss"
    arms: list[ArmConfig] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=lambda: [0])  # distill.seed of each arm's runs (with arms)
    # the prompts a quality metric is measured on; default evaluate.prompts (steps, guidance, seed, batch: evaluate's)
    eval_prompts: str | None = None
    eval_num_prompts: int | None = Field(None, ge=2)  # default evaluate.num_prompts
    latency_budget_ms: float | None = Field(None, gt=0)  # per denoising step, on the trial's device
    param_budget: int | None = Field(None, ge=1)  # student U-Net parameters
    # default: asha (stops weak trials at validation reports) for a loss metric; fifo with a quality metric or arms
    scheduler: Literal["asha", "fifo"] | None = None
    reduction_factor: int = Field(2, ge=2)  # ASHA
    cpus_per_trial: float = Field(1, gt=0)  # the trial's training worker (and its latency measurement)
    gpus_per_trial: float = Field(0, ge=0)
    latency_repeats: int = Field(5, ge=1)
    storage_path: str | None = None  # Tune's experiments, trial checkpoints, results; default {work_dir}/tune
    seed: int | None = None  # default: the top-level seed

    @model_validator(mode="after")
    def _check(self) -> TuneConfig:
        for name in ("lambda_task", "lambda_out", "lambda_feat", "lambda_attn", "lambda_self_attn", "lr"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} {[lo, hi]}: need 0 <= low <= high")
        if self.lr[0] <= 0:
            raise ValueError(f"lr {list(self.lr)}: the learning rate must be > 0")
        if not self.search_spec and not self.presets:
            raise ValueError("presets is empty: give at least one preset, or set search_spec: true")
        if self.search_spec and not self.mid:
            raise ValueError("mid is empty: give at least one of full, resnet, none")
        if self.val_every is not None and self.val_every > self.steps_per_trial:
            raise ValueError(f"val_every ({self.val_every}) > steps_per_trial ({self.steps_per_trial})")
        names = [a.name for a in self.arms]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"arms: names must not repeat ({', '.join(dup)} more than once)")
        if self.arms and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ValueError(f"seeds {self.seeds}: give distinct seeds, at least one")
        if self.scheduler == "asha" and (self.arms or self.metric in QUALITY_METRICS):
            why = "arms run to their end" if self.arms else f"metric {self.metric} is measured once a trial ends"
            raise ValueError(f"scheduler asha stops trials at validation reports, but {why}: use fifo")
        return self

    def scheduler_name(self) -> str:
        return self.scheduler or ("fifo" if self.arms or self.metric in QUALITY_METRICS else "asha")


class EvaluateConfig(Section):
    """pipelines/evaluate.py: teacher vs student on the same prompts and seeds; metrics, plots, report."""

    student: str | None = None  # default distill.output
    prompts: str | None = None  # a text file, one prompt per line; default: validation captions
    num_prompts: int = Field(16, ge=1)
    images_per_prompt: int = Field(1, ge=1)
    steps: int = Field(20, ge=1)  # the teacher's steps (always with classifier-free guidance at guidance_scale)
    guidance_scale: float = Field(7.5, ge=0)
    # the student's own steps and guidance weight; default: those its distillery.json records (a step-distilled
    # student, from the steps stage), else steps / guidance_scale. A student with its own scheduler/ samples
    # with it; one that takes w as an input (guided, consistency) runs one U-Net forward per step, no CFG.
    student_steps: int | None = Field(None, ge=1)
    student_guidance_scale: float | None = Field(None, ge=0)
    steps_sweep: list[int] = Field(default_factory=list)  # also the student at each of these steps, e.g. [1, 2, 4, 8]
    student_decoder: str | None = None  # the student decodes with this (as serve.decoder); the teacher with its VAE
    resolution: int | None = Field(None, ge=8)  # default: the cache's resolution, else the teacher's native
    reference: str | None = None  # a folder of reference images; default: validation images
    num_reference: int | None = Field(None, ge=2)  # at most this many reference images; default all
    # torch-fidelity's Inception: None downloads its weights (network); a local path / URI of the
    # inception-v3-compat weights; or "builtin:tiny" (offline, fixed random features: tests, demo)
    feature_extractor: str | None = None
    clip_model: str | None = None  # local path / hub id / s3:// of a CLIPModel; "builtin:tiny-clip" offline
    latency_repeats: int = Field(5, ge=1)
    embedding_samples: int = Field(64, ge=2)
    batch_size: int = Field(4, ge=1)
    output: str | None = None  # default {work_dir}/eval
    seed: int | None = None  # default: the top-level seed
    # the share of the teacher's quality the student must keep (caption accuracy where the teacher has an analyzer,
    # else CLIP score, else FID): the report's and the model card's verdict
    goal: float = Field(0.95, gt=0)
    # where the stage runs: "ray", a Ray task with num_cpus / num_gpus (a cluster's head has no GPU, often no CPUs
    # to spare); "driver", in the process that runs the stage; "auto": a Ray task when the job runs on a cluster
    # (ray.address or RAY_ADDRESS set, as under `ray job submit`), else the driver
    run_on: Literal["auto", "ray", "driver"] = "auto"
    num_gpus: float | None = Field(None, ge=0)  # default: 1 when the cluster has a GPU, else 0
    num_cpus: float = Field(1, gt=0)

    @field_validator("steps_sweep")
    @classmethod
    def _sweep(cls, v: list[int]) -> list[int]:
        if any(k < 1 for k in v):
            raise ValueError("every step count must be >= 1")
        dup = sorted({k for k in v if v.count(k) > 1})
        if dup:
            raise ValueError(f"step counts must not repeat ({', '.join(map(str, dup))} more than once)")
        return v


class ExportConfig(Section):
    """What every exported student folder (distill, steps, `student build`) holds besides its weights."""

    model_card: bool = True  # README.md: Hub metadata, how it was made, the evaluate stage's scores once scored
    fp16_variant: bool = False  # also *.fp16.safetensors of every component (from_pretrained(variant="fp16"))
    license: str | None = None  # the card's license (a Hub license id); the teacher's terms still apply
    tags: list[str] = Field(default_factory=list)  # more Hub tags for the card


class RegistryConfig(Section):
    model_name: str = "distillery-student"
    metric: str = "fid_student_vs_teacher"
    mode: Literal["min", "max"] = "min"
    champion_alias: str = "champion"
    challenger_alias: str = "challenger"


class ServeConfig(Section):
    model: str | None = None  # models:/NAME@ALIAS or a diffusers folder/URI; default registry champion
    # a lighter decoder in place of the model's VAE: an AutoencoderTiny (TAESD: madebyollin/taesd for SD 1.x/2.x,
    # madebyollin/taesdxl for SDXL) or AutoencoderKL folder / hub id / s3:// (few-step students spend much of an
    # image in the VAE decoder); check its quality with evaluate.student_decoder
    decoder: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=0)  # window the autoscaler averages ongoing requests over
    num_gpus: float = Field(0, ge=0)
    num_cpus: float = Field(1, gt=0)
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.05, ge=0)
    # "replica": serving/batching.py, which forms a batch when the previous one has returned (fuller batches:
    # 1.2-1.4x the images/s of "serve" at 32 clients on an H200, bench/RESULTS.md); "serve": Ray's @serve.batch,
    # which forms the next batches while one runs (each closes batch_wait_timeout_s after its first request, so
    # load arriving during a batch can split into small ones)
    batcher: Literal["serve", "replica"] = "replica"
    max_ongoing_requests: int | None = Field(None, ge=1)  # per replica; default 2 * max_batch_size
    # The API key is read by each replica from its own environment or filesystem (a Kubernetes secret as
    # an env var or a mounted file), so it never travels through Ray or the Serve config, and is never logged.
    api_key_env: str | None = None  # name of an environment variable holding the key
    api_key_file: str | None = None
    max_body_bytes: int = Field(65536, ge=1024)
    max_prompt_chars: int = Field(1000, ge=1)
    max_n: int = Field(4, ge=1)
    # "WxH" sizes a request may ask for, the first the default; None: the sizes the student was trained at (its
    # distillery.json: the cache's aspect-ratio buckets or its square size), else the model's native square size
    sizes: list[str] | None = None
    default_steps: int = Field(20, ge=1)
    max_steps: int = Field(100, ge=1)
    default_guidance_scale: float = Field(7.5, ge=0)
    request_timeout_s: float = Field(120.0, gt=0)
    # zlib level of the PNGs the API returns (lossless at any level; models/sampling.py PNG_LEVEL says why 1); the
    # encoding runs after the image leaves the batch, beside the next batch
    png_compress_level: int = Field(PNG_LEVEL, ge=0, le=9)
    # torch.compile the U-Net at replica start (models.sampling.CompiledUNet), one graph per warmed-up shape: each
    # of `sizes` x `compile_batches` images at default_guidance_scale; a smaller batch is padded up to the next of
    # compile_batches, any other shape (a larger batch, another guidance's CFG batch) runs eager. reduce-overhead
    # replays CUDA graphs (launch-bound few-step students). Compiling takes minutes per shape; off by default
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "reduce-overhead"
    compile_batches: list[int] = Field(default_factory=lambda: [1])
    # batcher "replica": hold a batch's answers (their encoding, their HTTP answers, the clients' next requests)
    # until the next batch's first U-Net step is launched, at most this long, so that CPU work overlaps the next
    # batch's GPU-bound denoising instead of its CPU-bound start (text encoder, latents); 0: answer at once
    hold_answers_s: float = Field(0.0, ge=0, le=10)
    # run the pipeline in a child process of the replica, with a GIL of its own, instead of on a thread of the
    # replica's process, where answering requests holds the GIL the pipeline thread needs after every torch op
    # (serving/replica_pipeline.py; bench/RESULTS.md)
    pipeline_process: bool = True
    # how often Serve calls a replica's check_health (which fails once its pipeline process has exited); Serve
    # replaces a replica after 3 failed checks in a row
    health_check_period_s: float = Field(10.0, gt=0)

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        for s in v:
            w, _, h = s.partition("x")
            if not (w.isdigit() and h.isdigit()):
                raise ValueError(f"size {s!r} is not WIDTHxHEIGHT")
            if int(w) % 8 or int(h) % 8 or not int(w) or not int(h):
                raise ValueError(f"size {s!r}: width and height must be positive multiples of 8")
        if not v:
            raise ValueError("give at least one size")
        return v

    @field_validator("compile_batches")
    @classmethod
    def _compile_batches(cls, v: list[int]) -> list[int]:
        if not v or min(v) < 1:
            raise ValueError("give one or more batch sizes >= 1")
        return sorted(set(v))

    @model_validator(mode="after")
    def _replicas(self) -> ServeConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        if self.default_steps > self.max_steps:
            raise ValueError(f"default_steps ({self.default_steps}) > max_steps ({self.max_steps})")
        if self.hold_answers_s and self.batcher != "replica":
            raise ValueError(f"hold_answers_s needs batcher 'replica' (got {self.batcher!r})")
        return self


# (section, field) of the locations a stage writes, and of those it reads that may be local paths
PATH_OUTPUTS = (("data", "output"), ("student", "output"), ("distill", "cache"), ("distill", "storage_path"),
                ("distill", "output"), ("steps", "output"), ("tune", "storage_path"), ("evaluate", "output"))
PATH_INPUTS = (("teacher", "uri"), ("data", "source"), ("student", "start_from"), ("steps", "student"),
               ("tune", "eval_prompts"), ("evaluate", "student"), ("evaluate", "prompts"),
               ("evaluate", "student_decoder"), ("evaluate", "reference"), ("evaluate", "feature_extractor"),
               ("evaluate", "clip_model"), ("serve", "model"), ("serve", "decoder"), ("serve", "api_key_file"))

STAGES = ("prepare", "distill", "steps", "tune", "evaluate", "register", "serve")


class Config(Section):
    name: str = "distillery"
    work_dir: str = "./runs/distillery"  # local path or s3:// URI; outputs left empty go under it
    seed: int = 0  # every stage's seed that its section leaves unset (data split, init, noise, search, prompts)
    stages: list[Literal[STAGES]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["prepare", "distill", "evaluate", "register"]
    )
    ray: RayConfig = Field(default_factory=RayConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    steps: StepsConfig = Field(default_factory=StepsConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    _name = field_validator("name")(classmethod(lambda cls, v: path_safe(v)))

    @model_validator(mode="after")
    def _derive_uris(self) -> Config:
        """Fill the outputs left empty, so every stage reads what the one before it wrote; local paths become
        absolute here, in the driver: Ray workers run in folders of their own, where a relative path names nothing."""
        object.__setattr__(self, "work_dir", absolute_local(self.work_dir, must_exist=False))
        for section, field in PATH_OUTPUTS:
            object.__setattr__(getattr(self, section), field,
                               absolute_local(getattr(getattr(self, section), field), must_exist=False))
        for section, field in PATH_INPUTS:  # a relative name that is not a local path is a hub id: left as it is
            object.__setattr__(getattr(self, section), field,
                               absolute_local(getattr(getattr(self, section), field), must_exist=True))
        w = self.work_dir.rstrip("/")
        defaults = [
            (self.data, "output", f"{w}/cache"),
            (self.student, "output", f"{w}/student-init"),
            (self.distill, "storage_path", f"{w}/train"),
            (self.distill, "output", f"{w}/student"),
            (self.steps, "output", f"{w}/student-steps"),
            (self.tune, "storage_path", f"{w}/tune"),
            (self.evaluate, "output", f"{w}/eval"),
        ]
        for section, field, value in defaults:
            if getattr(section, field) is None:
                object.__setattr__(section, field, value)
        if self.distill.cache is None:
            object.__setattr__(self.distill, "cache", self.data.output)
        if self.steps.student is None:
            object.__setattr__(self.steps, "student", self.distill.output)
        if self.evaluate.student is None:
            object.__setattr__(self.evaluate, "student", self.distill.output)
        for section in (self.data, self.distill, self.tune, self.evaluate):
            if section.seed is None:
                object.__setattr__(section, "seed", self.seed)
        return self

    def tracking_uri(self) -> str:
        if self.mlflow.tracking_uri:
            return self.mlflow.tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{Path(self.work_dir).absolute()}/mlflow.db"

    def digest(self) -> str:
        """A short hash of the whole config: same config, same digest (tags, cache keys)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


class ConfigError(ValueError):
    """A config that does not validate; the message names each bad field and its value."""


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = e.get("input")
        shown = json.dumps(got, default=str) if not isinstance(got, dict) else "{...}"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown field (got {shown})")
        else:
            lines.append(f"  {where}: {e['msg']} (got {shown})")
    return "\n".join(lines)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
    tree[keys[-1]] = value


def parse_config(tree: dict | None, overrides: list[str] | None = None, source: str = "") -> Config:
    """Validate a config tree with `key.sub=value` overrides (values parsed as YAML)."""
    tree = dict(tree or {})
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not KEY=VALUE")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source or "(inline)")) from None


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    text = Path(path).read_text()
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"invalid config {path}: not YAML: {err}") from None
    if tree is not None and not isinstance(tree, dict):
        raise ConfigError(f"invalid config {path}: the top level must be a mapping")
    return parse_config(tree, overrides, source=str(path))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
