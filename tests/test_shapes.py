"""The built-in shapes dataset (models/shapes.py): determinism, caption parsing, the analyzer on dataset
images and on noise, writing in the three formats to a local folder and to S3, and the shipped teacher."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from models import shapes
from pipelines import formats
from pipelines.storage import join, list_files, read_bytes


def test_generate_is_deterministic_from_the_seed():
    a = list(shapes.generate(12, seed=3))
    b = list(shapes.generate(12, seed=3))
    assert [s.caption for s in a] == [s.caption for s in b]
    assert [s.image.tobytes() for s in a] == [s.image.tobytes() for s in b]
    # sample i depends on (seed, i) only: a shorter run is a prefix
    assert [s.key for s in shapes.generate(5, seed=3)] == [s.key for s in a[:5]]
    assert shapes.prompts(12, seed=3) == [s.caption for s in a]
    other = [s.caption for s in shapes.generate(12, seed=4)]
    assert other != [s.caption for s in a]
    assert a[0].image.size == (64, 64) and next(shapes.generate(1, 3, size=128)).image.size == (128, 128)
    # every word of every caption is one token of the tiny tokenizer
    from models.tiny import VOCAB_WORDS

    words = {w for c in shapes.prompts(300, seed=0) for w in c.split()}
    assert words <= set(VOCAB_WORDS), words - set(VOCAB_WORDS)


def test_dataset_covers_the_vocabulary_and_shapes_do_not_overlap():
    samples = list(shapes.generate(400, seed=0))
    for attr in ("shape", "color", "position", "count", "background", "size"):
        assert len({s.attrs[attr] for s in samples}) >= 2, attr
    assert {s.attrs["shape"] for s in samples} == set(shapes.SHAPES)
    assert {s.attrs["count"] for s in samples} == {1, 2, 3}
    for s in samples:
        assert s.attrs["color"] != s.attrs["background"]
        side = shapes.SIZES[s.attrs["size"]]
        for i, (x1, y1) in enumerate(s.centers):
            assert side / 2 <= x1 <= 64 - side / 2 and side / 2 <= y1 <= 64 - side / 2  # inside the image
            for x2, y2 in s.centers[i + 1 :]:
                assert max(abs(x1 - x2), abs(y1 - y2)) >= side + 3 - 1e-6  # bounding boxes 3 px apart or more


def test_parse_caption():
    full = shapes.parse_caption("two small green squares at the bottom right on a black background")
    assert full == {"count": 2, "size": "small", "color": "green", "shape": "square",
                    "position": "bottom right", "background": "black"}
    # size, position and background may be left out; case and a final period do not matter
    assert shapes.parse_caption("A red circle on a blue background.") == {
        "count": 1, "color": "red", "shape": "circle", "background": "blue"}
    assert shapes.parse_caption("three yellow triangles in the center") == {
        "count": 3, "color": "yellow", "shape": "triangle", "position": "center"}
    for bad in ("two red circle", "a red circles", "a photo of a cat", "a red circle at the moon",
                "a magenta circle", ""):
        assert shapes.parse_caption(bad) is None, bad
    for s in shapes.generate(50, seed=1):
        assert shapes.parse_caption(s.caption) == s.attrs


def test_analyzer_reads_dataset_images_back():
    samples = list(shapes.generate(300, seed=5))
    acc = shapes.caption_accuracy([s.image for s in samples], [s.caption for s in samples])
    assert acc["overall"] == 1.0 and acc["n"] == 300
    assert all(acc[k] == 1.0 for k in shapes.ATTRIBUTES)
    # larger renders are read at 64 px
    big = list(shapes.generate(30, seed=6, size=256))
    assert shapes.caption_accuracy([s.image for s in big], [s.caption for s in big])["overall"] == 1.0
    # the analyzer is not fooled by a wrong prompt
    shifted = [s.caption for s in samples[1:] + samples[:1]]
    assert shapes.caption_accuracy([s.image for s in samples], shifted)["overall"] < 0.05


def test_noise_scores_about_chance():
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(150)]
    acc = shapes.caption_accuracy(noise, shapes.prompts(150, seed=7))
    assert acc["overall"] < 0.02
    # chance: shape 1/3, color ~1/5, position 1/5, count 1/3, background 1/4, size ~1/2 (small is 5/6)
    for k, bound in {"shape": 0.5, "color": 0.35, "position": 0.35, "count": 0.5, "background": 0.4}.items():
        assert acc[k] < bound, (k, acc)
    flat = [Image.new("RGB", (64, 64), (128, 128, 128))] * 10  # nothing drawn: no shape is read
    assert shapes.analyze(flat[0])["count"] == 0
    assert shapes.caption_accuracy(flat, shapes.prompts(10, seed=7))["overall"] == 0.0


def test_caption_accuracy_needs_shapes_prompts():
    img = next(shapes.generate(1)).image
    assert shapes.caption_accuracy([img, img], ["a red circle", "an astronaut riding a horse"]) is None
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        shapes.caption_accuracy([img, img], ["a red circle"])


def _read_back(uri: str, fmt: str) -> dict[str, tuple[bytes, str | None]]:
    """key -> (image bytes, caption), read with plain pyarrow/tarfile, not with our reader."""
    out = {}
    files = list_files(uri)
    if fmt == "imagefolder":
        for f in files:
            if f.endswith(".png") or f.endswith(".jpg"):
                key = f.rsplit(".", 1)[0]
                out[key] = (read_bytes(join(uri, f)), read_bytes(join(uri, key + ".txt")).decode())
    elif fmt == "parquet":
        for f in files:
            t = pq.read_table(io.BytesIO(read_bytes(join(uri, f)))).to_pylist()
            out.update({r["key"]: (r["image"], r["caption"]) for r in t})
    else:
        for f in files:
            with tarfile.open(fileobj=io.BytesIO(read_bytes(join(uri, f)))) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            for name, data in members.items():
                key, ext = name.rsplit(".", 1)
                if ext in ("png", "jpg"):
                    out[key] = (data, members[key + ".txt"].decode())
    return out


def _check_written(uri: str, fmt: str, n: int, bad: int, seed: int) -> None:
    rows = _read_back(uri, fmt)
    assert len(rows) == n
    expected = {s.key: s for s in shapes.generate(n, seed=seed)}
    assert set(rows) == set(expected)
    broken = 0
    for key, (data, caption) in rows.items():
        assert caption == expected[key].caption
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except Exception:
            broken += 1
            continue
        assert np.array_equal(np.asarray(img.convert("RGB")), np.asarray(expected[key].image))
    assert broken == bad


@pytest.mark.parametrize("fmt", ["imagefolder", "parquet", "webdataset"])
def test_write_shapes_local(tmp_path, fmt):
    uri = str(tmp_path / fmt)
    written = formats.write_shapes(uri, fmt, n=30, seed=2, bad_fraction=0.2, shard_size=8)
    assert written["rows"] == 30 and written["bad_rows"] == 6
    _check_written(uri, fmt, 30, 6, seed=2)
    if fmt != "imagefolder":
        assert len(list_files(uri)) == 4  # 30 rows in shards of 8


@pytest.mark.parametrize("fmt", ["imagefolder", "parquet", "webdataset"])
def test_write_shapes_s3(s3_bucket, fmt):
    uri = f"{s3_bucket}/shapes/{fmt}"
    written = formats.write_shapes(uri, fmt, n=12, seed=9, bad_fraction=0.25)
    assert written == {"uri": uri, "format": fmt, "rows": 12, "bad_rows": 3, "seed": 9, "size": 64}
    _check_written(uri, fmt, 12, 3, seed=9)


def test_write_shapes_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="bad_fraction"):
        formats.write_shapes(str(tmp_path), "parquet", n=4, bad_fraction=1.5)
    with pytest.raises(ValueError, match="unknown dataset format"):
        formats.write_shapes(str(tmp_path), "csv", n=4)


def test_shipped_teacher_draws_its_captions():
    import torch
    from diffusers import StableDiffusionPipeline

    from models.student import preset_spec
    from models.teacher import SHIPPED, load_teacher

    t = load_teacher("builtin:shapes-sd1", dtype="float32")
    assert t.family == "sd1" and t.source == str(SHIPPED / "shapes-sd1")
    for preset in ("bk-base", "bk-small", "bk-tiny"):
        preset_spec(preset, t.unet.config)  # the BK-SDM presets apply to it
    pipe = StableDiffusionPipeline(vae=t.vae, text_encoder=t.text_encoder, tokenizer=t.tokenizer, unet=t.unet,
                                   scheduler=t.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompts = shapes.prompts(32, seed=123)
    images = pipe(prompts, height=64, width=64, num_inference_steps=10, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(0)).images
    acc = shapes.caption_accuracy(images, prompts)
    card = json.loads(open(SHIPPED / "shapes-sd1" / "training.json").read())
    assert card["caption_accuracy"]["dataset"]["overall"] == 1.0
    # chance: overall ~0.0005, shape 1/3, color ~1/5, size 1/2, position 1/5, count 1/3, background 1/4. Measured
    # on CPU with these prompts and seeds: 1.0 for every attribute (prompt seeds 1 and 2 too); the first teacher,
    # whose U-Net this one replaced, measured overall 0.906 here; see models/assets/shapes-sd1/README.md
    for k, bound in SHIPPED_MIN.items():
        assert acc[k] >= bound, (k, acc)


# with margin below what the shipped teacher measured (32 prompts: one miss is 0.031); above the first teacher's
# 0.906 overall, so the weaker U-Net coming back fails
SHIPPED_MIN = {"overall": 0.93, "shape": 0.93, "color": 0.93, "size": 0.93, "position": 0.93, "count": 0.93,
               "background": 0.93}
