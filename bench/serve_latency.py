"""Serving benchmark: p50/p95 latency and images/s of the Ray Serve app under 1, 8 and 32 concurrent HTTP
clients, for the teacher pipeline and its student at the same steps, with dynamic batching on and off,
next to a plain diffusers reference (the pipeline called in-process, one image at a time) in the same run.

Goals: student >= 1.6x the teacher's images/s at equal steps; batching >= 2x the images/s of unbatched
serving at 32 clients.

  python bench/serve_latency.py --tiny                       # CPU smoke run: tiny-sd1 and its bk-small student
  python bench/serve_latency.py --device cuda                # random-weight SD 1.5 and bk-small at 512 px
  python bench/serve_latency.py --device cuda --append-results bench/RESULTS.md

Full-size models are built from their public configs with random weights (no download): timings do not
depend on the weights. Each (model, batching) pair is deployed as its own Serve app with one replica.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import local  # noqa: E402
from pipelines.config import parse_config  # noqa: E402


def build_models(tiny: bool, root: Path) -> dict[str, Path]:
    """The teacher pipeline folder and its bk-small student (fp16 on disk for the full size)."""
    import torch

    from models.student import build_student, preset_spec, save_student

    teacher_dir = root / "teacher"
    if tiny:
        from models.tiny import save_tiny

        save_tiny("tiny-sd1", teacher_dir)
    else:
        from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        from models.tiny import build_tokenizer
        from pipelines.student_cli import SD15_TEXT, SD15_UNET, SD15_VAE

        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            unet = UNet2DConditionModel(**SD15_UNET)
            vae = AutoencoderKL(**SD15_VAE)
            te = CLIPTextModel(CLIPTextConfig(**SD15_TEXT, bos_token_id=0, eos_token_id=1, pad_token_id=1))
        sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
        pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=te, tokenizer=build_tokenizer(root / "tok"),
                                       scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.to(torch.float16).save_pretrained(teacher_dir)
        del pipe
    from diffusers import UNet2DConditionModel

    t_unet = UNet2DConditionModel.from_pretrained(teacher_dir, subfolder="unet")
    spec = preset_spec("bk-small", t_unet.config)
    student = build_student(t_unet, spec)
    if not tiny:
        student = student.to(torch.float16)
    save_student(student, str(teacher_dir), root / "student", {"teacher": "bench", "preset": "bk-small"})
    return {"teacher": teacher_dir, "student": root / "student"}


def reference_ips(folder: Path, device: str, size: int, steps: int, seconds: float) -> float:
    """Plain diffusers, in-process, one image per call: images/s."""
    import torch

    from pipelines.registry import ImageJob, generate_images, load_pipeline

    if device == "cpu":
        torch.set_num_threads(1)  # as in a replica with num_cpus=1 (Ray sets OMP_NUM_THREADS=1)

    pipe = load_pipeline(str(folder), device)
    job = ImageJob("a photo of a cat", num_inference_steps=steps, width=size, height=size)
    generate_images(pipe, [job])  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        generate_images(pipe, [job])
        n += 1
    del pipe
    return n / (time.perf_counter() - t0)


def load_test(url: str, clients: int, seconds: float, body: dict) -> dict:
    """`clients` threads post back to back for `seconds`; latencies of the requests that finished."""
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client():
        s = requests.Session()
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            r = s.post(url, json=body, timeout=600)
            dt = time.perf_counter() - t0
            with lock:
                if r.status_code == 200:
                    lat.append(dt)
                else:
                    errors[0] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    q = statistics.quantiles(lat, n=20) if len(lat) >= 2 else lat * 19
    return {"clients": clients, "requests": len(lat), "errors": errors[0], "p50_ms": 1000 * statistics.median(lat),
            "p95_ms": 1000 * q[18], "images_per_s": len(lat) / wall}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny-sd1 at 64 px on CPU (a smoke run)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=None, help="inference steps (default 25; --tiny 4)")
    p.add_argument("--size", type=int, default=None, help="image side (default 512; --tiny 64)")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--max-batch", type=int, default=16, help="max_batch_size when batching is on")
    p.add_argument("--batch-wait", type=float, default=0.05)
    p.add_argument("--seconds", type=float, default=None, help="per measurement (default 20; --tiny 5)")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--append-results", default=None, help="append a markdown section to this file")
    args = p.parse_args()
    tiny = args.tiny
    steps = args.steps or (4 if tiny else 25)
    size = args.size or (64 if tiny else 512)
    seconds = args.seconds or (5.0 if tiny else 20.0)
    clients = [int(c) for c in args.clients.split(",")]
    gpu = args.device == "cuda"

    import ray
    import torch
    from ray import serve

    from serving.app import build_app

    root = Path(args.work_dir or tempfile.mkdtemp(prefix="serve-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DISTILLERY_CACHE", str(root / "cache"))
    print(f"building models in {root} ...", flush=True)
    models = build_models(tiny, root)

    results: dict = {"steps": steps, "size": size, "device": args.device, "reference": {}, "serve": []}
    for name, folder in models.items():
        results["reference"][name] = reference_ips(folder, args.device, size, steps, seconds)
        print(f"reference {name}: {results['reference'][name]:.2f} images/s", flush=True)
        if gpu:
            torch.cuda.empty_cache()

    ray.init(include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"DISTILLERY_CACHE": os.environ["DISTILLERY_CACHE"]}})
    port = local.free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 600})
    url = f"http://127.0.0.1:{port}/v1/images/generations"
    body = {"prompt": "a photo of a cat", "n": 1, "size": f"{size}x{size}", "num_inference_steps": steps,
            "guidance_scale": 7.5, "seed": 0}
    for name, folder in models.items():
        for batched in (False, True):
            cfg = parse_config({"work_dir": str(root / "work"), "serve": {
                "model": str(folder), "num_gpus": 1 if gpu else 0, "num_cpus": 1,
                "max_batch_size": args.max_batch if batched else 1, "batch_wait_timeout_s": args.batch_wait,
                "max_ongoing_requests": 2 * max(clients), "sizes": [f"{size}x{size}"], "max_steps": max(steps, 100),
                "request_timeout_s": 600}})
            serve.run(build_app(cfg), name="bench", route_prefix="/")
            load_test(url, min(4, max(clients)), min(seconds, 5), body)  # warm-up (cuDNN autotune, allocator)
            for c in clients:
                row = {"model": name, "batching": batched, **load_test(url, c, seconds, body)}
                results["serve"].append(row)
                print(json.dumps(row), flush=True)
            serve.delete("bench")
    serve.shutdown()
    ray.shutdown()

    def ips(model: str, batched: bool, c: int) -> float:
        return next(r["images_per_s"] for r in results["serve"]
                    if r["model"] == model and r["batching"] == batched and r["clients"] == c)

    top = max(clients)
    results["student_speedup"] = {c: ips("student", True, c) / ips("teacher", True, c) for c in clients}
    results["batching_gain"] = {m: ips(m, True, top) / ips(m, False, top) for m in models}
    device_name = torch.cuda.get_device_name(0) if gpu else platform.processor() or platform.machine()
    results["hardware"] = f"{device_name}, {os.cpu_count()} CPUs"
    md = markdown(results, args, clients)
    print(md)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    if args.append_results:
        with open(args.append_results, "a") as f:
            f.write("\n" + md)
    return 0


def markdown(res: dict, args, clients: list[int]) -> str:
    top = max(clients)
    lines = [
        f"### serve_latency: {'tiny-sd1 (--tiny)' if args.tiny else 'SD 1.5 vs bk-small (random weights)'}, "
        f"{res['size']} px, {res['steps']} steps, {res['device']} ({res['hardware']})",
        "",
        f"`python bench/serve_latency.py {' '.join(sys.argv[1:])}`; one replica; max_batch_size "
        f"{args.max_batch} when batching; guidance 7.5.",
        "",
        "| model | batching | clients | p50 ms | p95 ms | images/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["serve"]:
        lines.append(f"| {r['model']} | {'on' if r['batching'] else 'off'} | {r['clients']} | {r['p50_ms']:.0f} | "
                     f"{r['p95_ms']:.0f} | {r['images_per_s']:.2f} |")
    for name, v in res["reference"].items():
        lines.append(f"| {name} (plain diffusers, in-process) | - | 1 | {1000 / v:.0f} | - | {v:.2f} |")
    sp = res["student_speedup"][top]
    lines += ["",
              f"- student / teacher images/s at {top} clients (batching on): {sp:.2f}x "
              f"(goal >= 1.6x: {'met' if sp >= 1.6 else 'not met'})"]
    for m, g in res["batching_gain"].items():
        verdict = "met" if g >= 2 else "not met"
        lines.append(f"- {m}: batching on / off at {top} clients: {g:.2f}x (goal >= 2x: {verdict})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
