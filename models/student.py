"""Students built from the teacher by removing U-Net blocks, initialized from the teacher's weights.

A removal spec says, per resolution stage, which resnet(+attention) layers the student keeps, how deep
each kept transformer is, whether the mid block stays (whole, as a single resnet, or not at all) and how
many innermost stages go. Presets:

  SD 1.x/2.x (BK-SDM): bk-base  one pair fewer per stage (down keeps layer 0, up keeps 0 and 2)
                       bk-small bk-base without the mid block
                       bk-tiny  bk-small without the innermost stage (its down and up block)
  SDXL (Segmind):      ssd-1b   transformer depths down [-, 2, 4], up [4 4 10, 2 1 1, -], mid = one resnet
                       vega     transformer depths down [-, 1, 2], up [2 2 2, 1 1 1, -], mid = one resnet

Up blocks keep the teacher's *last* layer of each stage because it is the one that reads the skip
connection across the channel change; any other choice would not fit its weights. When a transformer
gets shallower, the kept blocks are spread evenly over the teacher's (first and last included).

The student is a plain diffusers UNet2DConditionModel: its config is the teacher's with fewer layers.
"""

from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import UNet2DConditionModel
from pydantic import BaseModel, ConfigDict, ValidationError

MidMode = Literal["full", "resnet", "none"]


@dataclass
class RemovalSpec:
    down: list[list[int]]  # per kept down stage (outermost first): teacher layer indices kept
    up: list[list[int]]  # per kept up stage (innermost first, as in up_blocks): teacher indices kept
    mid: MidMode = "full"
    drop_inner: int = 0  # innermost stages removed (their down and up blocks)
    down_depths: list[list[int]] | None = None  # transformer depth per kept attention, per down stage
    up_depths: list[list[int]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RemovalSpec:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown removal spec fields: {sorted(unknown)}")
        return cls(**d)


@dataclass
class Layout:
    """The stage structure of a U-Net config, which specs are checked against."""

    family: str
    layers: int  # resnets per down stage in the teacher (up stages have one more)
    down_types: list[str]
    up_types: list[str]
    down_depths: list[list[int]] = field(default_factory=list)  # [] for a stage without attention
    up_depths: list[list[int]] = field(default_factory=list)
    mid_type: str | None = None

    @property
    def stages(self) -> int:
        return len(self.down_types)


def _per_block(value: Any, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def layout_of(config: Any) -> Layout:
    cfg = dict(config)
    n = len(cfg["down_block_types"])
    lpb = _per_block(cfg.get("layers_per_block", 2), n)
    if len(set(lpb)) != 1:
        raise ValueError(f"teacher has uneven layers_per_block {lpb}; only uniform teachers are supported")
    layers = lpb[0]
    tl = _per_block(cfg.get("transformer_layers_per_block", 1), n)
    down_depths = []
    for i, t in enumerate(cfg["down_block_types"]):
        has_attn = "CrossAttn" in t
        down_depths.append(_per_block(tl[i], layers) if has_attn else [])
    rev = cfg.get("reverse_transformer_layers_per_block")
    rev = list(rev) if rev is not None else list(reversed(tl))
    up_depths = []
    for i, t in enumerate(cfg["up_block_types"]):
        up_depths.append(_per_block(rev[i], layers + 1) if "CrossAttn" in t else [])
    family = "sdxl" if cfg.get("addition_embed_type") == "text_time" else "sd"
    return Layout(family, layers, list(cfg["down_block_types"]), list(cfg["up_block_types"]),
                  down_depths, up_depths, cfg.get("mid_block_type"))


def _sd_check(lay: Layout, preset: str) -> None:
    want = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    if lay.family != "sd" or lay.down_types != want or lay.layers != 2:
        raise ValueError(
            f"preset {preset!r} is for SD 1.x/2.x teachers (4 stages, 2 layers each); "
            f"this teacher is {'sdxl' if lay.family == 'sdxl' else 'a U-Net with ' + str(lay.down_types)}"
        )


def _sdxl_check(lay: Layout, preset: str) -> None:
    want = ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    if lay.family != "sdxl" or lay.down_types != want or lay.layers != 2:
        raise ValueError(f"preset {preset!r} is for SDXL teachers; this teacher is {lay.family}")


def preset_spec(name: str, config: Any) -> RemovalSpec:
    """The removal spec of a named preset, checked against the teacher's U-Net config."""
    lay = layout_of(config)
    if name == "identity":
        return RemovalSpec(down=[list(range(lay.layers))] * lay.stages,
                           up=[list(range(lay.layers + 1))] * lay.stages)
    if name in ("bk-base", "bk-small", "bk-tiny"):
        _sd_check(lay, name)
        n = 3 if name == "bk-tiny" else 4
        return RemovalSpec(down=[[0]] * n, up=[[0, 2]] * n, mid="full" if name == "bk-base" else "none",
                           drop_inner=4 - n)
    if name in ("ssd-1b", "vega"):
        _sdxl_check(lay, name)
        all_down, all_up = [[0, 1]] * 3, [[0, 1, 2]] * 3
        if name == "ssd-1b":
            dd, ud = [[], [2, 2], [4, 4]], [[4, 4, 10], [2, 1, 1], []]
        else:
            dd, ud = [[], [1, 1], [2, 2]], [[2, 2, 2], [1, 1, 1], []]
        return RemovalSpec(down=all_down, up=all_up, mid="resnet", down_depths=dd, up_depths=ud)
    raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")


PRESETS = {
    "identity": "nothing removed (the teacher's layout)",
    "bk-base": "SD1/2: one resnet+attention pair fewer per stage (BK-SDM-Base)",
    "bk-small": "SD1/2: bk-base without the mid block (BK-SDM-Small)",
    "bk-tiny": "SD1/2: bk-small without the innermost stage (BK-SDM-Tiny)",
    "ssd-1b": "SDXL: shallower transformers, mid block as one resnet (Segmind SSD-1B)",
    "vega": "SDXL: much shallower transformers, mid block as one resnet (Segmind-Vega)",
}


def validate_spec(spec: RemovalSpec, config: Any) -> Layout:
    lay = layout_of(config)
    n = lay.stages - spec.drop_inner
    if not 0 <= spec.drop_inner < lay.stages:
        raise ValueError(f"drop_inner={spec.drop_inner}: the teacher has {lay.stages} stages")
    if len(spec.down) != n or len(spec.up) != n:
        raise ValueError(
            f"spec has {len(spec.down)} down and {len(spec.up)} up stages; with drop_inner="
            f"{spec.drop_inner} the student has {n} (the teacher has {lay.stages})"
        )
    for s, kept in enumerate(spec.down):
        if not kept or sorted(set(kept)) != list(kept) or kept[-1] >= lay.layers or kept[0] < 0:
            raise ValueError(f"down stage {s}: kept layers {kept} must be increasing indices in 0..{lay.layers - 1}")
    for u, kept in enumerate(spec.up):
        if not kept or sorted(set(kept)) != list(kept) or kept[-1] > lay.layers or kept[0] < 0:
            raise ValueError(f"up stage {u}: kept layers {kept} must be increasing indices in 0..{lay.layers}")
        mirror = spec.down[n - 1 - u]
        if len(kept) != len(mirror) + 1:
            raise ValueError(
                f"up stage {u} keeps {len(kept)} layers but its down stage {n - 1 - u} keeps {len(mirror)}: "
                f"an up stage needs one more layer than its down stage (one per skip connection)"
            )
    if spec.mid != "none" and lay.mid_type is None:
        raise ValueError(f"mid={spec.mid!r} but the teacher has no mid block")
    if spec.mid not in ("full", "resnet", "none"):
        raise ValueError(f"mid={spec.mid!r}: choose full, resnet or none")
    if spec.drop_inner and spec.mid == "full":
        raise ValueError("a student that drops inner stages cannot keep the teacher's full mid block")
    for name, depths, kept_list, teacher_depths in (
        ("down_depths", spec.down_depths, spec.down, lay.down_depths),
        ("up_depths", spec.up_depths, spec.up, lay.up_depths[spec.drop_inner:]),
    ):
        if depths is None:
            continue
        if len(depths) != n:
            raise ValueError(f"{name} has {len(depths)} stages; the student has {n}")
        for s, (d, kept, td) in enumerate(zip(depths, kept_list, teacher_depths)):
            if not td:
                if d:
                    raise ValueError(f"{name}[{s}]: stage {s} has no attention, give []")
                continue
            if len(d) != len(kept):
                raise ValueError(f"{name}[{s}] has {len(d)} depths for {len(kept)} kept layers")
            for j, (depth, k) in enumerate(zip(d, kept)):
                if not 1 <= depth <= td[k]:
                    raise ValueError(f"{name}[{s}][{j}]={depth}: the teacher's layer {k} has depth {td[k]}")
    return lay


def _student_depths(spec: RemovalSpec, lay: Layout) -> tuple[list[list[int]], list[list[int]]]:
    down = spec.down_depths or [[lay.down_depths[s][k] for k in kept] if lay.down_depths[s] else []
                                for s, kept in enumerate(spec.down)]
    ups = lay.up_depths[spec.drop_inner:]
    up = spec.up_depths or [[ups[u][k] for k in kept] if ups[u] else [] for u, kept in enumerate(spec.up)]
    return down, up


def student_config(teacher_config: Any, spec: RemovalSpec) -> dict[str, Any]:
    """The student's UNet2DConditionModel config: the teacher's, with the removed parts gone."""
    lay = validate_spec(spec, teacher_config)
    cfg = {k: copy.deepcopy(v) for k, v in dict(teacher_config).items() if not k.startswith("_")}
    n, k = lay.stages - spec.drop_inner, spec.drop_inner
    cfg["down_block_types"] = lay.down_types[:n]
    cfg["up_block_types"] = lay.up_types[k:]
    cfg["block_out_channels"] = list(cfg["block_out_channels"])[:n]
    for key in ("attention_head_dim", "num_attention_heads", "cross_attention_dim", "only_cross_attention"):
        if isinstance(cfg.get(key), (list, tuple)):
            cfg[key] = list(cfg[key])[:n]
    lpb = [len(d) for d in spec.down]
    cfg["layers_per_block"] = lpb[0] if len(set(lpb)) == 1 else lpb
    down_d, up_d = _student_depths(spec, lay)
    # a stage without attention ignores its depth; write 1 there, as diffusers' own configs do
    down_cfg = [d if d else [1] * len(spec.down[s]) for s, d in enumerate(down_d)]
    up_cfg = [d if d else [1] * len(spec.up[u]) for u, d in enumerate(up_d)]
    down_flat = [d[0] if len(set(d)) == 1 else d for d in down_cfg]
    symmetric = all(len(set(u)) == 1 and u[0] == (down_flat[n - 1 - i] if isinstance(down_flat[n - 1 - i], int)
                                                   else None) for i, u in enumerate(up_cfg))
    if symmetric and all(isinstance(d, int) for d in down_flat):
        cfg["transformer_layers_per_block"] = down_flat[0] if len(set(down_flat)) == 1 else down_flat
        cfg["reverse_transformer_layers_per_block"] = None
    else:
        cfg["transformer_layers_per_block"] = down_flat
        cfg["reverse_transformer_layers_per_block"] = up_cfg
    cfg["mid_block_type"] = {"full": lay.mid_type, "resnet": "UNetMidBlock2D", "none": None}[spec.mid]
    return cfg


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta_unet(config: dict[str, Any]) -> UNet2DConditionModel:
    """A U-Net with no storage: sizes and structure without weights."""
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def spread(total: int, keep: int) -> list[int]:
    """`keep` indices out of range(total), spread evenly, first and last included."""
    if keep >= total:
        return list(range(total))
    if keep == 1:
        return [0]
    return [round(i * (total - 1) / (keep - 1)) for i in range(keep)]


_LAYER = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)$")
_SAMPLER = re.compile(r"^(up_blocks)\.(\d+)\.(upsamplers\..*)$")
_MID_TB = re.compile(r"^mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.(.*)$")
_TB = re.compile(r"^transformer_blocks\.(\d+)\.(.*)$")


def _depth(unet: UNet2DConditionModel, path: str) -> int:
    return len(unet.get_submodule(path).transformer_blocks)


def teacher_key(key: str, spec: RemovalSpec, student: UNet2DConditionModel, teacher: UNet2DConditionModel) -> str:
    """The teacher parameter a student parameter is copied from."""
    m = _LAYER.match(key)
    if m:
        blocks, b, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        tb = b if blocks == "down_blocks" else b + spec.drop_inner
        tj = (spec.down if blocks == "down_blocks" else spec.up)[b][j]
        if kind == "attentions":
            tm = _TB.match(rest)
            if tm:
                s_depth = _depth(student, f"{blocks}.{b}.attentions.{j}")
                t_depth = _depth(teacher, f"{blocks}.{tb}.attentions.{tj}")
                rest = f"transformer_blocks.{spread(t_depth, s_depth)[int(tm.group(1))]}.{tm.group(2)}"
        return f"{blocks}.{tb}.{kind}.{tj}.{rest}"
    m = _SAMPLER.match(key)
    if m:
        return f"up_blocks.{int(m.group(2)) + spec.drop_inner}.{m.group(3)}"
    m = _MID_TB.match(key)
    if m:
        picks = spread(_depth(teacher, "mid_block.attentions.0"), _depth(student, "mid_block.attentions.0"))
        return f"mid_block.attentions.0.transformer_blocks.{picks[int(m.group(1))]}.{m.group(2)}"
    return key


def init_from_teacher(student: UNet2DConditionModel, teacher: UNet2DConditionModel, spec: RemovalSpec) -> None:
    """Copy every student weight from the teacher layer the spec maps it to."""
    t_state = teacher.state_dict()
    new_state = {}
    for key, value in student.state_dict().items():
        tk = teacher_key(key, spec, student, teacher)
        if tk not in t_state:
            raise ValueError(f"student weight {key} maps to {tk}, which the teacher does not have")
        if t_state[tk].shape != value.shape:
            raise ValueError(
                f"student weight {key} {tuple(value.shape)} maps to teacher {tk} {tuple(t_state[tk].shape)}: "
                "the kept layers do not fit (an up stage must keep its teacher's last layer)"
            )
        new_state[key] = t_state[tk].to(value.dtype)
    student.load_state_dict(new_state, strict=True)


def build_student(teacher: UNet2DConditionModel, spec: RemovalSpec) -> UNet2DConditionModel:
    cfg = student_config(teacher.config, spec)
    student = UNet2DConditionModel.from_config(cfg)
    init_from_teacher(student, teacher, spec)  # copies cast to the student's (fp32) dtype
    if teacher.dtype != student.dtype:
        student = student.to(dtype=teacher.dtype)
    return student.to(teacher.device)


def resolve_spec(config: Any, preset: str | None = None, spec: dict | RemovalSpec | None = None) -> RemovalSpec:
    """An explicit spec wins over a preset; both are validated against the teacher."""
    if spec is not None:
        s = spec if isinstance(spec, RemovalSpec) else RemovalSpec.from_dict(
            {k: v for k, v in dict(spec).items() if v is not None}
        )
        validate_spec(s, config)
        return s
    if preset is None:
        raise ValueError("give a preset or a spec")
    return preset_spec(preset, config)


def removed_summary(spec: RemovalSpec, config: Any) -> str:
    """What a spec removes, in words (for `distillery student presets`)."""
    lay = layout_of(config)
    parts = []
    for s, kept in enumerate(spec.down):
        gone = [i for i in range(lay.layers) if i not in kept]
        if gone:
            parts.append(f"down{s} layers {gone}")
    for u, kept in enumerate(spec.up):
        gone = [i for i in range(lay.layers + 1) if i not in kept]
        if gone:
            parts.append(f"up{u + spec.drop_inner} layers {gone}")
    if spec.drop_inner:
        parts.append(f"innermost {spec.drop_inner} stage(s)")
    if spec.mid != "full" and lay.mid_type:
        parts.append("mid block" if spec.mid == "none" else "mid attention (one resnet left)")
    if spec.down_depths or spec.up_depths:
        parts.append("transformer depth")
    return ", ".join(parts) or "nothing"


META_FILE = "distillery.json"  # how a model this project made was made: beside its weights in every folder we write


class StepsMeta(BaseModel):
    """What the steps stage records of a step-distilled student (distillery.json's "steps_distillation")."""

    model_config = ConfigDict(extra="forbid")

    objective: str
    steps: int
    guidance_scale: float
    guidance_range: list[float] | None = None
    phases: list[dict[str, Any]] | None = None
    teacher: str | None = None
    source: str | None = None  # the student folder it was distilled from
    lora_rank: int | None = None
    lora_adapter: str | None = None  # the adapter's folder, relative to the student's (pipe.load_lora_weights)
    job_key: str | None = None
    step: int | None = None  # training steps done
    loss: float | None = None
    mlflow_run_id: str | None = None
    config_digest: str | None = None
    scheduler: str | None = None


class StudentMeta(BaseModel):
    """distillery.json: how a student (or the shipped teacher) was made. Every stage and command that writes a model
    folder writes it through this model and every reader reads it through `read_meta`, so the two sides cannot
    drift apart (a key one writes and the other does not know is an error that names the file)."""

    model_config = ConfigDict(extra="forbid")

    teacher: str | None = None  # teacher.uri
    family: Literal["sd1", "sd2", "sdxl"] | None = None
    preset: str | None = None
    init: Literal["teacher", "random"] | None = None
    start_from: str | None = None  # the student folder whose U-Net training started from (continued distillation)
    spec: dict[str, Any] | None = None  # RemovalSpec.to_dict()
    latents: Literal["dist", "mean", "sample"] | None = None  # what the U-Net was trained on
    sizes: list[str] | None = None  # "WxH" image sizes it was trained at (the cache's aspect-ratio buckets)
    params: int | None = None  # U-Net parameters
    teacher_params: int | None = None
    job_key: str | None = None
    step: int | None = None  # training steps done
    losses: dict[str, float] | None = None
    mlflow_run_id: str | None = None
    checkpoint: str | None = None
    config_digest: str | None = None
    kd_loss: dict[str, Any] | None = None  # distill.loss as it was
    steps: int | None = None  # a step-distilled student samples at these steps and guidance scale
    guidance_scale: float | None = None
    steps_distillation: StepsMeta | None = None
    note: str | None = None
    trained_by: str | None = None

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=True)


def read_meta(text: str | bytes, where: str) -> StudentMeta:
    """distillery.json's text as a StudentMeta; `where` (the file) is named in the error if it is not one."""
    try:
        return StudentMeta.model_validate_json(text)
    except ValidationError as err:
        raise ValueError(f"{where}: not a distillery.json this code writes: {err}") from None


def read_meta_file(folder: str | Path) -> StudentMeta:
    """The StudentMeta of a local model folder (empty when the folder has no distillery.json: a Hub model)."""
    path = Path(folder) / META_FILE
    return read_meta(path.read_bytes(), str(path)) if path.is_file() else StudentMeta()


def save_student(
    student: UNet2DConditionModel,
    teacher_dir: str,
    out_dir: str | Path,
    meta: StudentMeta,
) -> Path:
    """A full pipeline folder: the student U-Net with the teacher's VAE, text encoder(s), tokenizer(s)
    and scheduler; plain diffusers loads it. `distillery.json` records how it was made."""
    from diffusers import DiffusionPipeline

    out = Path(out_dir)
    pipe = DiffusionPipeline.from_pretrained(teacher_dir, unet=student, dtype=student.dtype)
    pipe.save_pretrained(out)
    (out / META_FILE).write_text(meta.to_json())
    return out
