"""The unit every reader yields and every writer consumes: one tensor's description plus a way to read it later.

Headers and record scans give name, dtype and shape without touching tensor bytes, so a writer can plan its
whole output (header, offsets, report) before reading one tensor; ``load()`` reads exactly one tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from sdxl_ckpt.convert.dtypes import ITEMSIZE


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
    # in the kernel (``fastio.copy_span``) instead of writing the array
    span: tuple[str, int] | None = field(default=None, compare=False)

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
    from sdxl_ckpt.convert.dtypes import st_dtype_of

    arr = np.asarray(array, order="C")  # not ascontiguousarray: that turns a 0-d scalar into shape (1,)
    return TensorEntry(name, dtype or st_dtype_of(arr), tuple(arr.shape), lambda: arr, source)
