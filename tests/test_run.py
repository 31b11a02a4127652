"""`distillery run` (pipelines/run.py): the stage order, real stages on a tiny config in the local Ray, a rerun
that skips the finished stage, and a failing stage that stops the run with its error."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipelines.config import parse_config
from pipelines.run import run_all, stage_order

REPO = Path(__file__).resolve().parents[1]


def test_stage_order_keeps_the_config_order_and_runs_serve_last():
    stages = ["prepare", "distill", "evaluate", "register"]
    assert stage_order(stages) == stages
    assert stage_order(["serve", "prepare", "register"]) == ["prepare", "register", "serve"]
    assert stage_order(["prepare", "prepare", "distill"]) == ["prepare", "distill"]
    assert stage_order([]) == []


def _config(tmp: Path, source: str, stages: list[str]):
    """configs/demo.yaml with tiny sizes and the given stages."""
    tree = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    tree.update(work_dir=str(tmp / "work"), stages=stages)
    tree["data"].update(source=source, resolution=32, val_fraction=0.25, embed_batch_size=4)
    return parse_config(tree, source="test")


def _dataset(folder: Path, n: int) -> str:
    folder.mkdir(parents=True)
    for i in range(n):
        rng = np.random.default_rng(100 + i)
        a = np.empty((40, 40, 3), np.uint8)
        a[:] = rng.integers(0, 200, 3)
        a[5:20, 10:30] = rng.integers(200, 256, 3)
        Image.fromarray(a).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"a bright rectangle, picture {i}")
    return str(folder)


def test_run_all_runs_the_stages_and_a_rerun_skips_finished_ones(ray_local, tmp_path, caplog):
    cfg = _config(tmp_path, _dataset(tmp_path / "data", 6), ["prepare"])
    with caplog.at_level(logging.INFO, logger="pipelines.run"):
        first = run_all(cfg)
    assert list(first) == ["prepare"]
    assert first["prepare"]["status"] == "prepared" and first["prepare"]["new_rows"] == 6
    assert sum(first["prepare"]["rows"].values()) == 6
    assert (Path(cfg.data.output) / "manifest.json").exists()
    text = caplog.text
    assert "stage 1/1 prepare: start" in text and "stage 1/1 prepare: done in" in text
    assert text.index("prepare: start") < text.index("prepare: done")

    t0 = time.perf_counter()
    again = run_all(cfg)
    assert again["prepare"]["status"] == "already complete"
    assert again["prepare"]["rows"] == first["prepare"]["rows"]
    assert time.perf_counter() - t0 < 10  # a finished stage returns without doing the work again


def test_missing_inputs_stop_the_run_before_any_stage(tmp_path, caplog):
    from pipelines.config import ConfigError

    missing = str(tmp_path / "no-such-data")
    cfg = _config(tmp_path, missing, ["prepare", "distill"])
    with caplog.at_level(logging.INFO, logger="pipelines.run"), pytest.raises(ConfigError, match="data.source"):
        run_all(cfg)
    assert "start" not in caplog.text


def test_a_failing_stage_stops_the_run_with_its_error(ray_local, tmp_path, caplog):
    empty = tmp_path / "no-images-here"  # exists (so the preflight passes), but holds nothing to read
    empty.mkdir()
    (empty / "notes.md").write_text("nothing")
    cfg = _config(tmp_path, str(empty), ["prepare", "distill"])
    with caplog.at_level(logging.INFO, logger="pipelines.run"), pytest.raises(ValueError, match="format"):
        run_all(cfg)
    assert "stage 1/2 prepare: failed after" in caplog.text
    assert "distill: start" not in caplog.text  # the stages after a failure do not run
    assert not Path(cfg.distill.output).exists()
