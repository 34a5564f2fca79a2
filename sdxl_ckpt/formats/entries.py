"""The unit every reader yields and every writer consumes: one tensor's description plus a way to read it later.

Headers and record scans give name, dtype and shape without touching tensor bytes, so a writer can plan its
whole output (header, offsets, report) before reading one tensor; ``load()`` reads exactly one tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from sdxl_ckpt.formats.dtypes import ITEMSIZE


@dataclass(frozen=True)
class TensorEntry:
    """One tensor: ``name``, safetensors-style ``dtype`` (F16, F32, BF16, I64...), ``shape``, where it comes from.

    ``loader`` returns a C-contiguous numpy array of the storage dtype (BF16 as uint16 bits) with ``shape``.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    loader: Callable[[], np.ndarray] = field(repr=False, compare=False)
    source: str = ""  # file (and key) the bytes come from, for error messages and reports
    # (file, offset) where ``load()``'s exact bytes lie, when they pass through unchanged: writers may copy them
    # in the kernel (``fastio.copy_span``) instead of writing the array. Read it through ``passthrough_span``.
    span: tuple[str, int] | None = field(default=None, compare=False)
    # the loader the span (and ``pieces``) was declared for: ``dataclasses.replace(entry, loader=...)`` copies
    # ``span`` but not this identity, so an entry whose loader was swapped (an edit, a cast) never copies the
    # stale source bytes
    span_owner: Callable[[], np.ndarray] | None = field(default=None, repr=False, compare=False)
    # the same bytes as ``load()`` as consecutive flat uint8 pieces, produced while earlier ones are written (a cast
    # done chunk by chunk on worker threads); writers prefer it. Read it through ``streamed_pieces``.
    pieces: Callable[[], Iterator[np.ndarray]] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (self.span is not None or self.pieces is not None) and self.span_owner is None:
            object.__setattr__(self, "span_owner", self.loader)

    @property
    def passthrough_span(self) -> tuple[str, int] | None:
        """The source byte range to copy in the kernel, or None when ``load()`` must be called."""
        return self.span if self.span is not None and self.span_owner is self.loader else None

    @property
    def streamed_pieces(self) -> Callable[[], Iterator[np.ndarray]] | None:
        """``pieces`` while it still describes ``load()``'s bytes, else None."""
        return self.pieces if self.pieces is not None and self.span_owner is self.loader else None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]

    def load(self) -> np.ndarray:
        return self.loader()


def entry_from_array(name: str, array: np.ndarray, dtype: str | None = None, source: str = "") -> TensorEntry:
    """An entry backed by an in-memory array (small generated tensors such as ``logit_scale``)."""
    from sdxl_ckpt.formats.dtypes import st_dtype_of

    arr = np.asarray(array, order="C")  # not ascontiguousarray: that turns a 0-d scalar into shape (1,)
    return TensorEntry(name, dtype or st_dtype_of(arr), tuple(arr.shape), lambda: arr, source)
