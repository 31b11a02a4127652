"""Generation from a diffusers pipeline folder, shared by the serving stage (serving/app.py), the registered MLflow
pyfunc model (pipelines/register.py) and the benchmarks: one image per job, each with its own seeded generator, PNG
bytes out. Plain diffusers: no MLflow, no Ray, no server, so a folder can be served, registered or benchmarked with
none of them."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

# zlib level of the PNGs (lossless at any level): 1 encodes several times faster than PIL's default 6 for a few %
# more bytes (bench/RESULTS.md, Serving); serve.png_compress_level defaults to it
PNG_LEVEL = 1


@dataclass(frozen=True)
class ImageJob:
    """One image to generate. Jobs with the same `settings` run in one pipeline call."""

    prompt: str
    negative_prompt: str = ""
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    seed: int = 0
    width: int = 64
    height: int = 64

    @property
    def settings(self) -> tuple[int, int, int, float]:
        return (self.width, self.height, self.num_inference_steps, self.guidance_scale)


def load_pipeline(folder: str, device: str = "cpu", decoder: str | None = None):
    """A diffusers pipeline from a folder (or anything models.teacher.resolve_model_dir accepts); with `decoder`
    (models.teacher.load_decoder: TAESD or another VAE) decoding with that instead of the folder's VAE."""
    import torch
    from diffusers import DiffusionPipeline

    from models.teacher import load_decoder, resolve_model_dir, swap_decoder

    src = resolve_model_dir(folder)
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").lower() in ("1", "true", "yes"):
        import diffusers.utils.logging

        diffusers.utils.logging.disable_progress_bar()  # diffusers' loading bar does not read the variable itself
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    # fp16 on GPU: the SDXL pipelines upcast their VAE themselves where its config says force_upcast
    pipe = DiffusionPipeline.from_pretrained(src, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if decoder:
        swap_decoder(pipe, load_decoder(decoder, dtype), decoder)
    return pipe


def decode_latents(vae: Any, latents: Any, batch_size: int = 8) -> Any:
    """Unscaled VAE latents (N, 4, h, w) -> images (N, 3, H, W) in [0, 1], float32 on the CPU: the one decoding
    path of the training stages' sample grids and the evaluate stage."""
    import torch

    out = []
    device = next(vae.parameters()).device
    with torch.no_grad():
        for i in range(0, len(latents), batch_size):
            x = vae.decode(latents[i : i + batch_size].to(device, vae.dtype)).sample
            out.append(((x.float() + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(out)


PHASES = ("prep_ms", "denoise_ms", "decode_ms", "to_pil_ms")


class _Clock:
    """Marks on the device's timeline: CUDA events on a GPU (no sync: read once the call has synced at its end),
    perf_counter elsewhere."""

    def __init__(self, device: Any):
        import torch

        self.cuda = torch.device(device).type == "cuda"

    def mark(self) -> Any:
        import torch

        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def ms(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) if self.cuda else 1000 * (b - a)

    def wait(self, mark: Any) -> None:
        if self.cuda:
            mark.synchronize()


def render_images(pipe: Any, jobs: list[ImageJob], batch_sizes: list[int] | None = None,
                  phases: dict[str, float] | None = None, on_denoise: Callable[[], None] | None = None,
                  pil: bool = True) -> list[Any]:
    """PIL images for each job, in order (with `pil` False: (H, W, C) uint8 arrays, the same pixels). Jobs are
    grouped by settings (size, steps, guidance) so a batch mixing settings is split into one pipeline call per
    group; each image has its own seeded generator, so an image depends on its own seed only, not on what it was
    batched with. With `batch_sizes` (a compiled U-Net's warmed-up batches, CompiledUNet), a group is padded with
    copies of its last job up to the smallest of them that holds it, and the copies are dropped. With `phases` (a
    dict), adds where the calls' time went, in ms (PHASES), which together make up the calls: prep (text encoder,
    latents: the call's start to the first U-Net forward), denoise (from there to the last step's end) and decode
    (to the decoded images), on the device's timeline; to_pil (the images to PIL) on the CPU. `on_denoise` is
    called, on the calling thread, as the first U-Net forward is launched (the call's CPU-bound start is over)."""
    import inspect

    import torch

    out: list[Any] = [None] * len(jobs)
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(job.settings, []).append(i)
    device = getattr(pipe, "device", torch.device("cpu"))
    gen_device = "cpu" if torch.device(device).type == "mps" else device
    clock = _Clock(device) if phases is not None else None
    unet = getattr(pipe, "unet", None)
    hookable = isinstance(unet, torch.nn.Module)  # its first forward marks the end of prep
    timed = clock is not None and hookable and "callback_on_step_end" in inspect.signature(pipe.__call__).parameters
    for (width, height, steps, guidance), idx in groups.items():
        fits = [b for b in batch_sizes or () if b >= len(idx)]
        idx_padded = idx + [idx[-1]] * (min(fits) - len(idx)) if fits else idx
        gens = [torch.Generator(device=gen_device).manual_seed(jobs[i].seed) for i in idx_padded]
        first: list[Any] = []  # the first U-Net forward's start
        last: list[Any] = []  # each step's end (the last one counts)
        extra = ({"callback_on_step_end": lambda _p, _i, _t, kw, last=last: last.append(clock.mark()) or kw}
                 if timed else {})

        def first_forward(*_: Any, first: list[Any] = first) -> None:
            if not first:
                first.append(clock.mark() if timed else None)
                if on_denoise is not None:
                    on_denoise()

        hook = unet.register_forward_pre_hook(first_forward) if hookable and (timed or on_denoise) else None
        start = clock.mark() if timed else None
        try:
            with torch.inference_mode():
                # "pt" then PIL here, as the pipeline's own "pil" output does it, so the conversion can be timed
                decoded = pipe(
                    prompt=[jobs[i].prompt for i in idx_padded],
                    negative_prompt=[jobs[i].negative_prompt for i in idx_padded],
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    width=width,
                    height=height,
                    generator=gens,
                    output_type="pt",
                    **extra,
                ).images  # (B, 3, H, W) in [0, 1], on the device
                end = clock.mark() if timed else None
                if timed:
                    clock.wait(end)  # the copy to the CPU below would wait for the decoder anyway: not to_pil's time
                t_pil = time.perf_counter()
                images = pixels_to_pil(decoded) if pil else list(pixels_uint8(decoded))
        finally:
            if hook is not None:
                hook.remove()
        if timed and first and last:
            for key, ms in (("prep_ms", clock.ms(start, first[0])), ("denoise_ms", clock.ms(first[0], last[-1])),
                            ("decode_ms", clock.ms(last[-1], end)),
                            ("to_pil_ms", 1000 * (time.perf_counter() - t_pil))):
                phases[key] = phases.get(key, 0.0) + ms
        for i, img in zip(idx, images):
            out[i] = img
    return out


def pixels_uint8(images: Any) -> Any:
    """A (B, C, H, W) batch in [0, 1] as a (B, H, W, C) uint8 numpy array: the bits diffusers' numpy_to_pil gives
    (x 255, round half to even, in float32), but made 8-bit on the tensor's device, so a batch crosses to the CPU as
    uint8 (a quarter of the bytes) and the CPU does no float work per pixel."""
    import torch

    pixels = (images.float() * 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # (B, H, W, C), contiguous on the device


def array_to_pil(pixels: Any) -> Any:
    """A PIL image of (H, W, C) uint8 pixels (one channel: mode "L")."""
    from PIL import Image

    return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


def pixels_to_pil(images: Any) -> list[Any]:
    """PIL images of a (B, C, H, W) batch in [0, 1] (pixels_uint8)."""
    return [array_to_pil(p) for p in pixels_uint8(images)]


class CompiledUNet:
    """`pipe.unet`'s forward through torch.compile, for the input shapes seen while `capturing` only (a
    replica's warm-up): any other shape runs the eager forward, so a request never waits minutes for a new
    graph. With compile modes reduce-overhead and max-autotune on CUDA the graphs replay as CUDA graphs (a
    few-step student at batch 1 is launch-bound). `eager_calls` counts the forwards that fell back."""

    def __init__(self, unet: Any, mode: str = "reduce-overhead"):
        import torch

        self.eager = unet.forward
        self.compiled = torch.compile(self.eager, mode=mode, dynamic=False)
        self.cudagraphs = mode in ("reduce-overhead", "max-autotune") and unet.device.type == "cuda"
        self.shapes: set[tuple[int, ...]] = set()
        self.capturing = True
        self.eager_calls = 0
        unet.forward = self  # the pipeline keeps calling its own unet (config, dtype, hooks unchanged)

    def __call__(self, sample: Any, *args: Any, **kwargs: Any) -> Any:
        import torch

        key = tuple(sample.shape)
        if self.capturing:
            self.shapes.add(key)
        elif key not in self.shapes:
            self.eager_calls += 1
            return self.eager(sample, *args, **kwargs)
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous call's output has been used
        return self.compiled(sample, *args, **kwargs)


def compile_unet(pipe: Any, mode: str, sizes: list[tuple[int, int]], batches: list[int], guidance_scale: float,
                 run: Any = None) -> CompiledUNet:
    """`pipe.unet` as a CompiledUNet warmed up for every (width, height) in `sizes` at every batch size in `batches`
    (serve.compile's replica start, and the benchmarks' compiled references); other shapes then run eager. `run(fn,
    *args)` makes each warm-up call (a replica: on the one thread that later replays the graphs); default: here."""
    compiled = CompiledUNet(pipe.unet, mode)
    for width, height in sizes:
        for n in batches:  # 3 steps: CUDA graph trees record on a shape's second or third call
            jobs = [ImageJob("warm up", num_inference_steps=3, width=width, height=height,
                             guidance_scale=guidance_scale)] * n
            if run is None:
                render_images(pipe, jobs)
            else:
                run(render_images, pipe, jobs)
    compiled.capturing = False
    return compiled


def generate_images(pipe: Any, jobs: list[ImageJob], png_level: int = PNG_LEVEL,
                    batch_sizes: list[int] | None = None) -> list[bytes]:
    """PNG bytes for each job, in order (render_images with `batch_sizes`, then encode_png on up to 8 threads:
    zlib releases the GIL)."""
    images = render_images(pipe, jobs, batch_sizes)
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(images)))) as pool:
        return list(pool.map(lambda img: encode_png(img, png_level), images))


def encode_image(img: Any, output_format: str = "png", png_level: int = PNG_LEVEL, quality: int | None = None) -> bytes:
    """The image as `output_format` bytes: lossless PNG at zlib `png_level`, or JPEG/WebP at `quality` (0-100;
    None: 100, the OpenAI images API's default)."""
    if output_format == "png":
        return encode_png(img, png_level)
    if output_format not in ("jpeg", "webp"):
        raise ValueError(f"output_format {output_format!r}: png, jpeg or webp")
    quality = 100 if quality is None else quality
    if output_format == "jpeg":
        # simplejpeg (libjpeg-turbo) lets go of the GIL while it encodes; PIL's JPEG encoder holds it throughout, and
        # in a replica that starved the pipeline thread, which needs the GIL back after every torch op
        # (bench/RESULTS.md). 4:2:0 chroma as PIL's default; quality 0 is libjpeg's 1
        import numpy as np
        import simplejpeg

        rgb = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))  # (H, W, 3) uint8
        return simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), quality=max(1, quality), colorspace="RGB",
                                      colorsubsampling="420")
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format=output_format.upper(), quality=quality)
    return buf.getvalue()


def encode_png(img: Any, level: int = PNG_LEVEL) -> bytes:
    """Lossless PNG at zlib `level` (PNG_LEVEL: see there)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=level)
    return buf.getvalue()
