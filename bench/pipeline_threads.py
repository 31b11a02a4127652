"""Diagnostic for issue 28 (GPU only): the 4-step TAESD bk-small of bench/serve_latency.py, one pipeline call of 16
images at 512 px, timed on different threads, in this process and in a Ray actor (num_cpus=1, as a replica):
  main                the calling thread          one_thread     a one-worker ThreadPoolExecutor (serving/app.py)
  fresh_thread        a new thread per call       to_thread_*    asyncio.to_thread (its pool hands a call to any
                                                                 thread), with or without the last batch's PNGs
                                                                 encoding in the same pool meanwhile
Median of 8 calls after 3 warm-up calls each; JSON to $OUT/probe.json (default /tmp). Not a product stage: it times
the pipeline function the replica calls, to find where a served batch loses time.

  python bench/pipeline_threads.py
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models.sampling import ImageJob, encode_png, load_pipeline, render_images  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp"), "probe.json")


def batch_jobs(n: int = 16, steps: int = 4) -> list[ImageJob]:
    return [ImageJob("a photo of a cat", num_inference_steps=steps, width=512, height=512, seed=i,
                     guidance_scale=1.0) for i in range(n)]


def summary(ms: list[float]) -> dict:
    return {"median_ms": statistics.median(ms), "all": [round(x) for x in ms]}


def timed(call, n: int = 8) -> dict:
    for _ in range(3):
        call()
    ms = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        torch.cuda.synchronize()
        ms.append(1000 * (time.perf_counter() - t0))
    return summary(ms)


def cases(pipe, prefix: str, res: dict, save=lambda: None) -> None:
    jobs = batch_jobs()
    res[prefix + "main"] = timed(lambda: render_images(pipe, jobs))
    save()
    one = ThreadPoolExecutor(1)
    res[prefix + "one_thread"] = timed(lambda: one.submit(render_images, pipe, jobs).result())
    save()

    def fresh():
        th = threading.Thread(target=render_images, args=(pipe, jobs))
        th.start()
        th.join()

    res[prefix + "fresh_thread"] = timed(fresh)
    save()
    # as the replica did: the pipeline in asyncio.to_thread while the previous batch's PNGs encode in to_thread
    loop = asyncio.new_event_loop()
    prev = render_images(pipe, jobs)

    async def with_png() -> float:
        nonlocal prev
        pngs = asyncio.gather(*[asyncio.to_thread(encode_png, im, 1) for im in prev])
        t0 = time.perf_counter()
        images = await asyncio.to_thread(render_images, pipe, jobs)
        dt = 1000 * (time.perf_counter() - t0)
        await pngs
        prev = images
        return dt

    res[prefix + "to_thread_with_png"] = summary([loop.run_until_complete(with_png()) for _ in range(11)][3:])
    save()
    res[prefix + "to_thread_no_png"] = timed(
        lambda: loop.run_until_complete(asyncio.to_thread(render_images, pipe, jobs)))
    save()


def main() -> None:
    from bench.serve_latency import build_models

    root = Path(tempfile.mkdtemp())
    os.environ.setdefault("DISTILLERY_CACHE", str(root / "cache"))
    folder, decoder = build_models(False, root)["student-taesd"]
    res: dict = {}

    def save() -> None:
        OUT.write_text(json.dumps(res, indent=1))

    pipe = load_pipeline(str(folder), "cuda", str(decoder))
    cases(pipe, "proc/", res, save)
    del pipe
    torch.cuda.empty_cache()

    import ray

    ray.init(include_dashboard=False, runtime_env={"env_vars": {"DISTILLERY_CACHE": os.environ["DISTILLERY_CACHE"]}})

    @ray.remote(num_gpus=1, num_cpus=1)
    class Probe:
        def run(self, folder: str, decoder: str) -> dict:
            out = {"actor_torch_threads": torch.get_num_threads()}
            cases(load_pipeline(folder, "cuda", decoder), "actor/", out)
            return out

    res.update(ray.get(Probe.remote().run.remote(str(folder), str(decoder))))
    save()
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
