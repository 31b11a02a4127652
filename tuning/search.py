"""`distillery tune CONFIG`: search removal specs, KD loss weights and learning rates with Ray Tune.

Each trial is a short distillation run by the distill stage's own trainer (pipelines/distill.py
`trainer_for`, one worker with tune.cpus_per_trial / gpus_per_trial), started from a Tune function trainable
as Ray Train V2 documents it: `trainer.fit()` inside the trial, with a TuneReportCallback passing each Train
report (validation losses every val_every steps) on to Tune. Before training, a Ray task with the trial's
resources builds the student U-Net and measures its latency per denoising step (median of repeats after a
warm-up, at the cache's latent size and the batch classifier-free guidance runs) and its parameter count
(an ablation measures each preset once, one after another, before any trial trains, so that no measurement
shares the device with training trials); both go into every report, with the scalar objective (tuning/space.py).

Search: Optuna (TPE; multi-objective over (quality, latency) with tune.objective "multi") with ASHA early
stopping on the quality metric (or the scalar objective), tune.max_concurrent trials at a time. The Tune
experiment lives under tune.storage_path (local or s3://), named by a digest of the config sections the
search depends on: running the same config again resumes an interrupted search (Tuner.restore), and once
its results exist, returns them without searching.

Ranked on image quality (tune.metric caption_accuracy or clip_score_student): each trial runs the distill stage to
its export (`distill.run`), a Ray task with the trial's resources scores the student's images on tune.eval_prompts
with the evaluate stage (`evaluate.quality_scores`), and the trial reports that score last; the teacher is scored
once on the same prompts and seeds, and each trial's score is also given as a share of it. An ablation
(tune.arms) is a grid instead of a search: every arm for each of its presets and each of tune.seeds, no early
stopping; its results add arms.csv / arms.md (per arm and preset: mean, min, max over the seeds, share of the
teacher, latency, size, seconds per trial) and ablation.png.

Outputs under {tune.storage_path}/results: trials.csv and trials.parquet (one row per trial: sample,
status, steps, losses, teacher fidelity, latency, parameters, objective, Pareto flag), pareto.png (quality
vs latency, Pareto front), best.yaml (a ready config for `distillery distill`) and summary.json. MLflow: a
parent run holding these, with one child run per trial (its distill metrics and image grids). A finished
trial's checkpoint is deleted (the winner is distilled again, in full, from best.yaml).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from models.student import RemovalSpec, count_params, student_config
from pipelines import tracking
from pipelines.cache import CacheManifest
from pipelines.config import QUALITY_METRICS, Config, dump_config
from pipelines.storage import (
    delete_dir,
    ensure_ray,
    exists,
    filesystem,
    is_remote,
    join,
    model_dir,
    read_bytes,
    require_gpus,
    write_bytes,
)
from pipelines.train import cache_manifest
from tuning import space

log = logging.getLogger(__name__)

DRIVER_CPU = 0.1  # a trial's own Tune actor only starts its Train run and waits; the training worker is apart
ENV_KEYS = ("DISTILLERY_CACHE", "HF_HUB_OFFLINE", "MLFLOW_TRACKING_URI", "TOKENIZERS_PARALLELISM")
SUMMARY = "summary.json"
COLUMNS = ("trial_id", "status", "step", "arm", "seed", "init", "preset", "spec", *space.LOSS_KEYS, "val_loss",
           "val_task", "val_out", "val_feat", "val_attn", "val_self_attn", *QUALITY_METRICS, "of_teacher",
           "latency_ms", "params", "train_s", "eval_s", "objective", "completed", "pareto", "best", "mlflow_run_id",
           "error")
ARM_COLUMNS = ("arm", "preset", "init", "loss", "seeds", "scored", "mean", "min", "max", "spread", "of_teacher",
               "latency_ms", "params", "train_s", "eval_s")


def search_digest(cfg: Config) -> str:
    """A hash of what the search's results depend on (teacher, data, distill settings, the search itself)."""
    keys = ("teacher", "data", "distill", "tune", *(("evaluate",) if cfg.tune.metric in QUALITY_METRICS else ()))
    parts = {k: cfg.model_dump(mode="json")[k] for k in keys}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def experiment_name(cfg: Config) -> str:
    return f"{cfg.name}-tune-{search_digest(cfg)}"


def results_uri(cfg: Config) -> str:
    return join(cfg.tune.storage_path, "results")


def _teacher_unet_config(teacher_uri: str) -> dict:
    from diffusers import UNet2DConditionModel

    from models.teacher import resolve_model_dir

    return dict(UNet2DConditionModel.load_config(resolve_model_dir(model_dir(teacher_uri)), subfolder="unet"))


# ---------------------------------------------------------------------------------------------------
# One trial (runs in a Tune actor).
# ---------------------------------------------------------------------------------------------------


def student_cost(teacher_uri: str, sample: dict, latent_shape: list[int], batch: int, precision: str,
                 repeats: int, use_gpu: bool) -> dict[str, Any]:
    """(preset, spec, latency per denoising step in ms, parameters) of a sample's student, on this process's
    device. The U-Net is random-initialized: latency and size do not depend on its weights."""
    import torch
    from diffusers import UNet2DConditionModel

    from models.metrics import measure_latency, median, unet_inputs

    t_config = _teacher_unet_config(teacher_uri)
    preset, spec = space.spec_from_sample(sample, t_config)
    device = torch.device("cuda" if use_gpu else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    dtype = dtype if device.type == "cuda" else torch.float32
    unet = UNet2DConditionModel.from_config(student_config(t_config, spec)).to(device, dtype).eval()
    _, h, w = latent_shape
    args, kw = unet_inputs(unet.config, batch, h, w, device=device, dtype=dtype)
    times = measure_latency(lambda: unet(*args, **kw), repeats, warmup=2, device=device)
    return {"preset": preset, "spec": spec.to_dict(), "latency_ms": median(times), "params": count_params(unet),
            "device": str(device)}


class TrialReport(TuneReportCallback):
    """Train reports on to Tune, with the trial's latency, size, objective and MLflow run added to each."""

    def __init__(self, extras: dict[str, Any], tune_cfg: dict[str, Any]):
        super().__init__()
        self.extras = extras
        self.tune_cfg = tune_cfg

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        from pipelines.config import TuneConfig

        tc = TuneConfig.model_validate(self.tune_cfg)
        m = {**metrics[0], **self.extras}
        if tc.metric in m:
            m["objective"] = space.objective(float(m[tc.metric]), m["latency_ms"], m["params"], tc)
        super().after_report(run_context, [m, *metrics[1:]], checkpoint)


def trial_task(fn: Any, tc: Any, env: dict[str, str]) -> Any:
    """`fn` as a Ray task with a trial's resources ("DEFAULT" scheduling: not inside a trial's small placement
    group)."""
    import ray

    return ray.remote(fn).options(num_cpus=tc.cpus_per_trial, num_gpus=tc.gpus_per_trial,
                                  scheduling_strategy="DEFAULT", runtime_env={"env_vars": env})


def scores(cfg: Config, student_uri: str | None, scoring: dict[str, Any], env: dict[str, str]) -> dict[str, float]:
    """The evaluate stage's quality scores of a student (None: the teacher), in a Ray task with a trial's
    resources."""
    import ray

    from pipelines.evaluate import quality_scores

    return ray.get(trial_task(quality_scores, cfg.tune, env).remote(cfg.teacher.uri, student_uri, **scoring))


def eval_inputs(cfg: Config, manifest: CacheManifest) -> dict[str, Any] | None:
    """What a quality metric is measured on (prompts, seeds, sampling), or None for a loss metric."""
    from pipelines.evaluate import read_prompts

    tc, ev = cfg.tune, cfg.evaluate
    if tc.metric not in QUALITY_METRICS:
        return None
    uri = tc.eval_prompts or ev.prompts
    if not uri:
        raise ValueError(f"tune.metric {tc.metric} scores each trial's images: set tune.eval_prompts (or "
                         "evaluate.prompts) to the prompts they are drawn for")
    prompts = read_prompts(uri)[: tc.eval_num_prompts or ev.num_prompts]
    if len(prompts) < 2:
        raise ValueError(f"tune.eval_prompts {uri}: {len(prompts)} prompt(s); give at least 2")
    return {"prompts": prompts, "seeds": [ev.seed + i for i in range(len(prompts))], "steps": ev.steps,
            "guidance_scale": ev.guidance_scale, "size": ev.resolution or manifest.resolution,
            "batch_size": ev.batch_size, "clip_model": ev.clip_model, "dtype": cfg.teacher.dtype}


def cost(cfg: Config, sample: dict[str, Any], manifest: CacheManifest, env: dict[str, str]) -> dict[str, Any]:
    """student_cost of a sample's student, in a Ray task with a trial's resources, at the batch classifier-free
    guidance runs."""
    import ray

    tc = cfg.tune
    batch = 2 if cfg.evaluate.guidance_scale > 1 else 1
    return ray.get(trial_task(student_cost, tc, env).remote(cfg.teacher.uri, sample, manifest.latent_shape, batch,
                                                            cfg.distill.precision, tc.latency_repeats,
                                                            tc.gpus_per_trial > 0))


def preset_costs(cfg: Config, manifest: CacheManifest, env: dict[str, str]) -> dict[str, dict[str, Any]]:
    """An ablation's students measured once per preset, one after another before any trial trains: on a shared
    device, a latency measured beside training trials would measure them too."""
    presets = dict.fromkeys(v["preset"] for v in space.arm_variants(cfg.tune))
    return {p: cost(cfg, {"preset": p}, manifest, env) for p in presets}


def trial(sample: dict[str, Any], base: dict, manifest: CacheManifest, parent_run_id: str, env: dict[str, str],
          scoring: dict[str, Any] | None = None, teacher_score: float | None = None,
          costs: dict[str, dict[str, Any]] | None = None) -> None:
    """A Tune function trainable: measure the sampled student, then distill it briefly with the distill
    stage's trainer; its reports reach Tune through TrialReport. With a quality metric (`scoring`), the trial
    runs the distill stage to its export, scores the student's images with the evaluate stage, and reports
    that last."""
    import ray
    import ray.tune

    from pipelines import distill

    for k, v in env.items():
        os.environ.setdefault(k, v)
    cfg = Config.model_validate(base)
    tc = cfg.tune
    sample = space.flat_sample(sample)
    trial_id = ray.tune.get_context().get_trial_id()
    measured = (costs or {}).get(sample.get("preset")) or cost(cfg, sample, manifest, env)
    spec = RemovalSpec.from_dict(measured["spec"])
    storage = join(tc.storage_path, "trials", experiment_name(cfg))
    tcfg = space.trial_config(cfg, sample, spec, measured["preset"], storage, trial_id)
    uri = cfg.tracking_uri()
    run_id, _ = tracking.start_run(
        uri, cfg.mlflow.experiment, join(storage, trial_id), f"trial-{trial_id}", tcfg.model_dump(mode="json"),
        tags={"mlflow.parentRunId": parent_run_id, "distillery.stage": "tune-trial", "distillery.trial_id": trial_id})
    tracking.log_metrics(uri, run_id, {"latency_ms": measured["latency_ms"], "params": measured["params"]}, 0)
    loss = tcfg.distill.loss
    extras = {"latency_ms": measured["latency_ms"], "params": measured["params"], "preset": measured["preset"] or "",
              "spec": json.dumps(measured["spec"]), "mlflow_run_id": run_id, "init": tcfg.student.init,
              "lr": tcfg.distill.lr, **{k: float(getattr(loss, term)) for k, term in space.LOSS_TERMS.items()},
              **({"arm": sample["arm"], "seed": int(sample["seed"])} if "arm" in sample else {})}
    # a trial restarted after an interrupted search starts over: its only checkpoint is its last step, and
    # resuming from that would report nothing
    delete_dir(join(storage, trial_id))
    callbacks = [TrialReport(extras, tc.model_dump(mode="json"))]
    if scoring is None:
        distill.trainer_for(tcfg, spec, manifest, run_id, callbacks=callbacks).fit()
    else:
        t0 = time.perf_counter()
        done = distill.run(tcfg, callbacks=callbacks)  # trains and exports the student, as the stage does
        train_s = time.perf_counter() - t0
        got = scores(cfg, tcfg.distill.output, scoring, env)
        if tc.metric not in got:
            raise ValueError(f"tune.metric {tc.metric}: the evaluate stage gives no such score for these prompts "
                             f"(it gives {', '.join(sorted(got))})")
        final = {**done["losses"], **extras, **got, "step": done["step"], "train_s": train_s,
                 "objective": space.objective(float(got[tc.metric]), measured["latency_ms"], measured["params"], tc)}
        if teacher_score:
            final["of_teacher"] = float(got[tc.metric]) / teacher_score
        tracking.log_metrics(uri, run_id, {k: v for k, v in final.items() if isinstance(v, (int, float))
                                           and k != "step"}, done["step"])
        ray.tune.report(final)
    delete_dir(join(storage, trial_id))  # the reports are in Tune; the winner is distilled again in full


def _trial_dirname(t: Any) -> str:
    return t.trial_id


class OrphanSweeper:
    """Removes the placement groups of Train runs whose controller died with a stopped trial.

    When ASHA stops a trial, Tune ends the trial's actor, and with it the Train controller it owns, before
    the controller can release its workers' placement group. Ray Train's own cleaner does that only where
    the State API (the dashboard) runs; without it the group would hold its CPUs/GPUs until the job ends
    and the next trials could starve. So while the search runs, every few seconds this removes the groups
    that this job's actors created and that outlived their creator (never detached ones, never the
    driver's)."""

    def __init__(self, interval_s: float = 2.0):
        import threading

        self.interval_s, self.removed = interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="orphan-pg-sweeper", daemon=True)

    def __enter__(self) -> OrphanSweeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sweep()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sweep()
            except Exception as err:  # never take the search down
                log.debug("placement group sweep failed: %s", err)

    def sweep(self) -> int:
        import ray
        from ray._private.state import state
        from ray.core.generated import gcs_pb2
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        job = ray.get_runtime_context().get_job_id()
        n = 0
        for raw in state._connect_and_get_accessor().get_placement_group_table():
            pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
            creator = ray.ActorID(pg.creator_actor_id)
            if (pg.state == gcs_pb2.PlacementGroupTableData.REMOVED or pg.is_detached or creator.is_nil()
                    or not pg.creator_actor_dead or pg.creator_job_id.hex() != job):
                continue
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            log.info("tune: removed placement group %s of a stopped trial's Train run", pg.placement_group_id.hex())
            n += 1
        self.removed += n
        return n


# ---------------------------------------------------------------------------------------------------
# Results: table, Pareto plot, best config, MLflow.
# ---------------------------------------------------------------------------------------------------


def result_rows(grid: Any, cfg: Config) -> list[dict[str, Any]]:
    """One row per trial from Tune's ResultGrid (its last report; effective loss weights and learning rate)."""
    tc = cfg.tune
    rows = []
    for res in grid:
        m, sample = dict(res.metrics or {}), dict(res.config or {})
        row: dict[str, Any] = {k: None for k in COLUMNS}
        row["trial_id"] = m.get("trial_id") or Path(res.path).name
        sample = space.flat_sample(sample)
        for key in space.LOSS_KEYS:  # what the trial ran with (its report), else what it sampled
            row[key] = float(m[key]) if m.get(key) is not None else float(sample.get(key, getattr(tc, key)[0]))
        for key in ("step", "val_loss", "val_out", "val_task", "val_feat", "val_attn", "val_self_attn",
                    *QUALITY_METRICS, "of_teacher", "latency_ms", "params", "train_s", "eval_s", "objective",
                    "mlflow_run_id", "init"):
            row[key] = m.get(key)
        row["arm"] = m.get("arm") or sample.get("arm")
        row["seed"] = m.get("seed", sample.get("seed"))
        row["preset"] = m.get("preset") or sample.get("preset") or None
        row["spec"] = json.loads(m["spec"]) if m.get("spec") else None
        row["completed"] = row["step"] is not None and row["step"] >= tc.steps_per_trial
        row["error"] = str(res.error).splitlines()[0][:500] if res.error else None
        row["status"] = "error" if res.error else ("completed" if row["completed"] else "stopped")
        row["sample"] = sample
        rows.append(row)
    return rows


def mark_pareto_and_best(rows: list[dict[str, Any]], cfg: Config) -> dict[str, Any] | None:
    tc = cfg.tune
    scored = [r for r in rows if r[tc.metric] is not None and r["latency_ms"] is not None]
    on = space.pareto_front([(space.signed(r[tc.metric], tc.metric), r["latency_ms"]) for r in scored])
    for r in rows:
        r["pareto"] = False
        r["best"] = False
    for r, flag in zip(scored, on):
        r["pareto"] = flag
    best = space.pick_best(rows, tc)
    if best is not None:
        best["best"] = True
    return best


def table_bytes(rows: list[dict[str, Any]]) -> tuple[bytes, bytes]:
    """(CSV, parquet) of the trials table; the spec as JSON text."""
    import pandas as pd

    df = pd.DataFrame([{k: (json.dumps(r[k]) if k == "spec" and r[k] is not None else r[k]) for k in COLUMNS}
                       for r in rows], columns=list(COLUMNS))
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return df.to_csv(index=False).encode(), buf.getvalue()


def pareto_plot(rows: list[dict[str, Any]], cfg: Config) -> bytes:
    """PNG: quality vs latency per trial, the Pareto front as a line, the winner as a star, the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tc = cfg.tune
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    styles = {"completed": ("tab:blue", "o"), "stopped": ("tab:gray", "x")}
    for status, (color, marker) in styles.items():
        pts = [r for r in rows if r["status"] == status and r[tc.metric] is not None and r["latency_ms"] is not None]
        if pts:
            ax.scatter([r["latency_ms"] for r in pts], [r[tc.metric] for r in pts], c=color, marker=marker,
                       label=f"{status} ({len(pts)})", zorder=3)
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["latency_ms"])
    if front:
        ax.step([r["latency_ms"] for r in front], [r[tc.metric] for r in front], where="post", c="tab:red",
                lw=1.5, zorder=2)
        ax.scatter([r["latency_ms"] for r in front], [r[tc.metric] for r in front], s=160, facecolors="none",
                   edgecolors="tab:red", lw=1.5, label=f"Pareto front ({len(front)})", zorder=2)
    for r in rows:
        if r[tc.metric] is not None and r["latency_ms"] is not None:
            label = r["preset"] or f"spec {r['trial_id']}"
            ax.annotate(label, (r["latency_ms"], r[tc.metric]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    best = [r for r in rows if r["best"]]
    if best:
        ax.scatter([best[0]["latency_ms"]], [best[0][tc.metric]], marker="*", s=250, c="gold", edgecolors="k",
                   label="chosen", zorder=4)
    if tc.latency_budget_ms is not None:
        ax.axvline(tc.latency_budget_ms, ls="--", c="k", lw=1, label="latency budget")
    ax.set_xlabel("latency per denoising step (ms)")
    ax.set_ylabel(f"{tc.metric} ({space.direction(tc.metric)})")
    ax.set_title(f"{cfg.name}: quality vs latency ({len(rows)} trials)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def arms_csv(arms: list[dict[str, Any]]) -> bytes:
    import pandas as pd

    return pd.DataFrame(arms, columns=list(ARM_COLUMNS)).to_csv(index=False).encode()


def arms_markdown(arms: list[dict[str, Any]], cfg: Config, teacher: float | None) -> str:
    """The ablation as a Markdown table, best mean first: the metric over the seeds (mean, min-max), its share of
    the teacher's, latency, size and the wall time of a trial."""
    tc = cfg.tune

    def f(v: Any, digits: int = 3) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    lines = [f"{tc.metric} of each arm over its seeds ({tc.steps_per_trial} steps each); teacher {f(teacher)}", "",
             f"| arm | preset | init | loss | seeds | {tc.metric} mean | min - max | of teacher | ms/step | params "
             "| train s | eval s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for a in arms:
        params = f"{a['params'] / 1e6:.2f}M" if a["params"] else "-"
        lines.append(f"| {a['arm']} | {a['preset']} | {a['init']} | {a['loss']} | {a['scored']}/{a['seeds']} | "
                     f"**{f(a['mean'])}** | {f(a['min'])} - {f(a['max'])} | {f(a['of_teacher'], 2)} | "
                     f"{f(a['latency_ms'], 2)} | {params} | {f(a['train_s'], 0)} | {f(a['eval_s'], 0)} |")
    return "\n".join(lines) + "\n"


def ablation_xlim(values: list[float], teacher: float | None) -> tuple[float, float] | None:
    """The metric axis of the ablation plot: None (bars from 0) when the arms spread over more than a quarter of
    the scale, else a window around the values and the teacher, so arms that all sit near the top (a saturated
    benchmark: 0.981-0.998) stay apart on the plot instead of looking like equal bars."""
    vs = [v for v in [*values, teacher] if v is not None]
    if not vs:
        return None
    lo, hi = min(vs), max(vs)
    if lo <= 0 or hi - lo > 0.25 * hi:
        return None
    pad = max(0.15 * (hi - lo), 0.002 * hi)
    return lo - pad, hi + pad


def ablation_plot(arms: list[dict[str, Any]], cfg: Config, teacher: float | None) -> bytes:
    """PNG: the metric of each arm (mean over seeds, and each seed as a dot), the teacher as a line. Bars from 0
    when the arms spread wide; a zoomed axis with a min-max line per arm when they sit close (ablation_xlim)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tc = cfg.tune
    order = list(reversed(arms))  # barh draws upwards: the best mean on top
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(order) + 1.5), dpi=120)
    labels = [f"{a['arm']} ({a['preset']})" for a in order]
    xlim = ablation_xlim([v for a in order for v in a["values"]], teacher)
    if xlim is None:
        ax.barh(range(len(order)), [a["mean"] or 0.0 for a in order], color="tab:blue", alpha=0.5, label="mean")
    else:  # a bar's length would mean nothing on a cut axis: the mean as a marker, the seeds' range as a line
        for i, a in enumerate(order):
            if a["values"]:
                ax.hlines(i, min(a["values"]), max(a["values"]), color="tab:blue", lw=2, alpha=0.6)
        ax.scatter([a["mean"] for a in order if a["mean"] is not None],
                   [i for i, a in enumerate(order) if a["mean"] is not None],
                   marker="D", s=40, color="tab:blue", zorder=2, label="mean")
        ax.set_xlim(*xlim)
    for i, a in enumerate(order):
        ax.scatter(a["values"], [i] * len(a["values"]), c="k", s=14, zorder=3, label="seed" if i == 0 else None)
    if teacher is not None:
        ax.axvline(teacher, c="tab:red", ls="--", lw=1.2, label=f"teacher {teacher:.3f}")
    ax.set_yticks(range(len(order)), labels, fontsize=8)
    ax.set_xlabel(f"{tc.metric} ({space.direction(tc.metric)})" + ("" if xlim is None else ", axis cut"))
    ax.set_title(f"{cfg.name}: ablation, {tc.steps_per_trial} steps per trial, {len(tc.seeds)} seed(s)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over an arm
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _finish_children(uri: str, parent_run_id: str, rows: list[dict[str, Any]]) -> None:
    """Close each trial's MLflow run (a stopped trial's actor was ended before it could) with its outcome."""
    c = tracking.client(uri)
    parent = c.get_run(parent_run_id)
    children = c.search_runs([parent.info.experiment_id],
                             filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=10000)
    by_trial = {r.data.tags.get("distillery.trial_id"): r for r in children}
    for row in rows:
        run = by_trial.get(row["trial_id"])
        if run is None:
            continue
        row["mlflow_run_id"] = run.info.run_id
        final = {k: row[k] for k in ("objective", "latency_ms", "params") if row[k] is not None}
        final.update(pareto=float(row["pareto"]), best=float(row["best"]))
        tracking.log_metrics(uri, run.info.run_id, final, int(row["step"] or 0))
        tracking.set_tags(uri, run.info.run_id, {"distillery.trial_status": row["status"]})
        if run.info.status == "RUNNING" or row["status"] == "error":
            tracking.end_run(uri, run.info.run_id, "FAILED" if row["status"] == "error" else
                             "FINISHED" if row["completed"] else "KILLED")


# ---------------------------------------------------------------------------------------------------
# The driver.
# ---------------------------------------------------------------------------------------------------


def _tuner(cfg: Config, trainable: Any, space_: dict[str, Any]) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    tc = cfg.tune
    val_every = tc.val_every or max(1, tc.steps_per_trial // 4)
    mode = "max" if space.higher_is_better(tc.metric) else "min"
    if tc.arms:  # a grid: every arm x preset x seed once, no searcher
        searcher, stop_on = None, tc.metric
    elif tc.objective == "multi":
        searcher = OptunaSearch(metric=[tc.metric, "latency_ms"], mode=[mode, "min"], seed=tc.seed)
        stop_on = tc.metric
    else:
        searcher = OptunaSearch(metric="objective", mode="min", seed=tc.seed)
        stop_on = "objective"
    scheduler = FIFOScheduler() if tc.scheduler_name() == "fifo" else ASHAScheduler(
        # max_t one past the last step: a trial that runs to its end returns from trainer.fit() on its own,
        # so its Train run shuts down cleanly (ASHA stops only the ones it cuts short)
        time_attr="step", metric=stop_on, mode="min", max_t=tc.steps_per_trial + 1, grace_period=val_every,
        reduction_factor=tc.reduction_factor)
    fs, path = filesystem(tc.storage_path)
    return tune.Tuner(
        trainable,
        param_space=space_,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                    num_samples=1 if tc.arms else tc.num_samples,
                                    max_concurrent_trials=tc.max_concurrent, trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name=experiment_name(cfg), storage_path=path,
                                  storage_filesystem=fs if is_remote(tc.storage_path) else None,
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=1),
    )


def run(cfg: Config) -> dict[str, Any]:
    """Search (or resume searching, or return the finished search); returns the results' URIs, the best
    trial's row, the number of trials and the MLflow parent run id."""
    from ray import tune

    tc = cfg.tune
    digest, name, out = search_digest(cfg), experiment_name(cfg), results_uri(cfg)
    summary_uri = join(out, SUMMARY)
    if exists(summary_uri):
        summary = json.loads(read_bytes(summary_uri))
        if summary.get("digest") == digest:
            log.info("tune: %s already holds the results of search %s; nothing to do", out, name)
            return {**summary, "skipped": True}
    manifest = cache_manifest(cfg)
    if not manifest.rows.get("val"):
        raise ValueError(f"distill.cache {cfg.distill.cache}: no validation rows; trials are compared on the "
                         "validation loss, so prepare the data with data.val_fraction > 0")
    t_config = _teacher_unet_config(cfg.teacher.uri)
    space.check_space(t_config, tc)
    param_space = space.param_space(t_config, tc)
    scoring = eval_inputs(cfg, manifest)

    ray = ensure_ray(cfg)
    require_gpus(ray, "tune.gpus_per_trial", tc.gpus_per_trial, "tune.gpus_per_trial: 0 (trials on the CPU)")
    need = tc.max_concurrent * (DRIVER_CPU + tc.cpus_per_trial) + 1  # + 1: Ray Data's read tasks
    if ray.cluster_resources().get("CPU", 0) < need:
        log.warning("tune: %d trials at a time need %.1f CPUs (%.1f each for the trial and its worker, and one "
                    "for Ray Data) but the cluster has %.1f; trials may wait for CPUs (lower tune.cpus_per_trial "
                    "or tune.max_concurrent)", tc.max_concurrent, need, DRIVER_CPU + tc.cpus_per_trial,
                    ray.cluster_resources().get("CPU", 0))
    uri = cfg.tracking_uri()
    job_key = join(tc.storage_path, name)
    parent_id, resumed = tracking.start_run(uri, cfg.mlflow.experiment, job_key, f"{cfg.name}-tune",
                                            cfg.model_dump(mode="json"),
                                            tags={"distillery.stage": "tune", "distillery.config_digest": digest})
    env = {k: os.environ[k] for k in ENV_KEYS if os.environ.get(k)}
    base = cfg.model_dump(mode="json")
    base["mlflow"]["tracking_uri"] = uri  # the trials log where the driver does
    teacher_score = None
    if scoring is not None:  # the teacher on the same prompts and seeds: what each trial's score is a share of
        teacher_scores = scores(cfg, None, scoring, env)
        if tc.metric not in teacher_scores:
            tracking.end_run(uri, parent_id, "FAILED")
            raise ValueError(f"tune.metric {tc.metric}: the evaluate stage gives no such score for the prompts of "
                             f"{tc.eval_prompts or cfg.evaluate.prompts} (it gives "
                             f"{', '.join(sorted(teacher_scores))})")
        teacher_score = float(teacher_scores[tc.metric])
        tracking.log_metrics(uri, parent_id, {f"teacher_{tc.metric}": teacher_score}, 0)
        log.info("tune: the teacher's %s on %d prompts: %.4f", tc.metric, len(scoring["prompts"]), teacher_score)
    costs = preset_costs(cfg, manifest, env) if tc.arms else None
    trainable = tune.with_resources(
        tune.with_parameters(trial, base=base, manifest=manifest, parent_run_id=parent_id, env=env, scoring=scoring,
                             teacher_score=teacher_score, costs=costs),
        {"CPU": DRIVER_CPU})
    fs, path = filesystem(tc.storage_path)
    exp_path = f"{path}/{name}"
    t0 = time.perf_counter()
    try:
        if tune.Tuner.can_restore(exp_path, storage_filesystem=fs if is_remote(tc.storage_path) else None):
            log.info("tune: resuming the interrupted search %s (MLflow run %s)", job_key, parent_id)
            tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=True,
                                       storage_filesystem=fs if is_remote(tc.storage_path) else None)
        else:
            log.info("tune: %d trials of %d steps, %d at a time (MLflow run %s)",
                     len(space.arm_variants(tc)) if tc.arms else tc.num_samples, tc.steps_per_trial,
                     tc.max_concurrent, parent_id)
            tuner = _tuner(cfg, trainable, param_space)
        with OrphanSweeper():
            grid = tuner.fit()
    except BaseException:
        tracking.end_run(uri, parent_id, "FAILED")
        raise

    rows = result_rows(grid, cfg)
    best = mark_pareto_and_best(rows, cfg)
    _finish_children(uri, parent_id, rows)
    if best is None:
        tracking.end_run(uri, parent_id, "FAILED")
        errors = "; ".join(f"{r['trial_id']}: {r['error']}" for r in rows if r["error"])
        raise RuntimeError(f"tune: no trial of {name} reported {tc.metric} and latency ({errors or 'no errors'})")
    csv, parquet = table_bytes(rows)
    png = pareto_plot(rows, cfg)
    best_yaml = dump_config(space.best_config(cfg, best)).encode()
    files = {"trials.csv": csv, "trials.parquet": parquet, "pareto.png": png, "best.yaml": best_yaml}
    arms = space.arm_summary(rows, tc, teacher_score) if tc.arms else []
    if arms:
        files.update({"arms.csv": arms_csv(arms), "arms.md": arms_markdown(arms, cfg, teacher_score).encode(),
                      "ablation.png": ablation_plot(arms, cfg, teacher_score)})
    for fname, data in files.items():
        write_bytes(join(out, fname), data)
    best_row = {k: best[k] for k in COLUMNS}
    summary = {"digest": digest, "experiment": join(tc.storage_path, name), "results": out,
               "table": join(out, "trials.csv"), "parquet": join(out, "trials.parquet"),
               "plot": join(out, "pareto.png"), "best_config": join(out, "best.yaml"), "best": best_row,
               "trials": len(rows), "statuses": {s: sum(r["status"] == s for r in rows)
                                                 for s in ("completed", "stopped", "error")},
               "mlflow_run_id": parent_id, "seconds": round(time.perf_counter() - t0, 1),
               "metric": tc.metric, "teacher": teacher_score, "arms": arms,
               **({"arms_table": join(out, "arms.md"), "ablation_plot": join(out, "ablation.png")} if arms else {})}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for fname, data in files.items():
            (Path(tmp) / fname).write_bytes(data)
        tracking.log_artifact(uri, parent_id, tmp, "tune")
    metrics = {f"best_{k}": best[k] for k in ("val_loss", "val_out", *QUALITY_METRICS, "of_teacher", "latency_ms",
                                              "params", "objective") if best[k] is not None}
    metrics.update({f"trials_{s}": float(n) for s, n in summary["statuses"].items()})
    tracking.log_metrics(uri, parent_id, metrics, 0)
    tracking.set_tags(uri, parent_id, {"distillery.best_trial": best["trial_id"],
                                       "distillery.best_config": summary["best_config"]})
    tracking.end_run(uri, parent_id)
    write_bytes(summary_uri, json.dumps(summary, indent=2, default=str).encode())
    log.info("tune: best trial %s (%s=%.4f, %.2f ms/step, %d params); config %s", best["trial_id"], tc.metric,
             best[tc.metric], best["latency_ms"], best["params"], summary["best_config"])
    return summary
