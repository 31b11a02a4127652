"""Serving benchmark (issue 6): p50/p95 latency and images/s of the Ray Serve app under 1, 8 and 32 concurrent
HTTP clients, for the teacher pipeline and its bk-small student at the same steps, with dynamic batching on
(max_batch_size --max-batch) and off (max_batch_size 1), next to plain diffusers references measured in the
same run: the pipeline called in-process one image at a time, and one call of --max-batch images (what
batching could reach without Serve, HTTP and queueing).

Goals: student >= 1.6x the teacher's images/s at equal steps; batching >= 2x the images/s of unbatched
serving at 32 clients.

Each (model, batching) pair is deployed as its own one-replica Serve app (Ray started with no dashboard,
HTTP on 127.0.0.1; no network, no MLflow: the replica loads a diffusers folder). Each level sends a fixed
number of requests: every one of `c` clients posts --requests-per-client requests back to back (n=1,
guidance 7.5); images/s = requests / (first post -> last answer). Before a level series the deployment is
warmed up: a full batch of short (2-step) requests when batching is on (the batch shapes), then full-step
requests for at least --warmup-s seconds (GPU clocks). A second table says what happened inside the replica,
from each answer's `timings`: images per pipeline batch, pipeline time per batch, queue wait, PNG time, and
how much of the level's wall time the pipeline was running. `--batchers replica,serve` adds batching rows with
Ray's @serve.batch (serve.batcher "serve") next to serving/batching.py (the default), measured in the same run.
`--repeats 3` runs each level (and the in-process batch) 3 times and reports the median, with every run's
images/s kept. `--fewstep-steps 4` adds the TAESD student as a few-step student (4 steps, guidance 1: no CFG;
random weights, so only its timing means anything), served eager and with serve.compile (the U-Net compiled
at replica start for batch 1, and for --max-batch when batching: CUDA graphs on the GPU; its in-process reference
is compiled the same way), against the teacher's p50 at 1 client. `--variant
num_cpus=8` (repeatable) deploys each batched model once more with those serve settings, its rows and its
served/in-process ratio next to the default deployment's. `--output-format jpeg` asks for JPEG answers instead
of PNG (the encoding is the replica's per-answer CPU work; the `PNG ms` column is then the JPEG time).

  python bench/serve_latency.py --tiny --requests-per-client 2,1,1       # CPU smoke run: tiny-sd1 and bk-small
  python bench/serve_latency.py --device cuda --append-results bench/RESULTS.md   # SD 1.5 vs bk-small, 512 px

Full-size models are built from their public configs with random weights (no download), fp16 on the GPU:
model timings do not depend on the weights; PNG encoding does (it depends on the images), so the in-process
reference also times encoding its batch's images at PIL's default zlib level 6 and at the served level.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import append_to_section, interrupt_once  # noqa: E402
from models.sampling import PHASES, PNG_LEVEL  # noqa: E402
from pipelines import local  # noqa: E402
from pipelines.config import ServeConfig, parse_config  # noqa: E402

SECTION = "## Serving"
DEFAULT_BATCHER = ServeConfig.model_fields["batcher"].default  # the ratios' batching rows


def build_models(tiny: bool, root: Path) -> dict[str, tuple[Path, Path | None]]:
    """Name -> (pipeline folder, decoder folder or None): the teacher, its bk-small student (fp16 on disk for the
    full size) and that student decoding with a TAESD-size AutoencoderTiny."""
    import torch

    from models.student import StudentMeta, build_student, preset_spec, save_student
    from models.tiny import save_tiny

    teacher_dir = root / "teacher"
    if tiny:
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
        del pipe, unet, vae, te
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    from diffusers import UNet2DConditionModel

    t_unet = UNet2DConditionModel.from_pretrained(teacher_dir, subfolder="unet")
    spec = preset_spec("bk-small", t_unet.config)
    student = build_student(t_unet, spec)
    if not tiny:
        student = student.to(torch.float16)
    save_student(student, str(teacher_dir), root / "student", StudentMeta(teacher="bench", preset="bk-small"))
    # the student with a lighter decoder (serve.decoder): random weights at TAESD's size for SD 1.x
    # (madebyollin/taesd), builtin:tiny-decoder's shape for --tiny
    decoder = root / "decoder"
    if tiny:
        save_tiny("tiny-decoder", decoder)
    else:
        from diffusers import AutoencoderTiny

        torch.manual_seed(0)
        AutoencoderTiny().to(torch.float16).save_pretrained(decoder)
    return {"teacher": (teacher_dir, None), "student": (root / "student", None),
            "student-taesd": (root / "student", decoder)}


def reference(folder: Path, decoder: Path | None, device: str, size: int, steps: int, images: int, batch: int,
              warmup_s: float, guidance: float = 7.5, repeats: int = 1, compile_mode: str | None = None) -> dict:
    """Plain diffusers, in-process: images/s one image per call, and one call of `batch` images (the median of
    `repeats` calls). With `compile_mode` the U-Net is compiled as serve.compile does it in a replica (the
    same compile_unet, warmed up at batch 1 and `batch`), so a compiled served row has a compiled reference."""
    import functools

    import torch

    from models.sampling import ImageJob, compile_unet, encode_png, load_pipeline, render_images
    from models.sampling import generate_images as generate_eager

    if device == "cpu":
        torch.set_num_threads(1)  # as in a replica with num_cpus=1 (Ray sets OMP_NUM_THREADS=1)
    pipe = load_pipeline(str(folder), device, str(decoder) if decoder else None)
    generate_images, compiled = generate_eager, None
    if compile_mode:
        sizes = sorted({1, batch})
        compiled = compile_unet(pipe, compile_mode, [(size, size)], sizes, guidance)
        generate_images = functools.partial(generate_eager, batch_sizes=sizes)
    job = ImageJob("a photo of a cat", num_inference_steps=steps, width=size, height=size, guidance_scale=guidance)
    short = ImageJob("a photo of a cat", num_inference_steps=2, width=size, height=size, guidance_scale=guidance)
    t0 = time.perf_counter()
    generate_images(pipe, [job])
    while time.perf_counter() - t0 < warmup_s:  # clocks up
        generate_images(pipe, [short])
    times = []
    for _ in range(images):
        t1 = time.perf_counter()
        generate_images(pipe, [job])
        times.append(time.perf_counter() - t1)
    out = {"ips_1": 1 / statistics.median(times), "ms_1": 1000 * statistics.median(times)}
    if batch > 1:
        jobs = [ImageJob("a photo of a cat", num_inference_steps=steps, width=size, height=size, seed=i,
                         guidance_scale=guidance) for i in range(batch)]
        generate_images(pipe, [ImageJob("a photo of a cat", num_inference_steps=2, width=size, height=size,
                                        seed=i, guidance_scale=guidance) for i in range(batch)])  # shapes warm
        runs = []
        for _ in range(repeats):
            t1 = time.perf_counter()
            generate_images(pipe, jobs)
            runs.append(time.perf_counter() - t1)
        dt = statistics.median(runs)
        out.update(ips_batch=batch / dt, ms_batch=1000 * dt, ips_batch_runs=[batch / r for r in runs])
        phases: dict[str, float] = {}  # one more call, by phase, to set beside the replica's (untimed as a whole)
        render_images(pipe, jobs, sizes if compile_mode else None, phases=phases)
        out["phases_batch"] = phases
    if compiled:  # before the PNG images below, whose batch of 4 runs eager by design
        out["eager_calls"] = compiled.eager_calls  # forwards that fell back: 0 when every timed call ran a graph
    # PNG encoding of this model's images, one thread: PIL's default level 6 against the served level
    images = render_images(pipe, [ImageJob("a photo of a cat", num_inference_steps=steps, width=size, height=size,
                                           seed=i, guidance_scale=guidance) for i in range(min(4, max(batch, 1)))])
    for level in (6, PNG_LEVEL):
        t1 = time.perf_counter()
        sizes = [len(encode_png(img, level)) for img in images]
        out[f"png_ms_{level}"] = 1000 * (time.perf_counter() - t1) / len(images)
        out[f"png_kib_{level}"] = statistics.mean(sizes) / 1024
    del pipe, compiled
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def load_test(url: str, clients: int, per_client: int, body: dict) -> dict:
    """`clients` threads, released together, each posting `per_client` requests back to back."""
    lat: list[float] = []
    timings: list[dict] = []  # the server's own account of each answered request (serving.schemas.Timings)
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client():
        s = requests.Session()
        start.wait()
        for _ in range(per_client):
            t0 = time.perf_counter()
            try:
                r = s.post(url, json=body, timeout=900)
                ok, why = r.status_code == 200, f"HTTP {r.status_code}: {r.text[:200]}"
            except requests.RequestException as err:
                ok, why = False, f"{type(err).__name__}: {err}"
            dt = time.perf_counter() - t0
            with lock:
                (lat.append(dt) if ok else errors.append(why))
                if ok:
                    timings.append(r.json()["timings"])

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    row = {"clients": clients, "requests": len(lat), "errors": len(errors), "wall_s": wall,
           "p50_ms": 1000 * statistics.median(lat) if lat else float("nan"),
           "p95_ms": 1000 * (statistics.quantiles(lat, n=20, method="inclusive")[18] if len(lat) >= 2
                             else (lat[0] if lat else float("nan"))),
           "images_per_s": len(lat) / wall, **server_side(timings, wall)}
    if errors:
        row["first_error"] = errors[0]
    return row


def server_side(timings: list[dict], wall: float) -> dict:
    """What the replica says of a level's requests (n=1 each): mean batch size, mean pipeline time per batch,
    median queue wait, mean PNG time, and the share of the level's wall time the pipeline was running (each
    request counts its batch's time / the batch's size, so each batch counts once)."""
    if not timings:
        return {}
    busy = sum(t["render_ms"] / t["batch_size"] for t in timings) / 1000
    return {"srv_batch": statistics.fmean(t["batch_size"] for t in timings),
            "srv_render_ms": statistics.fmean(t["render_ms"] for t in timings),
            "srv_queue_ms": statistics.median(t["queue_ms"] for t in timings),
            "srv_encode_ms": statistics.fmean(t["encode_ms"] for t in timings),
            "srv_held_ms": statistics.fmean(t.get("held_ms", 0.0) for t in timings),
            "srv_busy": busy / wall,
            **{f"srv_{k}": statistics.fmean(t["phases"][k] for t in timings)
               for k in PHASES if all((t.get("phases") or {}).get(k) is not None for t in timings)}}


def warm_up(url: str, body: dict, batched: int, seconds: float) -> None:
    """A full batch of 2-step requests (the batch shapes), then full-step requests for `seconds`."""
    if batched > 1:
        load_test(url, batched, 1, {**body, "num_inference_steps": 2})
    t0 = time.perf_counter()
    while True:
        load_test(url, 1, 1, body)
        if time.perf_counter() - t0 >= seconds:
            break


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny-sd1 at 64 px on CPU (a smoke run)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=None, help="inference steps, both models (default 25; --tiny 4)")
    p.add_argument("--size", type=int, default=None, help="image side (default 512; --tiny 64)")
    p.add_argument("--clients", default="1,8,32", help="concurrent clients per level")
    p.add_argument("--requests-per-client", default="4,2,1",
                   help="requests each client sends, per level (one number for all levels, or one per level; "
                        "0 leaves the level out)")
    p.add_argument("--batched-requests-per-client", default="4,2,2",
                   help="the same with batching on (at 32 clients, 2 each gives 4 full batches of 16, so the "
                        "rate depends less on how the first arrivals split into batches)")
    p.add_argument("--max-batch", type=int, default=16, help="max_batch_size when batching is on")
    p.add_argument("--batch-wait", type=float, default=0.05, help="batch_wait_timeout_s when batching is on")
    p.add_argument("--batchers", default=DEFAULT_BATCHER,
                   help="serve.batcher values for the batching-on rows: replica (serving/batching.py, the default, "
                        "the one the ratios use), serve (Ray's @serve.batch; compare: 'replica,serve')")
    p.add_argument("--ref-images", type=int, default=3, help="in-process reference: timed single images")
    p.add_argument("--warmup-s", type=float, default=2.0, help="full-step warm-up per deployment, seconds")
    p.add_argument("--models", default="teacher,student,student-taesd",
                   help="teacher, student (its teacher's VAE), student-taesd (decoding with a TAESD-size decoder)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each level and in-process batch; the median")
    p.add_argument("--fewstep-steps", type=int, default=0,
                   help="add the TAESD student at this many steps without CFG, eager and compiled (0: off)")
    p.add_argument("--fewstep-requests", type=int, default=10, help="requests of the few-step 1-client level")
    p.add_argument("--compile-mode", default=None, help="serve.compile_mode (default: reduce-overhead on cuda, "
                                                         "default on cpu)")
    p.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="serve settings for a further deployment of each batched model (default batcher), e.g. "
                        "num_cpus=8 or batch_wait_timeout_s=0.1; repeatable, each measured at every level")
    p.add_argument("--output-format", default="png", choices=["png", "jpeg", "webp"],
                   help="the requests' output_format (OpenAI's field): the encoding the replica does per answer")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--append-results", type=Path, default=None, metavar="RESULTS.md",
                   help="add a section under '## Serving' of this file")
    args = p.parse_args()
    interrupt_once()
    tiny = args.tiny
    steps = args.steps or (4 if tiny else 25)
    size = args.size or (64 if tiny else 512)
    clients = [int(c) for c in args.clients.split(",")]
    rpc = {}
    for batched, opt in ((False, "requests_per_client"), (True, "batched_requests_per_client")):
        r = [int(x) for x in getattr(args, opt).split(",")]
        r = r * len(clients) if len(r) == 1 else r
        if len(r) != len(clients):
            p.error(f"--{opt.replace('_', '-')} has {len(r)} values for {len(clients)} client levels")
        rpc[batched] = r
    batchers = [b for b in args.batchers.split(",") if b]
    if DEFAULT_BATCHER not in batchers or not set(batchers) <= {"replica", "serve"}:
        p.error(f"--batchers: {DEFAULT_BATCHER} (serve.batcher's default), optionally with the other (got "
                f"{args.batchers})")
    args.batchers = batchers
    try:
        args.variants = [parse_variant(v) for v in args.variant]
    except ValueError as err:
        p.error(f"--variant: {err}")
    gpu = args.device == "cuda"
    names = [m for m in args.models.split(",") if m]
    if not set(names) <= {"teacher", "student", "student-taesd"}:
        p.error(f"--models: choose from teacher,student,student-taesd (got {args.models})")

    import torch

    if gpu and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    t_start = time.perf_counter()
    root = Path(args.work_dir or tempfile.mkdtemp(prefix="serve-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DISTILLERY_CACHE", str(root / "cache"))
    print(f"building models in {root} ...", flush=True)
    built = build_models(tiny, root)
    base = {k: v for k, v in built.items() if k in names}
    # name -> (folder, decoder, serving variant: steps, guidance, serve.compile, batching-on rows)
    models = {k: (*v, {"steps": steps, "guidance": 7.5, "compile": False, "batched": True}) for k, v in base.items()}
    if args.fewstep_steps:
        k = args.fewstep_steps
        for compiled in (False, True):
            models[f"student-taesd-{k}step{'-compiled' if compiled else ''}"] = (
                *built["student-taesd"], {"steps": k, "guidance": 1.0, "compile": compiled, "batched": True})
    args.compile_mode = args.compile_mode or ("reduce-overhead" if gpu else "default")
    print(f"built in {time.perf_counter() - t_start:.0f}s", flush=True)

    results: dict = {"steps": steps, "size": size, "device": args.device, "reference": {}, "serve": [],
                     "notes": [], "stopped": False}
    for name, (folder, decoder, var) in models.items():
        t0 = time.perf_counter()
        try:
            results["reference"][name] = reference(folder, decoder, args.device, size, var["steps"],
                                                   args.ref_images, args.max_batch, args.warmup_s,
                                                   var["guidance"], args.repeats,
                                                   args.compile_mode if var["compile"] else None)
        except KeyboardInterrupt:  # SIGINT (e.g. `timeout -s INT`): report what was measured
            results["stopped"] = True
            results["notes"].append(f"stopped early (SIGINT) during the {name} reference")
            break
        except Exception as err:
            traceback.print_exc()
            results["notes"].append(f"reference {name} failed: {type(err).__name__}: {err}")
        print(f"reference {name}: {results['reference'].get(name)} ({time.perf_counter() - t0:.0f}s)", flush=True)

    if not results["stopped"]:
        try:
            serve_levels(args, models, results, root, steps, size, clients, rpc, gpu)
        except KeyboardInterrupt:  # SIGINT between levels or while a deployment was being deleted
            results["stopped"] = True
            results["notes"].append("stopped early (SIGINT) between serve levels")
    try:
        write_results(results, args, models, clients, rpc, gpu, t_start)
    finally:  # results first: `timeout -k` may kill the process while Ray shuts down
        stop_ray()
    return 0 if results["serve"] and not results["notes"] else 1


def write_results(results: dict, args, models: dict, clients: list[int], rpc: dict[bool, list[int]], gpu: bool,
                  t_start: float) -> None:
    """Ratios, hardware and the table: printed, to --out as JSON and appended to --append-results."""
    top = max(clients)
    equal = [m for m, (*_, var) in models.items() if var["steps"] == results["steps"] and var["guidance"] == 7.5]
    results["student_speedup"] = {  # per student model at the teacher's steps: images/s over the teacher's
        m: {f"{'on' if b else 'off'}@{c}": _ratio(ips(results, m, b, c), ips(results, "teacher", b, c))
            for b in (True, False) for c in clients}
        for m in equal if m != "teacher" and "teacher" in models}
    teacher_runs = runs_of(results, "teacher", True, top)
    results["student_speedup_runs"] = {  # run i of the student over run i of the teacher, batching on, top clients
        m: [a / b for a, b in zip(runs_of(results, m, True, top), teacher_runs)] for m in results["student_speedup"]}
    results["batching_gain"] = {m: _ratio(ips(results, m, True, top), ips(results, m, False, top))
                                for m, (*_, var) in models.items() if var["batched"]}
    if gpu:
        import torch

        device_name = torch.cuda.get_device_name(0)
    else:
        device_name = platform.processor() or platform.machine()
    results["hardware"] = f"{device_name}, {os.cpu_count()} CPUs"
    results["wall_s"] = time.perf_counter() - t_start
    md = markdown(results, args, clients, rpc)
    print(md)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    if args.append_results:
        append_results(args.append_results, md)
        print(f"appended to {args.append_results}")


def serve_levels(args, models: dict, results: dict, root: Path, steps: int, size: int, clients: list[int],
                 rpc: dict[bool, list[int]], gpu: bool) -> None:
    """Deploy each (model, batching) pair in turn and run the client levels against it."""
    import ray
    from ray import serve

    from serving.app import build_app

    ray.init(include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"DISTILLERY_CACHE": os.environ["DISTILLERY_CACHE"]}})
    interrupt_once()  # after ray.init, in case it installed its own handler
    try:
        port = local.free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 900})
        url = f"http://127.0.0.1:{port}/v1/images/generations"
        body = {"prompt": "a photo of a cat", "n": 1, "size": f"{size}x{size}", "num_inference_steps": steps,
                "guidance_scale": 7.5, "seed": 0, "output_format": args.output_format}
        modes = [(False, DEFAULT_BATCHER)] + [(True, b) for b in args.batchers]  # (batching on, serve.batcher)
        plan = [(n, m, on, b, None) for n, m in models.items() for on, b in modes if m[2]["batched"] or not on]
        plan += [(n, m, True, DEFAULT_BATCHER, v) for v in args.variants for n, m in models.items()
                 if m[2]["batched"]]
        for name, (folder, decoder, var), batched, batcher, variant in plan:
            t0 = time.perf_counter()
            mb = args.max_batch if batched else 1
            what = f"{name} batching {batching_label(batched, batcher)}" + (f" {variant_label(variant)}"
                                                                             if variant else "")
            cfg = parse_config({"work_dir": str(root / "work"), "serve": {
                "model": str(folder), "decoder": str(decoder) if decoder else None,
                "num_gpus": 1 if gpu else 0, "num_cpus": 1, "batcher": batcher,
                "max_batch_size": mb, "batch_wait_timeout_s": args.batch_wait,
                "max_ongoing_requests": max(2 * max(clients), 2 * mb), "sizes": [f"{size}x{size}"],
                "max_steps": max(steps, 100), "request_timeout_s": 900, "default_guidance_scale": var["guidance"],
                "compile": var["compile"], "compile_mode": args.compile_mode,
                "compile_batches": sorted({1, mb})}}, variant)
            vbody = {**body, "num_inference_steps": var["steps"], "guidance_scale": var["guidance"]}
            levels = list(zip(clients, rpc[batched]))
            if var["steps"] != steps and not batched:  # a few-step model: its own request count at 1 client
                levels = [(1, args.fewstep_requests)] + [(c, r) for c, r in levels if c > 1]
            levels = [(c, r) for c, r in levels if r > 0]  # 0 requests per client: the level is left out
            if not levels:
                continue
            try:
                serve.run(build_app(cfg), name="bench", route_prefix="/")
                warm_up(url, vbody, mb, args.warmup_s)
                for c, r in levels:
                    runs = [load_test(url, c, r, vbody) for _ in range(args.repeats)]
                    mid = sorted(runs, key=lambda x: x["images_per_s"])[len(runs) // 2]
                    row = {"model": name, "batching": batched, "batcher": batcher, **mid,
                           **({"variant": variant_label(variant)} if variant else {}),
                           "runs_ips": [x["images_per_s"] for x in runs], "runs_p50_ms": [x["p50_ms"] for x in runs]}
                    results["serve"].append(row)
                    print(json.dumps(row), flush=True)
            except KeyboardInterrupt:  # SIGINT (e.g. `timeout -s INT`): report what was measured
                results["stopped"] = True
                results["notes"].append(f"stopped early (SIGINT) during {what}")
            except Exception as err:  # one deployment failing costs its rows, not the run
                traceback.print_exc()
                first = str(err).splitlines()[0][:200] if str(err) else ""
                results["notes"].append(f"{what} failed: {type(err).__name__}: {first}")
            finally:
                with contextlib.suppress(Exception):
                    serve.delete("bench")
            print(f"# {what}: {time.perf_counter() - t0:.0f}s", flush=True)
            if results["stopped"]:
                break
    except KeyboardInterrupt:  # e.g. during serve.delete: the rows measured so far stand
        results["stopped"] = True
        results["notes"].append("stopped early (SIGINT) while a deployment was cleaned up")


def stop_ray() -> None:
    """Serve and Ray down, ignoring a further SIGINT or a failure (nothing is left to report)."""
    import ray
    from ray import serve

    for fn in (serve.shutdown, ray.shutdown):
        if ray.is_initialized():
            with contextlib.suppress(BaseException):
                fn()


def batching_label(batched: bool, batcher: str = DEFAULT_BATCHER) -> str:
    if not batched:
        return "off"
    return "on" if batcher == DEFAULT_BATCHER else f"on, {'@serve.batch' if batcher == 'serve' else batcher}"


def parse_variant(text: str) -> list[str]:
    """'num_cpus=8,batch_wait_timeout_s=0.1' -> parse_config's overrides serve.num_cpus=8, ... (values read as
    YAML), checked against the serve section here, before anything runs."""
    overrides = [f"serve.{kv.strip()}" for kv in text.split(",") if kv.strip()]
    if not overrides:
        raise ValueError(f"{text!r}: expected KEY=VALUE[,KEY=VALUE]")
    parse_config({}, overrides)  # a ConfigError (a ValueError) names the setting
    return overrides


def variant_label(variant: list[str]) -> str:
    return ", ".join(o.removeprefix("serve.") for o in variant)


def row_label(row: dict) -> str:
    label = batching_label(row["batching"], row.get("batcher", DEFAULT_BATCHER))
    return f"{label}, {row['variant']}" if row.get("variant") else label


def _row(res: dict, model: str, batched: bool, c: int, batcher: str, variant: str | None) -> dict | None:
    return next((r for r in res["serve"] if r["model"] == model and r["batching"] == batched and r["clients"] == c
                 and r.get("batcher", DEFAULT_BATCHER) == batcher and r.get("variant") == variant), None)


def ips(res: dict, model: str, batched: bool, c: int, batcher: str = DEFAULT_BATCHER,
        variant: str | None = None) -> float | None:
    r = _row(res, model, batched, c, batcher, variant)
    return r["images_per_s"] if r else None


def runs_of(res: dict, model: str, batched: bool, c: int, batcher: str = DEFAULT_BATCHER) -> list[float]:
    r = _row(res, model, batched, c, batcher, None)
    return r.get("runs_ips", [r["images_per_s"]]) if r else []


def p50_of(res: dict, model: str, c: int = 1) -> float | None:
    return next((r["p50_ms"] for r in res["serve"] if r["model"] == model and not r["batching"]
                 and r["clients"] == c), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def markdown(res: dict, args, clients: list[int], rpc: dict[bool, list[int]]) -> str:
    top = max(clients)
    what = "tiny-sd1 vs its bk-small (--tiny)" if args.tiny else "SD 1.5 vs bk-small (random weights, fp16)"
    lines = [
        f"### serve_latency: {what}, {res['size']} px, {res['steps']} steps, {res['device']} ({res['hardware']})",
        "",
        f"{datetime.date.today().isoformat()}; `python bench/serve_latency.py {' '.join(sys.argv[1:])}`; one replica; "
        f"max_batch_size {args.max_batch} (wait {args.batch_wait:g}s) when batching; guidance 7.5 (CFG; few-step "
        f"rows 1: none); medians of {args.repeats} run(s) of each level; requests "
        f"per level = clients × {'/'.join(map(str, rpc[False]))} (batching off), × {'/'.join(map(str, rpc[True]))} "
        f"(on); answers {args.output_format}"
        f"{f' (PNG zlib level {PNG_LEVEL})' if args.output_format == 'png' else ''}; whole run {res['wall_s']:.0f}s.",
        "",
        "| model | batching | clients | requests | p50 ms | p95 ms | images/s | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["serve"]:
        lines.append(f"| {r['model']} | {row_label(r)} | "
                     f"{r['clients']} | {r['requests']} | "
                     f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['images_per_s']:.2f} | {r['errors']} |")
    for name, v in res["reference"].items():
        lines.append(f"| {name} (plain diffusers, in-process, 1 image per call) | - | 1 | {args.ref_images} | "
                     f"{v['ms_1']:.0f} | - | {v['ips_1']:.2f} | - |")
        if "ips_batch" in v:
            lines.append(f"| {name} (plain diffusers, in-process, {args.max_batch} images in one call) | - | - | "
                         f"{args.max_batch} | {v['ms_batch']:.0f} | - | {v['ips_batch']:.2f} | - |")
    inside = [r for r in res["serve"] if "srv_batch" in r]
    if inside:
        lines += ["", "Inside the replica (from each answer's `timings`): mean images per pipeline batch, mean "
                  "pipeline time of a batch, median wait for a batch to start, mean time an answer was held after its "
                  "batch (serve.hold_answers_s), mean PNG time of a request, and the share of the level's wall time "
                  "the pipeline was running.", "",
                  "| model | batching | clients | images/batch | model ms/batch | queue p50 ms | held ms | PNG ms | "
                  "pipeline busy |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in inside:
            lines.append(f"| {r['model']} | {row_label(r)} | "
                         f"{r['clients']} | "
                         f"{r['srv_batch']:.1f} | {r['srv_render_ms']:.0f} | {r['srv_queue_ms']:.0f} | "
                         f"{r.get('srv_held_ms', 0.0):.0f} | {r['srv_encode_ms']:.0f} | {100 * r['srv_busy']:.0f}% |")
    phased = [(f"{r['model']} served ({row_label(r)}, {r['clients']} clients)", {k: r[f"srv_{k}"] for k in PHASES})
              for r in inside if all(f"srv_{k}" in r for k in PHASES)]
    phased += [(f"{name} in-process, {args.max_batch} images in one call", v["phases_batch"])
               for name, v in res["reference"].items() if v.get("phases_batch")]
    if phased:
        lines += ["", "A pipeline call by phase (models.sampling.render_images; prep, denoise and decode on the "
                  "device's timeline, to PIL on the CPU), ms per batch: served, the mean over answers; in-process, "
                  "one call.", "", "| pipeline call | " + " | ".join(PHASES) + " |",
                  "|---|" + "---|" * len(PHASES)]
        lines += [f"| {what} | " + " | ".join(f"{ph.get(k, float('nan')):.0f}" for k in PHASES) + " |"
                  for what, ph in phased]
    lines.append("")
    for name, v in res["reference"].items():
        if "png_ms_6" in v:
            lines.append(f"- {name}: PNG encoding per image (one thread): zlib level 6 {v['png_ms_6']:.0f} ms "
                         f"({v['png_kib_6']:.0f} KiB), level {PNG_LEVEL} {v[f'png_ms_{PNG_LEVEL}']:.0f} ms "
                         f"({v[f'png_kib_{PNG_LEVEL}']:.0f} KiB)")
    for m, sp in res["student_speedup"].items():
        lines.append(f"- {m} / teacher images/s at equal steps, {top} clients: batching on "
                     f"{_x(sp.get(f'on@{top}'))}, off {_x(sp.get(f'off@{top}'))}; 1 client (off) "
                     f"{_x(sp.get(f'off@{clients[0]}'))} (goal >= 1.6x: "
                     f"{'met' if (sp.get(f'on@{top}') or 0) >= 1.6 else 'not met'} with batching on)")
        each = res["student_speedup_runs"].get(m, [])
        if len(each) > 1:
            lines.append(f"- {m} / teacher, batching on, {top} clients, run by run: "
                         f"{', '.join(_x(v) for v in each)} (goal >= 1.6x in each: "
                         f"{'met' if min(each) >= 1.6 else 'not met'})")
    teacher_p50 = p50_of(res, "teacher")
    for m in res["reference"].keys() | {r["model"] for r in res["serve"]}:
        if "step" in m and teacher_p50 and p50_of(res, m):
            v = p50_of(res, m) / teacher_p50
            lines.append(f"- {m}: p50 at 1 client {p50_of(res, m):.0f} ms = {v:.3f} of the teacher's "
                         f"{teacher_p50:.0f} ms at {res['steps']} steps with CFG (goal <= 0.1: "
                         f"{'met' if v <= 0.1 else 'not met'})")
    for m, g in res["batching_gain"].items():
        verdict = "met" if (g or 0) >= 2 else "not met"
        ref = res["reference"].get(m, {})
        served = ips(res, m, True, top)
        eff = f"; served/in-process batch of {args.max_batch}: {_x(_ratio(served, ref.get('ips_batch')))}" \
            if ref.get("ips_batch") and served else ""
        # the in-process batch above includes PNG-encoding its images; the call alone (the sum of its phases) is
        # what the pipeline can do before any encoding: the stricter reference
        call_ms = sum((ref.get("phases_batch") or {}).values())
        if eff and call_ms:
            eff += f" (against the call alone, {call_ms:.0f} ms by its phases: " \
                   f"{_x(_ratio(served, args.max_batch / (call_ms / 1000)))})"
        gain = f"batching on / off at {top} clients: {_x(g)} (goal >= 2x: {verdict})" if g else \
            f"batching on at {top} clients"  # the batching-off level at top clients was left out
        lines.append(f"- {m}: {gain}{eff}")
        for v in map(variant_label, args.variants):
            lines.append(f"- {m}, {v}: served/in-process batch of {args.max_batch}: "
                         f"{_x(_ratio(ips(res, m, True, top, variant=v), ref.get('ips_batch')))}; over the row "
                         f"without it: {_x(_ratio(ips(res, m, True, top, variant=v), served))}")
        if set(args.batchers) == {"replica", "serve"}:
            lines.append(f"- {m}: replica batcher / @serve.batch images/s at {top} clients: "
                         f"{_x(_ratio(ips(res, m, True, top, 'replica'), ips(res, m, True, top, 'serve')))}")
    for r in res["serve"]:
        if r.get("first_error"):
            lines.append(f"- errors: {r['model']} batching {row_label(r)} "
                         f"{r['clients']} clients: "
                         f"{r['errors']}, first: {r['first_error'][:200]}")
    lines += [f"- note: {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"


def append_results(path: Path, text: str) -> None:
    """The section goes last under '## Serving' (made if missing), before the next '## ' section."""
    append_to_section(path, SECTION, text)


if __name__ == "__main__":
    sys.exit(main())
