"""The data stage: pure per-row functions without Ray, then the stage through Ray on generated datasets in
the three formats (on the local S3 server, one on a local path), with bad rows, tiny teachers, reruns."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from datasets import caption, encode, good_image, make_samples, picture
from PIL import Image

from pipelines import formats, prepare
from pipelines.cache import read_manifest, sample_latents
from pipelines.config import parse_config
from pipelines.formats import image_ext, write_samples
from pipelines.storage import filesystem, join, list_files

# ---------------------------------------------------------------------------------------------- pure


def test_decode_handles_modes_and_exif():
    # good_image cycles: JPEG, RGBA, palette, CMYK, 16-bit, EXIF-rotated 64x96, 96x64, WEBP 64x80
    sizes = []
    for i in range(8):
        img, (h, w) = prepare.decode_image(good_image(i))
        assert img.mode == "RGB"
        assert img.size == (w, h)
        sizes.append((h, w))
    assert sizes[5] == (64, 96)  # stored 96 high and 64 wide, rotated upright by EXIF orientation 6
    assert sizes[6] == (64, 96) and sizes[7] == (80, 64)
    # 16-bit values are scaled, not clipped to white
    img, _ = prepare.decode_image(good_image(4))
    assert np.asarray(img).max() < 255 and np.asarray(img).mean() > 10
    # alpha is composited on white: a fully transparent image comes out white
    clear = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    img, _ = prepare.decode_image(encode(clear, "PNG"))
    assert np.asarray(img).min() == 255


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty_file"),
        (encode(picture(1), "JPEG")[:400], "truncated"),
        (b"not an image at all", "undecodable"),
    ],
)
def test_decode_bad_bytes(data, reason):
    with pytest.raises(prepare.Skip) as err:
        prepare.decode_image(data)
    assert err.value.reason == reason


def test_preprocess_crop_and_normalize():
    img = picture(3, 96, 64)
    a, (top, left) = prepare.preprocess(img, 32, "center")
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert (top, left) == (0, 8)  # 96x64 → 48x32, centered crop
    r1 = prepare.preprocess(img, 32, "random", key="k", seed=1)[1]
    assert r1 == prepare.preprocess(img, 32, "random", key="k", seed=1)[1]  # the same key crops the same way
    x = prepare.to_model_input(a[None])
    assert tuple(x.shape) == (1, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert x.min() < -0.2 and x.max() > 0.2  # a real range, not squashed
    # buckets: about resolution² pixels, the nearest aspect ratio wins
    buckets = prepare.aspect_buckets(64)
    assert (64, 64) in buckets and all(0.7 < w * h / 64**2 < 1.3 for w, h in buckets)
    bw, bh = prepare.nearest_bucket(96, 64, buckets)
    assert bw > bh
    a, _ = prepare.preprocess(img, 64, bucket=(bw, bh))
    assert a.shape == (bh, bw, 3)


def test_split_and_filters():
    keys = [f"k{i}" for i in range(2000)]
    splits = [prepare.split_of(k, 0.2, seed=0) for k in keys]
    assert splits == [prepare.split_of(k, 0.2, seed=0) for k in keys]
    assert 0.15 < splits.count("val") / len(keys) < 0.25
    assert splits != [prepare.split_of(k, 0.2, seed=1) for k in keys]
    cfg = parse_config({"data": {"min_caption_chars": 3, "max_caption_chars": 10, "min_score": 5}}).data
    assert prepare.caption_skip(None, cfg) == "missing_caption"
    assert prepare.caption_skip("  ", cfg) == "missing_caption"
    assert prepare.caption_skip("ab", cfg) == "caption_too_short"
    assert prepare.caption_skip("a" * 11, cfg) == "caption_too_long"
    assert prepare.caption_skip("a cat", cfg) is None
    assert prepare.score_skip(4.9, cfg) == "low_score" and prepare.score_skip(float("nan"), cfg) == "missing_score"
    assert prepare.score_skip(7.5, cfg) is None
    # duplicates: the smallest key of an image is kept; a repeated key keeps one fingerprint
    index = [("b", "f1", "h1"), ("a", "f2", "h1"), ("c", "f3", "h3"), ("c", "f4", "h4"), ("d", "f5", "h5"),
             ("d", "f5", "h5")]
    dropped, winner, ambiguous, copies = prepare.plan_duplicates(index, dedup=True)
    assert dropped == {"b"} and winner == {"c": "f3", "d": "f5"} and ambiguous == {"d"} and copies == {}
    # without dedup every row stays, and repeated keys get suffixes: c's two fingerprints 0 and 1, d's copies 0 and 1
    dropped, winner, ambiguous, copies = prepare.plan_duplicates(index, dedup=False)
    assert dropped == set() and winner == {} and ambiguous == set()
    assert copies == {"c": {"f3": 0, "f4": 1}, "d": {"f5": 0}}
    assert [prepare.copy_key("d", n) for n in (0, 1)] == ["d", "d#1"]


# ---------------------------------------------------------------------------------------------- stage


def _cfg(source: str, output: str, teacher: str, **data):
    tree = {"teacher": {"uri": teacher},
            "data": {"source": source, "output": output, "min_side": 32, "val_fraction": 0.25,
                     "embed_batch_size": 16, **data}}
    return parse_config(tree)


def _read_cache(output: str) -> dict:
    import ray

    ds = ray.data.read_parquet(join(output, "train"), filesystem=filesystem(output)[0]).union(
        ray.data.read_parquet(join(output, "val"), filesystem=filesystem(output)[0])
    )
    return ds.take_batch(10_000, batch_format="numpy")


def _check_rows(batch: dict, manifest: dict, good: int):
    n = len(batch["key"])
    assert n == good == sum(manifest["rows"].values())
    assert len(set(batch["key"])) == n
    for k, s in zip(batch["key"], batch["split"]):
        assert s == prepare.split_of(k, 0.25, seed=0)
    assert (batch["split"] == "val").sum() == manifest["rows"]["val"] > 0
    assert all(c.strip() for c in batch["caption"])


def test_imagefolder_s3_bad_rows_rerun_resume(s3_server, ray_local, s3_bucket, tiny_sd1_dir):
    samples, good, skipped = make_samples(n_good=32)  # 40 rows, 20% bad
    src, out = f"{s3_bucket}/raw", f"{s3_bucket}/cache"
    assert write_samples(src, "imagefolder", samples) == 40
    assert any(f.endswith(".txt") for f in list_files(src))
    cfg = _cfg(src, out, str(tiny_sd1_dir), rows_per_file=8)  # several files per split

    result = prepare.run(cfg)
    assert result["status"] == "prepared" and result["new_rows"] == 32
    typed = read_manifest(out)
    manifest = typed.model_dump(mode="json")
    assert manifest["complete"] and manifest["skipped"] == skipped
    assert manifest["family"] == "sd1" and manifest["latent_shape"] == [4, 16, 16]
    assert manifest["embed_shape"] == [77, 32] and manifest["pooled_dim"] is None
    batch = _read_cache(out)
    _check_rows(batch, manifest, len(good))
    assert set(batch["key"]) == {f"{k}.{image_ext(good_image(int(k[3:])))}" for k in good}
    assert batch["latent_mean"].shape == (32, 4, 16, 16) and batch["latent_mean"].dtype == np.float32
    assert batch["latent_std"].shape == (32, 4, 16, 16) and (batch["latent_std"] > 0).all()
    assert batch["prompt_embeds"].shape == (32, 77, 32) and batch["prompt_embeds"].dtype == np.float32
    lat = sample_latents(batch, typed)
    assert tuple(lat.shape) == (32, 4, 16, 16)

    # same config, complete output: nothing is done, nothing rewritten
    before = list_files(out)
    assert prepare.run(cfg)["status"] == "already complete"
    assert list_files(out) == before

    # an unfinished cache (no manifest, a shard lost) is finished, not redone
    fs, root = filesystem(out)
    fs.delete_file(f"{root}/manifest.json")
    lost = [f for f in before if f.startswith("val/")][0]
    n_lost = len(_read_cache_file(out, lost))
    fs.delete_file(f"{root}/{lost}")
    result = prepare.run(cfg)
    assert result["status"] == "prepared" and result["new_rows"] == n_lost
    assert read_manifest(out).rows == manifest["rows"] and read_manifest(out).skipped == skipped

    # another config into the same output is refused, naming the output
    with pytest.raises(ValueError, match="another data/teacher config"):
        prepare.run(_cfg(src, out, str(tiny_sd1_dir), resolution=32))


def _read_cache_file(output: str, rel: str) -> list:
    import pyarrow.parquet as pq

    fs, root = filesystem(output)
    return pq.read_table(fs.open_input_file(f"{root}/{rel}"), columns=["key"]).column("key").to_pylist()


def test_parquet_s3_scores_and_sampled_latents(s3_server, ray_local, s3_bucket, tiny_sd1_dir):
    samples, good, skipped = make_samples(n_good=16, extras=True)
    # an exact copy (bytes and caption) of a good row: with content-hash keys it has the same key
    samples.append(("copy", good_image(1), caption(1), {"aesthetic": 8.0}))
    skipped["duplicate"] += 1
    src, out = f"{s3_bucket}/laion", f"{s3_bucket}/cache"
    write_samples(src, "parquet", samples, shard_size=10)
    assert len(list_files(src)) == 3
    cfg = _cfg(src, out, str(tiny_sd1_dir), score_column="aesthetic", min_score=5.0, latents="sample")
    prepare.run(cfg)
    manifest = read_manifest(out).model_dump(mode="json")
    assert manifest["skipped"] == skipped and manifest["format"] == "parquet"
    batch = _read_cache(out)
    _check_rows(batch, manifest, len(good))
    assert "latent_mean" not in batch and batch["latent"].shape == (len(good), 4, 16, 16)
    # a scaled sample: mean times the scaling factor plus noise, not the raw mean
    assert sample_latents(batch, read_manifest(out)).shape == (len(good), 4, 16, 16)
    keys = {formats.content_hash(good_image(int(k[3:]))) for k in good}
    assert set(batch["key"]) == keys


def test_webdataset_local_path(ray_local, tmp_path, tiny_sd1_dir):
    samples, good, skipped = make_samples(n_good=16)
    src, out = str(tmp_path / "wds"), str(tmp_path / "cache")
    write_samples(src, "webdataset", samples, shard_size=12)
    assert sorted(list_files(src)) == ["shard-00000.tar", "shard-00001.tar"]
    # the CPU-side knobs: small decode batches, half a CPU per decode task, one read task per shard
    knobs = dict(decode_batch_size=5, decode_num_cpus=0.5, read_parallelism=2)
    prepare.run(_cfg(src, out, str(tiny_sd1_dir), crop="random", **knobs))
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["skipped"] == skipped and manifest["format"] == "webdataset"
    batch = _read_cache(out)
    _check_rows(batch, manifest, len(good))
    assert all(k.startswith("shard-0000") for k in batch["key"])
    # they change how the stage runs, not what it caches: other values find the cache complete
    again = prepare.run(_cfg(src, out, str(tiny_sd1_dir), crop="random", decode_batch_size=64, read_parallelism=None))
    assert again["status"] == "already complete"


def test_builtin_shapes_source_leaves_out_the_held_out_pairs(ray_local, tmp_path, tiny_sd1_dir):
    """The limited-data split, made by the data stage itself: `builtin:shapes?...&holdout=K` generates N images of
    which none shows one of the K held-out shape-color pairs; `only=heldout` prompts ask for those alone."""
    from models.shapes import held_out, parse_caption
    from pipelines.evaluate import read_prompts

    out = str(tmp_path / "cache")
    cfg = _cfg("builtin:shapes?n=48&seed=0&holdout=5", out, str(tiny_sd1_dir), min_side=16)
    cfg = cfg.model_copy(update={"work_dir": str(tmp_path / "work")})
    prepare.run(cfg)
    held = held_out(5)
    assert len(held) == 5 and held < held_out(6)  # nested: a larger holdout keeps the smaller one's pairs out
    rows = _read_cache(out)
    pairs = {(a["shape"], a["color"]) for a in map(parse_caption, rows["caption"])}
    assert len(rows["caption"]) == 48 and not pairs & held and len(pairs) >= 6
    done = json.loads(next((tmp_path / "work" / "source").glob("*/_distillery_complete.json")).read_text())
    assert done["rows"] == 48 and sorted(done["held_out_pairs"]) == sorted(f"{s} {c}" for s, c in held)

    unseen = read_prompts("builtin:shapes?n=30&seed=10000&holdout=5&only=heldout")
    assert len(unseen) == 30 and {(a["shape"], a["color"]) for a in map(parse_caption, unseen)} <= held
    seen = read_prompts("builtin:shapes?n=30&seed=10000&holdout=5&only=seen")
    assert not {(a["shape"], a["color"]) for a in map(parse_caption, seen)} & held
    for bad, says in (("holdout=18", "hold out 0 to 17"), ("only=heldout", "needs holdout"),
                      ("holdout=2&only=some", "only=seen|heldout")):
        with pytest.raises(ValueError, match=re.escape(says)) as err:
            read_prompts(f"builtin:shapes?n=3&{bad}")
        assert "evaluate.prompts" in str(err.value)


def test_read_parallelism_sets_read_tasks(ray_local, tmp_path):
    samples, _, _ = make_samples(n_good=16)
    src = str(tmp_path / "images")
    write_samples(src, "imagefolder", samples)
    counts = set()
    for tasks in (3, 7):
        ds, fmt, _ = prepare.read_rows(_cfg(src, str(tmp_path / "out"), "unused", read_parallelism=tasks).data)
        m = ds.materialize()
        assert fmt == "imagefolder" and m.num_blocks() == tasks
        counts.add(m.count())
    assert len(counts) == 1  # the same rows however they are split


def test_sdxl_buckets_time_ids(s3_server, ray_local, s3_bucket, tiny_sdxl_dir):
    samples = [(f"img{i:02d}", good_image(i), caption(i), {"src": "gen"}) for i in range(8)]
    samples.append(("wide", encode(picture(99, 128, 64), "PNG"), "a wide picture", {}))
    src, out = f"{s3_bucket}/raw", f"{s3_bucket}/cache"
    write_samples(src, "imagefolder", samples)  # extras: captions in metadata.jsonl
    assert "metadata.jsonl" in list_files(src)
    prepare.run(_cfg(src, out, str(tiny_sdxl_dir), aspect_buckets=True, val_fraction=0.0))
    manifest = read_manifest(out).model_dump(mode="json")
    assert manifest["family"] == "sdxl" and manifest["pooled_dim"] == 32 and manifest["embed_shape"] == [77, 64]
    assert manifest["rows"] == {"train": 9, "val": 0} and manifest["skipped"] == {}
    import pyarrow.parquet as pq

    fs, root = filesystem(out)
    rows = {}
    for f in list_files(join(out, "train")):
        t = pq.read_table(fs.open_input_file(f"{root}/train/{f}")).to_pylist()
        rows.update({r["key"]: r for r in t})
    wide = rows["wide.png"]
    w, h = map(int, wide["bucket"].split("x"))
    assert w > h and w * h <= 64 * 64 * 1.3
    assert np.asarray(wide["latent_mean"]).shape == (4, h // 4, w // 4)
    assert np.asarray(wide["prompt_embeds"]).shape == (77, 64) and np.asarray(wide["pooled"]).shape == (32,)
    t = np.asarray(wide["time_ids"])
    assert t.dtype == np.float32 and t.shape == (6,)
    assert list(t[:2]) == [64, 128] and list(t[4:]) == [h, w]  # original (h, w) ... target (h, w)
    rotated = rows["img05.jpg"]  # stored 64 wide and 96 high; upright (EXIF orientation 6) it is 96 wide
    assert list(np.asarray(rotated["time_ids"])[:2]) == [64, 96]
    assert (rotated["height"], rotated["width"]) == (64, 96)


def test_bad_source_errors(tmp_path):
    with pytest.raises(ValueError, match="data.source is not set"):
        prepare.read_rows(parse_config({}).data)
    (tmp_path / "notes.md").write_text("hi")
    with pytest.raises(ValueError, match="cannot tell the dataset format"):
        prepare.read_rows(parse_config({"data": {"source": str(tmp_path)}}).data)
    with pytest.raises(FileNotFoundError, match="no such file"):
        prepare.read_rows(parse_config({"data": {"source": str(tmp_path / "missing")}}).data)
    # a parquet without the configured caption column: the error names the column
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"image": [b"x"], "text": ["a"]}), buf)
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "a.parquet").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="caption"):
        prepare.read_rows(parse_config({"data": {"source": str(tmp_path / "p")}}).data)


def test_write_rows_tensor_columns_round_trip_without_dictionary_pages(tmp_path):
    """Cache files: an (N, ...) array or a list of same-shape arrays becomes a tensor column that reads back
    exactly; only the plain columns are dictionary-encoded (float tensors have nothing to share)."""
    import pyarrow.parquet as pq
    import ray.data.extensions  # noqa: F401 - registers the tensor type that the files name

    from pipelines.cache import write_rows

    rng = np.random.default_rng(0)
    mean, emb = rng.standard_normal((5, 4, 8, 8), dtype=np.float32), rng.standard_normal((5, 7, 16)).astype(np.float32)
    path = tmp_path / "part.parquet"
    n = write_rows(str(path), {"key": [f"k{i}" for i in range(5)], "split": ["train"] * 5,
                               "latent_mean": mean, "prompt_embeds": list(emb), "width": [64] * 5})
    assert n == 5
    table = pq.read_table(path)
    assert table.column("key").to_pylist() == [f"k{i}" for i in range(5)]
    np.testing.assert_array_equal(table.column("latent_mean").combine_chunks().to_numpy(), mean)
    np.testing.assert_array_equal(table.column("prompt_embeds").combine_chunks().to_numpy(), emb)
    meta = pq.ParquetFile(path).metadata.row_group(0)
    encodings = {meta.column(i).path_in_schema.split(".")[0]: meta.column(i).encodings for i in range(meta.num_columns)}
    assert any("DICTIONARY" in e for e in encodings["key"])
    for name in ("latent_mean", "prompt_embeds"):
        assert not any("DICTIONARY" in e for e in encodings[name]), (name, encodings[name])


def test_embed_resources_defaults_and_overrides():
    """Three embedding actors per GPU at 0.33 GPU each by default (bench/RESULTS.md: faster than one or two per
    GPU), one CPU actor without GPUs; configured values win."""
    d = parse_config({}).data
    assert prepare.embed_resources(d, 0) == (1, 0.0)
    assert prepare.embed_resources(d, 1) == (3, 0.33)
    assert prepare.embed_resources(d, 8) == (24, 0.33)
    d = parse_config({"data": {"embed_concurrency": 3}}).data
    assert prepare.embed_resources(d, 8) == (3, 0.33)
    d = parse_config({"data": {"embed_num_gpus": 1}}).data
    assert prepare.embed_resources(d, 8) == (8, 1)
    d = parse_config({"data": {"embed_num_gpus": 0}}).data  # CPU actors on a GPU cluster
    assert prepare.embed_resources(d, 8) == (1, 0)


def _tar_shard(path, samples: list[tuple[str, bytes, str]], ext: str = "jpg") -> list[int]:
    """A webdataset shard written with Python's tarfile (an outside writer); returns each member's header offset."""
    import tarfile

    offsets = []
    with tarfile.open(path, "w") as tar:
        for key, img, cap in samples:
            for name, data in ((f"{key}.{ext}", img), (f"{key}.txt", cap.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                offsets.append(tar.fileobj.tell())
                tar.addfile(info, io.BytesIO(data))
    return offsets


def test_webdataset_damaged_and_truncated_shards(ray_local, tmp_path, tiny_sd1_dir):
    """Shards written by tarfile: one intact (upper-case .JPG members), one cut off mid-file (an interrupted
    upload), one whose third sample's header is corrupted. Every readable sample is cached, each lost one is
    counted under a shard-level reason, and the manifest names the damaged shards."""
    from PIL import Image

    def jpeg(i):
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (20 * i % 255, 80, 160)).save(buf, "JPEG")
        return buf.getvalue()

    src = tmp_path / "wds"
    src.mkdir()
    shard = lambda s: [(f"s{s}-{i:02d}", jpeg(10 * s + i), f"sample {i} of shard {s}") for i in range(5)]  # noqa: E731
    _tar_shard(src / "a.tar", shard(0), ext="JPG")
    _tar_shard(src / "b.tar", shard(1))
    data = (src / "b.tar").read_bytes()
    cut = _tar_shard(tmp_path / "tmp.tar", shard(1))[6] + 700  # inside the 4th sample's image
    (src / "b.tar").write_bytes(data[:cut])
    offsets = _tar_shard(src / "c.tar", shard(2))
    raw = bytearray((src / "c.tar").read_bytes())
    raw[offsets[4] : offsets[4] + 100] = b"\xff" * 100  # the 3rd sample's image header
    (src / "c.tar").write_bytes(bytes(raw))

    out = str(tmp_path / "cache")
    prepare.run(_cfg(str(src), out, str(tiny_sd1_dir), val_fraction=0.0, min_side=0))
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    keys = set(_read_cache_train(out)["key"])
    assert {f"a/s0-{i:02d}" for i in range(5)} <= keys  # .JPG read as images
    assert {f"b/s1-{i:02d}" for i in range(3)} <= keys and not {"b/s1-03", "b/s1-04"} & keys
    assert {f"c/s2-{i:02d}" for i in (0, 1, 3, 4)} <= keys
    assert manifest["rows"]["train"] == len(keys) == 12
    sk = manifest["skipped"]
    assert sk.get("truncated_shard") == 1 and sk.get("damaged_shard", 0) >= 1, sk
    # the sample whose image header was lost keeps its caption member: it is counted, not silently gone
    assert sum(sk.values()) >= 2 and set(sk) <= {"truncated_shard", "damaged_shard", "empty_file"}, sk
    assert {d.split("/")[0] for d in manifest["damaged_shards"]} == {"b", "c"}


def test_webdataset_captions_from_json_members(tmp_path):
    """A shard written with tarfile whose captions are in KEY.json only (img2dataset's "caption", or "text"), one
    json that is a list and one that is not JSON: the captions are read, the others are rows without a caption."""
    import tarfile

    from PIL import Image

    from pipelines.formats import read_shard

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buf, "JPEG")
    members = {"a.jpg": buf.getvalue(), "a.json": b'{"caption": "a red square", "similarity": 0.3}',
               "b.jpg": buf.getvalue(), "b.json": b'{"text": "a red box"}',
               "c.jpg": buf.getvalue(), "c.json": b'["not", "a", "dict"]',
               "d.jpg": buf.getvalue(), "d.json": b"{oops"}
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    cfg = parse_config({"data": {"source": str(tmp_path), "score_column": "similarity"}}).data
    rows, damaged = read_shard(*filesystem(str(tmp_path / "s.tar")), "s", cfg)
    got = {r["key"]: (r["caption"], r["score"]) for r in rows}
    assert not damaged and set(got) == {"s/a", "s/b", "s/c", "s/d"}, got
    assert got["s/a"] == ("a red square", pytest.approx(0.3)) and got["s/b"][0] == "a red box"
    assert got["s/c"][0] == got["s/d"][0] == ""


def _read_cache_train(output: str) -> dict:
    import ray

    return ray.data.read_parquet(join(output, "train"), filesystem=filesystem(output)[0]).take_batch(
        10_000, batch_format="numpy")


def _bomb_png() -> bytes:
    """A valid PNG whose header says 15000 x 15000 pixels (a decompression bomb), patched with its CRC."""
    import struct
    import zlib

    png = bytearray(encode(picture(5), "PNG"))
    ihdr = png.index(b"IHDR")
    png[ihdr + 4 : ihdr + 12] = struct.pack(">II", 15000, 15000)
    png[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(png[ihdr : ihdr + 17])))
    return bytes(png)


def test_parquet_written_by_pyarrow_with_20_percent_bad_rows(ray_local, tmp_path, tiny_sd1_dir):
    """A parquet file written with pyarrow directly (an outside writer): 80 good rows in eight encodings and 20 bad
    ones of 17 kinds. Exactly the good rows are cached; every bad row is counted, under its reason."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    jpeg, png, gif = encode(picture(900), "JPEG"), encode(picture(901), "PNG"), encode(picture(902), "GIF")
    good = [(good_image(i), caption(i) + f" {i}", 6.0 + i % 3) for i in range(80)]
    bad = [  # (image bytes, caption, score, the reason it must be counted under, or None: any reason)
        (b"", "empty", 7.0, "empty_file"),
        (None, "null image", 7.0, "empty_file"),
        (jpeg[: len(jpeg) // 2], "half a jpeg", 7.0, "truncated"),
        (png[: len(png) // 2], "half a png", 7.0, None),
        (gif[: len(gif) // 3], "a third of a gif", 7.0, None),
        (b"this is not an image", "text", 7.0, "undecodable"),
        (bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)), "noise", 7.0, "undecodable"),
        (b"<html><body>404 Not Found</body></html>", "an error page", 7.0, "undecodable"),
        (encode(picture(903, 16, 16)), "tiny", 7.0, "too_small"),
        (encode(picture(904, 200, 40)), "a banner", 7.0, "bad_aspect_ratio"),
        (encode(picture(905)), None, 7.0, "missing_caption"),
        (encode(picture(906)), "   ", 7.0, "missing_caption"),
        (encode(picture(907)), "x" * 3000, 7.0, "caption_too_long"),
        (_bomb_png(), "a bomb", 7.0, "too_large"),
        (good[0][0], "the same bytes as good row 0", 7.0, "duplicate"),
        (encode(picture(908)), "a dull one", 2.0, "low_score"),
        (encode(picture(909)), "no score", None, "missing_score"),
        (b"\x89PNG\r\n\x1a\n", "only a png signature", 7.0, None),
        (encode(picture(910))[:40], "a png header alone", 7.0, None),
        (b"GIF89a", "only a gif signature", 7.0, None),
    ]
    assert len(bad) == 20
    rows = [(f"g{i:03d}", *g) for i, g in enumerate(good)] + [(f"z{j:03d}", *b[:3]) for j, b in enumerate(bad)]
    table = pa.table({"id": [r[0] for r in rows], "jpg": pa.array([r[1] for r in rows], pa.binary()),
                      "text": pa.array([r[2] for r in rows], pa.string()),
                      "aesthetic": pa.array([r[3] for r in rows], pa.float64())})
    src = tmp_path / "pq"
    src.mkdir()
    pq.write_table(table.slice(0, 50), src / "part-0.parquet")
    pq.write_table(table.slice(50), src / "part-1.parquet")

    out = str(tmp_path / "cache")
    prepare.run(_cfg(str(src), out, str(tiny_sd1_dir), image_column="jpg", caption_column="text", key_column="id",
                     score_column="aesthetic", min_score=5.0, val_fraction=0.0))
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert sorted(_read_cache_train(out)["key"]) == [f"g{i:03d}" for i in range(80)]
    skipped = manifest["skipped"]
    assert sum(skipped.values()) == 20, skipped
    for reason in {r for *_, r in bad if r}:
        assert skipped.get(reason, 0) >= sum(1 for *_, r in bad if r == reason), (reason, skipped)


def test_a_utf8_bom_never_reaches_the_caption(tmp_path):
    """Sidecars and metadata.jsonl saved by editors that write a UTF-8 byte-order mark."""
    import pyarrow.fs as pafs

    (tmp_path / "a.png").write_bytes(encode(picture(1)))
    (tmp_path / "a.txt").write_bytes("\ufeffa red square".encode())
    (tmp_path / "metadata.jsonl").write_bytes('\ufeff{"file_name": "b.png", "text": "a blue circle"}\n'.encode())
    cfg = parse_config({}).data
    rows = formats.rows_imagefolder({"path": [str(tmp_path / "a.png")], "bytes": [b"x"]}, str(tmp_path),
                                     pafs.LocalFileSystem(), {}, {"a.txt"})
    assert rows["caption"] == ["a red square"]
    meta = formats.imagefolder_metadata(str(tmp_path), ["metadata.jsonl"], cfg)
    assert meta["b.png"]["caption"] == "a blue circle"


def test_a_broken_metadata_file_is_refused_naming_it(tmp_path):
    """metadata.jsonl in Latin-1, or with a line that is JSON but not a record: a ValueError naming the file (and the
    record), not a decoding traceback or an AttributeError."""
    cfg = parse_config({}).data
    (tmp_path / "metadata.jsonl").write_bytes('{"file_name": "a.png", "text": "caf\u00e9"}\n'.encode("utf-16"))
    with pytest.raises(ValueError, match=r"metadata.jsonl: not UTF-8 text"):
        formats.imagefolder_metadata(str(tmp_path), ["metadata.jsonl"], cfg)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n["b.png", "no"]\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl: record 2 has no file_name"):
        formats.imagefolder_metadata(str(tmp_path), ["metadata.jsonl"], cfg)


def test_a_manifest_the_code_did_not_write_is_refused_naming_the_file(tmp_path):
    """The cache contract is typed: a manifest.json missing a field, with a field the code does not know, or
    of another schema version is an error that names the file, not a KeyError deep in a training worker."""
    from pipelines.cache import CacheManifest, write_manifest

    good = CacheManifest(teacher="t", family="sd1", prediction_type="epsilon", resolution=64, latents="dist",
                         vae_scaling_factor=0.18, latent_shape=(4, 8, 8), embed_shape=(77, 32), rows={"train": 2},
                         source="s", format="parquet", config_digest="d", created="now")
    write_manifest(str(tmp_path), good)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert read_manifest(str(tmp_path)) == good and raw["latent_shape"] == [4, 8, 8]
    for bad, match in [({k: v for k, v in raw.items() if k != "latents"}, "latents"),
                       ({**raw, "latent_shapes": [4, 8, 8]}, "latent_shapes"),
                       ({**raw, "family": "sd3"}, "family"),
                       ({**raw, "schema_version": 2}, "schema version 2")]:
        (tmp_path / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match) as err:
            read_manifest(str(tmp_path))
        assert "manifest.json" in str(err.value)


def test_local_copy_fetches_a_remote_file_once(s3_server, s3_bucket, tmp_path, monkeypatch):
    """storage.local_copy (remote metric weights, e.g. evaluate.feature_extractor on S3): the file is copied into
    the node's cache once, keyed by its URI; a local path passes through."""
    from pipelines.storage import local_copy, write_bytes

    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    uri = f"{s3_bucket}/weights/inception.pth"
    write_bytes(uri, b"weights v1")
    path = local_copy(uri)
    assert path.startswith(str(tmp_path / "cache")) and open(path, "rb").read() == b"weights v1"
    write_bytes(uri, b"weights v2")  # the same URI again: the cached copy, not a second download
    assert local_copy(uri) == path and open(path, "rb").read() == b"weights v1"
    assert not list((tmp_path / "cache").rglob("*.partial"))
    assert local_copy(str(tmp_path / "x.pth")) == str(tmp_path / "x.pth") == local_copy(f"file://{tmp_path}/x.pth")
