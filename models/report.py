"""Teacher and student side by side: the rows a user reads first (quality, fidelity to the teacher, speed, size),
the ratio of each, and a verdict against the quality goal. Pure: the evaluate stage's report.html, the model card
of an exported student and the demo's closing table all read their numbers from here.

`metrics` is the evaluate stage's dict (metrics.json): teacher values end in `_teacher`, student values in
`_student` or carry no suffix (caption_accuracy, fid)."""

from __future__ import annotations

import html
from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    label: str
    teacher: float | None
    student: float | None
    fmt: str  # format of the values
    better: str  # "higher", "lower" or "" (size: neither, it is what the student trades)
    ratio_kind: str = "student/teacher"  # or "teacher/student" (speed-up)

    @property
    def ratio(self) -> float | None:
        if self.teacher is None or self.student is None:
            return None
        num, den = (self.student, self.teacher) if self.ratio_kind == "student/teacher" else (self.teacher,
                                                                                                self.student)
        return num / den if den else None

    def cells(self) -> tuple[str, str, str]:
        show = lambda v: "-" if v is None else self.fmt.format(v)  # noqa: E731
        r = self.ratio
        return show(self.teacher), show(self.student), "-" if r is None else f"{r:.2f}x"


# (label, teacher key, student key, format, better, ratio kind, scale)
_ROWS = [
    ("caption accuracy (held-out prompts)", "caption_accuracy_teacher", "caption_accuracy", "{:.3f}", "higher",
     "student/teacher", 1.0),
    ("CLIP score", "clip_score_teacher", "clip_score_student", "{:.2f}", "higher", "student/teacher", 1.0),
    ("FID against the reference images", "fid_teacher", "fid", "{:.4g}", "lower", "student/teacher", 1.0),
    ("FID student vs teacher images", None, "fid_student_vs_teacher", "{:.4g}", "lower", "student/teacher", 1.0),
    ("PSNR to the teacher's images (dB)", None, "psnr", "{:.2f}", "higher", "student/teacher", 1.0),
    ("SSIM to the teacher's images", None, "ssim", "{:.3f}", "higher", "student/teacher", 1.0),
    ("ms per image (ratio: speed-up)", "latency_image_ms_teacher", "latency_image_ms_student", "{:.1f}", "lower",
     "teacher/student", 1.0),
    ("U-Net parameters (M)", "params_teacher", "params_student", "{:.2f}", "", "student/teacher", 1e-6),
    ("U-Net MACs per forward (G)", "macs_teacher", "macs_student", "{:.3f}", "", "student/teacher", 1e-9),
]

# the quality metric a verdict is judged on, best first: caption accuracy where the teacher has an analyzer
# (the shapes teacher), else CLIP score, else FID against the reference images
QUALITY = [("caption accuracy", "caption_accuracy_teacher", "caption_accuracy", "higher"),
           ("CLIP score", "clip_score_teacher", "clip_score_student", "higher"),
           ("FID", "fid_teacher", "fid", "lower")]


def comparison_rows(metrics: dict[str, float]) -> list[Row]:
    """The side-by-side rows the metrics hold (a row is left out when the student's value is missing)."""
    rows = []
    for label, tk, sk, fmt, better, kind, scale in _ROWS:
        if sk not in metrics:
            continue
        t = metrics.get(tk) if tk else None
        rows.append(Row(label, None if t is None else float(t) * scale, float(metrics[sk]) * scale, fmt, better,
                        kind))
    return rows


def quality_kept(metrics: dict[str, float]) -> tuple[str, float] | None:
    """(metric name, share of the teacher's quality the student keeps) on the first metric of QUALITY both have:
    student/teacher where higher is better, teacher/student for FID."""
    for name, tk, sk, better in QUALITY:
        t, s = metrics.get(tk), metrics.get(sk)
        if t is None or s is None:
            continue
        num, den = (float(s), float(t)) if better == "higher" else (float(t), float(s))
        if den > 0:
            return name, num / den
    return None


def verdict(metrics: dict[str, float], goal: float) -> str:
    """One sentence: does the student keep `goal` of the teacher's quality, at what speed and size."""
    kept = quality_kept(metrics)
    if kept is None:
        return "No verdict: the metrics hold no quality measure of both the teacher and the student."
    name, share = kept
    met = "met" if share >= goal else "not met"
    text = f"The student keeps {share:.2f} of the teacher's {name}: goal {goal:.2f} {met}"
    t_ms, s_ms = metrics.get("latency_image_ms_teacher"), metrics.get("latency_image_ms_student")
    if t_ms and s_ms:
        text += f"; it draws an image {t_ms / s_ms:.2f}x as fast"
    t_p, s_p = metrics.get("params_teacher"), metrics.get("params_student")
    if t_p and s_p:
        text += f" with {s_p / t_p:.2f}x the U-Net parameters"
    return text + "."


def goal_met(metrics: dict[str, float], goal: float) -> bool | None:
    kept = quality_kept(metrics)
    return None if kept is None else kept[1] >= goal


def text_table(metrics: dict[str, float]) -> str:
    """The rows as a fixed-width table for a terminal."""
    rows = comparison_rows(metrics)
    if not rows:
        return ""
    lines = [f"{'':38}{'teacher':>10}{'student':>10}{'ratio':>10}"]
    for r in rows:
        t, s, ratio = r.cells()
        lines.append(f"{r.label:38}{t:>10}{s:>10}{ratio:>10}")
    return "\n".join(lines)


def markdown_table(metrics: dict[str, float]) -> str:
    rows = comparison_rows(metrics)
    if not rows:
        return ""
    out = ["| | teacher | student | ratio |", "| --- | --- | --- | --- |"]
    out += [f"| {r.label} | " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(out)


def html_table(metrics: dict[str, float]) -> str:
    rows = comparison_rows(metrics)
    if not rows:
        return ""
    esc = html.escape
    body = "".join(f"<tr><td>{esc(r.label)}</td>" + "".join(f"<td>{esc(c)}</td>" for c in r.cells()) + "</tr>"
                   for r in rows)
    return ('<table id="side-by-side"><tr><th></th><th>teacher</th><th>student</th><th>ratio</th></tr>'
            f"{body}</table>")
