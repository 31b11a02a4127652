"""The one config: defaults, derived URIs, errors that name the field, the CLI's config commands."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from pipelines.config import ConfigError, load_config, parse_config


def test_defaults_and_derived_uris():
    cfg = parse_config({"work_dir": "s3://bucket/run1"})
    assert cfg.data.output == "s3://bucket/run1/cache"
    assert cfg.distill.cache == cfg.data.output
    assert cfg.evaluate.student == cfg.distill.output == "s3://bucket/run1/student"
    assert cfg.digest() == parse_config({"work_dir": "s3://bucket/run1"}).digest()


def test_local_paths_become_absolute_and_other_uris_stay(tmp_path, monkeypatch):
    # Ray workers run in folders of their own: a relative path must be resolved where the config is loaded
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-teacher").mkdir()
    cfg = parse_config({"work_dir": "./runs/x", "teacher": {"uri": "my-teacher"}, "data": {"source": "photos"},
                        "steps": {"student": "runwayml/stable-diffusion-v1-5"},
                        "evaluate": {"prompts": "builtin:shapes?n=10&seed=1", "output": "eval-here"},
                        "serve": {"model": "models:/distillery-student@champion"}})
    assert cfg.work_dir == str(tmp_path / "runs" / "x")
    assert cfg.distill.cache == str(tmp_path / "runs" / "x" / "cache")
    assert cfg.evaluate.output == str(tmp_path / "eval-here")
    assert cfg.teacher.uri == str(tmp_path / "my-teacher")  # a folder that is there
    assert cfg.data.source == "photos"  # no such folder: left for the preflight to name
    assert cfg.steps.student == "runwayml/stable-diffusion-v1-5"  # a hub id
    assert cfg.evaluate.prompts == "builtin:shapes?n=10&seed=1"
    assert cfg.serve.model == "models:/distillery-student@champion"
    again = parse_config(cfg.model_dump(mode="json"))
    assert again.model_dump() == cfg.model_dump()  # resolving twice changes nothing


def test_top_level_seed_seeds_every_stage_that_leaves_its_own_unset():
    from pipelines.prepare import split_of

    cfg = parse_config({"seed": 7, "distill": {"seed": 1}})
    assert (cfg.data.seed, cfg.tune.seed, cfg.evaluate.seed, cfg.distill.seed) == (7, 7, 7, 1)
    assert parse_config({}).data.seed == 0
    keys = [f"img{i}" for i in range(200)]
    split = {seed: [split_of(k, 0.2, parse_config({"seed": seed}).data.seed) for k in keys] for seed in (0, 7)}
    assert split[0] != split[7]  # the data stage's split follows the top-level seed


def test_unknown_key_names_the_field():
    with pytest.raises(ConfigError) as e:
        parse_config({"distill": {"max_stepz": 3}})
    assert "distill.max_stepz: unknown field" in str(e.value)


def test_bad_value_names_field_and_value():
    with pytest.raises(ConfigError) as e:
        parse_config({"distill": {"zero_stage": 5}, "data": {"crop": "diagonal"}})
    msg = str(e.value)
    assert "distill.zero_stage" in msg and "(got 5)" in msg
    assert "data.crop" in msg and '"diagonal"' in msg


def test_overrides_parse_as_yaml():
    cfg = parse_config({}, ["distill.max_steps=7", "student.preset=bk-tiny", "tune.lr=[0.1, 0.2]"])
    assert cfg.distill.max_steps == 7 and cfg.student.preset == "bk-tiny" and cfg.tune.lr == (0.1, 0.2)
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        parse_config({}, ["distill.max_steps"])


def test_cli_config_validate_and_show(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"name": "x", "distill": {"max_steps": 3}}))
    run = lambda *a: subprocess.run([sys.executable, "-m", "pipelines", *a], capture_output=True, text=True)
    ok = run("config", "validate", str(f))
    assert ok.returncode == 0 and "ok" in ok.stdout
    shown = yaml.safe_load(run("config", "show", str(f)).stdout)
    assert shown["distill"]["max_steps"] == 3 and shown["data"]["resolution"] == 64
    f.write_text("distill:\n  lr: -1\n")
    bad = run("config", "validate", str(f))
    assert bad.returncode == 2 and "distill.lr" in bad.stderr


def test_repo_configs_validate():
    from pathlib import Path

    configs = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))
    for c in configs:
        load_config(c)
