"""One pool of worker threads for the numpy work that splits over cores (numpy releases the GIL while copying or
casting large arrays): the casts of ``castpipe`` and the runtime's host-side im2col."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

MAX_WORKERS = 4  # more threads than this gain nothing on memory-bound copies
SPLIT_MIN_BYTES = 1 << 20  # less work than this (~0.5 ms of copying or widening) is not worth a thread hand-off
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def worker_count() -> int:
    """The cores this process may run on, at most ``MAX_WORKERS``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_WORKERS, cores))


def executor() -> ThreadPoolExecutor:
    """The shared pool (created on first use, ``worker_count()`` threads)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=worker_count(), thread_name_prefix="sdxl-ckpt-worker")
        return _pool


def run_split(work: Callable[[int, int], object], total: int, nbytes: int) -> None:
    """``work(start, stop)`` over ``[0, total)`` cut into one contiguous part per worker, all at once; returns when
    every part is done (re-raising the first error). Work of under ``SPLIT_MIN_BYTES`` (``nbytes`` written), or a
    single worker, runs as one part on the calling thread."""
    if worker_count() == 1 or nbytes < SPLIT_MIN_BYTES:
        work(0, total)
        return
    step = -(-total // worker_count())
    futures = [executor().submit(work, start, min(total, start + step)) for start in range(0, total, step)]
    for future in futures:
        future.result()
