"""The search of `distillery tune`, without Ray: what a trial may sample, how its sample becomes a removal spec
and a distill config, and how trials are scored and compared.

A sample is a flat dict. The student is either `preset` (a choice among tune.presets) or, with
tune.search_spec, one entry per teacher stage: `pairs{s}` resnet(+attention) pairs the down stage s keeps
(its up stage keeps one more), `depth_down{s}` / `depth_up{u}` transformer depth of the stage's attention
blocks (only where the teacher's is deeper than 1), and `mid` (full, resnet, none). Loss weights and the
learning rate are `lambda_task`, `lambda_out`, `lambda_feat`, `lambda_attn`, `lambda_self_attn`, `lr`; a range with
low == high is not sampled.

With tune.arms the sample is one grid point instead, `variant` = {arm, preset, seed}: the arm's student.init and
distill.loss settings on the base config, with that preset and distill.seed.

Objectives (all minimized): the quality metric (a validation loss, unit weights, so trials with different
loss weights compare; or an evaluate-stage score, higher is better, so its negative) and, for "multi", latency
per denoising step. "scalar" folds the budgets in: a trial
over a budget scores 1000 * (1 + relative excess) more than its quality, so every trial within the budgets
beats every trial outside them, and among those outside, the smaller excess wins.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from models.student import RemovalSpec, layout_of, preset_spec, spread, validate_spec
from pipelines.config import QUALITY_METRICS, ArmConfig, Config, RemovalSpecConfig, TuneConfig

OVER_BUDGET = 1000.0
# the sampled loss weights and the distill.loss field each sets
LOSS_TERMS = {"lambda_task": "task", "lambda_out": "out", "lambda_feat": "feat", "lambda_attn": "attn",
              "lambda_self_attn": "self_attn"}
LOSS_KEYS = (*LOSS_TERMS, "lr")


def higher_is_better(metric: str) -> bool:
    return metric in QUALITY_METRICS


def direction(metric: str) -> str:
    """"higher is better" or "lower is better", for axis labels."""
    return f"{'higher' if higher_is_better(metric) else 'lower'} is better"


def signed(value: float, metric: str) -> float:
    """The metric as a quantity to minimize."""
    return -value if higher_is_better(metric) else value


def arm_variants(tc: TuneConfig) -> list[dict[str, Any]]:
    """The ablation's grid: one {arm, preset, seed} per trial, arms in their order, then presets, then seeds."""
    return [{"arm": a.name, "preset": p, "seed": s} for a in tc.arms for p in (a.presets or tc.presets)
            for s in tc.seeds]


def arm_named(tc: TuneConfig, name: str) -> ArmConfig:
    for a in tc.arms:
        if a.name == name:
            return a
    raise ValueError(f"tune.arms has no arm {name!r} (arms: {', '.join(a.name for a in tc.arms)})")


def flat_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """A trial's config as a flat sample (an ablation's grid point unpacked)."""
    out = {k: v for k, v in sample.items() if k != "variant"}
    out.update(sample.get("variant") or {})
    return out


def depth_choices(depth: int) -> list[int]:
    """Candidate transformer depths for a teacher block of `depth`: all up to 4, else 1, 1/4, 1/2 and all."""
    if depth <= 4:
        return list(range(1, depth + 1))
    return sorted({1, max(1, depth // 4), max(1, depth // 2), depth})


def spec_dimensions(teacher_config: Any, tc: TuneConfig) -> dict[str, list]:
    """The removal-spec part of the space as {name: choices}."""
    if not tc.search_spec:
        return {"preset": list(tc.presets)}
    lay = layout_of(teacher_config)
    dims: dict[str, list] = {f"pairs{s}": list(range(1, lay.layers + 1)) for s in range(lay.stages)}
    for s, depths in enumerate(lay.down_depths):
        if depths and max(depths) > 1:
            dims[f"depth_down{s}"] = depth_choices(max(depths))
    for u, depths in enumerate(lay.up_depths):
        if depths and max(depths) > 1:
            dims[f"depth_up{u}"] = depth_choices(max(depths))
    if lay.mid_type is not None:
        dims["mid"] = list(tc.mid)
    return dims


def param_space(teacher_config: Any, tc: TuneConfig) -> dict[str, Any]:
    """The Ray Tune search space (categorical choices, uniform loss weights, log-uniform learning rate)."""
    from ray import tune

    if tc.arms:
        return {"variant": tune.grid_search(arm_variants(tc))}
    space: dict[str, Any] = {k: tune.choice(v) for k, v in spec_dimensions(teacher_config, tc).items()}
    for key in LOSS_KEYS:
        lo, hi = getattr(tc, key)
        if lo < hi:
            space[key] = tune.loguniform(lo, hi) if key == "lr" else tune.uniform(lo, hi)
    return space


def spec_from_sample(sample: dict[str, Any], teacher_config: Any) -> tuple[str | None, RemovalSpec]:
    """(preset or None, removal spec) of a sample, validated against the teacher."""
    if "preset" in sample:
        return sample["preset"], preset_spec(sample["preset"], teacher_config)
    lay = layout_of(teacher_config)
    n = lay.stages
    down = [spread(lay.layers, int(sample[f"pairs{s}"])) for s in range(n)]
    # up block u mirrors down stage n-1-u and keeps one layer more (spread keeps the last, the one that
    # reads the skip connection across the channel change)
    up = [spread(lay.layers + 1, int(sample[f"pairs{n - 1 - u}"]) + 1) for u in range(n)]
    searched = any(k.startswith("depth_") for k in sample)
    down_depths = up_depths = None
    if searched:
        down_depths = [[min(int(sample.get(f"depth_down{s}", lay.down_depths[s][k])), lay.down_depths[s][k])
                        for k in down[s]] if lay.down_depths[s] else [] for s in range(n)]
        up_depths = [[min(int(sample.get(f"depth_up{u}", lay.up_depths[u][k])), lay.up_depths[u][k])
                      for k in up[u]] if lay.up_depths[u] else [] for u in range(n)]
    mid = sample.get("mid", "full") if lay.mid_type is not None else "none"
    spec = RemovalSpec(down=down, up=up, mid=mid, down_depths=down_depths, up_depths=up_depths)
    validate_spec(spec, teacher_config)
    return None, spec


def check_space(teacher_config: Any, tc: TuneConfig) -> None:
    """Every preset (or the smallest and largest sampled spec) fits the teacher; raises naming the field."""
    if tc.arms:
        for arm in tc.arms:
            for name in arm.presets or tc.presets:
                try:
                    preset_spec(name, teacher_config)
                except ValueError as err:
                    raise ValueError(f"tune.arms {arm.name}: preset {name!r} does not fit the teacher: {err}") from None
        return
    if not tc.search_spec:
        for name in tc.presets:
            try:
                preset_spec(name, teacher_config)
            except ValueError as err:
                raise ValueError(f"tune.presets: {name!r} does not fit the teacher: {err}") from None
        return
    dims = spec_dimensions(teacher_config, tc)
    for pick in (0, -1):
        spec_from_sample({k: v[pick] for k, v in dims.items()}, teacher_config)


def trial_config(base: Config, sample: dict[str, Any], spec: RemovalSpec, preset: str | None, storage_path: str,
                 run_name: str) -> Config:
    """The distill config of one trial: the base config with the sampled student, loss weights and learning
    rate; one worker with the trial's resources; a short run that validates every val_every steps (one Tune
    report each) and checkpoints only at its end."""
    tc = base.tune
    tree = copy.deepcopy(base.model_dump(mode="json"))
    tree["student"]["preset"] = preset
    tree["student"]["spec"] = None if preset else RemovalSpecConfig(**spec.to_dict()).model_dump(mode="json")
    d = tree["distill"]
    if "arm" in sample:  # an ablation: the arm's settings on the base config's loss, learning rate and seed
        arm = arm_named(tc, sample["arm"])
        d["loss"].update(arm.loss)
        tree["student"]["init"] = arm.init
        d["seed"] = int(sample["seed"])
    else:
        for key, term in LOSS_TERMS.items():
            d["loss"][term] = float(sample.get(key, getattr(tc, key)[0]))
        d["lr"] = float(sample.get("lr", tc.lr[0]))
    steps = tc.steps_per_trial
    val_every = tc.val_every or max(1, steps // 4)
    resources = {"CPU": tc.cpus_per_trial, **({"GPU": tc.gpus_per_trial} if tc.gpus_per_trial else {})}
    d.update(num_workers=1, use_gpu=tc.gpus_per_trial > 0, resources_per_worker=resources, max_steps=steps,
             val_every=val_every, log_every=val_every, checkpoint_every=steps, keep_checkpoints=1, max_failures=0,
             storage_path=storage_path, output=f"{storage_path.rstrip('/')}/{run_name}/student", run_name=run_name,
             sample_prompts=d["sample_prompts"][:1], sample_seeds=d["sample_seeds"][:1],
             sample_steps=min(d["sample_steps"], 4), warmup_steps=min(d["warmup_steps"], steps - 1))
    tree["mlflow"]["tracking_uri"] = base.tracking_uri()
    return Config.model_validate(tree)


def best_config(base: Config, row: dict[str, Any]) -> Config:
    """The config for `distillery distill` with the winning trial's student, loss weights and learning rate
    (the base config's steps, workers and outputs; "tune" taken out of its stages)."""
    tree = copy.deepcopy(base.model_dump(mode="json"))
    tree["student"]["preset"] = row["preset"] or None
    tree["student"]["spec"] = None if row["preset"] else row["spec"]
    tree["distill"]["loss"].update({term: row[key] for key, term in LOSS_TERMS.items() if row.get(key) is not None})
    tree["distill"]["lr"] = row["lr"]
    if row.get("arm"):  # the arm's other loss settings (level, normalization) and its start
        arm = arm_named(base.tune, row["arm"])
        tree["distill"]["loss"].update(arm.loss)
        tree["student"]["init"] = arm.init
    tree["stages"] = [s for s in tree["stages"] if s != "tune"] or ["distill"]
    return Config.model_validate(tree)


def objective(quality: float, latency_ms: float, params: int, tc: TuneConfig) -> float:
    """The scalar objective (lower is better): quality within the budgets, else a penalty above all of them."""
    excess = 0.0
    if tc.latency_budget_ms is not None:
        excess += max(0.0, latency_ms / tc.latency_budget_ms - 1.0)
    if tc.param_budget is not None:
        excess += max(0.0, params / tc.param_budget - 1.0)
    return signed(quality, tc.metric) + (OVER_BUDGET * (1.0 + excess) if excess > 0 else 0.0)


def within_budget(row: dict[str, Any], tc: TuneConfig) -> bool:
    return ((tc.latency_budget_ms is None or row["latency_ms"] <= tc.latency_budget_ms)
            and (tc.param_budget is None or row["params"] <= tc.param_budget))


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Which points no other point dominates (both coordinates minimized)."""
    out = []
    for i, (a, b) in enumerate(points):
        dominated = any(c <= a and d <= b and (c < a or d < b) for j, (c, d) in enumerate(points) if j != i)
        out.append(not dominated)
    return out


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def pick_best(rows: list[dict[str, Any]], tc: TuneConfig) -> dict[str, Any] | None:
    """The winning trial. Trials that ran all their steps are preferred (an early-stopped trial's loss is
    from fewer steps). scalar: the lowest objective. multi: within the budgets (when set) the best quality;
    without budgets, the Pareto point nearest the ideal (best quality and latency, each scaled to [0, 1])."""
    scored = [r for r in rows if _finite(r.get(tc.metric)) and _finite(r.get("latency_ms"))]
    pool = [r for r in scored if r["completed"]] or scored
    if not pool:
        return None

    def q(r: dict[str, Any]) -> float:  # the quality, to minimize
        return signed(r[tc.metric], tc.metric)

    if tc.objective == "scalar":
        return min(pool, key=lambda r: (r["objective"] if _finite(r.get("objective")) else math.inf, q(r)))
    if tc.latency_budget_ms is not None or tc.param_budget is not None:
        feasible = [r for r in pool if within_budget(r, tc)]
        return min(feasible or pool, key=lambda r: (q(r) if feasible else r["objective"], r["latency_ms"]))
    front = [r for r, on in zip(pool, pareto_front([(q(r), r["latency_ms"]) for r in pool])) if on]
    qs = [q(r) for r in front]
    lat = [r["latency_ms"] for r in front]

    def scaled(v: float, vs: list[float]) -> float:
        return (v - min(vs)) / (max(vs) - min(vs)) if max(vs) > min(vs) else 0.0

    return min(front, key=lambda r: (math.hypot(scaled(q(r), qs), scaled(r["latency_ms"], lat)), q(r)))


def arm_summary(rows: list[dict[str, Any]], tc: TuneConfig, teacher: float | None) -> list[dict[str, Any]]:
    """One row per (arm, preset) of an ablation: the metric's mean, min and max over its seeds, the share of
    the teacher's score, latency, size and time per trial; best mean first."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("arm"):
            groups.setdefault((r["arm"], r["preset"] or ""), []).append(r)
    out = []
    for (arm, preset), rs in groups.items():
        vals = [r[tc.metric] for r in rs if r["completed"] and _finite(r.get(tc.metric))]
        mean = sum(vals) / len(vals) if vals else None

        def avg(key: str, rs: list[dict[str, Any]] = rs) -> float | None:
            xs = [r[key] for r in rs if _finite(r.get(key))]
            return sum(xs) / len(xs) if xs else None

        spec = arm_named(tc, arm)
        out.append({"arm": arm, "preset": preset, "init": spec.init,
                    "loss": ", ".join(f"{k} {v}" for k, v in spec.loss.items()) or "distill.loss",
                    "seeds": len(rs), "scored": len(vals), "values": vals, "mean": mean,
                    "min": min(vals) if vals else None,
                    "max": max(vals) if vals else None, "spread": (max(vals) - min(vals)) if vals else None,
                    "of_teacher": mean / teacher if mean is not None and teacher else None,
                    "latency_ms": avg("latency_ms"), "params": avg("params"), "train_s": avg("train_s"),
                    "eval_s": avg("eval_s")})
    return sorted(out, key=lambda a: (a["mean"] is None, signed(a["mean"], tc.metric) if a["mean"] is not None
                                      else 0.0))
