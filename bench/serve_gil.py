"""How long a replica's request handling holds the GIL per answer (issue 28), measured with py-spy.

With the pipeline on a thread of the replica (serve.pipeline_process false), a served batch's pipeline call was
slower than the same call in-process (bench/serve_latency.py's phase table): the pipeline thread gives the GIL up at
every torch op and must take it back, so any thread of the replica that holds the GIL (answers being encoded, their
JSON, Ray Serve's and FastAPI's request handling) delays each of its ops. With the pipeline in its own process (the
default) this is the replica's own CPU cost per answer, no longer the pipeline's. This benchmark deploys the
product's serve app (serving.app.ImageServer) with its pipeline replaced by a stand-in that holds no GIL (a sleep of
--call-ms, then --size noise images, what a random-weight model gives), loads it with --clients concurrent clients,
and samples the replica with `py-spy record --gil` (only the thread holding the GIL is sampled). It prints the GIL-
held ms per answer, by thread and by the parts of the answer's handling. CPU only; py-spy is a tool, not a
dependency (`pip install py-spy`).

  python bench/serve_gil.py                       # 32 clients, 512 px JPEG answers, batches of 16
  python bench/serve_gil.py --output-format png
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serve_latency import build_models, load_test  # noqa: E402
from pipelines import local  # noqa: E402
from pipelines.config import parse_config  # noqa: E402
from serving.replica_pipeline import Rendering, ReplicaPipeline  # noqa: E402

# (label, what a sampled stack must contain): the parts of an answer's handling
PARTS = (("JPEG/PNG encoding (encode_image)", "encode_image"), ("base64 of the images", "b64encode"),
         ("the answer's JSON (JSONResponse.render)", "JSONResponse.render"),
         ("the answer's JSON (image_response_body)", "image_response_body"),
         ("FastAPI + middleware, the endpoint included", "BaseHTTPMiddleware.__call__"),
         ("Ray Serve's request handling (handle_request*)", "handle_request"))


class StandInPipeline(ReplicaPipeline):
    """A pipeline whose call holds no GIL while it 'runs' (a sleep, as a GPU-bound call mostly waits), then returns
    noise images of `size` (JPEG's and PNG's worst case)."""

    def __init__(self, call_s: float, size: int):
        super().__init__()
        self.call_s, self.size, self.sizes, self.device = call_s, size, [f"{size}x{size}"], "cpu"

    def _render(self, jobs, on_denoise):
        import numpy as np
        from PIL import Image

        if on_denoise:
            on_denoise()
        time.sleep(self.call_s)
        rng = np.random.default_rng(len(jobs))
        return Rendering([Image.fromarray(rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8))
                          for _ in jobs], {}, None)


def gil_report(raw: Path, rate: int, answers: float) -> list[str]:
    """py-spy's raw (collapsed) samples -> lines of GIL-held ms per answer, by thread and by part."""
    total, threads, parts = 0, collections.Counter(), collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        total += int(n)
        frames = stack.split(";")
        threads[frames[0].split(": ", 1)[-1]] += int(n)
        for label, key in PARTS:
            if any(key in f for f in frames):
                parts[label] += int(n)
    ms = lambda n: 1000 * n / rate / answers  # noqa: E731
    lines = [f"| all threads | {ms(total):.2f} |"]
    lines += [f"| thread {name} | {ms(n):.2f} |" for name, n in threads.most_common(4)]
    lines += [f"| {label} | {ms(parts[label]):.2f} |" for label, _ in PARTS if parts[label]]
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--call-ms", type=float, default=250, help="the stand-in pipeline call's length")
    p.add_argument("--output-format", choices=["png", "jpeg", "webp"], default="jpeg")
    p.add_argument("--seconds", type=float, default=10, help="how long py-spy samples (the load runs longer)")
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--hold-answers-s", type=float, default=0.0, help="serve.hold_answers_s")
    args = p.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        p.error("py-spy not found: pip install py-spy")

    import ray
    from ray import serve

    from serving.app import ImageServer, resolve_model

    root = Path(tempfile.mkdtemp(prefix="serve-gil-"))
    os.environ.setdefault("DISTILLERY_CACHE", str(root / "cache"))
    folder, decoder = build_models(True, root)["student-taesd"]
    class StandIn(ImageServer.func_or_class):  # the product's replica, its pipeline replaced
        async def __init__(self, *a):
            await super().__init__(*a)
            self.pipeline.close()
            self.pipeline = StandInPipeline(args.call_ms / 1000, args.size)

    cfg = parse_config({"work_dir": str(root / "work"), "serve": {
        "model": str(folder), "decoder": str(decoder), "num_cpus": 1, "max_batch_size": args.max_batch,
        "max_ongoing_requests": 2 * args.clients, "sizes": [f"{args.size}x{args.size}"],
        "default_guidance_scale": 1.0, "hold_answers_s": args.hold_answers_s,
        "pipeline_process": False}})  # the stand-in replaces the loaded pipeline: no process needed for it
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        port = local.free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deployment = serve.deployment(name="ImageServer", max_ongoing_requests=2 * args.clients,
                                      ray_actor_options={"num_cpus": 1})(StandIn)
        serve.run(deployment.bind(cfg.serve.model_dump(mode="json"), resolve_model(cfg)), name="bench",
                  route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/images/generations"
        body = {"prompt": "a photo of a cat", "size": f"{args.size}x{args.size}", "num_inference_steps": 1,
                "guidance_scale": 1.0, "seed": 0, "output_format": args.output_format}
        load_test(url, args.clients, 1, body)  # warm
        ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
        pid = next(line.split()[0] for line in ps if "ServeReplica:bench" in line)
        stop, answered = threading.Event(), []

        def load():
            while not stop.is_set():
                answered.append(load_test(url, args.clients, 2, body))

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        time.sleep(2)  # the load under way
        n0, t0 = sum(r["requests"] for r in answered), time.perf_counter()
        raw = root / "gil.txt"
        subprocess.run([spy, "record", "--gil", "--threads", "--nonblocking", "-d", str(int(args.seconds)), "-r",
                        str(args.rate), "-f", "raw", "-o", str(raw), "-p", pid], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        took = time.perf_counter() - t0
        stop.set()
        loader.join()
        rows = answered[1:]  # levels that ran wholly under py-spy or after: their rate
        rate = sum(r["requests"] for r in rows) / sum(r["wall_s"] for r in rows) if rows else float("nan")
    finally:
        serve.shutdown()
        ray.shutdown()
    answers = rate * took
    print(f"### serve_gil: {args.clients} clients, {args.size} px {args.output_format} answers, batches of "
          f"{args.max_batch}, a {args.call_ms:g} ms stand-in pipeline call\n")
    print(f"`python bench/serve_gil.py {' '.join(sys.argv[1:])}`; {rate:.1f} answers/s; py-spy sampled "
          f"{took:.0f} s ({answers:.0f} answers; {n0} before it began); GIL held, ms per answer:\n")
    print("| holder | GIL ms per answer |\n|---|---|")
    print("\n".join(gil_report(raw, args.rate, answers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
