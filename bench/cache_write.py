"""Writing one embedding-cache file: pipelines.cache.write_rows against pyarrow's defaults, same rows, same run.

Each prepare actor call ends by writing its rows (VAE latent mean and std, text embeddings) as one parquet file;
while it writes, that actor's GPU share sits idle. Rows have SD 1.5's shapes at 512 px by default (latents
4x64x64 float32 twice, embeddings 77x768 float32: ~375 KB a row).

    python bench/cache_write.py                         # 256 rows (the prepare bench's rows per file), 5 repeats
    python bench/cache_write.py --append-results bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench.common import append_to_section  # noqa: E402
from models.metrics import measure_latency, median  # noqa: E402
from pipelines.cache import tensor_column, write_rows  # noqa: E402


def rows(n: int, latent: int, seq: int, dim: int) -> dict:
    rng = np.random.default_rng(0)
    return {"key": [f"{i:08d}" for i in range(n)], "caption": ["a photo of a cat"] * n, "split": ["train"] * n,
            "latent_mean": rng.standard_normal((n, 4, latent, latent), dtype=np.float32),
            "latent_std": rng.random((n, 4, latent, latent), dtype=np.float32),
            "prompt_embeds": rng.standard_normal((n, seq, dim), dtype=np.float32),
            "width": [1024] * n, "height": [768] * n}


def plain(path: str, cols: dict) -> None:
    """The reference: the same tensor columns, pyarrow's default write (dictionary encoding on every column,
    snappy), from the per-row arrays the stage used to build."""
    table = pa.table({k: tensor_column(list(v)) if isinstance(v, np.ndarray) else v for k, v in cols.items()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    Path(path).write_bytes(buf.getvalue())


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls."""
    return median(measure_latency(fn, repeats=repeats, warmup=0)) / 1000.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--latent", type=int, default=64, help="latent side (64: 512 px)")
    p.add_argument("--seq", type=int, default=77)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out-dir", default="/tmp/cache-write-bench")
    p.add_argument("--append-results", type=Path, default=None)
    args = p.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    cols = rows(args.rows, args.latent, args.seq, args.dim)
    tensor_column([np.zeros((1, 1), np.float32)])  # the tensor type's one-time registration, outside the timing
    ref = timed(lambda: plain(f"{args.out_dir}/plain.parquet", cols), args.repeats)
    ours = timed(lambda: write_rows(f"{args.out_dir}/ours.parquet", cols), args.repeats)
    mb = os.path.getsize(f"{args.out_dir}/ours.parquet") / 1e6
    ref_mb = os.path.getsize(f"{args.out_dir}/plain.parquet") / 1e6
    cpu = platform.processor() or platform.machine()
    text = (f"### cache_write: {datetime.date.today().isoformat()}, {os.cpu_count()} logical CPUs ({cpu})\n\n"
            f"`python bench/cache_write.py {' '.join(sys.argv[1:])}`: one cache file of {args.rows} rows "
            f"(latents 4x{args.latent}x{args.latent} mean + std, embeddings {args.seq}x{args.dim}, float32), "
            f"median of {args.repeats}, local disk.\n\n"
            "| writer | seconds per file | rows/s | MB |\n|---|---|---|---|\n"
            f"| pyarrow defaults, per-row arrays (reference) | {ref:.3f} | {args.rows / ref:.0f} | {ref_mb:.1f} |\n"
            f"| pipelines.cache.write_rows | {ours:.3f} | {args.rows / ours:.0f} | {mb:.1f} |\n\n"
            f"- write_rows: {ref / ours:.2f}x the reference's rows/s\n")
    print(text)
    if args.append_results:
        append_to_section(args.append_results, "## Data", text)
        print(f"appended to {args.append_results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
