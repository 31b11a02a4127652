"""A serve replica's pipeline: loaded, warmed up (and with serve.compile, compiled) at replica start, then called
one batch at a time. Two homes for it, one interface (`submit`):

- `ProcessPipeline` (serve.pipeline_process, the default): the pipeline lives in a child process of the replica
  and has a GIL of its own. The pipeline thread of a launch-bound call gives the GIL up at every torch op and must
  win it back; in the replica's own process it competes with everything that answers requests (Ray Serve, FastAPI,
  the answers' encoding and JSON: several ms of GIL per answer, bench/serve_gil.py), which slowed a served
  few-step batch to 0.6-0.8x of the same call in-process (bench/RESULTS.md). The replica sends a batch's jobs
  through a pipe and receives the images as raw 8-bit pixels; the child exits when the replica goes (its pipe
  closes, or its parent process changes).
- `ThreadPipeline`: in the replica's process, on one thread of its own (a pipeline call on a thread new to it
  took ~3x as long, and CUDA graphs recorded by serve.compile stay on the thread that replays them).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.sampling import ImageJob, array_to_pil, compile_unet, load_pipeline, render_images
from serving.schemas import parse_size

log = logging.getLogger("distillery.serve")


@dataclass(frozen=True)
class PipelineSpec:
    """What a replica's pipeline is and how it is prepared (from ServeConfig and the fetched model folder)."""

    folder: str
    device: str  # "cuda" or "cpu"; cuda falls back to cpu where no GPU is visible
    decoder: str | None = None  # a local decoder folder (serve.decoder)
    sizes: list[str] | None = None  # "WxH"; None: served_sizes
    compile: bool = False
    compile_mode: str = "reduce-overhead"
    compile_batches: list[int] = field(default_factory=lambda: [1])
    guidance_scale: float = 7.5  # the compiled graphs' (serve.default_guidance_scale)


def served_sizes(folder: str, pipe: Any) -> list[str]:
    """serve.sizes left unset: the sizes the student was trained at (its distillery.json), else the pipeline's
    native square size."""
    from models.student import read_meta_file

    trained = read_meta_file(Path(folder)).sizes if Path(folder).is_dir() else None
    if trained:
        return trained
    side = int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
    return [f"{side}x{side}"]


class Rendering:
    """What one `submit` gives: the images (PIL, in the jobs' order; uint8 arrays inside the pipeline process), the
    call's phases (models.sampling.PHASES; empty where not measured) and whether every U-Net call ran a compiled
    graph (None without serve.compile)."""

    def __init__(self, images: list[Any], phases: dict[str, float], compiled: bool | None):
        self.images, self.phases, self.compiled = images, phases, compiled


class _Loaded:
    """The pipeline of a spec, warmed up and (spec.compile) compiled; `run(fn, *args)` makes each warm-up call."""

    def __init__(self, spec: PipelineSpec, run: Callable[..., Any]):
        import torch

        self.device = "cuda" if spec.device == "cuda" and torch.cuda.is_available() else "cpu"
        self.pipe = load_pipeline(spec.folder, self.device, spec.decoder)
        self.sizes = spec.sizes or served_sizes(spec.folder, self.pipe)
        w, h = parse_size(self.sizes[0])
        run(render_images, self.pipe, [ImageJob("warm up", num_inference_steps=1, width=w, height=h)])
        self.compiled = None
        self.batch_sizes = None
        if spec.compile:
            t0 = time.perf_counter()
            self.compiled = compile_unet(self.pipe, spec.compile_mode, [parse_size(s) for s in self.sizes],
                                         spec.compile_batches, spec.guidance_scale, run=run)
            self.batch_sizes = spec.compile_batches
            log.info("compiled the U-Net for %d shapes in %.0f s", len(self.compiled.shapes), time.perf_counter() - t0)

    def render(self, jobs: list[ImageJob], on_denoise: Callable[[], None] | None, pil: bool = True) -> Rendering:
        eager_before, phases = self.compiled.eager_calls if self.compiled else 0, {}
        images = render_images(self.pipe, jobs, self.batch_sizes, phases, on_denoise, pil)
        return Rendering(images, phases, self.compiled.eager_calls == eager_before if self.compiled else None)


class ReplicaPipeline:
    """The shared shell: `submit(jobs, on_denoise)` runs one call on the one thread that makes all of them."""

    sizes: list[str]
    device: str

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline")

    def submit(self, jobs: list[ImageJob], on_denoise: Callable[[], None] | None = None) -> Future[Rendering]:
        """`on_denoise` is called, on the pipeline thread, once the call's first U-Net step is launched."""
        return self._thread.submit(self._render, jobs, on_denoise)

    def _render(self, jobs: list[ImageJob], on_denoise: Callable[[], None] | None) -> Rendering:
        raise NotImplementedError

    def alive(self) -> bool:
        return True

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


class ThreadPipeline(ReplicaPipeline):
    """The pipeline in the replica's process (serve.pipeline_process false)."""

    def __init__(self, spec: PipelineSpec):
        super().__init__()
        self._loaded = _Loaded(spec, run=lambda fn, *a: self._thread.submit(fn, *a).result())
        self.sizes, self.device = self._loaded.sizes, self._loaded.device

    def _render(self, jobs: list[ImageJob], on_denoise: Callable[[], None] | None) -> Rendering:
        return self._loaded.render(jobs, on_denoise)


class PipelineProcessError(RuntimeError):
    """The pipeline process exited, or could not be started."""


class ProcessPipeline(ReplicaPipeline):
    """The pipeline in a child process of the replica (serve.pipeline_process, the default). Blocks until the child
    has loaded, warmed up and compiled it; raises what the child raised doing so."""

    def __init__(self, spec: PipelineSpec):
        super().__init__()
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked CUDA or Ray state
        self._conn, child_end = ctx.Pipe()
        # not daemonic: a daemonic process may not start processes, and torch.compile's may
        self._proc = ctx.Process(target=serve_pipeline, args=(child_end, spec, os.getpid()),
                                 name="distillery-pipeline")
        self._proc.start()
        child_end.close()  # the child holds the only other end: its exit reads as EOF here
        kind, info = self._receive()
        if kind == "error":
            self.close()
            raise info
        self.sizes, self.device = info["sizes"], info["device"]
        log.info("pipeline process %d ready on %s", self._proc.pid, self.device)

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def _gone(self) -> PipelineProcessError:
        self._proc.join(timeout=5)
        return PipelineProcessError(f"the pipeline process exited (exit code {self._proc.exitcode}); its log is "
                                    "the replica's")

    def _receive(self) -> tuple[str, Any]:
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            raise self._gone() from None

    def _render(self, jobs: list[ImageJob], on_denoise: Callable[[], None] | None) -> Rendering:
        try:
            self._conn.send((jobs, on_denoise is not None))
        except OSError:
            raise self._gone() from None
        while (msg := self._receive())[0] == "started":
            on_denoise()
        kind, info = msg
        if kind == "error":
            raise info
        shapes, phases, compiled = info
        images = []
        for shape in shapes:
            try:
                data = self._conn.recv_bytes()
            except (EOFError, OSError):
                raise self._gone() from None
            images.append(array_to_pil(np.frombuffer(data, dtype=np.uint8).reshape(shape)))  # (H, W, C)
        return Rendering(images, phases, compiled)

    def alive(self) -> bool:
        if not self._proc.is_alive():
            return False
        try:  # where SIGCHLD is ignored the exited child is reaped at once, and is_alive() cannot tell
            os.kill(self._proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def close(self) -> None:
        super().close()
        self._conn.close()  # the child reads EOF and exits
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=5)


def _picklable(err: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")


def _exit_with_parent(parent_pid: int) -> None:
    # a replica killed outright (SIGKILL) closes its pipe, which the child reads as EOF only between calls: this
    # also ends a child that is busy (a long compile) once the replica is gone
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(0)


def serve_pipeline(conn: Any, spec: PipelineSpec, parent_pid: int) -> None:
    """The child process: load, warm up and compile, say "ready", then render each batch the replica sends, until
    its pipe closes. Messages out: ("ready", info) or ("error", exception) once; per batch optionally ("started",
    None) at the first U-Net step, then ("done", (shapes, phases, compiled)) and each image's pixels as raw bytes,
    or ("error", exception)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s (pipeline process) %(message)s")
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    try:
        loaded = _Loaded(spec, run=lambda fn, *a: fn(*a))
    except BaseException as err:  # noqa: BLE001 (to the replica, which raises it)
        conn.send(("error", _picklable(err)))
        return
    conn.send(("ready", {"sizes": loaded.sizes, "device": loaded.device}))

    def started() -> None:  # the replica's on_denoise, across the pipe
        conn.send(("started", None))

    while True:
        try:
            jobs, want_started = conn.recv()
        except (EOFError, OSError):
            return  # the replica is gone
        try:
            done = loaded.render(jobs, started if want_started else None, pil=False)
        except Exception as err:  # noqa: BLE001 (this batch's requests fail; the next batch runs)
            conn.send(("error", _picklable(err)))
            continue
        try:
            conn.send(("done", ([p.shape for p in done.images], done.phases, done.compiled)))
            for p in done.images:
                conn.send_bytes(p.reshape(-1))  # (H, W, C) contiguous -> flat bytes
        except OSError:
            return
