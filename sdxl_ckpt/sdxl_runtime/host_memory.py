"""Host memory for weights filled on CPU: tensors carved out of 2 MiB-aligned maps backed by huge pages.

Filling the full-size fp32 UNet writes 10 GB of fresh memory. Arrays from numpy's allocator get their own
``malloc`` maps, whose ends are not 2 MiB-aligned, so a fifth of those pages fall back to 4 KiB ones: half a
million page faults, seconds of system time. Here tensors are placed one after another in blocks whose start is
2 MiB-aligned and which ask for transparent huge pages (``MADV_HUGEPAGE``), so nearly every page is a 2 MiB one.

Each tensor is a numpy view of its block and keeps the block alive: a block is unmapped when the last tensor
placed in it is released (a component's weights are released together), so nothing outlives its component.
"""

from __future__ import annotations

import math
import mmap

import numpy as np

HUGE_PAGE = 2 << 20
# tensors share blocks of this size (a larger tensor gets a block of its own size). Only pages a tensor touches
# are ever allocated, so a block's unused tail costs address space, not memory: what a block can waste is the one
# huge page its last tensor ends in
BLOCK_BYTES = 1 << 30
ALIGN = 64  # every tensor starts on a cache line


class _Block:
    """One anonymous map with an aligned usable region and a bump pointer."""

    def __init__(self, nbytes: int) -> None:
        # private (an anonymous map is shared memory by default, which gets no transparent huge pages), with room
        # to move the start to a 2 MiB boundary
        self.map = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            self.map.madvise(mmap.MADV_HUGEPAGE)
        whole = np.frombuffer(self.map, dtype=np.uint8)
        start = -whole.ctypes.data % HUGE_PAGE
        self.bytes = whole[start : start + nbytes]
        self.used = 0

    def take(self, nbytes: int) -> np.ndarray | None:
        start = -(-self.used // ALIGN) * ALIGN
        if start + nbytes > self.bytes.size:
            return None
        self.used = start + nbytes
        return self.bytes[start : start + nbytes]


class HugePageArena:
    """Hands out uninitialised C-contiguous arrays placed on huge pages (see the module docstring).

    Tensors fill the open blocks first-fit, in the order they are asked for.
    """

    def __init__(self) -> None:
        self._open: list[_Block] = []

    def empty(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if nbytes == 0:
            return np.empty(shape, dtype=dtype)
        raw = next((r for r in (b.take(nbytes) for b in self._open) if r is not None), None)
        if raw is None:
            self._open.append(_Block(max(BLOCK_BYTES, -(-nbytes // HUGE_PAGE) * HUGE_PAGE)))
            raw = self._open[-1].take(nbytes)
        assert raw is not None
        return raw.view(dtype).reshape(shape)

    def close(self) -> None:
        """Stop placing tensors in the open blocks (they stay mapped while a tensor in them lives)."""
        self._open.clear()
