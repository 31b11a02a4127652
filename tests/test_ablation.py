"""An ablation through the product (tune.arms ranked on the evaluate stage's caption accuracy): its own file, so
that pytest's two workers can run it beside tests/test_tune.py's search."""

from __future__ import annotations

import json

import pandas as pd
from test_tune import read_uri

from pipelines.config import load_config


def test_ablation_ranks_arms_on_the_evaluate_stage_caption_accuracy(tmp_path, ray_local, mlflow_server):
    """Two arms through the product: the data stage's limited-data split of the shipped shapes teacher, each arm
    a distill-stage run to its export, scored by the evaluate stage's caption accuracy. The teacher-initialized
    arm (its images are the teacher's) must rank above the randomly initialized one (noise), whatever their
    validation losses say."""
    from PIL import Image

    from pipelines import prepare
    from pipelines.storage import join
    from tuning import search as tune_search

    tree = {"name": "abl", "work_dir": str(tmp_path), "stages": ["prepare", "tune"],
            "teacher": {"uri": "builtin:shapes-sd1"},
            "data": {"source": "builtin:shapes?n=24&seed=0&holdout=2", "resolution": 64, "val_fraction": 0.25,
                     "dedup": False, "min_side": 16},
            "student": {"preset": "identity"},
            "distill": {"batch_size": 4, "deepspeed": False, "val_batches": 1, "sample_steps": 1, "lr": 1e-5,
                        "sample_prompts": ["a large red circle at the center on a black background"]},
            "evaluate": {"prompts": "builtin:shapes?n=6&seed=10000", "steps": 10, "guidance_scale": 5.0,
                         "batch_size": 6},
            "tune": {"arms": [{"name": "scratch", "init": "random", "loss": {"out": 0.0, "feat": 0.0}},
                              {"name": "teacher-init"}],
                     "presets": ["identity"], "metric": "caption_accuracy", "steps_per_trial": 2,
                     "cpus_per_trial": 0.5, "latency_repeats": 1}}
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(json.dumps(tree))
    cfg = load_config(cfg_path)
    prepare.run(cfg)
    r = tune_search.run(cfg)
    assert r["trials"] == 2 and r["statuses"]["completed"] == 2 and r["teacher"] > 0.5
    table = pd.read_csv(read_uri(r["table"])).set_index("arm")
    assert table.loc["teacher-init", "caption_accuracy"] > table.loc["scratch", "caption_accuracy"]
    assert table.loc["teacher-init", "of_teacher"] >= 0.8  # two steps at lr 1e-5: still the teacher
    assert table.loc["scratch", "init"] == "random" and table.loc["scratch", "lambda_out"] == 0.0
    assert (table["train_s"] > 0).all() and (table["eval_s"] > 0).all() and (table["step"] == 2).all()
    # one preset, measured once before the trials trained (not beside them): one latency for both arms
    assert table["latency_ms"].nunique() == 1 and (table["latency_ms"] > 0).all()
    assert r["best"]["arm"] == "teacher-init"
    arms = pd.read_csv(read_uri(join(r["results"], "arms.csv")))
    assert arms["arm"].tolist() == ["teacher-init", "scratch"] and (arms["seeds"] == 1).all()
    md = read_uri(r["arms_table"]).getvalue().decode()
    assert md.index("teacher-init") < md.index("scratch") and "caption_accuracy" in md
    assert Image.open(read_uri(r["ablation_plot"])).format == "PNG"
    (tmp_path / "best.yaml").write_bytes(read_uri(r["best_config"]).getvalue())
    best = load_config(tmp_path / "best.yaml")
    assert best.student.init == "teacher" and best.student.preset == "identity" and "tune" not in best.stages

