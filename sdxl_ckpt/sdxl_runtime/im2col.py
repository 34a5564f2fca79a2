"""The unfolded columns (im2col) of a convolution's input, built on the host by numpy on every core.

On CPU a convolution is computed as im2col + MatMul (``layers.Conv2d``). Building the columns is a strided copy:
numpy makes it from a window view of the zero-padded input, split by channels over worker threads (numpy's copy
releases the GIL), 1.5-2x faster than MindSpore's ``unfold`` kernel on two cores and the same values (a copy).
"""

from __future__ import annotations

import numpy as np

from sdxl_ckpt.formats.workers import run_split


def zero_padded(x: np.ndarray, padding: int) -> np.ndarray:
    """[B, C, H, W] -> [B, C, H + 2p, W + 2p] with a zero border (``x`` itself when ``padding`` is 0)."""
    if padding == 0:
        return np.ascontiguousarray(x)
    b, c, h, w = x.shape
    out = np.zeros((b, c, h + 2 * padding, w + 2 * padding), dtype=x.dtype)
    out[:, :, padding : padding + h, padding : padding + w] = x
    return out


def columns(padded: np.ndarray, kernel: int, stride: int, rows: tuple[int, int], width: int) -> np.ndarray:
    """The im2col columns of output rows ``rows`` = [r0, r1) of a ``width``-wide output, from a padded input.

    Returns [B, C*k*k, (r1 - r0) * width], channel-major (``ops.unfold``'s layout: row ``c*k*k + i*k + j`` holds
    input channel c at kernel offset (i, j)).
    """
    b, c = padded.shape[:2]
    r0, r1 = rows
    sb, sc, sh, sw = padded.strides
    window = np.lib.stride_tricks.as_strided(
        padded[:, :, r0 * stride :],
        shape=(b, c, kernel, kernel, r1 - r0, width),
        strides=(sb, sc, sh, sw, sh * stride, sw * stride),
        writeable=False,
    )
    out = np.empty(window.shape, dtype=padded.dtype)
    run_split(lambda start, stop: np.copyto(out[:, start:stop], window[:, start:stop]), c, out.nbytes)
    return out.reshape(b, c * kernel * kernel, (r1 - r0) * width)
