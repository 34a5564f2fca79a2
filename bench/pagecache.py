"""Put every case's input in the same page-cache state before it runs, and measure that state.

A converter reading a 7 GB file from RAM and one reading it from disk are different experiments; the bench
picks one state ("warm": the input read once just before, so it is cached; "cold": the input's pages dropped
with ``posix_fadvise(DONTNEED)``, no root needed) and applies it to every case, the plain copy included.
``resident_fraction`` asks the kernel (``mincore``) how much of the input really was cached, so the table says
so instead of assuming it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

_CHUNK = 16 * 1024 * 1024
_PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_MAP_FAILED = ctypes.c_void_p(-1).value


def warm(paths: Iterable[Path]) -> int:
    """Read every file once (into a reused buffer, so this process stays small); returns bytes read."""
    total = 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while n := handle.readinto(view):
                total += n
    return total


def evict(paths: Iterable[Path]) -> None:
    """Ask the kernel to drop the files' cached pages (clean pages go at once; only affects these files)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(path: Path) -> int | None:
    """Bytes of ``path`` now in the page cache (via mincore); None if the kernel would not say."""
    size = path.stat().st_size
    if size == 0:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            return None
        try:
            pages = (size + _PAGE - 1) // _PAGE
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, size, vec) != 0:
                return None
            cached = int(np.count_nonzero(np.frombuffer(vec, dtype=np.uint8) & 1))
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)
    return min(cached * _PAGE, size)


def resident_fraction(paths: Iterable[Path]) -> float | None:
    """Cached share of the files' bytes, 0..1 (None if unknown)."""
    total = cached = 0
    for path in paths:
        got = resident_bytes(path)
        if got is None:
            return None
        total += path.stat().st_size
        cached += got
    return cached / total if total else 1.0


def prepare(paths: list[Path], mode: str) -> float | None:
    """Bring ``paths`` into the state ``mode`` ("warm" | "cold") and return the measured resident fraction.

    Either way every dirty page on the machine is flushed first (``sync``): a run's own ``fsync`` otherwise pays
    for whatever the previous case (or a neighbour) left unwritten, which made plain-copy times vary 3-20 s.
    """
    if mode not in ("warm", "cold"):
        raise ValueError(f"unknown cache mode {mode!r}")
    os.sync()
    if mode == "warm":
        warm(paths)
    else:
        evict(paths)
    return resident_fraction(paths)
