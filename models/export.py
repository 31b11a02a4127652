"""What an exported student folder holds besides its weights: a Hub model card (README.md, YAML metadata read by
the Hugging Face Hub and by `huggingface_hub.ModelCard`), and optionally an fp16 variant of every component
(`DiffusionPipeline.from_pretrained(folder, variant="fp16", dtype=torch.float16)`). Pure: no Ray, no MLflow.

The card says how the student was made (from its distillery.json) and, once the evaluate stage has scored it, the
teacher | student table and the verdict, between two markers so a later evaluation replaces them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from models import report
from models.student import StudentMeta

SCORES_BEGIN, SCORES_END = "<!-- distillery:scores -->", "<!-- /distillery:scores -->"
NOT_SCORED = "Not evaluated yet: `distillery evaluate CONFIG` (with `evaluate.student` this folder) fills this in."

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ summary }}

## How to use

```python
{{ usage }}
```

## How it was made

{{ made }}

## Scores

{{ scores }}
"""


def hub_base_model(teacher: str | None) -> str | None:
    """The teacher as a Hub `base_model` (owner/name), or None for a local folder, s3:// or builtin: teacher."""
    if not teacher or "://" in teacher or teacher.startswith(("builtin:", "/", ".", "~")) or Path(teacher).exists():
        return None
    return teacher if re.fullmatch(r"[\w.-]+/[\w.-]+", teacher) else None


def _made(meta: StudentMeta) -> str:
    rows = [("teacher", meta.teacher), ("family", meta.family), ("preset", meta.preset),
            ("initialised from", meta.start_from and f"the student `{meta.start_from}`" or
             {"teacher": "the teacher's kept blocks", "random": "random weights"}.get(meta.init, meta.init)),
            ("U-Net parameters", f"{meta.params / 1e6:.2f}M" if meta.params else None),
            ("training steps", meta.step),
            ("latents", {"mean": "VAE posterior means", "dist": "draws from the VAE posterior"}.get(
                meta.latents, meta.latents))]
    kd = meta.kd_loss or {}
    if kd:
        weights = ", ".join(f"{k} {kd[k]:g}" for k in ("task", "out", "feat", "attn", "self_attn") if kd.get(k))
        extras = [f"{k} {kd[k]}" for k in ("level", "min_snr_gamma", "attn_temperature") if kd.get(k) is not None]
        extras += ["feature terms normalized (LAPTOP-Diff)"] if kd.get("feat_norm") else []
        rows.append(("KD loss", "; ".join([weights, *extras])))
    losses = meta.losses or {}
    if losses:
        rows.append(("final losses", ", ".join(f"{k} {v:.4g}" for k, v in sorted(losses.items())
                                                if isinstance(v, (int, float)))))
    sd = meta.steps_distillation
    if sd:
        rows.append(("step distillation", f"{sd.objective}, samples in {sd.steps} steps"
                                          + (f" at guidance {sd.guidance_scale:g}" if sd.guidance_scale else "")))
    if meta.config_digest:
        rows.append(("config digest", meta.config_digest))
    lines = ["| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows if v not in (None, "")]
    spec = meta.spec
    if spec:
        lines.append(f"\nRemoval spec (kept layers per stage): `{spec}`")
    lines.append("\nMade with diffusion-distillery (`distillery run CONFIG`): the student is "
                 "the teacher's U-Net with blocks removed, trained by knowledge distillation (task loss, output KD "
                 "and feature KD), with the teacher's VAE, text encoder(s), tokenizer(s) and scheduler.")
    return "\n".join(lines)


def _usage(meta: StudentMeta, where: str, fp16: bool, prompt: str) -> str:
    steps = meta.steps or 25
    scale = meta.guidance_scale or 7.5
    load = (f'pipe = DiffusionPipeline.from_pretrained("{where}", variant="fp16", dtype=torch.float16).to("cuda")'
            if fp16 else f'pipe = DiffusionPipeline.from_pretrained("{where}")')
    call = f"image = pipe({prompt!r}, num_inference_steps={steps}, guidance_scale={scale:g}).images[0]"
    lines = ["import torch", "from diffusers import DiffusionPipeline", "", load, call]
    sd = meta.steps_distillation
    if sd and sd.lora_adapter:  # the adapter alone, for the source student or another U-Net of its architecture
        sched = sd.scheduler or "DDIMScheduler"
        lines[1] += f", {sched}"
        lines += ["", "# or its LoRA adapter, on the model it was distilled from (or another of that architecture):",
                  f'pipe = DiffusionPipeline.from_pretrained("{sd.source or meta.teacher}")',
                  f'pipe.scheduler = {sched}.from_pretrained("{where}", subfolder="scheduler")',
                  f'pipe.load_lora_weights("{where}/{sd.lora_adapter}")', call]
    return "\n".join(lines)


def scores_markdown(metrics: dict[str, float], goal: float) -> str:
    """The verdict and the teacher | student table, as the card shows them."""
    n = metrics.get("num_images")
    head = f"{report.verdict(metrics, goal)}"
    if n:
        head += (f" Measured by the evaluate stage on {int(n)} images, {metrics.get('steps', '?'):g} teacher "
                 f"steps at guidance {metrics.get('guidance_scale', 0):g}.")
    return head + "\n\n" + report.markdown_table(metrics)


def model_card(meta: StudentMeta, *, title: str, where: str, license: str | None = None,
               tags: list[str] | None = None, fp16: bool = False, metrics: dict[str, float] | None = None,
               goal: float = 0.95, prompt: str = "a photo of a cat") -> Any:
    """A huggingface_hub ModelCard of a distilled student (metadata: diffusers, text-to-image, base_model, tags)."""
    from diffusers.utils.hub_utils import populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name="diffusers", pipeline_tag="text-to-image", license=license,
                         base_model=hub_base_model(meta.teacher))
    teacher = meta.teacher or "its teacher"
    summary = (f"A smaller, faster student of `{teacher}`: its U-Net distilled by diffusion-distillery"
               + (f" (preset {meta.preset})" if meta.preset else "") + ".")
    scores = scores_markdown(metrics, goal) if metrics else NOT_SCORED
    card = ModelCard.from_template(data, template_str=CARD_TEMPLATE, title=title, summary=summary,
                                   usage=_usage(meta, where, fp16, prompt), made=_made(meta),
                                   scores=f"{SCORES_BEGIN}\n{scores}\n{SCORES_END}")
    default_tags = ["diffusion-distillery", "knowledge-distillation", "text-to-image", "stable-diffusion"]
    if meta.family == "sdxl":
        default_tags.append("stable-diffusion-xl")
    return populate_model_card(card, tags=default_tags + list(tags or []))


def write_model_card(folder: str | Path, meta: StudentMeta, *, title: str | None = None,
                     license: str | None = None, tags: list[str] | None = None,
                     metrics: dict[str, float] | None = None, goal: float = 0.95,
                     prompt: str = "a photo of a cat") -> Path:
    """README.md in a student folder; returns its path."""
    folder = Path(folder)
    fp16 = any(folder.glob("*/*.fp16.safetensors"))
    card = model_card(meta, title=title or folder.name, where=str(folder), license=license, tags=tags, fp16=fp16,
                      metrics=metrics, goal=goal, prompt=prompt)
    path = folder / "README.md"
    card.save(str(path))
    return path


def with_scores(card_text: str, metrics: dict[str, float], goal: float) -> str | None:
    """The card with its scores section replaced by these metrics; None when it has no distillery scores section
    (a card someone else wrote is left alone)."""
    a, b = card_text.find(SCORES_BEGIN), card_text.find(SCORES_END)
    if a < 0 or b < a:
        return None
    return card_text[: a + len(SCORES_BEGIN)] + "\n" + scores_markdown(metrics, goal) + "\n" + card_text[b:]


def save_fp16_variant(folder: str | Path) -> list[Path]:
    """fp16 copies of every component's weights next to the fp32 ones (`*.fp16.safetensors`, diffusers' variant
    naming); the configs stay those of the fp32 folder. Returns the files written."""
    import shutil
    import tempfile

    import torch
    from diffusers import DiffusionPipeline

    folder = Path(folder)
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float16)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        # saved aside: save_pretrained rewrites every config too (transformers' would then say float16)
        pipe.save_pretrained(tmp, variant="fp16")
        for f in sorted(Path(tmp).rglob("*.fp16.*")):
            dest = folder / f.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(f), dest)
            written.append(dest)
    return written
