"""The built-in shapes dataset: captioned images of colored shapes, and the caption-accuracy metric.

A new user sees the whole system work with no network: this file generates, from a seed, any number of
images like "two small green squares at the bottom right on a black background", writes them in the
formats the data stage reads, and reads the attributes back from an image with pixel statistics and
simple geometry (no learned model), so a generated image can be checked against its prompt.

The vocabulary is small so a tiny model learns it at 64 px: 3 shapes, 6 colors, 2 sizes, 5 positions,
counts 1-3 and 4 backgrounds. Shapes never overlap; several shapes are always small and the same shape
and color. Every word of a caption is one token of the tiny tokenizer (models/tiny.py VOCAB_WORDS).
Sample i of seed s depends only on (s, i): the first n samples of a seed are the same for any larger n.
"""

from __future__ import annotations

import io
import math
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "cyan": (40, 210, 220),
}
BACKGROUNDS = {"black": (15, 15, 15), "white": (240, 240, 240), "gray": (128, 128, 128), "blue": COLORS["blue"]}
SIZES = {"small": 10, "large": 20}  # side of the bounding box, in pixels of a 64 px image
POSITIONS = {  # where the group's center lies, in pixels of a 64 px image
    "top left": (16, 16),
    "top right": (48, 16),
    "bottom left": (16, 48),
    "bottom right": (48, 48),
    "center": (32, 32),
}
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
ATTRIBUTES = ("shape", "color", "size", "position", "count", "background")

# Offsets of each shape from the group's center (64 px units; small shapes whose bounding boxes are 3 px
# apart or more). Each layout's offsets average to zero, so the group's center is the position.
_T = 13 / 3  # three in a triangle: bottom pair at +_T, the top one 13 px above them
LAYOUTS = {
    1: [[(0, 0)]],
    2: [[(-6.5, 0), (6.5, 0)], [(0, -6.5), (0, 6.5)], [(-6.5, -6.5), (6.5, 6.5)], [(-6.5, 6.5), (6.5, -6.5)]],
    3: [[(-6.5, _T), (6.5, _T), (0, _T - 13)], [(-6.5, -_T), (6.5, -_T), (0, 13 - _T)],
        [(_T, -6.5), (_T, 6.5), (_T - 13, 0)], [(-_T, -6.5), (-_T, 6.5), (13 - _T, 0)]],
}
JITTER = 2  # the group moves up to this many pixels from its position
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: smooth, deterministic edges


@dataclass
class ShapeSample:
    key: str
    caption: str
    attrs: dict
    image: Image.Image
    centers: list[tuple[float, float]] = field(default_factory=list)  # shape centers, 64 px units


def caption_of(attrs: dict) -> str:
    n = attrs["count"]
    noun = attrs["shape"] + ("s" if n > 1 else "")
    where = "the center" if attrs["position"] == "center" else f"the {attrs['position']}"
    return f"{COUNT_WORDS[n]} {attrs['size']} {attrs['color']} {noun} at {where} on a {attrs['background']} background"


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


def sample_attrs(seed: int, index: int) -> tuple[dict, list[tuple[float, float]]]:
    """The attributes and shape centers (64 px units) of sample `index` of `seed`."""
    rng = _rng(seed, index)
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    colors = [c for c in COLORS if c != background]
    count = int(rng.integers(1, 4))
    attrs = {
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "color": colors[rng.integers(len(colors))],
        "size": "large" if count == 1 and rng.random() < 0.5 else "small",
        "position": list(POSITIONS)[rng.integers(len(POSITIONS))],
        "count": count,
        "background": background,
    }
    layouts = LAYOUTS[count]
    offsets = layouts[rng.integers(len(layouts))]
    px, py = POSITIONS[attrs["position"]]
    jx, jy = rng.integers(-JITTER, JITTER + 1, size=2)
    # whole pixels, so edges fall on the pixel grid (floor(v + 0.5) keeps 13 px apart exactly 13 apart)
    centers = [(float(math.floor(px + jx + dx + 0.5)), float(math.floor(py + jy + dy + 0.5))) for dx, dy in offsets]
    return attrs, centers


def render(attrs: dict, centers: list[tuple[float, float]], size: int = 64) -> Image.Image:
    s = size * SUPERSAMPLE / 64  # 64 px units -> canvas pixels
    canvas = Image.new("RGB", (size * SUPERSAMPLE,) * 2, BACKGROUNDS[attrs["background"]])
    draw = ImageDraw.Draw(canvas)
    color = COLORS[attrs["color"]]
    h = SIZES[attrs["size"]] / 2 * s
    for cx, cy in centers:
        x, y = cx * s, cy * s
        if attrs["shape"] == "circle":
            draw.ellipse([x - h, y - h, x + h - 1, y + h - 1], fill=color)
        elif attrs["shape"] == "square":
            draw.rectangle([x - h, y - h, x + h - 1, y + h - 1], fill=color)
        else:  # upright triangle filling half its bounding box
            draw.polygon([(x, y - h), (x + h - 1, y + h - 1), (x - h, y + h - 1)], fill=color)
    return canvas.resize((size, size), Image.BOX)


def sample(seed: int, index: int, size: int = 64) -> ShapeSample:
    """Sample `index` of seed `seed`: the same whatever else is generated."""
    attrs, centers = sample_attrs(seed, index)
    return ShapeSample(f"shapes-{seed}-{index:07d}", caption_of(attrs), attrs, render(attrs, centers, size), centers)


def generate(n: int, seed: int = 0, size: int = 64) -> Iterator[ShapeSample]:
    """n captioned images, deterministic from the seed."""
    if n < 0 or size < 16:
        raise ValueError(f"shapes: need n >= 0 and size >= 16, got n={n}, size={size}")
    for i in range(n):
        yield sample(seed, i, size)


def prompts(n: int, seed: int = 0, holdout: int = 0, only: str | None = None) -> list[str]:
    """The captions of generate(n, seed) without rendering the images (evaluation prompts); with `holdout` and
    `only`, the captions of the samples `indices` picks."""
    return [caption_of(sample_attrs(seed, i)[0]) for i in indices(n, seed, holdout, only)]


# --- held-out attribute combinations (the limited-data benchmark) ------------------------------------------

# every (shape, color) pair in one fixed order: held_out(k) is its first k, the same for every seed and run
PAIRS = [(s, c) for s in SHAPES for c in COLORS]
PAIR_ORDER = [PAIRS[i] for i in np.random.default_rng(20261202).permutation(len(PAIRS))]


def held_out(k: int) -> set[tuple[str, str]]:
    """The k (shape, color) pairs a limited-data student never sees: data keeps the others, evaluation can ask
    for these alone."""
    if not 0 <= k < len(PAIRS):
        raise ValueError(f"holdout={k}: hold out 0 to {len(PAIRS) - 1} of the {len(PAIRS)} shape-color pairs")
    return set(PAIR_ORDER[:k])


def indices(n: int, seed: int = 0, holdout: int = 0, only: str | None = None) -> list[int]:
    """The sample indices of the first n samples of `seed` whose (shape, color) pair is held out (only="heldout")
    or not (only="seen", the default when holdout > 0); 0..n-1 when nothing is held out."""
    if only not in (None, "seen", "heldout"):
        raise ValueError(f"only={only!r}: choose seen or heldout")
    if holdout == 0:
        if only == "heldout":
            raise ValueError("only=heldout needs holdout >= 1")
        return list(range(n))
    held, want = held_out(holdout), (only or "seen") == "heldout"
    out, i = [], 0
    while len(out) < n:
        a = sample_attrs(seed, i)[0]
        if ((a["shape"], a["color"]) in held) == want:
            out.append(i)
        i += 1
    return out


_CAPTION = re.compile(
    r"^(?P<count>a|an|one|two|three) (?:(?P<size>small|large) )?(?P<color>{colors}) (?P<shape>{shapes})(?P<plural>s?)"
    r"(?: (?:at|in) the (?P<position>{positions}))?(?: on an? (?P<background>{backgrounds}) background)?$".format(
        colors="|".join(COLORS),
        shapes="|".join(SHAPES),
        positions="|".join(POSITIONS),
        backgrounds="|".join(BACKGROUNDS),
    )
)


def parse_caption(caption: str) -> dict | None:
    """The attributes a shapes caption names (size, position and background may be left out), or None
    when it is not one. "a red circle on a blue background" -> {count: 1, color: red, shape: circle,
    background: blue}."""
    m = _CAPTION.match(" ".join(caption.lower().strip().rstrip(".").split()))
    if not m:
        return None
    attrs = {k: v for k, v in m.groupdict().items() if v is not None}
    attrs["count"] = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}[attrs["count"]]
    if (attrs.pop("plural") == "s") != (attrs["count"] > 1):
        return None  # "two red circle", "a red circles"
    return attrs


# ---- the analyzer: attributes read back from pixels -----------------------------------------------------

MIN_AREA = 15  # components smaller than this (64 px image) are specks, not shapes
FG_DISTANCE = 50.0  # a pixel this far (RGB, 0-255) from the background color is foreground


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as (k, 2) arrays of (row, col)."""
    seen = np.zeros_like(mask)
    h, w = mask.shape
    out = []
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        seen[r0, c0] = True
        queue, pix = deque([(r0, c0)]), []
        while queue:
            r, c = queue.popleft()
            pix.append((r, c))
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    queue.append((rr, cc))
        out.append(np.array(pix))
    return out


def _nearest(rgb: np.ndarray, palette: dict) -> str:
    names = list(palette)
    d = [np.linalg.norm(rgb - np.array(palette[k], dtype=np.float64)) for k in names]
    return names[int(np.argmin(d))]


def _moments(alpha: np.ndarray, comp: np.ndarray) -> tuple[float, float, float]:
    """Shape features of one component from the soft coverage around it (robust to blur):
    skew: third moment of the rows; an upright triangle -0.57 (mass low, apex up), circle and square 0.
    corner: fourth moment along the diagonals over along the axes; square 4/3, circle 1, triangle ~1.
    side: the side of the bounding box (sqrt of its area)."""
    r0, r1 = max(comp[:, 0].min() - 1, 0), min(comp[:, 0].max() + 2, alpha.shape[0])
    c0, c1 = max(comp[:, 1].min() - 1, 0), min(comp[:, 1].max() + 2, alpha.shape[1])
    w = alpha[r0:r1, c0:c1]
    yy, xx = np.mgrid[r0:r1, c0:c1].astype(np.float64)
    m = w.sum()
    dy, dx = yy - (w * yy).sum() / m, xx - (w * xx).sum() / m
    skew = (w * dy**3).sum() / m / max(1e-9, (w * dy**2).sum() / m) ** 1.5
    u, v = (dx + dy) / np.sqrt(2), (dx - dy) / np.sqrt(2)
    corner = (w * (u**4 + v**4)).sum() / max(1e-9, (w * (dx**4 + dy**4)).sum())
    hgt = comp[:, 0].max() - comp[:, 0].min() + 1
    wid = comp[:, 1].max() - comp[:, 1].min() + 1
    return float(skew), float(corner), float(np.sqrt(hgt * wid))


def analyze(image: Image.Image) -> dict:
    """Shape, color, size, position, count and background read from an image (resized to 64 px).

    Background: median of the border pixels. Foreground: pixels far from it. Color: median foreground
    color, nearest palette entry. Shapes: the 4-connected components (of MIN_AREA pixels or more) of the
    pixels nearer the shape color than the background (count). Shape: from moments of the soft coverage
    (a triangle's mass sits low; a square reaches further along its diagonals than a circle). Size: the
    bounding boxes' side. Position: the
    center of all shape pixels, nearest anchor.
    """
    img = image.convert("RGB")
    if img.size != (64, 64):
        img = img.resize((64, 64), Image.BOX)
    a = np.asarray(img, dtype=np.float64)  # (64, 64, 3)
    border = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])  # (252, 3)
    bg_rgb = np.median(border, axis=0)
    out: dict = {"background": _nearest(bg_rgb, BACKGROUNDS), "count": 0,
                 "shape": None, "color": None, "size": None, "position": None}
    dist = np.linalg.norm(a - bg_rgb, axis=-1)  # (64, 64)
    comps = [c for c in _components(dist > FG_DISTANCE) if len(c) >= MIN_AREA]
    if not comps:
        return out
    pix = np.concatenate(comps)
    fg_rgb = np.median(a[pix[:, 0], pix[:, 1]], axis=0)
    out["color"] = _nearest(fg_rgb, COLORS)
    # second pass: cut halfway between background and shape color, so blurred edges (a decoder's halo)
    # neither grow the shapes nor bridge the gaps between them
    cut = max(FG_DISTANCE, 0.5 * float(np.linalg.norm(fg_rgb - bg_rgb)))
    comps = [c for c in _components(dist > cut) if len(c) >= MIN_AREA] or comps
    out["count"] = len(comps)
    pix = np.concatenate(comps)
    alpha = np.clip(dist / max(1.0, float(np.linalg.norm(fg_rgb - bg_rgb))), 0, 1)  # soft coverage
    feats = np.array([_moments(alpha, c) for c in comps])  # (n, 3): skew, corner, side
    skew, corner, side = np.median(feats, axis=0)
    out["shape"] = "triangle" if skew < -0.25 else "square" if corner > 1.15 else "circle"
    out["size"] = "large" if side > 15 else "small"
    cy, cx = pix.mean(axis=0)
    out["position"] = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    out.update(skew=round(float(skew), 3), corner=round(float(corner), 3))  # diagnostics
    return out


def caption_accuracy(images: list[Image.Image], prompts: list[str]) -> dict | None:
    """Fraction of images whose attributes match their prompt, per attribute and overall (all named
    attributes right); None when any prompt is not a shapes caption. Each attribute is scored over the
    prompts that name it."""
    if len(images) != len(prompts):
        raise ValueError(f"caption_accuracy: {len(images)} images but {len(prompts)} prompts")
    wanted = [parse_caption(p) for p in prompts]
    if not prompts or any(w is None for w in wanted):
        return None
    hits: dict[str, list[bool]] = {k: [] for k in ATTRIBUTES}
    overall = []
    for img, want in zip(images, wanted):
        got = analyze(img)
        ok = True
        for k, v in want.items():
            hits[k].append(got[k] == v)
            ok = ok and got[k] == v
        overall.append(ok)
    result = {"overall": float(np.mean(overall)), "n": len(images)}
    result.update({k: float(np.mean(v)) for k, v in hits.items() if v})
    return result


# ---- writing the dataset ----------------------------------------------------------------------------

def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
