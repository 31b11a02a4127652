"""`distillery demo` end to end with reduced sizes, as a user runs it (its own process): local S3 and
MLflow servers, the built-in shapes data on S3, prepare → distill → tune → evaluate → register, then
Ray Serve answering over real HTTP until Ctrl-C stops everything."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import requests
from PIL import Image

from pipelines.local import free_port

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def repeated_warnings(log: str, at_most: int) -> dict[str, int]:
    """Warning/error lines of a log seen more than `at_most` times, once process ids, times and ids are taken out
    (the same message from another worker or another second is the same line)."""
    counts: dict[str, int] = {}
    for line in ANSI.sub("", log).splitlines():
        if not re.search(r"warn|error|fail", line, re.I):
            continue
        key = re.sub(r"^\(.*?pid=\d+.*?\)\s*", "", line)
        key = re.sub(r"\d{4}-\d\d-\d\d[ T][\d:,.]+|0x[0-9a-f]+|[0-9a-f]{16,}|pid=\d+|\b\d{4,}\b", "#", key)
        counts[key] = counts.get(key, 0) + 1
    return {k: n for k, n in counts.items() if n > at_most}


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    port = free_port()
    work = tmp_path / "demo"
    log = open(tmp_path / "demo.log", "wb")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for k in ("AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS"):  # the demo brings its own
        env.pop(k, None)
    proc = subprocess.Popen([sys.executable, "-m", "pipelines", "demo", "--small", "--port", str(port),
                             "--work-dir", str(work)], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 1200
        ready = False
        while time.time() < deadline and proc.poll() is None and not ready:
            try:
                ready = requests.get(url + "/readyz", timeout=2).status_code == 200
            except requests.RequestException:
                time.sleep(3)
        tail = (tmp_path / "demo.log").read_text(errors="replace")[-4000:]
        assert ready, f"the demo never served (exit code {proc.poll()}):\n{tail}"
        r = requests.post(url + "/v1/images/generations",
                          json={"prompt": "a red circle at the top left on a blue background", "seed": 1,
                                "num_inference_steps": 2}, timeout=120)
        assert r.status_code == 200, r.text
        img = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
        assert img.size == (64, 64)
        assert "distillery-student" in requests.get(url + "/v1/models", timeout=10).text
        deadline = time.time() + 60
        while "Ctrl-C stops the servers" not in (tmp_path / "demo.log").read_text(errors="replace"):
            assert time.time() < deadline, "the demo did not print its serving banner"
            time.sleep(1)
        # a minute of serving, as a user leaves it running: a request now and then, and nothing floods the terminal
        served_from = len((tmp_path / "demo.log").read_text(errors="replace"))
        for i in range(6):
            time.sleep(10)
            assert requests.post(url + "/v1/images/generations", json={"prompt": "two small blue squares",
                                 "seed": i, "num_inference_steps": 2}, timeout=120).status_code == 200
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, (tmp_path / "demo.log").read_text(errors="replace")[-4000:]
    summary = json.loads((work / "demo-summary.json").read_text())
    results = summary["results"]
    assert set(results) == {"prepare", "distill", "tune", "evaluate", "register"}
    assert results["register"]["alias"] == "champion"
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    assert metrics["params_student"] < metrics["params_teacher"]
    # the student draws what its held-out prompts say: each attribute read back from its images is right far more
    # often than chance (~0.3) or a broken pipeline (its 40-step demo scored 0.0 overall); the teacher is the check
    attrs = ("shape", "color", "size", "position", "count", "background")
    mean_attr = sum(metrics[f"caption_accuracy_{a}"] for a in attrs) / len(attrs)
    assert metrics["caption_accuracy_n"] >= 16 and metrics["caption_accuracy_teacher"] >= 0.5, metrics
    assert mean_attr >= 0.6, {k: v for k, v in metrics.items() if k.startswith("caption")}
    prompts = (work / "eval-prompts.txt").read_text().split("\n")
    from models.shapes import prompts as shape_prompts

    assert not set(prompts) & set(shape_prompts(64, 0)), "evaluation prompts must be held out from the demo's data"
    text = (tmp_path / "demo.log").read_text(errors="replace")
    assert "caption accuracy (held-out prompts)" in text and "of the teacher's caption accuracy: goal" in text
    # the terminal stays readable: no warning or error line over and over (one per training worker at most), no
    # progress bars redrawn into the log, one line per progress report, and nothing repeated while serving
    # (Ray's own notices come once per Ray Train run at most: the distill stage and the two tune trials)
    assert not repeated_warnings(text, at_most=3), repeated_warnings(text, at_most=3)
    assert not repeated_warnings(text[served_from:], at_most=1), text[served_from:][-3000:]
    assert "row/s]" not in text and "it/s]" not in text, "progress bars in a log"
    steps = re.findall(r"\[distill\] step (\d+)/", text)
    assert steps and len(steps) == len(set(steps)), steps
    # Ctrl-C stopped the servers it started
    with pytest.raises(requests.RequestException):
        requests.get(url + "/healthz", timeout=3)
