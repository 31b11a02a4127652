"""Write image+caption datasets in the three input formats the data stage reads (tests, the demo's shapes
dataset, users converting their data): an image folder (captions as .txt sidecars or metadata.jsonl/.csv,
the Hugging Face imagefolder convention), parquet shards with image bytes (img2dataset/LAION style), and
webdataset .tar shards. Bytes are written as given, so bad rows (truncated, empty, not an image) can be
written on purpose."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from collections.abc import Iterable, Iterator
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.storage import join, write_bytes

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
