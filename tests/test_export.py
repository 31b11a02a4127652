"""Exported students are Hub models: a model card, an fp16 variant, and `distillery student push` publishing the
folder with huggingface_hub, checked from the outside (plain diffusers, huggingface_hub's own ModelCard and
snapshot_download) against a local Hub stand-in (tests/hub_standin.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hub_standin import HubStandIn

TOKEN = "hf_standin_secret_token_0123456789"


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def _image(folder: str | Path, **kw) -> np.ndarray:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, safety_checker=None, **kw)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle", height=64, width=64, num_inference_steps=2, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(0), output_type="np")
    return out.images[0]


@pytest.fixture(scope="module")
def built(tiny_sd1_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "bk-small"
    r = _cli("student", "build", "--teacher", str(tiny_sd1_dir), "--preset", "bk-small", "--out", str(out),
             "--fp16-variant")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_student_folder_has_a_card_and_an_fp16_variant(built):
    from diffusers import DiffusionPipeline
    from huggingface_hub import ModelCard

    card = ModelCard.load(built / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert {"diffusion-distillery", "knowledge-distillation", "text-to-image"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local teacher is no Hub model
    assert "| preset | bk-small |" in card.text and "Not evaluated yet" in card.text
    assert 'variant="fp16"' in card.text  # the card shows how to load what the folder holds

    fp16 = sorted(p.relative_to(built).as_posix() for p in built.rglob("*.fp16.safetensors"))
    assert fp16 == ["text_encoder/model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
                    "vae/diffusion_pytorch_model.fp16.safetensors"]
    half = DiffusionPipeline.from_pretrained(built, variant="fp16", dtype=torch.float16)
    full = DiffusionPipeline.from_pretrained(built)
    assert half.unet.dtype == torch.float16 and half.text_encoder.dtype == torch.float16
    assert full.unet.dtype == torch.float32 and full.text_encoder.dtype == torch.float32  # configs left fp32
    for name, p in full.unet.state_dict().items():  # the variant is the same weights, rounded
        torch.testing.assert_close(half.unet.state_dict()[name].float(), p, atol=2e-3, rtol=2e-3)


def test_push_publishes_a_loadable_model_repo(built, tmp_path, monkeypatch):
    import huggingface_hub.constants
    from huggingface_hub import ModelCard, snapshot_download

    # the suite runs offline (nothing downloads); these calls reach the stand-in on 127.0.0.1 only
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with HubStandIn(TOKEN) as hub:
        r = _cli("student", "push", str(built), "--repo-id", "someone/shapes-student", "--endpoint", hub.url,
                 env={"HF_TOKEN": TOKEN, "HF_HUB_DISABLE_TELEMETRY": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        assert TOKEN not in r.stdout + r.stderr
        answer = json.loads(r.stdout)
        repo = hub.repos["someone/shapes-student"]
        assert repo.private  # private unless --public
        assert answer["commit"] == repo.sha and len(repo.commits) == 1  # one commit
        assert set(hub.auth_seen) == {f"Bearer {TOKEN}"}
        local = {p.relative_to(built).as_posix() for p in built.rglob("*") if p.is_file()}
        assert set(repo.files) == local
        assert repo.files["unet/diffusion_pytorch_model.safetensors"] == \
            (built / "unet/diffusion_pytorch_model.safetensors").read_bytes()

        # an outsider downloads it with huggingface_hub and loads it with plain diffusers
        got = snapshot_download("someone/shapes-student", endpoint=hub.url, token=TOKEN,
                                cache_dir=str(tmp_path / "hf-cache"))
        card = ModelCard.load(Path(got) / "README.md")
        assert 'from_pretrained("someone/shapes-student"' in card.text and str(built) not in card.text
        np.testing.assert_allclose(_image(got), _image(built), atol=1e-5)

        # pushing again (a new evaluation, say) adds a commit to the same repo
        r = _cli("student", "push", str(built), "--repo-id", "someone/shapes-student", "--endpoint", hub.url,
                 "--message", "again", env={"HF_TOKEN": TOKEN})
        assert r.returncode == 0, r.stderr[-3000:]
        assert len(repo.commits) == 2

        # no token: the Hub refuses, and the error says so without a traceback
        r = _cli("student", "push", str(built), "--repo-id", "someone/other", "--endpoint", hub.url,
                 env={"HF_TOKEN": "hf_wrong", "HF_HOME": str(tmp_path / "empty-home")})
        assert r.returncode != 0 and "someone/other" not in hub.repos
        assert "401" in r.stderr or "credentials" in r.stderr.lower(), r.stderr[-2000:]


def test_push_refuses_a_folder_that_is_no_pipeline(tmp_path):
    (tmp_path / "unet").mkdir()
    r = _cli("student", "push", str(tmp_path), "--repo-id", "someone/x", "--endpoint", "http://127.0.0.1:9")
    assert r.returncode != 0
    assert "model_index.json" in r.stderr and str(tmp_path) in r.stderr
