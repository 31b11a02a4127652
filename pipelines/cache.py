"""The embedding cache that the data stage writes and the training stages read.

Layout under the cache URI: train/*.parquet and val/*.parquet (one row per sample: key, caption, split,
latent_mean+latent_std ("dist"), latent_mean ("mean") or latent ("sample"), prompt_embeds, and for SDXL
pooled+time_ids; tensors as Ray's Arrow
tensor extension type, so ray.data.read_parquet gives numpy arrays back) and manifest.json, written last.
"""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from pipelines.storage import exists, filesystem, join, read_bytes, write_bytes, write_file

if TYPE_CHECKING:
    import torch

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


class CacheManifest(BaseModel):
    """manifest.json: what the cache holds and how it was made. The data stage writes it last, the training and
    evaluate stages read it through this model, so a field one side does not know is an error, not a silent None."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    complete: bool = True
    teacher: str  # teacher.uri the embeddings were made with
    family: Literal["sd1", "sd2", "sdxl"]
    prediction_type: str
    resolution: int = Field(gt=0)
    dtype: str = "float32"
    latents: Literal["dist", "mean", "sample"]  # what the rows hold: see sample_latents
    vae_scaling_factor: float
    latent_shape: tuple[int, int, int]  # (C, h, w) of a square crop
    embed_shape: tuple[int, int]  # (tokens, width) of prompt_embeds
    pooled_dim: int | None = None  # SDXL's pooled text embedding
    buckets: list[str] | None = None  # "WxH" aspect-ratio buckets, None for square crops
    rows: dict[str, int]  # split -> rows
    skipped: dict[str, int] = {}  # reason -> rows
    damaged_shards: list[str] = []
    source: str
    format: str
    config_digest: str
    created: str


def trained_sizes(manifest: CacheManifest) -> list[str]:
    """The "WxH" image sizes a cache trains at, its square resolution first: then its aspect-ratio buckets."""
    square = f"{manifest.resolution}x{manifest.resolution}"
    return [square, *[b for b in manifest.buckets or [] if b != square]]


def read_manifest(uri: str) -> CacheManifest | None:
    """The cache's manifest, or None when there is none (never prepared, or still being written)."""
    path = join(uri, MANIFEST)
    if not exists(path):
        return None
    raw = json.loads(read_bytes(path))
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{path}: cache schema version {raw.get('schema_version')} but this code reads "
            f"{SCHEMA_VERSION}; prepare the data again into a new data.output"
        )
    try:
        return CacheManifest.model_validate(raw)
    except ValueError as err:
        raise ValueError(f"{path}: not a manifest this code wrote: {err}") from None


def write_manifest(uri: str, manifest: CacheManifest) -> None:
    write_bytes(join(uri, MANIFEST), manifest.model_dump_json(indent=2).encode())


def tensor_column(arrays: np.ndarray | list[np.ndarray]) -> pa.ExtensionArray:
    """Equal-shaped arrays as one Arrow tensor column (Ray Data's type), as the cache stores latents and embeddings."""
    from ray.data.extensions import ArrowTensorArray

    stacked = arrays if isinstance(arrays, np.ndarray) else np.stack(arrays)
    return ArrowTensorArray.from_numpy(np.ascontiguousarray(stacked, dtype=np.float32))


def write_rows(uri: str, columns: dict[str, Any], fs: Any = None) -> int:
    """Write one parquet file of cache rows; an array with one row per sample (or a list of same-shape numpy
    arrays) becomes a tensor column. With `fs` (a pyarrow filesystem), `uri` is a path inside it.

    Dictionary encoding only for the plain columns (keys, captions, splits): float tensors have nothing to share
    (bench/cache_write.py compares with pyarrow's defaults)."""
    tensors = {name for name, v in columns.items()
               if (isinstance(v, np.ndarray) and v.ndim > 1) or (len(v) > 0 and isinstance(v[0], np.ndarray))}
    table = pa.table({name: tensor_column(v) if name in tensors else v for name, v in columns.items()})
    buf = io.BytesIO()
    pq.write_table(table, buf, use_dictionary=[name for name in columns if name not in tensors])
    if fs is None:
        fs, uri = filesystem(uri)
    write_file(fs, uri, buf.getvalue())
    return table.num_rows


def read_split_columns(cache: str, split: str, columns: list[str] | None = None, limit: int | None = None,
                       start: int = 0) -> dict[str, Any]:
    """Rows start .. start+limit of a cache split read with pyarrow, in file order (no Ray Data job for a few rows
    or a small shard; files before `start` are skipped by their footers' row counts): strings as lists, tensors as
    one (N, ...) array, or a list of per-row arrays where the files' shapes differ (an aspect-bucketed cache).
    `columns`: those of them the files have; None: all."""
    import ray.data.extensions  # noqa: F401  (registers the Arrow tensor type, so tensors read back as such)

    from pipelines.storage import list_files

    root = join(cache, split)
    files = [f for f in list_files(root) if f.endswith(".parquet")]
    if not files:
        raise FileNotFoundError(f"{root}: no parquet files")
    fs, base = filesystem(root)
    if columns is not None:
        have = set(pq.read_schema(fs.open_input_file(f"{base}/{files[0]}")).names)
        columns = [c for c in columns if c in have]
    parts: dict[str, list[Any]] = {}
    n, skip = 0, start
    for f in files:
        if skip:
            rows = pq.read_metadata(fs.open_input_file(f"{base}/{f}")).num_rows
            if rows <= skip:
                skip -= rows
                continue
        t = pq.read_table(f"{base}/{f}", filesystem=fs, columns=columns).slice(skip)
        skip = 0
        if limit is not None:
            t = t.slice(0, limit - n)
        for name in t.column_names:
            parts.setdefault(name, []).append(_column_values(t.column(name).combine_chunks()))
        n += t.num_rows
        if limit is not None and n >= limit:
            break
    out: dict[str, Any] = {}
    for name, chunks in parts.items():
        if isinstance(chunks[0], list):
            out[name] = [v for c in chunks for v in c]
        elif len({c.shape[1:] for c in chunks}) == 1:
            out[name] = np.concatenate(chunks)
        else:
            out[name] = [row for c in chunks for row in c]
    return out


def split_row_shapes(cache: str, split: str, column: str, limit: int | None = None) -> list[tuple[int, ...]]:
    """Each row's array shape in `column` of a cache split, rows in read_split_columns' order: from each file's
    footer (schema and row count) where the file holds one shape, the cache's tensor type; no tensor data is read
    then."""
    import ray.data.extensions  # noqa: F401  (registers the Arrow tensor type, so the schema carries its shape)

    from pipelines.storage import list_files

    root = join(cache, split)
    fs, base = filesystem(root)
    out: list[tuple[int, ...]] = []
    for f in (f for f in list_files(root) if f.endswith(".parquet")):
        with fs.open_input_file(f"{base}/{f}") as fh:
            pf = pq.ParquetFile(fh)
            shape, rows = getattr(pf.schema_arrow.field(column).type, "shape", None), pf.metadata.num_rows
        if shape is not None:
            out += [tuple(shape)] * rows
        else:  # a variable-shape column: the arrays themselves
            col = pq.read_table(f"{base}/{f}", filesystem=fs, columns=[column]).column(column).combine_chunks()
            out += [a.shape for a in _column_values(col)]
        if limit is not None and len(out) >= limit:
            break
    return out[:limit]


def _column_values(col: pa.Array) -> np.ndarray | list:
    if hasattr(col, "to_numpy_ndarray"):  # Ray's tensor extension array
        return col.to_numpy_ndarray()
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return col.to_pylist()
    return np.stack([np.asarray(v, dtype=np.float32) for v in col.to_pylist()])


def _as_tensor(x: Any) -> torch.Tensor:
    import torch

    if isinstance(x, torch.Tensor):
        return x.float()
    x = np.asarray(x)
    if x.dtype == object:  # a column of separately stored arrays
        x = np.stack(list(x))
    return torch.from_numpy(np.ascontiguousarray(x)).float()


def sample_latents(batch: dict, manifest: CacheManifest, generator: torch.Generator | None = None) -> torch.Tensor:
    """Scaled latents (B, C, h, w) for the U-Net from a cache batch (numpy arrays or tensors, which stay on their
    device), in the form the manifest names (`latents`, what the teacher was trained on: data.latents):

    "dist": a draw mean + std * noise from the cached (unscaled) posterior, then scaled (SD and SDXL were trained on
            draws, as diffusers' training examples do);
    "mean": the cached posterior mean, scaled (a teacher trained on means: its VAE's std can be large);
    "sample": the cached latent, already scaled.
    """
    import torch

    if manifest.latents == "sample":
        return _as_tensor(batch["latent"])
    mean = _as_tensor(batch["latent_mean"])
    if manifest.latents == "mean":
        return mean * manifest.vae_scaling_factor
    std = _as_tensor(batch["latent_std"])
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    return (mean + std * noise) * manifest.vae_scaling_factor
