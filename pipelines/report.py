"""The evaluate stage's plots (t-SNE/PCA of features, the steps sweep) and its HTML report: the verdict and the
teacher | student table first (models/report.py), then the images, the plots and every metric."""

from __future__ import annotations

import html
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from models import report
from models.evaluation import SWEEP_KEY, SWEEP_METRICS, Evaluation, sweep_key

log = logging.getLogger(__name__)



def _scatter_grid(embeddings: dict[str, dict[str, np.ndarray]], names: list[str], method: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        t, s = embeddings[name]["teacher"], embeddings[name]["student"]
        x = np.concatenate([t, s]).astype(np.float64)
        x = x - x.mean(0)
        if method == "pca":
            pca = PCA(n_components=2, random_state=0)
            y = pca.fit_transform(x)
            title = f"{name}\n(PC1+2: {pca.explained_variance_ratio_[:2].sum():.0%} of variance)"
        else:
            perplexity = float(max(2, min(30, (len(x) - 1) // 3)))
            y = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=0, max_iter=500).fit_transform(x)
            title = name
        n = len(t)
        ax.scatter(y[:n, 0], y[:n, 1], s=12, c="tab:blue", label="teacher", alpha=0.7)
        ax.scatter(y[n:, 0], y[n:, 1], s=12, c="tab:orange", label="student", alpha=0.7, marker="x")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{'PCA' if method == 'pca' else 't-SNE'}: teacher vs student features on the same inputs")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_plots(ev: Evaluation, out: Path) -> list[str]:
    """plots/*.png; returns their paths relative to `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    names = list(ev.embeddings)
    written = []
    if names:
        _scatter_grid(ev.embeddings, names, "pca", plots / "pca.png")
        # t-SNE is slower: a few blocks spread over the U-Net, and the output
        blocks = [n for n in names if n != "output"]
        pick = [blocks[i] for i in sorted({round(j * (len(blocks) - 1) / 3) for j in range(4)})] if blocks else []
        _scatter_grid(ev.embeddings, pick + ["output"], "tsne", plots / "tsne.png")
        written += ["plots/pca.png", "plots/tsne.png"]
    cos = {k.removeprefix("feature_cosine_"): v for k, v in ev.metrics.items()
           if k.startswith("feature_cosine_") and k != "feature_cosine_mean"}
    if cos:
        fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(cos)), 3.2))
        ax.bar(range(len(cos)), list(cos.values()), color="tab:green")
        ax.set_xticks(range(len(cos)), list(cos), rotation=45, ha="right", fontsize=8)
        ax.set_ylim(min(0, *cos.values()), 1.05)
        ax.set_ylabel("cosine similarity")
        ax.set_title("student vs teacher features, per teacher block")
        fig.tight_layout()
        fig.savefig(plots / "feature_cosine.png", dpi=90)
        plt.close(fig)
        written.append("plots/feature_cosine.png")
    n = min(16, len(ev.prompts))
    columns = _image_columns(ev, shown=True)
    fig, axes = plt.subplots(n, len(columns), figsize=(2.5 * len(columns), 2.6 * n + 0.4), squeeze=False)
    for i in range(n):
        for j, (_, _, images) in enumerate(columns):
            axes[i, j].imshow(images[i])
            axes[i, j].axis("off")
        axes[i, 0].set_title(f"{ev.prompts[i][:70]} (seed {ev.seeds[i]})", fontsize=7, loc="left")
    fig.suptitle(" | ".join(label for _, label, _ in columns), fontsize=9)
    fig.tight_layout()
    fig.savefig(plots / "grid.png", dpi=90)
    plt.close(fig)
    written.append("plots/grid.png")
    if ev.sweep_images:
        _sweep_plot(ev.metrics, sorted(ev.sweep_images), plots / "steps_sweep.png")
        written.append("plots/steps_sweep.png")
    return written


def _n_steps(k: float) -> str:
    return f"{k:g} step{'' if k == 1 else 's'}"


def _image_columns(ev: Evaluation, shown: bool = False) -> list[tuple[str, str, list[Image.Image]]]:
    """(folder under images/, label, images) for the teacher, the student and each step count of the sweep;
    `shown`: without the sweep's copy of the student's own step count."""
    m = ev.metrics
    steps = lambda key: f", {_n_steps(m[key])}" if key in m else ""  # noqa: E731
    cols = [("teacher", f"teacher{steps('steps_teacher')}", ev.teacher_images),
            ("student", f"student{steps('steps_student')}", ev.student_images)]
    return cols + [(f"student_{k}steps", f"student, {_n_steps(k)}", ev.sweep_images[k]) for k in sorted(ev.sweep_images)
                   if not (shown and k == m.get("steps_student"))]


def _sweep_plot(metrics: dict[str, float], ks: list[int], path: Path) -> None:
    """Quality (FID student vs teacher, caption accuracy) and latency per image against the student's steps,
    the teacher at its steps as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t_steps = metrics.get("steps_teacher")
    fig, (q_ax, l_ax) = plt.subplots(1, 2, figsize=(9, 3.4))
    q_ax.plot(ks, [metrics[sweep_key("fid_student_vs_teacher", k)] for k in ks], "o-", color="tab:blue")
    q_ax.set_xlabel("student steps")
    q_ax.set_ylabel("FID student vs teacher", color="tab:blue")
    if all(sweep_key("caption_accuracy", k) in metrics for k in ks):
        acc_ax = q_ax.twinx()
        acc_ax.plot(ks, [metrics[sweep_key("caption_accuracy", k)] for k in ks], "s--", color="tab:green",
                    label="student")
        if "caption_accuracy_teacher" in metrics:
            acc_ax.axhline(metrics["caption_accuracy_teacher"], color="tab:green", ls=":", lw=1,
                           label=f"teacher ({t_steps:g} steps)" if t_steps else "teacher")
            acc_ax.legend(fontsize=8, loc="lower right")
        acc_ax.set_ylabel("caption accuracy", color="tab:green")
        acc_ax.set_ylim(-0.02, 1.02)
    q_ax.set_title("quality")
    l_ax.plot(ks, [metrics[sweep_key("latency_image_ms_student", k)] for k in ks], "o-", color="tab:orange",
              label="student")
    if "latency_image_ms_teacher" in metrics:
        l_ax.axhline(metrics["latency_image_ms_teacher"], color="tab:gray", ls="--",
                     label=f"teacher ({t_steps:g} steps, CFG)" if t_steps else "teacher")
    l_ax.set_xlabel("student steps")
    l_ax.set_ylabel("ms per image")
    l_ax.set_ylim(bottom=0)
    l_ax.legend(fontsize=8)
    l_ax.set_title("latency")
    for ax in (q_ax, l_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
    fig.suptitle("steps sweep: the student at each step count, same prompts and seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _fmt(v: float) -> str:
    if isinstance(v, float) and math.isinf(v):
        return "∞" if v > 0 else "-∞"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


SECTIONS = [
    ("Steps and guidance", ("steps", "guidance_scale", "cfg_batch")),
    ("Quality", ("fid", "kid_", "is_", "clip_score", "caption_accuracy", "num_")),
    ("Fidelity to the teacher (same seeds)", ("psnr", "ssim", "latent_mse")),
    ("Features (student vs teacher, cosine)", ("feature_cosine_",)),
    ("Speed and size", ("params_", "param_ratio", "macs", "latency_", "speedup", "peak_mem")),
]


def write_report(ev: Evaluation, out: Path, title: str, info: dict[str, Any] | None = None,
                 goal: float = 0.95) -> None:
    """images/{teacher,student,student_{k}steps}/*.png, plots/*.png, metrics.json and report.html under a
    local folder. The page answers first (the verdict against `goal`, teacher | student side by side), then shows
    the images and the plots, and lists every metric last."""
    columns = _image_columns(ev)
    for folder, _, images in columns:
        d = out / "images" / folder
        d.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images):
            im.save(d / f"{i:04d}.png")
    plots = write_plots(ev, out)
    (out / "metrics.json").write_text(json.dumps(ev.metrics, indent=2))
    esc = html.escape
    rows, shown = [], {k for k in ev.metrics if SWEEP_KEY.match(k)}  # those are in the sweep's table
    for section, prefixes in SECTIONS + [("Run", ("",))]:
        keys = [k for k in ev.metrics if k not in shown and k.startswith(prefixes)]
        if not keys:
            continue
        rows.append(f'<tr><th colspan="2">{esc(section)}</th></tr>')
        for k in keys:
            rows.append(f"<tr><td>{esc(k)}</td><td>{esc(_fmt(ev.metrics[k]))}</td></tr>")
            shown.add(k)
    columns = _image_columns(ev, shown=True)
    grid = []
    for i, (p, s) in enumerate(zip(ev.prompts, ev.seeds)):
        cells = "".join(f'<td><img src="images/{folder}/{i:04d}.png"></td>' for folder, _, _ in columns)
        grid.append(f"<tr><td>{esc(p)}<br><small>seed {s}</small></td>{cells}</tr>")
    heads = "".join(f"<th>{esc(label)}</th>" for _, label, _ in columns)
    info_rows = "".join(f"<tr><td>{esc(str(k))}</td><td>{esc(str(v))}</td></tr>" for k, v in (info or {}).items())
    met = report.goal_met(ev.metrics, goal)
    verdict_class = "none" if met is None else "met" if met else "missed"
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }} table {{ border-collapse: collapse; margin-bottom: 2em; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }}
th {{ background: #eee; }} img {{ max-width: 256px; image-rendering: pixelated; }} .plot img {{ max-width: 100%; }}
#verdict {{ font-size: 1.2em; padding: 0.5em 1em; border-left: 6px solid #999; }} #verdict.met {{ border-color: #2a2; }}
#verdict.missed {{ border-color: #c22; }}
</style></head><body>
<h1>{esc(title)}</h1>
<p id="verdict" class="{verdict_class}">{esc(report.verdict(ev.metrics, goal))}</p>
<h2>Teacher | student</h2>
{report.html_table(ev.metrics)}
{_sweep_table(ev.metrics, sorted(ev.sweep_images))}
<h2>Teacher | student, same prompt and seed</h2>
<table><tr><th>prompt</th>{heads}</tr>{"".join(grid)}</table>
<h2>Plots</h2>
{"".join(f'<div class="plot"><h3>{esc(p)}</h3><img src="{esc(p)}"></div>' for p in plots)}
<h2>The run</h2>
<table>{info_rows}</table>
<details><summary>Every metric ({len(ev.metrics)})</summary>
<table id="metrics">{"".join(rows)}</table>
</details>
</body></html>
"""
    (out / "report.html").write_text(page)


def _sweep_table(metrics: dict[str, float], ks: list[int]) -> str:
    """The "Steps sweep" section: one row per step count (each cell also names its metric key), and the
    teacher at its steps."""
    if not ks:
        return ""
    esc = html.escape
    matches = [SWEEP_KEY.match(k) for k in metrics]
    found = {m["name"] for m in matches if m and int(m["steps"]) in ks}
    names = [n for n in SWEEP_METRICS if n in found] + sorted(found - set(SWEEP_METRICS))
    teacher = {"fid_student_vs_teacher": None, "fid": metrics.get("fid_teacher"),
               "clip_score_student": metrics.get("clip_score_teacher"),
               "caption_accuracy": metrics.get("caption_accuracy_teacher"),
               "latency_image_ms_student": metrics.get("latency_image_ms_teacher"), "speedup_image": 1.0}
    head = "".join(f"<th>{esc(n)}</th>" for n in names)
    t_label = f"teacher, {_n_steps(metrics['steps_teacher'])}" if "steps_teacher" in metrics else "teacher"
    if "cfg_batch_teacher" in metrics:
        t_label += f" (U-Net batch {metrics['cfg_batch_teacher']:g} per step)"
    rows = [f"<tr><td>{esc(t_label)}</td>"
            + "".join(f"<td>{esc(_fmt(teacher[n])) if teacher.get(n) is not None else ''}</td>" for n in names)
            + "</tr>"]
    for k in ks:
        cells = "".join(f'<td title="{esc(sweep_key(n, k))}">{esc(_fmt(metrics[sweep_key(n, k)]))}'
                        f"<br><small>{esc(sweep_key(n, k))}</small></td>" if sweep_key(n, k) in metrics
                        else "<td></td>" for n in names)
        rows.append(f"<tr><td>student, {_n_steps(k)}</td>{cells}</tr>")
    guidance = metrics.get("guidance_scale_student")
    note = (f"<p>The student at each step count with its own scheduler, guidance scale {guidance:g}, on the "
            "teacher's prompts and seeds; speedup_image is against the teacher's image latency.</p>"
            if guidance is not None else "")
    return f"<h2>Steps sweep</h2>\n{note}<table><tr><th></th>{head}</tr>{''.join(rows)}</table>"

