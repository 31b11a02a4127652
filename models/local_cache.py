"""The node-local cache of things built or downloaded once (teachers copied from S3, builtin tiny models, metric
weights, registered models for Serve), and the one way a folder or file gets into it: built under a lock into a
folder of its own, then renamed into place, so a reader never sees half of one and a build cut short leaves
nothing behind."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("DISTILLERY_CACHE", Path.home() / ".cache" / "distillery"))


def build_once(dest: Path, build: Callable[[Path], None], done: Callable[[Path], bool] | None = None) -> Path:
    """`dest`, made by `build(tmp)` the first time and renamed into place; returns `dest`. However many processes
    of a node ask at the same time, one builds and the others wait on the lock and find it there. `done(dest)`
    says whether an existing `dest` is complete (default: it exists)."""
    done = done or Path.exists
    if done(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.with_name(dest.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if done(dest):
            return dest
        tmp = dest.with_name(f"{dest.name}.{os.getpid()}.partial")
        _remove(tmp)
        try:
            build(tmp)
            _remove(dest)  # an incomplete one left by an older version of this code
            tmp.rename(dest)
        finally:
            _remove(tmp)
    return dest


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()
