"""`distillery student presets|build|push`: the model core from the command line, no Ray needed; push publishes a
student folder to the Hugging Face Hub (or any Hub endpoint) with huggingface_hub."""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

import yaml

from models.export import save_fp16_variant, write_model_card
from models.student import (
    PRESETS,
    RemovalSpec,
    StudentMeta,
    build_student,
    count_params,
    meta_unet,
    preset_spec,
    read_meta_file,
    removed_summary,
    resolve_spec,
    save_student,
    student_config,
)

# The public U-Net configs of SD 1.5 and SDXL (only the fields that differ from diffusers' defaults),
# so presets can be sized with no weights and no network.
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
SDXL_UNET = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    cross_attention_dim=2048,
    projection_class_embeddings_input_dim=2816,
)

# SD 1.5's VAE and text encoder (stable-diffusion-v1-5/stable-diffusion-v1-5); SDXL's VAE has the same
# shape with scaling_factor 0.13025. The benchmarks build full-size models from these, with no download.
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                norm_num_groups=32, sample_size=512, scaling_factor=0.18215, in_channels=3, out_channels=3)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)


def preset_table(teacher_configs: dict[str, dict]) -> list[dict]:
    """One row per (teacher, preset that applies to it): parameters and what is removed."""
    rows = []
    for tname, tcfg in teacher_configs.items():
        teacher = meta_unet(tcfg)
        for preset in PRESETS:
            try:
                spec = preset_spec(preset, teacher.config)
            except ValueError:
                continue  # the preset is for the other family
            n = count_params(meta_unet(student_config(teacher.config, spec)))
            rows.append({"teacher": tname, "preset": preset, "params": n,
                         "ratio": n / count_params(teacher), "removes": removed_summary(spec, teacher.config),
                         "about": PRESETS[preset]})
    return rows


def load_spec_file(path: str) -> RemovalSpec:
    d = yaml.safe_load(Path(path).read_text())
    if not isinstance(d, dict):
        raise ValueError(f"{path}: a removal spec must be a mapping")
    return RemovalSpec.from_dict(d)


def main(args: argparse.Namespace) -> int:
    if args.action == "presets":
        if args.teacher:
            from diffusers import UNet2DConditionModel

            from models.teacher import resolve_model_dir
            from pipelines.storage import model_dir

            cfg = dict(UNet2DConditionModel.load_config(resolve_model_dir(model_dir(args.teacher)), subfolder="unet"))
            configs = {args.teacher: {k: v for k, v in cfg.items() if not k.startswith("_")}}
        else:
            configs = {"sd1.5": SD15_UNET, "sdxl": SDXL_UNET}
        for r in preset_table(configs):
            print(f"{r['teacher']:<8} {r['preset']:<9} {r['params'] / 1e6:9.1f}M  {r['ratio']:5.1%}  "
                  f"removes: {r['removes']}")
        return 0
    if args.action == "push":
        from huggingface_hub.errors import HfHubHTTPError

        try:
            pushed = push_folder(args.folder, args.repo_id, private=not args.public, revision=args.revision,
                                 endpoint=args.endpoint, message=args.message)
        except HfHubHTTPError as e:  # a refusal (token, permissions, name) is an answer, not a crash
            raise ValueError(f"student push {args.repo_id}: the Hub refused: {e}") from e
        print(json.dumps(pushed, indent=2))
        return 0
    from models.teacher import load_teacher
    from pipelines.storage import model_dir

    teacher = load_teacher(model_dir(args.teacher), dtype=args.dtype, components=("unet",))
    spec = load_spec_file(args.spec) if args.spec else None
    spec = resolve_spec(teacher.unet.config, preset=args.preset, spec=spec)
    student = build_student(teacher.unet, spec)
    meta = StudentMeta(teacher=args.teacher, family=teacher.family, preset=args.preset, spec=spec.to_dict(),
                       params=count_params(student), teacher_params=count_params(teacher.unet))
    out = save_student(student, teacher.source, args.out, meta)
    if args.fp16_variant:
        save_fp16_variant(out)
    if not args.no_model_card:
        write_model_card(out, meta, title=out.name)
    print(json.dumps({"out": str(out), **meta.model_dump(exclude_none=True)}, indent=2))
    return 0


def push_folder(folder: str | Path, repo_id: str, *, private: bool = True, revision: str | None = None,
                endpoint: str | None = None, message: str | None = None) -> dict[str, str]:
    """Publish a student folder as a Hub model repo in one commit: created if missing (private unless asked
    otherwise), every file of the folder, and its model card pointed at the repo (written from distillery.json
    when the folder has none). The token comes from huggingface_hub's usual sources (HF_TOKEN, `hf auth login`);
    the endpoint from `endpoint`, else HF_ENDPOINT, else the Hub."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder}: no model_index.json; push takes a diffusers pipeline folder (a student "
                                "that distill, steps or `student build` wrote)")
    readme = folder / "README.md"
    if readme.is_file():
        card = readme.read_text()
    else:
        meta = read_meta_file(folder)
        with tempfile.TemporaryDirectory() as tmp:
            card = write_model_card(Path(tmp), meta, title=repo_id.split("/")[-1]).read_text()
    # the card's code loads the folder it was written in; on the Hub it loads the repo
    card = re.sub(r'from_pretrained\("[^"]*"', f'from_pretrained("{repo_id}"', card)
    api = HfApi(endpoint=endpoint)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    ops = [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode())]
    ops += [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
            for p in sorted(folder.rglob("*")) if p.is_file() and p != readme and ".cache" not in p.parts]
    info = api.create_commit(repo_id, ops, commit_message=message or f"Upload {folder.name} (diffusion-distillery)",
                             revision=revision, repo_type="model")
    return {"repo": str(url), "commit": info.oid, "commit_url": info.commit_url, "files": str(len(ops))}
