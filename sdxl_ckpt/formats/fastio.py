"""The three tricks that bring a streaming conversion close to a plain copy of its input.

1. ``map_bytes``: a tensor is a read-only view over its own memory map of the source file, not a fresh buffer
   filled by ``read()`` (no anonymous pages, no copy). Each tensor gets its own map, unmapped when its array dies,
   so mapped pages never accumulate in RSS.
2. ``Background``: sha256 and the NaN / Inf check run on a worker thread fed in order through a small bounded
   queue (hashlib and numpy release the GIL on big buffers), so they overlap the write instead of following it.
3. ``copy_span``: bytes that pass through unchanged are copied file-to-file inside the kernel
   (``os.copy_file_range``), the way GNU ``cat`` copies; the caller writes whatever it could not copy.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np

from sdxl_ckpt.errors import CorruptFileError

# copy_file_range cannot do this pair of files (other filesystem, special file, old kernel): write them instead
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}


def map_bytes(path: str | os.PathLike, offset: int, nbytes: int, name: str) -> np.ndarray:
    """A read-only uint8 view of ``nbytes`` of ``path`` from ``offset``; CorruptFileError if the file is shorter.

    The file size is checked first: touching a mapped page past the end of a file kills the process (SIGBUS).
    """
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if offset + nbytes > size:
            got = max(0, size - offset)
            raise CorruptFileError(f"truncated: expected {nbytes} bytes, got {got}", path=path, key=name)
        if nbytes == 0:
            return np.empty(0, dtype=np.uint8)
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(handle.fileno(), offset + nbytes - start, access=mmap.ACCESS_READ, offset=start)
    if hasattr(mapped, "madvise"):
        mapped.madvise(mmap.MADV_SEQUENTIAL)
    return np.frombuffer(mapped, dtype=np.uint8, count=nbytes, offset=offset - start)


def copy_span(handle: BinaryIO, source: str | os.PathLike, offset: int, nbytes: int) -> int:
    """Append ``nbytes`` of ``source`` from ``offset`` to ``handle`` in the kernel; returns how many were copied.

    Fewer than ``nbytes`` (often 0) when the kernel cannot copy between these files: the caller writes the rest.
    """
    if nbytes == 0 or not hasattr(os, "copy_file_range"):
        return 0
    handle.flush()  # the kernel appends at the descriptor's position, after everything written so far
    done = 0
    with open(source, "rb") as src:
        while done < nbytes:
            try:
                count = os.copy_file_range(src.fileno(), handle.fileno(), nbytes - done, offset + done)
            except OSError as exc:
                if exc.errno in _NO_KERNEL_COPY:
                    break
                raise
            if count == 0:  # source shrank under us: let the caller's write of its (checked) bytes decide
                break
            done += count
    return done


class Background:
    """One worker thread calling queued functions in order; ``close()`` waits for them and re-raises their error.

    The queue is small (``depth`` items) so that the arrays waiting in it stay few: memory stays one or two
    tensors above a serial converter's.
    """

    def __init__(self, depth: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sdxl-ckpt-background", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:
                func, args = item
                try:
                    func(*args)
                except BaseException as exc:  # handed to the caller by close()
                    self._error = exc

    def put(self, func: Callable[..., Any], *args: Any) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((func, args))

    def close(self) -> None:
        """Wait until every queued call has run; raise the first error one of them raised."""
        self._finish()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Skip the calls still queued and end the thread (the caller failed; their results no longer matter)."""
        self._error = self._error or RuntimeError("stopped")
        self._finish()

    def _finish(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def __enter__(self) -> Background:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.stop()
