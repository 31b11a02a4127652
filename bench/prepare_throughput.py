"""Data-stage throughput against plain references, measured in the same run (not a test).

cpu:  images/s per CPU core for decode + resize + crop (pipelines.prepare.process_row) through Ray Data
      (read_binary_files → map_batches, num_cpus cores) against a plain PIL loop over the same files on one
      core. Goal: Ray's overhead per core ≤ 10%.
vae:  latents/s of the whole data stage (pipelines.prepare.run: read, decode, resize, encode, write parquet)
      against a plain diffusers loop calling vae.encode on ready tensors of the same batch size.
      Goal: ≥ 0.9× of the loop. --vae full builds a full-size SD VAE (random weights, from its config: no
      network); --vae tiny uses the builtin tiny one (a smoke run on CPU).

    python bench/prepare_throughput.py --part cpu --images 400 --num-cpus 2
    python bench/prepare_throughput.py --part vae --device cuda --resolution 512 --vae full --images 512

Appends a line per measurement to bench/RESULTS.md (section "Data") unless --no-write.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.config import parse_config  # noqa: E402
from pipelines.student_cli import SD15_VAE  # noqa: E402


def make_images(folder: Path, n: int, size: tuple[int, int]) -> None:
    """n photo-like JPEGs (smooth gradients + noise) with caption sidecars."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        base = (np.sin(xx / (20 + i % 7)) + np.cos(yy / (15 + i % 5)))[..., None] * 60 + rng.integers(60, 190, 3)
        a = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "JPEG", quality=90)
        (folder / f"img{i:05d}.jpg").write_bytes(buf.getvalue())
        (folder / f"img{i:05d}.txt").write_text(f"a photo number {i}")


def bench_cpu(args, tmp: Path) -> list[str]:
    import ray

    from pipelines import prepare

    folder = tmp / "images"
    make_images(folder, args.images, (args.width, args.height))
    cfg = parse_config({"data": {"resolution": args.resolution, "source": str(folder)}}).data
    files = sorted(str(p) for p in folder.glob("*.jpg"))

    def rows_of(paths: list[str]) -> int:
        n = 0
        for p in paths:
            out = prepare.process_row({"key": p, "image": Path(p).read_bytes(), "caption": "a photo"}, cfg)
            n += not out["skip"]
        return n

    rows_of(files[:8])  # warm up imports and caches
    t = time.perf_counter()
    assert rows_of(files) == len(files)
    pil_rate = len(files) / (time.perf_counter() - t)

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)

    def batch_fn(batch: dict) -> dict:
        out = [prepare.process_row({"key": p, "image": b, "caption": "a photo"}, cfg)
               for p, b in zip(batch["path"], batch["bytes"])]
        return {"ok": [not o["skip"] for o in out], "pixels": [o["pixels"] for o in out]}

    def run_ray() -> float:
        ds = ray.data.read_binary_files(files, include_paths=True, override_num_blocks=4 * args.num_cpus)
        ds = ds.map_batches(batch_fn, batch_size=64)
        t = time.perf_counter()
        n = sum(int(b["ok"].sum()) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))
        assert n == len(files)
        return len(files) / (time.perf_counter() - t)

    run_ray()  # warm up the workers
    ray_rate = run_ray()
    ray.shutdown()
    per_core = ray_rate / args.num_cpus
    overhead = 1 - per_core / pil_rate
    return [
        f"decode+resize+crop {args.width}x{args.height} JPEG → {args.resolution}px, {len(files)} images: "
        f"PIL loop {pil_rate:.1f} img/s (1 core); Ray Data {ray_rate:.1f} img/s on {args.num_cpus} cores = "
        f"{per_core:.1f} img/s/core; overhead per core {overhead:+.1%} (goal ≤ 10%)"
    ]


def bench_vae(args, tmp: Path) -> list[str]:
    import torch
    from diffusers import AutoencoderKL

    from models.tiny import tiny_sd1_pipeline
    from pipelines import prepare

    pipe = tiny_sd1_pipeline()
    if args.vae == "full":
        torch.manual_seed(0)
        pipe.register_modules(vae=AutoencoderKL(**SD15_VAE))
    teacher = tmp / "teacher"
    pipe.save_pretrained(teacher)
    vae = AutoencoderKL.from_pretrained(teacher, subfolder="vae").to(args.device).eval()
    bs, r = args.batch_size, args.resolution

    # reference: a plain diffusers loop on ready tensors (no decoding, no writing): the upper bound
    x = torch.rand(bs, 3, r, r, device=args.device) * 2 - 1
    with torch.no_grad():
        vae.encode(x)
        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        steps = max(1, args.images // bs)
        for _ in range(steps):
            vae.encode(x).latent_dist.mean.cpu()
        sync()
    loop_rate = steps * bs / (time.perf_counter() - t)
    del vae

    folder = tmp / "images"
    make_images(folder, args.images, (args.width, args.height))
    cfg = parse_config({
        "teacher": {"uri": str(teacher), "dtype": "float32"},
        "ray": {"num_cpus": args.num_cpus, **({"num_gpus": 1} if args.device == "cuda" else {})},
        "data": {"source": str(folder), "output": str(tmp / "cache"), "resolution": r, "dedup": False,
                 "val_fraction": 0.0, "embed_batch_size": bs, "rows_per_file": 8 * bs,
                 "embed_num_gpus": 1 if args.device == "cuda" else 0},
    })
    from pipelines.storage import ensure_ray

    ensure_ray(cfg)
    t = time.perf_counter()
    result = prepare.run(cfg)
    stage_rate = result["rows"]["train"] / (time.perf_counter() - t)
    return [
        f"VAE encode {r}px ({args.vae} VAE, batch {bs}, {args.device}): diffusers loop {loop_rate:.1f} latents/s; "
        f"whole stage (read+decode+resize+encode+write, {args.images} {args.width}x{args.height} JPEGs, "
        f"incl. actor start) {stage_rate:.1f} latents/s = {stage_rate / loop_rate:.2f}× (goal ≥ 0.9×)"
    ]


def hardware(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    hw = f"{os.cpu_count()} logical CPUs ({cpu}), load average {os.getloadavg()[0]:.1f}"
    if device == "cuda":
        import torch

        hw += f", GPU {torch.cuda.get_device_name()}"
    return hw


def write_results(lines: list[str], args) -> None:
    path = Path(__file__).parent / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if "\n## Data\n" not in text:
        text += "\n## Data\n"
    heading = f"### prepare_throughput --part {args.part}"
    entry = [f"- {time.strftime('%Y-%m-%d')}: {line}" for line in lines]
    entry.append(f"  hardware: {hardware(args.device)}; command: `python {' '.join(sys.argv)}`")
    if heading in text:  # keep one heading per benchmark, newest entries last
        text = text.replace(heading + "\n", heading + "\n" + "\n".join(entry) + "\n", 1)
    else:
        text = text.rstrip("\n") + f"\n\n{heading}\n" + "\n".join(entry) + "\n"
    path.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["cpu", "vae"], default="cpu")
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--vae", choices=["full", "tiny"], default="tiny")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    os.environ.setdefault("DISTILLERY_CACHE", str(tmp / "models"))
    try:
        lines = bench_cpu(args, tmp) if args.part == "cpu" else bench_vae(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for line in lines:
        print(line)
    if not args.no_write:
        write_results(lines, args)


if __name__ == "__main__":
    main()
