"""The tricks that bring a streaming conversion close to a plain copy of its input.

1. ``map_bytes``: a tensor is a read-only view over its own memory map of the source file, not a fresh buffer
   filled by ``read()`` (no anonymous pages, no copy). Each tensor gets its own map, unmapped when its array dies,
   so mapped pages never accumulate in RSS. Small tensors (most of SDXL's 2,500: biases, norms) are read with one
   ``pread`` instead: a map costs more than copying a few KiB.
2. ``Background``: sha256 and the NaN / Inf check run on a worker thread fed in order through a small bounded
   queue (hashlib and numpy release the GIL on big buffers), so they overlap the write instead of following it.
   Small jobs run at once on the caller's thread while the worker is idle: handing a 4 KiB tensor to a thread
   costs more than checking it, and a small conversion then never starts the thread.
3. ``write_content``: bytes that pass through unchanged are copied file-to-file inside the kernel
   (``os.copy_file_range``), the way GNU ``cat`` copies; small ones go through the write buffer, which needs no
   flush and no system call per tensor.
4. ``open_sources``: while a writer runs, every source file is opened once, not once per tensor.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

import numpy as np

from sdxl_ckpt.errors import CorruptFileError

# copy_file_range cannot do this pair of files (other filesystem, special file, old kernel): write them instead
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}
# below this many bytes a tensor is read with pread (not mapped), written through the buffer (not copied in the
# kernel) and checked / hashed inline: the fixed cost of a map, a flush + copy_file_range or a thread hand-off
# (tens of microseconds each) exceeds the work itself
SMALL_BYTES = 1 << 20

_local = threading.local()  # .files: path -> open file, while open_sources() runs on this thread


@contextmanager
def open_sources() -> Iterator[None]:
    """Within this block, ``map_bytes`` and ``copy_span`` on this thread open each source path once.

    The writers wrap their whole run in it. Outside it every call opens the file itself, as a loader called on
    its own must. Nested blocks share the outer one's files.
    """
    if getattr(_local, "files", None) is not None:
        yield
        return
    _local.files = {}
    try:
        yield
    finally:
        files, _local.files = _local.files, None
        for handle in files.values():
            handle.close()


@contextmanager
def _source(path: str | os.PathLike) -> Iterator[BinaryIO]:
    files = getattr(_local, "files", None)
    if files is None:
        with open(path, "rb") as handle:
            yield handle
        return
    key = os.fspath(path)
    handle = files.get(key)
    if handle is None:
        handle = files[key] = open(key, "rb")  # noqa: SIM115 - closed by open_sources()
    yield handle


def map_bytes(path: str | os.PathLike, offset: int, nbytes: int, name: str) -> np.ndarray:
    """A read-only uint8 view of ``nbytes`` of ``path`` from ``offset``; CorruptFileError if the file is shorter.

    The file size is checked before mapping: touching a mapped page past the end of a file kills the process
    (SIGBUS). Under ``SMALL_BYTES`` the bytes are read (one ``pread``) rather than mapped.
    """
    with _source(path) as handle:
        if nbytes < SMALL_BYTES:  # a short read is the size check
            data = os.pread(handle.fileno(), nbytes, offset) if nbytes else b""
            if len(data) != nbytes:
                raise CorruptFileError(f"truncated: expected {nbytes} bytes, got {len(data)}", path=path, key=name)
            return np.frombuffer(data, dtype=np.uint8)
        size = os.fstat(handle.fileno()).st_size
        if offset + nbytes > size:
            got = max(0, size - offset)
            raise CorruptFileError(f"truncated: expected {nbytes} bytes, got {got}", path=path, key=name)
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
    with _source(source) as src:
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


def write_content(handle: BinaryIO, content: memoryview, span: tuple[str, int] | None) -> None:
    """Append ``content`` to ``handle``: copied in the kernel from ``span`` (file, offset) when it is given and the
    bytes are not small, written otherwise (and for whatever the kernel could not copy)."""
    copied = copy_span(handle, span[0], span[1], len(content)) if span and len(content) >= SMALL_BYTES else 0
    handle.write(content[copied:])


class Background:
    """One worker thread calling queued functions in order; ``close()`` waits for them and re-raises their error.

    The queue is small (``depth`` items) so that the arrays waiting in it stay few: memory stays one or two
    tensors above a serial converter's. The thread starts with the first job that is not run inline.
    """

    def __init__(self, depth: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._pending = 0  # jobs put and not finished; only the worker lowers it
        self._lock = threading.Lock()

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
            with self._lock:
                self._pending -= 1

    def put(self, func: Callable[..., Any], *args: Any, inline: bool = False) -> None:
        """Queue ``func(*args)``; with ``inline`` (a small job) run it now on this thread if nothing is queued or
        running, which keeps the order: the worker is idle and only this thread adds work."""
        if self._error is not None:
            raise self._error
        if inline:
            with self._lock:
                idle = self._pending == 0
            if idle:
                func(*args)
                return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sdxl-ckpt-background", daemon=True)
            self._thread.start()
        with self._lock:
            self._pending += 1
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
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def __enter__(self) -> Background:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.stop()
