"""NaN / Inf detection on raw tensor storage, shared by inspect, diff and the converters' writers.

A checkpoint with non-finite weights still converts (the bytes are faithfully moved), but the user must hear
about it: it is the usual sign of a broken merge or an fp16 overflow. Half-precision values are tested on their
bit patterns (exponent all ones), which is exact and much faster than numpy's float16 ufuncs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from sdxl_ckpt.progress import write_line

# safetensors float dtype -> (same-width unsigned view, exponent mask): a value is NaN or Inf exactly when all its
# exponent bits are set, i.e. when (bits & ~sign) >= exponent mask; NaN when it is strictly greater
_FLOAT_BITS = {
    "F16": (np.dtype("<u2"), 0x7C00),
    "BF16": (np.dtype("<u2"), 0x7F80),
    "F32": (np.dtype("<u4"), 0x7F800000),
    "F64": (np.dtype("<u8"), 0x7FF0000000000000),
}
# all bits but the sign, per view (computed once: np.iinfo per call costs more than checking a small tensor)
_MAGNITUDE = {name: view.type(np.iinfo(view).max >> 1) for name, (view, _exp) in _FLOAT_BITS.items()}
# A chunk is proven finite by two vectorised max / min reductions (no scratch pass): float32 / float64 by their
# own extremes (NaN propagates through both, Inf is an extreme); half precision, which has no vectorised float16
# reduction in numpy 1.x, by its bits: a positive NaN / Inf is a signed view's value >= the exponent mask, a
# negative one an unsigned view's value >= sign | exponent mask
_NATIVE_REDUCTIONS = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8")}
_SIGN_16 = 0x8000
CHUNK_ELEMENTS = 1 << 18  # small enough to stay in cache: ~0.07 s per GB of fp16 when all is finite


@dataclass(frozen=True)
class NonFinite:
    """How many NaN and +-Inf values a tensor holds."""

    nan: int = 0
    inf: int = 0

    def __bool__(self) -> bool:
        return bool(self.nan or self.inf)

    def __add__(self, other: NonFinite) -> NonFinite:
        return NonFinite(self.nan + other.nan, self.inf + other.inf)

    def describe(self) -> str:
        return f"{self.nan} NaN, {self.inf} Inf"


def count_nonfinite(array: np.ndarray, st_dtype: str) -> NonFinite:
    """NaN / Inf counts of ``array`` held in the storage dtype of safetensors dtype ``st_dtype``.

    Integer and bool tensors are always finite. ``array`` may be any chunk of whole elements. The common case (all
    finite) is two reductions per chunk; exact counts are taken only in a chunk where something was found.
    """
    if st_dtype not in _FLOAT_BITS:
        return NonFinite()
    view, exp_mask = _FLOAT_BITS[st_dtype]
    bits = np.ascontiguousarray(array).reshape(-1).view(view)
    if bits.size == 0:
        return NonFinite()
    magnitude_mask = _MAGNITUDE[st_dtype]
    native = _NATIVE_REDUCTIONS.get(st_dtype)
    extremes = bits.view(native or np.int16)
    nan = inf = 0
    for start in range(0, bits.size, CHUNK_ELEMENTS):
        chunk = bits[start : start + CHUNK_ELEMENTS]
        values = extremes[start : start + CHUNK_ELEMENTS]
        if native is not None:
            if np.isfinite(values.max()) and np.isfinite(values.min()):
                continue
        elif values.max() < exp_mask and chunk.max() < _SIGN_16 | exp_mask:
            continue
        magnitude = np.bitwise_and(chunk, magnitude_mask)
        if magnitude.max() < exp_mask:
            continue
        special = np.count_nonzero(magnitude >= exp_mask)
        chunk_nan = np.count_nonzero(magnitude > exp_mask)
        nan += int(chunk_nan)
        inf += int(special - chunk_nan)
    return NonFinite(nan, inf)


_OVERFLOWS: dict[str, tuple[int, str]] = {}
_OVERFLOWS_LOCK = threading.Lock()
DTYPE_FLAGS = {"F16": "fp16", "F32": "fp32", "BF16": "bf16", "F64": "fp64"}


def note_overflow(key: str, count: int, dst_dtype: str) -> None:
    """Record that casting tensor ``key`` to ``dst_dtype`` turned ``count`` finite values into Inf."""
    with _OVERFLOWS_LOCK:  # a tensor cast in pieces reports each piece
        before = _OVERFLOWS.get(key, (0, dst_dtype))[0]
        _OVERFLOWS[key] = (before + count, dst_dtype)


def take_overflow(key: str) -> tuple[int, str] | None:
    """The overflow recorded for ``key`` (and forget it): ``(count, dtype)`` or None."""
    with _OVERFLOWS_LOCK:
        return _OVERFLOWS.pop(key, None)


class NonFiniteWatch:
    """Used by the writers: checks each tensor as it is written and prints one ``warning:`` line per tensor holding
    NaN / Inf (the first ``shown``; then one summary line), on stderr above any progress bar. Values are kept."""

    def __init__(self, source: object = None, shown: int = 10) -> None:
        self.source, self.shown = source, shown
        self.found: dict[str, NonFinite] = {}
        self._parts: dict[str, NonFinite] = {}

    def check(self, name: str, array: np.ndarray, st_dtype: str) -> NonFinite:
        found = count_nonfinite(array, st_dtype)
        self._record(name, found)
        return found

    def check_part(self, name: str, array: np.ndarray, st_dtype: str) -> None:
        """Count one piece of a tensor that is written in pieces; ``end_parts(name)`` after its last piece."""
        found = count_nonfinite(array, st_dtype)
        if found:
            self._parts[name] = self._parts.get(name, NonFinite()) + found

    def end_parts(self, name: str) -> None:
        self._record(name, self._parts.pop(name, NonFinite()))

    def _record(self, name: str, found: NonFinite) -> None:
        if found:
            self.found[name] = found
            if len(self.found) <= self.shown:
                where = f"{self.source}: " if self.source else ""
                write_line(f"warning: {where}{_describe(name, found, take_overflow(name))}")

    def finish(self) -> None:
        hidden = len(self.found) - self.shown
        if hidden > 0:
            total = sum(self.found.values(), NonFinite())
            write_line(f"warning: {hidden} more tensors hold NaN / Inf ({len(self.found)} in all, {total.describe()})")


def _describe(name: str, found: NonFinite, overflow: tuple[int, str] | None) -> str:
    """One warning line; Inf made by a ``--dtype`` cast is named as such (the source held finite values)."""
    if overflow is None:
        return f"key {name!r}: {found.describe()} values (written as they are)"
    count, dtype = overflow
    flag = DTYPE_FLAGS.get(dtype, dtype)
    line = f"--dtype {flag} overflowed {count} values in {name!r} (finite in the source, Inf in the output)"
    rest = NonFinite(found.nan, found.inf - count)
    return f"{line}; the source itself had {rest.describe()}" if rest else line
