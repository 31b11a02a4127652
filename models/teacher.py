"""Load a teacher: hub id, local diffusers folder or builtin:NAME (an s3:// folder is copied to a local one by
pipelines.storage.model_dir first).

Returns the components (U-Net, VAE, text encoder(s), tokenizer(s), scheduler) with the family (sd1,
sd2, sdxl) and the prediction type (epsilon, v_prediction) read from their configs, and the text
encoding every stage shares (`encode_prompts`), so SD1 and SDXL differ in one place.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.schedulers import SchedulerMixin

from models.local_cache import build_once, cache_root

log = logging.getLogger(__name__)

Family = Literal["sd1", "sd2", "sdxl"]
SHIPPED = Path(__file__).parent / "assets"  # teachers committed to the repo (builtin:shapes-sd1)


def resolve_model_dir(uri: str) -> str:
    """A path or hub id that from_pretrained accepts: builtin tiny models are built into the local cache once;
    hub ids and local folders pass through. Remote URIs (s3://) are the storage layer's: pipelines.storage.model_dir
    copies them to a local folder."""
    if uri.startswith("builtin:"):
        name = uri.split(":", 1)[1]
        shipped = SHIPPED / name
        if shipped.is_dir():
            return str(shipped)
        from models.tiny import BUILDERS, save_tiny

        if name not in BUILDERS:
            known = sorted(BUILDERS) + sorted(p.name for p in SHIPPED.glob("*") if p.is_dir())
            raise ValueError(f"unknown builtin teacher {uri!r}; known: {', '.join(known)}")
        return str(build_once(cache_root() / "builtin" / name, lambda tmp: save_tiny(name, tmp),
                              done=lambda d: (d / "model_index.json").exists() or (d / "config.json").exists()))
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"{uri}: a remote folder; fetch it to a local one first (pipelines.storage.model_dir)")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return uri


def load_decoder(uri: str, dtype: torch.dtype = torch.float32) -> Any:
    """A VAE to decode with in place of the pipeline's own: a diffusers AutoencoderTiny (TAESD,
    madebyollin/taesd for SD 1.x/2.x, madebyollin/taesdxl for SDXL) or AutoencoderKL folder, by local path, hub
    id or builtin:tiny-decoder (s3://: pipelines.storage.model_dir first). A pipeline folder works too (its vae/
    subfolder)."""
    import json

    from diffusers import AutoencoderTiny

    src = resolve_model_dir(uri)
    sub = "vae" if (Path(src) / "model_index.json").is_file() else None
    local = Path(src) / (sub or "") / "config.json"
    name = json.loads(local.read_text()).get("_class_name") if local.is_file() else None
    if name is None:  # a hub id: ask the hub's config
        from diffusers import ConfigMixin

        name = ConfigMixin.load_config(src, subfolder=sub).get("_class_name")
    cls = {"AutoencoderTiny": AutoencoderTiny, "AutoencoderKL": AutoencoderKL}.get(name)
    if cls is None:
        raise ValueError(f"decoder {uri}: a {name or 'folder with no _class_name'}; need an AutoencoderTiny (TAESD) "
                         "or AutoencoderKL")
    return cls.from_pretrained(src, subfolder=sub, dtype=dtype)


def swap_decoder(pipe: Any, decoder: Any, uri: str = "decoder") -> Any:
    """Put `decoder` in place of the pipeline's VAE after checking it reads the same latents (channels and
    upsampling); returns the pipeline. Only decoding uses it: the pipelines here never encode images."""
    old, new = pipe.vae.config, decoder.config
    factor = 2 ** (len(new.block_out_channels) - 1)
    if new.latent_channels != old.latent_channels or factor != pipe.vae_scale_factor:
        raise ValueError(f"{uri}: decodes {new.latent_channels}-channel latents upsampled {factor}x; the pipeline's "
                         f"VAE decodes {old.latent_channels} channels upsampled {pipe.vae_scale_factor}x")
    pipe.vae = decoder.to(pipe.device)
    return pipe


def trained_latents(src: str) -> str | None:
    """What the U-Net of a model folder was trained on, where the folder says so (its distillery.json's
    "latents"): "mean", the VAE posterior means, or "dist", draws from the posterior (what SD and SDXL were trained
    on, as diffusers' training examples do). None when the folder does not say (hub models: take "dist")."""
    from models.student import read_meta_file  # student.py builds on this module

    form = read_meta_file(src).latents
    return None if form is None else "dist" if form == "sample" else form


def detect_family(unet_config: Any) -> Family:
    if getattr(unet_config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    # SD 2.x uses linear projections in its transformers (and OpenCLIP's 1024-d text features)
    if getattr(unet_config, "use_linear_projection", False) or unet_config.cross_attention_dim == 1024:
        return "sd2"
    return "sd1"


def pick_dtype(name: str, device: str | torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@dataclass
class Teacher:
    source: str  # the local folder or hub id it was loaded from
    family: Family
    prediction_type: str
    dtype: torch.dtype
    unet: UNet2DConditionModel | None
    vae: AutoencoderKL | None
    text_encoder: Any
    tokenizer: Any
    scheduler: SchedulerMixin
    text_encoder_2: Any = None
    tokenizer_2: Any = None

    @property
    def vae_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    def to(self, device: str | torch.device) -> Teacher:
        for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            if m is not None:
                m.to(device)
        return self


def load_teacher(
    uri: str,
    dtype: str = "auto",
    device: str | torch.device = "cpu",
    components: tuple[str, ...] = ("unet", "vae", "text"),
    revision: str | None = None,
    variant: str | None = None,
) -> Teacher:
    """Load what the caller needs (the data stage wants no U-Net, the distill stage no VAE)."""
    from diffusers import DiffusionPipeline
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    src = resolve_model_dir(uri)
    torch_dtype = pick_dtype(dtype, device)
    kw: dict[str, Any] = {"revision": revision} if revision else {}
    if variant:
        kw["variant"] = variant
    index = DiffusionPipeline.load_config(src, **({"revision": revision} if revision else {}))
    if "unet" not in index:
        raise ValueError(f"{uri}: not a Stable Diffusion pipeline folder (no unet in model_index.json)")
    sdxl = "text_encoder_2" in index and index.get("text_encoder_2", [None])[0] is not None
    unet_cfg = UNet2DConditionModel.load_config(src, subfolder="unet", **kw)
    unet = None
    if "unet" in components:
        unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", dtype=torch_dtype, **kw)
    vae = None
    if "vae" in components:
        # the SD/SDXL VAE overflows in fp16; keep it in fp32 unless bf16 was asked for
        vae_dtype = torch.float32 if torch_dtype == torch.float16 else torch_dtype
        vae = AutoencoderKL.from_pretrained(src, subfolder="vae", dtype=vae_dtype, **kw)
    te = tok = te2 = tok2 = None
    if "text" in components:
        te = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", dtype=torch_dtype, **kw)
        tok = AutoTokenizer.from_pretrained(src, subfolder="tokenizer", **kw)
        if sdxl:
            te2 = CLIPTextModelWithProjection.from_pretrained(
                src, subfolder="text_encoder_2", dtype=torch_dtype, **kw
            )
            tok2 = AutoTokenizer.from_pretrained(src, subfolder="tokenizer_2", **kw)
    sched_cls = _scheduler_class(index)
    scheduler = sched_cls.from_pretrained(src, subfolder="scheduler", **kw)
    family = "sdxl" if sdxl else detect_family(_Cfg(unet_cfg))
    teacher = Teacher(
        source=src,
        family=family,
        prediction_type=scheduler.config.get("prediction_type", "epsilon"),
        dtype=torch_dtype,
        unet=unet,
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        scheduler=scheduler,
        text_encoder_2=te2,
        tokenizer_2=tok2,
    )
    for m in (unet, vae, te, te2):
        if m is not None:
            m.requires_grad_(False).eval()
    return teacher.to(device)


class _Cfg:
    def __init__(self, d: dict):
        self.__dict__.update(d)


def _scheduler_class(index: dict) -> type:
    import diffusers

    name = index.get("scheduler", [None, "DDIMScheduler"])[1]
    return getattr(diffusers, name)


def _tokenize(tokenizer: Any, prompts: list[str], device: torch.device) -> torch.Tensor:
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


@torch.no_grad()
def encode_prompts(teacher: Teacher, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Text conditioning as the U-Net takes it.

    sd1/sd2: {"prompt_embeds": (B, 77, D)}.
    sdxl:    {"prompt_embeds": (B, 77, D1+D2) from the penultimate layers, "pooled": (B, P)}.
    """
    device = teacher.text_encoder.device
    ids = _tokenize(teacher.tokenizer, prompts, device)
    if teacher.family != "sdxl":
        return {"prompt_embeds": teacher.text_encoder(ids)[0]}
    out1 = teacher.text_encoder(ids, output_hidden_states=True)
    ids2 = _tokenize(teacher.tokenizer_2, prompts, device)
    out2 = teacher.text_encoder_2(ids2, output_hidden_states=True)
    embeds = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    return {"prompt_embeds": embeds, "pooled": out2.text_embeds}


def sdxl_time_ids(
    original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]
) -> list[int]:
    """SDXL micro-conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
    return [*original_size, *crop_top_left, *target_size]


def unet_conditioning(batch: dict[str, torch.Tensor], family: Family) -> dict[str, Any]:
    """Keyword arguments for UNet2DConditionModel.forward from a batch of cached embeddings."""
    kw: dict[str, Any] = {"encoder_hidden_states": batch["prompt_embeds"]}
    if family == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": batch["pooled"], "time_ids": batch["time_ids"]}
    return kw


def map_tensors(tree: Any, fn: Any) -> Any:
    """The U-Net keyword-argument tree (nested dicts, as `unet_conditioning` builds) with `fn` applied to each
    tensor; other leaves (None, ints) unchanged."""
    if isinstance(tree, dict):
        return {k: map_tensors(v, fn) for k, v in tree.items()}
    return fn(tree) if torch.is_tensor(tree) else tree


def cast_floats(tree: Any, dtype: torch.dtype) -> Any:
    """The tree with its floating-point tensors in `dtype` (integer ids stay as they are)."""
    return map_tensors(tree, lambda v: v.to(dtype) if v.is_floating_point() else v)


def select_rows(tree: Any, idx: torch.Tensor) -> Any:
    """The tree with rows `idx` of each tensor (a batch of the conditioning)."""
    return map_tensors(tree, lambda v: v[idx.to(v.device)])
