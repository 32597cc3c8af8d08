"""The files of a model directory, and working on them in parallel: hashlib and cryptography release the GIL on
large buffers, so hashing or encrypting shards in threads scales with cores until the disk is the limit."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

MAX_WORKERS = 8  # enough to saturate NVMe; each worker holds a few read chunks in memory

T = TypeVar("T")
R = TypeVar("R")


def regular_files(root: Path) -> list[Path]:
    """Every file under root, sorted (symlinks followed, as in Hugging Face cache snapshots)."""
    return sorted(p for p in root.rglob("*") if p.is_file())


def map_files(fn: Callable[[T], R], items: list[T]) -> list[R]:
    """fn over items in worker threads, results in order; the first error is raised once all have finished."""
    workers = max(1, min(MAX_WORKERS, os.cpu_count() or 1, len(items)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))
