"""`distillery run CONFIG`: the job entrypoint. Runs the config's stages in order, one after another.

Each stage module (STAGE_MODULES) owns its idempotence: a stage whose output is already
complete returns quickly, so rerunning a job after a failure resumes where it stopped. "serve" blocks
until the server is stopped, so it always runs last.
"""

from __future__ import annotations

import importlib
import logging
import time
from typing import Any

from pipelines.config import Config, ConfigError

log = logging.getLogger(__name__)

# the stage table: stage name -> module with `run(cfg) -> dict`
STAGE_MODULES = {
    "prepare": "pipelines.prepare",
    "distill": "pipelines.distill",
    "steps": "pipelines.fewstep",
    "tune": "tuning.search",
    "evaluate": "pipelines.evaluate",
    "register": "pipelines.register",
    "serve": "serving.app",
}


def stage_order(stages: list[str]) -> list[str]:
    """The stages to run: the config's order, each once, with "serve" (which blocks) moved to the end."""
    order = list(dict.fromkeys(stages))
    if "serve" in order and order[-1] != "serve":
        log.warning("stages: 'serve' blocks, so it runs last (after %s)", ", ".join(s for s in order if s != "serve"))
        order = [s for s in order if s != "serve"] + ["serve"]
    return order


def preflight(cfg: Config, stages: list[str]) -> None:
    """The inputs the stages will read, checked before Ray starts: raises ConfigError naming the config field."""
    from pipelines.storage import exists

    t = cfg.teacher.uri
    local = t.startswith(("/", "./", "../", "~", "file://")) or (not t.startswith("builtin:") and "://" not in t
                                                                and t.count("/") != 1)
    path = t.removeprefix("file://")
    if any(s in stages for s in ("prepare", "distill", "steps", "tune", "evaluate")) and local:
        from pathlib import Path

        if not (Path(path).expanduser() / "model_index.json").is_file():
            what = "no such folder" if not Path(path).expanduser().exists() else "no model_index.json there"
            raise ConfigError(f"teacher.uri {t!r}: {what} (give a diffusers pipeline folder, a hub id or s3://)")
    src = cfg.data.source
    if "prepare" in stages:
        if not src:
            raise ConfigError("data.source is not set: give the images+captions URI (local path or s3://)")
        if not src.startswith("builtin:") and not exists(src):
            raise ConfigError(f"data.source {src!r}: no such file or folder")


def run_all(cfg: Config) -> dict[str, Any]:
    """Run every stage of cfg.stages; returns {stage: what its run(cfg) returned}. A failing stage raises,
    naming the stage, and the stages after it do not run."""
    order = stage_order(list(cfg.stages))
    preflight(cfg, order)
    results: dict[str, Any] = {}
    t_all = time.perf_counter()
    for i, name in enumerate(order, 1):
        log.info("stage %d/%d %s: start", i, len(order), name)
        t0 = time.perf_counter()
        try:
            results[name] = importlib.import_module(STAGE_MODULES[name]).run(cfg)
        except Exception as err:
            log.error("stage %d/%d %s: failed after %.1fs: %s", i, len(order), name, time.perf_counter() - t0, err)
            raise
        log.info("stage %d/%d %s: done in %.1fs", i, len(order), name, time.perf_counter() - t0)
    log.info("run %s: %d stage(s) done in %.1fs", cfg.name, len(order), time.perf_counter() - t_all)
    return results
