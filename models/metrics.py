"""The evaluation's metric functions, free of pipelines, Ray and MLflow: pixel and latent fidelity (PSNR,
SSIM, MSE), feature cosine similarity, MACs (torch's FLOP counter), latency (median of repeats after a
warm-up, CUDA events on a GPU), FID/KID/IS through torch-fidelity, and the CLIP score.

Images are float tensors (N, 3, H, W) in [0, 1] or PIL images. torch-fidelity's Inception weights are
downloaded by default; `resolve_feature_extractor` also takes a local weights file (or s3:// URI), or
"builtin:tiny", a small fixed random conv net made here, so everything runs offline (tests, the demo).
Its numbers are only comparable with other numbers from the same extractor. Likewise "builtin:tiny-clip"
is a tiny untrained CLIP built here for the CLIP score's plumbing, not for its value.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

# ---------------------------------------------------------------------------------------------- images


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images (same size) -> (N, 3, H, W) float in [0, 1]."""
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def fit_image(im: Image.Image, size: int) -> Image.Image:
    """Center-crop to a square and resize to size x size (reference images of any shape)."""
    im = im.convert("RGB")
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    im = im.crop((left, top, left + s, top + s))
    return im if s == size else im.resize((size, size), Image.Resampling.BICUBIC)


# -------------------------------------------------------------------------------------------- fidelity


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.mse_loss(a.double(), b.double()))


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """PSNR in dB from the mean squared error over all pixels of all images; inf for identical images."""
    err = mse(a, b)
    return math.inf if err == 0 else 10.0 * math.log10(data_range**2 / err)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] @ g[None, :]  # (size, size)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1=0.01, K2=0.03) per channel,
    over valid windows, averaged over images; 1.0 for identical images."""
    a, b = a.double(), b.double()
    c = a.shape[1]
    size = min(11, a.shape[-1], a.shape[-2])
    win = _gaussian_window(size).to(a.device).expand(c, 1, size, size)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, win, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def cosine_per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each sample's flattened features: (N, ...) x (N, ...) -> (N,)."""
    return F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1)


def pooled(features: torch.Tensor, max_side: int = 8) -> torch.Tensor:
    """(N, C, H, W) -> (N, C * h * w) with h, w <= max_side (average pooling), for PCA/t-SNE; other
    shapes are flattened."""
    if features.dim() == 4 and max(features.shape[-2:]) > max_side:
        features = F.adaptive_avg_pool2d(features.float(), (min(max_side, features.shape[-2]),
                                                            min(max_side, features.shape[-1])))
    return features.flatten(1).float().cpu()


# ------------------------------------------------------------------------------------------ speed, size


def unet_inputs(config: Any, batch: int, height: int, width: int, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, text_len: int = 77) -> tuple[tuple, dict]:
    """Random (args, kwargs) for one UNet2DConditionModel forward: latents (B, C, h, w) at latent size
    h x w, a timestep and the conditioning its config asks for (SDXL: pooled text + time ids; a U-Net
    with `time_cond_proj_dim`, which takes the guidance weight w as an input: the w-embedding)."""
    cfg = dict(config)
    kw: dict[str, Any] = {"dtype": dtype, "device": device}
    sample = torch.randn(batch, cfg["in_channels"], height, width, **kw)
    t = torch.full((batch,), 500, device=device, dtype=torch.long)
    cross = cfg["cross_attention_dim"]
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    kwargs: dict[str, Any] = {"encoder_hidden_states": torch.randn(batch, text_len, cross, **kw)}
    if cfg.get("addition_embed_type") == "text_time":
        n_time = 6
        pooled_dim = cfg["projection_class_embeddings_input_dim"] - n_time * cfg["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled_dim, **kw),
                                       "time_ids": torch.randn(batch, n_time, **kw).abs() * 512}
    if cfg.get("time_cond_proj_dim") is not None:  # step-distilled guided/consistency students
        kwargs["timestep_cond"] = torch.randn(batch, cfg["time_cond_proj_dim"], **kw)
    return (sample, t), kwargs


def unet_macs(config: Any, height: int, width: int) -> int:
    """MACs of one UNet2DConditionModel forward at batch 1 and latent size height x width (the inputs of
    `unet_inputs`), counted on the meta device: no weights, no compute. `config` may leave out what the
    model's defaults fill in."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        meta = UNet2DConditionModel.from_config({k: v for k, v in dict(config).items() if not k.startswith("_")})
    args, kwargs = unet_inputs(meta.config, 1, height, width, device="meta")
    return count_macs(lambda: meta(*args, **kwargs))


def count_macs(fn: Callable[[], Any]) -> int:
    """Multiply-accumulates of one call of fn, from torch's FLOP counter (FLOPs / 2). Works on the meta
    device, so a full-size U-Net is counted without weights or compute."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops() // 2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1,
                    device: str | torch.device = "cpu") -> list[float]:
    """Wall time of fn in milliseconds, `repeats` times after `warmup` untimed calls. On CUDA each call is
    bracketed by CUDA events (after a synchronize), so queued kernels are counted, not just launches."""
    device = torch.device(device)
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        _sync(device)
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1000.0)
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


# ----------------------------------------------------------------------------------- FID / KID / IS

TINY_EXTRACTOR = "distillery-tiny"


def _tiny_extractor_class() -> type:
    from torch_fidelity import FeatureExtractorBase

    class TinyFeatureExtractor(FeatureExtractorBase):
        """A fixed random conv net (seeded, no training): 64-d pooled features for FID/KID, 10 logits
        for IS. Offline stand-in for Inception in tests and the demo."""

        SIZE = 64

        def __init__(self, name: str, features_list: list[str], **kwargs: Any):
            super().__init__(name, features_list)
            g = torch.Generator().manual_seed(0)
            chans = [3, 16, 32, 64]
            layers: list[nn.Module] = []
            for cin, cout in zip(chans[:-1], chans[1:]):
                conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
                with torch.no_grad():
                    conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * math.sqrt(2 / (cin * 9)))
                    conv.bias.zero_()
                layers += [conv, nn.ReLU()]
            self.net = nn.Sequential(*layers)
            self.fc = nn.Linear(64, 10)
            with torch.no_grad():
                self.fc.weight.copy_(torch.randn(self.fc.weight.shape, generator=g) * 4)  # logits that vary
                self.fc.bias.zero_()
            self.requires_grad_(False).eval()

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
                raise ValueError(f"expected uint8 images (N, 3, H, W), got {x.dtype} {tuple(x.shape)}")
            x = F.interpolate(x.float(), size=(self.SIZE, self.SIZE), mode="bilinear", antialias=True,
                              align_corners=False) / 127.5 - 1.0
            feat = self.net(x).mean(dim=(2, 3))  # (N, 64)
            out = {"64": feat, "logits_unbiased": self.fc(feat)}
            return tuple(out[name] for name in self.features_list)

        @staticmethod
        def get_provided_features_list() -> tuple[str, ...]:
            return "64", "logits_unbiased"

        @staticmethod
        def get_default_feature_layer_for_metric(metric: str) -> str:
            return {"isc": "logits_unbiased", "fid": "64", "kid": "64", "prc": "64"}[metric]

        @staticmethod
        def can_be_compiled() -> bool:
            return False

        @staticmethod
        def get_dummy_input_for_compile() -> torch.Tensor:
            return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    return TinyFeatureExtractor


def register_tiny_extractor() -> str:
    """Register the tiny extractor with torch-fidelity once per process; returns its name."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if TINY_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(TINY_EXTRACTOR, _tiny_extractor_class())
    return TINY_EXTRACTOR


def resolve_feature_extractor(spec: str | None) -> dict[str, Any]:
    """torch-fidelity keyword arguments for evaluate.feature_extractor: None (Inception, downloaded by
    torch-fidelity), "builtin:tiny", or a local path / remote URI of inception-v3-compat weights."""
    if spec is None:
        return {"feature_extractor": "inception-v3-compat"}
    if spec == "builtin:tiny":
        return {"feature_extractor": register_tiny_extractor()}
    if spec.startswith("builtin:"):
        raise ValueError(f"evaluate.feature_extractor {spec!r}: unknown builtin; the only one is builtin:tiny")
    if "://" in spec and not spec.startswith("file://"):
        raise ValueError(f"evaluate.feature_extractor {spec!r}: a remote file; fetch it first (pipelines.storage."
                         "local_copy)")
    path = spec.removeprefix("file://")
    if not Path(path).is_file():
        raise FileNotFoundError(f"evaluate.feature_extractor {spec!r}: no such weights file")
    return {"feature_extractor": "inception-v3-compat", "feature_extractor_weights_path": path}


class _Uint8Images(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor):
        self.images = (images.clamp(0, 1) * 255).round().to(torch.uint8)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def fidelity_metrics(images: torch.Tensor, reference: torch.Tensor | None, extractor: dict[str, Any],
                     isc: bool = True, kid: bool = True, device: str | torch.device = "cpu",
                     batch_size: int = 64) -> dict[str, float]:
    """FID (and KID, IS) of `images` against `reference` with torch-fidelity: {fid, kid_mean, kid_std,
    is_mean, is_std}. Images: (N, 3, H, W) in [0, 1]; the two sets may have different sizes. KID's subset
    size shrinks to fit small sets; IS uses one split per 100 images (at most 10, the usual count), so
    a small set is scored whole rather than in splits of a few images (whose scores are all ~1)."""
    import torch_fidelity

    n1 = len(images)
    n2 = len(reference) if reference is not None else 0
    if n1 < 2 or (reference is not None and n2 < 2):
        raise ValueError(f"FID needs at least 2 images on each side (got {n1} and {n2})")
    kw: dict[str, Any] = dict(
        input1=_Uint8Images(images), cuda=torch.device(device).type == "cuda", batch_size=batch_size,
        fid=reference is not None, kid=kid and reference is not None, isc=isc, verbose=False, cache=False,
        save_cpu_ram=True,  # no DataLoader worker processes for a few hundred images
        isc_splits=max(1, min(10, n1 // 100)), kid_subset_size=min(1000, n1, n2 or n1), **extractor,
    )
    if reference is not None:
        kw["input2"] = _Uint8Images(reference)
    raw = torch_fidelity.calculate_metrics(**kw)
    names = {"frechet_inception_distance": "fid", "kernel_inception_distance_mean": "kid_mean",
             "kernel_inception_distance_std": "kid_std", "inception_score_mean": "is_mean",
             "inception_score_std": "is_std"}
    return {names[k]: float(v) for k, v in raw.items() if k in names}


# ------------------------------------------------------------------------------------------ CLIP score

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalization
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def tiny_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny untrained CLIPModel + tokenizer saved as a transformers folder (tests, the offline demo)."""
    from transformers import CLIPConfig, CLIPModel

    from models.tiny import build_tokenizer

    torch.manual_seed(seed)
    text = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    out = Path(out_dir)
    model.save_pretrained(out)
    build_tokenizer(out)
    return out


def resolve_clip(spec: str) -> str:
    """A folder or hub id for CLIPModel.from_pretrained: builtin:tiny-clip is built once into the cache; local
    folders and hub ids pass through (s3://: pipelines.storage.model_dir first)."""
    from models.local_cache import build_once, cache_root
    from models.teacher import resolve_model_dir

    if spec == "builtin:tiny-clip":
        dest = cache_root() / "builtin" / "tiny-clip"
        return str(build_once(dest, tiny_clip, done=lambda d: (d / "config.json").exists()))
    if spec.startswith("builtin:"):
        raise ValueError(f"evaluate.clip_model {spec!r}: unknown builtin; the only one is builtin:tiny-clip")
    return resolve_model_dir(spec)


def load_clip(spec: str, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    from transformers import AutoTokenizer, CLIPModel

    path = resolve_clip(spec)
    try:
        model = CLIPModel.from_pretrained(path).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise FileNotFoundError(f"evaluate.clip_model {spec!r}: not a CLIP model folder or hub id ({err})") from None
    return model, tokenizer


@torch.no_grad()
def clip_score(images: torch.Tensor, prompts: list[str], model: Any, tokenizer: Any,
               batch_size: int = 32) -> float:
    """CLIP score: 100 * max(cos(image embedding, text embedding), 0), averaged over image/prompt pairs
    (Hessel et al. 2021, as torchmetrics computes it). Images (N, 3, H, W) in [0, 1]."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    device = next(model.parameters()).device
    size = model.config.vision_config.image_size
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
    scores = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device).float()
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        ids = tokenizer(prompts[i : i + batch_size], padding="max_length", truncation=True,
                        max_length=min(77, model.config.text_config.max_position_embeddings), return_tensors="pt")
        out = model(input_ids=ids.input_ids.to(device), attention_mask=ids.attention_mask.to(device),
                    pixel_values=(x - mean) / std)
        cos = F.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
        scores.append((100.0 * cos.clamp(min=0)).cpu())
    return float(torch.cat(scores).mean())
