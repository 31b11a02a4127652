"""A serve replica's pipeline in a child process (serving/replica_pipeline.py, serve.pipeline_process): it draws the
images the pipeline draws in-process, passes on errors and the first-step signal, and does not outlive its replica;
a replica whose pipeline process is killed answers 503 and is replaced by Serve."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest
import requests
from PIL import Image

from models.sampling import PHASES, ImageJob, load_pipeline, render_images
from pipelines.config import parse_config
from serving.replica_pipeline import (
    PipelineProcessError,
    PipelineSpec,
    ProcessPipeline,
    ThreadPipeline,
)


def _gone(pid: int, within_s: float) -> bool:
    """The process exited (a zombie counts: nobody may be left to reap an orphan) within `within_s`."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def process_pipeline(tiny_sd1_dir):
    pipeline = ProcessPipeline(PipelineSpec(str(tiny_sd1_dir), "cpu", sizes=["64x64", "32x32"]))
    yield pipeline
    pipeline.close()


def test_the_process_draws_the_in_process_images(process_pipeline, tiny_sd1_dir):
    """Two batches, one mixing sizes and steps: the child's images are the pixels render_images draws here and
    a ThreadPipeline draws, each job's own; the first-step signal comes once per group, and every phase is timed."""
    jobs = [ImageJob("a red circle", num_inference_steps=2, seed=3, width=64, height=64),
            ImageJob("a blue square", num_inference_steps=3, seed=4, width=32, height=32),
            ImageJob("a red circle", num_inference_steps=2, seed=5, width=64, height=64)]
    here = render_images(load_pipeline(str(tiny_sd1_dir)), jobs)
    thread = ThreadPipeline(PipelineSpec(str(tiny_sd1_dir), "cpu", sizes=["64x64"]))
    try:
        by_thread = thread.submit(jobs).result(timeout=120)
    finally:
        thread.close()
    signals = []
    done = process_pipeline.submit(jobs, on_denoise=lambda: signals.append(time.perf_counter())).result(timeout=120)
    assert process_pipeline.sizes == ["64x64", "32x32"] and process_pipeline.device == "cpu"
    assert [im.size for im in done.images] == [(64, 64), (32, 32), (64, 64)]
    for a, b, c in zip(here, by_thread.images, done.images, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(c)) and np.array_equal(np.asarray(b), np.asarray(c))
    assert not np.array_equal(np.asarray(done.images[0]), np.asarray(done.images[2]))  # each seed its own image
    assert len(signals) == 2  # at the first U-Net step of each group (of settings) of the call
    assert set(done.phases) == set(PHASES) and done.compiled is None


def test_an_error_in_the_process_fails_its_batch_only(process_pipeline):
    with pytest.raises(ValueError, match="divisible by 8"):
        process_pipeline.submit([ImageJob("bad", num_inference_steps=1, width=60, height=60)]).result(timeout=120)
    ok = process_pipeline.submit([ImageJob("good", num_inference_steps=1, width=32, height=32)]).result(timeout=120)
    assert ok.images[0].size == (32, 32) and process_pipeline.alive()


@pytest.mark.parametrize("sigchld", ["default", "ignored"])
def test_a_killed_process_is_reported_not_waited_for(tiny_sd1_dir, sigchld):
    """Also where SIGCHLD is ignored: the exited child is reaped at once, and multiprocessing's is_alive() then says
    True forever (as where another waitpid reaps it: the likelier story of CI's pytest worker, where this test failed
    while its child was gone)."""
    before = signal.signal(signal.SIGCHLD, signal.SIG_IGN if sigchld == "ignored" else signal.SIG_DFL)
    pipeline = ProcessPipeline(PipelineSpec(str(tiny_sd1_dir), "cpu", sizes=["32x32"]))
    try:
        os.kill(pipeline.pid, signal.SIGKILL)
        assert _gone(pipeline.pid, 10)
        deadline = time.monotonic() + 5  # a process exiting is a zombie for a moment, even where nobody reaps it
        while pipeline.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pipeline.alive()
        with pytest.raises(PipelineProcessError, match="exited"):
            pipeline.submit([ImageJob("x", num_inference_steps=1, width=32, height=32)]).result(timeout=30)
    finally:
        pipeline.close()
        signal.signal(signal.SIGCHLD, before)


def test_a_bad_model_fails_the_start_with_its_error(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path / "nothing")):
        ProcessPipeline(PipelineSpec(str(tmp_path / "nothing"), "cpu"))


def test_the_process_does_not_outlive_a_killed_replica(tiny_sd1_dir, tmp_path):
    """SIGKILL to the process that started the pipeline (a replica killed outright): the child exits."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import time
        from serving.replica_pipeline import PipelineSpec, ProcessPipeline
        if __name__ == "__main__":  # the spawned child imports this file too
            p = ProcessPipeline(PipelineSpec({str(tiny_sd1_dir)!r}, "cpu", sizes=["32x32"]))
            print(p.pid, flush=True)
            time.sleep(600)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        child = int(parent.stdout.readline())
        assert psutil.Process(child).ppid() == parent.pid
        parent.kill()
        parent.wait(timeout=10)
        assert _gone(child, 15), "the pipeline process outlived its replica"
    finally:
        parent.kill()


def test_a_replica_whose_pipeline_process_dies_is_replaced(ray_local, tiny_sd1_dir, tmp_path):
    """Over HTTP: the pipeline process of the only replica is killed; requests meanwhile get 503 (not a hang, not a
    500), Serve's health check finds it and replaces the replica, and the app answers again with the same image."""
    from ray import serve

    from pipelines import local
    from serving.app import build_app

    port = local.free_port()
    cfg = parse_config({"work_dir": str(tmp_path / "work"), "serve": {
        "model": str(tiny_sd1_dir), "num_cpus": 0.2, "port": port, "sizes": ["32x32"], "default_steps": 1,
        "health_check_period_s": 1}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="crash", route_prefix="/crash")
    url = f"http://127.0.0.1:{port}/crash/v1/images/generations"
    body = {"prompt": "a red circle", "seed": 11}
    try:
        first = requests.post(url, json=body, timeout=120)
        assert first.status_code == 200, first.text
        replicas = [p for p in psutil.process_iter(["cmdline"])
                    if "ServeReplica:crash" in " ".join(p.info["cmdline"] or [])]
        (child,) = [c for r in replicas for c in r.children() if "spawn_main" in " ".join(c.cmdline())]
        child.kill()
        answers = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            r = requests.post(url, json=body, timeout=120)
            answers.append(r.status_code)
            if r.status_code == 200:
                break
            assert r.status_code == 503 and "pipeline process exited" in r.json()["error"]["message"], r.text
            time.sleep(0.5)
        assert answers[-1] == 200, answers
        before = np.asarray(Image.open(io.BytesIO(_b64(first))))
        assert np.array_equal(before, np.asarray(Image.open(io.BytesIO(_b64(r)))))
    finally:
        serve.shutdown()


def _b64(resp) -> bytes:
    import base64

    return base64.b64decode(resp.json()["data"][0]["b64_json"])
