"""A requested cast of a large tensor, done in chunks on worker threads while the writer writes the chunks done.

``st-to-ms --dtype fp32`` turns 6.9 GB of fp16 into 13.9 GB of fp32: even widened on its bits (``halfwiden``,
~2 GB/s of fp16 per core) the cast costs a good part of the time the write takes, so casting a whole tensor and
then writing it would take the sum of both. Here a tensor over ``STREAM_MIN_BYTES`` is cut into pieces of
``PIECE_ELEMENTS``; worker threads (numpy releases the GIL while casting) cast the next pieces while the writer
writes the current one, so the cast hides behind the write on a machine with a free core, and memory holds a few
pieces instead of a second copy of the tensor. Casts are element-wise, so the pieces join to exactly the bytes of
the whole-tensor cast.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import numpy as np

from sdxl_ckpt.errors import CorruptFileError
from sdxl_ckpt.formats.dtypes import ITEMSIZE, cast_array
from sdxl_ckpt.formats.entries import TensorEntry
from sdxl_ckpt.formats.halfwiden import CHUNK_ELEMENTS, widen_half
from sdxl_ckpt.formats.workers import executor, run_split, worker_count

# 4 Mi elements: 16 MiB of fp32 output per piece, under glibc's largest mmap threshold (32 MiB), so freed
# pieces are reused from the heap instead of being mapped (and page-faulted) afresh
PIECE_ELEMENTS = 1 << 22
STREAM_MIN_BYTES = 2 * PIECE_ELEMENTS * 4  # below this a tensor is cast whole: the pipeline would not pay


def cast_pieces(load: Callable[[], np.ndarray], src: str, dst: str, key: str | None = None) -> Iterator[np.ndarray]:
    """The cast of ``load()`` (``src`` -> ``dst``, safetensors dtypes) as flat uint8 pieces, in order.

    A few pieces ahead are in flight at any time (one per worker, plus one); leaving the loop early cancels the
    ones not started.
    """
    flat = load().reshape(-1)
    pool = executor()

    def cast(start: int) -> np.ndarray:
        part = cast_array(flat[start : start + PIECE_ELEMENTS], src, dst, key=key)
        return np.ascontiguousarray(part).reshape(-1).view(np.uint8)

    starts = iter(range(0, flat.size, PIECE_ELEMENTS))
    pending: deque[Future] = deque()
    try:
        for start in starts:
            pending.append(pool.submit(cast, start))
            if len(pending) > worker_count():
                break
        while pending:
            piece = pending.popleft().result()
            start = next(starts, None)
            if start is not None:
                pending.append(pool.submit(cast, start))
            yield piece
    finally:
        for future in pending:
            future.cancel()


def widen_half_threaded(array: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``array`` (float16) as float32 (into ``out`` when given: C-contiguous, same size), its slices widened on
    the worker threads at once.

    For a whole tensor wanted in memory (the runtime's fp32 weights from an fp16 file): writing 13 GB of fresh
    float32 pages is as much of the cost as the widening, and both spread over the cores.
    """
    flat = np.ascontiguousarray(array).reshape(-1)
    out = np.empty(flat.size, dtype=np.float32) if out is None else out.reshape(-1)
    run_split(lambda start, stop: widen_half(flat[start:stop], out=out[start:stop]), flat.size, out.nbytes)
    return out.reshape(np.shape(array))


def widen_half_span(path: str | os.PathLike, offset: int, out: np.ndarray, name: str = "") -> np.ndarray:
    """Fill ``out`` (float32, C-contiguous) with the float16 tensor of its size stored at ``offset`` of ``path``.

    Each worker reads its slice with ``pread`` in cache-sized chunks and widens each chunk from there: the bytes go
    page cache -> L2 -> result, with no page faults on a mapping of the file.
    """
    flat = out.reshape(-1)
    fd = os.open(path, os.O_RDONLY)
    try:

        def widen(start: int, stop: int) -> None:
            chunk = np.empty(min(CHUNK_ELEMENTS, stop - start), dtype=np.float16)
            for first in range(start, stop, chunk.size):
                count = min(chunk.size, stop - first)
                got = os.preadv(fd, [memoryview(chunk[:count]).cast("B")], offset + 2 * first)
                if got != 2 * count:
                    raise CorruptFileError(f"truncated: expected {2 * flat.size} bytes of float16", path=path, key=name)
                widen_half(chunk[:count], out=flat[first : first + count])

        run_split(widen, flat.size, out.nbytes)
    finally:
        os.close(fd)
    return out


def cast_entry(entry: TensorEntry, name: str, dst: str) -> TensorEntry:
    """``entry`` renamed to ``name`` and cast to ``dst``: ``load()`` casts it whole, and a large one also streams."""
    src = entry.dtype

    def load() -> np.ndarray:
        return cast_array(entry.load(), src, dst, key=name)

    big = entry.numel * ITEMSIZE[dst] >= STREAM_MIN_BYTES
    pieces = (lambda: cast_pieces(entry.load, src, dst, key=name)) if big else None
    return TensorEntry(name, dst, entry.shape, load, source=entry.source, pieces=pieces)
