"""The three input formats the data stage reads: an image folder (captions as .txt sidecars or metadata.jsonl/.csv, the
Hugging Face imagefolder convention), parquet shards with image bytes (img2dataset/LAION style) and webdataset .tar
shards. Readers turn a file's records into rows (key, image bytes, caption, score; a damaged record into a row with
its error, never an exception); writers write the same formats (tests, the demo's shapes dataset, users converting
their data), bytes as given, so bad rows (truncated, empty, not an image) can be written on purpose."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.config import DataConfig
from pipelines.storage import join, read_bytes, write_bytes

log = logging.getLogger(__name__)

Sample = tuple[str, bytes, "str | None", dict]


def image_ext(data: bytes) -> str:
    """The file extension the bytes' magic number says; "jpg" for anything unrecognized."""
    if data.startswith(b"\x89PNG"):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:3] == b"GIF":
        return "gif"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return "jpg"


def _chunks(samples: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    chunk: list[Sample] = []
    for s in samples:
        chunk.append(s)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _check_key(key: str, fmt: str) -> None:
    if not key or key.startswith("/") or ".." in key.split("/"):
        raise ValueError(f"sample key {key!r} is not a usable relative name")
    if fmt == "webdataset" and "." in key.rsplit("/", 1)[-1]:
        raise ValueError(f"webdataset sample key {key!r} must not contain a dot")


def write_samples(
    uri: str,
    fmt: Literal["imagefolder", "parquet", "webdataset"],
    samples: Iterable[Sample],
    shard_size: int = 256,
    *,
    captions: Literal["auto", "txt", "jsonl", "csv"] = "auto",
) -> int:
    """Write (key, image bytes, caption or None, extra columns) samples under `uri`; returns the count.

    imagefolder: KEY.EXT images with KEY.txt captions, or one metadata.jsonl/.csv (file_name, caption,
    extras); "auto" uses metadata.jsonl when any sample has extra columns. parquet: part-00000.parquet...
    with key, image (binary), caption and the extra columns. webdataset: shard-00000.tar... with KEY.EXT,
    KEY.txt and KEY.json (the extras).
    """
    if fmt not in ("imagefolder", "parquet", "webdataset"):
        raise ValueError(f"unknown dataset format {fmt!r}; choose imagefolder, parquet or webdataset")
    n = 0
    if fmt == "imagefolder":
        meta: list[dict] = []
        any_extra = False
        for key, data, caption, extra in samples:
            _check_key(key, fmt)
            name = f"{key}.{image_ext(data)}"
            write_bytes(join(uri, name), data)
            meta.append({"file_name": name, "caption": caption, **extra})
            any_extra = any_extra or bool(extra)
            n += 1
        mode = captions if captions != "auto" else ("jsonl" if any_extra else "txt")
        if mode == "txt":
            for m in meta:
                if m["caption"] is not None:
                    write_bytes(join(uri, m["file_name"].rsplit(".", 1)[0] + ".txt"), m["caption"].encode())
        elif mode == "jsonl":
            write_bytes(join(uri, "metadata.jsonl"), "".join(json.dumps(m) + "\n" for m in meta).encode())
        else:
            cols = list(dict.fromkeys(k for m in meta for k in m))
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=cols)
            w.writeheader()
            w.writerows(meta)
            write_bytes(join(uri, "metadata.csv"), buf.getvalue().encode())
        return n
    for i, chunk in enumerate(_chunks(samples, shard_size)):
        for key, *_ in chunk:
            _check_key(key, fmt)
        if fmt == "parquet":
            extra_cols = list(dict.fromkeys(k for *_, extra in chunk for k in extra))
            table = pa.table(
                {
                    "key": [s[0] for s in chunk],
                    "image": pa.array([s[1] for s in chunk], pa.binary()),
                    "caption": pa.array([s[2] for s in chunk], pa.string()),
                    **{c: [s[3].get(c) for s in chunk] for c in extra_cols},
                }
            )
            buf = io.BytesIO()
            pq.write_table(table, buf)
            write_bytes(join(uri, f"part-{i:05d}.parquet"), buf.getvalue())
        else:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                for key, data, caption, extra in chunk:
                    files = [(f"{key}.{image_ext(data)}", data)]
                    if caption is not None:
                        files.append((f"{key}.txt", caption.encode()))
                    if extra:
                        files.append((f"{key}.json", json.dumps(extra).encode()))
                    for name, payload in files:
                        info = tarfile.TarInfo(name)
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
            write_bytes(join(uri, f"shard-{i:05d}.tar"), buf.getvalue())
        n += len(chunk)
    return n


def _bad_bytes(good: bytes, kind: int) -> bytes:
    return [b"", good[: len(good) // 2], b"this is not an image"][kind % 3]


def write_shapes(uri: str, fmt: str, n: int, seed: int = 0, size: int = 64, bad_fraction: float = 0.0,
                 shard_size: int = 256) -> dict:
    """Write the built-in shapes dataset (models.shapes.generate(n, seed, size)) to `uri` (local path or s3://) as
    imagefolder, parquet or webdataset.

    A bad_fraction of the rows, chosen from the seed, get broken image bytes (empty, truncated PNG, text)
    so the data stage's skip counting can be seen working. Returns what was written.
    """
    from models.shapes import generate, png_bytes

    if not 0.0 <= bad_fraction <= 1.0:
        raise ValueError(f"write_shapes: bad_fraction must be in [0, 1], got {bad_fraction}")
    bad_rng = np.random.default_rng([seed, 1 << 30])
    bad = set(bad_rng.permutation(n)[: int(round(n * bad_fraction))].tolist())

    def samples():
        for i, s in enumerate(generate(n, seed, size)):
            data = png_bytes(s.image)
            yield s.key, (_bad_bytes(data, i) if i in bad else data), s.caption, {}

    written = write_samples(uri, fmt, samples(), shard_size)
    return {"uri": uri, "format": fmt, "rows": written, "bad_rows": len(bad), "seed": seed, "size": size}


# ----------------------------------------------------------------------------------------------------------
# Readers: records of each format as rows (key, image, caption, score; "error" where a record is damaged)


IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"}


def content_hash(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def detect_format(files: list[str]) -> str:
    exts = Counter(f.rsplit(".", 1)[-1].lower() for f in files if "." in f)
    if exts["parquet"]:
        return "parquet"
    if exts["tar"]:
        return "webdataset"
    if any(exts[e] for e in IMAGE_EXTS):
        return "imagefolder"
    raise ValueError(f"cannot tell the dataset format from the files ({dict(exts)}); set data.format")


def imagefolder_metadata(source: str, files: list[str], cfg: DataConfig) -> dict[str, dict]:
    """file path (relative) → {"caption", "score"} from metadata.jsonl/.csv files (HF imagefolder convention)."""
    meta: dict[str, dict] = {}
    for f in files:
        name = f.rsplit("/", 1)[-1]
        if name not in ("metadata.jsonl", "metadata.csv"):
            continue
        folder = f[: -len(name)]
        try:
            text = read_bytes(join(source, f)).decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise ValueError(f"{join(source, f)}: not UTF-8 text ({err})") from None
        try:
            records = (
                [json.loads(line) for line in text.splitlines() if line.strip()]
                if name.endswith(".jsonl")
                else list(csv.DictReader(io.StringIO(text)))
            )
        except json.JSONDecodeError as err:
            raise ValueError(f"{join(source, f)}: not JSON lines: {err}") from None
        for i, r in enumerate(records):
            if not isinstance(r, dict) or "file_name" not in r:
                raise ValueError(f"{join(source, f)}: record {i + 1} has no file_name")
            caption = r.get(cfg.caption_column, r.get("text"))
            score = r.get(cfg.score_column) if cfg.score_column else None
            meta[folder + r["file_name"]] = {"caption": caption, "score": _float(score)}
    return meta


def _float(x: Any) -> float | None:
    if x is None or x == "":
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _nan(x: float | None) -> float:
    return math.nan if x is None else x


def _text(x: Any) -> str:
    """A caption from a column that may hold None or NaN (pandas' missing value)."""
    return x if isinstance(x, str) else ""


def fingerprint(data: bytes, caption: str | None) -> str:
    return hashlib.sha1(data + b"\0" + (caption or "").encode()).hexdigest()


def rows_imagefolder(batch: dict, root: str, fs: pafs.FileSystem, meta: dict, sidecars: set) -> dict:
    keys, captions, scores = [], [], []
    for path in batch["path"]:
        rel = path[len(root) + 1 :]
        keys.append(rel)
        m = meta.get(rel)
        caption = m["caption"] if m else None
        if m is None and (txt := rel.rsplit(".", 1)[0] + ".txt") in sidecars:
            with fs.open_input_stream(f"{root}/{txt}") as f:
                caption = f.read().decode("utf-8-sig", errors="replace")
        captions.append(_text(caption))
        scores.append(_nan(m["score"]) if m else math.nan)
    return {"key": keys, "image": list(batch["bytes"]), "caption": captions, "score": scores}


def rows_parquet(batch: dict, cfg: DataConfig) -> dict:
    images = [(x.get("bytes") if isinstance(x, dict) else x) or b"" for x in batch[cfg.image_column]]
    captions = [_text(c) for c in batch[cfg.caption_column]]
    if cfg.key_column:
        keys = [str(k) for k in batch[cfg.key_column]]
    else:
        keys = [content_hash(b) for b in images]
    scores = [_nan(_float(s)) for s in batch[cfg.score_column]] if cfg.score_column else [math.nan] * len(keys)
    return {"key": keys, "image": images, "caption": captions, "score": scores}


WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


SHARD_DAMAGE = ("damaged_shard", "truncated_shard", "unreadable_shard")


def webdataset_row(key: str, parts: dict[str, bytes], cfg: DataConfig) -> dict:
    """One webdataset sample (its members by lower-case extension) as a row."""
    image = next((parts[e] for e in WDS_IMAGE_EXTS if e in parts), b"")
    meta: Any = {}
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    if not isinstance(meta, dict):  # unreadable, or JSON that is not an object: no caption or score from it
        meta = {}
    # a .txt member, else the json's caption column or "text" (as an imagefolder's metadata.jsonl is read)
    caption = (parts["txt"].decode("utf-8-sig", errors="replace") if "txt" in parts
               else meta.get(cfg.caption_column, meta.get("text")))
    score = meta.get(cfg.score_column) if cfg.score_column else None
    return {"key": key, "image": image, "caption": _text(None if caption is None else str(caption)),
            "score": _nan(_float(score)), "error": ""}


def read_shard(fs: pafs.FileSystem, path: str, name: str, cfg: DataConfig) -> tuple[list[dict], list[str]]:
    """The samples of one webdataset .tar shard, read as far as it can be read: (rows, what was damaged).

    Members group into samples by the name before the first dot of the file name; extensions are matched in lower
    case (KEY.JPG is an image). A damaged header is skipped over to the next readable member (tarfile's
    ignore_zeros), and the unreadable stretch becomes a row with the error "damaged_shard"; a shard cut off
    mid-file keeps the samples before the cut and a row with the error "truncated_shard" for the one cut."""
    import tarfile

    rows: list[dict] = []
    damaged: list[str] = []
    samples: dict[str, dict[str, bytes]] = {}

    def lost(reason: str, where: int) -> None:
        damaged.append(f"{name}: {reason} at byte {where}")
        rows.append({"key": f"{name}/#{reason}@{where}", "image": b"", "caption": "", "score": math.nan,
                     "error": reason})

    try:
        f = fs.open_input_file(path)
        size = f.size()
        tar = tarfile.open(fileobj=f, mode="r:", ignore_zeros=True)
    except (OSError, tarfile.TarError) as err:
        lost("unreadable_shard", 0)
        log.warning("%s: not readable as tar (%s)", name, err)
        return rows, damaged
    expect = 0  # where the next header should start
    try:
        while True:
            try:
                m = tar.next()
            except tarfile.ReadError as err:
                if "unexpected end" in str(err) or tar.offset >= size:
                    lost("truncated_shard", tar.offset)
                    break
                lost("damaged_shard", tar.offset)
                continue
            if m is None:
                break
            if m.offset > expect and any(f.read_at(m.offset - expect, expect).strip(b"\0")):
                lost("damaged_shard", expect)  # members were skipped over to reach this one
            expect = m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if not m.isfile():
                continue
            base = m.name.rsplit("/", 1)[-1]
            stem, dot, ext = base.partition(".")
            if not dot:
                continue
            folder = m.name[: len(m.name) - len(base)]
            try:
                data = tar.extractfile(m).read()
                if len(data) != m.size:
                    raise tarfile.ReadError("unexpected end of data")
            except (OSError, tarfile.TarError):
                lost("truncated_shard", m.offset)
                break
            samples.setdefault(f"{name}/{folder}{stem}", {})[ext.lower()] = data
        # a whole archive ends in zero blocks: a shard cut off between members has none
        if not damaged or "truncated_shard" not in damaged[-1]:
            if size % tarfile.BLOCKSIZE or any(f.read_at(min(size, 2 * tarfile.BLOCKSIZE),
                                                          max(0, size - 2 * tarfile.BLOCKSIZE))):
                lost("truncated_shard", size)
    finally:
        tar.close()
        f.close()
    rows += [webdataset_row(k, parts, cfg) for k, parts in samples.items()]
    return rows, damaged


def rows_webdataset(batch: dict, fs: pafs.FileSystem, root: str, cfg: DataConfig) -> dict:
    out: dict[str, list] = {"key": [], "image": [], "caption": [], "score": [], "error": []}
    for path in batch["path"]:
        name = str(path)[len(root) + 1 :].rsplit(".", 1)[0]
        rows, damaged = read_shard(fs, str(path), name, cfg)
        for d in damaged:
            log.warning("webdataset shard %s", d)
        for r in rows:
            for k in out:
                out[k].append(r[k])
    return out


def with_fingerprint(rows: dict) -> dict:
    rows["image"] = [b if isinstance(b, bytes) else b"" for b in rows["image"]]
    rows["fp"] = [fingerprint(b, c) for b, c in zip(rows["image"], rows["caption"])]
    rows["hash"] = [content_hash(b) if b else "" for b in rows["image"]]
    return rows

