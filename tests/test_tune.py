"""The tune stage: the search space, objectives and winner without Ray; then a real search on tiny-sd1 (local
Ray with 2 CPUs, a real MLflow server): 2 trials of 3 steps with Optuna (multi-objective) and ASHA write the
trials table, the Pareto plot and a best config that `distillery distill` accepts, with an MLflow parent run
and one child run per trial, Tune's storage on S3 (the local S3 server); a rerun returns the results, and
without them the search is restored, not redone."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pandas as pd
import pytest
from test_distill import make_cache

from pipelines.config import ConfigError, load_config, parse_config
from tuning import space

# --- pure: space, objective, Pareto front, winner ----------------------------------------------------


@pytest.fixture(scope="module")
def unet_configs():
    from models.tiny import SD1_UNET, SDXL_UNET

    return {"sd1": dict(SD1_UNET), "sdxl": dict(SDXL_UNET)}


def test_spec_from_sample_per_stage(unet_configs):
    from models.student import student_config

    tc = parse_config({"tune": {"search_spec": True, "mid": ["none", "resnet"]}}).tune
    dims = space.spec_dimensions(unet_configs["sd1"], tc)
    assert dims == {"pairs0": [1, 2], "pairs1": [1, 2], "pairs2": [1, 2], "pairs3": [1, 2], "mid": ["none", "resnet"]}
    preset, spec = space.spec_from_sample({"pairs0": 1, "pairs1": 2, "pairs2": 1, "pairs3": 1, "mid": "none"},
                                          unet_configs["sd1"])
    assert preset is None and spec.down == [[0], [0, 1], [0], [0]]
    assert spec.up == [[0, 2], [0, 2], [0, 1, 2], [0, 2]] and spec.mid == "none"  # up u mirrors down 3-u
    # SDXL: transformer depth is searched where the teacher's is deeper than 1 (stage 1: 2, stage 2: 10)
    dims = space.spec_dimensions(unet_configs["sdxl"], tc)
    assert dims["depth_down2"] == [1, 2, 5, 10] and dims["depth_down1"] == [1, 2] and "depth_down0" not in dims
    sample = {"pairs0": 2, "pairs1": 2, "pairs2": 1, "depth_down2": 5, "depth_up0": 2, "mid": "resnet"}
    _, spec = space.spec_from_sample(sample, unet_configs["sdxl"])
    assert spec.down_depths == [[], [2, 2], [5]] and spec.up_depths[0] == [2, 2] and spec.up_depths[2] == []
    student = student_config(unet_configs["sdxl"], spec)  # a valid student
    assert student["mid_block_type"] == "UNetMidBlock2D"
    space.check_space(unet_configs["sdxl"], tc)


def test_space_errors_name_the_field(unet_configs):
    tc = parse_config({"tune": {"presets": ["bk-small", "ssd-1b"]}}).tune
    with pytest.raises(ValueError, match="tune.presets: 'ssd-1b' does not fit the teacher"):
        space.check_space(unet_configs["sd1"], tc)
    with pytest.raises(ConfigError, match=r"tune: .*lr \[0.001, 0.0001\]: need 0 <= low <= high"):
        parse_config({"tune": {"lr": [1e-3, 1e-4]}})
    with pytest.raises(ConfigError, match="presets is empty"):
        parse_config({"tune": {"presets": []}})
    with pytest.raises(ConfigError, match="val_every"):
        parse_config({"tune": {"steps_per_trial": 4, "val_every": 5}})


def test_param_space_samples_only_ranges(unet_configs):
    from ray import tune

    tc = parse_config({"tune": {"lambda_out": [1.0, 1.0], "lr": [1e-4, 1e-3]}}).tune
    ps = space.param_space(unet_configs["sd1"], tc)
    assert set(ps) == {"preset", "lambda_feat", "lr"}  # lambda_task and lambda_out are fixed
    assert isinstance(ps["lr"], tune.search.sample.Float) and ps["preset"].categories == tc.presets
    # the newer KD terms are searchable too, and a sampled weight lands in the trial's distill.loss
    tc = parse_config({"tune": {"lambda_self_attn": [0.1, 1.0], "lambda_attn": [0.5, 0.5]}}).tune
    ps = space.param_space(unet_configs["sd1"], tc)
    assert "lambda_self_attn" in ps and "lambda_attn" not in ps
    cfg = parse_config({"tune": {"lambda_self_attn": [0.1, 1.0], "lambda_attn": [0.5, 0.5]}})
    t = space.trial_config(cfg, {"preset": "bk-small", "lambda_self_attn": 0.3}, None, "bk-small", "/tmp/t", "r")
    assert (t.distill.loss.self_attn, t.distill.loss.attn) == (0.3, 0.5)


def test_objective_budgets_and_winner():
    tc = parse_config({"tune": {"latency_budget_ms": 10.0, "param_budget": 1000}}).tune
    assert space.objective(0.5, 9.0, 900, tc) == 0.5
    over_a, over_b = space.objective(0.1, 12.0, 900, tc), space.objective(0.1, 20.0, 900, tc)
    assert 0.5 < over_a < over_b  # any trial within budget beats any outside; less excess is better

    def row(i, q, lat, p=500, completed=True):
        return {"trial_id": str(i), "val_loss": q, "latency_ms": lat, "params": p, "completed": completed,
                "objective": space.objective(q, lat, p, tc)}

    rows = [row(0, 0.2, 30.0), row(1, 0.4, 8.0), row(2, 0.3, 9.0), row(3, 0.1, 5.0, completed=False)]
    assert space.pick_best(rows, tc)["trial_id"] == "2"  # scalar: best loss within budget, among completed
    assert space.pareto_front([(r["val_loss"], r["latency_ms"]) for r in rows[:3]]) == [True, True, True]
    assert space.pareto_front([(1, 1), (2, 2), (1, 3), (0.5, 4)]) == [True, False, False, True]
    multi = parse_config({"tune": {"objective": "multi"}}).tune
    # no budget: the front point nearest the ideal (scaled), not an extreme
    rows = [row(0, 0.1, 30.0), row(1, 0.9, 5.0), row(2, 0.2, 8.0), row(3, 0.5, 20.0)]
    assert space.pick_best(rows, multi)["trial_id"] == "2"


def test_trial_and_best_configs():
    from models.student import RemovalSpec

    cfg = parse_config({"name": "x", "work_dir": "/tmp/w", "stages": ["prepare", "tune", "distill"],
                        "distill": {"num_workers": 4, "max_steps": 1000, "warmup_steps": 50},
                        "tune": {"steps_per_trial": 8, "cpus_per_trial": 2, "gpus_per_trial": 1}})
    sample = {"preset": "bk-tiny", "lambda_out": 0.7, "lambda_feat": 0.0, "lr": 2e-4}
    spec = RemovalSpec(down=[[0]] * 3, up=[[0, 2]] * 3, mid="none", drop_inner=1)
    t = space.trial_config(cfg, sample, spec, "bk-tiny", "/tmp/w/tune/trials/e", "abc")
    d = t.distill
    assert (d.num_workers, d.use_gpu, d.resources_per_worker) == (1, True, {"CPU": 2.0, "GPU": 1.0})
    assert (d.max_steps, d.val_every, d.checkpoint_every, d.warmup_steps) == (8, 2, 8, 7)
    assert (d.loss.task, d.loss.out, d.loss.feat, d.lr) == (1.0, 0.7, 0.0, 2e-4)
    assert d.storage_path == "/tmp/w/tune/trials/e" and d.run_name == "abc" and t.student.preset == "bk-tiny"
    row = {"preset": None, "spec": spec.to_dict(), "lambda_task": 1.0, "lambda_out": 0.7, "lambda_feat": 0.0,
           "lambda_attn": 0.0, "lambda_self_attn": 0.25, "lr": 2e-4}
    best = space.best_config(cfg, row)
    assert best.student.preset is None and best.student.spec.down == [[0]] * 3 and best.student.spec.drop_inner == 1
    assert best.distill.max_steps == 1000 and best.distill.num_workers == 4 and best.stages == ["prepare", "distill"]
    assert best.distill.loss.self_attn == 0.25


ARMS = [{"name": "scratch", "init": "random", "loss": {"out": 0.0, "feat": 0.0}},
        {"name": "feat-kd", "presets": ["bk-base", "bk-small"], "loss": {"feat": 1.0, "level": "layer"}}]


def test_ablation_arms_grid_trials_and_best_config():
    from models.student import RemovalSpec

    cfg = parse_config({"name": "x", "work_dir": "/tmp/w", "stages": ["tune"],
                        "distill": {"lr": 3e-4, "seed": 9, "loss": {"attn": 0.5}},
                        "tune": {"arms": ARMS, "presets": ["bk-small"], "seeds": [0, 1], "steps_per_trial": 4,
                                 "metric": "caption_accuracy"}})
    tc = cfg.tune
    assert tc.scheduler_name() == "fifo"  # quality is measured once a trial ends: nothing stops trials early
    variants = space.arm_variants(tc)
    assert [(v["arm"], v["preset"], v["seed"]) for v in variants] == [
        ("scratch", "bk-small", 0), ("scratch", "bk-small", 1), ("feat-kd", "bk-base", 0), ("feat-kd", "bk-base", 1),
        ("feat-kd", "bk-small", 0), ("feat-kd", "bk-small", 1)]
    sample = space.flat_sample({"variant": variants[1]})
    spec = RemovalSpec(down=[[0]] * 3, up=[[0, 2]] * 3, mid="none", drop_inner=1)
    t = space.trial_config(cfg, sample, spec, "bk-small", "/tmp/w/t", "s1")
    assert t.student.init == "random" and t.distill.seed == 1 and t.distill.lr == 3e-4
    # the arm's terms on the base loss: attn stays as distill.loss has it
    assert (t.distill.loss.task, t.distill.loss.out, t.distill.loss.feat, t.distill.loss.attn) == (1.0, 0.0, 0.0, 0.5)
    k = space.trial_config(cfg, space.flat_sample({"variant": variants[2]}), spec, "bk-base", "/tmp/w/t", "k")
    assert k.student.init == "teacher" and k.distill.loss.level == "layer" and k.distill.loss.out == 1.0
    row = {"arm": "feat-kd", "preset": "bk-base", "spec": None, "lambda_task": 1.0, "lambda_out": 1.0,
           "lambda_feat": 1.0, "lambda_attn": 0.5, "lambda_self_attn": 0.0, "lr": 3e-4}
    best = space.best_config(cfg, row)
    assert best.student.preset == "bk-base" and best.distill.loss.level == "layer" and best.student.init == "teacher"
    # a summary per (arm, preset): mean and spread over seeds, best mean first (higher is better here)
    rows = [{"arm": v["arm"], "preset": v["preset"], "seed": v["seed"], "completed": True, "latency_ms": 1.0,
             "params": 10, "train_s": 5.0, "eval_s": 1.0,
             "caption_accuracy": {"scratch": 0.2, "feat-kd": 0.8}[v["arm"]] + 0.1 * v["seed"]} for v in variants]
    summary = space.arm_summary(rows, tc, teacher=1.0)
    assert [(a["arm"], a["preset"]) for a in summary][-1] == ("scratch", "bk-small")
    assert summary[0]["mean"] == pytest.approx(0.85) and summary[0]["spread"] == pytest.approx(0.1)
    assert summary[0]["of_teacher"] == pytest.approx(0.85) and summary[-1]["loss"] == "out 0.0, feat 0.0"
    assert space.pick_best([{**r, "trial_id": str(i), "objective": -r["caption_accuracy"]} for i, r in
                            enumerate(rows)], tc)["caption_accuracy"] == pytest.approx(0.9)


def test_ablation_plot_cuts_the_axis_only_for_arms_that_sit_close():
    from PIL import Image

    from tuning.search import ablation_plot, ablation_xlim

    # 2026-12-06's KD-terms arms (0.981-0.998, teacher 0.999): a window around them, every value inside
    lo, hi = ablation_xlim([0.998, 0.997, 0.994, 0.981], 0.999)
    assert 0.9 < lo < 0.981 and 0.999 < hi < 1.01
    # the 2026-12-02 ablation had scratch at 0.448: bars from 0
    assert ablation_xlim([0.996, 0.987, 0.448], 0.999) is None
    assert ablation_xlim([], None) is None and ablation_xlim([0.0, 0.001], None) is None
    cfg = parse_config({"name": "x", "tune": {"arms": [{"name": "a"}, {"name": "b"}], "metric": "caption_accuracy"}})
    for values in ([0.998, 0.981], [0.998, 0.448]):
        arms = [{"arm": n, "preset": "bk-small", "values": [v], "mean": v} for n, v in zip("ab", values)]
        assert Image.open(io.BytesIO(ablation_plot(arms, cfg, 0.999))).format == "PNG"


@pytest.mark.parametrize("tune, says", [
    ({"arms": [{"name": "a"}, {"name": "a"}]}, "a more than once"),
    ({"arms": [{"name": "a", "loss": {"feet": 1.0}}]}, "feet"),
    ({"arms": [{"name": "a", "loss": {"out": -1.0}}]}, "out"),
    ({"arms": [{"name": "a", "presets": ["bk-smal"]}]}, "bk-smal"),
    ({"arms": [{"name": "a"}], "seeds": [1, 1]}, "distinct seeds"),
    ({"metric": "caption_accuracy", "scheduler": "asha"}, "use fifo"),
])
def test_ablation_config_errors_name_the_field(tune, says):
    with pytest.raises(ConfigError) as e:
        parse_config({"tune": tune})
    assert says in str(e.value) and "tune" in str(e.value)


# --- a real search -----------------------------------------------------------------------------------


TRIALS = 2  # each trial is a Ray Train run: ~1 minute of start-up on CI's 2 cores


def _tree(work: Path) -> dict:
    return {"name": "t", "work_dir": str(work), "teacher": {"uri": "builtin:tiny-sd1"},
            "distill": {"batch_size": 2, "deepspeed": False, "val_batches": 1, "sample_steps": 1,
                        "sample_prompts": ["a red circle"], "max_steps": 50},
            "tune": {"num_samples": TRIALS, "steps_per_trial": 3, "val_every": 1, "presets": ["bk-base", "bk-small",
                                                                                        "bk-tiny"],
                     "objective": "multi", "scheduler": "asha", "cpus_per_trial": 0.5, "latency_repeats": 2,
                     "seed": 3}}


def read_uri(uri: str) -> io.BytesIO:
    """A file at a URI (local or s3://) as a file object."""
    from pipelines.storage import read_bytes

    return io.BytesIO(read_bytes(uri))


@pytest.fixture(scope="module")
def search(tmp_path_factory, ray_local, mlflow_server, s3_server):
    from pipelines import local
    from tuning import search as tune_search

    work = tmp_path_factory.mktemp("tune")
    make_cache(str(work / "cache"), "builtin:tiny-sd1", n_train=16, n_val=2)
    bucket = f"tune-{work.name.lower().replace('_', '-')}"
    local.make_bucket(bucket)
    tree = _tree(work)
    tree["tune"]["storage_path"] = f"s3://{bucket}/tune"
    cfg_path = work / "config.yaml"
    cfg_path.write_text(json.dumps(tree))  # JSON is YAML
    cfg = load_config(cfg_path)
    t0 = time.perf_counter()
    result = tune_search.run(cfg)
    return {"cfg": cfg, "result": result, "work": work, "seconds": time.perf_counter() - t0}


def test_search_writes_table_plot_and_best_config(search):
    from PIL import Image

    r, cfg = search["result"], search["cfg"]
    assert r["trials"] == TRIALS and not r.get("skipped")
    assert r["table"].startswith("s3://") and r["experiment"].startswith("s3://")
    table = pd.read_csv(read_uri(r["table"]))
    assert len(table) == TRIALS and table["trial_id"].is_unique
    assert pd.read_parquet(read_uri(r["parquet"]))["trial_id"].tolist() == table["trial_id"].tolist()
    assert set(table["status"]) <= {"completed", "stopped"} and (table["status"] == "completed").any()
    assert (table["step"] >= 1).all() and (table.loc[table["status"] == "completed", "step"] == 3).all()
    assert (table["latency_ms"] > 0).all() and table["val_loss"].notna().all() and table["val_out"].notna().all()
    # the measured size is the preset's student: bk-tiny < bk-small < bk-base
    sizes = table.groupby("preset")["params"].first().to_dict()
    ordered = [sizes[p] for p in ("bk-tiny", "bk-small", "bk-base") if p in sizes]
    assert ordered == sorted(ordered) and len(set(ordered)) == len(ordered)
    # the winner is on the Pareto front of (val_loss, latency)
    assert table["best"].sum() == 1 and table.loc[table["best"], "pareto"].all()
    best = table[table["best"]].iloc[0]
    assert best["trial_id"] == r["best"]["trial_id"]
    front = table[table["pareto"]]
    for _, other in table.iterrows():
        dominated = ((front["val_loss"] <= other["val_loss"]) & (front["latency_ms"] <= other["latency_ms"])
                     & ((front["val_loss"] < other["val_loss"]) | (front["latency_ms"] < other["latency_ms"])))
        assert bool(other["pareto"]) != bool(dominated.any())
    img = Image.open(read_uri(r["plot"]))
    assert img.format == "PNG" and img.size[0] > 400
    best_yaml = search["work"] / "best.yaml"
    best_yaml.write_bytes(read_uri(r["best_config"]).getvalue())
    chosen = load_config(best_yaml)  # ready for `distillery distill`
    assert chosen.student.preset == best["preset"] and chosen.distill.lr == pytest.approx(best["lr"])
    assert chosen.distill.loss.feat == pytest.approx(best["lambda_feat"])
    assert chosen.distill.max_steps == 50 and "tune" not in chosen.stages
    assert chosen.distill.storage_path == cfg.distill.storage_path  # the full run's own paths, not a trial's


def test_search_mlflow_parent_and_children(search):
    from mlflow.tracking import MlflowClient

    r = search["result"]
    c = MlflowClient()
    parent = c.get_run(r["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["distillery.best_trial"] == r["best"]["trial_id"]
    arts = {f.path for f in c.list_artifacts(parent.info.run_id, "tune")}
    assert {"tune/trials.csv", "tune/trials.parquet", "tune/pareto.png", "tune/best.yaml"} <= arts
    assert parent.data.metrics["best_latency_ms"] == pytest.approx(r["best"]["latency_ms"])
    children = c.search_runs([parent.info.experiment_id],
                             filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    table = pd.read_csv(read_uri(r["table"]))
    assert sorted(ch.data.tags["distillery.trial_id"] for ch in children) == sorted(table["trial_id"])
    for ch in children:
        assert ch.info.status in ("FINISHED", "KILLED")  # none left RUNNING (stopped trials are KILLED)
        assert "val_loss" in ch.data.metrics and ch.data.metrics["latency_ms"] > 0
        assert ch.data.params["distill.num_workers"] == "1" and ch.data.params["distill.max_steps"] == "3"


def test_search_rerun_returns_results_and_restores_without_retraining(search):
    from mlflow.tracking import MlflowClient

    from pipelines.storage import delete_dir
    from tuning import search as tune_search

    r, cfg = search["result"], search["cfg"]
    again = tune_search.run(cfg)
    assert again["skipped"] and again["best"]["trial_id"] == r["best"]["trial_id"]
    # results gone (a search interrupted before writing them): Tuner.restore finds every trial finished
    delete_dir(r["results"])
    restored = tune_search.run(cfg)
    assert not restored.get("skipped") and restored["trials"] == TRIALS
    assert restored["mlflow_run_id"] == r["mlflow_run_id"]
    ids = sorted(pd.read_csv(read_uri(r["table"]))["trial_id"])
    assert sorted(pd.read_csv(read_uri(restored["table"]))["trial_id"]) == ids
    c = MlflowClient()
    parent = c.get_run(r["mlflow_run_id"])
    children = c.search_runs([parent.info.experiment_id],
                             filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == TRIALS  # no trial ran again
    assert restored["best"]["trial_id"] == r["best"]["trial_id"]

