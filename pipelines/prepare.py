"""The data stage: images+captions in, the teacher's embedding cache out (pipelines/cache.py).

    read (Ray Data: image folder | parquet | webdataset, streaming)
      → rows (key, image bytes, caption, score)
      → preprocess (CPU tasks: filters, decode with EXIF, RGB, resize + crop, train/val split by key hash)
      → embed (an actor pool with the teacher's VAE and text encoder(s); each batch written as parquet)
      → manifest.json (row counts, skipped counts by reason), written last

Bad rows never crash the stage: each one becomes a skip reason, counted in the log and the manifest.
Resumable: the cache's rows are keyed; a rerun encodes only the keys that are not there yet, and a
complete cache made with the same config is left alone. Keys must be unique, so a first, cheap pass reads
(key, content hash) of every row when duplicates are possible and decides which copy is kept.
The per-row functions (decode_image, preprocess, split_of, caption_skip, ...) are plain functions.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import random
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from pipelines.cache import MANIFEST, SPLITS, CacheManifest, read_manifest, write_manifest, write_rows
from pipelines.config import Config, DataConfig
from pipelines.formats import (
    IMAGE_EXTS,
    SHARD_DAMAGE,
    detect_format,
    imagefolder_metadata,
    rows_imagefolder,
    rows_parquet,
    rows_webdataset,
    with_fingerprint,
)
from pipelines.storage import (
    delete_dir,
    ensure_ray,
    exists,
    filesystem,
    join,
    list_files,
    model_dir,
    read_bytes,
    require_gpus,
    write_bytes,
)

log = logging.getLogger(__name__)

STATE = "_state.json"  # written first: which config this (possibly unfinished) cache belongs to
# config fields that do not change what is written (so changing them keeps the cache)
RUNTIME_FIELDS = {"output", "embed_batch_size", "embed_concurrency", "embed_num_gpus", "rows_per_file",
                  "decode_batch_size", "decode_num_cpus", "read_parallelism"}


class Skip(Exception):
    """A row that cannot be used; `reason` is what gets counted."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ----------------------------------------------------------------------------------------------------------
# Pure per-row functions


def split_of(key: str, val_fraction: float, seed: int = 0) -> str:
    """"val" for a fixed fraction of keys, by a hash of (seed, key): the same key always lands in the same split."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")
    return "val" if h / 2**64 < val_fraction else "train"


def caption_skip(caption: str | None, cfg: DataConfig) -> str | None:
    """The reason a caption is unusable, or None."""
    if caption is None or not caption.strip():
        return "missing_caption"
    n = len(caption.strip())
    if n < cfg.min_caption_chars:
        return "caption_too_short"
    if n > cfg.max_caption_chars:
        return "caption_too_long"
    return None


def score_skip(score: float | None, cfg: DataConfig) -> str | None:
    if cfg.min_score is None:
        return None
    if score is None or (isinstance(score, float) and math.isnan(score)):
        return "missing_score"
    return "low_score" if score < cfg.min_score else None


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB for any PIL mode: transparency composited on white, 16-bit and float scaled to 8 bits, CMYK/L/P converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        if img.mode == "F" and a.max() <= 1.0:
            hi = 1.0
        img = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_image(data: bytes, draft_short_side: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """(RGB image upright by its EXIF orientation, original (height, width)); raises Skip for bad bytes.

    With draft_short_side, JPEGs are decoded at a reduced scale (DCT scaling) that still leaves the short
    side at least that long: much faster for large photos that get resized down anyway.
    """
    if not data:
        raise Skip("empty_file")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        orientation = img.getexif().get(0x0112, 1)
        if orientation in (5, 6, 7, 8):  # rotated by 90 degrees: height and width swap
            w, h = h, w
        if draft_short_side and img.format == "JPEG" and min(w, h) > draft_short_side:
            s = draft_short_side / min(w, h)
            img.draft("RGB", (math.ceil(img.size[0] * s), math.ceil(img.size[1] * s)))
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img), (h, w)
    except Image.DecompressionBombError as err:
        raise Skip("too_large", str(err)) from None
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as err:
        reason = "truncated" if "truncated" in str(err).lower() else "undecodable"
        raise Skip(reason, str(err)) from None


def aspect_buckets(resolution: int, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """(width, height) buckets of about resolution² pixels, sides a multiple of resolution/16 (64 at 1024)."""
    step = max(8, resolution // 16 // 8 * 8)
    area = resolution * resolution
    out = set()
    for w in range(step, 2 * resolution + 1, step):
        h = max(step, round(area / w / step) * step)
        if max(w, h) / min(w, h) <= max_ratio and h <= 2 * resolution:
            out.add((w, h))
    return sorted(out)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    r = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - r))


def preprocess(
    img: Image.Image,
    resolution: int,
    crop: str = "center",
    key: str = "",
    seed: int = 0,
    bucket: tuple[int, int] | None = None,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Resize the short side (cover the bucket), crop to (resolution, resolution) or the bucket.

    Returns (uint8 array (H, W, 3), crop (top, left) in resized pixels, SDXL's crop_coords_top_left).
    Random crops draw from a generator seeded by (seed, key): the same sample crops the same way every run.
    """
    tw, th = bucket or (resolution, resolution)
    w, h = img.size
    s = max(tw / w, th / h)
    rw, rh = max(tw, round(w * s)), max(th, round(h * s))
    img = img.resize((rw, rh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    if crop == "random":
        rng = random.Random(f"{seed}:{key}")
        top, left = rng.randint(0, rh - th), rng.randint(0, rw - tw)
    else:
        top, left = (rh - th) // 2, (rw - tw) // 2
    arr = np.asarray(img.crop((left, top, left + tw, top + th)), dtype=np.uint8)
    return arr, (top, left)


def to_model_input(pixels: np.ndarray, device: Any = "cpu", dtype: Any = None) -> Any:
    """uint8 (B, H, W, 3) → torch tensor (B, 3, H, W) in [-1, 1] on `device` (float32, or `dtype`), what the
    VAE encodes. The uint8 pixels travel to the device and are converted there: 4x fewer bytes to copy than
    floats, and no float pass on the CPU while the GPU waits."""
    import torch

    x = torch.from_numpy(np.array(pixels, dtype=np.uint8)).to(device)  # a writable copy
    x = x.permute(0, 3, 1, 2).float().contiguous() / 127.5 - 1.0
    return x if dtype is None else x.to(dtype)


def process_row(row: dict, cfg: DataConfig, buckets: list[tuple[int, int]] | None = None) -> dict:
    """One input row (key, image bytes, caption, score) → an output row with pixels, or with `skip` set."""
    key, caption = row["key"], row["caption"]
    out = {"key": key, "caption": caption or "", "split": split_of(key, cfg.val_fraction, cfg.seed), "skip": "",
           "pixels": b"", "h": 0, "w": 0, "orig_h": 0, "orig_w": 0, "crop_top": 0, "crop_left": 0}
    try:
        if row.get("error"):  # a reader's reason (a damaged shard): the sample is lost, counted here
            raise Skip(row["error"])
        reason = caption_skip(caption, cfg) or score_skip(row.get("score"), cfg)
        if reason:
            raise Skip(reason)
        out["caption"] = caption.strip()
        img, (oh, ow) = decode_image(row["image"], draft_short_side=cfg.resolution)
        if min(oh, ow) < max(cfg.min_side, 1):
            raise Skip("too_small")
        if max(oh, ow) / min(oh, ow) > cfg.max_aspect_ratio:
            raise Skip("bad_aspect_ratio")
        bucket = nearest_bucket(ow, oh, buckets) if buckets else None
        pixels, (top, left) = preprocess(img, cfg.resolution, cfg.crop, key, cfg.seed, bucket)
    except Skip as s:
        out["skip"] = s.reason
        return out
    out.update(pixels=pixels.tobytes(), h=pixels.shape[0], w=pixels.shape[1], orig_h=oh, orig_w=ow,
               crop_top=top, crop_left=left)
    return out


# ----------------------------------------------------------------------------------------------------------
# Reading the input formats (their row readers: pipelines/formats.py) into rows of (key, image, caption, score, fp)


BUILTIN_SHAPES = "builtin:shapes"


def builtin_params(source: str, field: str = "data.source") -> dict[str, Any]:
    """n, seed, holdout, only of a `builtin:shapes?n=N&seed=S[&holdout=K][&only=seen|heldout]` source (n default
    2000, seed 0, nothing held out; with holdout K, the K shape-color pairs of models.shapes.held_out(K) are
    left out of the data, and only=heldout asks for them alone, for evaluation prompts); errors name the field."""
    from urllib.parse import parse_qsl

    from models.shapes import indices

    _, _, query = source.partition("?")
    params: dict[str, Any] = {"n": 2000, "seed": 0, "holdout": 0, "only": None}
    usage = "builtin:shapes?n=N&seed=S[&holdout=K][&only=seen|heldout]"
    for k, v in parse_qsl(query, keep_blank_values=True):
        if k == "only" and v in ("seen", "heldout"):
            params[k] = v
        elif k in ("n", "seed", "holdout") and v.lstrip("-").isdigit():
            params[k] = int(v)
        else:
            raise ValueError(f"{field} {source!r}: expected {usage} (got {k}={v!r})")
    if params["n"] < 1:
        raise ValueError(f"{field} {source!r}: n must be at least 1")
    try:
        indices(1, params["seed"], params["holdout"], params["only"])  # checks holdout and only together
    except ValueError as e:
        raise ValueError(f"{field} {source!r}: {e}") from None
    return params


def _render_shapes(batch: dict, seed: int, size: int, picked: list[int] | None = None) -> dict:
    from models.shapes import png_bytes, sample

    out: dict[str, list] = {"key": [], "image": [], "caption": []}
    for j in batch["id"].tolist():
        s = sample(seed, j if picked is None else picked[j], size)
        out["key"].append(s.key)
        out["image"].append(png_bytes(s.image))
        out["caption"].append(s.caption)
    return out


def builtin_source(cfg: Config) -> DataConfig:
    """The data section reading a generated shapes dataset (models/shapes.py) in place of `builtin:shapes?...`:
    written once as parquet under {work_dir}/source by Ray tasks (the same images for the same n and seed as
    models.shapes.generate), read back like any parquet source, keyed by sample."""
    import ray

    d = cfg.data
    from models.shapes import held_out, indices

    p = builtin_params(d.source)
    hold = f"-holdout{p['holdout']}" + (f"-{p['only']}" if p["only"] else "") if p["holdout"] else ""
    uri = join(cfg.work_dir, "source", f"shapes-n{p['n']}-seed{p['seed']}{hold}-{d.resolution}px")
    done = join(uri, "_distillery_complete.json")
    if not exists(done):
        delete_dir(uri)  # what an interrupted generation left
        fs, path = filesystem(uri)
        picked = indices(p["n"], p["seed"], p["holdout"], p["only"]) if p["holdout"] else None
        ds = ray.data.range(p["n"], override_num_blocks=max(1, min(64, p["n"] // 1000)))
        ds = ds.map_batches(_render_shapes, fn_kwargs=dict(seed=p["seed"], size=d.resolution, picked=picked),
                            batch_size=500)
        t0 = time.time()
        ds.write_parquet(path, filesystem=fs)
        pairs = sorted(f"{s} {c}" for s, c in held_out(p["holdout"]))
        write_bytes(done, json.dumps({"rows": p["n"], **p, "held_out_pairs": pairs}).encode())
        log.info("generated %d shapes images (seed %d%s) at %s in %.1fs", p["n"], p["seed"],
                 f"; never {', '.join(pairs)}" if pairs and p["only"] != "heldout" else "", uri, time.time() - t0)
    return d.model_copy(update={"source": uri, "format": "parquet", "image_column": "image",
                                "caption_column": "caption", "key_column": "key"})


def read_rows(cfg: DataConfig) -> tuple[Any, str, int]:
    """A Ray dataset of rows (key, image, caption, score, fp, hash) from data.source; (dataset, format, files)."""
    import ray

    if not cfg.source:
        raise ValueError("data.source is not set: give the images+captions URI (local path or s3://)")
    files = list_files(cfg.source)
    fmt = cfg.format if cfg.format != "auto" else detect_format(files)
    fs, root = filesystem(cfg.source)

    blocks = {"override_num_blocks": cfg.read_parallelism} if cfg.read_parallelism else {}

    def paths(exts: set[str]) -> list[str]:
        return [f"{root}/{f}" if f else root for f in files if f.rsplit(".", 1)[-1].lower() in exts]

    if fmt == "imagefolder":
        images = paths(IMAGE_EXTS)
        if not images:
            raise ValueError(f"{cfg.source}: no image files ({', '.join(sorted(IMAGE_EXTS))})")
        meta = imagefolder_metadata(cfg.source, files, cfg)
        sidecars = {f for f in files if f.endswith(".txt")}
        ds = ray.data.read_binary_files(images, filesystem=fs, include_paths=True, **blocks)
        ds = ds.map_batches(rows_imagefolder, fn_kwargs=dict(root=root, fs=fs, meta=meta, sidecars=sidecars),
                            batch_format="numpy", zero_copy_batch=True)
        n_files = len(images)
    elif fmt == "parquet":
        shards = paths({"parquet"})
        if not shards:
            raise ValueError(f"{cfg.source}: no .parquet files")
        schema = pq.read_schema(fs.open_input_file(shards[0]))
        wanted = [cfg.image_column, cfg.caption_column, cfg.key_column, cfg.score_column]
        missing = [c for c in wanted if c and c not in schema.names]
        if missing:
            raise ValueError(f"{shards[0]}: no column(s) {missing} (has {schema.names}); set data.*_column")
        ds = ray.data.read_parquet(shards, filesystem=fs, columns=[c for c in wanted if c], **blocks)
        ds = ds.map_batches(rows_parquet, fn_kwargs=dict(cfg=cfg), batch_format="numpy")
        n_files = len(shards)
    elif fmt == "webdataset":
        shards = paths({"tar"})
        if not shards:
            raise ValueError(f"{cfg.source}: no .tar shards")
        # one shard per task, read by read_shard (tolerant of damaged and truncated shards)
        ds = ray.data.from_items([{"path": p} for p in shards], override_num_blocks=len(shards))
        ds = ds.map_batches(rows_webdataset, fn_kwargs=dict(fs=fs, root=root, cfg=cfg), batch_size=1,
                            batch_format="numpy")
        n_files = len(shards)
    else:
        raise ValueError(f"unknown data.format {fmt!r}")
    ds = ds.map_batches(with_fingerprint, batch_format="numpy")
    if cfg.max_rows:
        ds = ds.limit(cfg.max_rows)
    return ds, fmt, n_files


# ----------------------------------------------------------------------------------------------------------
# Keys: which copy of a duplicate is kept, which keys are already in the cache


def plan_duplicates(index: list[tuple[str, str, str]], dedup: bool) -> tuple[set, dict, set, dict]:
    """From (key, fingerprint, content hash) of every row: (keys dropped as duplicate images, key → the one
    fingerprint kept where a key occurs more than once, keys whose kept row occurs more than once, copies).

    With dedup, one row per image is kept. Without it every row is kept, and a key that occurs more than once (a
    parquet key is the image's hash: the same image twice) is made unique: `copies` maps such a key to
    {fingerprint: the first suffix of its rows}; the rows of one fingerprint are alike, so which of them takes which
    suffix does not matter, and a rerun gives the same set of keys."""
    by_key: dict[str, list[str]] = {}
    first_key: dict[str, str] = {}
    for key, fp, h in index:
        by_key.setdefault(key, []).append(fp)
        if dedup and h and (h not in first_key or key < first_key[h]):
            first_key[h] = key
    repeated = {k: sorted(fps) for k, fps in by_key.items() if len(fps) > 1}
    if not dedup:
        return set(), {}, set(), {k: {fp: fps.index(fp) for fp in set(fps)} for k, fps in repeated.items()}
    winner = {k: fps[0] for k, fps in repeated.items()}
    ambiguous = {k for k, fps in repeated.items() if fps.count(winner[k]) > 1}
    dropped = {k for k, _, h in index if h and first_key[h] != k}
    return dropped, winner, ambiguous, {}


def copy_key(key: str, n: int) -> str:
    """The key of the n-th copy of a row (0: the key itself)."""
    return key if n == 0 else f"{key}#{n}"


class _Claims:
    """Ray actor: the first claim of a key wins (rows that are exact copies, key and all); `occurrence` numbers the
    copies of a (key, fingerprint) instead, for data.dedup false."""

    def __init__(self):
        self.claimed: set[str] = set()
        self.seen: Counter = Counter()

    def claim(self, keys: list[str]) -> list[bool]:
        won = []
        for k in keys:  # one at a time: a key twice in one call wins once
            won.append(k not in self.claimed)
            self.claimed.add(k)
        return won

    def occurrence(self, pairs: list[tuple[str, str]]) -> list[int]:
        out = []
        for p in pairs:
            out.append(self.seen[p])
            self.seen[p] += 1
        return out


def _preprocess_batch(batch: dict, cfg: DataConfig, done: set, dropped: set, winner: dict, ambiguous: set,
                      copies: dict, claims: Any, buckets: list | None) -> dict:
    import ray

    rows = [dict(zip(batch, vals)) for vals in zip(*batch.values())]
    if copies:  # every copy kept: each gets a key of its own
        idx = [i for i, r in enumerate(rows) if r["key"] in copies]
        nth = ray.get(claims.occurrence.remote([(rows[i]["key"], rows[i]["fp"]) for i in idx])) if idx else []
        for i, n in zip(idx, nth):
            r = rows[i]
            r["key"] = copy_key(r["key"], copies[r["key"]][r["fp"]] + n)
    rows = [r for r in rows if r["key"] not in done]  # already in the cache: not read again, not counted
    keep = [True] * len(rows)
    claim_idx = [i for i, r in enumerate(rows) if r["key"] in ambiguous and r["fp"] == winner[r["key"]]]
    if claim_idx:
        won = ray.get(claims.claim.remote([rows[i]["key"] for i in claim_idx]))
        for i, w in zip(claim_idx, won):
            keep[i] = w
    out = []
    for r, k in zip(rows, keep):
        dup = not k or r["key"] in dropped or (r["key"] in winner and r["fp"] != winner[r["key"]])
        if dup:
            out.append({**process_row({**r, "caption": None}, cfg), "skip": "duplicate"})
        else:
            out.append(process_row(r, cfg, buckets))
    cols = ["key", "caption", "split", "skip", "pixels", "h", "w", "orig_h", "orig_w", "crop_top", "crop_left"]
    return {c: [o[c] for o in out] for c in cols}


def existing_keys(output: str) -> tuple[set[str], dict[str, int]]:
    """Keys already in the cache's parquet files, and row counts per split."""
    fs, root = filesystem(output)
    keys: set[str] = set()
    rows = dict.fromkeys(SPLITS, 0)
    for split in SPLITS:
        sel = pafs.FileSelector(f"{root}/{split}", allow_not_found=True)
        for info in fs.get_file_info(sel):
            if info.type != pafs.FileType.File or not info.path.endswith(".parquet"):
                continue
            col = pq.read_table(fs.open_input_file(info.path), columns=["key"]).column("key").to_pylist()
            keys.update(col)
            rows[split] += len(col)
    return keys, rows


# ----------------------------------------------------------------------------------------------------------
# Teacher embeddings: an actor per GPU (or CPU) that encodes batches and writes them


class Embedder:
    """Loads the teacher's VAE and text encoder(s) once; each call encodes a batch of up to data.rows_per_file
    rows, embed_batch_size at a time, and writes them as one parquet file per split (and bucket)."""

    def __init__(self, teacher: dict, data: dict, fs: pafs.FileSystem, root: str, device: str):
        import torch

        from models.teacher import load_teacher

        self.cfg = DataConfig.model_validate(data)
        self.fs, self.root = fs, root
        self.device = device
        self.teacher = load_teacher(model_dir(teacher["uri"]), dtype=teacher["dtype"], device=device,
                                    components=("vae", "text"), revision=teacher["revision"],
                                    variant=teacher["variant"])
        self.torch = torch

    def __call__(self, batch: dict) -> dict:
        from models.teacher import encode_prompts, sdxl_time_ids

        torch, t, cfg = self.torch, self.teacher, self.cfg
        summary: dict[str, list] = {"kind": [], "name": [], "count": []}
        for reason, n in Counter(s for s in batch["skip"] if s).items():
            summary["kind"].append("skip"), summary["name"].append(reason), summary["count"].append(n)
        for key, reason in zip(batch["key"], batch["skip"]):
            if reason in SHARD_DAMAGE:  # the key names the shard: "SHARD/#reason@offset"
                summary["kind"].append("damaged"), summary["name"].append(str(key)), summary["count"].append(1)
        good = [i for i, s in enumerate(batch["skip"]) if not s]
        groups: dict[tuple, list[int]] = {}
        for i in good:
            groups.setdefault((batch["split"][i], int(batch["h"][i]), int(batch["w"][i])), []).append(i)
        for (split, h, w), idx in sorted(groups.items()):
            keys = [str(batch["key"][i]) for i in idx]
            captions = [str(batch["caption"][i]) for i in idx]
            pixels = np.stack([np.frombuffer(batch["pixels"][i], np.uint8).reshape(h, w, 3) for i in idx])
            means, stds, embeds, pooled = [], [], [], []
            for j in range(0, len(idx), cfg.embed_batch_size):  # the model batch; the file holds them all
                sl = slice(j, j + cfg.embed_batch_size)
                with torch.no_grad():
                    x = to_model_input(pixels[sl], self.device, t.vae.dtype)
                    dist = t.vae.encode(x).latent_dist
                    emb = encode_prompts(t, captions[sl])
                # results stay on the device until the group is done: no wait for the GPU per model batch,
                # so the next batch is queued while this one runs
                means.append(dist.mean.float())
                stds.append(dist.std.float())
                embeds.append(emb["prompt_embeds"].float())
                if t.family == "sdxl":
                    pooled.append(emb["pooled"].float())
            mean, std = torch.cat(means).cpu(), torch.cat(stds).cpu()
            embed = torch.cat(embeds).cpu()
            cols: dict[str, Any] = {"key": keys, "caption": captions, "split": [split] * len(idx)}
            if cfg.latents in ("dist", "mean"):
                cols["latent_mean"] = mean.numpy()
                if cfg.latents == "dist":
                    cols["latent_std"] = std.numpy()
            else:
                lat = []
                for j, k in enumerate(keys):  # noise seeded by key: the same sample every run
                    seed = int(hashlib.sha1(f"{cfg.seed}:{k}".encode()).hexdigest()[:15], 16)
                    g = torch.Generator().manual_seed(seed)
                    lat.append(((mean[j] + std[j] * torch.randn(mean[j].shape, generator=g)) * t.vae_scale).numpy())
                cols["latent"] = lat
            cols["prompt_embeds"] = embed.numpy()
            if t.family == "sdxl":
                cols["pooled"] = torch.cat(pooled).cpu().numpy()
                cols["time_ids"] = [
                    np.array(sdxl_time_ids((int(batch["orig_h"][i]), int(batch["orig_w"][i])),
                                           (int(batch["crop_top"][i]), int(batch["crop_left"][i])), (h, w)),
                             dtype=np.float32)
                    for i in idx
                ]
            cols["width"] = [int(batch["orig_w"][i]) for i in idx]
            cols["height"] = [int(batch["orig_h"][i]) for i in idx]
            if cfg.aspect_buckets:
                cols["bucket"] = [f"{w}x{h}"] * len(idx)
            name = hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:20]
            n = write_rows(f"{self.root}/{split}/part-{name}.parquet", cols, fs=self.fs)
            summary["kind"].append("rows"), summary["name"].append(split), summary["count"].append(n)
        return summary


# ----------------------------------------------------------------------------------------------------------
# The stage


def cache_digest(cfg: Config) -> str:
    """What decides the cache's content: the data section (less runtime knobs) and the teacher."""
    data = {k: v for k, v in cfg.data.model_dump(mode="json").items() if k not in RUNTIME_FIELDS}
    blob = json.dumps({"data": data, "teacher": cfg.teacher.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _teacher_facts(cfg: Config) -> dict:
    """Family, prediction type, VAE factor and embedding shapes, read from the teacher's configs (no weights)."""
    from diffusers import AutoencoderKL, DiffusionPipeline
    from transformers import CLIPTextConfig

    from models.teacher import load_teacher, resolve_model_dir, trained_latents

    src = resolve_model_dir(model_dir(cfg.teacher.uri))
    kw = {"revision": cfg.teacher.revision} if cfg.teacher.revision else {}
    index = DiffusionPipeline.load_config(src, **kw)
    vae = AutoencoderKL.load_config(src, subfolder="vae", **kw)
    t = load_teacher(src, dtype="float32", components=(), revision=cfg.teacher.revision)
    te = CLIPTextConfig.from_pretrained(src, subfolder="text_encoder", **kw)
    dim, pooled = te.hidden_size, None
    if t.family == "sdxl":
        te2 = CLIPTextConfig.from_pretrained(src, subfolder="text_encoder_2", **kw)
        dim, pooled = te.hidden_size + te2.hidden_size, te2.projection_dim
    return {
        "family": t.family,
        "prediction_type": t.prediction_type,
        "vae_scaling_factor": float(vae.get("scaling_factor", 0.18215)),
        "vae_factor": 2 ** (len(vae["block_out_channels"]) - 1),
        "latent_channels": int(vae.get("latent_channels", 4)),
        "embed_shape": [int(te.max_position_embeddings), int(dim)],
        "pooled_dim": pooled,
        "has_unet": "unet" in index,
        "latents": cfg.data.latents if cfg.data.latents != "auto" else (trained_latents(src) or "dist"),
    }


def run(cfg: Config) -> dict:
    """Prepare the embedding cache at cfg.data.output; a complete cache with the same config is left alone."""
    d = cfg.data
    out = d.output
    digest = cache_digest(cfg)
    manifest = read_manifest(out)
    if manifest and manifest.complete:
        if manifest.config_digest != digest:
            raise ValueError(
                f"{out} holds a complete cache made with another data/teacher config "
                f"(digest {manifest.config_digest}, now {digest}); set data.output to a new location "
                "or delete it"
            )
        log.info("%s is complete (%s); nothing to do", out, manifest.rows)
        return {**manifest.model_dump(mode="json"), "output": out, "status": "already complete"}
    state_uri = join(out, STATE)
    if exists(state_uri):
        state = json.loads(read_bytes(state_uri))
        if state.get("config_digest") != digest:
            raise ValueError(
                f"{out} holds an unfinished cache made with another data/teacher config; set data.output to a "
                "new location or delete it"
            )

    facts = _teacher_facts(cfg)
    f = facts["vae_factor"]
    log.info("latents: %s (data.latents: %s)", facts["latents"], d.latents)
    if d.resolution % f:
        raise ValueError(f"data.resolution {d.resolution} is not a multiple of the teacher's VAE factor {f}")
    if d.aspect_buckets and facts["family"] != "sdxl":
        log.warning("data.aspect_buckets is meant for SDXL teachers (the %s U-Net ignores size)", facts["family"])
    buckets = [b for b in aspect_buckets(d.resolution, d.max_aspect_ratio) if b[0] % f == 0 and b[1] % f == 0] \
        if d.aspect_buckets else None

    ray = ensure_ray(cfg)
    pool = embed_resources(d, ray.cluster_resources().get("GPU", 0))  # (actors, GPUs each): checked before any reading
    require_gpus(ray, "data.embed_num_gpus", pool[1], "data.embed_num_gpus: 0 (embed on the CPU)")
    import ray.data

    if d.source and d.source.startswith(BUILTIN_SHAPES):
        cfg = cfg.model_copy(update={"data": builtin_source(cfg)})
    options = ray.data.DataContext.get_current().execution_options
    before = options.preserve_order
    options.preserve_order = before or d.max_rows is not None  # max_rows takes the first rows, every run
    try:
        return _run(cfg, facts, buckets, digest, pool)
    finally:
        options.preserve_order = before


def embed_resources(d: DataConfig, cluster_gpus: float) -> tuple[int, float]:
    """(actors, GPUs per actor) of the embedding pool: the configured values, else three actors per GPU of the
    cluster at 0.33 GPU each (measured faster than one or two per GPU), else one CPU actor."""
    gpus = d.embed_num_gpus if d.embed_num_gpus is not None else (0.33 if cluster_gpus > 0 else 0.0)
    if d.embed_concurrency is not None:
        return d.embed_concurrency, gpus
    return (max(1, int(cluster_gpus / gpus)) if gpus > 0 else 1), gpus


def _run(cfg: Config, facts: dict, buckets: list | None, digest: str, pool: tuple[int, float]) -> dict:
    import ray

    d, out, f = cfg.data, cfg.data.output, facts["vae_factor"]
    t0 = time.time()
    ds, fmt, n_files = read_rows(d)
    if not exists(join(out, STATE)):  # the inputs check out: from now on this output belongs to this config
        write_bytes(join(out, STATE), json.dumps({"config_digest": digest}).encode())
    done, _ = existing_keys(out)
    if done:
        log.info("%s: %d rows already cached; encoding only the rest", out, len(done))

    # pass 1 (cheap, no decoding): which copy of a duplicate is kept
    dropped, winner, ambiguous, copies = set(), {}, set(), {}
    if d.dedup or fmt != "imagefolder":
        index = []
        for b in ds.select_columns(["key", "fp", "hash"]).iter_batches(batch_format="numpy", batch_size=4096):
            index.extend(zip(b["key"].tolist(), b["fp"].tolist(), b["hash"].tolist()))
        dropped, winner, ambiguous, copies = plan_duplicates(index, d.dedup)
        del index

    claims = ray.remote(num_cpus=0)(_Claims).remote() if ambiguous or copies else None
    ds = ds.map_batches(
        _preprocess_batch,
        fn_kwargs=dict(cfg=d, done=done, dropped=dropped, winner=winner, ambiguous=ambiguous, copies=copies,
                       claims=claims, buckets=buckets),
        batch_format="numpy",
        batch_size=d.decode_batch_size,
        num_cpus=d.decode_num_cpus,
    )
    actors, gpus = pool
    device = "cuda" if gpus > 0 else "cpu"
    out_fs, out_root = filesystem(out)
    # with a GPU the actors only encode and the CPU tasks before them decode; on CPU Ray fuses both into
    # the actors (same resources), which saves moving pixels between processes
    summary = ds.map_batches(
        Embedder,
        fn_constructor_kwargs=dict(teacher=cfg.teacher.model_dump(),
                                   data={**d.model_dump(), "latents": facts["latents"]}, fs=out_fs, root=out_root,
                                   device=device),
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=d.rows_per_file,  # one call writes at most one file per split (and bucket)
        batch_format="numpy",
        num_gpus=gpus,
        num_cpus=0 if gpus > 0 else 1,
    )
    written, skipped, damaged = Counter(), Counter(), set()
    for b in summary.iter_batches(batch_format="numpy", batch_size=None):
        for kind, name, count in zip(b["kind"], b["name"], b["count"]):
            if kind == "damaged":
                damaged.add(str(name))
            else:
                (written if kind == "rows" else skipped)[str(name)] += int(count)
    # rows left out by data.max_rows are not skipped rows: they were never read
    _, rows = existing_keys(out)
    for reason, n in sorted(skipped.items()):
        log.info("skipped %d rows: %s", n, reason)
    log.info("cached %s rows (%d new) from %d %s files in %.1fs", rows, sum(written.values()), n_files, fmt,
             time.time() - t0)
    if sum(rows.values()) == 0:
        raise ValueError(f"{d.source}: no usable rows (skipped: {dict(skipped) or 'none'}); nothing to cache")
    manifest = CacheManifest(
        teacher=cfg.teacher.uri,
        family=facts["family"],
        prediction_type=facts["prediction_type"],
        resolution=d.resolution,
        dtype="float32",
        latents=facts["latents"],
        vae_scaling_factor=facts["vae_scaling_factor"],
        latent_shape=[facts["latent_channels"], d.resolution // f, d.resolution // f],
        embed_shape=facts["embed_shape"],
        pooled_dim=facts["pooled_dim"],
        buckets=[f"{w}x{h}" for w, h in buckets] if buckets else None,
        rows=rows,
        skipped=dict(sorted(skipped.items())),
        damaged_shards=sorted(damaged),
        source=d.source,
        format=fmt,
        config_digest=digest,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    write_manifest(out, manifest)
    log.info("wrote %s", join(out, MANIFEST))
    return {**manifest.model_dump(mode="json"), "output": out, "status": "prepared", "new_rows": sum(written.values())}
