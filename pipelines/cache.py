"""The embedding cache that the data stage writes and the training stages read.

Layout under the cache URI: train/*.parquet and val/*.parquet (one row per sample: key, caption, split,
latent_mean+latent_std ("dist"), latent_mean ("mean") or latent ("sample"), prompt_embeds, and for SDXL
pooled+time_ids; tensors as Ray's Arrow
tensor extension type, so ray.data.read_parquet gives numpy arrays back) and manifest.json, written last.
"""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.storage import exists, filesystem, join, read_bytes, write_bytes, write_file

if TYPE_CHECKING:
    import torch

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


def read_manifest(uri: str) -> dict | None:
    """The cache's manifest, or None when there is none (never prepared, or still being written)."""
    path = join(uri, MANIFEST)
    if not exists(path):
        return None
    manifest = json.loads(read_bytes(path))
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{path}: cache schema version {manifest.get('schema_version')} but this code reads "
            f"{SCHEMA_VERSION}; prepare the data again into a new data.output"
        )
    return manifest


def write_manifest(uri: str, manifest: dict) -> None:
    write_bytes(join(uri, MANIFEST), json.dumps(manifest, indent=2).encode())


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


def _as_tensor(x: Any) -> torch.Tensor:
    import torch

    if isinstance(x, torch.Tensor):
        return x.float()
    x = np.asarray(x)
    if x.dtype == object:  # a column of separately stored arrays
        x = np.stack(list(x))
    return torch.from_numpy(np.ascontiguousarray(x)).float()


def sample_latents(batch: dict, manifest: dict, generator: torch.Generator | None = None) -> torch.Tensor:
    """Scaled latents (B, C, h, w) for the U-Net from a cache batch (numpy arrays or tensors, which stay on their
    device), in the form the manifest names (`latents`, what the teacher was trained on: data.latents):

    "dist": a draw mean + std * noise from the cached (unscaled) posterior, then scaled (SD and SDXL were trained on
            draws, as diffusers' training examples do);
    "mean": the cached posterior mean, scaled (a teacher trained on means: its VAE's std can be large);
    "sample": the cached latent, already scaled.
    """
    import torch

    if manifest["latents"] == "sample":
        return _as_tensor(batch["latent"])
    mean = _as_tensor(batch["latent_mean"])
    if manifest["latents"] == "mean":
        return mean * float(manifest["vae_scaling_factor"])
    std = _as_tensor(batch["latent_std"])
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    return (mean + std * noise) * float(manifest["vae_scaling_factor"])
