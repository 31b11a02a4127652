"""Small generated image+caption datasets for the data-stage tests: good images in many encodings (JPEG,
PNG with alpha, palette, CMYK, 16-bit, EXIF-rotated, non-square) and bad rows of every kind the stage
must skip, with the skip counts the stage should report."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

COLORS = ["red", "green", "blue", "yellow", "orange", "purple", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star"]


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def picture(i: int, w: int = 64, h: int = 64) -> Image.Image:
    """A distinct RGB picture per i: a colored background with a lighter rectangle."""
    rng = np.random.default_rng(i)
    a = np.empty((h, w, 3), np.uint8)
    a[:] = rng.integers(0, 200, 3)
    y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
    a[y : y + h // 3, x : x + w // 3] = rng.integers(200, 256, 3)
    a += rng.integers(0, 8, a.shape, dtype=np.uint8)  # texture, so no two images hash alike
    return Image.fromarray(a, "RGB")


def good_image(i: int) -> bytes:
    """Image bytes of a usable image, cycling through encodings and modes."""
    kind = i % 8
    if kind == 0:
        return encode(picture(i), "JPEG", quality=90)
    if kind == 1:  # RGBA with transparency
        img = picture(i).convert("RGBA")
        img.putalpha(128)
        return encode(img, "PNG")
    if kind == 2:  # palette
        return encode(picture(i).convert("P", palette=Image.Palette.ADAPTIVE), "PNG")
    if kind == 3:  # CMYK JPEG
        return encode(picture(i).convert("CMYK"), "JPEG")
    if kind == 4:  # 16-bit grayscale
        a = (np.asarray(picture(i).convert("L"), np.uint16) * 257).astype(np.uint16)
        return encode(Image.fromarray(a), "PNG")  # mode I;16
    if kind == 5:  # stored sideways, upright by EXIF orientation 6
        img = picture(i, 64, 96)
        exif = Image.Exif()
        exif[0x0112] = 6
        return encode(img, "JPEG", exif=exif.tobytes())
    if kind == 6:  # landscape
        return encode(picture(i, 96, 64), "PNG")
    return encode(picture(i, 64, 80), "WEBP")


def caption(i: int) -> str:
    return f"a {COLORS[i % len(COLORS)]} {SHAPES[(i // len(COLORS)) % len(SHAPES)]} on a background"


# Each bad row: (bytes maker, caption, the reason the stage must count). Needs data.min_side=32.
def _bad_rows(base: int) -> list[tuple[bytes, str | None, str]]:
    jpeg = encode(picture(base + 1000), "JPEG")
    return [
        (b"", caption(1), "empty_file"),
        (jpeg[: len(jpeg) // 2], caption(2), "truncated"),
        (b"this is not an image, just text", caption(3), "undecodable"),
        (encode(picture(base + 1001, 16, 16)), caption(4), "too_small"),
        (encode(picture(base + 1002, 200, 40)), caption(5), "bad_aspect_ratio"),
        (encode(picture(base + 1003)), None, "missing_caption"),
        (encode(picture(base + 1004)), "   ", "missing_caption"),
        (good_image(0), caption(7) + " again", "duplicate"),  # the same bytes as good row 0
    ]


def make_samples(n_good: int = 32, extras: bool = False, base: int = 0):
    """(samples for pipelines.formats.write_samples, good keys, expected skip counts).

    n_good good rows plus 8 bad ones (20% bad at 32 good). With extras, every row gets an "aesthetic"
    score; good rows with an odd index score below 5 (skipped as low_score with data.min_score=5).
    """
    samples, good, skipped = [], [], {}
    for i in range(n_good):
        extra = {"aesthetic": 7.5 + (i % 3) * 0.5} if extras else {}
        key = f"img{i:04d}"
        if extras and i % 4 == 3:
            extra = {"aesthetic": 3.0}
            skipped["low_score"] = skipped.get("low_score", 0) + 1
        else:
            good.append(key)
        samples.append((key, good_image(i), caption(i), extra))
    for j, (data, cap, reason) in enumerate(_bad_rows(base)):
        extra = {"aesthetic": 8.0} if extras else {}
        samples.append((f"x{j:04d}", data, cap, extra))  # sorts after img*: dedup keeps img0000
        skipped[reason] = skipped.get(reason, 0) + 1
    return samples, good, skipped
