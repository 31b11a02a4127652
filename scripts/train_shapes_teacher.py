"""Train the shipped tiny teacher, builtin:shapes-sd1, on the built-in shapes dataset (pipelines/shapes.py).

An SD1-style text-to-image pipeline trained from scratch: the VAE first (reconstruction), then the U-Net
and the text encoder together on the frozen VAE's latents (epsilon prediction, 10% empty captions for
classifier-free guidance, min-SNR weighting, an EMA of the weights that is what gets saved). The U-Net has
the four SD1 stages (CrossAttnDownBlock2D x3 + DownBlock2D, two layers each), so the BK-SDM presets apply.
It ends by measuring caption accuracy of generated samples against the same measure on dataset images,
and writes the diffusers folder, a sample grid and a model card.

    python scripts/train_shapes_teacher.py --device cuda --out models/assets/shapes-sd1
    # longer, in calls of a few minutes each: the VAE once, then U-Net rounds that resume the last
    python scripts/train_shapes_teacher.py --max-minutes 7 --out run1
    python scripts/train_shapes_teacher.py --max-minutes 7 --vae-steps 0 --resume run1 --out run2

Plain PyTorch + diffusers; one GPU, a few minutes. On CPU use a few hundred steps to check it runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.tiny import SD1_UNET, VAE, build_tokenizer  # noqa: E402
from pipelines import shapes  # noqa: E402

# (32, 32, 64, 64), 2 layers per stage; attention_head_dim is the number of heads (diffusers' legacy name):
# 4 heads of 8 and 16 channels, which the fused (flash) attention kernels take
UNET = dict(SD1_UNET, cross_attention_dim=64, attention_head_dim=4)
VAE_CFG = dict(VAE, block_out_channels=(32, 32, 64))  # 64 px -> 4x16x16 latents
TEXT = dict(vocab_size=1000, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="quick_gelu")
SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _render(i: int, seed: int) -> tuple[np.ndarray, str]:
    attrs, centers = shapes.sample_attrs(seed, i)
    return np.asarray(shapes.render(attrs, centers)), shapes.caption_of(attrs)


def dataset(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """(n, 3, 64, 64) images in [-1, 1] and their captions: generate(n, seed), rendered in parallel."""
    import functools
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor() as ex:
        rows = list(ex.map(functools.partial(_render, seed=seed), range(n), chunksize=512))
    x = torch.from_numpy(np.stack([r[0] for r in rows])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, [r[1] for r in rows]


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    a = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(i) for i in a]


def lr_factor(step: int, warmup: int, progress: float) -> float:
    """Linear warmup, then cosine from 1 to 0.1 over the run's progress (0..1)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_vae(x: torch.Tensor, args, device: torch.device) -> AutoencoderKL:
    torch.manual_seed(args.seed)
    if args.init_vae:  # continue an earlier run's VAE
        vae = AutoencoderKL.from_pretrained(args.init_vae).to(device)
    else:
        vae = AutoencoderKL(sample_size=64, **VAE_CFG).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(args.vae_steps):
        for g in opt.param_groups:
            g["lr"] = args.vae_lr * lr_factor(step, 100, step / args.vae_steps)
        batch = x[torch.randint(len(x), (args.vae_batch_size,), device=x.device)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            post = vae.encode(batch).latent_dist
            rec = vae.decode(post.sample()).sample
        rec = rec.float()
        # L1 keeps flat colors and sharp edges; a tiny KL keeps the latents bounded
        loss = F.l1_loss(rec, batch) + F.mse_loss(rec, batch) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.vae_steps - 1:
            log(f"vae step {step}/{args.vae_steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(vae: AutoencoderKL, x: torch.Tensor, device: torch.device, bs: int = 512) -> torch.Tensor:
    return torch.cat([vae.encode(x[i : i + bs].to(device)).latent_dist.mean for i in range(0, len(x), bs)])


def train_unet(lat: torch.Tensor, ids: torch.Tensor, empty_ids: torch.Tensor, args, device):
    torch.manual_seed(args.seed + 1)
    if args.resume:  # continue an earlier run's (EMA) weights with a fresh optimizer
        unet = UNet2DConditionModel.from_pretrained(Path(args.resume) / "unet").to(device).train()
        te = CLIPTextModel.from_pretrained(Path(args.resume) / "text_encoder").to(device).train()
        unet.requires_grad_(True)
        te.requires_grad_(True)
    else:
        unet = UNet2DConditionModel(sample_size=16, **UNET).to(device)
        te = CLIPTextModel(CLIPTextConfig(**TEXT)).to(device)
    params = list(unet.parameters()) + list(te.parameters())
    ema = [p.detach().clone() for p in params]
    # torch.compile fuses the many small kernels of a tiny U-Net (eager is launch-bound); eager if it fails
    fwd = torch.compile(unet) if args.compile else unet
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, fused=device.type == "cuda")
    sched = DDPMScheduler(num_train_timesteps=1000, **SCHEDULE)
    acp = sched.alphas_cumprod.to(device)

    def step_loss(fwd, z0: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        drop = torch.rand(len(tok), device=device) < 0.1  # empty caption: the unconditional branch of CFG
        tok = torch.where(drop[:, None], empty_ids, tok)
        noise = torch.randn_like(z0)
        t = torch.randint(0, 1000, (len(tok),), device=device)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = fwd(zt, t, encoder_hidden_states=te(tok)[0]).sample
        snr = acp[t] / (1 - acp[t])
        w = torch.clamp(snr, max=5.0) / snr  # min-SNR-5 weighting for epsilon prediction
        return (w * F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))).mean()

    t0, step, t10 = time.time(), 0, 0.0
    budget = args.max_minutes * 60
    for step in range(args.steps):
        # with a time budget the schedule follows whichever ends first, steps or time
        progress = max(step / args.steps, (time.time() - t0) / budget if budget else 0.0)
        if progress >= 1:
            log(f"time budget of {args.max_minutes} min reached at step {step}")
            step -= 1
            break
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_factor(step, 500, progress)
        idx = torch.randint(len(lat), (args.batch_size,), device=device)
        try:
            opt.zero_grad(set_to_none=True)
            loss = step_loss(fwd, lat[idx], ids[idx])
            loss.backward()
        except Exception as e:  # noqa: BLE001 - any compiler failure: train eagerly instead
            if fwd is unet:
                raise
            log(f"torch.compile failed ({type(e).__name__}: {str(e)[:300]}); training eagerly")
            fwd = unet
            opt.zero_grad(set_to_none=True)
            loss = step_loss(fwd, lat[idx], ids[idx])
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(args.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - d)
        if step == 10:
            t10 = time.time()
        if step % args.log_every == 0 or step == args.steps - 1:
            rate = f", {(time.time() - t10) / (step - 10) * 1e3:.0f} ms/step" if step > 10 else ""
            log(f"unet step {step}/{args.steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s{rate})")
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    return unet.eval().requires_grad_(False), te.eval().requires_grad_(False), step + 1, time.time() - t0


@torch.no_grad()
def sample(pipe: StableDiffusionPipeline, prompts: list[str], steps: int, guidance: float, seed: int = 0,
           batch: int = 100) -> list[Image.Image]:
    """64 px images for the prompts, in chunks of `batch` (chunk i's generator seeded seed + i): the model
    card's evaluation, which scripts/train_shapes_student.py repeats for its students."""
    out = []
    for i in range(0, len(prompts), batch):
        g = torch.Generator(pipe.device).manual_seed(seed + i)
        out += pipe(prompts[i : i + batch], height=64, width=64, num_inference_steps=steps,
                    guidance_scale=guidance, generator=g).images
    return out


def grid(images: list[Image.Image], cols: int = 8, scale: int = 2) -> Image.Image:
    rows = math.ceil(len(images) / cols)
    g = Image.new("RGB", (cols * 64 * scale, rows * 64 * scale))
    for i, im in enumerate(images):
        g.paste(im.resize((64 * scale, 64 * scale), Image.NEAREST), ((i % cols) * 64 * scale, (i // cols) * 64 * scale))
    return g


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12000, help="U-Net + text encoder steps")
    ap.add_argument("--vae-steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--vae-batch-size", type=int, default=128)
    ap.add_argument("--init-vae", default=None, help="start from this VAE folder (an earlier run's vae/)")
    ap.add_argument("--resume", default=None,
                    help="continue from this pipeline folder (U-Net, text encoder and VAE); a run longer than one "
                         "session's GPU limit is several calls, each resuming the last")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="torch.compile the U-Net for training (falls back to eager)")
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--train-samples", type=int, default=50000)
    ap.add_argument("--eval-samples", type=int, default=500)
    ap.add_argument("--eval-steps", type=int, default=20, help="DDIM steps of the final evaluation")
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--max-minutes", type=float, default=0,
                    help="U-Net training time budget; the LR schedule ends with it (0: steps only)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=250)
    ap.add_argument("--out", default="models/assets/shapes-sd1")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.resume and not args.init_vae:
        args.init_vae = str(Path(args.resume) / "vae")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True  # fixed shapes
    t_start = time.time()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    log(f"device {device} ({gpu}), torch {torch.__version__}, args {vars(args)}")

    x, caps = dataset(args.train_samples, args.seed)
    log(f"dataset: {len(x)} images, {len(set(caps))} distinct captions")
    x = x.to(device)

    t_vae0 = time.time()
    vae = train_vae(x, args, device)
    t_vae1 = time.time()
    lat = encode_all(vae, x, device)
    scale = float(1.0 / lat.std())
    vae.register_to_config(scaling_factor=scale)
    lat = lat * scale
    log(f"latents {tuple(lat.shape)}, scaling_factor {scale:.4f}")
    del x

    out = Path(args.out)
    tokenizer = build_tokenizer(out / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")

    def tokenize(texts):
        return tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

    ids = tokenize(caps).to(device)
    empty_ids = tokenize([""]).to(device)
    unet, te, steps_done, unet_s = train_unet(lat, ids, empty_ids, args, device)
    vae_s = t_vae1 - t_vae0

    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, **SCHEDULE)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(out, safe_serialization=True)
    train_s = time.time() - t_start

    # the measure: generated samples against the same analyzer on dataset images (unseen seed)
    evals = list(shapes.generate(args.eval_samples, seed=10_000 + args.seed))
    ev_prompts = [s.caption for s in evals]
    data_acc = shapes.caption_accuracy([s.image for s in evals], ev_prompts)
    with torch.no_grad():
        xe = torch.stack([torch.from_numpy(np.array(s.image)).permute(2, 0, 1) for s in evals]).float() / 127.5 - 1
        recon = torch.cat([vae.decode(vae.encode(xe[i : i + 256].to(device)).latent_dist.mean).sample
                           for i in range(0, len(xe), 256)])
    vae_acc = shapes.caption_accuracy(to_pil(recon), ev_prompts)
    t0 = time.time()
    gen = sample(pipe.to(device), ev_prompts, args.eval_steps, args.guidance)
    gen_s = time.time() - t0
    gen_acc = shapes.caption_accuracy(gen, ev_prompts)
    grid(gen[:32]).save(out / "samples.png")
    size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    summary = {
        "device": gpu,
        "train_seconds": round(train_s, 1),
        "unet_seconds": round(unet_s, 1),
        "vae_seconds": round(vae_s, 1),
        "init_vae": args.init_vae,
        "resume": args.resume,
        "unet_steps": steps_done,
        "vae_steps": args.vae_steps,
        "batch_size": args.batch_size,
        "vae_batch_size": args.vae_batch_size,
        "train_samples": args.train_samples,
        "params": {"unet": sum(p.numel() for p in unet.parameters()),
                   "vae": sum(p.numel() for p in vae.parameters()),
                   "text_encoder": sum(p.numel() for p in te.parameters())},
        "folder_mb": round(size_mb, 2),
        "eval": {"samples": args.eval_samples, "seed": 10_000 + args.seed, "ddim_steps": args.eval_steps,
                 "guidance": args.guidance, "generate_seconds": round(gen_s, 1)},
        "caption_accuracy": {"generated": gen_acc, "dataset": data_acc, "vae_reconstruction": vae_acc},
        "command": "python scripts/train_shapes_teacher.py " + " ".join(sys.argv[1:]),
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    log("caption accuracy, generated: " + json.dumps(gen_acc))
    log("caption accuracy, dataset:   " + json.dumps(data_acc))
    log("caption accuracy, VAE recon: " + json.dumps(vae_acc))
    log(f"saved {out} ({size_mb:.1f} MB), total {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
