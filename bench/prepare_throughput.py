"""Data-stage throughput against plain references, measured in the same run (issue 3; not a test).

cpu:  decode + resize + crop (pipelines.prepare.process_row) of JPEG photos, per CPU core: Ray Data
      (read_binary_files → map_batches, Ray started with N CPUs) against the plain PIL loop run by N
      processes (a multiprocessing pool, each process looping over its share of the files). Both do the
      same per-image work and keep no pixels (Ray returns a byte count per image, as the loop does).
      Ray is timed twice (cold: worker start-up included; warm) and reported two ways: end to end
      (from the start of execution to the last output block) and steady state (the rows that arrive
      after the first wave of blocks, one per worker, over the time from that wave to the last block:
      start-up excluded). Goal: Ray's overhead per core ≤ 10%.
vae:  latents/s of the whole data stage (pipelines.prepare.run: read, decode, resize, crop, VAE + text
      encode, write parquet) against a plain diffusers loop (vae.encode + text_encoder on ready GPU tensors
      of the same batch size and dtype). The stage is reported end to end (prepare.run's wall time: actor
      start and model loading included) and steady state (from the parquet files' times: the rows written
      after each actor's first file, over the time from then to the last file). Goal: ≥ 0.9× of the loop.
      --vae full: SD 1.5's VAE and CLIP text encoder from their configs (random weights, no network);
      --vae tiny: the builtin tiny ones (a CPU smoke run).

The stage runs with its own config knobs, set here for one GPU: ray.num_cpus = --num-cpus (CPU decode
tasks, one per core), data.embed_batch_size = --batch-size (the model batch, also the loop's),
data.embed_concurrency = --actors GPU actors sharing the GPU (data.embed_num_gpus = 1/actors) so one
encodes while another receives or writes, data.rows_per_file = --rows-per-file (one actor call).

    python bench/prepare_throughput.py --device cuda --append-results bench/RESULTS.md   # both parts, GPU machine
    python bench/prepare_throughput.py --part cpu --num-cpus 2 --images 200              # CPU smoke run
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import append_to_section, interrupt_once  # noqa: E402
from pipelines.config import parse_config  # noqa: E402
from pipelines.student_cli import SD15_TEXT, SD15_VAE  # noqa: E402

SECTION = "## Data"


# ----------------------------------------------------------------------------------------------- images


def _make_chunk(job: tuple) -> int:
    """Photo-like JPEGs (smooth gradients + mild noise, each one different) with caption sidecars."""
    folder, start, stop, w, h = job
    rng = np.random.default_rng(start)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(start, stop):
        fx, fy = 20 + i % 7, 15 + i % 5
        base = (np.sin(xx / fx + i) + np.cos(yy / fy - i))[..., None] * 60 + rng.integers(60, 190, 3)
        a = np.clip(base + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "JPEG", quality=90)
        (Path(folder) / f"img{i:06d}.jpg").write_bytes(buf.getvalue())
        (Path(folder) / f"img{i:06d}.txt").write_text(f"a photo number {i} of a colorful pattern")
    return stop - start


def make_images(folder: Path, n: int, size: tuple[int, int], procs: int) -> float:
    """n JPEGs made by `procs` processes; returns the seconds it took."""
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    step = max(1, -(-n // (procs * 4)))
    jobs = [(str(folder), s, min(n, s + step), *size) for s in range(0, n, step)]
    with mp.get_context("fork").Pool(procs) as pool:
        assert sum(pool.map(_make_chunk, jobs)) == n
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------- cpu part

_CFG = None


def _pil_init(cfg) -> None:
    global _CFG
    _CFG = cfg


def _pil_chunk(paths: list[str]) -> tuple[int, int, float]:
    """The plain loop on one process: (images kept, pixel bytes, seconds)."""
    from pipelines.prepare import process_row

    t0 = time.perf_counter()
    n = nbytes = 0
    for p in paths:
        out = process_row({"key": p, "image": Path(p).read_bytes(), "caption": "a photo"}, _CFG)
        n += not out["skip"]
        nbytes += len(out["pixels"])
    return n, nbytes, time.perf_counter() - t0


def pil_reference(items: list[str], cfg, procs: int) -> dict:
    """N processes, each looping over its 1/N of the items; the pool is started and warmed first."""
    chunks = [items[i::procs] for i in range(procs)]
    with mp.get_context("fork").Pool(procs, initializer=_pil_init, initargs=(cfg,)) as pool:
        pool.map(_pil_chunk, [c[:4] for c in chunks])  # imports and first-call costs, in every process
        t0 = time.perf_counter()
        parts = pool.map(_pil_chunk, chunks, chunksize=1)
        wall = time.perf_counter() - t0
    n = sum(p[0] for p in parts)
    assert n == len(items), f"the PIL loop kept {n} of {len(items)} images"
    per_proc = [len(c) / p[2] for c, p in zip(chunks, parts)]
    return {"rate": n / wall, "per_core": n / wall / procs, "per_proc_median": statistics.median(per_proc),
            "wall": wall}


def ray_run(items: list[str], cfg, procs: int) -> dict:
    """One Ray Data pass: end-to-end and steady-state rates from the driver's block arrival times."""
    import ray

    from pipelines.prepare import process_row

    def batch_fn(batch: dict) -> dict:
        out = [process_row({"key": p, "image": b, "caption": "a photo"}, cfg)
               for p, b in zip(batch["path"], batch["bytes"])]
        return {"ok": np.array([not o["skip"] for o in out]), "nbytes": np.array([len(o["pixels"]) for o in out])}

    blocks = max(4 * procs, len(items) // 64)
    ds = ray.data.read_binary_files(items, include_paths=True, override_num_blocks=blocks)
    ds = ds.map_batches(batch_fn, batch_size=64, batch_format="numpy")
    t0 = time.perf_counter()
    arrivals = []
    n = 0
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        k = int(b["ok"].sum())
        n += k
        arrivals.append((time.perf_counter(), len(b["ok"])))
    end = time.perf_counter()
    assert n == len(items), f"Ray kept {n} of {len(items)} images"
    return {"rate": n / (end - t0), "steady": steady_rate(arrivals, procs), "wall": end - t0,
            "first_s": arrivals[0][0] - t0, "blocks": len(arrivals)}


def steady_rate(arrivals: list[tuple[float, int]], parallel: int) -> float:
    """Rows per second after the first wave: the first `parallel` outputs (one per worker, finishing
    together) mark the start; rows that arrive after it, over the time from it to the last output."""
    arrivals = sorted(arrivals)
    k = min(parallel, len(arrivals) - 2)
    if k < 1:
        return float("nan")
    span = arrivals[-1][0] - arrivals[k - 1][0]
    return sum(n for _, n in arrivals[k:]) / span if span > 0 else float("nan")


def bench_cpu(args, files: list[str]) -> list[str]:
    items = files * args.passes
    cfg = parse_config({"data": {"resolution": args.resolution, "source": "unused"}}).data
    pil = pil_reference(items, cfg, args.num_cpus)
    print(f"PIL loop x{args.num_cpus} processes: {pil['rate']:.0f} img/s = {pil['per_core']:.1f} img/s/core "
          f"({pil['wall']:.1f}s)", flush=True)
    start_ray(args)
    cold = ray_run(items, cfg, args.num_cpus)
    warm = ray_run(items, cfg, args.num_cpus)
    print(f"Ray cold: {cold}\nRay warm: {warm}", flush=True)
    n, pc = args.num_cpus, pil["per_core"]

    def ov(rate: float) -> str:
        return f"{1 - rate / n / pc:+.1%}"

    setup = (f"cpu: decode+resize+crop (process_row) of {args.width}x{args.height} JPEGs → {args.resolution}px, "
             f"{len(items)} images ({len(files)} files × {args.passes} passes), {n} cores on each side; Ray Data: "
             f"read_binary_files → map_batches(64), {warm['blocks']} output blocks")
    rows = [
        dict(part="cpu", what=f"PIL loop, {n} processes (reference)", rate=pil["rate"], unit="img/s",
             per_core=pc, vs="1.00×", goal=""),
        dict(part="cpu", what="Ray Data warm, steady state (after the first wave of blocks)", rate=warm["steady"],
             unit="img/s", per_core=warm["steady"] / n, vs=f"overhead {ov(warm['steady'])}", goal="≤ 10%"),
        dict(part="cpu", what="Ray Data warm, end to end", rate=warm["rate"], unit="img/s", per_core=warm["rate"] / n,
             vs=f"overhead {ov(warm['rate'])}", goal="≤ 10%"),
        dict(part="cpu", what=f"Ray Data cold (worker start-up; first block after {cold['first_s']:.1f}s), end to end",
             rate=cold["rate"], unit="img/s", per_core=cold["rate"] / n, vs=f"overhead {ov(cold['rate'])}", goal=""),
    ]
    return {"setup": setup, "rows": rows}


# ----------------------------------------------------------------------------------------------- vae part


def build_teacher(folder: Path, full: bool) -> None:
    """A diffusers folder with the VAE + text encoder the stage loads: SD 1.5's (random weights) or tiny."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from models.tiny import tiny_sd1_pipeline

    pipe = tiny_sd1_pipeline()
    if full:
        torch.manual_seed(0)
        te = CLIPTextModel(CLIPTextConfig(**SD15_TEXT, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
        pipe.register_modules(vae=AutoencoderKL(**SD15_VAE), text_encoder=te)
    pipe.save_pretrained(folder)


def loop_reference(teacher: Path, args, dtype_name: str) -> dict:
    """The plain diffusers loop: vae.encode (+ the text encoder) on ready device tensors, batch by batch."""
    import torch

    from models.teacher import encode_prompts, load_teacher

    tm = load_teacher(str(teacher), dtype=dtype_name, device=args.device, components=("vae", "text"))
    bs, r = args.batch_size, args.resolution
    x = (torch.rand(bs, 3, r, r, device=args.device) * 2 - 1).to(tm.vae.dtype)
    captions = [f"a photo number {i} of a colorful pattern" for i in range(bs)]
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    steps = max(1, min(args.images, args.loop_images) // bs)

    def one(with_text: bool) -> None:
        lat = tm.vae.encode(x).latent_dist
        lat.mean.float().cpu(), lat.std.float().cpu()
        if with_text:
            encode_prompts(tm, captions)["prompt_embeds"].float().cpu()

    out = {"vae_dtype": str(tm.vae.dtype).replace("torch.", "")}
    with torch.no_grad():
        for name, with_text in (("vae", False), ("vae+text", True)):
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < args.warmup_s:  # clocks up, allocator and cuDNN warm
                one(with_text)
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                one(with_text)
            sync()
            out[name] = steps * bs / (time.perf_counter() - t0)
    return out


def cache_timeline(cache: Path, actors: int) -> dict:
    """Steady-state rate from the parquet files the stage wrote (their mtimes): after each actor's first file."""
    import pyarrow.parquet as pq

    files = sorted((p.stat().st_mtime, pq.ParquetFile(p).metadata.num_rows) for p in cache.rglob("*.parquet"))
    return {"files": len(files), "rows": sum(n for _, n in files), "steady": steady_rate(files, actors),
            "first_mtime": files[0][0] if files else None}


def bench_vae(args, tmp: Path, folder: Path) -> list[str]:
    from pipelines import prepare

    dtype_name = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    teacher = tmp / "teacher"
    build_teacher(teacher, args.vae == "full")
    loop = loop_reference(teacher, args, dtype_name)
    if args.device == "cuda":
        import torch

        torch.cuda.empty_cache()  # the loop's models are gone: leave the GPU to the stage's actors
    print(f"plain loop: {loop}", flush=True)

    gpu = args.device == "cuda"
    cfg = parse_config({
        "teacher": {"uri": str(teacher), "dtype": dtype_name},
        "ray": {"num_cpus": args.num_cpus, **({"num_gpus": 1} if gpu else {})},
        "data": {"source": str(folder), "output": str(tmp / "cache"), "resolution": args.resolution,
                 "dedup": False, "val_fraction": 0.0, "embed_batch_size": args.batch_size,
                 "rows_per_file": args.rows_per_file, "embed_concurrency": args.actors,
                 "embed_num_gpus": (1.0 / args.actors) if gpu else 0,
                 "decode_batch_size": args.decode_batch_size, "read_parallelism": args.read_parallelism},
    })
    start_ray(args)
    t0 = time.time()
    result = prepare.run(cfg)
    wall = time.time() - t0
    rows = result["rows"]["train"]
    assert rows == args.images, f"the stage cached {rows} of {args.images} rows"
    tl = cache_timeline(tmp / "cache", args.actors)
    e2e = rows / wall
    ref = loop["vae+text"]
    first = tl["first_mtime"] - t0 if tl["first_mtime"] else float("nan")
    kind = "SD 1.5" if args.vae == "full" else "tiny"
    setup = (f"vae: {kind} VAE + CLIP text encoder, {loop['vae_dtype']}, {args.resolution}px, batch "
             f"{args.batch_size}, {args.device}; the stage on {rows} {args.width}x{args.height} JPEGs: {args.num_cpus} "
             f"Ray CPUs decoding, {args.actors} GPU actor(s) × {1 / args.actors if gpu else 0:.2g} GPU, "
             f"{args.rows_per_file} rows per actor call ({tl['files']} files, the first after {first:.1f}s)")
    out = [
        dict(part="vae", what="plain diffusers loop, VAE only, ready device tensors", rate=loop["vae"],
             unit="latents/s", per_core=None, vs=f"{loop['vae'] / ref:.2f}×", goal=""),
        dict(part="vae", what="plain diffusers loop, VAE + text encoder (reference)", rate=ref, unit="latents/s",
             per_core=None, vs="1.00×", goal=""),
        dict(part="vae", what="whole stage, steady state (after each actor's first file)", rate=tl["steady"],
             unit="latents/s", per_core=None, vs=f"{tl['steady'] / ref:.2f}×", goal="≥ 0.9×"),
        dict(part="vae", what="whole stage, end to end (actor start, model load included)", rate=e2e,
             unit="latents/s", per_core=None, vs=f"{e2e / ref:.2f}×", goal=""),
    ]
    return {"setup": setup, "rows": out}


# ----------------------------------------------------------------------------------------------- driver


def start_ray(args) -> None:
    import ray
    import ray.data

    if ray.is_initialized():
        return
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    interrupt_once()  # after ray.init, in case it installed its own handler
    ray.data.DataContext.get_current().enable_progress_bars = False


def hardware(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    hw = f"{os.cpu_count()} logical CPUs ({cpu}), load average before the run {LOAD_BEFORE:.1f}"
    if device == "cuda":
        import torch

        hw += f", GPU {torch.cuda.get_device_name()}"
    return hw


LOAD_BEFORE = os.getloadavg()[0]


def section(results: dict[str, dict], args, wall_s: float) -> str:
    """A '### prepare_throughput' section: date, hardware, command, what was run, one table."""
    lines = [f"### prepare_throughput: {time.strftime('%Y-%m-%d')}, {hardware(args.device)}", "",
             f"`python {' '.join(sys.argv)}`; whole run {wall_s:.0f}s.", ""]
    lines += [f"- {r['setup']}" for r in results.values() if r.get("setup")]
    lines += [f"- {part} FAILED: {r['error']}" for part, r in results.items() if r.get("error")]
    lines += ["", "| part | measurement | rate | per core | vs reference | goal |", "|---|---|---|---|---|---|"]
    for r in (row for res in results.values() for row in res.get("rows", [])):
        per = "-" if r["per_core"] is None else f"{r['per_core']:.1f}"
        lines.append(f"| {r['part']} | {r['what']} | {r['rate']:.1f} {r['unit']} | {per} | {r['vs']} | {r['goal']} |")
    return "\n".join(lines) + "\n"


def append_results(path: Path, text: str) -> None:
    """The section goes last under '## Data' (made if missing), before the next '## ' section."""
    append_to_section(path, SECTION, text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", nargs="+", choices=["cpu", "vae"], default=None,
                   help="default: cpu and vae with --device cuda, else cpu")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--images", type=int, default=3072, help="distinct JPEG files generated (both parts use them)")
    p.add_argument("--passes", type=int, default=3, help="cpu part: times each file is processed")
    p.add_argument("--loop-images", type=int, default=1536, help="vae part: latents timed in each plain loop")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=768)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="Ray CPUs = PIL loop processes")
    p.add_argument("--vae", choices=["full", "tiny"], default=None, help="default full on CUDA, tiny on CPU")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="teacher dtype (default bfloat16 on CUDA, as teacher.dtype auto gives; float32 on CPU)")
    p.add_argument("--batch-size", type=int, default=32, help="data.embed_batch_size and the loop's batch")
    p.add_argument("--actors", type=int, default=2, help="data.embed_concurrency (GPU actors sharing the GPU)")
    p.add_argument("--rows-per-file", type=int, default=256, help="data.rows_per_file")
    p.add_argument("--decode-batch-size", type=int, default=64, help="data.decode_batch_size (vae part)")
    p.add_argument("--read-parallelism", type=int, default=None,
                   help="data.read_parallelism (vae part; default: Ray chooses)")
    p.add_argument("--warmup-s", type=float, default=2.0, help="loop reference warm-up seconds")
    p.add_argument("--append-results", type=Path, default=None, metavar="RESULTS.md")
    args = p.parse_args()
    interrupt_once()
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda but CUDA is not available")
    args.part = args.part or (["cpu", "vae"] if args.device == "cuda" else ["cpu"])
    args.vae = args.vae or ("full" if args.device == "cuda" else "tiny")
    args.part = sorted(set(args.part))  # cpu first: its process pool forks before Ray and CUDA start
    tmp = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    os.environ.setdefault("DISTILLERY_CACHE", str(tmp / "models"))
    results: dict[str, dict] = {}
    t_all = time.perf_counter()
    try:
        folder = tmp / "images"
        gen_s = make_images(folder, args.images, (args.width, args.height), args.num_cpus)
        files = sorted(str(f) for f in folder.glob("*.jpg"))
        print(f"made {len(files)} {args.width}x{args.height} JPEGs in {gen_s:.1f}s", flush=True)
        for part in args.part:  # a part that fails is reported; the other still runs
            t0 = time.perf_counter()
            try:
                results[part] = bench_cpu(args, files) if part == "cpu" else bench_vae(args, tmp, folder)
            except (Exception, KeyboardInterrupt) as err:  # SIGINT (e.g. `timeout -s INT`): keep what is done
                import traceback

                traceback.print_exc()
                first = str(err).splitlines()[0][:300] if str(err) else "stopped early (SIGINT, e.g. a timeout)"
                results[part] = {"error": f"{type(err).__name__}: {first}"}
                if isinstance(err, KeyboardInterrupt):
                    break
            finally:
                print(f"part {part}: {time.perf_counter() - t0:.0f}s", flush=True)
    finally:
        try:
            import ray

            ray.shutdown()
        except Exception:
            pass
        shutil.rmtree(tmp, ignore_errors=True)
    text = section(results, args, time.perf_counter() - t_all)
    print("\n" + text)
    if args.append_results and results:
        append_results(args.append_results, text)
        print(f"appended to {args.append_results}")
    return 0 if results and not any("error" in r for r in results.values()) else 1

if __name__ == "__main__":
    sys.exit(main())
